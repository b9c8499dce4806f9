"""Local training on a causal LM: first-order steps, and zeroth-order (MeZO two-point) steps on
seeded perturbations."""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import perturb
from .data import Encoded, batch_schedule
from .runtime import DEFAULT, Runtime, model_device


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The model's parameters that require grad, by name."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def first_order_steps(model, data: Encoded, *, steps: int, batch_size: int, lr: float, rng: np.random.Generator,
                      optimizer: str = "sgd", grad_accum: int = 1, clip: float | None = None,
                      runtime: Runtime = DEFAULT) -> float:
    """``steps`` optimiser steps (SGD or AdamW) over batches drawn by ``rng``; each step averages
    ``grad_accum`` micro-batches and clips the gradient norm to ``clip``. Batches go to the
    model's device; forward passes run under ``runtime.autocast()``. Returns the mean loss (the
    one host sync, after the last step)."""
    params = [p for _, p in trainable(model)]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}: use 'sgd' or 'adamw'")
    model.train()
    device = model_device(model)
    schedule = batch_schedule(len(data), steps * grad_accum, batch_size, rng)
    losses = []
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        for rows in schedule[s * grad_accum : (s + 1) * grad_accum]:
            with runtime.autocast():
                loss = model(**data.batch(rows, device)).loss / grad_accum
            loss.backward()
            losses.append(loss.detach())
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
    if not losses:
        return float("nan")
    return float(np.mean([x * grad_accum for x in torch.stack(losses).float().tolist()]))


@torch.no_grad()
def zeroth_order_step(model, batch: dict, seed: int, eps: float, lr: float, runtime: Runtime = DEFAULT) -> float:
    """One MeZO two-point step along z(seed): g = (L(θ+εz) − L(θ−εz)) / 2ε, then θ ← θ − lr·g·z.
    ``z`` is ferret's seeded Rademacher direction over the trainable parameters, drawn by
    ``runtime.backend``; ``batch`` lies on the model's device; the forward passes run under
    ``runtime.autocast()``. Returns g (the step needs it on the host: a sync per step)."""
    params = trainable(model)
    backend = runtime.backend
    perturb(params, seed, eps, backend=backend)
    with runtime.autocast():
        plus = float(model(**batch).loss)
    perturb(params, seed, -2 * eps, backend=backend)
    with runtime.autocast():
        minus = float(model(**batch).loss)
    perturb(params, seed, eps, backend=backend)
    g = (plus - minus) / (2 * eps)
    if math.isfinite(g):
        perturb(params, seed, -lr * g, backend=backend)
    return g
