"""The interface every federated algorithm implements, free of any engine (the embedded loop and
a Flower app drive the same objects).

An algorithm is one unit: its class holds what a client computes and uploads, how the server
checks an upload it receives, aggregates the uploads and broadcasts the result, and its
``Options`` (a :class:`~ferret.fl.settings.Settings` dataclass, every value checked when it is
made). :mod:`ferret.fl.algorithms` registers it under its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..data import Encoded
from ..runtime import DEFAULT, Runtime
from ..settings import Settings, at_least, one_of, positive_finite
from ..train import trainable


class NonFiniteUpdate(ValueError):
    """A client's update holds NaN or Inf; the engine drops that client from the round."""


class MalformedUpload(ValueError):
    """An upload the server must not aggregate (wrong format, another model or round, NaN/Inf)."""


class UnsafeUpdate(ValueError):
    """A round's aggregate that would write non-finite weights; nothing of it was written, and the
    server leaves the model as it was for that round."""


@dataclass(frozen=True)
class LocalTraining(Settings):
    """First-order local training: ``steps`` optimiser steps (``"sgd"`` or ``"adamw"``) of
    ``batch_size`` examples at learning rate ``lr``, each step averaging ``grad_accum``
    micro-batches and clipping the gradient norm to ``clip`` (None: no clipping)."""

    steps: int = 10
    batch_size: int = 4
    lr: float = 0.1
    optimizer: str = "sgd"
    grad_accum: int = 1
    clip: float | None = None

    def validate(self) -> None:
        at_least("steps", self.steps, 1)
        at_least("batch_size", self.batch_size, 1)
        at_least("grad_accum", self.grad_accum, 1)
        positive_finite("lr", self.lr)
        one_of("optimizer", self.optimizer, ("sgd", "adamw"))
        if self.clip is not None:
            positive_finite("clip", self.clip)


@dataclass(frozen=True)
class NoOptions(Settings):
    """The options of an algorithm that takes none."""


@dataclass
class ClientContext:
    """What the engine tells a client about the round: ids, the round's shared seed, the
    client's own generators: ``rng`` (NumPy: batches, seeds) and ``generator`` (torch, CPU: e.g. a
    fresh adapter's initial weights), and the round's sampled ``clients`` (sorted; e.g. for
    disjoint row slots). Made by :mod:`ferret.fl.protocol` alone."""

    round: int
    client: int
    round_seed: int
    rng: np.random.Generator
    generator: torch.Generator
    clients: tuple[int, ...] = ()


@dataclass
class RoundContext:
    """The round being run: its index, its shared seed and the clients sampled for it."""

    round: int
    round_seed: int
    clients: list[int] = field(default_factory=list)


