"""The server-side defences an algorithm's options inherit, robust aggregation
(:mod:`ferret.fl.robust`) and client-level differential privacy (:mod:`ferret.fl.privacy`), and
the one step of a round that applies them ahead of the algorithm's own mean."""

from __future__ import annotations

from dataclasses import dataclass

from .privacy import PrivacyOptions, noisy_mean
from .robust import RobustOptions, bound_norms, combine


@dataclass(frozen=True)
class DefenceOptions(RobustOptions, PrivacyOptions):
    """Robust aggregation and differential privacy options, checked together: DP's noise is
    calibrated to the clipped sum, so it takes the plain mean."""

    def validate(self) -> None:
        super().validate()
        if self.private and self.robust:
            raise ValueError("differential privacy calibrates its noise to the clipped sum: use it with the plain "
                             "mean (aggregator='mean', no norm_bound; dp_clip already bounds every client)")


def defended(algorithm, model, uploads: list[bytes], weights: list[float], ctx) -> list[bytes] | None:
    """The server's defences ahead of ``algorithm``'s own mean (its options are
    :class:`DefenceOptions`). A differentially private mean or a robust statistic of the uploads'
    vectors aggregates the round through ``algorithm.aggregate_mean`` and gives None; otherwise
    the uploads come back for the algorithm's mean, each cut to ``norm_bound`` when one is set."""
    o = algorithm.options
    if o.private:  # clipped, noised, equally weighted: the DP mean of the vectors
        vectors = [algorithm.summable(u) for u in uploads]
        algorithm.aggregate_mean(model, noisy_mean(vectors, o, ctx.round_seed, len(ctx.clients)), ctx)
        return None
    if o.aggregator != "mean":  # a robust statistic of the aligned vectors
        algorithm.aggregate_mean(model, combine([algorithm.summable(u) for u in uploads], weights, o), ctx)
        return None
    if o.norm_bound is None:
        return uploads
    return [algorithm.from_summable(u, bound_norms(algorithm.summable(u)[None], o.norm_bound)[0]) for u in uploads]
