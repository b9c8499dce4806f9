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
* **Coordinates** ``gamma_k = <x, v_k>`` (computed once by the sender; fp64 here).
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


def compress(x: np.ndarray, seed: int, n_coords: int, kind: str = "rademacher", start: int = 0) -> np.ndarray:
    """Coordinates ``<x, v_k>`` for ``k < n_coords``, in float64; ``x`` sits at block indices ``start..``."""
    x64 = np.asarray(x, dtype=np.float64).ravel()
    return np.array([x64 @ basis_vector(kind, seed, k, x64.size, start) for k in range(n_coords)])


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
