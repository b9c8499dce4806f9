"""Fused LoRA stack-matmul kernels.

* ``merge_``: ``W += sum_i c_i * B_i @ A_i`` over adapters of different ranks in one launch.
  The terms are first stacked rank-major into ``Bt`` (R x M) and ``A`` (R x N), R = sum r_i, with
  each ``c_i`` folded into its rows of ``A``: a copy of the factors only, never of ``W``. The kernel
  then computes ``W += Bt^T @ A``; R is a runtime value walked in chunks of ``BLOCK_R`` (masked),
  so it compiles once per weight dtype, factor dtype and tile, never per tuple of client ranks.
* ``stacked_linear``: ``y = x @ W^T + (x @ A^T) @ B^T`` for one stacked adapter (A: R x K,
  B: N x R), one pass over ``x``: the low-rank product ``x @ A^T`` is accumulated in the same
  loop over K as the dense one.

``W`` may be any 2-d strided view (a transposed view covers ``fan_in_fan_out`` weights); it is
read and written once, in its own dtype, with fp32 accumulation. The kernels know nothing of
PEFT or federated learning.
"""

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N = 64, 64  # stacked_linear's output tile


class MergeTile(NamedTuple):
    """One fixed launch configuration of the merge kernel (no autotuning: it compiles once)."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_R: int
    num_warps: int
    num_stages: int
    precision: str  # tl.dot's input_precision for these factors


# Per factor dtype. fp32 factors take IEEE fp32 products (CUDA-core FMAs), so a merge matches the
# torch path to fp32 rounding; 16-bit factors go to the tensor cores (one warpgroup's wgmma on
# Hopper). Measured on an H200, W 4096x4096, Σr = 152: 64x64 tiles were the fastest or within 1 %
# of it for both (fp32 0.80x, bf16 0.94x one torch.addmm); 128x128 tiles were 5-20 % slower, and
# small tiles keep the grid full on small layers (576x576: 81 programs for 132 SMs).
MERGE_TILES = {
    torch.float32: MergeTile(64, 64, 16, 4, 3, "ieee"),
    torch.bfloat16: MergeTile(64, 64, 32, 4, 3, "tf32"),
    torch.float16: MergeTile(64, 64, 32, 4, 3, "tf32"),
}
LOW_PRECISION = (torch.bfloat16, torch.float16)


@triton.jit(do_not_specialize=["R"])
def _merge_kernel(w_ptr, bt_ptr, a_ptr, M, N, R, stride_wm, stride_wn, stride_bt, stride_a,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    # R is the one rank-dependent argument: left unspecialized (R == 1, R % 16) so every
    # composition of client ranks reuses one compiled kernel. Bt's and A's row strides are M and N.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        b = tl.load(bt_ptr + r[None, :] * stride_bt + rows[:, None],
                    mask=(r[None, :] < R) & (rows[:, None] < M), other=0.0)
        a = tl.load(a_ptr + r[:, None] * stride_a + cols[None, :],
                    mask=(r[:, None] < R) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(b, a, acc, input_precision=PRECISION)
    # 64-bit offsets: W may hold more than 2^31 elements (a vocabulary-sized lm_head)
    w = w_ptr + rows[:, None].to(tl.int64) * stride_wm + cols[None, :].to(tl.int64) * stride_wn
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(w, (tl.load(w, mask=inside).to(tl.float32) + acc).to(w_ptr.dtype.element_ty), mask=inside)


def factor_dtype(weight: torch.Tensor, terms_dtype: torch.dtype) -> torch.dtype:
    """The dtype ``merge_`` stacks the factors in for ``weight``: 16-bit factors stay 16-bit
    (tensor cores) when the weight is a 16-bit CUDA tensor, whose own rounding then dominates;
    anything else is stacked in fp32. Off CUDA the kernel runs in Triton's interpreter, which
    multiplies bf16 operands as their integer bit patterns."""
    if weight.is_cuda and weight.dtype in LOW_PRECISION and terms_dtype in LOW_PRECISION:
        return terms_dtype
    return torch.float32


def stack_rank_major(terms, dtype: torch.dtype, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``terms`` (``(A, B, c)`` with A: r x N, B: M x r, any strides) into one adapter of
    rank R = sum r: returns ``(Bt, A)``, contiguous R x M and R x N in ``dtype``, with
    ``Bt^T @ A == sum c * B @ A`` (each c folded into its rows of A, one rounding in ``dtype``).
    ``out``, a contiguous 1-d tensor of ``dtype`` and R * (M + N) elements, holds them (Bt first,
    then A) instead of a new buffer."""
    ranks = [a.shape[0] for a, _, _ in terms]
    M, N = terms[0][1].shape[0], terms[0][0].shape[1]
    R = sum(ranks)
    device = terms[0][0].device
    buf = torch.empty(R * (M + N), dtype=dtype, device=device) if out is None else out
    Bt, A = buf[: R * M].view(R, M), buf[R * M : R * (M + N)].view(R, N)
    torch.cat([b.T for _, b, _ in terms], out=Bt)
    torch.cat([a for a, _, _ in terms], out=A)
    A.mul_(_row_scales(terms, device)[:, None])
    return Bt, A


