"""The basis spec, executable: the slow NumPy definition every fast path must reproduce.

Everything a client and a server must agree on bit for bit lives here:

* **Generator.** Philox4x32-10 (Salmon et al., 2011), in the convention of Triton's
  ``tl.randint4x(seed, offset)``: counter ``(offset lo32, offset hi32, 0, 0)``, key
  ``(seed lo32, seed hi32)``.
* **Seeds.** A user's seed is any Python int, normalised to ``[0, 2**63)`` by
  :func:`normalize_seed`. Block ``b`` of a round with seed ``s`` uses
  :func:`block_seed` ``(s, b)``: one Philox call keyed by ``s`` with counter
  ``(b lo32, b hi32, BLOCK_SEED_DOMAIN, 0)``, words 0 and 1 joined little-endian and masked
  to 63 bits. The non-zero third counter word keeps these draws disjoint from every basis draw
  (bases always use ``c2 = 0``).
* **Rademacher basis** ``k`` of a block with seed ``s``, element ``i`` (the index inside the
  block): ``w = Philox(key=s, ctr=(i >> 7, k, 0, 0))[(i >> 5) & 3]`` and ``v = -1`` if bit
  ``i & 31`` of ``w`` is set, else ``+1``. One Philox call yields 128 signs.
* **Gaussian basis** ``k``, element ``i``: ``tl.randn4x(s, (k << 32) | (i >> 2))[i & 3]``
  (Box-Muller on Philox words with Triton's constants). It depends on each platform's
  ``log``/``cos``, so devices agree only to a tolerance.
* **SRHT basis** with Hadamard size ``B = 2**p`` (subsampled randomized Hadamard transform),
  over a block of ``n`` elements:

  - *Chunks.* The block is cut into chunks of ``B`` elements from index 0; the ``n mod B``
    elements left over are cut by the binary digits of ``n mod B``, largest first (a block of
    100 with ``B = 64`` has chunks 64, 32, 4). Every chunk is a power of two, so nothing is
    padded and the block has exactly ``n`` rows.
  - *Signs.* ``d_i`` is element ``i`` of Rademacher basis 0 of the block seed.
  - *Rows.* The ``m`` coordinates are rows ``r_0, r_1, ..`` of a seeded permutation of
    ``[0, n)`` by Fisher-Yates: draw ``t`` is ``t + u mod (n - t)`` with ``u`` the 64-bit word
    ``w0 | w1 << 32`` of ``Philox(key=s, ctr=(t lo32, t hi32, SRHT_ROW_DOMAIN, 0))`` (the
    modulo bias is below ``n / 2**64``). Row ``r`` sits in the chunk that holds element ``r``.
    The first ``m`` rows do not depend on ``m``, so packets of different budgets share their
    first coordinates, as with the other bases.
  - *Coordinate* ``k``: entry ``r_k - o`` of ``fwht(d * x)`` over the chunk at offset ``o``.
  - *Transform.* :func:`fwht`: unnormalised Walsh-Hadamard butterflies in fp32, stage
    ``h = 1, 2, 4, ..`` in that order, each pair ``(a, b) -> (a + b, a - b)``.
  - *Reconstruction.* Per chunk that holds at least one row: scatter the chunk's coordinates
    at their rows into zeros, ``z = fwht(...)``, then ``out = out + (d * z) * c`` with two
    roundings, ``c = scale * 2**-log2(size)`` (exact). ``scale`` is ``float32(alpha * n / m)``.
    Chunks that hold no row are not touched. With ``u_r`` the orthonormal rows, this is
    ``(n / m) * sum_k <x, u_rk> u_rk``: unbiased, with error ``(n / m - 1) * |x|**2`` against
    Rademacher's ``(n - 1) / m * |x|**2``.
* **Hadamard basis** (dense), named with a Hadamard size ``S = 2**p``, for ``F`` clients taking
  disjoint rows (``F = 1``: every client takes the same rows), over a block of ``n`` elements:

  - *Block size.* The block's Hadamard size is ``B = min(S, max(pow2(n), pow2(F)))``, ``pow2``
    rounding up to a power of two (:func:`dense_block_size`): a block smaller than ``S`` is not
    transformed at a larger size than it needs.
  - *Basis* ``k``: ``v_k[i] = d_i * H[r_k, (i mod B) xor s_c]`` for element ``i`` of chunk
    ``c = i div B``, with ``d_i`` the SRHT's signs (Rademacher basis 0 of the block seed), ``H``
    the Sylvester Hadamard matrix, ``H[r, j] = (-1)**popcount(r & j)``, and ``s_c`` the chunk's
    lane mask, ``w0 & (B - 1)`` of ``Philox(key=s, ctr=(c lo32, c hi32, DENSE_LANE_DOMAIN, 0))``:
    row ``r_k`` repeated over every chunk of ``B`` elements, each chunk with its own signs and its
    own order of lanes. Every ``v_k`` is ±1 on every element, so every weight moves. Without the
    masks, element ``i`` would always meet lane ``i mod B``, and a tensor whose rows are a
    multiple of a power of two long (576 = 9 * 64) would put the same columns on the same lanes
    in every chunk: the estimate's error would concentrate where the update and the curvature
    do (measured on SmolLM2: 60 % more loss from the same squared error). The masks give every
    chunk its own lanes.
  - *Rows.* Slot ``c < F`` takes rows ``r_k = P[c + F * k]`` of the seeded permutation ``P`` of
    ``[0, B)`` that the SRHT draws for ``[0, n)`` (:func:`srht_rows` with ``B`` for ``n``), so
    slots hold disjoint rows, slot ``c`` has ``ceil((B - c) / F)`` of them, and a slot's first
    rows do not depend on how many it takes. Merging the slots of one round gives the rows
    ``P[0], P[1], ..`` of slot 0 of 1 (:func:`dense_rows`).
  - *Groups.* A transform holds only so many slots (:mod:`ferret.slots`); the clients of a round
    beyond that are split into groups, each taking disjoint rows of a transform of its own seed,
    :func:`group_seed` (group 0 keeps the round's seed), so each group merges into one packet.
  - *Coordinates.* The fold ``y[l] = sum over chunks c of d_i * x_i`` at ``i = cB + (l xor s_c)``
    (fp32, the pairwise tree over the chunk index; past the block's end and outside the segment,
    elements count as 0, so the last chunk is padded only virtually; the block's segments' folds
    are added in layout order to zeros), then ``gamma_k = fwht(y)[r_k]``: one read of the block,
    then one transform of size ``B``.
  - *Reconstruction.* ``z = fwht(coords scattered at their rows into B zeros)``, then
    ``out[i] = out[i] + (d_i * z[(i mod B) xor s_c]) * c`` with two roundings and
    ``c = float32(alpha / m)``: ``out + alpha * (1/m) sum_k gamma_k v_k`` (``H`` is symmetric),
    one read and one write of ``out``.
  - *Error.* The signs make every ``v_k v_k^T`` average to ``I``, so the estimate is unbiased as
    Rademacher's is, whatever the rows. When ``B`` divides ``n`` the rows are orthogonal on every
    chunk and ``E|err|**2 = (n/m - 1) |x|**2`` (Rademacher: ``(n - 1)/m |x|**2``). A last chunk
    of ``L < B`` elements, ``x_L``, adds ``(m - 1) B / (m (B - 1)) * (1 - L/B) * |x_L|**2`` on
    average over the masks; with every row (``m = B``) the estimate is exact.
* **Coordinates** ``gamma_k = <x, v_k>``, summed in one fixed order so that every backend
  sends the same bits (Rademacher; the Gaussian basis is device-specific anyway and is summed in
  fp64). For a segment of a block (a tensor at block indices ``[start, start + n)``), with
  ``y_i = v_k[i] * x_i`` (exact) and ``y_i = 0`` for indices outside the segment:

  - *Group sums*, fp32, one per group of 128 block indices (one Philox call): in each word
    ``q = 0..3`` (elements ``32q .. 32q + 31`` of the group) the triples
    ``t = (y_a + y_(a+1)) + y_(a+2)`` at ``a = 32q + 3m`` for ``m < 10`` and the pair
    ``t = y_(32q+30) + y_(32q+31)`` for ``m = 10``; accumulator ``m mod 4`` (of four, from 0)
    adds them for ``q = 0..3``, ``m = 0..10`` in that order; the group sum is
    ``(acc_0 + acc_1) + (acc_2 + acc_3)``.
  - *Segment sum*, fp64: a pairwise tree over the absolute group index (group ``2j`` plus
    group ``2j + 1``, then pairs of pairs, ..), groups the segment does not touch counting as 0.
  - *Block coordinate*: the segment sums added in layout order (fp64, from 0); it travels as fp32.

  The order suits every machine: a GPU thread holds one group and the tree crosses threads; the
  CPU core's vector loops tabulate the signed triples. Zeros' signs never change a non-zero sum.
* **Norms** (for the ``norm`` allocation): ``sum_squares`` of a tensor, the pairwise tree over its
  elements' squares in fp64 (exact), element 0 first.
* **Reconstruction** of one block, element-wise and in fp32:
  ``acc = 0; for k in order: acc = acc + (v_k[i] * gamma_k)`` (for Rademacher the product is
  exact: ``±gamma_k``), then ``out[i] = out[i] + acc * scale`` with two separate roundings
  (never a fused multiply-add), where ``scale = float32(alpha / n_b)``. Outputs held in bf16 or
  fp16 are widened to fp32, updated, and rounded back to nearest-even.
"""

