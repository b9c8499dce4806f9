"""The server side on Flower: a ``Strategy`` that drives one of the loop's algorithm objects.

Each round follows :mod:`ferret.fl.protocol` as the embedded loop does (the same sampling, seeds,
upload checks and weights), sends every sampled client the broadcasts it has not applied yet,
turns the replies back into the algorithm's upload bytes, drops the malformed or missing ones
(logged), and lets the
algorithm aggregate into the global model. A round with fewer than ``min_replies`` good replies
leaves the model as it was. Clients are told apart by their ``partition-id``, learnt once with a
query, so a Flower run and an embedded run with the same settings give the same global weights.
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

from ..fl import protocol
from ..fl.algorithms import Algorithm, MalformedUpload, RoundContext
from ..fl.data import Encoded
from ..fl.evaluate import eval_loss
from ..fl.results import RoundRecord, RunResult
from .records import from_record


class AlgorithmStrategy(Strategy):
    """Runs ``algorithm`` over ``clients`` Flower nodes on the global ``model`` (updated in place,
    on its device; ``algorithm.runtime`` gives the dtype and kernels).

    ``seed``, ``fraction`` and ``weighting`` mean what they mean in :func:`ferret.fl.run`;
    ``min_replies``: good replies a round needs to be aggregated; ``eval_data``: held-out
    examples scored after every round (``result`` collects the records).
    """

    def __init__(self, algorithm: Algorithm, model: torch.nn.Module, *, clients: int, seed: int = 0,
                 fraction: float = 1.0, weighting: str = "examples", min_replies: int = 1,
                 eval_data: Encoded | None = None, discovery_timeout: float = 300.0):
        self.algorithm, self.model = algorithm, model
        protocol.client_weight(1, weighting)  # a bad weighting fails here, not in round 1
        self.clients, self.seed, self.fraction, self.weighting = clients, seed, fraction, weighting
        self.min_replies, self.eval_data, self.discovery_timeout = min_replies, eval_data, discovery_timeout
        self.nodes: dict[int, int] = {}            # partition -> node id
        self.history: list[bytes | None] = []      # each round's broadcast (None: skipped round)
        self.synced: dict[int, int] = {}          # partition -> rounds its replica has applied
        self.result = RunResult(initial_eval_loss=self._eval_loss())
        self._round: tuple[RoundContext, list[int], float] | None = None

    def summary(self) -> None:
        log(INFO, "\t%s over %d clients (fraction %.2f, seed %d)", self.algorithm.name, self.clients,
            self.fraction, self.seed)

    # -- training ------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if not self.nodes:
            self.nodes = self._discover(grid)
        ctx = protocol.round_context(self.seed, server_round - 1, self.clients, self.fraction)
        self._round = (ctx, ctx.clients, time.perf_counter())
        messages = []
        for c in ctx.clients:
            if c not in self.nodes:
                log(WARNING, "round %d: client %d has no node", ctx.round, c)
                continue
            since = self.synced.get(c, 0)
            broadcasts = ArrayRecord({f"{r}": Array(np.frombuffer(b, dtype=np.uint8).copy())
                                      for r, b in enumerate(self.history) if r >= since and b is not None})
            content = RecordDict({
                "round": ConfigRecord({"round": ctx.round, "round-seed": ctx.round_seed, "partition": c,
                                       "since": since, "run-seed": self.seed}),
                "broadcasts": broadcasts,
            })
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=self.nodes[c]))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        ctx = self.round_context
        good: dict[int, tuple[bytes, float, float]] = {}
        for reply in replies:
            c = self.partition_of(reply.metadata.src_node_id)
            if reply.has_error():
                log(WARNING, "round %d: client %s failed: %s", ctx.round, c, reply.error.reason)
                continue
            try:
                upload = from_record(reply.content)
                metrics = reply.content["metrics"]
                n_examples, seconds = int(metrics["num-examples"]), float(metrics["local-seconds"])
            except (MalformedUpload, KeyError, TypeError, ValueError) as err:
                log(WARNING, "round %d: client %s sent a malformed reply, dropped: %s", ctx.round, c, err)
                continue
            error = (protocol.check_upload(self.algorithm, self.model, upload,
                                           protocol.client_context(self.seed, ctx.round, c, ctx.clients))
                     if isinstance(c, int) else f"node {c} is no client of this run")
            if error:
                log(WARNING, "round %d: client %s sent an upload the server refuses, dropped: %s", ctx.round, c, error)
                continue
            good[c] = (upload, protocol.client_weight(n_examples, self.weighting), seconds)

        def aggregate() -> bytes | None:
            if len(good) < self.min_replies:
                return None
            order = sorted(good)
            weights = protocol.normalized([good[c][1] for c in order])
            self.algorithm.aggregate(self.model, [good[c][0] for c in order], weights, ctx)
            return self.algorithm.broadcast

        metrics = self.conclude_round({c: len(good[c][0]) for c in good}, {c: good[c][2] for c in good}, aggregate)
        return None, metrics

    def conclude_round(self, upload_bytes: dict[int, int], local_seconds: dict[int, float], aggregate) -> MetricRecord:
        """Finish the current round: ``aggregate()`` updates the global model from the clients in
        ``upload_bytes`` and returns the broadcast (None: too few replies, model untouched); the
        broadcast joins the history, the round is scored and recorded."""
        ctx, chosen, started = self._round
        dropped = [c for c in chosen if c not in upload_bytes]
        if dropped:
            log(WARNING, "round %d: no usable reply from clients %s", ctx.round, dropped)
        start = time.perf_counter()
        broadcast = aggregate()
        self.algorithm.runtime.synchronize()
        if broadcast is None:
            log(WARNING, "round %d: %d good replies, below %d: the model is left as it was", ctx.round,
                len(upload_bytes), self.min_replies)
        else:
            for c in upload_bytes:
                self.synced[c] = ctx.round  # its replica had applied rounds 0 .. ctx.round - 1
        self.history.append(broadcast)
        aggregate_s = time.perf_counter() - start
        loss = self._eval_loss()
        download = len(self.history[-2]) if len(self.history) > 1 and self.history[-2] is not None else 0
        self.result.rounds.append(RoundRecord(round=ctx.round, eval_loss=loss, clients=chosen, dropped=dropped,
                                              upload_bytes=dict(upload_bytes), download_bytes=download,
                                              local_seconds=dict(local_seconds), aggregate_seconds=aggregate_s))
        log(INFO, "round %d: eval loss %.4f, %d clients aggregated in %.2f s", ctx.round, loss, len(upload_bytes),
            time.perf_counter() - started)
        return MetricRecord({"eval-loss": loss, "clients": len(upload_bytes)})

    @property
    def round_context(self) -> RoundContext:
        """The context of the round being run (set by :meth:`configure_train`)."""
        return self._round[0]

    # -- no federated evaluation: the server scores the global model itself ----------------------
    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None

    # -- helpers ---------------------------------------------------------------------------------
    def _eval_loss(self) -> float:
        if self.eval_data is None:
            return float("nan")
        return eval_loss(self.model, self.eval_data, runtime=self.algorithm.runtime)

    def partition_of(self, node_id: int):
        """The client (partition id) running on ``node_id``, or a label naming the node."""
        return next((c for c, n in self.nodes.items() if n == node_id), f"node {node_id}")

    def _discover(self, grid: Grid) -> dict[int, int]:
        """Ask every node for its partition id until all ``clients`` partitions have one."""
        deadline, nodes = time.monotonic() + self.discovery_timeout, {}
        while len(nodes) < self.clients and time.monotonic() < deadline:
            new = [n for n in grid.get_node_ids() if n not in nodes.values()]
            queries = [Message(RecordDict({"query": ConfigRecord({"what": "partition-id"})}), dst_node_id=n,
                               message_type=MessageType.QUERY) for n in new]
            for reply in grid.send_and_receive(queries, timeout=60) if queries else []:
                if not reply.has_error():
                    nodes[int(reply.content["partition"]["partition-id"])] = reply.metadata.src_node_id
            if len(nodes) < self.clients:
                time.sleep(0.5)
        log(INFO, "clients %s on nodes %s", sorted(nodes), [nodes[c] for c in sorted(nodes)])
        if len(nodes) < self.clients:
            log(WARNING, "only %d of %d clients connected within %.0f s", len(nodes), self.clients,
                self.discovery_timeout)
        return nodes
