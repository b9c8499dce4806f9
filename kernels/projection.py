"""Seeded projection kernels.

Rademacher bases, bit for bit the spec's arithmetic (:mod:`ferret.spec`): a program owns
``GROUPS`` consecutive groups of 128 block indices (one Philox call each), one group per thread,
held as a tuple of 128 one-element-per-thread tensors (element ``c`` of every group), so the
Philox words, the sign bits and the order of the sums are a thread's own:

* ``compress``: per basis, each thread's group sum in the spec's order (fp32), then the spec's
  pairwise tree over groups in fp64: five levels across a warp's lanes, the rest over the
  per-warp sums by :func:`_tree_kernel` passes (a fixed tree, so any launch gives the same bits);
* ``reconstruct``: per element ``acc += ±gamma_k`` for k in order, then
  ``out = out + acc * scale`` with two roundings (launched with ``enable_fp_fusion=False``).

Gaussian bases (device-specific to a tolerance in the spec) use generic tile kernels.
Buffers are 1-d and contiguous; element ``j`` of a buffer sits at block index ``start + j``.
"""

import os

import torch
import triton
import triton.language as tl

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
def _warp_sums(p, part_ptr, slot0, k, K, GROUPS: tl.constexpr, INTERPRET: tl.constexpr):
    """Store the pairwise-tree sum of each warp's 32 group sums p (fp64) at part[slot0 + warp, k]."""
    warps = tl.arange(0, GROUPS // 32)
    if INTERPRET:  # no shuffles in the interpreter: the same tree by halving the lane index
        s = tl.reshape(p, (GROUPS // 32, 32))
        for level in tl.static_range(5):
            a, b = tl.split(tl.reshape(s, (GROUPS // 32, s.shape[1] // 2, 2)))
            s = a + b
        tl.store(part_ptr + (slot0 + warps) * K + k, tl.reshape(s, (GROUPS // 32,)))
    else:  # a butterfly: both lanes of a pair compute a + b, so every lane holds its subtree's sum
        p = p + _lane_swap(p, 1)
        p = p + _lane_swap(p, 2)
        p = p + _lane_swap(p, 4)
        p = p + _lane_swap(p, 8)
        p = p + _lane_swap(p, 16)
        lanes = tl.arange(0, GROUPS)
        tl.store(part_ptr + (slot0 + lanes // 32) * K + k, p, mask=lanes % 32 == 0)


@triton.jit
def _compress_kernel(x_ptr, part_ptr, n, start, first_tile, seed, K, GROUPS: tl.constexpr,
                     INTERPRET: tl.constexpr = False):
    tile = tl.program_id(0).to(tl.int64) + first_tile
    groups = tile * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    xs = ()
    for c in tl.static_range(128):  # element c of every group: strided loads, served by L1 after the first
        j = groups * 128 + c - start
        x = tl.load(x_ptr + j, mask=(j >= 0) & (j < n), other=0.0).to(tl.float32)
        xs = xs + (x.to(tl.int32, bitcast=True),)
    slot0 = tl.program_id(0).to(tl.int64) * (GROUPS // 32)
    words = _words(seed, 0, groups)
    for k in range(K):
        ahead = _words(seed, k + 1, groups)  # the next basis's Philox, overlapping this one's sums
        _warp_sums(_group_sum(xs, words).to(tl.float64), part_ptr, slot0, k, K, GROUPS, INTERPRET)
        words = ahead


@triton.jit
def _compress_interpreted_kernel(x_ptr, part_ptr, n, start, first_tile, seed, K, GROUPS: tl.constexpr,
                                 BASES: tl.constexpr):
    """:func:`_compress_kernel`'s arithmetic arranged for Triton's interpreter, whose cost is per
    operation: a (G, 128) tile, BASES bases at a time."""
    tile = tl.program_id(0).to(tl.int64) + first_tile
    groups = tile * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    j = groups[:, None] * 128 + tl.arange(0, 128)[None, :] - start
    x2 = tl.load(x_ptr + j, mask=(j >= 0) & (j < n), other=0.0).to(tl.float32).to(tl.int32, bitcast=True)
    x3 = tl.reshape(tl.broadcast_to(x2[None, :, :], (BASES, GROUPS, 128)), (BASES * GROUPS, 128))
    bases = tl.arange(0, BASES)
    warps = tl.arange(0, GROUPS // 32)
    slot0 = tl.program_id(0).to(tl.int64) * (GROUPS // 32)
    for k0 in range(0, K, BASES):
        words = _words(seed, k0 + bases[:, None], tl.broadcast_to(groups[None, :], (BASES, GROUPS)))
        words = (tl.reshape(words[0], (BASES * GROUPS,)), tl.reshape(words[1], (BASES * GROUPS,)),
                 tl.reshape(words[2], (BASES * GROUPS,)), tl.reshape(words[3], (BASES * GROUPS,)))
        s = tl.reshape(_group_sums_2d(x3, words).to(tl.float64), (BASES, GROUPS // 32, 32))
        for level in tl.static_range(5):  # the warp's butterfly, by halving the lane index
            a, b = tl.split(tl.reshape(s, (BASES, GROUPS // 32, s.shape[2] // 2, 2)))
            s = a + b
        k = k0 + bases[:, None]
        tl.store(part_ptr + (slot0 + warps[None, :]) * K + k, tl.reshape(s, (BASES, GROUPS // 32)),
                 mask=k < K)


@triton.jit
def _sum_squares_kernel(x_ptr, part_ptr, n, GROUPS: tl.constexpr, INTERPRET: tl.constexpr):
    """part[slot] = the pairwise tree over the fp64 squares of each warp's 32 groups of 128 elements."""
    groups = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    if INTERPRET:
        j = groups[:, None] * 128 + tl.arange(0, 128)[None, :]
        sq = tl.load(x_ptr + j, mask=j < n, other=0.0).to(tl.float64)
        sq = sq * sq
        for level in tl.static_range(7):
            a, b = tl.split(tl.reshape(sq, (GROUPS, sq.shape[1] // 2, 2)))
            sq = a + b
        p = tl.reshape(sq, (GROUPS,))
    else:
        level = ()
        for c in tl.static_range(128):
            x = tl.load(x_ptr + groups * 128 + c, mask=groups * 128 + c < n, other=0.0).to(tl.float64)
            level = level + (x * x,)
        for s in tl.static_range(7):
            merged = ()
            for c in tl.static_range(len(level) // 2):
                merged = merged + (level[2 * c] + level[2 * c + 1],)
            level = merged
        p = level[0]
    _warp_sums(p, part_ptr, tl.program_id(0).to(tl.int64) * (GROUPS // 32), 0, 1, GROUPS, INTERPRET)


@triton.jit
def _tree_kernel(part_ptr, out_ptr, rows, offset, K, TREE: tl.constexpr, LEVELS: tl.constexpr, BASES: tl.constexpr):
    """out[c, k] = the pairwise tree over part rows [c*TREE - offset, (c+1)*TREE - offset) (absent: 0)."""
    c = tl.program_id(0).to(tl.int64)
    r = c * TREE - offset + tl.arange(0, TREE).to(tl.int64)
    k = tl.program_id(1) * BASES + tl.arange(0, BASES)
    inside = (r[:, None] >= 0) & (r[:, None] < rows) & (k[None, :] < K)
    s = tl.load(part_ptr + r[:, None] * K + k[None, :], mask=inside, other=0.0)
    for level in tl.static_range(LEVELS):
        a, b = tl.split(tl.permute(tl.reshape(s, (s.shape[0] // 2, 2, BASES)), (0, 2, 1)))
        s = a + b
    tl.store(out_ptr + c * K + k, tl.reshape(s, (BASES,)), mask=k < K)


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


@triton.jit
def _reconstruct_kernel(out_ptr, g_ptr, n, start, first_tile, seed, scale, K, GROUPS: tl.constexpr):
    tile = tl.program_id(0).to(tl.int64) + first_tile
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
    _apply(out_ptr, _as_tile(acc), groups, n, start, scale)


@triton.jit
def _reconstruct_interpreted_kernel(out_ptr, g_ptr, n, start, first_tile, seed, scale, K, GROUPS: tl.constexpr,
                                    BASES: tl.constexpr):
    """:func:`_reconstruct_kernel`'s arithmetic arranged for Triton's interpreter: a (G, 128) tile,
    the Philox words of BASES bases at a time, the additions still one basis after another."""
    tile = tl.program_id(0).to(tl.int64) + first_tile
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
    _apply(out_ptr, acc, groups, n, start, scale)


@triton.jit
def _apply(out_ptr, acc, groups, n, start, scale):
    """out = out + acc * scale (two roundings) for the groups' elements; acc is (G, 128)."""
    j = groups[:, None] * 128 + tl.arange(0, 128)[None, :] - start
    inside = (j >= 0) & (j < n)
    out = tl.load(out_ptr + j, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + j, _round_to(out + acc * scale, out_ptr.dtype.element_ty), mask=inside)


# Gaussian bases: a tile of TILE consecutive block indices per program, every basis in turn.
TILE = 8192


@triton.jit
def _gaussian_tile(seed, k, start_index, SIZE: tl.constexpr):
    idx = start_index + tl.arange(0, SIZE).to(tl.int64)
    n0, n1, n2, n3 = tl.randn4x(seed, ((tl.zeros_like(idx) + k) << 32) | (idx >> 2))
    lane = idx & 3
    return tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))


@triton.jit
def _gaussian_compress_kernel(x_ptr, part_ptr, n, start, first_tile, seed, K, TILE: tl.constexpr):
    base = (tl.program_id(0).to(tl.int64) + first_tile) * TILE
    j = base + tl.arange(0, TILE).to(tl.int64) - start
    x = tl.load(x_ptr + j, mask=(j >= 0) & (j < n), other=0.0).to(tl.float32)
    for k in range(K):
        tl.store(part_ptr + tl.program_id(0).to(tl.int64) * K + k, tl.sum(x * _gaussian_tile(seed, k, base, TILE)))


@triton.jit
def _gaussian_reconstruct_kernel(out_ptr, g_ptr, n, start, first_tile, seed, scale, K, TILE: tl.constexpr):
    base = (tl.program_id(0).to(tl.int64) + first_tile) * TILE
    j = base + tl.arange(0, TILE).to(tl.int64) - start
    inside = (j >= 0) & (j < n)
    acc = tl.zeros((TILE,), dtype=tl.float32)
    for k in range(K):
        acc += _gaussian_tile(seed, k, base, TILE) * tl.load(g_ptr + k)
    out = tl.load(out_ptr + j, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + j, _round_to(out + acc * scale, out_ptr.dtype.element_ty), mask=inside)


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


def tree_sum(part: torch.Tensor, first: int) -> torch.Tensor:
    """The spec's pairwise tree over the rows of ``part`` (fp64, rows x K) at absolute indices
    ``first..``: one fp64 value per column, on part's device."""
    rows, n_coords = part.shape
    while rows > 1:
        offset = first % TREE
        count = (offset + rows - 1) // TREE + 1
        out = torch.empty((count, n_coords), dtype=torch.float64, device=part.device)
        _tree_kernel[(count, triton.cdiv(n_coords, TREE_BASES))](part, out, rows, offset, n_coords, TREE=TREE,
                                                                  LEVELS=TREE.bit_length() - 1, BASES=TREE_BASES)
        part, rows, first = out, count, first // TREE
    return part.reshape(-1)[:n_coords] if rows else torch.zeros(n_coords, dtype=torch.float64, device=part.device)


def sum_squares(x: torch.Tensor) -> torch.Tensor:
    """``sum(x**2)`` in the spec's order (the pairwise tree over fp64 squares): a 0-d float64 tensor
    on x's device, no host synchronisation."""
    _check(x, "x")
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=x.device)
    groups = _groups()
    count = triton.cdiv(x.numel(), GROUP * groups)
    part = torch.empty((count * (groups // WARP), 1), dtype=torch.float64, device=x.device)
    _sum_squares_kernel[(count,)](x, part, x.numel(), GROUPS=groups, INTERPRET=_interpreted(),
                                  num_warps=groups // WARP)
    return tree_sum(part, 0).reshape(())


def compress(x: torch.Tensor, start: int, seed: int, basis: int, n_coords: int) -> torch.Tensor:
    """Coordinates ``<x, v_k>`` (k < n_coords) of a buffer at block indices ``start..``: float64 on
    x's device, no host synchronisation; Rademacher in the spec's order (the segment sum)."""
    _check(x, "x")
    if x.numel() == 0 or n_coords == 0:
        return torch.zeros(n_coords, dtype=torch.float64, device=x.device)
    if basis == GAUSSIAN:
        first, count = _tiles(start, x.numel(), TILE)
        part = torch.empty((count, n_coords), dtype=torch.float32, device=x.device)
        _gaussian_compress_kernel[(count,)](x, part, x.numel(), start, first, seed, n_coords, TILE=TILE,
                                            enable_fp_fusion=False)
        return part.double().sum(dim=0)
    groups = _groups()
    first, count = _tiles(start, x.numel(), GROUP * groups)
    slots = groups // WARP
    part = torch.empty((count * slots, n_coords), dtype=torch.float64, device=x.device)
    if _interpreted():
        _compress_interpreted_kernel[(count,)](x, part, x.numel(), start, first, seed, n_coords, GROUPS=groups,
                                               BASES=INTERPRETED_BASES)
    else:
        _compress_kernel[(count,)](x, part, x.numel(), start, first, seed, n_coords, GROUPS=groups,
                                   enable_fp_fusion=False, num_warps=slots)
    return tree_sum(part, first * slots)


def reconstruct_(out: torch.Tensor, start: int, seed: int, basis: int, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """In place: ``out += scale * sum_k gamma[k] v_k`` in the spec's order and rounding; returns ``out``."""
    _check(out, "out")
    if gamma.dtype != torch.float32 or gamma.dim() != 1 or gamma.device != out.device:
        raise TypeError("gamma must be a 1-d float32 tensor on out's device")
    if out.numel() == 0 or gamma.numel() == 0:
        return out
    if basis == GAUSSIAN:
        first, count = _tiles(start, out.numel(), TILE)
        _gaussian_reconstruct_kernel[(count,)](out, gamma.contiguous(), out.numel(), start, first, seed, scale,
                                               gamma.numel(), TILE=TILE, enable_fp_fusion=False)
        return out
    groups = _groups()
    first, count = _tiles(start, out.numel(), GROUP * groups)
    args = (out, gamma.contiguous(), out.numel(), start, first, seed, scale, gamma.numel())
    if _interpreted():
        _reconstruct_interpreted_kernel[(count,)](*args, GROUPS=groups, BASES=INTERPRETED_BASES)
    else:
        _reconstruct_kernel[(count,)](*args, GROUPS=groups, enable_fp_fusion=False, num_warps=groups // WARP)
    return out


def perturb_(theta: torch.Tensor, start: int, seed: int, basis: int, eps: float) -> torch.Tensor:
    """In place: ``theta += eps * v_0(seed)`` (``v_0 * 1`` is exact, so this is the spec's rounding)."""
    one = torch.ones(1, dtype=torch.float32, device=theta.device)
    return reconstruct_(theta, start, seed, basis, one, eps)