def _row_scales(terms, device: torch.device) -> torch.Tensor:
    return _row_scales_of(tuple((a.shape[0], float(c)) for a, _, c in terms), device)


@functools.lru_cache(maxsize=64)
def _row_scales_of(ranks_coefs: tuple, device: torch.device) -> torch.Tensor:
    # Cached: every module of one merge usually has the same clients, so the same ranks and
    # coefficients, and building the tensor costs more than the stacking copies. Pinned and
    # non-blocking: a plain host-to-device copy would wait for the GPU's queued work.
    scales = torch.tensor([c for r, c in ranks_coefs for _ in range(r)], dtype=torch.float32,
                          pin_memory=device.type == "cuda")
    return scales.to(device, non_blocking=True)


def merge_(weight: torch.Tensor, terms) -> None:
    """Add ``sum c * B @ A`` over ``terms`` (``(A, B, c)`` with A: r x N, B: M x r, any strides,
    one dtype) into the 2-d ``weight`` (M x N, any strides) in place: one stacking copy of the
    factors (:func:`stack_rank_major`, in :func:`factor_dtype`), then one launch. Raises what
    :func:`merge_stacked_` raises; terms of disagreeing shapes fail in ``torch.cat``."""
    if not terms:
        return
    Bt, A = stack_rank_major(terms, factor_dtype(weight, terms[0][0].dtype))
    merge_stacked_(weight, Bt, A)


def merge_stacked_(weight: torch.Tensor, Bt: torch.Tensor, A: torch.Tensor) -> None:
    """``weight += Bt^T @ A`` in place for 2-d ``weight`` (M x N, any strides) and rank-major
    factors ``Bt`` (R x M) and ``A`` (R x N) of one dtype with contiguous rows. The tile is fixed
    by the factors' dtype (:data:`MERGE_TILES`). Raises ``ValueError`` for shapes that disagree,
    ``TypeError`` for factor dtypes other than fp32, bf16 and fp16."""
    M, N = weight.shape
    R = A.shape[0]
    if Bt.shape != (R, M) or A.shape != (R, N):
        raise ValueError(f"weight {M}x{N} += Bt^T @ A needs Bt {R}x{M} and A {R}x{N}, "
                         f"got {tuple(Bt.shape)} and {tuple(A.shape)}")
    if Bt.dtype != A.dtype or A.dtype not in MERGE_TILES:
        raise TypeError(f"the factors must share one of {sorted(map(str, MERGE_TILES))}, got {Bt.dtype} and {A.dtype}")
    if R == 0 or M == 0 or N == 0:
        return
    tile = MERGE_TILES[A.dtype]
    Bt, A = _rows_contiguous(Bt), _rows_contiguous(A)
    grid = (triton.cdiv(N, tile.BLOCK_N), triton.cdiv(M, tile.BLOCK_M))
    _merge_kernel[grid](weight, Bt, A, M, N, R, weight.stride(0), weight.stride(1), Bt.stride(0), A.stride(0),
                        BLOCK_M=tile.BLOCK_M, BLOCK_N=tile.BLOCK_N, BLOCK_R=tile.BLOCK_R, PRECISION=tile.precision,
                        num_warps=tile.num_warps, num_stages=tile.num_stages)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()


@triton.jit
def _stacked_linear_kernel(x_ptr, w_ptr, a_ptr, b_ptr, y_ptr, M, N, K, R,
                           stride_xm, stride_wn, stride_wk, stride_ym,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.arange(0, BLOCK_R)
    dense = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    low = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)  # x @ A^T for these rows
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :],
                    mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0).to(tl.float32)
        w_t = tl.load(w_ptr + k[:, None] * stride_wk + cols[None, :] * stride_wn,
                      mask=(k[:, None] < K) & (cols[None, :] < N), other=0.0).to(tl.float32)
        a_t = tl.load(a_ptr + r[None, :] * K + k[:, None],
                      mask=(k[:, None] < K) & (r[None, :] < R), other=0.0).to(tl.float32)
        dense += tl.dot(x, w_t, input_precision="ieee")
        low += tl.dot(x, a_t, input_precision="ieee")
    b_t = tl.load(b_ptr + cols[None, :] * R + r[:, None],
                  mask=(r[:, None] < R) & (cols[None, :] < N), other=0.0).to(tl.float32)
    y = dense + tl.dot(low, b_t, input_precision="ieee")
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def stacked_linear(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T + (x @ A^T) @ B^T`` for 2-d ``x`` (M x K, rows contiguous), ``weight``
    (N x K, any strides), contiguous ``A`` (R x K) and ``B`` (N x R); returns y (M x N) in x's dtype."""
    M, K = x.shape
    N = weight.shape[0]
    R = A.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    block_m = 16 if M <= 16 else 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, BLOCK_N))
    _stacked_linear_kernel[grid](x, weight, A, B, y, M, N, K, R,
                                 x.stride(0), weight.stride(0), weight.stride(1), y.stride(0),
                                 BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=32,
                                 BLOCK_R=max(16, triton.next_power_of_2(R)))
    return y
