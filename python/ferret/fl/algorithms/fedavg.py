"""FedAvg on full parameters, and FedZO (zeroth-order local steps, FedAvg aggregation)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ... import spec
from ..data import Encoded, batch_schedule
from ..defences import DefenceOptions
from ..runtime import model_device
from ..settings import positive_finite
from ..train import first_order_steps, trainable, zeroth_order_step
from .base import (Algorithm, ClientContext, LocalTraining, MalformedUpload, RoundContext, add_update, difference,
                   snapshot)
from .uploads import decode_tensors, encode_tensors

MAX_VALUE = 1e20  # far above any honest update's entry, far below float32's largest value


@dataclass(frozen=True)
class FedAvgOptions(DefenceOptions):
    """``server_lr``: the server's step on the weighted mean of the clients' updates;
    ``relative_bound``, ``norm_bound``: the influence bounds, tensor by tensor
    (:mod:`ferret.fl.bounds`); ``aggregator``, ``byzantine``: robust aggregation of the flattened
    updates (:mod:`ferret.fl.robust`; d numbers per client, so meant for small models);
    ``dp_*``: client-level differential privacy on them (:mod:`ferret.fl.privacy`)."""

    server_lr: float = 1.0

    def validate(self) -> None:
        super().validate()
        positive_finite("server_lr", self.server_lr)


class FedAvg(Algorithm):
    """Clients upload their full fp32 update Δ_i; the server adds server_lr · Σ p_i Δ_i."""

    name = "fedavg"
    Options = FedAvgOptions
    default_local = LocalTraining()

    def local_train(self, model, data: Encoded, ctx: ClientContext) -> None:
        """The client's local steps on ``model`` (first-order; FedZO: zeroth-order)."""
        first_order_steps(model, data, rng=ctx.rng, runtime=self.runtime, **vars(self.local))

    def client_update(self, model, data, ctx):
        start = snapshot(model)
        self.local_train(model, data, ctx)
        return encode_tensors(difference(model, start))

    def check_upload(self, upload, model, ctx):
        tensors = decode_tensors(upload)
        params = dict(trainable(model))
        if set(tensors) != set(params):
            name = sorted(set(tensors) ^ set(params))[0]
            raise MalformedUpload(f"the update {'lacks' if name in params else 'has an extra'} tensor {name}")
        for name, t in tensors.items():
            if tuple(t.shape) != tuple(params[name].shape):
                raise MalformedUpload(f"update tensor {name} {tuple(t.shape)} does not fit the model")
            if t.numel() and float(t.abs().max()) > MAX_VALUE:
                raise MalformedUpload(f"update tensor {name} has a value of magnitude above {MAX_VALUE:g}")

    # blocks: the model's trainable tensors, in name order (every accepted upload names them all)
    def block_norms(self, upload, model):
        tensors = decode_tensors(upload)
        return np.array([float(tensors[n].double().norm()) for n in sorted(tensors)])

    def scale_blocks(self, upload, factors):
        tensors = decode_tensors(upload)
        return encode_tensors({n: tensors[n] * float(f) for n, f in zip(sorted(tensors), factors)})

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

    # -- uploads as vectors: the tensors flattened in name order, float64 ----------------------------
    def vector(self, upload):
        tensors = decode_tensors(upload)
        return np.concatenate([tensors[n].double().numpy().ravel() for n in sorted(tensors)])

    def from_vector(self, upload, vector):
        return encode_tensors(self._unflatten(vector, {n: t.shape for n, t in decode_tensors(upload).items()}))

    def aggregate_mean(self, model, mean, ctx):
        total = self._unflatten(mean, {n: p.shape for n, p in trainable(model)})
        self.broadcast = encode_tensors(total)
        self._add(model, {n: t.to(model_device(model)) for n, t in total.items()})

    @staticmethod
    def _unflatten(vector, shapes: dict) -> dict[str, torch.Tensor]:
        """float32 tensors of ``shapes`` (name -> shape) cut from ``vector`` in name order."""
        flat = torch.from_numpy(np.asarray(vector, dtype=np.float32))
        out, at = {}, 0
        for name in sorted(shapes):
            size = int(np.prod(shapes[name]))
            out[name] = flat[at : at + size].reshape(shapes[name]).clone()
            at += size
        if at != flat.numel():
            raise ValueError(f"a vector of {flat.numel()} numbers for tensors of {at}")
        return out

    def _add(self, model, update: dict[str, torch.Tensor]) -> None:
        add_update(list(model.named_parameters()), update, self.options.server_lr)


@dataclass(frozen=True)
class FedZOOptions(FedAvgOptions):
    """``server_lr`` as for FedAvg; ``eps``: the perturbation of the two-point estimates."""

    eps: float = 5e-4

    def validate(self) -> None:
        super().validate()
        positive_finite("eps", self.eps)


class FedZO(FedAvg):
    """FedAvg whose clients take zeroth-order steps: per step, a two-point estimate along a fresh
    seeded direction (``ferret.perturb``) with perturbation ``eps``, then θ ← θ − lr·g·z
    (``local.optimizer`` and ``local.clip`` do not apply)."""

    name = "fedzo"
    Options = FedZOOptions
    default_local = LocalTraining(steps=10, batch_size=4, lr=3e-7)

    def local_train(self, model, data, ctx):
        device = model_device(model)
        for rows in batch_schedule(len(data), self.local.steps, self.local.batch_size, ctx.rng):
            seed = spec.normalize_seed(int(ctx.rng.integers(2**63)))
            zeroth_order_step(model, data.batch(rows, device), seed, self.options.eps, self.local.lr, self.runtime)
