"""SRHT kernels: the subsampled randomized Hadamard transform of one block, chunk by chunk.

The host hands over a table of the block's chunks that hold a row (offset, size, and for
reconstruction a scale factor); chunk ``c`` gets program ``c`` and row ``c`` of a scratch tile
of ``SIZE`` fp32 slots (``SIZE`` = the Hadamard size, the largest chunk):

* ``_gather_kernel``: a segment of the block writes ``d_i * x_i`` into the tile rows of its chunks;
* ``_fwht_kernel``: the spec's butterflies, stage ``h = 1, 2, 4, ..`` in order, on one tile row
  held in registers (stages at or beyond the chunk's size are skipped);
* ``_apply_kernel``: a segment does ``out_i = out_i + (d_i * z_i) * factor``, two roundings.

``compress`` = gather, transform, then read the rows' slots; ``reconstruct_`` = write the
coordinates into their slots, transform, apply. ``d_i`` is Rademacher basis 0 of the seed.
Buffers are 1-d and contiguous; element ``j`` of a segment sits at block index ``start + j``.
The basis spec is :mod:`ferret.spec`.
"""

import torch
import triton
import triton.language as tl

from .projection import _check, _round_to


@triton.jit
def _sign_bit(seed, i):
    """1 where element i (int64 block indices) of Rademacher basis 0 is -1, else 0."""
    r0, r1, r2, r3 = tl.randint4x(seed, i >> 7)
    word = (i >> 5) & 3
    w = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    return (w >> (i & 31).to(tl.uint32)) & 1


@triton.jit
def _fwht(x, size, SIZE: tl.constexpr, LOG: tl.constexpr):
    """Walsh-Hadamard butterflies on x (SIZE,), stages h = 1, 2, .. below `size`."""
    for s in tl.static_range(LOG):
        pairs = tl.permute(tl.reshape(x, (SIZE // (2 << s), 2, 1 << s)), (0, 2, 1))
        a, b = tl.split(pairs)
        y = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (SIZE,))
        x = tl.where((1 << s) < size, y, x)
    return x


@triton.jit
def _gather_kernel(x_ptr, n, start, tile_ptr, offsets_ptr, sizes_ptr, seed, SIZE: tl.constexpr):
    c = tl.program_id(0)
    first, size = tl.load(offsets_ptr + c), tl.load(sizes_ptr + c)
    j = tl.arange(0, SIZE).to(tl.int64)
    i = first + j
    mask = (j < size) & (i >= start) & (i < start + n)
    x = tl.load(x_ptr + (i - start), mask=mask, other=0.0).to(tl.float32)
    tl.store(tile_ptr + c * SIZE + j, tl.where(_sign_bit(seed, i) != 0, -x, x), mask=mask)


@triton.jit
def _fwht_kernel(tile_ptr, sizes_ptr, SIZE: tl.constexpr, LOG: tl.constexpr):
    c = tl.program_id(0)
    j = tl.arange(0, SIZE)
    x = tl.load(tile_ptr + c * SIZE + j)
    tl.store(tile_ptr + c * SIZE + j, _fwht(x, tl.load(sizes_ptr + c), SIZE, LOG))


@triton.jit
def _apply_kernel(out_ptr, n, start, tile_ptr, offsets_ptr, sizes_ptr, factors_ptr, seed, SIZE: tl.constexpr):
    c = tl.program_id(0)
    first, size, factor = tl.load(offsets_ptr + c), tl.load(sizes_ptr + c), tl.load(factors_ptr + c)
    j = tl.arange(0, SIZE).to(tl.int64)
    i = first + j
    mask = (j < size) & (i >= start) & (i < start + n)
    z = tl.load(tile_ptr + c * SIZE + j, mask=j < size, other=0.0)
    z = tl.where(_sign_bit(seed, i) != 0, -z, z)
    out = tl.load(out_ptr + (i - start), mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + (i - start), _round_to(out + z * factor, out_ptr.dtype.element_ty), mask=mask)


def _transform(tile: torch.Tensor, sizes: torch.Tensor, size: int) -> None:
    _fwht_kernel[(sizes.numel(),)](tile, sizes, SIZE=size, LOG=size.bit_length() - 1, enable_fp_fusion=False)


def compress(segments, seed: int, offsets: torch.Tensor, sizes: torch.Tensor, slots: torch.Tensor,
             size: int) -> torch.Tensor:
    """SRHT coordinates of a block; fp32 on the segments' device.

    ``segments``: ``(buffer, start)`` pairs covering the block; ``offsets``/``sizes`` (int64):
    the chunks holding a row; ``slots`` (int64): coordinate k's place in the tile,
    ``chunk * size + row - offset``; ``size``: the Hadamard size (a power of two).
    """
    for x, _ in segments:
        _check(x, "x")
    tile = torch.zeros(offsets.numel() * size, dtype=torch.float32, device=offsets.device)
    if offsets.numel():
        for x, start in segments:
            _gather_kernel[(offsets.numel(),)](x, x.numel(), start, tile, offsets, sizes, seed, SIZE=size)
        _transform(tile, sizes, size)
    return tile[slots]


def reconstruct_(segments, seed: int, offsets: torch.Tensor, sizes: torch.Tensor, slots: torch.Tensor,
                 coords: torch.Tensor, factors: torch.Tensor, size: int) -> None:
    """In place: each segment's elements in the listed chunks get ``(d * fwht(z)) * factor`` added,
    ``z`` holding ``coords`` at ``slots`` (see :func:`compress`); ``factors`` (fp32): one per chunk."""
    for out, _ in segments:
        _check(out, "out")
    if not offsets.numel():
        return
    tile = torch.zeros(offsets.numel() * size, dtype=torch.float32, device=offsets.device)
    tile[slots] = coords
    _transform(tile, sizes, size)
    for out, start in segments:
        _apply_kernel[(offsets.numel(),)](out, out.numel(), start, tile, offsets, sizes, factors, seed, SIZE=size,
                                          enable_fp_fusion=False)
