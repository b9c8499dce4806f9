"""Seeded projection kernels.

Rademacher bases, bit for bit the spec's arithmetic (:mod:`ferret.spec`): a program owns
``GROUPS`` consecutive groups of 128 block indices (one Philox call each), one group per thread,
held as a tuple of 128 one-element-per-thread tensors (element ``c`` of every group), so the
Philox words, the sign bits and the order of the sums are a thread's own:

* ``compress``: per basis, each thread's group sum in the spec's order (fp32), then the spec's
  pairwise tree over groups in fp64: five levels across a warp's lanes, two across the
  program's warps (one node per program and basis), the rest over the programs' nodes by
  :func:`_tree_kernel` passes (a fixed tree, so any launch gives the same bits);
* ``reconstruct``: per element ``acc += ±gamma_k`` for k in order, then
  ``out = out + acc * scale`` with two roundings (launched with ``enable_fp_fusion=False``).

Gaussian bases (device-specific to a tolerance in the spec) use generic tile kernels.
Buffers are 1-d and contiguous; element ``j`` of a buffer sits at block index ``start + j``.
Every kernel walks a table of segments (:mod:`.groups`): ``compress_many``,
``reconstruct_many_`` and ``sum_squares_many`` work any number of buffers with one launch per
dtype (and the tree passes, one per level for all of them).
"""

import os

import numpy as np
import torch
import triton
import triton.language as tl

from .groups import TL_DTYPES, Table, fp32_bits, segment_of, to_device

RADEMACHER, GAUSSIAN = 0, 1
GROUP = 128  # block indices per Philox call
GROUPS = 128  # groups per program on a GPU: one per thread of 4 warps
INTERPRETED_GROUPS = 32  # in Triton's interpreter: less work wasted on small tensors
INTERPRETED_BASES = 8  # bases the interpreter's kernels take at once
WARP = 32
TREE = 256  # partial sums one tree pass adds up per program
TREE_BASES = 8
SIGN = tl.constexpr(-2147483648)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _groups() -> int:
    return INTERPRETED_GROUPS if _interpreted() else GROUPS


@triton.jit
def _words(seed, k, groups):
    """Philox words 0..3 of basis k for each group (int32): counter (group, k, 0, 0)."""
    r0, r1, r2, r3 = tl.randint4x(seed, ((tl.zeros_like(groups) + k) << 32) | groups)
    return (r0.to(tl.int32, bitcast=True), r1.to(tl.int32, bitcast=True), r2.to(tl.int32, bitcast=True),
            r3.to(tl.int32, bitcast=True))


