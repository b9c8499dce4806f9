"""Local training and evaluation on a causal LM: first-order steps, zeroth-order (MeZO two-point)
steps on seeded perturbations, eval loss over response tokens, and Rouge-L of greedy generations."""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import perturb
from .data import Encoded, Example, batch_schedule, prompt_of


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


@torch.no_grad()
def eval_loss(model, data: Encoded, batch_size: int = 16) -> float:
    """Mean cross-entropy per response token over ``data``."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = data.batch(list(range(start, min(start + batch_size, len(data)))))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 labels.reshape(-1), ignore_index=-100, reduction="sum")
        total += float(loss)
        tokens += int((labels != -100).sum())
    return total / max(tokens, 1)


@torch.no_grad()
def rouge_l(model, tokenizer, examples: list[Example], max_new_tokens: int = 128, max_prompt: int = 128) -> float:
    """Mean Rouge-L F (``rouge-score``) of greedy generations against the reference responses."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    model.eval()
    scores = []
    for ex in examples:
        ids = torch.tensor([tokenizer(prompt_of(ex))["input_ids"][:max_prompt]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        scores.append(scorer.score(ex.response, text)["rougeL"].fmeasure)
    return float(np.mean(scores)) if scores else float("nan")
