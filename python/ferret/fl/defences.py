"""The server's defences, in the order a round applies them to the uploads it accepted, and the
options an algorithm inherits for them.

1. Differential privacy (:mod:`ferret.fl.privacy`), when the algorithm's options ask for it: every
   upload is clipped to ``dp_clip`` (and noised), weighed equally; no relative bound applies,
   since the privacy argument needs each client's bound fixed in advance (in the distributed
   mode, where the clients clip and noise their own, each noised share is held to the round's
   median norm, which honest shares do not reach).
2. Otherwise the influence bounds (:mod:`ferret.fl.bounds`): every upload cut block by block to
   the round's relative bound and to ``norm_bound``.
3. Then a robust statistic of the uploads' vectors (:mod:`ferret.fl.robust`) or the algorithm's
   own weighted combination (:meth:`~ferret.fl.algorithms.Algorithm.aggregate`).

:func:`aggregate` is called by :mod:`ferret.fl.server` alone: no algorithm calls a defence itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bounds import BoundOptions, clip_factors, factors
from .privacy import PrivacyOptions, noisy_mean
from .robust import RobustOptions, check_round, combine


class RoundSkipped(Exception):
    """A round the server cannot aggregate (too few uploads for its statistic, an update that would
    overflow the weights): the model is left as it was, and the run goes on."""


@dataclass(frozen=True)
class DefenceOptions(RobustOptions, PrivacyOptions):
    """The influence bounds, robust aggregation and differential privacy options, checked together:
    DP's noise is calibrated to the clipped sum, so it takes the plain mean and its clip is the
    bound (``norm_bound`` is refused; ``relative_bound`` holds only the distributed mode's noised
    shares, each to the round's median norm)."""

    def validate(self) -> None:
        super().validate()
        if self.private and (self.robust or self.norm_bound is not None):
            raise ValueError("differential privacy calibrates its noise to the clipped sum: use it with the plain "
                             "mean (aggregator='mean', no norm_bound; dp_clip already bounds every client)")


def aggregate(algorithm, model, uploads: list[bytes], weights: list[float], clients: list, ctx) -> int:
    """Aggregate a round's accepted ``uploads`` (from the clients whose contexts are ``clients``,
    with normalised ``weights``) into ``model`` through ``algorithm``, defences first (see the
    module docstring). Returns how many uploads a bound or a clip cut. Raises :class:`RoundSkipped`
    when a robust statistic has too few uploads."""
    o = algorithm.options
    if isinstance(o, PrivacyOptions) and o.private:
        return _private(algorithm, model, uploads, clients, ctx)
    bounded = 0
    if isinstance(o, BoundOptions) and o.bounded:
        uploads, bounded = bound(algorithm, model, uploads, o)
    if isinstance(o, RobustOptions) and o.robust:
        try:
            check_round(o.aggregator, o.byzantine, len(uploads))
        except ValueError as err:
            raise RoundSkipped(f"{err} (after the dropped ones)") from None
        vectors = [algorithm.summable(u, model, c) for u, c in zip(uploads, clients)]
        algorithm.aggregate_mean(model, combine(vectors, weights, o), ctx)
    else:
        algorithm.aggregate(model, uploads, weights, ctx)
    return bounded


def bound(algorithm, model, uploads: list[bytes], options: BoundOptions) -> tuple[list[bytes], int]:
    """``uploads`` cut block by block to ``options``' bounds, and how many were cut."""
    cut = factors(np.stack([algorithm.block_norms(u, model) for u in uploads]), options)
    over = np.any(cut < 1.0, axis=1)
    return [algorithm.scale_blocks(u, cut[i]) if over[i] else u for i, u in enumerate(uploads)], int(over.sum())


def _private(algorithm, model, uploads, clients, ctx) -> int:
    """The differentially private round: the noisy mean of the clipped vectors where the algorithm
    aggregates from a mean; otherwise each upload clipped in the model's units and weighed by
    1 / (clients sampled), the algorithm adding the noise itself (LoRA, on the merged weights)."""
    o = algorithm.options
    sampled = len(ctx.clients)
    if algorithm.has_means():
        vectors = [algorithm.summable(u, model, c) for u, c in zip(uploads, clients)]
        if o.dp_mode == "central":  # the server clips (noisy_mean)
            cut = np.array([min(1.0, o.dp_clip / max(float(np.linalg.norm(v)), np.finfo(float).tiny)) for v in vectors])
        else:  # each client clipped and noised its own; the server holds each share to the round's median norm,
            # which honest shares (their noise's norm concentrates) never reach: post-processing of what it sees
            cut = factors(np.array([[float(np.linalg.norm(v))] for v in vectors]), o)[:, 0]
            vectors = [v * c for v, c in zip(vectors, cut)]
        algorithm.aggregate_mean(model, noisy_mean(vectors, o, ctx.round_seed, sampled), ctx)
        return int(np.sum(cut < 1.0))
    norms = np.stack([algorithm.block_norms(u, model) for u in uploads])
    cut = clip_factors(norms, o.dp_clip)
    share = len(uploads) / sampled  # equal weights over the uploads make Σ clip(u_i) / sampled
    scaled = [algorithm.scale_blocks(u, np.full(norms.shape[1], share * f)) for u, f in zip(uploads, cut)]
    algorithm.aggregate(model, scaled, [1.0 / len(uploads)] * len(uploads), ctx)
    return int(np.sum(cut < 1.0))

