"""Server-side aggregation of client LoRA adapters: FLoRA's stacking and the two baselines.

All three take the participating clients' adapters (any subset of the federation) and their
weights (example counts, or ``None`` for equal weights; normalised to p_i = w_i / Σw) and return
a :class:`LoraAdapter`:

* :func:`stack` (FLoRA): every client's term kept side by side with coefficient p_i·s_i, so
  B_stack @ A_stack = Σ_i p_i s_i B_i A_i exactly, for any ranks.
* :func:`fedit` (FedIT): A = Σ p_i A_i and B = Σ p_i s_i B_i, for equal ranks. The product of
  averages is not the average of products: this is the noise FLoRA removes.
* :func:`zero_pad`: each client's A and B padded with zeros to the largest rank, then averaged as
  FedIT does; equal to :func:`fedit` when the ranks are equal.

The averaging baselines fold each client's scaling s_i into its B before averaging, so clients
with different ``lora_alpha`` still combine into one adapter with unit scaling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import allocation
from .adapter import LoraAdapter, LoraError, LoraTerm


def client_weights(weights: Sequence[float] | None, n_clients: int) -> list[float]:
    """Normalise ``weights`` (``None``: equal) to non-negative floats summing to 1, without
    overflow (the rule of :func:`ferret.allocation.client_weights`).

    Raises :class:`LoraError` for no clients, a count that differs from ``n_clients``, weights
    that are not real numbers (bools and strings included), negative or non-finite weights, and
    weights that do not sum to a positive number.
    """
    if n_clients == 0:
        raise LoraError("no client adapters to aggregate")
    if weights is None:
        return [1.0 / n_clients] * n_clients
    try:
        weights = list(weights)
        exact = _exact_weights(weights, n_clients)
        return exact if exact is not None else allocation.client_weights(weights, n_clients).tolist()
    except (TypeError, ValueError) as err:
        raise LoraError(f"client weights: {err}") from None


def _exact_weights(weights: list, n_clients: int) -> list[float] | None:
    """The normalised weights without numpy for the usual example counts: ``n_clients``
    non-negative ints whose sum is below 2^53 and positive, or ``None`` for anything else. Their
    float64 sum is then exact in any order, so ``w / sum`` is what numpy's division gives."""
    if len(weights) != n_clients or not all(type(w) is int for w in weights):
        return None
    total = sum(weights)
    if not 0 < total < 2**53 or min(weights) < 0:
        return None
    return [w / total for w in weights]


def stack(adapters: Sequence[LoraAdapter], weights: Sequence[float] | None = None) -> LoraAdapter:
    """FLoRA: the clients' adapters stacked into one of rank Σr_i whose update is Σ p_i s_i B_i A_i.

    Nothing is copied: the result refers to each client's A_i and B_i.
    """
    p = client_weights(weights, len(adapters))
    _check_compatible(adapters)
    first = adapters[0]
    return LoraAdapter._trusted(
        {name: tuple(LoraTerm(t.A, t.B, p_i * t.coef) for p_i, a in zip(p, adapters) for t in a.terms[name])
         for name in first.terms},
        first.fan_in_fan_out, first.dtype, first.device)


def fedit(adapters: Sequence[LoraAdapter], weights: Sequence[float] | None = None) -> LoraAdapter:
    """FedIT: the weighted average of the clients' A and of their (scaled) B; ranks must be equal."""
    _check_compatible(adapters)
    for name in adapters[0].modules:
        ranks = [a.rank(name) for a in adapters]
        if len(set(ranks)) > 1:
            raise LoraError(f"FedIT averages adapters of equal rank; module {name!r} has ranks {ranks} "
                            f"(use zero_pad or stack for heterogeneous ranks)")
    return zero_pad(adapters, weights)


def zero_pad(adapters: Sequence[LoraAdapter], weights: Sequence[float] | None = None) -> LoraAdapter:
    """Zero-padding: each client's A and B padded to the largest rank, then averaged as FedIT does."""
    p = client_weights(weights, len(adapters))
    _check_compatible(adapters)
    averaged = {}
    for name in adapters[0].modules:
        r_max = max(a.rank(name) for a in adapters)
        out_features, in_features = adapters[0].shape(name)
        A = torch.zeros(r_max, in_features, dtype=torch.float32, device=adapters[0].device)
        B = torch.zeros(out_features, r_max, dtype=torch.float32, device=adapters[0].device)
        for p_i, adapter in zip(p, adapters):
            A_i, B_i = _single_term(adapter, name)
            A[: A_i.shape[0]] += p_i * A_i.float()
            B[:, : B_i.shape[1]] += p_i * adapter.terms[name][0].coef * B_i.float()
        averaged[name] = [LoraTerm(A, B, 1.0)]
    return LoraAdapter(averaged, fan_in_fan_out=adapters[0].fan_in_fan_out)


def _single_term(adapter: LoraAdapter, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    terms = adapter.terms[name]
    if len(terms) != 1:
        raise LoraError(f"module {name!r}: averaging takes one client adapter per term, got a stack of {len(terms)}")
    return terms[0].A, terms[0].B


def _check_compatible(adapters: Sequence[LoraAdapter]) -> None:
    """Same modules, update shapes, dtype, device and weight layout in every client's adapter."""
    if not adapters:
        raise LoraError("no client adapters to aggregate")
    for i, a in enumerate(adapters):
        if not isinstance(a, LoraAdapter):
            raise TypeError(f"client {i}: expected a LoraAdapter (see ferret.lora.from_peft), got {type(a).__name__}")
    first = adapters[0]
    names = first.terms.keys()
    shapes = [first.shape(name) for name in names]
    for i, a in enumerate(adapters[1:], start=1):
        if a.terms.keys() != names:
            missing = sorted(names - a.terms.keys())
            extra = sorted(a.terms.keys() - names)
            raise LoraError(f"client {i} adapts different modules than client 0: "
                            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                            f"extra {extra[:3]}{'...' if len(extra) > 3 else ''}")
        for name, shape in zip(names, shapes):
            if a.shape(name) != shape:
                raise LoraError(f"module {name!r}: client {i}'s update is {a.shape(name)}, client 0's {shape}")
        if a.dtype != first.dtype:
            raise LoraError(f"mixed dtypes: client 0's adapter is {first.dtype}, client {i}'s {a.dtype}")
        if a.device != first.device:
            raise LoraError(f"client 0's adapter is on {first.device}, client {i}'s on {a.device}")
        if a.fan_in_fan_out != first.fan_in_fan_out:
            raise LoraError(f"client 0 and client {i} disagree on fan_in_fan_out")
