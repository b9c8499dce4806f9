"""SRHT kernels: the subsampled randomized Hadamard transform of one block, chunk by chunk.

The host hands over a table of the blocks' chunks that hold a row (offset, size, and for
reconstruction a scale factor), every block of one Hadamard size one after another; chunk ``c``
gets row ``c`` of a scratch tile of ``SIZE`` fp32 slots (``SIZE`` = the Hadamard size, the
largest chunk), and the kernels walk a table of segments (:mod:`.groups`), one launch per
Hadamard size and dtype whatever the number of blocks:

* ``_gather_kernel``: a segment of the block writes ``d_i * x_i`` into the tile rows of its chunks;
* ``_fwht_kernel``: the spec's butterflies, stage ``h = 1, 2, 4, ..`` in order, on one tile row
  held in registers (stages at or beyond the chunk's size are skipped);
* ``_apply_kernel``: a segment does ``out_i = out_i + (d_i * z_i) * factor``, two roundings.

``compress`` = gather, transform, then read the rows' slots; ``reconstruct_`` = write the
coordinates into their slots, transform, apply. ``d_i`` is Rademacher basis 0 of the seed.
Buffers are 1-d and contiguous; element ``j`` of a segment sits at block index ``start + j``.
The basis spec is :mod:`ferret.spec`.
"""

import numpy as np
import torch
import triton
import triton.language as tl

from .groups import TL_DTYPES, Table, segment_of, to_device
from .projection import _check, _check_base, _round_to, read


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


SEGMENT_COLUMNS = 6  # a segment: buffer, n, start, seed, its block's first chunk, base (or 0)


@triton.jit
def _segment(programs_ptr, rows_ptr, count, DTYPE: tl.constexpr):
    """This program's segment and chunk (the table's columns as :data:`SEGMENT_COLUMNS` lists
    them): (buffer, n, start, seed, chunk, base)."""
    s, q = segment_of(programs_ptr, count, tl.program_id(0).to(tl.int64))
    row = rows_ptr + s * 6
    x_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    base_ptr = tl.load(row + 5).to(tl.pointer_type(DTYPE))
    return x_ptr, tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4) + q, base_ptr


@triton.jit
def _gather_kernel(programs_ptr, rows_ptr, count, tile_ptr, offsets_ptr, sizes_ptr, DTYPE: tl.constexpr,
                   SIZE: tl.constexpr, HAS_BASE: tl.constexpr = False):
    x_ptr, n, start, seed, c, base_ptr = _segment(programs_ptr, rows_ptr, count, DTYPE)
    first, size = tl.load(offsets_ptr + c), tl.load(sizes_ptr + c)
    j = tl.arange(0, SIZE).to(tl.int64)
    i = first + j
    mask = (j < size) & (i >= start) & (i < start + n)
    x = read(x_ptr, base_ptr, i - start, mask, DTYPE, HAS_BASE)
    tl.store(tile_ptr + c * SIZE + j, tl.where(_sign_bit(seed, i) != 0, -x, x), mask=mask)


@triton.jit
def _fwht_kernel(tile_ptr, sizes_ptr, SIZE: tl.constexpr, LOG: tl.constexpr):
    c = tl.program_id(0)
    j = tl.arange(0, SIZE)
    x = tl.load(tile_ptr + c * SIZE + j)
    tl.store(tile_ptr + c * SIZE + j, _fwht(x, tl.load(sizes_ptr + c), SIZE, LOG))


@triton.jit
def _apply_kernel(programs_ptr, rows_ptr, count, tile_ptr, offsets_ptr, sizes_ptr, factors_ptr, DTYPE: tl.constexpr,
                  SIZE: tl.constexpr):
    out_ptr, n, start, seed, c, _ = _segment(programs_ptr, rows_ptr, count, DTYPE)
    first, size, factor = tl.load(offsets_ptr + c), tl.load(sizes_ptr + c), tl.load(factors_ptr + c)
    j = tl.arange(0, SIZE).to(tl.int64)
    i = first + j
    mask = (j < size) & (i >= start) & (i < start + n)
    z = tl.load(tile_ptr + c * SIZE + j, mask=j < size, other=0.0)
    z = tl.where(_sign_bit(seed, i) != 0, -z, z)
    out = tl.load(out_ptr + (i - start), mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + (i - start), _round_to(out + z * factor, DTYPE), mask=mask)


