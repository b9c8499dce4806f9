"""A LoRA update as ferret holds it: per base module, a sum of low-rank terms ``coef · B @ A``.

One client's PEFT adapter is one term per module (``coef`` = its scaling α/r or α/√r). FLoRA's
stack keeps every client's term side by side; FedIT and zero-padding produce one averaged term.
The same object is merged into base weights, turned back into a PEFT adapter, or applied
unmerged, whatever produced it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import NamedTuple

import numpy as np
import torch

from ..tensors import FP32_MAX


class LoraError(ValueError):
    """A LoRA adapter, or a set of them, that ferret cannot aggregate or merge as given."""


@dataclass(frozen=True)
class LoraTerm:
    """``coef · B @ A`` for one module: ``A`` is (rank, in_features), ``B`` (out_features, rank)."""

    A: torch.Tensor
    B: torch.Tensor
    coef: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


class LoraAdapter:
    """LoRA updates for a set of modules of one base model.

    ``terms`` maps a module name of the base model (``"model.layers.0.self_attn.q_proj"``) to its
    terms. Each module's update has the shape (out_features, in_features) of a ``torch.nn.Linear``
    weight; with ``fan_in_fan_out`` (GPT-2's ``Conv1D``) the base weight stores its transpose.
    Tensors are kept as given (detached, not copied: an adapter aliases its caller's tensors, so
    :func:`~ferret.lora.merge_into` checks their values again before it writes). Raises
    :class:`LoraError` for terms whose A and B ranks disagree, for shapes that differ between
    terms of one module, for more than one dtype or device, for NaN or Inf anywhere, and for a
    scaling ``coef`` that is not a real number (bools and strings included) or not finite in float32.
    """

    def __init__(self, terms: Mapping[str, Sequence[LoraTerm]], *, fan_in_fan_out: bool = False):
        if not terms:
            raise LoraError("a LoRA adapter needs at least one module")
        self.terms: dict[str, tuple[LoraTerm, ...]] = {}
        self._layouts: dict[str, _Layout] = {}
        for name, module_terms in terms.items():
            module_terms = tuple(module_terms)
            if not module_terms:
                raise LoraError(f"module {name!r} has no LoRA terms")
            self.terms[name] = tuple(_checked(name, t) for t in module_terms)
            shapes = {self.shape(name, i) for i in range(len(module_terms))}
            if len(shapes) > 1:
                raise LoraError(f"module {name!r}: terms disagree on the update's shape: {sorted(shapes)}")
        dtypes = {t.A.dtype for ts in self.terms.values() for t in ts}
        if len(dtypes) > 1:
            raise LoraError(f"mixed dtypes in one adapter: {sorted(map(str, dtypes))}")
        devices = {t.A.device for ts in self.terms.values() for t in ts}
        if len(devices) > 1:
            raise LoraError(f"one adapter's tensors lie on several devices: {sorted(map(str, devices))}")
        self.fan_in_fan_out = bool(fan_in_fan_out)
        (self._dtype,), (self._device,) = dtypes, devices  # a tensor's dtype and device never change

    @classmethod
    def _trusted(cls, terms: dict[str, tuple[LoraTerm, ...]], fan_in_fan_out: bool, dtype: torch.dtype,
                 device: torch.device) -> LoraAdapter:
        """An adapter of ``terms`` that are known good (taken from checked adapters whose modules,
        shapes, dtype and device agree), without checking them again: the finiteness scans cost
        as much as a merge."""
        adapter = cls.__new__(cls)
        adapter.terms, adapter._layouts = terms, {}
        adapter.fan_in_fan_out, adapter._dtype, adapter._device = fan_in_fan_out, dtype, device
        return adapter

    @property
    def modules(self) -> list[str]:
        """The module names, in insertion order."""
        return list(self.terms)

    def shape(self, name: str, term: int = 0) -> tuple[int, int]:
        """(out_features, in_features) of module ``name``'s update."""
        if term == 0:
            return self._layout(name).shape
        t = self.terms[name][term]
        return (t.B.shape[0], t.A.shape[1])

    def rank(self, name: str) -> int:
        """The total rank of module ``name``: the sum of its terms' ranks."""
        return self._layout(name).rank

    def _layout(self, name: str) -> _Layout:
        """Module ``name``'s shape, rank and coefficients, kept while ``terms[name]`` is the same
        tuple: a merge asks for them several times per module."""
        terms = self.terms[name]
        layout = self._layouts.get(name)
        if layout is None or layout.terms is not terms:
            layout = self._layouts[name] = _Layout(
                terms, (terms[0].B.shape[0], terms[0].A.shape[1]), sum(t.rank for t in terms),
                tuple((t.rank, t.coef) for t in terms))
        return layout

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def stacked(self, name: str, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Module ``name`` as one adapter of rank Σr with unit scaling: ``(A, B)`` in fp32 with
        ``B @ A`` equal to the update; each term's coefficient is folded into its rows of A.

        ``out``, a contiguous 1-d fp32 tensor of at least ``Σr · (in_features + out_features)``
        elements on the adapter's device, holds the result (views of its first elements, A then
        B) instead of new tensors; raises ``ValueError`` for another ``out``.
        """
        terms, (out_features, in_features), rank, ranks_coefs = self._layout(name)
        if out is None:
            out = torch.empty(rank * (in_features + out_features), dtype=torch.float32, device=self._device)
        elif out.numel() < rank * (in_features + out_features) or out.dim() != 1 or out.stride(0) != 1 \
                or out.dtype != torch.float32:
            raise ValueError(f"out must be a contiguous 1-d fp32 tensor of {rank * (in_features + out_features)} "
                             f"elements or more, got {tuple(out.shape)}")
        start = out.storage_offset()
        A = out.as_strided((rank, in_features), (in_features, 1), start)
        B = out.as_strided((out_features, rank), (rank, 1), start + rank * in_features)
        torch.cat([t.A for t in terms], out=A)
        A.mul_(_row_scales(ranks_coefs, self._device))
        torch.cat([t.B for t in terms], dim=1, out=B)
        return A, B

    def delta(self, name: str) -> torch.Tensor:
        """Module ``name``'s update as a dense fp32 (out_features, in_features) matrix."""
        A, B = self.stacked(name)
        return B @ A

    def __repr__(self) -> str:
        ranks = sorted({self.rank(n) for n in self.terms})
        return f"LoraAdapter({len(self.terms)} modules, rank {ranks if len(ranks) > 1 else ranks[0]})"


class _Layout(NamedTuple):
    terms: tuple[LoraTerm, ...]
    shape: tuple[int, int]  # (out_features, in_features)
    rank: int
    ranks_coefs: tuple[tuple[int, float], ...]


@functools.lru_cache(maxsize=64)
def _row_scales(ranks_coefs: tuple, device: torch.device) -> torch.Tensor:
    """Each term's coefficient repeated over its rank, as an fp32 column (Σr x 1) on ``device``.
    Cached: every module of an adapter usually has the same clients' ranks and coefficients, and
    building the tensor costs more than scaling the rows. Pinned and non-blocking on CUDA, where a
    plain host-to-device copy would wait for the queued work. Callers must not write into it."""
    scales = torch.tensor([[c] for r, c in ranks_coefs for _ in range(r)], dtype=torch.float32,
                          pin_memory=device.type == "cuda")
    return scales.to(device, non_blocking=True)


def _checked(name: str, term: LoraTerm) -> LoraTerm:
    A, B = term.A, term.B
    if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)):
        raise LoraError(f"module {name!r}: A and B must be tensors")
    if A.dim() != 2 or B.dim() != 2:
        raise LoraError(f"module {name!r}: A and B must be 2-d, got shapes {tuple(A.shape)} and {tuple(B.shape)}")
    if A.shape[0] != B.shape[1]:
        raise LoraError(
            f"module {name!r}: rank mismatch, A is {tuple(A.shape)} (rank {A.shape[0]}) but B is "
            f"{tuple(B.shape)} (rank {B.shape[1]})"
        )
    if A.dtype != B.dtype:
        raise LoraError(f"module {name!r}: A is {A.dtype} but B is {B.dtype}")
    if not A.is_floating_point():
        raise LoraError(f"module {name!r}: LoRA weights must be floating point, got {A.dtype}")
    if A.device != B.device:
        raise LoraError(f"module {name!r}: A is on {A.device} but B on {B.device}")
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise LoraError(f"module {name!r}: A or B holds NaN or Inf")
    return LoraTerm(A.detach(), B.detach(), _checked_coef(name, term.coef))


def _checked_coef(name: str, coef) -> float:
    if isinstance(coef, (bool, np.bool_)) or not isinstance(coef, Real):
        raise LoraError(f"module {name!r}: the scaling must be a real number, got {coef!r}")
    coef = float(coef)
    if not math.isfinite(coef):
        raise LoraError(f"module {name!r}: the scaling {coef} is not finite")
    if abs(coef) > FP32_MAX:
        raise LoraError(f"module {name!r}: the scaling {coef} does not fit float32, in which the factors are merged")
    return coef
