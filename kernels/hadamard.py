"""Dense Hadamard kernels: the randomized Hadamard basis repeated over a block's chunks.

A block of Hadamard size ``B`` is cut into chunks of ``B`` elements from index 0 (the last one
padded only virtually); chunk ``c`` has the lane mask ``s_c`` (word 0 of
``Philox(key=seed, ctr=(c lo32, c hi32, DENSE_LANE_DOMAIN, 0))`` masked to ``B - 1``, from
``tl.philox`` on the device). Its coordinates are rows of ``fwht(y)``, ``y`` the fold of the
block's signed chunks, lane ``l`` of chunk ``c`` being its element ``l ^ s_c``; its reconstruction
adds ``(d_i * z[(i mod B) ^ s_c]) * scale`` to every element ``i`` of chunk ``c``, ``z`` the
transform of the coordinates scattered at their rows. ``d_i`` is Rademacher basis 0 of the block
seed, attached to the element's own block index. Bit for bit the spec
(:func:`ferret.spec.dense_compress`, :func:`~ferret.spec.dense_reconstruct`):

* ``_fold_kernel``: program ``(p, l)`` folds chunks ``[(first + p) * CH, (first + p + 1) * CH)``
  (absolute chunk indices) at lanes ``[l * BL, (l + 1) * BL)``: a tile of ``TILE = CH x BL``
  elements with ``BL = min(B, 128)`` (32 x 128 from ``B = 128`` up, 512 x 8 at ``B = 8``), read
  as ``TILE / 128`` rows of 128 elements of one Philox group each. From ``B = 128`` up a row is
  one chunk ``c``: its 128 lanes are the aligned group ``(l * 128 ^ s_c) >> 7`` of the chunk, lane
  ``l * 128 + j`` its element ``j ^ (s_c & 127)``, so a row still reads one aligned group of 128
  elements (permuted), and its signs are one Philox call, the words permuted by ``s_c & 127``
  (word ``q ^ (s_c >> 5 & 3)``, bits ``b ^ (s_c & 31)``) before they are gathered to the elements.
  Below 128 a row holds ``128 / B`` whole chunks of the then contiguous tile, each permuted within
  itself, and the signs are gathered to each element's place ``e`` in the row (bit ``e % 32`` of
  word ``e // 32``). The tile's masks are one Philox call per chunk (at least one per row), spread
  over the threads, and reach the elements by a reduction (a row one chunk) or a gather. Elements
  outside the segment count 0. The chunk axis is then reduced by ``log2(CH)`` levels of
  ``node 2j + node 2j + 1``: the spec's pairwise tree over absolute chunk indices, cut into
  aligned subtrees of ``CH`` chunks. The same kernel, unsigned and unmasked, adds the partial
  nodes (rows of ``B``, already in lane order) up, ``CH`` at a time, until one is left. A tree
  deeper than the spec's only adds ``+0`` nodes, which can change nothing but the sign of a zero
  fold, and ``y = 0 + fold`` makes every zero ``+0`` anyway.
* the transform: the spec's butterflies on the device with torch ops (exact fp32 additions),
  stage ``h = 1, 2, 4, ..`` in order, every block of the same Hadamard size at once;
* ``_apply_kernel``: ``TILE`` consecutive block indices per program (32 groups of 128), aligned to
  ``TILE``: ``out = out + (d * z[(i mod B) ^ s_c]) * scale``, two roundings (launched with
  ``enable_fp_fusion=False``), rounded to ``out``'s dtype as the other kernels round. The signs
  are the elements' own (one Philox call per row), the masks those of the rows' chunks, as in the
  fold; ``z`` (``B`` values) is read permuted.

Buffers are 1-d and contiguous; element ``j`` of a segment sits at block index ``start + j``.
Every kernel walks a table of segments (:mod:`.groups`): the folds of all segments take one
launch per pass, dtype and lane width, their sums in layout order (``_sum_folds_kernel``) one,
the transforms one batch per Hadamard size, the applies one launch per dtype and lane width.
"""

import numpy as np
import torch
import triton
import triton.language as tl

from ..spec import DENSE_LANE_DOMAIN
from .groups import TL_DTYPES, Table, fp32_bits, segment_of, to_device
from .projection import SIGN, _check, _check_base, _round_to, read