from __future__ import annotations

import numpy as np

SEED_MODULUS = 1 << 63
BLOCK_SEED_DOMAIN = 0x0B10C5ED
SRHT_ROW_DOMAIN = 0x5247A4D5
DENSE_LANE_DOMAIN = 0x4C414E45  # 'LANE'
GROUP_SEED_DOMAIN = 0x47525550  # 'GRUP'

_M32 = np.uint64(0xFFFFFFFF)
_PHILOX_M0, _PHILOX_M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_UNIFORM_SCALE = np.float32(4.6566127342e-10)  # Triton's uint_to_uniform_float


def normalize_seed(seed) -> int:
    """Map any Python int (negative or wider than 63 bits) into ``[0, 2**63)``.

    Takes an ``int`` or NumPy integer; returns ``seed mod 2**63``. Raises ``TypeError`` for
    anything else (floats and bools are refused: a float seed usually means a bug upstream).
    """
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"a seed must be an int, got {type(seed).__name__}")
    return int(seed) % SEED_MODULUS


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = 10):
    """Philox4x32 on arrays of counters under one key.

    Takes four counter words (array-likes of uint32 values, broadcastable) and a two-word key;
    returns a tuple of four ``uint32`` arrays.
    """
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _M32 for c in (c0, c1, c2, c3))
    k0, k1 = int(k0) & 0xFFFFFFFF, int(k1) & 0xFFFFFFFF
    for _ in range(rounds):
        p0 = _PHILOX_M0 * c0
        p1 = _PHILOX_M1 * c2
        c0, c1, c2, c3 = (
            (p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0),
            p1 & _M32,
            (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1),
            p0 & _M32,
        )
        k0 = (k0 + _PHILOX_W0) & 0xFFFFFFFF
        k1 = (k1 + _PHILOX_W1) & 0xFFFFFFFF
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))


