"""The embedded engine: a server and N clients in one process.

Each round samples a fraction of the clients, gives each a working copy of the global weights,
collects their uploads (bytes, counted as sent), aggregates, and evaluates; every step of the
round protocol (sampling, seeding, running a client, accepting and weighting its upload) is
:mod:`ferret.fl.protocol`'s, which the Flower engine calls too. Everything random derives from
one seed, so two runs with the same arguments produce identical weights.
"""

from __future__ import annotations

import copy
import time
import warnings

import torch

from . import protocol
from .algorithms import Algorithm
from .data import DataError, Encoded
from .evaluate import eval_loss
from .results import RoundRecord, RunResult
from .runtime import resolve


def run(algorithm: Algorithm, model: torch.nn.Module, shards: list[Encoded], eval_data: Encoded, *,
        rounds: int, fraction: float = 1.0, seed: int = 0, weighting: str = "examples",
        progress: bool = False, on_round=None, resume: RunResult | None = None,
        device: str = "auto", dtype: str = "auto", backend: str = "auto", attack: str | None = None,
        malicious=()) -> RunResult:
    """Run rounds of ``algorithm`` over the clients' ``shards`` until ``rounds`` are done, updating
    ``model`` in place.

    ``device``, ``dtype`` and ``backend`` say where and how (see :mod:`ferret.fl.runtime`):
    ``model`` is moved to the device, and ``algorithm.runtime`` is set to the resolved settings;
    a bad setting raises :class:`~ferret.fl.config.ConfigError` before anything runs.

    ``fraction`` of the clients (at least one) is sampled each round; their uploads are weighted by
    example count or equally (``weighting``). ``on_round(record)`` is called after each round, once
    ``record`` is in the result (the ``resume`` object itself when given). The clients in
    ``malicious`` run ``attack`` (:mod:`ferret.fl.attacks`) on their uploads.
    A client whose update is NaN/Inf is dropped from its round with a warning. ``resume`` (the
    records of an interrupted run, with ``model`` and ``algorithm`` restored to their state after
    its last round) continues that run: every round's randomness derives from ``(seed, round)``,
    so the result equals an uninterrupted run's. Returns the per-round records.
    """
    if not shards:
        raise DataError("no clients")
    if any(len(s) == 0 for s in shards):
        raise DataError(f"client {next(i for i, s in enumerate(shards) if len(s) == 0)} has no examples")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    protocol.client_weight(1, weighting)  # a bad weighting fails before the first round
    runtime = resolve(device, dtype, backend)
    runtime.place(model)
    algorithm.runtime = runtime
    result = resume if resume is not None else RunResult(initial_eval_loss=eval_loss(model, eval_data, runtime=runtime))
    worker = copy.deepcopy(model)
    rounds_iter = range(len(result.rounds), rounds)
    if progress:
        from tqdm.auto import tqdm

        rounds_iter = tqdm(rounds_iter, desc=algorithm.name, unit="round", initial=len(result.rounds), total=rounds)
    for t in rounds_iter:
        ctx = protocol.round_context(seed, t, len(shards), fraction)
        download = len(algorithm.broadcast)
        uploads, weights, up_bytes, local_s, dropped = [], [], {}, {}, []
        for c in (tqdm(ctx.clients, desc=f"round {t + 1} clients", unit="client", leave=False) if progress
                  else ctx.clients):
            worker.load_state_dict(model.state_dict())
            client = protocol.client_context(seed, t, c, ctx.clients)
            ran = protocol.run_client(algorithm, worker, shards[c], client, protocol.attack_of(c, attack, malicious))
            error = ran.error or protocol.check_upload(algorithm, model, ran.upload, client)
            if error:
                warnings.warn(f"round {t}: client {c} dropped: {error}", RuntimeWarning, stacklevel=2)
                dropped.append(c)
                continue
            local_s[c], up_bytes[c] = ran.seconds, len(ran.upload)
            uploads.append(ran.upload)
            weights.append(protocol.client_weight(len(shards[c]), weighting))
        start = time.perf_counter()
        if uploads:
            algorithm.aggregate(model, uploads, protocol.normalized(weights), ctx)
        runtime.synchronize()
        agg_s = time.perf_counter() - start
        record = RoundRecord(round=t, eval_loss=eval_loss(model, eval_data, runtime=runtime), clients=ctx.clients,
                             dropped=dropped, upload_bytes=up_bytes, download_bytes=download, local_seconds=local_s,
                             aggregate_seconds=agg_s)
        result.rounds.append(record)
        if progress:
            rounds_iter.set_postfix(eval_loss=f"{record.eval_loss:.3f}")
        if on_round is not None:
            on_round(record)
    return result
