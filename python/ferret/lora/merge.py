"""Applying a :class:`LoraAdapter` to base weights: merged in place, or unmerged in a forward.

On CPU the merge is one GEMM per module with inner dimension Σr (torch ``addmm_`` into the
weight, in row chunks with an fp32 copy of the chunk for bf16 / fp16 weights); on CUDA it is the
Triton kernel: every client's factors are stacked once (Σr x (in + out), never a copy of the
weight), then one launch reads and writes the weight once. fp32 weights get fp32 factors and
IEEE fp32 products; bf16 / fp16 weights with bf16 / fp16 factors use the tensor cores. The
kernel takes the ranks at run time: it compiles once per dtype, whatever the clients' ranks.

A merge of a whole model waits on the device once: every module's check (its stacked factors'
sum of squares, and the peak of a weight whose dtype needs it) is queued as it is stacked, all
are read back together, and then the merges are queued. Only modules this bound cannot clear (an
update near the range of the weight's dtype, or NaN / Inf) are merged into copies first, and
their verdicts are read back together: a second wait, on that rare path only.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from ..tensors import FP32_MAX
from .adapter import LoraAdapter, LoraError

CHUNK_BYTES = 64 << 20  # fp32 scratch for one chunk of a low-precision weight
KEEP_BYTES = 64 << 20  # stacked factors held from the check to the merge; later modules are stacked again
# Every finite value of these weight dtypes fits fp32, and rounding an fp32 value to them overflows
# no sooner than fp32 does: an update below SAFE_UPDATE cannot overflow them (see _cannot_overflow).
WIDE_RANGE = (torch.float32, torch.bfloat16)
SAFE_UPDATE = 2.0**102
_scratch = threading.local()


class _Path(NamedTuple):
    """One way to merge. ``stack(weight, adapter, name, out)`` stacks a module's factors and
    returns ``(lhs, rhs, flat)``: the factors, views of ``flat``, which holds exactly them (in
    ``out``, 1-d fp32 of Σr x (in + out) elements, if the path is ``pooled``; ``None``: a new
    buffer). ``merge(weight, lhs, rhs)`` adds the update they make into ``weight``."""

    stack: Callable
    merge: Callable
    pooled: bool


class _Module(NamedTuple):
    """One module to merge: its base weight and, if held since the check, its stacked factors."""

    name: str
    weight: torch.Tensor
    factors: tuple[torch.Tensor, torch.Tensor] | None


def merge_into(base, adapter: LoraAdapter, *, backend: str | None = None) -> None:
    """Add ``adapter``'s update into the weights of ``base`` in place.

    ``base`` is a ``torch.nn.Module`` (a transformers model; a PEFT model's base model is used)
    or a state dict mapping ``"<module>.weight"`` to tensors. ``backend`` is ``"torch"`` or
    ``"triton"``; by default CUDA weights use Triton and CPU weights torch. Every module is checked
    before any weight changes: present, shape, dtype, device, the factors finite (adapters alias
    their callers' tensors, which may have changed since), and the merged weight finite wherever
    it was (a huge update, or one that overflows a bf16 / fp16 weight). Raises :class:`LoraError`
    otherwise, with nothing merged. Waits on the device once for the whole model (twice where an
    update comes near the range of a weight's dtype).
    """
    weights = _base_weights(base, adapter)
    path = _TRITON if _use_triton(backend, adapter.device) else _TORCH
    with torch.no_grad():
        modules, checks, spare = _stack_all(path, weights, adapter)
        _refuse_unsafe(path, modules, checks, adapter, spare)
        for m in modules:
            path.merge(m.weight, *(m.factors or path.stack(m.weight, adapter, m.name, spare)[:2]))


def forward(x: torch.Tensor, weight: torch.Tensor, adapter: LoraAdapter, name: str, *,
            backend: str | None = None) -> torch.Tensor:
    """``x @ W^T + x @ ΔW^T`` for module ``name`` without merging: ``weight`` is that module's base
    weight ((out, in), or (in, out) with ``fan_in_fan_out``), ``x`` is (..., in_features).

    Returns a tensor of shape (..., out_features) in x's dtype. On CUDA (or with
    ``backend="triton"``) one fused kernel computes both products in one pass over x.
    """
    _check_weight(name, weight, adapter)
    A, B = adapter.stacked(name)
    w = weight.T if adapter.fan_in_fan_out else weight  # (out, in) view
    flat = x.reshape(-1, x.shape[-1])
    if _use_triton(backend, x.device):
        from ..kernels import lora as kernels

        y = kernels.stacked_linear(flat.contiguous(), w, A.contiguous(), B.contiguous())
    else:
        y = (torch.nn.functional.linear(flat.float(), w.float()) + (flat.float() @ A.T) @ B.T).to(x.dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])


def _stack_all(path: _Path, weights: dict[str, torch.Tensor], adapter: LoraAdapter):
    """Stack every module's factors and queue its checks (:func:`_checks_of`). Factors are held
    (``_Module.factors``) while they fit in :data:`KEEP_BYTES`; the others pass through
    ``spare``, one module's room (``None`` if not needed or the path is not pooled), and are
    stacked again to merge. Returns the modules, each module's check tensors, and ``spare``."""
    sizes = [adapter.rank(name) * sum(adapter.shape(name)) for name in weights]
    held, kept, spare_numel = _held(sizes)
    buf = _workspace(kept + spare_numel, adapter.device) if path.pooled else None
    spare = buf[kept : kept + spare_numel] if buf is not None and spare_numel else None
    modules, checks, offset = [], [], 0
    for (name, weight), numel, hold in zip(weights.items(), sizes, held):
        out = spare if not hold else None if buf is None else buf[offset : offset + numel]
        offset += numel if hold else 0
        lhs, rhs, flat = path.stack(weight, adapter, name, out)
        checks.append(_checks_of(flat, weight))  # queued before the next module overwrites spare
        modules.append(_Module(name, weight, (lhs, rhs) if hold else None))
    return modules, checks, spare


def _held(sizes: list[int]) -> tuple[list[bool], int, int]:
    """Which modules' factors (``sizes``: elements each) are held until the merge: the first,
    then each that still fits in :data:`KEEP_BYTES` (counting 4 bytes each) with those before.
    Returns those flags, the elements held, and the largest module not held (0 if none)."""
    if sum(sizes) <= KEEP_BYTES // 4:
        return [True] * len(sizes), sum(sizes), 0
    held, total, spare = [], 0, 0
    for numel in sizes:
        held.append(not held or total + numel <= KEEP_BYTES // 4)
        total += numel if held[-1] else 0
        spare = spare if held[-1] else max(spare, numel)
    return held, total, spare


def _checks_of(flat: torch.Tensor, weight: torch.Tensor) -> list[torch.Tensor]:
    """The 0-d tensors on the device that bound one merge: the sum of squares of its stacked
    factors ``flat`` in fp32, then, unless the weight's dtype is in :data:`WIDE_RANGE`, the
    weight's min and max (zeros if it is empty)."""
    if flat.dtype == torch.float32:
        checks = [torch.dot(flat, flat)]
    else:
        checks = [torch.linalg.vector_norm(flat, dtype=torch.float32).square()]
    if weight.dtype in WIDE_RANGE:
        return checks
    return checks + (list(torch.aminmax(weight)) if weight.numel() else [checks[0].new_zeros(())] * 2)


def _refuse_unsafe(path: _Path, modules: list[_Module], checks: list[list[torch.Tensor]],
                   adapter: LoraAdapter, spare) -> None:
    """Raise :class:`LoraError` unless every module's merge is proven finite by its ``checks``
    (read from the device once for all modules) or, where they cannot prove it, by
    :func:`_refuse_suspects`."""
    values = iter(_read([x for c in checks for x in c]))
    suspects = []
    for m, c in zip(modules, checks):
        sum_squares, *weight = [next(values) for _ in c]
        rank, shape = adapter.rank(m.name), adapter.shape(m.name)
        if not _cannot_overflow(m.weight.dtype, rank, sum_squares, rank * sum(shape), *weight):
            suspects.append(m)  # also NaN or Inf in the factors or the weight
    if suspects:
        _refuse_suspects(path, suspects, adapter, spare)


def _cannot_overflow(dtype: torch.dtype, rank: int, sum_squares: float, numel: int,
                     lo: float | None = None, hi: float | None = None) -> bool:
    """Whether a bound proves a merge finite wherever the weight was, from the fp32 sum of
    squares of the ``numel`` elements of its stacked factors ``lhs`` and ``rhs`` (coefficients
    folded in) and, for weight dtypes outside :data:`WIDE_RANGE`, the weight's min and max. False
    for NaN or Inf anywhere.

    No element of the update exceeds ``|lhs| |rhs| <= (|lhs|^2 + |rhs|^2) / 2`` (Frobenius norms;
    Cauchy-Schwarz, then the AM-GM inequality), with room for the rounding of fp32 sums of
    ``rank`` terms. The fp32 sum of n non-negative squares is at least the exact one times
    (1 - 2^-24)^(n + 1), less n·2^-126 for squares that flush to zero.

    fp32 and bf16 weights need no peak: a partial sum of the update below :data:`SAFE_UPDATE`
    (2^102) added to an element of magnitude 2^127 or more rounds back to it (half an fp32 ulp
    there is 2^103), and added to a smaller one cannot round past 2^127, so no finite element
    grows past the larger of its own magnitude and 2^127, which both dtypes hold. Other dtypes
    need max|W| plus the update below the largest value of the dtype (and of fp32, the merge's).
    """
    squares = sum_squares * math.exp((numel + 4) * 2.0**-23) + numel * 2.0**-126
    update = squares / 2 * math.exp((rank + 8) * 2.0**-23) * 1.01 * (1 + 2.0**-20)
    if lo is None:
        return update <= SAFE_UPDATE
    peak = math.nan if math.isnan(lo + hi) else max(-lo, hi)
    return (peak + update) * (1 + 2.0**-20) <= min(float(torch.finfo(dtype).max), FP32_MAX)


def _refuse_suspects(path: _Path, suspects: list[_Module], adapter: LoraAdapter, spare) -> None:
    """For the modules whose bound failed, queue whether the adapter's factors are finite and
    whether their merge into a copy of the weight (the same bits it would write, then discarded)
    turns a finite element non-finite; read all of it back once. Raises :class:`LoraError` for
    the first of ``suspects`` that fails either."""
    flags = []
    for m in suspects:
        finite = torch.stack([torch.isfinite(x).all() for t in adapter.terms[m.name] for x in (t.A, t.B)]).all()
        scratch = m.weight.clone()
        path.merge(scratch, *(m.factors or path.stack(m.weight, adapter, m.name, spare)[:2]))
        flags += [finite, (torch.isfinite(m.weight) & ~torch.isfinite(scratch)).any()]
    verdicts = _read(flags)
    for m, finite, overflows in zip(suspects, verdicts[::2], verdicts[1::2]):
        if not finite:
            raise LoraError(f"module {m.name!r}: A or B holds NaN or Inf (changed since the adapter was built?); "
                            f"nothing was merged")
        if overflows:
            raise LoraError(f"merging would write non-finite values (Inf or NaN) into module {m.name!r}'s "
                            f"{m.weight.dtype} weight: the update overflows it; nothing was merged")


def _read(tensors: list[torch.Tensor]) -> list:
    """The values of 0-d tensors as Python numbers: one transfer from their device, one wait."""
    return [tensors[0].item()] if len(tensors) == 1 else torch.stack(tensors).tolist()


def _stack_torch(weight: torch.Tensor, adapter: LoraAdapter, name: str, out: torch.Tensor | None):
    flat = out if out is not None else torch.empty(adapter.rank(name) * sum(adapter.shape(name)),
                                                   dtype=torch.float32, device=weight.device)
    A, B = adapter.stacked(name, out=flat)
    lhs, rhs = (A.T, B.T) if adapter.fan_in_fan_out else (B, A)  # weight += lhs @ rhs in its own layout
    return lhs, rhs, flat


def _merge_torch(weight: torch.Tensor, lhs: torch.Tensor, rhs: torch.Tensor) -> None:
    if weight.dtype == torch.float32:
        weight.addmm_(lhs, rhs)
        return
    rows = max(1, CHUNK_BYTES // (4 * weight.shape[1]))
    for r0 in range(0, weight.shape[0], rows):
        block = weight[r0 : r0 + rows].float()
        block.addmm_(lhs[r0 : r0 + rows], rhs)
        weight[r0 : r0 + rows].copy_(block)


def _workspace(numel: int, device: torch.device) -> torch.Tensor:
    """A 1-d fp32 buffer of at least ``numel`` elements for stacked factors. On the CPU a
    per-thread one kept between merges: fresh multi-MB allocations fault in new pages every time,
    which cost more than the copy itself. Elsewhere a fresh one from the caching allocator."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=torch.float32, device=device)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _scratch.buf = torch.empty(numel, dtype=torch.float32)
    return buf


def _stack_triton(weight: torch.Tensor, adapter: LoraAdapter, name: str, out: None):
    from ..kernels import lora as kernels

    terms = [(t.A, t.B, t.coef) for t in adapter.terms[name]]
    if adapter.fan_in_fan_out:  # weight is (in, out): add (B @ A)^T = A^T @ B^T, row-major as stored
        terms = [(B.T, A.T, coef) for A, B, coef in terms]
    flat = torch.empty(adapter.rank(name) * sum(adapter.shape(name)), device=weight.device,
                       dtype=kernels.factor_dtype(weight, adapter.dtype))
    Bt, A = kernels.stack_rank_major(terms, flat.dtype, out=flat)
    return Bt, A, flat


def _merge_triton(weight: torch.Tensor, Bt: torch.Tensor, A: torch.Tensor) -> None:
    from ..kernels import lora as kernels

    kernels.merge_stacked_(weight, Bt, A)


_TORCH = _Path(_stack_torch, _merge_torch, pooled=True)
_TRITON = _Path(_stack_triton, _merge_triton, pooled=False)  # the caching allocator pools on CUDA


def _use_triton(backend: str | None, device: torch.device) -> bool:
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"unknown backend {backend!r}: use 'torch' or 'triton'")
    if backend is None:
        return device.type == "cuda"
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as err:
            raise RuntimeError("the Triton LoRA kernels need the [gpu] extra: pip install 'ferret-fl[gpu]'") from err
    return backend == "triton"


def _base_weights(base, adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """The base weight of every module the adapter touches, each checked to fit."""
    if not isinstance(adapter, LoraAdapter):
        raise TypeError(f"expected a LoraAdapter, got {type(adapter).__name__}")
    if isinstance(base, torch.nn.Module) and hasattr(base, "get_base_model"):
        base = base.get_base_model()  # a PeftModel: its modules, where `.weight` is the base layer's
    weights = {}
    for name in adapter.terms:
        if isinstance(base, (dict, Mapping)):  # dict first: the ABC check costs more
            weight = base.get(f"{name}.weight")
        elif isinstance(base, torch.nn.Module):
            try:
                weight = getattr(base.get_submodule(name), "weight", None)
            except AttributeError:
                weight = None
        else:
            raise TypeError(f"base must be a torch.nn.Module or a state dict, got {type(base).__name__}")
        if weight is None:
            raise LoraError(f"the base model has no weight for module {name!r}")
        _check_weight(name, weight, adapter)
        weights[name] = weight
    return weights


def _check_weight(name: str, weight: torch.Tensor, adapter: LoraAdapter) -> None:
    out_features, in_features = adapter.shape(name)
    want = (in_features, out_features) if adapter.fan_in_fan_out else (out_features, in_features)
    if tuple(weight.shape) != want:
        layout = " (fan_in_fan_out: stored as in x out)" if adapter.fan_in_fan_out else ""
        raise LoraError(f"module {name!r}: the adapter makes a {out_features}x{in_features} update but the "
                        f"base weight is {'x'.join(map(str, weight.shape))}{layout}")
    if not weight.is_floating_point():
        raise LoraError(f"module {name!r}: the base weight is {weight.dtype}, not floating point")
    if weight.device != adapter.device:
        raise LoraError(f"module {name!r}: the base weight is on {weight.device} but the adapter on {adapter.device}")
