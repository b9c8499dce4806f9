"""Client-level differential privacy (the DP-FedAvg family) on the clients' upload vectors.

Each round, every sampled client's upload vector x_i (Ferret's K coordinates, FedAvg's d-number
update; see :meth:`~ferret.fl.algorithms.Algorithm.summable`) is clipped to L2 norm ``C``
(``dp_clip``), and Gaussian noise of standard deviation z·C (z: ``dp_noise``, the noise
multiplier) is added to their sum, which is divided by the m clients of the round:

    mean = (Σ_i clip(x_i, C) + N(0, z²C² I)) / m

**Sensitivity.** Adding or removing one client changes Σ_i clip(x_i, C) by a vector of norm at
most C, so the noisy sum is the Gaussian mechanism with noise multiplier z. For Ferret with
shared bases, x_i = Vᵀ Δ_i for bases V that every party regenerates from the round's public
seed: everything the server does afterwards (the reconstruction V·mean, the model update) is
post-processing of the noisy sum, so the round is as private as that sum. The noise lives in K
dimensions, not d. Clients are weighed equally (an example count would be private data too).

**Disjoint rows** (Ferret's default bases). With ``bases="disjoint"`` every client's coordinates
sit in rows of the round's transforms that no other client uses; its vector x_i places them there
in the round's common vector of every row (every group's, every slot's), zeros elsewhere. Adding
or removing a client changes Σ_i clip(x_i, C) only in that client's own rows, by a vector of norm
at most C: the same sensitivity, so noise z·C on every row (every slot's, those of clients that
dropped out included) is the same Gaussian mechanism and gives the same ε. The noise now lives in
m·K dimensions rather than K, so in the model it is √m times longer than with shared bases at the
same ε; in exchange the clients' directions are orthogonal. The block counts must not depend on
the data, as they travel unnoised: this needs ``allocation="uniform"``. Each client's noise share
would have to cover every other client's rows, so the distributed mode needs shared bases.

**Where the noise is added.** ``dp_mode="central"``: the server clips and adds the noise.
``"distributed"``: each client clips its own vector and adds N(0, z²C²/m), so the sum of the m
shares carries N(0, z²C²); the server must then see only the sum (Flower's SecAgg+, ``secagg``),
or it sees each client's vector with 1/√m of the noise.

**Accounting.** ε at ``dp_delta`` after t rounds is computed by Google's ``dp-accounting`` RDP
accountant: t compositions of the Gaussian mechanism with noise multiplier z, Poisson-subsampled
at rate q = m/n (the convention of DP-FedAvg; ferret samples exactly m of n clients each round),
or not subsampled when every client takes part. ``target_epsilon`` ends a run before the round
that would spend more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .bounds import MIN_BOUND
from .settings import Settings, one_of, positive_finite

MODES = ("central", "distributed")
ORDERS = list(range(2, 257))  # integer RDP orders: closed forms, no numerical integration
MAX_NOISE_STD = 1e6  # dp_noise × dp_clip above this swamps any model's weights: refused as a mistake
NOISE_DOMAIN = 0x4450  # the server's noise generator: default_rng([round_seed, NOISE_DOMAIN])


@dataclass(frozen=True)
class PrivacyOptions(Settings):
    """The differential-privacy options an algorithm inherits (see the module docstring):
    ``dp_clip`` (C; None: no DP), ``dp_noise`` (z ≥ 0), ``dp_mode``, ``dp_delta`` (in (0, 1)) and
    ``target_epsilon`` (None: no limit)."""

    dp_clip: float | None = None
    dp_noise: float = 0.0
    dp_mode: str = "central"
    dp_delta: float = 1e-5
    target_epsilon: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.dp_clip is not None and not (math.isfinite(self.dp_clip) and self.dp_clip >= MIN_BOUND):
            raise ValueError(f"dp_clip must be a finite number of at least {MIN_BOUND:g} (a smaller clip leaves "
                             f"nothing of any update), got {self.dp_clip}")
        if not (math.isfinite(self.dp_noise) and self.dp_noise >= 0):
            raise ValueError(f"dp_noise (the noise multiplier) must be a finite number at least 0, got {self.dp_noise}")
        if self.dp_clip is not None and self.dp_noise * self.dp_clip > MAX_NOISE_STD:
            raise ValueError(f"dp_noise × dp_clip = {self.dp_noise * self.dp_clip:.3g} is the noise's standard "
                             f"deviation: above {MAX_NOISE_STD:g} it swamps any model's weights; lower either")
        one_of("dp_mode", self.dp_mode, MODES)
        if not 0 < self.dp_delta < 1:
            raise ValueError(f"dp_delta must be in (0, 1), got {self.dp_delta}")
        if self.target_epsilon is not None:
            positive_finite("target_epsilon", self.target_epsilon)
        if self.dp_clip is None and (self.dp_noise or self.target_epsilon is not None):
            raise ValueError("dp_noise and target_epsilon need dp_clip: noise means nothing without a bound on "
                             "each client's contribution")
        if self.target_epsilon is not None and not self.dp_noise:
            raise ValueError("target_epsilon needs dp_noise above 0: without noise every round spends ε = ∞")

    @property
    def private(self) -> bool:
        """Whether uploads are clipped (and noised) for differential privacy."""
        return self.dp_clip is not None


def clip(x: np.ndarray, bound: float) -> np.ndarray:
    """``x`` (float64) scaled to L2 norm ``bound`` when it is longer."""
    x = np.asarray(x, dtype=np.float64)
    norm = float(np.linalg.norm(x))
    return x * (bound / norm) if norm > bound else x


def noisy_mean(vectors: list[np.ndarray], options: PrivacyOptions, round_seed: int, clients: int) -> np.ndarray:
    """The server's private mean of a round's ``vectors`` over its ``clients`` sampled clients:
    clipped and noised centrally, or, in distributed mode, summed as they came (each client
    clipped and noised its own)."""
    total = np.sum([np.asarray(v, dtype=np.float64) if options.dp_mode == "distributed" else
                    clip(v, options.dp_clip) for v in vectors], axis=0)
    if options.dp_mode == "central" and options.dp_noise:
        rng = np.random.default_rng([round_seed, NOISE_DOMAIN])
        total = total + rng.standard_normal(total.shape) * (options.dp_noise * options.dp_clip)
    return total / clients


def client_share(x: np.ndarray, options: PrivacyOptions, clients: int, rng: np.random.Generator) -> np.ndarray:
    """A client's vector in distributed mode: clipped, plus its share N(0, z²C²/m) of the noise."""
    share = options.dp_noise * options.dp_clip / math.sqrt(clients)
    return clip(x, options.dp_clip) + rng.standard_normal(np.shape(x)) * share


