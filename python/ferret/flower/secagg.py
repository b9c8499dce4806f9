"""Ferret's coordinates through Flower's SecAgg+: the server learns only their weighted mean.

Ferret's reconstruction is linear in the coordinates. With shared bases and the same block counts
on every client (``bases="shared"``, ``allocation="uniform"``), a round's update needs only
``sum_i p_i gamma_i``: the algorithm's secure-aggregation hook (``check_summable``, ``summable``,
``aggregate_mean``) says which vector a client contributes and how the mean becomes the round's
broadcast; nothing here knows the packet format. Flower's SecAgg+ (``SecAggPlusWorkflow`` on the server, ``secaggplus_mod``
on the clients) computes that from masked, quantized vectors, so no single client's coordinates
reach the server. SecAgg+ lives in Flower's legacy workflow API; :class:`SecureFerret` is the
legacy strategy it drives, and it hands each round to the same :class:`AlgorithmStrategy`
bookkeeping as the plain path.

**Quantization error.** A client sends ``x = gamma * c / R`` (``R`` = the run config's
``secagg-range``, ``c`` = :data:`CLIPPING_RANGE`), so ``|x| <= c`` while ``|gamma| <= R``.
SecAgg+ multiplies ``x`` by the client's weight ratio ``rho_i = q_i / Q <= 1`` (``q_i =
round(n_i / max_weight * Q)``, ``Q`` = :data:`QUANTIZATION_RANGE`), clips to ``[-c, c]``, and
rounds stochastically to a grid of step ``2c / Q``; the server dequantizes the sum and divides by
``sum_i rho_i``. Each client adds less than one step per coordinate, so each coordinate of the
weighted mean is off by less than

    error_bound = 2 * N * R / (Q * sum_i rho_i)

for ``N`` clients (:func:`error_bound`), and the weights are ``rho_i / sum rho`` instead of
``n_i / sum n`` (``q_i`` rounded: relative change below ``1 / (2 q_i)``). A coordinate beyond
``R`` is clipped; the client logs it. With ``R = 64``, ``max_weight`` = the largest shard and 3
clients of equal size the bound is ``2 * 3 * 64 / 2**22 / 3 = 3.1e-5`` per coordinate.
"""

from __future__ import annotations

from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Parameters, Status, log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from ..fl.config import Config, ConfigError
from .client import local_update, process_algorithm
from .strategy import AlgorithmStrategy

CLIPPING_RANGE = 8.0          # SecAgg+'s clipping range c (Flower's default)
QUANTIZATION_RANGE = 1 << 22  # SecAgg+'s quantization range Q (Flower's default)


def error_bound(n_clients: int, coordinate_range: float, weight_ratios) -> float:
    """The largest error SecAgg+ quantization puts on one coordinate of the weighted mean."""
    return 2 * n_clients * coordinate_range / (QUANTIZATION_RANGE * float(np.sum(weight_ratios)))


def check_secure(algorithm) -> None:
    """Raise :class:`ConfigError` unless ``algorithm``'s uploads can be summed (its secure-aggregation
    hook, :meth:`~ferret.fl.algorithms.Algorithm.check_summable`)."""
    try:
        algorithm.check_summable()
    except ValueError as err:
        raise ConfigError(f"secagg: {err}") from None


def run_secure(grid, context: Context, core: AlgorithmStrategy, config: Config, flower: dict, max_weight: float,
               rounds: int | None = None):
    """Run ``rounds`` rounds (default ``config.rounds``) of ``core``'s Ferret with SecAgg+ summing
    the coordinates."""
    check_secure(core.algorithm)
    timeout = float(flower["round-timeout"])
    rounds = config.rounds if rounds is None else rounds
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=rounds, round_timeout=timeout),
                           strategy=SecureFerret(core, grid, float(flower["secagg-range"])))
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.5, max_weight=max_weight,
                                  clipping_range=CLIPPING_RANGE, quantization_range=QUANTIZATION_RANGE, timeout=timeout)
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)


class SecureFerret(LegacyStrategy):
    """The legacy strategy SecAgg+ drives: sampling and broadcasts from ``core``; the aggregate
    it receives is already the weighted mean of the clients' scaled coordinates."""

    def __init__(self, core: AlgorithmStrategy, grid, coordinate_range: float):
        self.core, self.grid, self.coordinate_range = core, grid, coordinate_range

    def initialize_parameters(self, client_manager):
        return Parameters(tensors=[], tensor_type="numpy.ndarray")

    def configure_fit(self, server_round, parameters, client_manager):
        proxies = client_manager.all()
        instructions = []
        for message in self.core.configure_train(server_round, ArrayRecord(), ConfigRecord(), self.grid):
            settings = {**dict(message.content["round"]),
                        **{f"broadcast-{r}": a.numpy().tobytes() for r, a in message.content["broadcasts"].items()}}
            proxy = proxies.get(str(message.metadata.dst_node_id))
            if proxy is None:
                log(WARNING, "round %d: node %s is not registered", server_round, message.metadata.dst_node_id)
                continue
            instructions.append((proxy, FitIns(Parameters(tensors=[], tensor_type="numpy.ndarray"), settings)))
        return instructions

    def aggregate_fit(self, server_round, results, failures):
        this = self.core.round
        for failure in failures:
            log(WARNING, "round %d: a client failed: %s", this.ctx.round + 1, failure)
        mean = None
        for proxy, res in results:
            this.accept_secure(self.core.client_of(int(proxy.node_id)), int(res.metrics["upload-bytes"]),
                               float(res.metrics["local-seconds"]))
            mean = parameters_to_ndarrays(res.parameters)[0] * (self.coordinate_range / CLIPPING_RANGE)
        self.core.conclude(this, secure_mean=mean)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def secagg_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Client mod: SecAgg+'s protocol for messages of a SecAgg+ round, the plain app otherwise."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def secure_train(msg: Message, context: Context, config: Config, flower: dict) -> Message:
    """The client's round under SecAgg+: train, then hand SecAgg+ the scaled coordinates."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    info = {k: int(fitins.config[k]) for k in ("round", "round-seed", "client", "since")}
    broadcasts = {int(k.split("-", 1)[1]): bytes(v) for k, v in fitins.config.items() if k.startswith("broadcast-")}
    upload, n_examples, seconds = local_update(info, broadcasts, context, config, flower)
    weight = n_examples if config.weighting == "examples" else 1
    coords = process_algorithm(config).vector(upload)  # shared bases: the coordinates are the summable vector
    limit = float(flower["secagg-range"])
    if np.any(np.abs(coords) > limit):
        log(WARNING, "client %d: %d coordinates beyond secagg-range %g are clipped (largest %g)", info["client"],
            int(np.sum(np.abs(coords) > limit)), limit, float(np.max(np.abs(coords))))
    log(INFO, "client %d: %d coordinates into SecAgg+", info["client"], coords.size)
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([coords * (CLIPPING_RANGE / limit)]), int(weight),
                    {"local-seconds": seconds, "upload-bytes": len(upload)})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