def randint4x(seed: int, offset) -> tuple[np.ndarray, ...]:
    """Triton's ``tl.randint4x(seed, offset)`` for a 64-bit offset array; four ``uint32`` arrays."""
    off = np.asarray(offset, dtype=np.int64).astype(np.uint64)
    seed = normalize_seed(seed)
    zero = np.zeros_like(off)
    return philox4x32(off & _M32, off >> np.uint64(32), zero, zero, seed & 0xFFFFFFFF, seed >> 32)


def block_seed(round_seed: int, block_index: int) -> int:
    """The seed of block ``block_index`` in a round seeded with ``round_seed``; in ``[0, 2**63)``."""
    if block_index < 0:
        raise ValueError(f"block_index must be >= 0, got {block_index}")
    s = normalize_seed(round_seed)
    w = philox4x32(block_index & 0xFFFFFFFF, block_index >> 32, BLOCK_SEED_DOMAIN, 0, s & 0xFFFFFFFF, s >> 32)
    return (int(w[0]) | (int(w[1]) << 32)) % SEED_MODULUS


def block_seeds(round_seed: int, count: int) -> list[int]:
    """The seeds of blocks ``0 .. count - 1`` in a round seeded with ``round_seed`` (one Philox pass)."""
    s = normalize_seed(round_seed)
    b = np.arange(count, dtype=np.int64)
    w = philox4x32(b & 0xFFFFFFFF, b >> 32, BLOCK_SEED_DOMAIN, 0, s & 0xFFFFFFFF, s >> 32)
    joined = w[0].astype(np.uint64) | (w[1].astype(np.uint64) << np.uint64(32))
    return (joined % np.uint64(SEED_MODULUS)).astype(np.int64).tolist()