@triton.jit
def _signed(bits, words, c: tl.constexpr):
    """Element c of each group, sign-flipped where its basis sign is -1 (fp32 bit patterns in, fp32 out)."""
    flip = (words[c // 32] << (31 - c % 32)) & SIGN
    return (bits ^ flip).to(tl.float32, bitcast=True)


@triton.jit
def _group_sum(xs, words):
    """The spec's fp32 group sum: triples of each word into accumulator m mod 4, then two levels."""
    for q in tl.static_range(4):
        for m in tl.static_range(11):
            if m < 10:
                t = (_signed(xs[32 * q + 3 * m], words, 32 * q + 3 * m)
                     + _signed(xs[32 * q + 3 * m + 1], words, 32 * q + 3 * m + 1)) \
                    + _signed(xs[32 * q + 3 * m + 2], words, 32 * q + 3 * m + 2)
            else:
                t = _signed(xs[32 * q + 30], words, 32 * q + 30) + _signed(xs[32 * q + 31], words, 32 * q + 31)
            if q == 0 and m < 4:  # the first term of each accumulator (0 + t is t, but for -0)
                if m == 0:
                    a0 = t
                elif m == 1:
                    a1 = t
                elif m == 2:
                    a2 = t
                else:
                    a3 = t
            elif m % 4 == 0:
                a0 = a0 + t
            elif m % 4 == 1:
                a1 = a1 + t
            elif m % 4 == 2:
                a2 = a2 + t
            else:
                a3 = a3 + t
    return (a0 + a1) + (a2 + a3)


@triton.jit
def _flips(words):
    """Sign masks, shape (*words' shape, 128): element c of each group gets bit c % 32 of word c // 32
    in its sign bit."""
    cols = tl.arange(0, 128)
    quarter = cols // 32
    w0, w1, w2, w3 = (tl.expand_dims(words[0], -1), tl.expand_dims(words[1], -1), tl.expand_dims(words[2], -1),
                      tl.expand_dims(words[3], -1))
    w = tl.where(quarter == 0, w0, tl.where(quarter == 1, w1, tl.where(quarter == 2, w2, w3)))
    return (w << (31 - cols % 32)) & SIGN


@triton.jit
def _group_sums_2d(x2, words):
    """:func:`_group_sum` on a (R, 128) tile at once: the same additions in the same order, fewer
    operations (the interpreter's cost is per operation). A column is picked by summing it with zeros."""
    y = tl.reshape((x2 ^ _flips(words)).to(tl.float32, bitcast=True), (x2.shape[0], 4, 32))
    m = tl.broadcast_to(tl.arange(0, 16)[None, None, :], (x2.shape[0], 4, 16))
    first = tl.where(m < 11, tl.gather(y, tl.minimum(3 * m, 31), 2), 0.0)
    second = tl.where(m < 11, tl.gather(y, tl.minimum(3 * m + 1, 31), 2), 0.0)
    third = tl.where(m < 10, tl.gather(y, tl.minimum(3 * m + 2, 31), 2), 0.0)
    t = tl.reshape((first + second) + third, (x2.shape[0], 16, 4))  # [group, (q, m // 4), m % 4]
    step = tl.arange(0, 16)[None, :, None]
    acc = tl.zeros((x2.shape[0], 4), tl.float32)
    for s in tl.static_range(16):
        if s % 4 < 3:  # steps (q, m // 4 = 3) hold m >= 12: nothing
            acc = acc + tl.sum(tl.where(step == s, t, 0.0), axis=1)
    a, b = tl.split(tl.reshape(acc, (x2.shape[0], 2, 2)))  # (acc0, acc2), (acc1, acc3)
    pair = a + b
    lo, hi = tl.split(pair)
    return lo + hi


@triton.jit
def _lane_swap(v, LANE: tl.constexpr):
    """v of the lane whose index differs in bit log2(LANE) (fp64; one element per thread)."""
    bits = tl.inline_asm_elementwise(
        "{ .reg .b32 lo, hi; mov.b64 {lo, hi}, $1; shfl.sync.bfly.b32 lo, lo, $2, 0x1f, 0xffffffff; "
        "shfl.sync.bfly.b32 hi, hi, $2, 0x1f, 0xffffffff; mov.b64 $0, {lo, hi}; }",
        "=l,l,r", [v.to(tl.int64, bitcast=True), tl.full(v.shape, LANE, tl.int32)], dtype=tl.int64,
        is_pure=True, pack=1)
    return bits.to(tl.float64, bitcast=True)


@triton.jit
def _tile_sum(p, GROUPS: tl.constexpr, INTERPRET: tl.constexpr):
    """The pairwise-tree sum of a program's GROUPS group sums p (fp64, one element per thread),
    a (1,) tensor: five levels across each warp's lanes, then across the warps."""
    if INTERPRET:  # no shuffles in the interpreter: the same tree by halving the lane index
        s = tl.reshape(p, (GROUPS // 32, 32))
        for level in tl.static_range(5):
            a, b = tl.split(tl.reshape(s, (GROUPS // 32, s.shape[1] // 2, 2)))
            s = a + b
        s = tl.reshape(s, (GROUPS // 32,))
    else:  # a butterfly: both lanes of a pair compute a + b, so every lane holds its subtree's sum
        p = p + _lane_swap(p, 1)
        p = p + _lane_swap(p, 2)
        p = p + _lane_swap(p, 4)
        p = p + _lane_swap(p, 8)
        p = p + _lane_swap(p, 16)
        s = tl.max(tl.reshape(p, (GROUPS // 32, 32)), axis=1)  # a warp's lanes are equal: its sum
    for level in tl.static_range(GROUPS.bit_length() - 6):  # the warps' sums, pairwise
        a, b = tl.split(tl.reshape(s, (s.shape[0] // 2, 2)))
        s = a + b
    return tl.reshape(s, (1,))


COMPRESS_COLUMNS = 8  # a compressed segment: buffer, n, start, first tile, seed, K, part offset, base (or 0)


@triton.jit
def read(x_ptr, base_ptr, j, mask, DTYPE: tl.constexpr, HAS_BASE: tl.constexpr):
    """x[j] as fp32 (0 where not ``mask``), or with ``HAS_BASE`` x[j] - base[j] as their dtype
    subtracts them (the fp32 difference rounded to DTYPE), as a materialised difference reads."""
    x = tl.load(x_ptr + j, mask=mask, other=0.0).to(tl.float32)
    if HAS_BASE:
        x = _round_to(x - tl.load(base_ptr + j, mask=mask, other=0.0).to(tl.float32), DTYPE).to(tl.float32)
    return x


@triton.jit
def _compress_segment(programs_ptr, rows_ptr, count, DTYPE: tl.constexpr):
    """The segment of this program: (x, n, start, tile, seed, K, part offset, its tile among the
    segment's, base), the table's columns as :data:`COMPRESS_COLUMNS` lists them."""
    s, q = segment_of(programs_ptr, count, tl.program_id(0).to(tl.int64))
    row = rows_ptr + s * 8
    x_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    base_ptr = tl.load(row + 7).to(tl.pointer_type(DTYPE))
    return (x_ptr, tl.load(row + 1), tl.load(row + 2), q + tl.load(row + 3), tl.load(row + 4),
            tl.load(row + 5).to(tl.int32), tl.load(row + 6), q, base_ptr)


@triton.jit
def _compress_kernel(programs_ptr, rows_ptr, count, part_ptr, DTYPE: tl.constexpr, GROUPS: tl.constexpr,
                     INTERPRET: tl.constexpr = False, HAS_BASE: tl.constexpr = False):
    """part[offset + q * K + k] = the tree sum of basis k over tile q of the program's segment."""
    x_ptr, n, start, tile, seed, K, offset, q, base_ptr = _compress_segment(programs_ptr, rows_ptr, count, DTYPE)
    groups = tile * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    xs = ()
    for c in tl.static_range(128):  # element c of every group: strided loads, served by L1 after the first
        j = groups * 128 + c - start
        x = read(x_ptr, base_ptr, j, (j >= 0) & (j < n), DTYPE, HAS_BASE)
        xs = xs + (x.to(tl.int32, bitcast=True),)
    words = _words(seed, 0, groups)
    for k in range(K):
        ahead = _words(seed, k + 1, groups)  # the next basis's Philox, overlapping this one's sums
        total = _tile_sum(_group_sum(xs, words).to(tl.float64), GROUPS, INTERPRET)
        tl.store(part_ptr + offset + q * K + k + tl.arange(0, 1), total)
        words = ahead


@triton.jit
def _compress_interpreted_kernel(programs_ptr, rows_ptr, count, part_ptr, DTYPE: tl.constexpr,
                                 GROUPS: tl.constexpr, BASES: tl.constexpr, HAS_BASE: tl.constexpr = False):
    """:func:`_compress_kernel`'s arithmetic arranged for Triton's interpreter, whose cost is per
    operation: a (G, 128) tile, BASES bases at a time."""
    x_ptr, n, start, tile, seed, K, offset, q, base_ptr = _compress_segment(programs_ptr, rows_ptr, count, DTYPE)
    groups = tile * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    j = groups[:, None] * 128 + tl.arange(0, 128)[None, :] - start
    x2 = read(x_ptr, base_ptr, j, (j >= 0) & (j < n), DTYPE, HAS_BASE).to(tl.int32, bitcast=True)
    x3 = tl.reshape(tl.broadcast_to(x2[None, :, :], (BASES, GROUPS, 128)), (BASES * GROUPS, 128))
    bases = tl.arange(0, BASES)
    for k0 in range(0, K, BASES):
        words = _words(seed, k0 + bases[:, None], tl.broadcast_to(groups[None, :], (BASES, GROUPS)))
        words = (tl.reshape(words[0], (BASES * GROUPS,)), tl.reshape(words[1], (BASES * GROUPS,)),
                 tl.reshape(words[2], (BASES * GROUPS,)), tl.reshape(words[3], (BASES * GROUPS,)))
        s = tl.reshape(_group_sums_2d(x3, words).to(tl.float64), (BASES, GROUPS))
        for level in tl.static_range(GROUPS.bit_length() - 1):  # the tile's tree, by halving the group index
            a, b = tl.split(tl.reshape(s, (BASES, s.shape[1] // 2, 2)))
            s = a + b
        k = k0 + bases
        tl.store(part_ptr + offset + q * K + k, tl.reshape(s, (BASES,)), mask=k < K)


@triton.jit
def _sum_squares_kernel(programs_ptr, rows_ptr, count, part_ptr, DTYPE: tl.constexpr, GROUPS: tl.constexpr,
                        INTERPRET: tl.constexpr, HAS_BASE: tl.constexpr = False):
    """part[offset + q] = the pairwise tree over the fp64 squares of tile q (GROUPS groups of 128
    elements) of the program's segment; a segment's columns: buffer, n, part offset, base (or 0)."""
    s, q = segment_of(programs_ptr, count, tl.program_id(0).to(tl.int64))
    x_ptr = tl.load(rows_ptr + s * 4).to(tl.pointer_type(DTYPE))
    n, offset = tl.load(rows_ptr + s * 4 + 1), tl.load(rows_ptr + s * 4 + 2)
    base_ptr = tl.load(rows_ptr + s * 4 + 3).to(tl.pointer_type(DTYPE))
    groups = q * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    if INTERPRET:
        j = groups[:, None] * 128 + tl.arange(0, 128)[None, :]
        sq = read(x_ptr, base_ptr, j, j < n, DTYPE, HAS_BASE).to(tl.float64)
        sq = sq * sq
        for level in tl.static_range(7):
            a, b = tl.split(tl.reshape(sq, (GROUPS, sq.shape[1] // 2, 2)))
            sq = a + b
        p = tl.reshape(sq, (GROUPS,))
    else:
        level = ()
        for c in tl.static_range(128):
            x = read(x_ptr, base_ptr, groups * 128 + c, groups * 128 + c < n, DTYPE, HAS_BASE).to(tl.float64)
            level = level + (x * x,)
        for s in tl.static_range(7):
            merged = ()
            for c in tl.static_range(len(level) // 2):
                merged = merged + (level[2 * c] + level[2 * c + 1],)
            level = merged
        p = level[0]
    tl.store(part_ptr + offset + q + tl.arange(0, 1), _tile_sum(p, GROUPS, INTERPRET))


@triton.jit
def _tree_kernel(programs_ptr, rows_ptr, count, work_ptr, TREE: tl.constexpr, LEVELS: tl.constexpr,
                 BASES: tl.constexpr):
    """work[to + c * K + k] = the pairwise tree over rows [c*TREE - offset, (c+1)*TREE - offset)
    (absent: 0) of the K-column table at work[at:], for the program's chunk c and bases k of its
    segment; a segment's columns: at, to, rows, offset, K, blocks of BASES bases."""
    s, q = segment_of(programs_ptr, count, tl.program_id(0).to(tl.int64))
    row = rows_ptr + s * 6
    at, to, rows, offset, K, blocks = (tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3),
                                       tl.load(row + 4), tl.load(row + 5))
    c = q // blocks
    r = c * TREE - offset + tl.arange(0, TREE).to(tl.int64)
    k = (q % blocks) * BASES + tl.arange(0, BASES)
    inside = (r[:, None] >= 0) & (r[:, None] < rows) & (k[None, :] < K)
    x = tl.load(work_ptr + at + r[:, None] * K + k[None, :], mask=inside, other=0.0)
    for level in tl.static_range(LEVELS):
        a, b = tl.split(tl.permute(tl.reshape(x, (x.shape[0] // 2, 2, BASES)), (0, 2, 1)))
        x = a + b
    tl.store(work_ptr + to + c * K + k, tl.reshape(x, (BASES,)), mask=k < K)


@triton.jit
def _pair(a, b):
    """(G, m) and (G, m) -> (G, 2m): a's columns, then b's."""
    t = tl.permute(tl.join(a, b), (0, 2, 1))
    return tl.reshape(t, (t.shape[0], 2 * t.shape[2]))


@triton.jit
def _as_tile(rows):
    """128 tensors of shape (G,) -> (G, 128), column c = rows[c]."""
    level = ()
    for c in tl.static_range(64):
        level = level + (tl.reshape(tl.join(rows[2 * c], rows[2 * c + 1]), (rows[0].shape[0], 2)),)
    for s in tl.static_range(6):
        merged = ()
        for c in tl.static_range(len(level) // 2):
            merged = merged + (_pair(level[2 * c], level[2 * c + 1]),)
        level = merged
    return level[0]


RECONSTRUCT_COLUMNS = 8  # a rebuilt segment: buffer, n, start, first tile, seed, K, coordinates' offset, scale


@triton.jit
def _reconstruct_segment(programs_ptr, rows_ptr, count, g_ptr, DTYPE: tl.constexpr):
    """The segment of this program: (out, n, start, tile, seed, K, its coordinates, scale), the
    table's columns as :data:`RECONSTRUCT_COLUMNS` lists them."""
    s, q = segment_of(programs_ptr, count, tl.program_id(0).to(tl.int64))
    row = rows_ptr + s * 8
    out_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    scale = tl.load(row + 7).to(tl.int32).to(tl.float32, bitcast=True)
    return (out_ptr, tl.load(row + 1), tl.load(row + 2), q + tl.load(row + 3), tl.load(row + 4),
            tl.load(row + 5).to(tl.int32), g_ptr + tl.load(row + 6), scale)


@triton.jit
def _reconstruct_kernel(programs_ptr, rows_ptr, count, g_ptr, DTYPE: tl.constexpr, GROUPS: tl.constexpr):
    out_ptr, n, start, tile, seed, K, g_ptr, scale = _reconstruct_segment(programs_ptr, rows_ptr, count, g_ptr,
                                                                          DTYPE)
    groups = tile * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    acc = ()
    for c in tl.static_range(128):
        acc = acc + (tl.zeros((GROUPS,), tl.float32),)
    words = _words(seed, 0, groups)
    gamma = tl.load(g_ptr).to(tl.int32, bitcast=True)
    for k in range(K):
        ahead = _words(seed, k + 1, groups)  # the next basis's Philox, overlapping this one's additions
        ahead_gamma = tl.load(g_ptr + tl.minimum(k + 1, K - 1)).to(tl.int32, bitcast=True)
        added = ()
        for c in tl.static_range(128):
            added = added + (acc[c] + _signed(gamma, words, c),)
        acc = added
        words, gamma = ahead, ahead_gamma
    # through shared memory into a tile whose loads and stores are coalesced
    _apply(out_ptr, _as_tile(acc), groups, n, start, scale, DTYPE)


@triton.jit
def _reconstruct_interpreted_kernel(programs_ptr, rows_ptr, count, g_ptr, DTYPE: tl.constexpr,
                                    GROUPS: tl.constexpr, BASES: tl.constexpr):
    """:func:`_reconstruct_kernel`'s arithmetic arranged for Triton's interpreter: a (G, 128) tile,
    the Philox words of BASES bases at a time, the additions still one basis after another."""
    out_ptr, n, start, tile, seed, K, g_ptr, scale = _reconstruct_segment(programs_ptr, rows_ptr, count, g_ptr,
                                                                          DTYPE)
    groups = tile * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    bases = tl.arange(0, BASES)
    acc = tl.zeros((GROUPS, 128), tl.float32)
    for k0 in range(0, K, BASES):
        words = _words(seed, k0 + bases[:, None], tl.broadcast_to(groups[None, :], (BASES, GROUPS)))
        gamma = tl.load(g_ptr + k0 + bases, mask=k0 + bases < K, other=0.0).to(tl.int32, bitcast=True)
        signed = (gamma[:, None, None] ^ _flips(words)).to(tl.float32, bitcast=True)  # (BASES, G, 128)
        for b in tl.static_range(BASES):
            term = tl.sum(tl.where(bases[:, None, None] == b, signed, 0.0), axis=0)  # basis b alone: exact
            acc = tl.where(k0 + b < K, acc + term, acc)
    _apply(out_ptr, acc, groups, n, start, scale, DTYPE)


@triton.jit
def _apply(out_ptr, acc, groups, n, start, scale, DTYPE: tl.constexpr):
    """out = out + acc * scale (two roundings) for the groups' elements; acc is (G, 128)."""
    j = groups[:, None] * 128 + tl.arange(0, 128)[None, :] - start
    inside = (j >= 0) & (j < n)
    out = tl.load(out_ptr + j, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + j, _round_to(out + acc * scale, DTYPE), mask=inside)


# Gaussian bases: a tile of TILE consecutive block indices per program, every basis in turn.
TILE = 8192


@triton.jit
def _gaussian_tile(seed, k, start_index, SIZE: tl.constexpr):
    idx = start_index + tl.arange(0, SIZE).to(tl.int64)
    n0, n1, n2, n3 = tl.randn4x(seed, ((tl.zeros_like(idx) + k) << 32) | (idx >> 2))
    lane = idx & 3
    return tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))


@triton.jit
def _gaussian_compress_kernel(programs_ptr, rows_ptr, count, part_ptr, DTYPE: tl.constexpr, TILE: tl.constexpr,
                              HAS_BASE: tl.constexpr = False):
    x_ptr, n, start, tile, seed, K, offset, q, base_ptr = _compress_segment(programs_ptr, rows_ptr, count, DTYPE)
    base = tile * TILE
    j = base + tl.arange(0, TILE).to(tl.int64) - start
    x = read(x_ptr, base_ptr, j, (j >= 0) & (j < n), DTYPE, HAS_BASE)
    for k in range(K):
        total = tl.sum(x * _gaussian_tile(seed, k, base, TILE)).to(tl.float64)
        tl.store(part_ptr + offset + q * K + k + tl.arange(0, 1), total + tl.zeros((1,), tl.float64))


@triton.jit
def _gaussian_reconstruct_kernel(programs_ptr, rows_ptr, count, g_ptr, DTYPE: tl.constexpr, TILE: tl.constexpr):
    out_ptr, n, start, tile, seed, K, g_ptr, scale = _reconstruct_segment(programs_ptr, rows_ptr, count, g_ptr,
                                                                          DTYPE)
    base = tile * TILE
    j = base + tl.arange(0, TILE).to(tl.int64) - start
    inside = (j >= 0) & (j < n)
    acc = tl.zeros((TILE,), dtype=tl.float32)
    for k in range(K):
        acc += _gaussian_tile(seed, k, base, TILE) * tl.load(g_ptr + k)
    out = tl.load(out_ptr + j, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + j, _round_to(out + acc * scale, DTYPE), mask=inside)


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


def _tiles(start: int, n: int, size: int) -> tuple[int, int]:
    """(first tile, tile count) of ``size`` block indices covering ``[start, start + n)``."""
    first = start // size
    return first, (start + n - 1) // size - first + 1


def _check(x: torch.Tensor, what: str) -> None:
    if x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"{what} must be a 1-d contiguous tensor")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{what} must be float32, bfloat16 or float16, got {x.dtype}")


class _Work:
    """The fp64 scratch of a grouped reduction, planned on the host before anything is launched:
    each segment's level-0 nodes (rows x K, rows at absolute indices ``first..``) then the tree
    passes' nodes, and one zero for empty segments. :meth:`run` fills and reduces it."""

    def __init__(self):
        self.size, self.level0 = 1, []  # element 0: the zero

    def nodes(self, rows: int, first: int, K: int) -> int:
        """Room for a segment's level-0 nodes; returns their offset (0, the zero, for none)."""
        self.level0.append((self.size if rows and K else 0, rows if K else 0, first, K))
        if rows and K:
            self.size += rows * K
        return self.level0[-1][0]

    def _passes(self):
        """The tree passes (a :class:`Table` each) and each segment's result offset."""
        state = [list(seg) for seg in self.level0]
        passes = []
        while any(rows > 1 for _, rows, _, _ in state):
            table = Table(6)
            for seg in state:
                at, rows, first, K = seg
                if rows <= 1:
                    continue
                offset = first % TREE
                chunks = (offset + rows - 1) // TREE + 1
                blocks = triton.cdiv(K, TREE_BASES)
                table.add(chunks * blocks, at, self.size, rows, offset, K, blocks)
                seg[:] = [self.size, chunks, first // TREE, K]
                self.size += chunks * K
            passes.append(table)
        return passes, [at for at, _, _, _ in state]

    def run(self, device: torch.device, fill) -> torch.Tensor:
        """Allocate the scratch, ``fill(work)`` its level-0 nodes (the caller's launches), reduce
        every segment by the spec's pairwise tree; returns each segment's K sums (fp64, in segment
        order, zeros for an empty segment)."""
        passes, results = self._passes()
        index = np.concatenate([at + (np.arange(K) if at else np.zeros(K, np.int64))
                                for at, (_, _, _, K) in zip(results, self.level0)] + [np.zeros(0, np.int64)])
        index = to_device(index.astype(np.int64), device)
        tables = [table.to(device) for table in passes]
        work = torch.empty(self.size, dtype=torch.float64, device=device)
        work[:1] = 0.0
        fill(work)
        for table, (programs, rows) in zip(passes, tables):
            _tree_kernel[(table.grid,)](programs, rows, len(table), work, TREE=TREE, LEVELS=TREE.bit_length() - 1,
                                        BASES=TREE_BASES)
        return work[index]


def tree_sum(part: torch.Tensor, first: int) -> torch.Tensor:
    """The spec's pairwise tree over the rows of ``part`` (fp64, rows x K) at absolute indices
    ``first..``: one fp64 value per column, on part's device."""
    rows, n_coords = part.shape
    plan = _Work()
    at = plan.nodes(rows, first, n_coords)
    return plan.run(part.device, lambda work: work[at : at + part.numel()].copy_(part.reshape(-1)) if at else None)


def _launch_grouped(kernel, items, tensor_of, columns, width: int, programs_of, device, args, base_of=None,
                    **meta) -> None:
    """One launch of ``kernel`` per dtype among ``items`` (and, with ``base_of``, per whether an
    item has a base: ``HAS_BASE``): a :class:`Table` of ``width`` columns (``columns(item)``,
    ``programs_of(item)`` programs each) and then ``args``."""
    groups: dict = {}
    for item in items:
        key = (tensor_of(item).dtype, base_of is not None and base_of(item) is not None)
        groups.setdefault(key, []).append(item)
    for (dtype, has_base), members in groups.items():
        table = Table(width)
        for item in members:
            table.add(programs_of(item), *columns(item))
        programs, rows = table.to(device)
        extra = {"HAS_BASE": True} if has_base else {}
        kernel[(table.grid,)](programs, rows, len(table), *args, DTYPE=TL_DTYPES[dtype], **extra, **meta)


def _address(x) -> int:
    """A buffer's address for a table, 0 for none."""
    return 0 if x is None else x.data_ptr()


def _check_base(x: torch.Tensor, base) -> None:
    """A segment's base must match it: ``ValueError`` otherwise."""
    if base is not None and (base.dtype != x.dtype or base.numel() != x.numel() or base.device != x.device
                             or base.dim() != 1 or not base.is_contiguous()):
        raise ValueError("a start buffer must be 1-d, contiguous, and of its segment's size, dtype and device")


def _kernel(basis: int, gaussian, interpreted, compiled):
    """The kernel of ``basis`` for here (Gaussian; Rademacher in the interpreter or compiled) and
    its launch settings."""
    if basis == GAUSSIAN:
        return gaussian, {"TILE": TILE}
    if _interpreted():
        return interpreted, {"GROUPS": _groups(), "BASES": INTERPRETED_BASES}
    return compiled, {"GROUPS": GROUPS, "num_warps": GROUPS // WARP}


def sum_squares_many(xs, bases=None) -> torch.Tensor:
    """``sum(x**2)`` of each buffer in the spec's order (the pairwise tree over fp64 squares), as
    one fp64 tensor on their device; with ``bases`` (one per buffer, or None), of each buffer
    minus its base as their dtype subtracts them. A fixed number of launches whatever their
    number, no host synchronisation."""
    bases = list(bases) if bases is not None else [None] * len(xs)
    for x, base in zip(xs, bases):
        _check(x, "x")
        _check_base(x, base)
    groups = _groups()
    plan, items = _Work(), []
    for x, base in zip(xs, bases):
        count = triton.cdiv(x.numel(), GROUP * groups)
        at = plan.nodes(count, 0, 1)
        if count:
            items.append((x, at, count, base))
    device = xs[0].device if xs else torch.device("cpu")
    columns = lambda item: (item[0].data_ptr(), item[0].numel(), item[1], _address(item[3]))  # noqa: E731
    return plan.run(device, lambda work: _launch_grouped(
        _sum_squares_kernel, items, lambda item: item[0], columns, 4, lambda item: item[2], device, (work,),
        base_of=lambda item: item[3], GROUPS=groups, INTERPRET=_interpreted(), num_warps=groups // WARP))


def sum_squares(x: torch.Tensor) -> torch.Tensor:
    """``sum(x**2)`` in the spec's order (the pairwise tree over fp64 squares): a 0-d float64 tensor
    on x's device, no host synchronisation."""
    return sum_squares_many([x]).reshape(())


def compress_many(segments, basis: int) -> torch.Tensor:
    """Coordinates ``<x, v_k>`` (k < n_coords) of each segment ``(x, start, seed, n_coords[,
    base])``, a buffer at block indices ``start..`` of the block seeded ``seed`` (with a base, of
    ``x - base`` as their dtype subtracts them, read in place): one float64 tensor on their
    device, the segments' coordinates one after another; a fixed number of launches whatever the
    number of segments, no host synchronisation. Rademacher in the spec's order (each segment's
    sum), Gaussian to the spec's tolerance."""
    segments = [(*s, None) if len(s) == 4 else tuple(s) for s in segments]
    for x, *_, base in segments:
        _check(x, "x")
        _check_base(x, base)
    size = TILE if basis == GAUSSIAN else GROUP * _groups()
    plan, items = _Work(), []
    for x, start, seed, n_coords, base in segments:
        first, count = _tiles(start, x.numel(), size) if x.numel() else (0, 0)
        at = plan.nodes(count, first, n_coords)
        if count and n_coords:
            items.append((x, start, seed, n_coords, first, count, at, base))
    device = segments[0][0].device if segments else torch.device("cpu")
    columns = lambda item: (item[0].data_ptr(), item[0].numel(), item[1], item[4], item[2], item[3], item[6],  # noqa: E731
                            _address(item[7]))

    def fill(work):
        kernel, meta = _kernel(basis, _gaussian_compress_kernel, _compress_interpreted_kernel, _compress_kernel)
        _launch_grouped(kernel, items, lambda item: item[0], columns, 8, lambda item: item[5], device, (work,),
                        base_of=lambda item: item[7], enable_fp_fusion=False, **meta)

    return plan.run(device, fill)


def compress(x: torch.Tensor, start: int, seed: int, basis: int, n_coords: int) -> torch.Tensor:
    """Coordinates ``<x, v_k>`` (k < n_coords) of a buffer at block indices ``start..``: float64 on
    x's device, no host synchronisation; Rademacher in the spec's order (the segment sum)."""
    return compress_many([(x, start, seed, n_coords)], basis)


def reconstruct_many_(segments, basis: int, gamma: torch.Tensor) -> None:
    """In place, for each segment ``(out, start, seed, at, n_coords, scale)``: ``out += scale *
    sum_k gamma[at + k] v_k`` (k < n_coords) in the spec's order and rounding, ``out`` a buffer at
    block indices ``start..`` of the block seeded ``seed``, ``gamma`` one fp32 tensor on their
    device holding every segment's coordinates; a fixed number of launches whatever the number of
    segments."""
    for out, *_ in segments:
        _check(out, "out")
    if gamma.dtype != torch.float32 or gamma.dim() != 1 or any(out.device != gamma.device for out, *_ in segments):
        raise TypeError("gamma must be a 1-d float32 tensor on the buffers' device")
    size = TILE if basis == GAUSSIAN else GROUP * _groups()
    items = [(out, start, seed, at, n_coords, scale, *_tiles(start, out.numel(), size))
             for out, start, seed, at, n_coords, scale in segments if out.numel() and n_coords]
    kernel, meta = _kernel(basis, _gaussian_reconstruct_kernel, _reconstruct_interpreted_kernel, _reconstruct_kernel)
    columns = lambda item: (item[0].data_ptr(), item[0].numel(), item[1], item[6], item[2], item[4], item[3],  # noqa: E731
                            int(fp32_bits(item[5])))
    _launch_grouped(kernel, items, lambda item: item[0], columns, 8, lambda item: item[7], gamma.device,
                    (gamma.contiguous(),), enable_fp_fusion=False, **meta)


def reconstruct_(out: torch.Tensor, start: int, seed: int, basis: int, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """In place: ``out += scale * sum_k gamma[k] v_k`` in the spec's order and rounding; returns ``out``."""
    if gamma.dtype != torch.float32 or gamma.dim() != 1 or gamma.device != out.device:
        raise TypeError("gamma must be a 1-d float32 tensor on out's device")
    reconstruct_many_([(out, start, seed, 0, gamma.numel(), scale)], basis, gamma)
    return out


def perturb_(theta: torch.Tensor, start: int, seed: int, basis: int, eps: float) -> torch.Tensor:
    """In place: ``theta += eps * v_0(seed)`` (``v_0 * 1`` is exact, so this is the spec's rounding)."""
    one = torch.ones(1, dtype=torch.float32, device=theta.device)
    return reconstruct_(theta, start, seed, basis, one, eps)
