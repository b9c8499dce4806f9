"""Sharing a coordinate budget among blocks.

* ``"uniform"``: the same count for every block (the remainder goes to the first blocks).
* ``"norm"``: counts proportional to each block's update norm, as the official Ferret code
  allocates them, with a floor of 2 per block (1 if the budget is below twice the number of
  blocks), but keeping the total exactly at the budget (largest remainders get the leftovers).

With ``caps`` (the SRHT basis has only as many rows as its block has elements), counts above
their cap are cut to it and the excess is shared among the other blocks by the same weights.
"""

from __future__ import annotations

import numpy as np

POLICIES = ("uniform", "norm")


def allocate(budget: int, n_blocks: int, policy: str = "norm", norms=None, caps=None) -> np.ndarray:
    """Per-block coordinate counts (int64 array of length ``n_blocks``) summing to ``budget``.

    ``norms`` (one non-negative float per block) is needed by ``"norm"``; ``caps`` (optional,
    one positive int per block) bounds each count. Raises ``ValueError`` for an unknown policy,
    a budget below the number of blocks or above the caps' sum.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown allocation {policy!r}: use one of {', '.join(POLICIES)}")
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise TypeError(f"budget must be an int, got {type(budget).__name__}")
    if budget < n_blocks:
        raise ValueError(
            f"a budget of {budget} coordinates is below the number of blocks ({n_blocks}): every block "
            f"needs at least one; raise the budget or group tensors into fewer blocks (grouping='paper')"
        )
    if caps is not None and budget > int(np.sum(caps)):
        raise ValueError(
            f"a budget of {budget} coordinates exceeds the {int(np.sum(caps))} rows this basis has "
            f"(one per element): lower the budget"
        )
    if policy == "uniform":
        weights = np.ones(n_blocks)
        return _capped(_spread(budget, weights), caps, weights)
    norms = np.asarray(norms, dtype=np.float64)
    if norms.shape != (n_blocks,):
        raise ValueError(f"norm allocation needs {n_blocks} block norms, got shape {norms.shape}")
    if not np.all(np.isfinite(norms)):
        raise ValueError("norm allocation got a NaN or infinite block norm")
    floor = 2 if budget >= 2 * n_blocks else 1
    counts = np.full(n_blocks, floor, dtype=np.int64)
    weights = norms if norms.sum() > 0 else np.ones(n_blocks)
    counts += _spread(budget - floor * n_blocks, weights)
    return _capped(counts, caps, weights)


def _capped(counts: np.ndarray, caps, weights: np.ndarray) -> np.ndarray:
    """Cut counts to their caps and share the excess among blocks below their cap, until none is over."""
    if caps is None:
        return counts
    caps = np.asarray(caps, dtype=np.int64)
    while np.any(counts > caps):
        excess = int(np.sum(np.maximum(counts - caps, 0)))
        counts = np.minimum(counts, caps)
        room = counts < caps
        w = np.where(room, weights, 0.0)
        counts += _spread(excess, w if w.sum() > 0 else room.astype(np.float64))
    return counts


def _spread(total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder, ties to the first)."""
    share = total * weights / weights.sum()
    counts = np.floor(share).astype(np.int64)
    leftover = int(total - counts.sum())
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[:leftover]] += 1
    return counts
