"""Bounded influence: what one client's upload may add to the global model, block by block.

The server measures every accepted upload block by block: the norm of what it would add to each
block of the model (:meth:`~ferret.fl.algorithms.Algorithm.block_norms`; Ferret's layout blocks,
FedAvg's tensors, a LoRA module's B·A), before weighting. Two bounds then cut the blocks that are
too long (:meth:`~ferret.fl.algorithms.Algorithm.scale_blocks`), before anything is combined:

- ``relative_bound`` (on by default; ``inf`` turns it off): block ``b`` of an upload is cut to
  ``relative_bound`` times the round's median norm of block ``b`` (the lower median: with an even
  number of clients, the smaller middle one, so one of two clients cannot raise its own bound).
  No setting is needed, and an honest round, whose clients' norms are within a small factor of
  each other, is left as it was; a client cannot escape the bound by moving its norm into one
  small block, since every block is bounded by its own median. One client of ``m`` then adds at
  most ``relative_bound / m`` of a typical client's update to each block, whatever it sends.
- ``norm_bound`` (off by default): the whole upload, over every block, is cut to this norm (in
  the model's units: what it adds to the weights, before the server's step).

A differentially private round bounds every client with its clip instead (its sensitivity
argument needs each client's bound fixed in advance, and the relative bound depends on the other
clients' uploads; :mod:`ferret.fl.defences` says what holds the distributed mode's shares).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .settings import Settings

MIN_BOUND = 1e-6  # a bound below this leaves nothing of any update: refused as a mistake
DEFAULT_RELATIVE_BOUND = 2.0  # honest clients' block norms rarely differ from their median by more


@dataclass(frozen=True)
class BoundOptions(Settings):
    """The influence bounds an algorithm inherits (see the module docstring): ``relative_bound``
    (a factor of at least 1 over the round's median block norm; ``inf``: off) and ``norm_bound``
    (an absolute bound on each upload's norm; None: off)."""

    relative_bound: float = DEFAULT_RELATIVE_BOUND
    norm_bound: float | None = None

    def validate(self) -> None:
        super().validate()
        if not self.relative_bound >= 1:  # NaN fails too
            raise ValueError(f"relative_bound must be a factor of at least 1 over the round's median (inf: no "
                             f"bound), got {self.relative_bound}")
        if self.norm_bound is not None and not (math.isfinite(self.norm_bound) and self.norm_bound >= MIN_BOUND):
            raise ValueError(f"norm_bound must be a finite number of at least {MIN_BOUND:g} (a smaller bound leaves "
                             f"nothing of any update), got {self.norm_bound}")

    @property
    def bounded(self) -> bool:
        """Whether any bound applies."""
        return math.isfinite(self.relative_bound) or self.norm_bound is not None


def lower_median(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """The lower median along ``axis``: the ``(n - 1) // 2``-th smallest of ``n`` values."""
    n = x.shape[axis]
    return np.take(np.partition(x, (n - 1) // 2, axis=axis), (n - 1) // 2, axis=axis)


def factors(norms: np.ndarray, options: BoundOptions) -> np.ndarray:
    """The factor (in [0, 1]) each block of each upload is scaled by: ``norms`` is the
    ``clients × blocks`` matrix of block norms (float64, finite, non-negative); the result has its
    shape, 1 where nothing is cut."""
    norms = np.asarray(norms, dtype=np.float64)
    cut = np.ones_like(norms)
    if norms.size == 0:
        return cut
    tiny = np.finfo(np.float64).tiny
    if math.isfinite(options.relative_bound):
        limit = options.relative_bound * lower_median(norms, axis=0)
        over = norms > limit[None, :]
        cut = np.where(over, limit[None, :] / np.maximum(norms, tiny), 1.0)
    if options.norm_bound is not None:
        total = np.sqrt(np.sum(np.square(norms * cut), axis=1))
        cut = cut * np.where(total > options.norm_bound, options.norm_bound / np.maximum(total, tiny), 1.0)[:, None]
    return np.minimum(cut, 1.0)


def clip_factors(norms: np.ndarray, bound: float) -> np.ndarray:
    """Per upload, the factor that cuts its whole norm (over the ``clients × blocks`` ``norms``) to
    ``bound``: differential privacy's clip in the model's units."""
    total = np.sqrt(np.sum(np.square(np.asarray(norms, dtype=np.float64)), axis=1))
    return np.where(total > bound, bound / np.maximum(total, np.finfo(np.float64).tiny), 1.0)
