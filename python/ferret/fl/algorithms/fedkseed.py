"""FedKSeed: zeroth-order local steps restricted to K candidate seeds shared by the round; each
client uploads K scalars (its accumulated projected gradients) and the server replays them."""

from __future__ import annotations

import numpy as np

from ... import perturb, spec
from ..data import batch_schedule
from ..train import trainable, zeroth_order_step
from .base import Algorithm, NonFiniteUpdate


class FedKSeed(Algorithm):
    name = "fedkseed"

    def __init__(self, k: int = 1024, steps: int = 200, batch_size: int = 4, lr: float = 3e-7, eps: float = 5e-4):
        super().__init__()
        self.k, self.steps, self.batch_size, self.lr, self.eps = k, steps, batch_size, lr, eps
        self._seeds: tuple[int, list[int]] = (-1, [])

    def seeds(self, round_seed: int) -> list[int]:
        """The round's K candidate seeds."""
        if self._seeds[0] != round_seed:
            self._seeds = (round_seed, [spec.block_seed(round_seed, j) for j in range(self.k)])
        return self._seeds[1]

    def client_update(self, model, data, ctx):
        seeds = self.seeds(ctx.round_seed)
        acc = np.zeros(self.k, dtype=np.float64)
        for rows in batch_schedule(len(data), self.steps, self.batch_size, ctx.rng):
            j = int(ctx.rng.integers(self.k))
            acc[j] += zeroth_order_step(model, data.batch(rows), seeds[j], self.eps, self.lr)
        if not np.all(np.isfinite(acc)):
            raise NonFiniteUpdate("a zeroth-order estimate is NaN or Inf")
        return acc.astype("<f4").tobytes()

    def aggregate(self, model, uploads, weights, ctx):
        total = sum(w * np.frombuffer(u, dtype="<f4").astype(np.float64) for u, w in zip(uploads, weights))
        params = trainable(model)
        for seed, g in zip(self.seeds(ctx.round_seed), total):
            if g != 0.0:
                perturb(params, seed, -self.lr * float(g))
        self.broadcast = total.astype("<f4").tobytes()