class _Chunks:
    """The chunks of every job holding a row, by Hadamard size: each size's chunks (offsets,
    sizes) one after another in a tile of their own, the tiles laid one after another in one
    buffer; jobs are ``(segments, seed, size, offsets, sizes, slots)`` (host arrays, see
    :func:`compress`)."""

    def __init__(self, jobs):
        self.jobs, self.sizes, first, self.total = jobs, {}, {}, 0
        for j, (_, _, size, offsets, *_) in enumerate(jobs):
            group = self.sizes.setdefault(size, [])
            first[j] = sum(len(jobs[i][3]) for i in group)
            group.append(j)
        self.base = {}
        for size, group in self.sizes.items():
            self.base[size] = self.total
            self.total += size * sum(len(jobs[j][3]) for j in group)
        self.first = first
        self.index = np.concatenate([self.base[jobs[j][2]] + first[j] * jobs[j][2] + np.asarray(jobs[j][5], np.int64)
                                     for j in range(len(jobs))] + [np.zeros(0, np.int64)])

    def tables(self, device, factors=None):
        """Per size: (tile offset, offsets, sizes, factors or None) of its chunks on ``device``."""
        out = {}
        for size, group in self.sizes.items():
            host = [np.concatenate([np.asarray(self.jobs[j][col], np.int64) for j in group] + [np.zeros(0, np.int64)])
                    for col in (3, 4)]
            offsets, sizes = torch.split(to_device(np.concatenate(host), device), [len(h) for h in host])
            f = None if factors is None else to_device(
                np.concatenate([np.asarray(factors[j], np.float32) for j in group] + [np.zeros(0, np.float32)]), device)
            out[size] = (self.base[size], offsets, sizes, f)
        return out

    def launch(self, kernel, tile, tables, device, *extra) -> None:
        """``kernel`` over every segment of every job: one launch per (size, dtype)."""
        for size, group in self.sizes.items():
            base, offsets, sizes, factors = tables[size]
            tables = {}
            for j in group:
                segments, seed, _, chunk_offsets, *_ = self.jobs[j]
                bases = self.jobs[j][6] if len(self.jobs[j]) > 6 and self.jobs[j][6] else [None] * len(segments)
                for (x, start), b in zip(segments, bases):
                    if x.numel() and len(chunk_offsets):
                        tables.setdefault((x.dtype, b is not None), Table(6)).add(
                            len(chunk_offsets), x.data_ptr(), x.numel(), start, seed, self.first[j],
                            0 if b is None else b.data_ptr())
            args = (tile[base:], offsets, sizes) + ((factors,) if factors is not None else ())
            for (dtype, has_base), table in tables.items():
                programs, rows = table.to(device)
                extra = {"HAS_BASE": True} if has_base else {}
                kernel[(table.grid,)](programs, rows, len(table), *args, DTYPE=TL_DTYPES[dtype], SIZE=size,
                                      enable_fp_fusion=False, **extra)

    def transform(self, tile, tables) -> None:
        for size, group in self.sizes.items():
            base, _, sizes, _ = tables[size]
            if sizes.numel():
                _fwht_kernel[(sizes.numel(),)](tile[base:], sizes, SIZE=size, LOG=size.bit_length() - 1,
                                               enable_fp_fusion=False)


def compress(jobs) -> torch.Tensor:
    """SRHT coordinates of blocks, one fp32 tensor on the device with every job's in job order.

    ``jobs``: ``(segments, seed, size, offsets, sizes, slots[, bases])``, ``segments`` the
    ``(buffer, start)`` pairs covering the block (``bases``: what each starts from, or None), ``offsets``/``sizes`` (int64, host) the chunks holding a
    row, ``slots`` (int64, host) coordinate k's place in the block's tile, ``chunk * size + row -
    offset``, ``size`` the Hadamard size (a power of two). A number of launches that does not
    grow with the number of jobs or segments; no host synchronisation.
    """
    for job in jobs:
        for (x, _), base in zip(job[0], job[6] if len(job) > 6 and job[6] else [None] * len(job[0])):
            _check(x, "x")
            _check_base(x, base)
    device = next((x.device for segments, *_ in jobs for x, _ in segments), torch.device("cpu"))
    chunks = _Chunks(jobs)
    index = to_device(chunks.index, device)
    tables = chunks.tables(device)
    tile = torch.zeros(max(chunks.total, 1), dtype=torch.float32, device=device)
    chunks.launch(_gather_kernel, tile, tables, device)
    chunks.transform(tile, tables)
    return tile[index]


def reconstruct_(jobs, coords: torch.Tensor, factors) -> None:
    """In place: each segment's elements in the listed chunks get ``(d * fwht(z)) * factor``
    added, ``z`` holding the job's coordinates at ``slots`` (see :func:`compress`); ``coords``
    (fp32, on the device) every job's coordinates in job order, ``factors`` (fp32, host) one per
    chunk of each job."""
    for segments, *_ in jobs:
        for out, _ in segments:
            _check(out, "out")
    chunks = _Chunks(jobs)
    tables = chunks.tables(coords.device, factors)
    tile = torch.zeros(max(chunks.total, 1), dtype=torch.float32, device=coords.device)
    tile[to_device(chunks.index, coords.device)] = coords
    chunks.transform(tile, tables)
    chunks.launch(_apply_kernel, tile, tables, coords.device)
