"""FedAvg on full parameters, and FedZO (zeroth-order local steps, FedAvg aggregation)."""

from __future__ import annotations

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ... import spec
from ..data import Encoded, batch_schedule
from ..train import first_order_steps, zeroth_order_step
from .base import Algorithm, ClientContext, LocalTraining, RoundContext, difference, snapshot


class FedAvg(Algorithm):
    """Clients upload their full fp32 update Δ_i; the server adds server_lr · Σ p_i Δ_i."""

    name = "fedavg"

    def __init__(self, local: LocalTraining | None = None, server_lr: float = 1.0):
        super().__init__()
        self.local = local or LocalTraining()
        self.server_lr = server_lr

    def local_train(self, model, data: Encoded, ctx: ClientContext) -> None:
        first_order_steps(model, data, rng=ctx.rng, **vars(self.local))

    def client_update(self, model, data, ctx):
        start = snapshot(model)
        self.local_train(model, data, ctx)
        return st_save(difference(model, start))

    def aggregate(self, model, uploads, weights, ctx: RoundContext):
        params = dict(model.named_parameters())
        total: dict[str, torch.Tensor] = {}
        for upload, w in zip(uploads, weights):
            for name, d in st_load(upload).items():
                total[name] = total[name] + w * d if name in total else w * d
        with torch.no_grad():
            for name, d in total.items():
                params[name].add_(d.to(params[name].dtype), alpha=self.server_lr)
        self.broadcast = st_save(total)


class FedZO(FedAvg):
    """FedAvg whose clients take zeroth-order steps: per step, a two-point estimate along a fresh
    seeded direction (``ferret.perturb``), then θ ← θ − lr·g·z."""

    name = "fedzo"

    def __init__(self, steps: int = 10, batch_size: int = 4, lr: float = 3e-7, eps: float = 5e-4,
                 server_lr: float = 1.0):
        super().__init__(LocalTraining(steps=steps, batch_size=batch_size, lr=lr), server_lr)
        self.eps = eps

    def local_train(self, model, data, ctx):
        for rows in batch_schedule(len(data), self.local.steps, self.local.batch_size, ctx.rng):
            seed = spec.normalize_seed(int(ctx.rng.integers(2**63)))
            zeroth_order_step(model, data.batch(rows), seed, self.eps, self.local.lr)
