"""Fused LoRA stack-matmul kernels.

* ``merge_``: ``W += sum_i c_i * B_i @ A_i`` over adapters of different ranks in one launch.
  Each program owns a ``BLOCK_M x BLOCK_N`` tile of ``W`` and walks every term, reading each
  ``A_i`` (r_i x N) and ``B_i`` (M x r_i) where it lies: no padding in memory and no
  concatenated copy. Ranks are padded to a power of two >= 16 only in registers (masked loads),
  as ``tl.dot`` needs.
* ``stacked_linear``: ``y = x @ W^T + (x @ A^T) @ B^T`` for one stacked adapter (A: R x K,
  B: N x R), one pass over ``x``: the low-rank product ``x @ A^T`` is accumulated in the same
  loop over K as the dense one.

``W`` may be any 2-d strided view (a transposed view covers ``fan_in_fan_out`` weights); it is
read and written once, in its own dtype, with fp32 accumulation. The kernels know nothing of
PEFT or federated learning.
"""

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N = 64, 64


def rank_block(rank: int) -> int:
    """The register tile for a rank: the next power of two, at least 16 (tl.dot) and at most 64."""
    return min(64, max(16, triton.next_power_of_2(rank)))


@triton.jit
def _merge_kernel(w_ptr, a_ptrs, b_ptrs, coefs, M, N, stride_wm, stride_wn,
                  RANKS: tl.constexpr, RANK_BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for i in tl.static_range(len(RANKS)):
        for r0 in tl.static_range(0, RANKS[i], RANK_BLOCKS[i]):
            r = r0 + tl.arange(0, RANK_BLOCKS[i])
            b = tl.load(b_ptrs[i] + rows[:, None] * RANKS[i] + r[None, :],
                        mask=(rows[:, None] < M) & (r[None, :] < RANKS[i]), other=0.0).to(tl.float32)
            a = tl.load(a_ptrs[i] + r[:, None] * N + cols[None, :],
                        mask=(r[:, None] < RANKS[i]) & (cols[None, :] < N), other=0.0).to(tl.float32)
            acc += tl.dot(b * coefs[i], a, input_precision="ieee")
    w = w_ptr + rows[:, None] * stride_wm + cols[None, :] * stride_wn
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(w, (tl.load(w, mask=inside).to(tl.float32) + acc).to(w_ptr.dtype.element_ty), mask=inside)


def merge_(weight: torch.Tensor, terms) -> None:
    """Add ``sum c * B @ A`` over ``terms`` (``(A, B, c)`` with A: r x N, B: M x r, contiguous)
    into the 2-d ``weight`` (M x N, any strides) in place; one launch for all terms."""
    M, N = weight.shape
    a_ptrs = tuple(a for a, _, _ in terms)
    b_ptrs = tuple(b for _, b, _ in terms)
    coefs = tuple(float(c) for _, _, c in terms)
    ranks = tuple(a.shape[0] for a in a_ptrs)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _merge_kernel[grid](weight, a_ptrs, b_ptrs, coefs, M, N, weight.stride(0), weight.stride(1),
                        RANKS=ranks, RANK_BLOCKS=tuple(rank_block(r) for r in ranks),
                        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)


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
