"""FedAvg on full parameters, and FedZO (zeroth-order local steps, FedAvg aggregation)."""

from __future__ import annotations

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ... import spec
from ..data import Encoded, batch_schedule
from ..runtime import model_device, to_host
from ..train import first_order_steps, zeroth_order_step
from .base import Algorithm, ClientContext, LocalTraining, RoundContext, difference, snapshot


class FedAvg(Algorithm):
    """Clients upload their full fp32 update Δ_i; the server adds server_lr · Σ p_i Δ_i."""

    name = "fedavg"
    default_local = LocalTraining()

    def __init__(self, local: LocalTraining | None = None, server_lr: float = 1.0):
        super().__init__()
        self.local = local or self.default_local
        self.server_lr = server_lr

    def local_train(self, model, data: Encoded, ctx: ClientContext) -> None:
        first_order_steps(model, data, rng=ctx.rng, runtime=self.runtime, **vars(self.local))

    def client_update(self, model, data, ctx):
        start = snapshot(model)
        self.local_train(model, data, ctx)
        return encode_tensors(difference(model, start))

    def aggregate(self, model, uploads, weights, ctx: RoundContext):
        device = model_device(model)
        total: dict[str, torch.Tensor] = {}
        for upload, w in zip(uploads, weights):
            for name, d in decode_tensors(upload, device).items():
                total[name] = total[name] + w * d if name in total else w * d
        self.broadcast = encode_tensors(total)
        self._add(model, total)  # what apply(broadcast) adds, without decoding it again

    def apply(self, model, broadcast, ctx):
        self._add(model, decode_tensors(broadcast, model_device(model)))

    def _add(self, model, update: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, d in update.items():
                params[name].add_(d.to(params[name].dtype), alpha=self.server_lr)


def encode_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """Tensors (on any device) as safetensors bytes."""
    return st_save(to_host(tensors))


def decode_tensors(data: bytes, device: torch.device) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_tensors`, onto ``device``."""
    return {name: t.to(device, non_blocking=True) for name, t in st_load(data).items()}


class FedZO(FedAvg):
    """FedAvg whose clients take zeroth-order steps: per step, a two-point estimate along a fresh
    seeded direction (``ferret.perturb``) with perturbation ``eps``, then θ ← θ − lr·g·z
    (``local.optimizer`` and ``local.clip`` do not apply)."""

    name = "fedzo"

    default_local = LocalTraining(steps=10, batch_size=4, lr=3e-7)

    def __init__(self, local: LocalTraining | None = None, server_lr: float = 1.0, *, eps: float = 5e-4):
        super().__init__(local or self.default_local, server_lr)
        self.eps = eps

    def local_train(self, model, data, ctx):
        device = model_device(model)
        for rows in batch_schedule(len(data), self.local.steps, self.local.batch_size, ctx.rng):
            seed = spec.normalize_seed(int(ctx.rng.integers(2**63)))
            zeroth_order_step(model, data.batch(rows, device), seed, self.eps, self.local.lr, self.runtime)
