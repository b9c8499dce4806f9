"""One federated round, as every engine runs it: which clients take part, what each client is
told (its seeds and generators), how a client's round is run and timed, which uploads are
accepted, and how they are weighted.

The embedded loop (:func:`ferret.fl.run`) and the Flower strategy and client call these
functions, and nothing else, for these steps: with the same settings they reach the same global
weights by construction. Everything random derives from the run's ``seed``: round ``t``'s seed is
``block_seed(seed, t)``; client ``c`` draws its batches from ``default_rng([seed, t, c])`` and
its torch randomness (a fresh adapter's weights) from a CPU generator seeded with
``block_seed(round_seed, c)``. torch's global RNG is never seeded.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..spec import block_seed
from .algorithms import Algorithm, ClientContext, MalformedUpload, NonFiniteUpdate, RoundContext
from .attacks import tamper
from .privacy import PrivacyOptions, client_share
from .data import Encoded

WEIGHTINGS = ("examples", "equal")


def sample(seed: int, round_index: int, n_clients: int, fraction: float) -> list[int]:
    """The clients of round ``round_index``: ``fraction`` of ``n_clients`` (at least one), sorted."""
    rng = np.random.default_rng([seed, round_index])
    count = max(1, round(fraction * n_clients))
    return sorted(rng.choice(n_clients, size=count, replace=False).tolist())


def round_context(seed: int, round_index: int, n_clients: int, fraction: float) -> RoundContext:
    """Round ``round_index``'s context: its shared seed and its sampled clients."""
    return RoundContext(round=round_index, round_seed=block_seed(seed, round_index),
                        clients=sample(seed, round_index, n_clients, fraction))


def client_context(seed: int, round_index: int, client: int, clients=()) -> ClientContext:
    """What client ``client`` is told in round ``round_index``: ids, the round's seed, its
    generators, and the round's sampled ``clients`` (:func:`sample`; empty where the caller has
    no use for them)."""
    round_seed = block_seed(seed, round_index)
    generator = torch.Generator().manual_seed(block_seed(round_seed, client))
    return ClientContext(round=round_index, client=client, round_seed=round_seed,
                         rng=np.random.default_rng([seed, round_index, client]), generator=generator,
                         clients=tuple(clients))


@dataclass
class ClientRun:
    """A client's round: its upload (None when it was dropped, with ``error`` saying why) and
    its local seconds."""

    upload: bytes | None
    seconds: float
    error: str | None = None


def run_client(algorithm: Algorithm, model: torch.nn.Module, data: Encoded, ctx: ClientContext,
               attack: str | None = None) -> ClientRun:
    """Run ``algorithm``'s client side on ``model`` (a working copy holding the global weights) and
    ``data``; a non-finite update drops the client (``error``). A malicious client's ``attack``
    (:mod:`ferret.fl.attacks`) rewrites its upload, with noise from the client's own generator; with
    distributed differential privacy the client clips its vector and adds its share of the noise
    (:mod:`ferret.fl.privacy`) first."""
    start = time.perf_counter()
    try:
        upload = algorithm.client_update(model, data, ctx)
    except NonFiniteUpdate as err:
        return ClientRun(None, time.perf_counter() - start, str(err))
    options = algorithm.options
    if isinstance(options, PrivacyOptions) and options.private and options.dp_mode == "distributed":
        upload = algorithm.from_summable(upload, client_share(algorithm.summable(upload), options,
                                                              len(ctx.clients), ctx.rng))
    if attack is not None:
        upload = algorithm.from_summable(upload, tamper(algorithm.summable(upload), attack, ctx.rng))
    algorithm.runtime.synchronize()
    return ClientRun(upload, time.perf_counter() - start)


def attack_of(client: int, attack: str | None, malicious) -> str | None:
    """The attack client ``client`` runs: ``attack`` when it is among ``malicious``, else None."""
    return attack if attack is not None and client in malicious else None


def check_upload(algorithm: Algorithm, model: torch.nn.Module, upload, ctx: ClientContext) -> str | None:
    """Why the server must not aggregate ``upload`` from client ``ctx.client`` (None: it may)."""
    if not isinstance(upload, (bytes, bytearray)):
        return f"the upload is a {type(upload).__name__}, not bytes"
    try:
        algorithm.check_upload(bytes(upload), model, ctx)
    except MalformedUpload as err:
        return str(err)
    return None


def client_weight(n_examples: int, weighting: str) -> float:
    """A client's aggregation weight before normalisation: its example count, or 1 (``"equal"``)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    return float(n_examples) if weighting == "examples" else 1.0


def normalized(weights: list[float]) -> list[float]:
    """``weights`` scaled to sum to 1; ``ValueError`` unless they are finite, non-negative, not all 0."""
    if not weights or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"client weights must be finite, non-negative and not all zero, got {weights}")
    total = math.fsum(weights)
    return [w / total for w in weights]
