"""The server side of a federated run, one round at a time, as every engine drives it.

A :class:`Server` holds the global model, the algorithm object and the rules for what a client
may send. Each round, :meth:`Server.begin` samples the round's clients (:mod:`ferret.fl.protocol`),
:meth:`ServerRound.accept` takes each client's upload with the example count and the seconds it
claims, and :meth:`ServerRound.conclude` aggregates, scores and records the round. The embedded
loop (:mod:`ferret.fl.simulation`) and the Flower strategy (:mod:`ferret.flower.strategy`) drive
the same objects, so every rule is written once:

- **A client is outside the server's trust.** Whatever it sends, the round uses it within a bound
  the server sets, or drops that client with one logged line, and the run goes on. An upload is
  dropped when the algorithm's check refuses it (a total check: an accepted upload always
  aggregates, :meth:`~ferret.fl.algorithms.Algorithm.check_upload`), when it comes from a client
  the round did not sample or a second time from one client, when its example count is not a
  whole number from 1 to ``max_examples``, or when its seconds are not a finite number at least 0.
- Accepted uploads are weighed by their example counts (``weighting="examples"``) or equally,
  then defended and combined (:mod:`ferret.fl.defences`): bounded block by block, or clipped and
  noised for differential privacy, then a robust statistic or the algorithm's weighted combination.
- A round that cannot be aggregated (fewer good uploads than ``min_replies`` or than a robust
  statistic needs, an update that would overflow the weights) leaves the model as it was, with one
  logged line.
- Every round is scored on the held-out data, timed, and the privacy it spent is accounted.
"""

from __future__ import annotations

import math
import time
import warnings
from numbers import Real

import numpy as np

from . import privacy, protocol
from .algorithms import Algorithm, ClientContext, MalformedUpload, UnsafeUpdate
from .data import DataError, Encoded
from .defences import RoundSkipped, aggregate
from .evaluate import eval_loss
from .results import RoundRecord, RunResult

WEIGHTINGS = ("examples", "equal")
MAX_EXAMPLES = 10**6  # the default cap on a client's claimed example count


