"""The two references a federated run is judged against: centralized training (one trainer on
every client's data) and standalone training (each client alone, never aggregating)."""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from . import protocol
from .algorithms import LocalTraining
from .data import DataError, Encoded
from .results import RoundRecord, RunResult
from .evaluate import eval_loss
from .runtime import resolve
from .train import first_order_steps


def centralized(model: torch.nn.Module, shards: list[Encoded], eval_data: Encoded, local: LocalTraining, *,
                rounds: int, seed: int = 0, on_round=None, device: str = "auto", dtype: str = "auto") -> RunResult:
    """Train ``model`` in place on the union of ``shards``: per round, as many optimiser steps as
    all clients together take in a federated round (``local.steps`` × clients), so the compute
    matches. ``model`` is moved to ``device`` and trains in ``dtype`` (see :mod:`ferret.fl.runtime`;
    a bad setting raises :class:`~ferret.fl.config.ConfigError`). Returns per-round records
    (nothing is uploaded)."""
    pooled = _pool(shards)
    runtime = resolve(device, dtype)
    runtime.place(model)
    result = RunResult(initial_eval_loss=eval_loss(model, eval_data, runtime=runtime))
    steps = local.steps * len(shards)
    for t in range(rounds):
        start = time.perf_counter()
        first_order_steps(model, pooled, rng=np.random.default_rng([seed, t]), runtime=runtime,
                          **{**vars(local), "steps": steps})
        runtime.synchronize()
        record = RoundRecord(round=t, eval_loss=eval_loss(model, eval_data, runtime=runtime), clients=[0], dropped=[],
                             upload_bytes={0: 0}, download_bytes=0, local_seconds={0: time.perf_counter() - start},
                             aggregate_seconds=0.0)
        result.rounds.append(record)
        if on_round is not None:
            on_round(record)
    return result


def standalone(model: torch.nn.Module, shards: list[Encoded], eval_data: Encoded, local: LocalTraining, *,
               rounds: int, seed: int = 0, on_round=None, device: str = "auto", dtype: str = "auto") -> RunResult:
    """Each client trains its own copy of ``model`` on its own shard, ``local.steps`` per round,
    with no communication; a round's eval loss is the clients' mean. ``model`` is moved to
    ``device`` but its weights are left unchanged; the copies train there in ``dtype`` (see
    :mod:`ferret.fl.runtime`; a bad setting raises :class:`~ferret.fl.config.ConfigError`).
    Returns per-round records."""
    if not shards:
        raise DataError("no clients")
    runtime = resolve(device, dtype)
    runtime.place(model)
    copies = [copy.deepcopy(model) for _ in shards]
    result = RunResult(initial_eval_loss=eval_loss(model, eval_data, runtime=runtime))
    for t in range(rounds):
        seconds = {}
        for c, (own, shard) in enumerate(zip(copies, shards)):
            start = time.perf_counter()
            first_order_steps(own, shard, rng=protocol.client_context(seed, t, c).rng, runtime=runtime, **vars(local))
            runtime.synchronize()
            seconds[c] = time.perf_counter() - start
        loss = float(np.mean([eval_loss(own, eval_data, runtime=runtime) for own in copies]))
        record = RoundRecord(round=t, eval_loss=loss, clients=list(range(len(shards))), dropped=[],
                             upload_bytes={c: 0 for c in seconds}, download_bytes=0, local_seconds=seconds,
                             aggregate_seconds=0.0)
        result.rounds.append(record)
        if on_round is not None:
            on_round(record)
    return result


def _pool(shards: list[Encoded]) -> Encoded:
    if not shards:
        raise DataError("no clients")
    return Encoded([r for s in shards for r in s.input_ids], [r for s in shards for r in s.labels], shards[0].pad_id)
