"""The server-side defences an algorithm's options inherit: robust aggregation
(:mod:`ferret.fl.robust`) and client-level differential privacy (:mod:`ferret.fl.privacy`)."""

from __future__ import annotations

from dataclasses import dataclass

from .privacy import PrivacyOptions
from .robust import RobustOptions


@dataclass(frozen=True)
class DefenceOptions(RobustOptions, PrivacyOptions):
    """Robust aggregation and differential privacy options, checked together: DP's noise is
    calibrated to the clipped sum, so it takes the plain mean."""

    def validate(self) -> None:
        super().validate()
        if self.private and self.robust:
            raise ValueError("differential privacy calibrates its noise to the clipped sum: use it with the plain "
                             "mean (aggregator='mean', no norm_bound; dp_clip already bounds every client)")
