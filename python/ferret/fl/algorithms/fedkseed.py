"""FedKSeed: zeroth-order local steps restricted to K candidate seeds shared by the round; each
client uploads K scalars (its accumulated projected gradients) and the server replays them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ... import perturb, spec
from ..data import batch_schedule
from ..runtime import model_device
from ..bounds import BoundOptions
from ..settings import at_least, positive_finite
from ..train import trainable, zeroth_order_step
from .base import Algorithm, LocalTraining, MalformedUpload, NonFiniteUpdate, UnsafeUpdate

MAX_SEEDS = 1 << 16  # the round's seeds are drawn on the host, one Philox call each
MAX_SCALAR = 1e20  # far above any honest estimate, far below float32's largest value


@dataclass(frozen=True)
class FedKSeedOptions(BoundOptions):
    """``k``: candidate seeds per round (the paper uses up to 4096); ``eps``: the perturbation of
    the two-point estimates; ``relative_bound``, ``norm_bound``: the influence bounds on each
    client's step (:mod:`ferret.fl.bounds`; one block, the whole model)."""

    k: int = 1024
    eps: float = 5e-4

    def validate(self) -> None:
        super().validate()
        at_least("k", self.k, 1)
        if self.k > MAX_SEEDS:
            raise ValueError(f"k must be at most {MAX_SEEDS} candidate seeds, got {self.k}")
        positive_finite("eps", self.eps)


class FedKSeed(Algorithm):
    """FedKSeed with ``k`` candidate seeds: ``local.steps`` two-point zeroth-order steps of
    ``local.batch_size`` examples at ``local.lr`` with perturbation ``eps``."""

    name = "fedkseed"
    Options = FedKSeedOptions
    default_local = LocalTraining(steps=200, batch_size=4, lr=3e-7)

    def __init__(self, options: FedKSeedOptions | None = None, *, local: LocalTraining | None = None, **values):
        super().__init__(options, local=local, **values)
        self._seeds: tuple[int, list[int]] = (-1, [])

    def seeds(self, round_seed: int) -> list[int]:
        """The round's K candidate seeds."""
        if self._seeds[0] != round_seed:
            self._seeds = (round_seed, [spec.block_seed(round_seed, j) for j in range(self.options.k)])
        return self._seeds[1]

    def client_update(self, model, data, ctx):
        seeds, k, eps = self.seeds(ctx.round_seed), self.options.k, self.options.eps
        acc = np.zeros(k, dtype=np.float64)
        device = model_device(model)
        for rows in batch_schedule(len(data), self.local.steps, self.local.batch_size, ctx.rng):
            j = int(ctx.rng.integers(k))
            acc[j] += zeroth_order_step(model, data.batch(rows, device), seeds[j], eps, self.local.lr, self.runtime)
        if not np.all(np.isfinite(acc)):
            raise NonFiniteUpdate("a zeroth-order estimate is NaN or Inf")
        return acc.astype("<f4").tobytes()

    def check_upload(self, upload, model, ctx):
        if not isinstance(upload, (bytes, bytearray)) or len(upload) != 4 * self.options.k:
            raise MalformedUpload(f"expected {self.options.k} float32 scalars")
        scalars = np.frombuffer(upload, dtype="<f4")
        if not np.all(np.isfinite(scalars)):
            raise MalformedUpload("the scalars hold NaN or Inf")
        if float(np.max(np.abs(scalars))) > MAX_SCALAR:
            raise MalformedUpload(f"a scalar of magnitude above {MAX_SCALAR:g}")

    def block_norms(self, upload, model):
        # the client's step, -lr Σ_j g_j z_j over d elements of independent ±1 directions: about lr·|g|·√d
        d = sum(p.numel() for _, p in trainable(model))
        return np.array([self.local.lr * math.sqrt(d) * float(np.linalg.norm(self.vector(upload)))])

    def scale_blocks(self, upload, factors):
        return self.from_vector(upload, self.vector(upload) * float(factors[0]))

    def vector(self, upload):
        return np.frombuffer(upload, dtype="<f4").astype(np.float64)

    def from_vector(self, upload, vector):
        return np.asarray(vector, dtype="<f4").tobytes()

    def aggregate(self, model, uploads, weights, ctx):
        total = sum(w * np.frombuffer(u, dtype="<f4").astype(np.float64) for u, w in zip(uploads, weights))
        self.broadcast = total.astype("<f4").tobytes()
        self.apply(model, self.broadcast, ctx)

    def apply(self, model, broadcast, ctx):
        params = trainable(model)
        steps = [(seed, -self.local.lr * float(g)) for seed, g in zip(self.seeds(ctx.round_seed),
                                                                       np.frombuffer(broadcast, dtype="<f4")) if g != 0.0]
        # each step moves every weight by ±step (Rademacher directions): refuse, before any is taken, a
        # round that could carry a weight past its dtype's largest value
        reach = math.fsum(abs(step) for _, step in steps) * (1 + 2.0**-20)
        with torch.no_grad():
            peaks = torch.stack([p.detach().abs().max().float() for _, p in params]).cpu().tolist()
        if any(not peak + reach <= torch.finfo(p.dtype).max for peak, (_, p) in zip(peaks, params)):
            raise UnsafeUpdate(f"the round's steps move a weight by up to {reach:.3g}: it would overflow")
        for seed, step in steps:  # a host scalar: the step along z(seed) runs where the weights are
            perturb(params, seed, step, backend=self.runtime.backend)