def epsilon(noise: float, sample_rate: float, rounds: int, delta: float) -> float:
    """ε at ``delta`` after ``rounds`` Gaussian mechanisms of noise multiplier ``noise``,
    Poisson-subsampled at ``sample_rate`` (1: not subsampled), by dp-accounting's RDP accountant;
    ``inf`` without noise, 0 for no rounds."""
    import dp_accounting

    if rounds == 0:
        return 0.0
    if noise == 0:
        return math.inf
    event = dp_accounting.GaussianDpEvent(noise)
    if sample_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sample_rate, event)
    accountant = dp_accounting.rdp.RdpAccountant(orders=ORDERS)
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


def rounds_within(target: float, noise: float, sample_rate: float, delta: float, rounds: int) -> int:
    """The most rounds (up to ``rounds``) whose ε stays at or below ``target``."""
    done = 0
    while done < rounds and epsilon(noise, sample_rate, done + 1, delta) <= target:
        done += 1
    return done


def spent(options, clients: int, fraction: float, rounds: int) -> float | None:
    """ε after ``rounds`` rounds of a run whose algorithm has ``options`` (None when the run is
    not differentially private), with ``fraction`` of ``clients`` sampled per round."""
    if not (isinstance(options, PrivacyOptions) and options.private):
        return None
    per_round = max(1, round(fraction * clients))
    return epsilon(options.dp_noise, per_round / clients, rounds, options.dp_delta)


def rounds_allowed(options, clients: int, fraction: float, rounds: int) -> int:
    """The rounds a run may do: ``rounds``, or fewer when ``target_epsilon`` would be exceeded."""
    if not isinstance(options, PrivacyOptions) or options.target_epsilon is None:
        return rounds
    per_round = max(1, round(fraction * clients))
    return rounds_within(options.target_epsilon, options.dp_noise, per_round / clients, options.dp_delta, rounds)
