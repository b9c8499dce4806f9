"""Seeded projection kernels.

Each program owns a tile of ``GROUPS * 128`` consecutive block indices (128 = the signs one
Philox call yields). It loads its slice of the buffer once and loops over every basis:

* ``compress``: ``part[tile, k] = sum over the tile of x_i * v_k[i]``; the host adds the
  per-tile partials in fp64, in tile order.
* ``reconstruct``: ``acc_i += v_k[i] * gamma_k`` in fp32 for k in order, then
  ``out_i = out_i + acc_i * scale``, launched with ``enable_fp_fusion=False`` so the two
  roundings of the spec are never fused into one FMA.

Buffers are 1-d and contiguous; element ``j`` of a buffer sits at block index ``start + j``.
The basis spec is :mod:`ferret.spec`.
"""

import torch
import triton
import triton.language as tl

RADEMACHER, GAUSSIAN = 0, 1
GROUPS = 64  # a tile is GROUPS * 128 = 8192 elements
TILE = GROUPS * 128


@triton.jit
def _basis_tile(seed, k, groups, cols, BASIS: tl.constexpr):
    """Elements (groups * 128 + cols) of basis k as fp32: ±1 (Rademacher) or N(0, 1) (Gaussian)."""
    # `k` is a Python int under the interpreter and a tensor when compiled: splat it either way.
    kk = tl.zeros_like(groups).to(tl.int64) + k
    if BASIS == 0:
        r0, r1, r2, r3 = tl.randint4x(seed, (kk << 32) | groups)
        word = (cols >> 5)[None, :]
        w = tl.where(word == 0, r0[:, None], tl.where(word == 1, r1[:, None], tl.where(word == 2, r2[:, None], r3[:, None])))
        bit = (w >> (cols & 31).to(tl.uint32)[None, :]) & 1
        return tl.where(bit != 0, -1.0, 1.0)
    else:
        idx = groups[:, None] * 128 + cols[None, :]
        n0, n1, n2, n3 = tl.randn4x(seed, (kk[:, None] << 32) | (idx >> 2))
        lane = idx & 3
        return tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 -> dtype, rounding to nearest-even. bf16 is rounded with integer ops: Triton's
    interpreter truncates that cast, and the spec must hold on every backend."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        half = tl.where(is_nan, (bits >> 16) | 0x40, rounded).to(tl.uint16)
        return half.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _compress_kernel(x_ptr, part_ptr, n, start, first_tile, seed, K, BASIS: tl.constexpr, GROUPS: tl.constexpr):
    tile = tl.program_id(0).to(tl.int64) + first_tile
    groups = tile * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    cols = tl.arange(0, 128)
    j = groups[:, None] * 128 + cols[None, :] - start
    x = tl.load(x_ptr + j, mask=(j >= 0) & (j < n), other=0.0).to(tl.float32)
    for k in range(K):
        v = _basis_tile(seed, k, groups, cols, BASIS)
        if BASIS == 0:
            p = tl.where(v < 0, -x, x)
        else:
            p = x * v
        tl.store(part_ptr + tl.program_id(0).to(tl.int64) * K + k, tl.sum(tl.sum(p, axis=1), axis=0))


@triton.jit
def _reconstruct_kernel(out_ptr, g_ptr, n, start, first_tile, seed, scale, K, BASIS: tl.constexpr,
                        GROUPS: tl.constexpr):
    tile = tl.program_id(0).to(tl.int64) + first_tile
    groups = tile * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    cols = tl.arange(0, 128)
    j = groups[:, None] * 128 + cols[None, :] - start
    mask = (j >= 0) & (j < n)
    acc = tl.zeros((GROUPS, 128), dtype=tl.float32)
    for k in range(K):
        g = tl.load(g_ptr + k)
        v = _basis_tile(seed, k, groups, cols, BASIS)
        if BASIS == 0:
            acc += tl.where(v < 0, -g, g)
        else:
            acc += v * g
    out = tl.load(out_ptr + j, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + j, _round_to(out + acc * scale, out_ptr.dtype.element_ty), mask=mask)


def _tiles(start: int, n: int) -> tuple[int, int]:
    first = start // TILE
    return first, (start + n - 1) // TILE - first + 1


def _check(x: torch.Tensor, what: str) -> None:
    if x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"{what} must be a 1-d contiguous tensor")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{what} must be float32, bfloat16 or float16, got {x.dtype}")


def compress(x: torch.Tensor, start: int, seed: int, basis: int, n_coords: int) -> torch.Tensor:
    """Coordinates ``<x, v_k>`` (k < n_coords) of a buffer at block indices ``start..``; float64 on x's device."""
    _check(x, "x")
    if x.numel() == 0 or n_coords == 0:
        return torch.zeros(n_coords, dtype=torch.float64, device=x.device)
    first, count = _tiles(start, x.numel())
    part = torch.empty((count, n_coords), dtype=torch.float32, device=x.device)
    _compress_kernel[(count,)](x, part, x.numel(), start, first, seed, n_coords, BASIS=basis, GROUPS=GROUPS,
                                 enable_fp_fusion=False)
    return part.double().sum(dim=0)


def reconstruct_(out: torch.Tensor, start: int, seed: int, basis: int, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """In place: ``out += scale * sum_k gamma[k] v_k`` in the spec's order and rounding; returns ``out``."""
    _check(out, "out")
    if gamma.dtype != torch.float32 or gamma.dim() != 1 or gamma.device != out.device:
        raise TypeError("gamma must be a 1-d float32 tensor on out's device")
    if out.numel() == 0 or gamma.numel() == 0:
        return out
    first, count = _tiles(start, out.numel())
    _reconstruct_kernel[(count,)](out, gamma.contiguous(), out.numel(), start, first, seed, scale, gamma.numel(),
                                  BASIS=basis, GROUPS=GROUPS, enable_fp_fusion=False)
    return out


def perturb_(theta: torch.Tensor, start: int, seed: int, basis: int, eps: float) -> torch.Tensor:
    """In place: ``theta += eps * v_0(seed)`` (``v_0 * 1`` is exact, so this is the spec's rounding)."""
    one = torch.ones(1, dtype=torch.float32, device=theta.device)
    return reconstruct_(theta, start, seed, basis, one, eps)