class Server:
    """The server of a run of ``algorithm`` over ``clients`` clients on the global ``model``
    (updated in place, on its device; ``algorithm.runtime`` gives the dtype and kernels).

    ``seed``, ``fraction`` (of the clients sampled each round) and ``weighting`` (``"examples"``
    or ``"equal"``) fix every round's randomness and weights; ``max_examples`` caps the example
    count a client may claim; ``min_replies`` is the fewest good uploads a round aggregates;
    ``eval_data`` is scored after every round (NaN without it); ``result`` holds the records of
    the rounds done (a new one, scoring the starting model, when not given); ``warn`` receives
    each logged line (default: a ``RuntimeWarning``). Raises ``ValueError`` for a bad setting.
    """

    def __init__(self, algorithm: Algorithm, model, *, clients: int, seed: int = 0, fraction: float = 1.0,
                 weighting: str = "examples", max_examples: int = MAX_EXAMPLES, min_replies: int = 1,
                 eval_data: Encoded | None = None, result: RunResult | None = None, warn=None):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        for name, value in (("clients", clients), ("max_examples", max_examples), ("min_replies", min_replies)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")
        self.algorithm, self.model, self.eval_data = algorithm, model, eval_data
        self.clients, self.seed, self.fraction, self.weighting = clients, seed, fraction, weighting
        self.max_examples, self.min_replies = max_examples, min_replies
        self.warn = warn or (lambda line: warnings.warn(line, RuntimeWarning, stacklevel=3))
        self.result = result if result is not None else RunResult(initial_eval_loss=self.evaluate())

    def evaluate(self) -> float:
        """The global model's eval loss on ``eval_data`` (NaN without it)."""
        if self.eval_data is None:
            return float("nan")
        return eval_loss(self.model, self.eval_data, runtime=self.algorithm.runtime)

    def begin(self, index: int | None = None) -> "ServerRound":
        """Start round ``index`` (default: the round after the last one recorded)."""
        return ServerRound(self, len(self.result.rounds) if index is None else index)

    def rounds_allowed(self, rounds: int) -> int:
        """The rounds the run may do of ``rounds``: fewer when ``target_epsilon`` would be exceeded."""
        return privacy.rounds_allowed(self.algorithm.options, self.clients, self.fraction, rounds)


class ServerRound:
    """One round of a :class:`Server`: its context (``ctx``: index, seed, sampled clients), the
    uploads accepted so far and the clients dropped (see the module docstring)."""

    def __init__(self, server: Server, index: int):
        self.server = server
        self.ctx = protocol.round_context(server.seed, index, server.clients, server.fraction)
        self.started = time.perf_counter()
        self.download = len(server.algorithm.broadcast)  # what each client fetches: the last broadcast
        self._sampled = set(self.ctx.clients)
        self._accepted: dict[int, tuple[bytes, float, float]] = {}  # client -> (upload, weight, seconds)
        self._secure_bytes: dict[int, int] = {}  # client -> bytes it sent into a secure sum
        self._dropped: dict[int, str] = {}
        self._contexts: dict[int, ClientContext] = {}

    @property
    def clients(self) -> list[int]:
        """The round's sampled clients, sorted."""
        return self.ctx.clients

    def client_context(self, client: int) -> ClientContext:
        """What client ``client`` is told in this round (:func:`ferret.fl.protocol.client_context`;
        a fresh one for each call, as its generators advance as they are used)."""
        return protocol.client_context(self.server.seed, self.ctx.round, client, self.ctx.clients)

    def _context(self, client: int) -> ClientContext:
        """Client ``client``'s context as the server reads it (its ids and seeds; its generators
        unused): made once per client and round."""
        if client not in self._contexts:
            self._contexts[client] = self.client_context(client)
        return self._contexts[client]

    def accept(self, client, upload, examples, seconds) -> bool:
        """Take client ``client``'s ``upload`` with the ``examples`` and ``seconds`` it claims; returns
        whether it was accepted (otherwise the client is dropped, with one logged line)."""
        reason = self._refusal(client, upload, examples, seconds)
        if reason is not None:
            self.drop(client, reason)
            return False
        weight = float(examples) if self.server.weighting == "examples" else 1.0
        self._accepted[client] = (bytes(upload), weight, float(seconds))
        return True

    def accept_secure(self, client, upload_bytes: int, seconds) -> bool:
        """Record that client ``client`` sent ``upload_bytes`` into a secure sum (whose mean
        :meth:`conclude` takes): the server sees no upload to check, only who took part."""
        reason = self._refusal(client, None, 1, seconds, secure=True)
        if reason is not None:
            self.drop(client, reason)
            return False
        self._accepted[client] = (b"", 1.0, float(seconds))
        self._secure_bytes[client] = int(upload_bytes)
        return True

    def drop(self, client, reason: str) -> None:
        """Drop ``client`` from the round (a failed client, a refused upload), with one logged line."""
        self.server.warn(f"round {self.ctx.round + 1}: client {client} dropped: {reason}")
        if client in self._sampled and client not in self._accepted:
            self._dropped.setdefault(client, reason)

    def conclude(self, secure_mean=None) -> RoundRecord:
        """Aggregate the accepted uploads into the global model (defences first), or, under secure
        aggregation, the clients' weighted mean ``secure_mean`` (the algorithm's summable vectors);
        score the model, and record the round in the server's result; returns the record."""
        server, algorithm, ctx = self.server, self.server.algorithm, self.ctx
        silent = [c for c in ctx.clients if c not in self._accepted and c not in self._dropped]
        if silent:
            server.warn(f"round {ctx.round + 1}: no reply from clients {silent}")
        order = sorted(self._accepted)
        start = time.perf_counter()
        bounded, skipped = 0, None
        if len(order) < server.min_replies:
            skipped = f"{len(order)} good uploads, fewer than the {server.min_replies} a round needs"
        else:
            total = math.fsum(self._accepted[c][1] for c in order)
            weights = [self._accepted[c][1] / total for c in order]
            try:
                if secure_mean is not None:
                    algorithm.aggregate_mean(server.model, secure_mean, ctx)
                else:
                    bounded = aggregate(algorithm, server.model, [self._accepted[c][0] for c in order], weights,
                                        [self._context(c) for c in order], ctx)
            except (RoundSkipped, UnsafeUpdate) as err:
                skipped = str(err)
        if skipped is not None:
            algorithm.broadcast = b""  # nothing to replay: the model is as it was
            server.warn(f"round {ctx.round + 1}: the model is left as it was: {skipped}")
        algorithm.runtime.synchronize()
        aggregate_s = time.perf_counter() - start
        record = RoundRecord(round=ctx.round, eval_loss=server.evaluate(), clients=list(ctx.clients),
                             dropped=[c for c in ctx.clients if c not in self._accepted],
                             upload_bytes={c: self._secure_bytes.get(c, len(self._accepted[c][0])) for c in order},
                             download_bytes=self.download,
                             local_seconds={c: self._accepted[c][2] for c in order}, aggregate_seconds=aggregate_s,
                             bounded=bounded, skipped=skipped,
                             epsilon=privacy.spent(algorithm.options, server.clients, server.fraction, ctx.round + 1))
        server.result.rounds.append(record)
        return record

    def _refusal(self, client, upload, examples, seconds, secure: bool = False) -> str | None:
        """Why the round must not take this upload (None: it may)."""
        if client not in self._sampled:
            return f"it is not among round {self.ctx.round + 1}'s clients"
        if client in self._accepted or client in self._dropped:
            return "it sent a second upload this round"
        if not secure and not isinstance(upload, (bytes, bytearray)):
            return f"the upload is a {type(upload).__name__}, not bytes"
        if not (isinstance(examples, Real) and not isinstance(examples, bool) and math.isfinite(examples)
                and float(examples).is_integer() and 1 <= examples <= self.server.max_examples):
            return (f"it claims {examples!r} examples: a whole number from 1 to {self.server.max_examples} "
                    f"(max_examples) is expected")
        if not (isinstance(seconds, Real) and not isinstance(seconds, bool) and math.isfinite(seconds)
                and seconds >= 0):
            return f"it claims {seconds!r} seconds: a finite number at least 0 is expected"
        if secure:
            return None
        try:
            self.server.algorithm.check_upload(bytes(upload), self.server.model, self._context(client))
        except MalformedUpload as err:
            return str(err)
        except Exception as err:  # a check that fails on odd bytes is still the client's doing: never the server's end
            return f"the upload check failed on it ({type(err).__name__}: {err})"
        return None


def check_shards(shards, max_examples: int = MAX_EXAMPLES) -> None:
    """Raise :class:`~ferret.fl.data.DataError` when there are no clients, or a client's shard is
    empty or holds more than ``max_examples`` examples (its honest count would be refused)."""
    sizes = np.array([len(s) for s in shards])
    if sizes.size == 0:
        raise DataError("no clients")
    if np.any(sizes == 0):
        raise DataError(f"client {int(np.argmax(sizes == 0))} has no examples")
    if np.any(sizes > max_examples):
        c = int(np.argmax(sizes > max_examples))
        raise DataError(f"client {c} holds {int(sizes[c])} examples, above max_examples={max_examples}: raise it")