def group_seed(round_seed: int, group: int) -> int:
    """The seed group ``group`` of a round's clients projects with when they take disjoint rows in
    groups (:mod:`ferret.slots`): the round's own seed for group 0, else one Philox call keyed by
    the round seed with counter ``(group lo32, group hi32, GROUP_SEED_DOMAIN, 0)``, joined and
    masked as :func:`block_seed`'s. In ``[0, 2**63)``."""
    if group < 0:
        raise ValueError(f"group must be >= 0, got {group}")
    s = normalize_seed(round_seed)
    if group == 0:
        return s
    w = philox4x32(group & 0xFFFFFFFF, group >> 32, GROUP_SEED_DOMAIN, 0, s & 0xFFFFFFFF, s >> 32)
    return (int(w[0]) | (int(w[1]) << 32)) % SEED_MODULUS


def rademacher(seed: int, k: int, n: int, start: int = 0) -> np.ndarray:
    """Elements ``start .. start+n-1`` of Rademacher basis ``k`` under ``seed``, as float32 ±1."""
    i = np.arange(start, start + n, dtype=np.int64)
    words = np.stack(randint4x(seed, (np.int64(k) << 32) | (i >> 7)), axis=1)
    w = words[np.arange(n), (i >> 5) & 3]
    bit = (w >> (i & 31).astype(np.uint32)) & np.uint32(1)
    return (1 - 2 * bit.astype(np.int8)).astype(np.float32)


def _uniform(w: np.ndarray) -> np.ndarray:
    x = w.view(np.int32)
    x = np.where(x < 0, ~x, x)  # Triton: -x - 1
    return x.astype(np.float32) * _UNIFORM_SCALE


def gaussian(seed: int, k: int, n: int, start: int = 0) -> np.ndarray:
    """Elements ``start .. start+n-1`` of Gaussian basis ``k`` under ``seed``, as float32."""
    i = np.arange(start, start + n, dtype=np.int64)
    w = randint4x(seed, (np.int64(k) << 32) | (i >> 2))
    u = [_uniform(x) for x in w]
    two_pi, m2 = np.float32(6.283185307179586), np.float32(-2.0)
    normals = []
    for u1, u2 in ((u[0], u[1]), (u[2], u[3])):
        u1 = np.maximum(np.float32(1.0e-7), u1)
        th = two_pi * u2
        r = np.sqrt(m2 * np.log(u1))
        normals += [r * np.cos(th), r * np.sin(th)]
    z = np.stack(normals, axis=1)
    return z[np.arange(n), i & 3].astype(np.float32)


BASES = {"rademacher": rademacher, "gaussian": gaussian}


def basis_vector(kind: str, seed: int, k: int, n: int, start: int = 0) -> np.ndarray:
    """Basis ``k`` of the given kind (``"rademacher"`` or ``"gaussian"``); float32 of length ``n``."""
    return BASES[kind](seed, k, n, start)


GROUP = 128  # block indices per Philox call: one group of Rademacher signs