class Algorithm:
    """One federated algorithm: what a client computes and uploads (bytes), how the server checks
    an upload, aggregates the uploads into the global model, and what it broadcasts back (bytes).

    Built as ``Algo(local=..., option=value, ...)`` (or ``Algo(options=Algo.Options(...))``); the
    options are checked then (``ValueError`` / ``TypeError``). ``runtime`` (a
    :class:`~ferret.fl.runtime.Runtime`, set by the engine that drives the object) gives the dtype
    of its forward passes and the backend of every ferret kernel it calls; its tensors follow the
    model's device.
    """

    name = "algorithm"
    Options: type[Settings] = NoOptions
    full_parameter = True  # whether clients train (and the server updates) every parameter
    default_local = LocalTraining()  # the local training a client runs unless told otherwise
    runtime: Runtime = DEFAULT

    def __init__(self, options: Settings | None = None, *, local: LocalTraining | None = None, **values):
        if options is not None and values:
            raise TypeError("give the options either as an Options object or as keywords, not both")
        if options is not None and not isinstance(options, self.Options):
            raise TypeError(f"{self.name} takes {self.Options.__name__}, got {type(options).__name__}")
        self.options = options if options is not None else self.Options(**values)
        if local is not None and not isinstance(local, LocalTraining):
            raise TypeError(f"local must be a LocalTraining, got {type(local).__name__}")
        self.local = local or self.default_local
        self.broadcast = b""  # the last aggregate sent to the clients, as encoded

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ``ValueError`` if the options cannot run on ``model`` (checked before any round, once
        the model is loaded; e.g. Ferret's budget against its parameters). The default accepts any."""

    def client_update(self, model: torch.nn.Module, data: Encoded, ctx: ClientContext) -> bytes:
        """Train ``model`` (a working copy holding the global weights) on ``data``; return the upload."""
        raise NotImplementedError

    def check_upload(self, upload: bytes, model: torch.nn.Module, ctx: ClientContext) -> None:
        """Raise :class:`MalformedUpload` unless ``upload`` is what client ``ctx.client`` of the round
        may send for the global ``model``: the right format, shapes, seed, finite values of bounded
        magnitude. The check is total: any upload it accepts aggregates with any other accepted
        ones, under any weights, without an error or an overflow."""
        raise NotImplementedError

    def block_norms(self, upload: bytes, model: torch.nn.Module) -> np.ndarray:
        """The norm of what a checked ``upload`` adds to each block of the global ``model`` before
        weighting (float64, finite, one per block, the same blocks for every client of a round):
        what the server bounds (:mod:`ferret.fl.bounds`)."""
        raise NotImplementedError

    def scale_blocks(self, upload: bytes, factors: np.ndarray) -> bytes:
        """A checked ``upload`` with what it adds to block ``b`` scaled by ``factors[b]`` (in [0, 1])."""
        raise NotImplementedError

    def aggregate(self, model: torch.nn.Module, uploads: list[bytes], weights: list[float], ctx: RoundContext) -> None:
        """Apply the weighted combination of the clients' accepted uploads (``weights`` normalised to
        sum to 1) to the global ``model`` in place; sets :attr:`broadcast`.
        The server has checked and bounded the uploads; raises :class:`UnsafeUpdate`, with nothing
        written, when the result would still make a weight non-finite."""
        raise NotImplementedError

    def apply(self, model: torch.nn.Module, broadcast: bytes, ctx: RoundContext) -> None:
        """Apply a round's ``broadcast`` to ``model`` in place, exactly as :meth:`aggregate` applied
        it to the global model: :meth:`aggregate` builds the broadcast and calls this, and the
        clients of a distributed engine call it to keep their replica of the global model in step."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The server-side state carried from round to round (e.g. momentum), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""

    # -- uploads as vectors: the numbers an upload carries (what a simulated attack rewrites) -------
    def vector(self, upload: bytes) -> np.ndarray:
        """The float64 numbers ``upload`` carries (what a simulated attack rewrites,
        :mod:`ferret.fl.attacks`)."""
        raise NotImplementedError

    def from_vector(self, upload: bytes, vector: np.ndarray) -> bytes:
        """``upload`` with its :meth:`vector` replaced by ``vector`` (same length)."""
        raise NotImplementedError

    @classmethod
    def has_vectors(cls) -> bool:
        """Whether uploads convert to vectors and back (:meth:`vector`, :meth:`from_vector`)."""
        return cls.from_vector is not Algorithm.from_vector

    # -- the round as a mean of vectors: an algorithm whose round needs only the weighted mean of
    # vectors in one space common to the round's clients can run under a differentially private
    # mean, a robust statistic or a secure sum (Flower's SecAgg+) -----------------------------------
    def check_summable(self) -> None:
        """Raise ``ValueError`` unless a round can be aggregated from the weighted mean of
        :meth:`summable` vectors computed by a secure sum (the default: it cannot)."""
        raise ValueError(f"{self.name} uploads cannot be summed securely")

    def summable(self, upload: bytes, model: torch.nn.Module, ctx: ClientContext) -> np.ndarray:
        """The float64 vector client ``ctx.client``'s checked upload stands for in the round's
        common space, where a sum over clients means something: what a secure sum adds, what DP
        clips and noises, what a robust statistic compares. The default: :meth:`vector`."""
        return self.vector(upload)

    def aggregate_mean(self, model: torch.nn.Module, mean: np.ndarray, ctx: RoundContext) -> None:
        """Aggregate a round from the weighted mean of the clients' :meth:`summable` vectors, as
        :meth:`aggregate` would from the uploads themselves; sets :attr:`broadcast`."""
        raise NotImplementedError

    @classmethod
    def has_means(cls) -> bool:
        """Whether a round aggregates from a mean of :meth:`summable` vectors (:meth:`aggregate_mean`)."""
        return cls.aggregate_mean is not Algorithm.aggregate_mean


def add_update(params, update: dict[str, torch.Tensor], scale: float) -> None:
    """``p += scale * update[name]`` for every ``(name, p)`` of ``params`` that ``update`` names,
    or, raising :class:`UnsafeUpdate`, nothing at all when any weight that is finite would not be
    (one pass to check, one to write: the same operation twice, so the same bits; one sync)."""
    pairs = [(p, update[name].to(p.dtype)) for name, p in params if name in update]
    with torch.no_grad():
        safe = [(torch.isfinite(p.add(u, alpha=scale)) | ~torch.isfinite(p)).all() for p, u in pairs]
        if safe and not bool(torch.stack(safe).all()):
            raise UnsafeUpdate("the round's update would make weights non-finite (it overflows their dtype)")
        for p, u in pairs:
            p.add_(u, alpha=scale)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the trainable parameters, by name."""
    return {n: p.detach().clone() for n, p in trainable(model)}


def difference(model: torch.nn.Module, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """θ − start for every parameter in ``start``, on the model's device; raises
    :class:`NonFiniteUpdate` on NaN/Inf."""
    params = dict(model.named_parameters())
    delta = {n: (params[n].detach() - s).float() for n, s in start.items()}
    if delta and not bool(torch.stack([torch.isfinite(d).all() for d in delta.values()]).all()):  # one sync
        raise NonFiniteUpdate("the local update holds NaN or Inf")
    return delta
