"""Applying a :class:`LoraAdapter` to base weights: merged in place, or unmerged in a forward.

On CPU the merge is one GEMM per module with inner dimension Σr (torch ``addmm_`` into the
weight, in row chunks with an fp32 copy of the chunk for bf16 / fp16 weights); on CUDA it is the
Triton kernel: every client's factors are stacked once (Σr x (in + out), never a copy of the
weight), then one launch reads and writes the weight once. fp32 weights get fp32 factors and
IEEE fp32 products; bf16 / fp16 weights with bf16 / fp16 factors use the tensor cores. The
kernel takes the ranks at run time: it compiles once per dtype, whatever the clients' ranks.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping

import torch

from ..tensors import FP32_MAX, max_abs
from .adapter import LoraAdapter, LoraError

CHUNK_BYTES = 64 << 20  # fp32 scratch for one chunk of a low-precision weight
_scratch = threading.local()


def merge_into(base, adapter: LoraAdapter, *, backend: str | None = None) -> None:
    """Add ``adapter``'s update into the weights of ``base`` in place.

    ``base`` is a ``torch.nn.Module`` (a transformers model; a PEFT model's base model is used)
    or a state dict mapping ``"<module>.weight"`` to tensors. ``backend`` is ``"torch"`` or
    ``"triton"``; by default CUDA weights use Triton and CPU weights torch. Every module is checked
    before any weight changes: present, shape, dtype, device, the factors finite (adapters alias
    their callers' tensors, which may have changed since), and the merged weight finite wherever
    it was (a huge update, or one that overflows a bf16 / fp16 weight). Raises :class:`LoraError`
    otherwise, with nothing merged.
    """
    weights = _base_weights(base, adapter)
    merge = _merge_triton if _use_triton(backend, adapter.device) else _merge_torch
    with torch.no_grad():
        for name, weight in weights.items():
            if not _cannot_overflow(weight, adapter, name):
                _refuse_overflow(merge, weight, adapter, name)
        for name, weight in weights.items():
            merge(weight, adapter, name)


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


def _cannot_overflow(weight: torch.Tensor, adapter: LoraAdapter, name: str) -> bool:
    """Whether a bound proves ``W + ΔW`` finite for module ``name``: max|W| plus
    Σ_terms |coef|·r·max|A|·max|B| (with room for rounding) below the largest value of W's dtype
    (and of fp32, in which the update is computed). One transfer from the device. Raises
    :class:`LoraError` for NaN or Inf in the factors."""
    terms = adapter.terms[name]
    peaks = torch.stack([max_abs(x) for t in terms for x in (t.A, t.B)] + [max_abs(weight)]).cpu().tolist()
    if not all(math.isfinite(p) for p in peaks[:-1]):
        raise LoraError(f"module {name!r}: A or B holds NaN or Inf (changed since the adapter was built?); "
                        f"nothing was merged")
    rank = sum(t.rank for t in terms)
    bound = sum(abs(t.coef) * t.rank * a * b for t, a, b in zip(terms, peaks[0:-1:2], peaks[1:-1:2]))
    growth = math.exp((rank + 8) * 2.0**-23) * 1.01  # fp32 sums of rank terms; bf16 / fp16 factors round coefs
    return (peaks[-1] + bound * growth) * (1 + 2.0**-20) <= min(float(torch.finfo(weight.dtype).max), FP32_MAX)


def _refuse_overflow(merge, weight: torch.Tensor, adapter: LoraAdapter, name: str) -> None:
    """Raise :class:`LoraError` if ``merge`` would turn a finite element of ``weight`` non-finite:
    it merges into a copy of the weight (the same bits it would write), which is then discarded."""
    scratch = weight.clone()
    merge(scratch, adapter, name)
    if bool((torch.isfinite(weight) & ~torch.isfinite(scratch)).any()):
        raise LoraError(f"merging would write non-finite values (Inf or NaN) into module {name!r}'s {weight.dtype} "
                        f"weight: the update overflows it; nothing was merged")


def _merge_torch(weight: torch.Tensor, adapter: LoraAdapter, name: str) -> None:
    A, B = adapter.stacked(name, out=_workspace(adapter.rank(name) * sum(adapter.shape(name)), weight.device))
    # weight += lhs @ rhs, in the weight's own layout
    lhs, rhs = (A.T, B.T) if adapter.fan_in_fan_out else (B, A)
    if weight.dtype == torch.float32:
        weight.addmm_(lhs, rhs)
        return
    rows = max(1, CHUNK_BYTES // (4 * weight.shape[1]))
    for r0 in range(0, weight.shape[0], rows):
        block = weight[r0 : r0 + rows].float()
        block.addmm_(lhs[r0 : r0 + rows], rhs)
        weight[r0 : r0 + rows].copy_(block)


def _workspace(numel: int, device: torch.device) -> torch.Tensor:
    """A per-thread fp32 buffer for stacked factors, kept between merges: fresh multi-MB
    allocations fault in new pages every time, which cost more than the copy itself."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel or buf.device != device:
        buf = _scratch.buf = torch.empty(numel, dtype=torch.float32, device=device)
    return buf[:numel]


def _merge_triton(weight: torch.Tensor, adapter: LoraAdapter, name: str) -> None:
    from ..kernels import lora as kernels

    terms = [(t.A, t.B, t.coef) for t in adapter.terms[name]]
    if adapter.fan_in_fan_out:  # weight is (in, out): add (B @ A)^T = A^T @ B^T, row-major as stored
        terms = [(B.T, A.T, coef) for A, B, coef in terms]
    kernels.merge_(weight, terms)


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
    for name in adapter.modules:
        if isinstance(base, Mapping):
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
