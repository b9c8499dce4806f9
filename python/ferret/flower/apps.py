"""A Flower ServerApp and ClientApp for every algorithm of the loop, configured like ``ferret run``.

The run config holds :class:`~ferret.fl.Config` keys (``algorithm``, ``model``, ``data``,
``clients``, ``rounds``, ``seed``, ...; dashes or underscores), the algorithm's options as one
string (``options = "budget=3800,bases='client'"``), the data's column mapping likewise
(``columns = "instruction='prompt',response='completion'"``), and Flower's own:

* ``min-replies`` (default 1): good replies a round needs to be aggregated;
* ``round-timeout`` (seconds, default 3600): how long the server waits for a round's replies;
* ``out``: a directory for the final model (``model/``, as ``ferret run`` writes it), ``metrics.jsonl`` and each
  round's broadcast (``broadcast-<round>.bin``);
* ``threads``: torch threads in every process (equal counts make runs bit-comparable);
* ``secagg`` (Ferret only): sum the coordinates with Flower's SecAgg+, and ``secagg-range``,
  the largest coordinate magnitude it carries unclipped (see :mod:`ferret.flower.secagg`).

The server numbers the SuperNodes by their node ids (:mod:`ferret.flower.strategy`: a node's
own claims never say who it is) and tells each its client number; a node trains on that client's
share of the configured data, or, for a data owner with its own file, on the ``data`` its node
config names (any file ``ferret run`` reads, with the run's ``columns``). A node config's
``device``, ``dtype`` and ``backend`` override the run config's for that node (each data owner
picks its own GPU); ``partition-id`` and other keys Flower sets are not read.

A client keeps its replica of the global model (and of the server's state, e.g. momentum) in its
node's ``context.state`` and brings it up to date by replaying the broadcasts the server sends
(:meth:`Algorithm.apply`), so a round downloads what the algorithm broadcasts, not the model.
The model, tokenizer and data are loaded once per ClientApp process.
"""

from __future__ import annotations

import dataclasses
from logging import ERROR
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from ..fl import models
from ..fl.health import RunDiverged
from ..fl.config import RUNTIME_KEYS, Config, ConfigError, parse_assignments
from ..fl.runtime import check_threads
from ..fl.experiment import prepare
from ..fl.results import write_metrics
from .client import local_update, threads
from .records import to_record
from .secagg import run_secure, secagg_when_asked, secure_train
from .strategy import AlgorithmStrategy

FLOWER_KEYS = {"min-replies": 1, "round-timeout": 3600.0, "out": "", "threads": 0, "secagg": False,
               "secagg-range": 64.0}


def config_from_run(run_config: dict, defaults: Config | None = None, flower_defaults: dict | None = None,
                    node_config: dict | None = None) -> tuple[Config, dict]:
    """(the experiment's Config, Flower's own settings) from a Flower run config over ``defaults``
    and ``flower_defaults`` (keys of ``FLOWER_KEYS``), with a node config's ``device``, ``dtype``
    and ``backend`` over the run config's; raises :class:`ConfigError`."""
    values = (defaults or Config()).to_dict()
    flower = {**FLOWER_KEYS, **(flower_defaults or {})}
    fields = {f.name for f in dataclasses.fields(Config)}
    for key, value in run_config.items():
        if key in flower:
            flower[key] = value
        elif key in ("options", "columns"):  # tables, given as one "key=value,..." string
            values[key] = parse_assignments(str(value), f"run config {key}")
        elif key == "malicious":  # a list, given as "0,3"
            values[key] = [int(x) for x in str(value).split(",") if x.strip()]
        elif key.replace("-", "_") in fields:
            if value != "":  # "": the default (e.g. the algorithm's own local training)
                values[key.replace("-", "_")] = value
        else:
            raise ConfigError(f"run config: unknown key {key!r}")
    values.update({k: v for k, v in (node_config or {}).items() if k in RUNTIME_KEYS and v != ""})
    if int(flower["threads"]) > 0:
        check_threads(int(flower["threads"]))
    if values.get("algorithm") in ("centralized", "standalone"):
        raise ConfigError(f"{values['algorithm']} is a reference run, not a federated one: use ferret run")
    return Config.from_dict(values, "run config"), flower


def server_app(defaults: Config | None = None, **flower_defaults) -> ServerApp:
    """A ServerApp running ``defaults`` overridden by the run config; ``flower_defaults`` set
    Flower's own keys (``min_replies=2``, ``out=...``) unless the run config does."""
    flower_defaults = {k.replace("_", "-"): v for k, v in flower_defaults.items()}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config, flower = config_from_run(dict(context.run_config), defaults, flower_defaults)
        threads(flower)
        setup = prepare(config)
        config = setup.config  # the number of clients resolved from the data
        algorithm = config.build_algorithm()
        algorithm.runtime = setup.runtime
        strategy = AlgorithmStrategy(algorithm, setup.model, clients=config.clients, seed=config.seed,
                                     fraction=config.fraction, weighting=config.weighting,
                                     max_examples=config.max_examples, min_replies=int(flower["min-replies"]),
                                     eval_data=setup.eval_data)
        rounds = strategy.server.rounds_allowed(config.rounds)
        stopped = None
        try:
            if flower["secagg"]:
                run_secure(grid, context, strategy, config, flower, max_weight=max(len(s) for s in setup.shards),
                           rounds=rounds)
            else:
                strategy.start(grid, ArrayRecord(), num_rounds=rounds, timeout=float(flower["round-timeout"]))
        except RunDiverged as err:  # a round left the run broken: record what happened, keep no broken model
            log(ERROR, "stopped: %s", err)
            stopped = err
        if flower["out"]:
            out = Path(flower["out"])
            out.mkdir(parents=True, exist_ok=True)
            if stopped is None:
                models.save(setup.model, setup.tokenizer, out / "model")  # loads with from_pretrained
            for r, broadcast in enumerate(strategy.history):  # what every client applied, round by round
                if broadcast is not None:
                    (out / f"broadcast-{r}.bin").write_bytes(broadcast)
            write_metrics(out / "metrics.jsonl", strategy.result, {"engine": "flower", "algorithm": config.algorithm})
        if stopped is not None:
            raise stopped  # the run fails where Flower reports it (flwr ls: finished:failed)

    return app


def client_app(defaults: Config | None = None, *, mods=None, **flower_defaults) -> ClientApp:
    """A ClientApp running ``defaults`` overridden by the run config (``flower_defaults`` as for
    :func:`server_app`; ``mods``: Flower client mods); its node config may name its own ``data``
    and set the node's ``device``, ``dtype`` and ``backend``."""
    flower_defaults = {k.replace("_", "-"): v for k, v in flower_defaults.items()}
    app = ClientApp(mods=[secagg_when_asked, *(mods or [])])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config, flower = config_from_run(dict(context.run_config), defaults, flower_defaults,
                                         dict(context.node_config))
        if flower["secagg"]:
            return secure_train(msg, context, config, flower)
        info = {k: int(v) for k, v in msg.content["round"].items()}
        broadcasts = {int(k): a.numpy().tobytes() for k, a in msg.content["broadcasts"].items()}
        upload, n_examples, seconds = local_update(info, broadcasts, context, config, flower)
        content = to_record(upload)
        content["metrics"] = MetricRecord({"num-examples": n_examples, "local-seconds": seconds})
        return Message(content, reply_to=msg)

    return app
