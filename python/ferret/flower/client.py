"""A client's round on Flower: bring the node's replica of the global model up to date by
replaying the broadcasts it missed, then train on the node's data exactly as the embedded loop
trains that client. Shared by the plain and the SecAgg+ ClientApp."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context

from ..fl import protocol
from ..fl.config import Config
from ..fl.experiment import prepare
from ..fl.runtime import check_threads, model_device

_REPLICA, _STATE, _SYNC = "ferret-replica", "ferret-algorithm", "ferret-sync"  # keys in context.state
_PROCESS: dict[str, tuple] = {}  # config -> (model, base state, shards, algorithm, tokenizer): once per process
_NODE_DATA: dict[tuple, object] = {}  # a node's own data file, encoded once per process


def local_update(info: dict, broadcasts: dict[int, bytes], context: Context, config: Config,
                 flower: dict) -> tuple[bytes, float, float]:
    """One client's round: bring the node's replica up to date with the missed ``broadcasts``
    (round -> bytes), keep it in ``context.state``, train as the embedded loop trains the client
    the server says this node is (:mod:`ferret.fl.protocol`), on the node's own data file when
    its node config names one, else on that client's share of the configured data; returns
    (upload bytes, the example count it claims, seconds). ``info``: round, round-seed, client and
    since (the first broadcast sent). Raises ``RuntimeError`` when the message does not fit this
    run or replica, or the client's update is not finite."""
    threads(flower)
    model, base, shards, algorithm = process_setup(config)
    t, round_seed, c = info["round"], info["round-seed"], info["client"]
    if not 0 <= c < len(shards):
        raise RuntimeError(f"the server names client {c}, but this run has {len(shards)}")
    data = _node_data(context, config) or shards[c]
    synced = int(context.state[_SYNC]["synced"]) if _SYNC in context.state else 0
    if info["since"] > synced:
        raise RuntimeError(f"the server sent broadcasts from round {info['since']}, this replica stops at {synced}")
    model.load_state_dict(context.state[_REPLICA].to_torch_state_dict() if _REPLICA in context.state else base)
    # the server's state (e.g. momentum) advances with every broadcast: replay it with the weights
    state = context.state[_STATE].to_torch_state_dict() if _STATE in context.state else {}
    device = model_device(model)
    algorithm.load_state_dict({k: v.to(device) for k, v in state.items()})
    for r in sorted(broadcasts):
        if r >= synced:  # rounds the server aggregated; skipped ones never come
            algorithm.apply(model, broadcasts[r], protocol.round_context(config.seed, r, config.clients, config.fraction))
    context.state[_REPLICA] = ArrayRecord(model.state_dict())
    if algorithm.state_dict():
        context.state[_STATE] = ArrayRecord(OrderedDict(algorithm.state_dict()))
    context.state[_SYNC] = ConfigRecord({"synced": t})

    round_clients = protocol.sample(config.seed, t, config.clients, config.fraction)
    client = protocol.client_context(config.seed, t, c, round_clients)
    if client.round_seed != round_seed:
        raise RuntimeError(f"round {t + 1}'s seed from the server differs from this run's: another run's message?")
    ran = protocol.run_client(algorithm, model, data, client, protocol.attack_of(c, config.attack, config.malicious))
    if ran.error:
        raise RuntimeError(f"client {c} dropped: {ran.error}")
    return ran.upload, ran.examples, ran.seconds


def process_setup(config: Config):
    """(model on the configured device, its initial state, the shards, the algorithm running
    there) for ``config``, loaded once per process."""
    key = config.dumps()
    if key not in _PROCESS:
        setup = prepare(config)
        base = {k: v.detach().clone() for k, v in setup.model.state_dict().items()}
        algorithm = config.build_algorithm()
        algorithm.runtime = setup.runtime
        _PROCESS.clear()  # one run per process at a time
        _PROCESS[key] = (setup.model, base, setup.shards, algorithm, setup.tokenizer, setup.prompt_format)
    return _PROCESS[key][:4]


def process_algorithm(config: Config):
    """The algorithm object of this process's run of ``config`` (see :func:`process_setup`)."""
    return process_setup(config)[3]


def _node_data(context: Context, config: Config):
    """The node's own examples when its node config names a ``data`` file (a data owner's, read
    with the run's column mapping and prompt format), else None."""
    path = context.node_config.get("data")
    if not path:
        return None
    key = ("data", str(path))
    if key not in _NODE_DATA:
        from ..fl.data import encode
        from ..fl.experiment import examples_of

        tokenizer, fmt = _PROCESS[config.dumps()][4:6]
        examples = examples_of(dataclasses.replace(config, data=str(path)))
        _NODE_DATA[key] = encode(examples, tokenizer, max_prompt=config.max_prompt, max_length=config.max_length,
                                 template=fmt)
    return _NODE_DATA[key]


def threads(flower: dict) -> None:
    """Set torch's thread count when the run config asks for one (refused above the machine's)."""
    if int(flower["threads"]) > 0:
        torch.set_num_threads(check_threads(int(flower["threads"])))
