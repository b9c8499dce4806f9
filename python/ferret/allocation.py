"""Sharing a coordinate budget among blocks.

* ``"uniform"``: the same count for every block (the remainder goes to the first blocks).
* ``"norm"``: counts proportional to each block's update norm, as the official Ferret code
  allocates them, with a floor of 2 per block (1 if the budget is below twice the number of
  blocks), but keeping the total exactly at the budget (largest remainders get the leftovers).

With ``caps`` (the SRHT basis has only as many rows as its block has elements), counts above
their cap are cut to it and the excess is shared among the other blocks by the same weights.

**The budget rule** (:func:`check_budget`, the one place it is applied): a budget is a positive
int (a Python or NumPy integer, not a bool), at least the number of blocks (every block gets a
coordinate), and at most

* ``MAX_BUDGET = 2**31 - 1`` in all: packets count coordinates in uint32 per block and the kernels
  index them with int32;
* ``COORDS_PER_ELEMENT = 16`` per element of the update (or the number of blocks, if larger):
  more coordinates than elements is allowed by the math (Rademacher and Gaussian bases), but 16
  times the update's size is past any use and is most likely a bug, so it is refused before
  anything is allocated. The SRHT basis allows at most one coordinate per element.

**Client weights** (:func:`client_weights`), for merging packets or LoRA adapters: real numbers
(not bools or strings), finite and non-negative, with a positive sum.
"""

from __future__ import annotations

from numbers import Real

import numpy as np

POLICIES = ("uniform", "norm")
MAX_BUDGET = 2**31 - 1
COORDS_PER_ELEMENT = 16


def check_budget(budget, n_blocks: int = 1, numel: int | None = None) -> int:
    """Check a coordinate budget against the budget rule (module docstring) and return it as an int.

    ``n_blocks`` is the number of blocks it is shared among; ``numel`` (optional) the update's
    element count, which bounds it at ``COORDS_PER_ELEMENT`` per element. Raises ``TypeError``
    for anything but an integer, and ``ValueError`` naming the limit for a budget outside it.
    """
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, (int, np.integer)):
        raise TypeError(f"budget must be an int, got {type(budget).__name__}")
    budget = int(budget)
    if budget < 1:
        raise ValueError(f"budget must be a positive number of coordinates, got {budget}")
    if budget < n_blocks:
        raise ValueError(
            f"a budget of {budget} coordinates is below the number of blocks ({n_blocks}): every block "
            f"needs at least one; raise the budget or group tensors into fewer blocks (grouping='paper')"
        )
    limit, why = MAX_BUDGET, "the packet format's limit"
    if numel is not None and max(COORDS_PER_ELEMENT * numel, n_blocks) < limit:
        limit = max(COORDS_PER_ELEMENT * numel, n_blocks)
        why = f"{COORDS_PER_ELEMENT} per element of an update of {numel}"
    if budget > limit:
        raise ValueError(f"a budget of {budget} coordinates is too large: at most {limit} ({why})")
    return budget


def client_weights(weights, n: int, *, normalize: bool = True) -> np.ndarray:
    """``n`` client weights as float64; ``None`` means equal weights.

    With ``normalize`` they are divided by their sum (after dividing them by the largest where
    that sum would overflow) and sum to 1; without, they are returned as given
    (``None``: all 1). Raises ``TypeError`` for weights that are not real numbers (bools and
    strings included) and ``ValueError`` for a count other than ``n``, negative or non-finite
    weights, and weights that are all zero.
    """
    if weights is None:
        return np.full(n, 1.0 / n if normalize else 1.0)
    weights = list(weights)
    if not all(isinstance(w, Real) and not isinstance(w, (bool, np.bool_)) for w in weights):
        raise TypeError(f"weights must be real numbers, got {[type(w).__name__ for w in weights]}")
    w = np.array([float(x) for x in weights], dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"{w.size} weights for {n} clients")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    if not np.any(w > 0):
        raise ValueError(f"weights must sum to a positive number, got {w.tolist()}")
    if not normalize:
        return w
    with np.errstate(over="ignore"):
        total = w.sum()
    if not np.isfinite(total):  # huge weights: divide by the largest first (normal weights keep their bits)
        w = w / w.max()
        total = w.sum()
    return w / total


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
            f"a budget of {budget} coordinates exceeds the {int(np.sum(caps))} rows the basis has for "
            f"these blocks: lower the budget"
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
