"""The interface every federated algorithm implements, free of any engine (the embedded loop and
a Flower app drive the same objects)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..data import Encoded
from ..runtime import DEFAULT, Runtime
from ..train import trainable


class NonFiniteUpdate(ValueError):
    """A client's update holds NaN or Inf; the engine drops that client from the round."""


@dataclass
class LocalTraining:
    """First-order local training: ``steps`` optimiser steps of ``batch_size`` examples."""

    steps: int = 10
    batch_size: int = 4
    lr: float = 0.1
    optimizer: str = "sgd"
    grad_accum: int = 1
    clip: float | None = None


@dataclass
class ClientContext:
    """What the engine tells a client about the round: ids, the round's shared seed, its rng."""

    round: int
    client: int
    round_seed: int
    rng: np.random.Generator


@dataclass
class RoundContext:
    round: int
    round_seed: int
    clients: list[int] = field(default_factory=list)


class Algorithm:
    """One federated algorithm: what a client computes and uploads (bytes), how the server
    aggregates the uploads into the global model, and what it broadcasts back (bytes).

    ``runtime`` (a :class:`~ferret.fl.runtime.Runtime`, set by the engine that drives the object)
    gives the dtype of its forward passes and the backend of every ferret kernel it calls; its
    tensors follow the model's device."""

    name = "algorithm"
    full_parameter = True  # whether clients train (and the server updates) every parameter
    default_local = LocalTraining()  # the local training a client runs unless told otherwise
    runtime: Runtime = DEFAULT

    def __init__(self):
        self.broadcast = b""  # the last aggregate sent to the clients, as encoded

    def client_update(self, model: torch.nn.Module, data: Encoded, ctx: ClientContext) -> bytes:
        """Train ``model`` (a working copy holding the global weights) on ``data``; return the upload."""
        raise NotImplementedError

    def aggregate(self, model: torch.nn.Module, uploads: list[bytes], weights: list[float], ctx: RoundContext) -> None:
        """Apply the clients' uploads (weights normalised to sum to 1) to the global ``model`` in place."""
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
