"""Byzantine-robust aggregation of the clients' upload vectors, and norm bounding.

An algorithm whose round is a function of the mean of per-client vectors (Ferret's coordinates
with shared bases and uniform allocation; FedAvg's flattened updates) can replace that mean by a
robust statistic of the vectors. Each statistic is written as its definition:

- ``mean``: Σ p_i x_i with the clients' weights;
- ``median``: per coordinate, the median of the n values (the mean of the two middle ones for
  even n);
- ``trimmed-mean``: per coordinate, the mean of the n values left after dropping the ``f``
  largest and the ``f`` smallest (needs n > 2f);
- ``krum``: the x_i whose summed squared distance to its n − f − 2 nearest other vectors is the
  smallest (Blanchard et al., 2017; needs n > 2f + 2; ties go to the lowest client);
- ``multi-krum``: the mean of the n − f vectors of smallest Krum score.

``f`` (the ``byzantine`` option) is how many hostile clients a round must withstand. The robust
statistics weigh every client equally: an example count is the client's own claim. The uploads
are bounded first (:mod:`ferret.fl.bounds`), whatever the statistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .bounds import BoundOptions
from .settings import at_least, one_of

AGGREGATORS = ("mean", "median", "trimmed-mean", "krum", "multi-krum")


@dataclass(frozen=True)
class RobustOptions(BoundOptions):
    """The robust-aggregation options an algorithm inherits, with the influence bounds:
    ``aggregator`` (one of :data:`AGGREGATORS`) and ``byzantine`` (the hostile clients per round
    it must withstand)."""

    aggregator: str = "mean"
    byzantine: int = 0

    def validate(self) -> None:
        super().validate()
        one_of("aggregator", self.aggregator, AGGREGATORS)
        at_least("byzantine", self.byzantine, 0)
        if self.byzantine and self.aggregator in ("mean", "median"):
            raise ValueError(f"byzantine={self.byzantine} is read by trimmed-mean, krum and multi-krum only, "
                             f"not by {self.aggregator!r}")

    @property
    def robust(self) -> bool:
        """Whether a robust statistic replaces the round's mean."""
        return self.aggregator != "mean"


def min_clients(aggregator: str, f: int) -> int:
    """The fewest clients a round needs for ``aggregator`` to withstand ``f`` hostile ones."""
    return {"trimmed-mean": 2 * f + 1, "krum": 2 * f + 3, "multi-krum": 2 * f + 3}.get(aggregator, 1)


def check_round(aggregator: str, f: int, n: int) -> None:
    """Raise ``ValueError`` unless ``n`` clients per round are enough for ``aggregator`` with ``f``."""
    need = min_clients(aggregator, f)
    if n < need:
        raise ValueError(f"aggregator {aggregator!r} with byzantine={f} needs at least {need} clients per round, "
                         f"got {n}")


def combine(vectors: list[np.ndarray], weights: list[float], options: RobustOptions) -> np.ndarray:
    """The robust aggregate (float64, length K) of the clients' ``vectors`` (each length K) with
    normalised ``weights`` (read by ``mean`` alone), as ``options`` says. Raises ``ValueError``
    when the round has too few clients for the aggregator (see :func:`check_round`)."""
    x = np.stack([np.asarray(v, dtype=np.float64) for v in vectors])
    n, f, how = x.shape[0], options.byzantine, options.aggregator
    check_round(how, f, n)
    if how == "mean":
        return np.asarray(weights, dtype=np.float64) @ x
    if how == "median":
        return np.median(x, axis=0)
    if how == "trimmed-mean":
        return np.sort(x, axis=0)[f : n - f].mean(axis=0)
    scores = krum_scores(x, f)
    if how == "krum":
        return x[int(np.argmin(scores))].copy()
    best = np.argsort(scores, kind="stable")[: n - f]
    return x[np.sort(best)].mean(axis=0)


def krum_scores(x: np.ndarray, f: int) -> np.ndarray:
    """Each row's Krum score: the sum of its squared distances to its n − f − 2 nearest other rows."""
    n = x.shape[0]
    dist = np.stack([np.square(x - row).sum(axis=1) for row in x])
    np.fill_diagonal(dist, math.inf)
    nearest = np.sort(dist, axis=1)[:, : n - f - 2]
    return nearest.sum(axis=1)
