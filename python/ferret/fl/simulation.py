"""The embedded engine: a server and N clients in one process.

Each round samples a fraction of the clients, gives each a working copy of the global weights,
runs it (:func:`ferret.fl.protocol.run_client`), and hands its upload to the round's server
(:mod:`ferret.fl.server`), which checks, weighs, defends, aggregates and scores; the Flower engine
drives the same objects. Everything random derives from one seed, so two runs with the same
arguments produce identical weights.
"""

from __future__ import annotations

import copy

import torch

from . import protocol
from .algorithms import Algorithm
from .data import Encoded
from .results import RunResult
from .runtime import resolve
from .server import MAX_EXAMPLES, Server, check_shards


def run(algorithm: Algorithm, model: torch.nn.Module, shards: list[Encoded], eval_data: Encoded, *,
        rounds: int, fraction: float = 1.0, seed: int = 0, weighting: str = "examples",
        progress: bool = False, on_round=None, resume: RunResult | None = None,
        device: str = "auto", dtype: str = "auto", backend: str = "auto", attack: str | None = None,
        malicious=(), max_examples: int = MAX_EXAMPLES) -> RunResult:
    """Run rounds of ``algorithm`` over the clients' ``shards`` until ``rounds`` are done, updating
    ``model`` in place.

    ``device``, ``dtype`` and ``backend`` say where and how (see :mod:`ferret.fl.runtime`):
    ``model`` is moved to the device, and ``algorithm.runtime`` is set to the resolved settings;
    a bad setting raises :class:`~ferret.fl.config.ConfigError` before anything runs.

    ``fraction`` of the clients (at least one) is sampled each round; their uploads are weighted by
    example count or equally (``weighting``), a count capped at ``max_examples``. ``on_round(record)``
    is called after each round, once ``record`` is in the result (the ``resume`` object itself
    when given). The clients in ``malicious`` run ``attack`` (:mod:`ferret.fl.attacks`). A client
    whose update is NaN/Inf, or whose upload the server refuses, is dropped from its round with a
    warning (see :mod:`ferret.fl.server`). ``resume`` (the records of an interrupted run, with
    ``model`` and ``algorithm`` restored to their state after its last round) continues that run:
    every round's randomness derives from ``(seed, round)``, so the result equals an
    uninterrupted run's. Returns the per-round records. Raises
    :class:`~ferret.fl.data.DataError` for no clients or a client with no examples (or more than
    ``max_examples``), ``ValueError`` for a bad fraction or weighting.
    """
    check_shards(shards, max_examples)
    runtime = resolve(device, dtype, backend)
    runtime.place(model)
    algorithm.runtime = runtime
    server = Server(algorithm, model, clients=len(shards), seed=seed, fraction=fraction, weighting=weighting,
                    max_examples=max_examples, eval_data=eval_data, result=resume)
    worker = copy.deepcopy(model)
    rounds_iter = range(len(server.result.rounds), rounds)
    if progress:
        from tqdm.auto import tqdm

        rounds_iter = tqdm(rounds_iter, desc=algorithm.name, unit="round", initial=len(server.result.rounds),
                           total=rounds)
    for t in rounds_iter:
        this = server.begin(t)
        for c in (tqdm(this.clients, desc=f"round {t + 1} clients", unit="client", leave=False) if progress
                  else this.clients):
            worker.load_state_dict(model.state_dict())
            ran = protocol.run_client(algorithm, worker, shards[c], this.client_context(c),
                                      protocol.attack_of(c, attack, malicious))
            if ran.error:
                this.drop(c, ran.error)
            else:
                this.accept(c, ran.upload, ran.examples, ran.seconds)
        record = this.conclude()
        if progress:
            rounds_iter.set_postfix(eval_loss=f"{record.eval_loss:.3f}")
        if on_round is not None:
            on_round(record)
    return server.result