def compress(x: np.ndarray, seed: int, n_coords: int, kind: str = "rademacher", start: int = 0) -> np.ndarray:
    """Coordinates ``<x, v_k>`` for ``k < n_coords`` of a segment at block indices ``start..``, float64.

    Rademacher: bit for bit the spec's summation order (above); Gaussian: the exact fp64 dot.
    """
    if kind != "rademacher":
        x64 = np.asarray(x, dtype=np.float64).ravel()
        return np.array([x64 @ basis_vector(kind, seed, k, x64.size, start) for k in range(n_coords)])
    x = np.asarray(x, dtype=np.float32).ravel()
    if x.size == 0:
        return np.zeros(n_coords)
    first, last = start // GROUP, (start + x.size - 1) // GROUP
    tile = np.zeros((last - first + 1) * GROUP, np.float32)
    tile[start - first * GROUP : start - first * GROUP + x.size] = x
    tile = tile.reshape(-1, GROUP)
    groups = np.arange(first, last + 1, dtype=np.int64)
    elements = np.arange(GROUP)
    out = np.zeros(n_coords)
    for k in range(n_coords):
        words = np.stack(randint4x(seed, (np.int64(k) << 32) | groups), axis=1)  # (groups, 4)
        bits = (words[:, elements >> 5] >> (elements & 31).astype(np.uint32)) & np.uint32(1)
        y = np.where(bits != 0, -tile, tile)
        out[k] = pairwise_tree(group_sums(y).astype(np.float64), first)
    return out


def group_sums(y: np.ndarray) -> np.ndarray:
    """The fp32 group sums of signed values ``y`` (groups x 128) in the spec's order."""
    acc = [np.zeros(y.shape[0], np.float32) for _ in range(4)]
    for q in range(4):
        for m in range(11):
            a = 32 * q + 3 * m
            t = y[:, a] + y[:, a + 1]
            if m < 10:
                t = t + y[:, a + 2]
            acc[m % 4] = acc[m % 4] + t
    return (acc[0] + acc[1]) + (acc[2] + acc[3])


def pairwise_tree(values: np.ndarray, first: int, dtype=np.float64):
    """The root of the pairwise tree over nodes ``values[0], values[1], ..`` (scalars or arrays,
    added in ``dtype``) at absolute indices ``first..``: node ``2j`` plus node ``2j + 1`` level by
    level, absent nodes counting as 0. A float for scalar nodes, else an array of a node's shape."""
    v = np.asarray(values, dtype=dtype)
    zero = np.zeros((1,) + v.shape[1:], dtype=dtype)
    while v.shape[0] > 1:
        if first % 2:
            v, first = np.concatenate([zero, v]), first - 1
        if v.shape[0] % 2:
            v = np.concatenate([v, zero])
        v, first = v[0::2] + v[1::2], first // 2
    root = v[0] if v.shape[0] else zero[0]
    return float(root) if root.ndim == 0 else root


def sum_squares(x: np.ndarray) -> float:
    """``sum(x**2)`` of a tensor in the spec's order: the pairwise tree over the fp64 squares."""
    x = np.asarray(x, dtype=np.float32).ravel().astype(np.float64)
    return pairwise_tree(x * x, 0)


def reconstruct(gamma, seed: int, n: int, scale: float, kind: str = "rademacher",
                out: np.ndarray | None = None, start: int = 0) -> np.ndarray:
    """``out + scale * sum_k gamma_k v_k`` exactly as the spec orders it; float32 of length ``n``.

    ``gamma`` is rounded to float32 first (that is what travels); ``out`` defaults to zeros.
    """
    gamma = np.asarray(gamma, dtype=np.float32)
    acc = np.zeros(n, np.float32)
    for k, g in enumerate(gamma):
        acc = acc + basis_vector(kind, seed, k, n, start) * g
    base = np.zeros(n, np.float32) if out is None else np.asarray(out, dtype=np.float32).ravel()
    return base + acc * np.float32(scale)


