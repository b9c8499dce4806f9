"""Local training on a causal LM: first-order steps, and zeroth-order (MeZO two-point) steps on
seeded perturbations."""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import perturb
from .data import Encoded, batch_schedule


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The model's parameters that require grad, by name."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def first_order_steps(model, data: Encoded, *, steps: int, batch_size: int, lr: float, rng: np.random.Generator,
                      optimizer: str = "sgd", grad_accum: int = 1, clip: float | None = None) -> float:
    """``steps`` optimiser steps (SGD or AdamW) over batches drawn by ``rng``; each step averages
    ``grad_accum`` micro-batches and clips the gradient norm to ``clip``. Returns the mean loss."""
    params = [p for _, p in trainable(model)]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}: use 'sgd' or 'adamw'")
    model.train()
    schedule = batch_schedule(len(data), steps * grad_accum, batch_size, rng)
    losses = []
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        for rows in schedule[s * grad_accum : (s + 1) * grad_accum]:
            loss = model(**data.batch(rows)).loss / grad_accum
            loss.backward()
            losses.append(float(loss.detach()) * grad_accum)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
    return float(np.mean(losses)) if losses else float("nan")


@torch.no_grad()
def zeroth_order_step(model, batch: dict, seed: int, eps: float, lr: float) -> float:
    """One MeZO two-point step along z(seed): g = (L(θ+εz) − L(θ−εz)) / 2ε, then θ ← θ − lr·g·z.
    ``z`` is ferret's seeded Rademacher direction over the trainable parameters. Returns g."""
    params = trainable(model)
    perturb(params, seed, eps)
    plus = float(model(**batch).loss)
    perturb(params, seed, -2 * eps)
    minus = float(model(**batch).loss)
    perturb(params, seed, eps)
    g = (plus - minus) / (2 * eps)
    if math.isfinite(g):
        perturb(params, seed, -lr * g)
    return g
