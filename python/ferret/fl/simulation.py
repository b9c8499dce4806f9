"""The embedded engine: a server and N clients in one process.

Each round samples a fraction of the clients, gives each a working copy of the global weights,
collects their uploads (bytes, counted as sent), aggregates, and evaluates. Everything random
derives from one seed, so two runs with the same arguments produce identical weights.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ..spec import block_seed
from .algorithms import Algorithm, ClientContext, NonFiniteUpdate, RoundContext
from .data import DataError, Encoded, weights_of
from .evaluate import eval_loss
from .runtime import resolve


@dataclass
class RoundRecord:
    """One round's accounting: the columns of the Ferret paper's Tables 2 and 3."""

    round: int
    eval_loss: float
    clients: list[int]
    dropped: list[int]
    upload_bytes: dict[int, int]       # per client
    download_bytes: int                # per client: the previous round's broadcast
    local_seconds: dict[int, float]    # per client
    aggregate_seconds: float
    rouge_l: float | None = None       # when the caller scores generations this round


@dataclass
class RunResult:
    initial_eval_loss: float
    rounds: list[RoundRecord] = field(default_factory=list)

    @property
    def final_eval_loss(self) -> float:
        return self.rounds[-1].eval_loss if self.rounds else self.initial_eval_loss


def run(algorithm: Algorithm, model: torch.nn.Module, shards: list[Encoded], eval_data: Encoded, *,
        rounds: int, fraction: float = 1.0, seed: int = 0, weighting: str = "examples",
        progress: bool = False, on_round=None, resume: RunResult | None = None,
        device: str = "auto", dtype: str = "auto", backend: str = "auto") -> RunResult:
    """Run rounds of ``algorithm`` over the clients' ``shards`` until ``rounds`` are done, updating
    ``model`` in place.

    ``device``, ``dtype`` and ``backend`` say where and how (see :mod:`ferret.fl.runtime`):
    ``model`` is moved to the device, and ``algorithm.runtime`` is set to the resolved settings;
    a bad setting raises :class:`~ferret.fl.config.ConfigError` before anything runs.

    ``fraction`` of the clients (at least one) is sampled each round; their uploads are weighted by
    example count or equally (``weighting``). ``on_round(record)`` is called after each round, once
    ``record`` is in the result (the ``resume`` object itself when given).
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
    client_weights = weights_of(shards, weighting)
    runtime = resolve(device, dtype, backend)
    runtime.place(model)
    algorithm.runtime = runtime
    result = resume if resume is not None else RunResult(eval_loss(model, eval_data, runtime=runtime))
    worker = copy.deepcopy(model)
    rounds_iter = range(len(result.rounds), rounds)
    if progress:
        from tqdm.auto import tqdm

        rounds_iter = tqdm(rounds_iter, desc=algorithm.name, unit="round", initial=len(result.rounds), total=rounds)
    for t in rounds_iter:
        rng = np.random.default_rng([seed, t])
        m = max(1, round(fraction * len(shards)))
        chosen = sorted(rng.choice(len(shards), size=m, replace=False).tolist())
        ctx = RoundContext(round=t, round_seed=block_seed(seed, t), clients=chosen)
        download = len(algorithm.broadcast)
        uploads, weights, up_bytes, local_s, dropped = [], [], {}, {}, []
        for c in (tqdm(chosen, desc=f"round {t + 1} clients", unit="client", leave=False) if progress else chosen):
            worker.load_state_dict(model.state_dict())
            torch.manual_seed(block_seed(ctx.round_seed, c))
            start = time.perf_counter()
            try:
                upload = algorithm.client_update(worker, shards[c], ClientContext(
                    round=t, client=c, round_seed=ctx.round_seed, rng=np.random.default_rng([seed, t, c])))
            except NonFiniteUpdate as err:
                warnings.warn(f"round {t}: client {c} dropped: {err}", RuntimeWarning, stacklevel=2)
                dropped.append(c)
                continue
            local_s[c] = time.perf_counter() - start
            up_bytes[c] = len(upload)
            uploads.append(upload)
            weights.append(client_weights[c])
        start = time.perf_counter()
        if uploads:
            total = sum(weights)
            algorithm.aggregate(model, uploads, [w / total for w in weights], ctx)
        runtime.synchronize()
        agg_s = time.perf_counter() - start
        loss = eval_loss(model, eval_data, runtime=runtime)
        record = RoundRecord(t, loss, chosen, dropped, up_bytes, download, local_s, agg_s)
        result.rounds.append(record)
        if progress:
            rounds_iter.set_postfix(eval_loss=f"{record.eval_loss:.3f}")
        if on_round is not None:
            on_round(record)
    return result