def hadamard_chunks(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The SRHT chunks of a block of ``n`` elements for Hadamard size ``size``: (offsets, sizes), int64."""
    full = n // size
    offsets = [np.arange(full, dtype=np.int64) * size]
    sizes = [np.full(full, size, dtype=np.int64)]
    at, rest = full * size, n - full * size
    for bit in reversed(range(rest.bit_length())):
        if rest >> bit & 1:
            offsets.append(np.array([at], dtype=np.int64))
            sizes.append(np.array([1 << bit], dtype=np.int64))
            at += 1 << bit
    return np.concatenate(offsets), np.concatenate(sizes)


def chunk_of(rows, n: int, size: int) -> np.ndarray:
    """Index into :func:`hadamard_chunks` of the chunk holding each row (element index) of a block."""
    offsets, _ = hadamard_chunks(n, size)
    return np.searchsorted(offsets, np.asarray(rows, dtype=np.int64), side="right") - 1


def srht_rows(seed: int, n: int, m: int) -> np.ndarray:
    """The first ``m`` rows of the block's seeded permutation of ``[0, n)`` (int64, see above)."""
    if not 0 <= m <= n:
        raise ValueError(f"an SRHT block of {n} elements has {n} rows; {m} were asked for")
    s = normalize_seed(seed)
    t = np.arange(m, dtype=np.int64)
    w = philox4x32(t & 0xFFFFFFFF, t >> 32, SRHT_ROW_DOMAIN, 0, s & 0xFFFFFFFF, s >> 32)
    u = w[0].astype(np.uint64) | (w[1].astype(np.uint64) << np.uint64(32))
    draws = t + (u % (n - t).astype(np.uint64)).astype(np.int64)
    moved: dict[int, int] = {}
    rows = np.empty(m, dtype=np.int64)
    for k, r in enumerate(draws.tolist()):
        rows[k] = moved.get(r, r)
        moved[r] = moved.get(k, k)
    return rows


def fwht(x: np.ndarray) -> np.ndarray:
    """Unnormalised fast Walsh-Hadamard transform in fp32, butterfly stages h = 1, 2, 4, .. in order."""
    y = np.array(x, dtype=np.float32).ravel()
    h = 1
    while h < y.size:
        pairs = y.reshape(-1, 2, h)
        a, b = pairs[:, 0, :], pairs[:, 1, :]
        y = np.stack([a + b, a - b], axis=1).reshape(-1)
        h *= 2
    return y


def srht_compress(x: np.ndarray, seed: int, m: int, size: int) -> np.ndarray:
    """The ``m`` SRHT coordinates of a whole block ``x`` (Hadamard size ``size``); float32."""
    x = np.asarray(x, dtype=np.float32).ravel()
    rows = srht_rows(seed, x.size, m)
    offsets, sizes = hadamard_chunks(x.size, size)
    owner = chunk_of(rows, x.size, size)
    coords = np.empty(m, dtype=np.float32)
    signs = rademacher(seed, 0, x.size)
    for c in np.unique(owner):
        o, sz = int(offsets[c]), int(sizes[c])
        y = fwht(signs[o : o + sz] * x[o : o + sz])
        mine = owner == c
        coords[mine] = y[rows[mine] - o]
    return coords


def srht_reconstruct(coords, seed: int, n: int, scale, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """``out`` plus the SRHT estimate from ``coords`` exactly as the spec orders it; float32 of length ``n``.

    ``scale`` is the fp32 ``alpha * n / m``; ``out`` defaults to zeros.
    """
    coords = np.asarray(coords, dtype=np.float32)
    rows = srht_rows(seed, n, coords.size)
    offsets, sizes = hadamard_chunks(n, size)
    owner = chunk_of(rows, n, size)
    out = np.zeros(n, np.float32) if out is None else np.array(out, dtype=np.float32).ravel()
    signs = rademacher(seed, 0, n)
    for c in np.unique(owner):
        o, sz = int(offsets[c]), int(sizes[c])
        z = np.zeros(sz, np.float32)
        mine = owner == c
        z[rows[mine] - o] = coords[mine]
        factor = np.float32(scale) * np.float32(1.0 / sz)
        out[o : o + sz] = out[o : o + sz] + (signs[o : o + sz] * fwht(z)) * factor
    return out


MAX_DENSE_SIZE = 1 << 22


def pow2(v: int) -> int:
    """The smallest power of two at or above ``v`` (1 for ``v <= 1``)."""
    return 1 << max(int(v) - 1, 0).bit_length()


def dense_block_size(size: int, n: int, slots: int = 1) -> int:
    """The Hadamard size of a block of ``n`` elements under a Hadamard basis of size ``size``."""
    return min(size, max(pow2(n), pow2(slots)))


def dense_slot_rows(block_size: int, slot: int = 0, slots: int = 1) -> int:
    """How many rows slot ``slot`` of ``slots`` holds in a block of Hadamard size ``block_size``."""
    return max(0, (block_size - slot + slots - 1) // slots)


def dense_rows(seed: int, block_size: int, m: int, slot: int = 0, slots: int = 1) -> np.ndarray:
    """The ``m`` rows (int64) of slot ``slot`` of ``slots`` in a block of Hadamard size ``block_size``."""
    if not 0 <= slot < slots or not 0 <= m <= dense_slot_rows(block_size, slot, slots):
        raise ValueError(f"slot {slot} of {slots} holds {dense_slot_rows(block_size, slot, slots)} of "
                         f"{block_size} rows; {m} were asked for")
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    return srht_rows(seed, block_size, slot + slots * (m - 1) + 1)[slot::slots]


def dense_lanes(seed: int, chunks, size: int) -> np.ndarray:
    """The lane masks ``s_c`` (int64) of chunks ``chunks`` of a block of Hadamard size ``size``."""
    c = np.asarray(chunks, dtype=np.int64)
    s = normalize_seed(seed)
    w = philox4x32(c & 0xFFFFFFFF, c >> 32, DENSE_LANE_DOMAIN, 0, s & 0xFFFFFFFF, s >> 32)
    return (w[0] & np.uint32(size - 1)).astype(np.int64)


def dense_fold(x: np.ndarray, seed: int, size: int, start: int = 0) -> np.ndarray:
    """The fold of a segment at block indices ``start..`` (float32 array of ``size``): the pairwise
    tree over chunks of its signed elements, each chunk in its lane order, the rest of each chunk
    counting as 0."""
    x = np.asarray(x, dtype=np.float32).ravel()
    if x.size == 0:
        return np.zeros(size, np.float32)
    first, last = start // size, (start + x.size - 1) // size
    tile = np.zeros((last - first + 1) * size, np.float32)
    tile[start - first * size : start - first * size + x.size] = x * rademacher(seed, 0, x.size, start)
    tile = tile.reshape(-1, size)
    lanes = np.arange(size)[None, :] ^ dense_lanes(seed, np.arange(first, last + 1), size)[:, None]
    return pairwise_tree(np.take_along_axis(tile, lanes, axis=1), first, np.float32)


def dense_compress(segments, seed: int, m: int, size: int, slot: int = 0, slots: int = 1) -> np.ndarray:
    """The ``m`` Hadamard coordinates (float32) of a block given as ``(x, start)`` segments, for
    the block's Hadamard size ``size`` (:func:`dense_block_size`) and slot ``slot`` of ``slots``."""
    y = np.zeros(size, np.float32)
    for x, start in segments:
        y = y + dense_fold(x, seed, size, start)
    return fwht(y)[dense_rows(seed, size, m, slot, slots)]


def dense_reconstruct(coords, seed: int, n: int, scale, size: int, slot: int = 0, slots: int = 1,
                      out: np.ndarray | None = None) -> np.ndarray:
    """``out`` plus the Hadamard estimate from ``coords``, exactly as the spec orders it; float32 of
    length ``n``. ``scale`` is the fp32 ``alpha / m``; ``out`` defaults to zeros."""
    coords = np.asarray(coords, dtype=np.float32)
    z = np.zeros(size, np.float32)
    z[dense_rows(seed, size, coords.size, slot, slots)] = coords
    z = fwht(z)
    out = np.zeros(n, np.float32) if out is None else np.array(out, dtype=np.float32).ravel()
    i = np.arange(n, dtype=np.int64)
    lanes = (i & (size - 1)) ^ dense_lanes(seed, np.arange(-(-n // size)), size)[i // size]
    return out + (rademacher(seed, 0, n) * z[lanes]) * np.float32(scale)
