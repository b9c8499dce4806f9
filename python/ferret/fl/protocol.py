"""One federated round, as every engine runs it: which clients take part, what each client is
told (its seeds and generators), and how a client's round is run and timed. What the server does
with the uploads is :mod:`ferret.fl.server`'s.

The embedded loop (:func:`ferret.fl.run`) and the Flower strategy and client call these
functions, and nothing else, for these steps: with the same settings they reach the same global
weights by construction. Everything random derives from the run's ``seed``: round ``t``'s seed is
``block_seed(seed, t)``; client ``c`` draws its batches from ``default_rng([seed, t, c])`` and
its torch randomness (a fresh adapter's weights) from a CPU generator seeded with
``block_seed(round_seed, c)``. torch's global RNG is never seeded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..spec import block_seed
from .algorithms import Algorithm, ClientContext, NonFiniteUpdate, RoundContext
from .attacks import claimed_examples, split_attacks, tamper_upload
from .privacy import PrivacyOptions, client_share
from .data import Encoded


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
    """A client's round: its upload (None when it was dropped, with ``error`` saying why), its
    local seconds and the example count it claims."""

    upload: bytes | None
    seconds: float
    error: str | None = None
    examples: float = 0


def run_client(algorithm: Algorithm, model: torch.nn.Module, data: Encoded, ctx: ClientContext,
               attack: str | None = None) -> ClientRun:
    """Run ``algorithm``'s client side on ``model`` (a working copy holding the global weights) and
    ``data``; a non-finite update drops the client (``error``). A malicious client's ``attack``
    (:mod:`ferret.fl.attacks`) rewrites its upload or its claim, with noise from the client's own
    generator; with distributed differential privacy the client clips its vector and adds its
    share of the noise (:mod:`ferret.fl.privacy`) first."""
    start = time.perf_counter()
    try:
        upload = algorithm.client_update(model, data, ctx)
    except NonFiniteUpdate as err:
        return ClientRun(None, time.perf_counter() - start, str(err), len(data))
    options = algorithm.options
    if isinstance(options, PrivacyOptions) and options.private and options.dp_mode == "distributed":
        upload = algorithm.from_vector(upload, client_share(algorithm.vector(upload), options, len(ctx.clients),
                                                            ctx.rng))
    if attack is not None:
        upload = tamper_upload(algorithm, model, upload, attack, ctx.rng)
    algorithm.runtime.synchronize()
    return ClientRun(upload, time.perf_counter() - start, examples=claimed_examples(attack, len(data)))


def attack_of(client: int, attack: str | None, malicious) -> str | None:
    """The attack client ``client`` runs: ``attack`` when it is among ``malicious``, else None; an
    ``attack`` of several comma-separated kinds gives the i-th malicious client the i-th kind."""
    if attack is None or client not in malicious:
        return None
    kinds = split_attacks(attack)
    return kinds[0] if len(kinds) == 1 else kinds[list(malicious).index(client)]