TILE = 4096  # elements per program of both kernels
GROUP = 128  # block indices per Philox call (one row of a tile)
# 4 warps: a tile's 32 x 4 Philox words are one per thread, and gathered to the elements within a
# warp (Triton 3.6 compiles that gather for no other shape); 32 elements a thread, in the fold one
# lane of all 32 chunks (B >= 128), so the tree over them is the thread's own.
NUM_WARPS = 4
LANE_DOMAIN = tl.constexpr(DENSE_LANE_DOMAIN)


@triton.jit
def _flips(seed, groups, perm, p, PERMUTE: tl.constexpr):
    """Sign masks (R, 128) of Rademacher basis 0 for R Philox groups (groups: (R, 1) or (R, 4)
    int64 group indices). Element (r, j) gets in its sign bit the sign of element e of group
    groups[r], bit e % 32 of word e // 32, where e = p[r, j] (p: (R, 128) int32 below 128), or
    if PERMUTE e = p[r, j] ^ perm[r] (perm: (R, 4) int32 below 128, its columns equal). One
    Philox call per (group, word) pair, spread over the threads, then gathered to the elements: a
    thread does not recompute the words of every row it holds. A permutation is applied to the
    words before the gather: word q ^ (perm >> 5) to place q, its bit b ^ (perm & 31) to bit b by
    five swaps of bit blocks, so the gather and the shifts stay those of e = p."""
    q = tl.arange(0, 4)[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, tl.broadcast_to(groups, (groups.shape[0], 4)))
    if PERMUTE:
        q = q ^ ((perm >> 5) & 3)
    w = tl.where(q == 0, r0, tl.where(q == 1, r1, tl.where(q == 2, r2, r3))).to(tl.int32, bitcast=True)
    if PERMUTE:  # the masks keep >>'s copies of the sign bit out
        w = tl.where((perm & 1) != 0, ((w >> 1) & 0x55555555) | ((w & 0x55555555) << 1), w)
        w = tl.where((perm & 2) != 0, ((w >> 2) & 0x33333333) | ((w & 0x33333333) << 2), w)
        w = tl.where((perm & 4) != 0, ((w >> 4) & 0x0F0F0F0F) | ((w & 0x0F0F0F0F) << 4), w)
        w = tl.where((perm & 8) != 0, ((w >> 8) & 0x00FF00FF) | ((w & 0x00FF00FF) << 8), w)
        w = tl.where((perm & 16) != 0, ((w >> 16) & 0x0000FFFF) | ((w & 0x0000FFFF) << 16), w)
    w = tl.gather(w, p // 32, 1)
    return (w << (31 - p % 32)) & SIGN


@triton.jit
def _mask_table(seed, chunks, size, BL: tl.constexpr):
    """The lane masks s_c of the chunks of R rows of 128 elements (chunks: (R,) int64, the chunk of
    each row's first element; a row holds K = 128 / BL chunks, or lies in one for BL = 128), as
    (R, KW) int32, KW = max(K, 4): entry (r, k) is s_c of chunk c = chunks[r] + k * K // KW,
    word 0 of Philox(key = seed, counter = (c lo32, c hi32, DENSE_LANE_DOMAIN, 0)) & (size - 1).
    One call per entry, spread over the threads (KW >= 4: one a thread when a row is one chunk,
    its KW entries equal)."""
    K: tl.constexpr = 128 // BL
    KW: tl.constexpr = K if K > 4 else 4
    c = chunks[:, None] + (tl.arange(0, KW)[None, :] * K) // KW
    lo = c.to(tl.uint32)
    w0, _, _, _ = tl.philox(seed, lo, (c >> 32).to(tl.uint32), tl.full(c.shape, LANE_DOMAIN, tl.uint32), lo * 0)
    return w0.to(tl.int32, bitcast=True) & (size - 1)


@triton.jit
def _spread(table, BL: tl.constexpr):
    """A :func:`_mask_table` (R, KW) gathered to its rows' elements (R, 128): column j gets the mask
    of the row's chunk j // BL."""
    K: tl.constexpr = 128 // BL
    KW: tl.constexpr = K if K > 4 else 4
    col = tl.arange(0, 128)[None, :]
    return tl.gather(table, tl.broadcast_to((col // BL) * KW // K, (table.shape[0], 128)), 1)


@triton.jit
def _window(base, start, n, span):
    """The segment's part of block indices [base, base + span) as int32 offsets [lo, hi) from base."""
    lo = tl.minimum(tl.maximum(start - base, 0), span).to(tl.int32)
    hi = tl.minimum(tl.maximum(start + n - base, 0), span).to(tl.int32)
    return lo, hi


FOLD_COLUMNS = 9  # a folded segment: buffer, n, start, first group, seed, size, its nodes' offset, lane blocks, base


@triton.jit
def _fold_kernel(programs_ptr, rows_ptr, count, work_ptr, DTYPE: tl.constexpr, SIGNED: tl.constexpr,
                 TILE: tl.constexpr, BL: tl.constexpr, LEVELS: tl.constexpr, HAS_BASE: tl.constexpr = False):
    """work[at + p*size + l*BL : .. + BL] = the pairwise tree over the CH = TILE / BL chunks of
    program (p, l)'s aligned group (chunk indices (first + p) * CH ..), lanes l*BL .., of its
    segment x at block indices start .. start + n (the table's columns as :data:`FOLD_COLUMNS`
    lists them; with HAS_BASE the segment is x - base, as their dtype subtracts them): if SIGNED,
    lane l of chunk c is its element l ^ s_c, signed by Rademacher basis 0 of seed; else lane l
    is element l (partial nodes)."""
    s, q = segment_of(programs_ptr, count, tl.program_id(0).to(tl.int64))
    row = rows_ptr + s * 9
    x_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    b_ptr = tl.load(row + 8).to(tl.pointer_type(DTYPE))
    n, start, first, seed = tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)
    size = tl.load(row + 5).to(tl.int32)
    part_ptr = work_ptr + tl.load(row + 6)
    blocks = tl.load(row + 7)
    p = q // blocks
    lane0 = (q % blocks).to(tl.int32) * BL
    chunk0 = (first + p) * (TILE // BL)  # the tile's first chunk
    base = chunk0 * size  # block index of the tile's first chunk
    # tile element (c, l) at flat place q = c * BL + l, read as row q // 128, column q % 128
    r = tl.arange(0, TILE // 128)
    q = r[:, None] * 128 + tl.arange(0, 128)[None, :]
    lane = lane0 + q % BL
    if SIGNED:
        if BL == 128:  # row r is chunk chunk0 + r; the reduction of its equal entries keeps the
            masks = _mask_table(seed, chunk0 + r, size, BL)  # Philox calls one a thread
            lane = lane ^ tl.max(masks, axis=1)[:, None]
        elif BL > 1:  # the masks of the tile's chunks chunk0 + q // BL
            lane = lane ^ _spread(_mask_table(seed, chunk0 + r * 128 // BL, size, BL), BL)
    local = (q // BL) * size + lane  # int32: below CH * size <= 2**27
    lo, hi = _window(base, start, n, (TILE // BL) * size)
    inside = (local >= lo) & (local < hi)
    x = read(x_ptr, b_ptr, (base - start) + local, inside, DTYPE, HAS_BASE)
    if SIGNED:  # element (r, j) is element local % 128 of Philox group (base + local) >> 7
        col = tl.broadcast_to(tl.arange(0, 128)[None, :], (TILE // 128, 128))
        if BL == 128:  # row r is chunk r: its lane j is element j ^ (s_c & 127) of group (lane0 ^ s_c) >> 7
            groups = (base + r[:, None] * size + ((lane0 ^ masks) & -128)) >> 7
            flips = _flips(seed, groups, masks & 127, col, PERMUTE=True)
        elif BL == 1:  # no masks: element j of group (base >> 7) + r
            flips = _flips(seed, ((base >> 7) + r)[:, None], 0, col, PERMUTE=False)
        else:  # row r holds whole chunks (their lanes stay in them): group (base >> 7) + r
            flips = _flips(seed, ((base >> 7) + r)[:, None], 0, local % 128, PERMUTE=False)
        bits = x.to(tl.int32, bitcast=True) ^ flips
        x = tl.where(inside, bits.to(tl.float32, bitcast=True), 0.0)
    x = tl.reshape(x, (TILE // BL, BL))
    for level in tl.static_range(LEVELS):  # log2(TILE / BL) levels: node 2j + node 2j + 1
        x = tl.sum(tl.reshape(x, (x.shape[0] // 2, 2, BL)), axis=1)  # a sum of two: a + b, in any order
    tl.store(part_ptr + p * size + lane0 + tl.arange(0, BL), tl.reshape(x, (BL,)))


APPLY_COLUMNS = 8  # a rebuilt segment: buffer, n, start, first tile, seed, scale, size, its z's offset


@triton.jit
def _apply_kernel(programs_ptr, rows_ptr, count, z_ptr, DTYPE: tl.constexpr, TILE: tl.constexpr, BL: tl.constexpr):
    """out[j] = out[j] + (d_i * z[(i mod size) ^ s_c]) * scale for the segment's block indices
    i = start + j (chunk c = i // size) in its tile first + q (TILE block indices, aligned),
    rounded to out's dtype (the table's columns as :data:`APPLY_COLUMNS` lists them).
    BL = min(size, 128)."""
    s, q = segment_of(programs_ptr, count, tl.program_id(0).to(tl.int64))
    row = rows_ptr + s * 8
    out_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    n, start, first, seed = tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)
    scale = tl.load(row + 5).to(tl.int32).to(tl.float32, bitcast=True)
    size = tl.load(row + 6).to(tl.int32)
    z_ptr = z_ptr + tl.load(row + 7)
    base = (q + first) * TILE
    r = tl.arange(0, TILE // 128)
    col = tl.broadcast_to(tl.arange(0, 128)[None, :], (TILE // 128, 128))
    local = r[:, None] * 128 + col
    lo, hi = _window(base, start, n, TILE)
    inside = (local >= lo) & (local < hi)
    lane = ((base & (size - 1)).to(tl.int32) + local) & (size - 1)
    if BL == 128:  # row r lies in chunk (base + 128 r) // size (see the fold)
        lane = lane ^ tl.max(_mask_table(seed, (base + r * 128) // size, size, BL), axis=1)[:, None]
    elif BL > 1:  # row r starts chunk (base + 128 r) // size
        lane = lane ^ _spread(_mask_table(seed, (base + r * 128) // size, size, BL), BL)
    z = tl.load(z_ptr + lane)
    z = z.to(tl.int32, bitcast=True) ^ _flips(seed, ((base >> 7) + r)[:, None], 0, col, PERMUTE=False)
    z = z.to(tl.float32, bitcast=True)
    out = tl.load(out_ptr + (base - start) + local, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + (base - start) + local, _round_to(out + z * scale, DTYPE), mask=inside)


SUM_LANES = 1024  # lanes of a block's y per program of the fold sum


@triton.jit
def _sum_folds_kernel(programs_ptr, rows_ptr, count, folds_ptr, work_ptr, y_ptr, LANES: tl.constexpr):
    """y[at + l] = ((0 + fold_0[l]) + fold_1[l]) + .. for the lanes l of the program's part of its
    block, the block's folds (of its segments, in layout order) at work[folds[first + i]];
    a block's columns: at, size, folds, first."""
    s, q = segment_of(programs_ptr, count, tl.program_id(0).to(tl.int64))
    row = rows_ptr + s * 4
    at, size, m, first = tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)
    lanes = q * LANES + tl.arange(0, LANES)
    inside = lanes < size
    acc = tl.zeros((LANES,), tl.float32)
    for i in range(m):
        acc = acc + tl.load(work_ptr + tl.load(folds_ptr + first + i) + lanes, mask=inside, other=0.0)
    tl.store(y_ptr + at + lanes, acc, mask=inside)


def _lanes(size: int) -> int:
    return min(size, GROUP)


def _fold_passes(segments):
    """The fold passes of ``segments`` (``(x, start, seed, size, base)``), planned on the host: a list
    of passes, each a list of ``(segment, source, start, n, first group, rows out)`` with source
    None for the segment's own buffer (the signed pass) or the offset of the previous pass's
    nodes; returns (passes, each segment's fold offset, scratch size). Node offsets count fp32
    elements of one scratch buffer from ``at``."""
    passes, results, size_of = [], [], 0
    for i, (x, start, seed, size, _) in enumerate(segments):
        lanes = _lanes(size)
        level = (TILE // lanes).bit_length() - 1  # tree levels per pass
        c0, c1 = start // size, (start + x.numel() - 1) // size
        source, src_start, src_n, depth = None, start, x.numel(), 0
        while True:
            g0, g1 = c0 >> level, c1 >> level
            if depth == len(passes):
                passes.append([])
            passes[depth].append((i, source, src_start, src_n, g0, g1 - g0 + 1, size_of))
            source, src_start, src_n = size_of, g0 * size, (g1 - g0 + 1) * size
            size_of += src_n
            if g0 == g1:
                results.append(source)
                break
            c0, c1, depth = g0, g1, depth + 1
    return passes, results, size_of


def _fold_all(segments, device) -> tuple[torch.Tensor, list[int]]:
    """Every segment's fold (see :func:`fold`) in one fp32 scratch tensor, and their offsets in it:
    per pass one launch per dtype and lane count, whatever the number of segments."""
    passes, results, total = _fold_passes(segments)
    work = torch.empty(max(total, 1), dtype=torch.float32, device=device)
    for depth, members in enumerate(passes):
        tables = {}
        for i, source, start, n, first, rows, at in members:
            x, _, seed, size, base = segments[i]
            lanes = _lanes(size)
            src = x if source is None else work
            address = src.data_ptr() + (0 if source is None else 4 * source)
            base = base if source is None else None  # later passes add partial nodes up
            key = (src.dtype, lanes, base is not None)
            tables.setdefault(key, Table(9)).add(rows * (size // lanes), address, n, start, first, seed, size, at,
                                                 size // lanes, 0 if base is None else base.data_ptr())
        for (dtype, lanes, has_base), table in tables.items():
            programs, rows = table.to(device)
            extra = {"HAS_BASE": True} if has_base else {}
            _fold_kernel[(table.grid,)](programs, rows, len(table), work, DTYPE=TL_DTYPES[dtype], SIGNED=depth == 0,
                                        TILE=TILE, BL=lanes, LEVELS=(TILE // lanes).bit_length() - 1,
                                        num_warps=NUM_WARPS, **extra)
    return work, results


def fold(x: torch.Tensor, start: int, seed: int, size: int) -> torch.Tensor:
    """The fold of one segment (fp32, ``size`` values on x's device; no host synchronisation):
    the pairwise tree over its chunks of ``size`` signed elements, each chunk ``c`` in its lane
    order (lane ``l`` holds element ``l ^ s_c``), the rest counting 0."""
    _check(x, "x")
    work, [at] = _fold_all([(x, start, seed, size, None)], x.device)
    return work[at : at + size]


def fwht(y: torch.Tensor) -> torch.Tensor:
    """The spec's transform of each row of ``y`` (rows x size, fp32): butterflies ``(a + b, a - b)``,
    stage ``h = 1, 2, 4, ..`` in order; a new tensor."""
    if y.dtype != torch.float32 or y.dim() != 2:
        raise TypeError("the transform takes a 2-d float32 tensor")
    rows, size = y.shape
    h = 1
    while h < size:
        pairs = y.reshape(rows, size // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        out = torch.empty_like(pairs)
        torch.add(a, b, out=out[:, :, 0])
        torch.sub(a, b, out=out[:, :, 1])
        y, h = out.reshape(rows, size), 2 * h
    return y


def _by_size(jobs, indices):
    """{Hadamard size: [job indices]}, sizes in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for j in indices:
        groups.setdefault(jobs[j][2], []).append(j)
    return groups


def _places(jobs, members_by_size) -> tuple[np.ndarray, dict, int]:
    """Where each job's rows sit in the flat (members x size) matrices of its size, laid one after
    another: the index of every row (job order), each job's (matrix offset, member), the total."""
    where, at = {}, 0
    for size, members in members_by_size.items():
        for m, j in enumerate(members):
            where[j] = (at, m)
        at += len(members) * size
    index = [where[j][0] + where[j][1] * jobs[j][2] + np.asarray(jobs[j][3], dtype=np.int64)
             for j in range(len(jobs)) if j in where]
    return np.concatenate(index + [np.zeros(0, np.int64)]), where, at


def _transforms(flat: torch.Tensor, members_by_size) -> torch.Tensor:
    """:func:`fwht` of each size's (members x size) matrix laid in ``flat``, laid out the same way."""
    out, at = [], 0
    for size, members in members_by_size.items():
        out.append(fwht(flat[at : at + len(members) * size].reshape(len(members), size)).reshape(-1))
        at += len(members) * size
    return torch.cat(out) if out else flat


def compress(jobs) -> torch.Tensor:
    """Coordinates of blocks: ``jobs`` are ``(segments, seed, size, rows[, bases])``, ``segments``
    the block's ``(buffer, start)`` pairs in layout order, ``size`` its Hadamard size (a power of
    two), ``rows`` (int64, on the host) the rows to read, ``bases`` (one buffer per segment, or
    None) what each segment's values start from (the block holds segment - base). Returns one fp32
    tensor on the device holding every job's ``len(rows)`` coordinates in job order, with no host
    synchronisation and a number of launches that does not grow with the number of jobs or
    segments."""
    jobs = [tuple(job) if len(job) == 5 else (*job, None) for job in jobs]
    for segments, *_, bases in jobs:
        for (x, _), base in zip(segments, bases or [None] * len(segments)):
            _check(x, "x")
            _check_base(x, base)
    device = next((x.device for segments, *_ in jobs for x, _ in segments), torch.device("cpu"))
    by_size = _by_size(jobs, [j for j, job in enumerate(jobs) if len(job[3])])
    index, where, total = _places(jobs, by_size)
    pieces = [(x, start, jobs[j][1], jobs[j][2], base, j) for j in where
              for (x, start), base in zip(jobs[j][0], jobs[j][4] or [None] * len(jobs[j][0])) if x.numel()]
    work, folds = _fold_all([p[:5] for p in pieces], device)
    table, offsets = Table(4), []
    for j, (at, m) in where.items():  # y = 0 + fold + fold .., the segments in layout order
        mine = [f for p, f in zip(pieces, folds) if p[5] == j]
        size = jobs[j][2]
        table.add(triton.cdiv(size, SUM_LANES), at + m * size, size, len(mine), len(offsets))
        offsets.extend(mine)
    y = torch.empty(max(total, 1), dtype=torch.float32, device=device)
    index, folds_at = to_device(index, device), to_device(np.asarray(offsets + [0], dtype=np.int64), device)
    if len(table):
        programs, rows = table.to(device)
        _sum_folds_kernel[(table.grid,)](programs, rows, len(table), folds_at, work, y, LANES=SUM_LANES)
    return _transforms(y, by_size)[index]


def reconstruct_(jobs, coords: torch.Tensor, scales) -> None:
    """In place, for each block (``jobs`` as for :func:`compress`): its segments get
    ``(d_i * fwht(z)[(i mod size) ^ s_c]) * scale`` added at block index ``i`` (chunk
    ``c = i // size``), ``z`` holding the job's coordinates at ``rows`` and zeros elsewhere;
    ``coords`` (fp32, on the device) are every job's coordinates in job order, ``scales`` fp32
    values (Python floats). A number of launches that does not grow with the number of jobs."""
    for segments, *_ in jobs:
        for out, _ in segments:
            _check(out, "out")
    jobs = [job[:4] for job in jobs]
    by_size = _by_size(jobs, range(len(jobs)))
    index, where, total = _places(jobs, by_size)
    z = torch.zeros(max(total, 1), dtype=torch.float32, device=coords.device)
    z[to_device(index, coords.device)] = coords
    z = _transforms(z, by_size)
    tables = {}
    for j, (at, m) in where.items():
        segments, seed, size, _ = jobs[j]
        for out, start in segments:
            if out.numel():
                first = start // TILE
                count = (start + out.numel() - 1) // TILE - first + 1
                tables.setdefault((out.dtype, _lanes(size)), Table(8)).add(
                    count, out.data_ptr(), out.numel(), start, first, seed, int(fp32_bits(scales[j])), size,
                    at + m * size)
    for (dtype, lanes), table in tables.items():
        programs, rows = table.to(coords.device)
        _apply_kernel[(table.grid,)](programs, rows, len(table), z, DTYPE=TL_DTYPES[dtype], TILE=TILE, BL=lanes,
                                     num_warps=NUM_WARPS, enable_fp_fusion=False)
