"""The server side on Flower: a ``Strategy`` that drives the loop's server (:mod:`ferret.fl.server`).

Each round begins a round of the same :class:`~ferret.fl.server.Server` the embedded loop uses
(the same sampling, seeds, upload checks, weights, defences and records), sends every sampled
client the broadcasts it has not applied yet, and hands each reply to the round: its upload bytes,
the example count and the seconds it claims. The round drops what it must not use (logged) and
aggregates the rest.

**Who a client is.** A client is the SuperNode the SuperLink knows by its node id, never what a
node says about itself. Once ``clients`` nodes have connected, the server numbers them in the order
of their node ids (client 0 is the smallest), tells each node its number in every message, and
takes a reply as that client's only when it comes from that node. A node with no data of its own
trains on that client's share of the configured data, so a run with the same settings reaches
the same global weights as the embedded loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..fl import health
from ..fl.algorithms import Algorithm, MalformedUpload, RoundContext
from ..fl.data import Encoded
from ..fl.results import RunResult
from ..fl.server import MAX_EXAMPLES, Server, ServerRound
from .records import from_record


class AlgorithmStrategy(Strategy):
    """Runs ``algorithm`` over ``clients`` Flower nodes on the global ``model`` (updated in place,
    on its device; ``algorithm.runtime`` gives the dtype and kernels).

    ``seed``, ``fraction``, ``weighting``, ``max_examples`` and ``min_replies`` mean what they mean
    for :class:`~ferret.fl.server.Server`; ``eval_data``: held-out examples scored after every
    round (``result`` collects the records); ``discovery_timeout``: how long to wait for ``clients``
    nodes to connect.
    """

    def __init__(self, algorithm: Algorithm, model: torch.nn.Module, *, clients: int, seed: int = 0,
                 fraction: float = 1.0, weighting: str = "examples", min_replies: int = 1,
                 max_examples: int = MAX_EXAMPLES, eval_data: Encoded | None = None, discovery_timeout: float = 300.0):
        self.server = Server(algorithm, model, clients=clients, seed=seed, fraction=fraction, weighting=weighting,
                             max_examples=max_examples, min_replies=min_replies, eval_data=eval_data,
                             warn=lambda line: log(WARNING, "%s", line))
        self.discovery_timeout = discovery_timeout
        self.nodes: dict[int, int] = {}            # client -> node id
        self.history: list[bytes | None] = []      # each round's broadcast (None: the model was left as it was)
        self.synced: dict[int, int] = {}           # client -> rounds its replica has applied
        self.round: ServerRound | None = None

    @property
    def algorithm(self) -> Algorithm:
        return self.server.algorithm

    @property
    def model(self) -> torch.nn.Module:
        return self.server.model

    @property
    def result(self) -> RunResult:
        """The records of the rounds done."""
        return self.server.result

    @property
    def round_context(self) -> RoundContext:
        """The context of the round being run (set by :meth:`configure_train`)."""
        return self.round.ctx

    def summary(self) -> None:
        log(INFO, "\t%s over %d clients (fraction %.2f, seed %d)", self.algorithm.name, self.server.clients,
            self.server.fraction, self.server.seed)

    # -- training ------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if not self.nodes:
            self.nodes = self._discover(grid)
        self.round = self.server.begin(server_round - 1)
        ctx = self.round.ctx
        messages = []
        for c in ctx.clients:
            if c not in self.nodes:
                log(WARNING, "round %d: client %d has no node", ctx.round + 1, c)
                continue
            since = self.synced.get(c, 0)
            broadcasts = ArrayRecord({f"{r}": Array(np.frombuffer(b, dtype=np.uint8).copy())
                                      for r, b in enumerate(self.history) if r >= since and b is not None})
            content = RecordDict({
                "round": ConfigRecord({"round": ctx.round, "round-seed": ctx.round_seed, "client": c,
                                       "since": since, "run-seed": self.server.seed}),
                "broadcasts": broadcasts,
            })
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=self.nodes[c]))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        this = self.round
        for reply in replies:
            c = self.client_of(reply.metadata.src_node_id)
            if reply.has_error():
                this.drop(c, f"it failed: {reply.error.reason}")
                continue
            try:
                upload = from_record(reply.content)
                metrics = reply.content["metrics"]
                examples, seconds = metrics["num-examples"], metrics["local-seconds"]
            except (MalformedUpload, KeyError, TypeError, ValueError) as err:
                this.drop(c, f"a malformed reply: {err}")
                continue
            this.accept(c, upload, examples, seconds)
        return None, self.conclude(this)

    def conclude(self, this: ServerRound, secure_mean=None) -> MetricRecord:
        """Conclude round ``this`` (from ``secure_mean``, the clients' mean, under secure
        aggregation): the broadcast joins the history, the clients it came from are in step."""
        record = this.conclude(secure_mean)
        # RunDiverged ends the run. A round that dropped every client goes on: a deployment's clients
        # are outside the server's trust and come and go, and none of them may stop the server.
        health.check_round(record, self.server.model, lr=self.algorithm.local.lr,
                           scored=self.server.eval_data is not None, every_client_dropped=False)
        if record.skipped is None:
            for c in record.upload_bytes:
                self.synced[c] = this.ctx.round  # its replica had applied rounds 0 .. round - 1
        self.history.append(self.algorithm.broadcast if record.skipped is None else None)
        log(INFO, "round %d: eval loss %.4f, %d clients aggregated (%d bounded) in %.2f s", this.ctx.round + 1,
            record.eval_loss, len(record.upload_bytes), record.bounded, time.perf_counter() - this.started)
        return MetricRecord({"eval-loss": record.eval_loss, "clients": len(record.upload_bytes)})

    # -- no federated evaluation: the server scores the global model itself ----------------------
    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None

    # -- who is who ------------------------------------------------------------------------------
    def client_of(self, node_id: int):
        """The client running on ``node_id``, or a label naming the node when it runs none."""
        return next((c for c, n in self.nodes.items() if n == node_id), f"node {node_id}")

    def _discover(self, grid: Grid) -> dict[int, int]:
        """Wait until ``clients`` nodes are connected; client ``c`` is the ``c``-th smallest node id."""
        deadline, want = time.monotonic() + self.discovery_timeout, self.server.clients
        nodes = sorted(grid.get_node_ids())
        while len(nodes) < want and time.monotonic() < deadline:
            time.sleep(0.5)
            nodes = sorted(grid.get_node_ids())
        if len(nodes) < want:
            log(WARNING, "only %d of %d clients connected within %.0f s", len(nodes), want, self.discovery_timeout)
        elif len(nodes) > want:
            log(WARNING, "%d nodes connected for %d clients: nodes %s take no part", len(nodes), want, nodes[want:])
        assigned = dict(enumerate(nodes[:want]))
        log(INFO, "clients %s on nodes %s", sorted(assigned), [assigned[c] for c in sorted(assigned)])
        return assigned
