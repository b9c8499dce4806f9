"""Where the loops run: the compiled CPU core for CPU tensors and NumPy arrays, the Triton kernels
for CUDA tensors. Both take 1-d contiguous buffers and block-relative offsets; neither knows about
layouts or packets.

A backend works a whole packet at a time (:class:`Block` jobs), so the Triton backend can launch
every kernel of a packet and synchronise with the host once: norms come back in one transfer,
coordinates in another, and a reconstruction sends all coordinates in one.

The core's thread count follows torch's (``torch.set_num_threads``, ``OMP_NUM_THREADS``), so
ferret and torch share a machine without oversubscribing it, unless :func:`set_num_threads` or
the ``FERRET_NUM_THREADS`` environment variable sets it explicitly.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from . import spec
from .tensors import FP32_MAX

BASIS_CODES = {"rademacher": 0, "gaussian": 1}
GAUSSIAN_MAX = 6.0  # above every |v| of the Gaussian basis: Box-Muller with u1 >= 1e-7 gives at most 5.68


def _threads_from_env() -> int | None:
    value = os.environ.get("FERRET_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


_threads_override: int | None = _threads_from_env()


def set_num_threads(n: int | None) -> int | None:
    """Threads for the compiled core's loops: ``n`` (a positive int) from now on, whatever torch
    uses; ``None`` to follow ``torch.get_num_threads()`` again (the default, unless the
    ``FERRET_NUM_THREADS`` environment variable was set). Returns the previous setting (an int
    or ``None``), to restore it. Raises ``ValueError`` for ``n < 1`` and ``TypeError`` for a
    non-int."""
    global _threads_override
    if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
        raise TypeError(f"a thread count is an int or None, got {type(n).__name__}")
    if n is not None and n < 1:
        raise ValueError(f"a thread count must be positive (None follows torch), got {n}")
    previous, _threads_override = _threads_override, n
    return previous


def num_threads() -> int:
    """The number of threads the core's next call will use: the :func:`set_num_threads` /
    ``FERRET_NUM_THREADS`` override if there is one, else ``torch.get_num_threads()``."""
    return _threads_override if _threads_override is not None else torch.get_num_threads()


@dataclass(frozen=True)
class Block:
    """One block of a packet: its ``segments`` (``(buffer, offset in the block)`` pairs, in layout
    order), its element count ``n``, its seed, its basis ``kind``, its Hadamard size (SRHT: the
    chunk size; dense Hadamard: the block's own size), its row ``slot`` of ``slots``, and for a
    compress against a start, each segment's ``bases`` buffer (the block holds segment − base)."""

    segments: list
    n: int
    seed: int
    kind: str
    hadamard: int = 0
    slot: int = 0
    slots: int = 1
    bases: list | None = None
    rows: np.ndarray | None = None  # a dense block's rows named one by one (a merged packet of several slots)


class _Backend:
    """What every backend does the same way on top of its kernels."""

    def compress_by_norms(self, blocks: list[Block], counts_from) -> tuple[list[np.ndarray], np.ndarray]:
        """Compress with coordinates per block chosen from the update: ``counts_from(squares)``
        gets each block's segments' sums of squares (lists, in layout order) and returns the
        counts (or raises, before anything is compressed). Returns (coordinates, counts)."""
        flats = [x for block in blocks for x, _ in block.segments]
        bases = [x for block in blocks for x in block.bases] if blocks and blocks[0].bases is not None else None
        squares = iter(self.sum_squares(flats, bases))
        counts = counts_from([[next(squares) for _ in block.segments] for block in blocks])
        return self.compress(blocks, counts), counts


FUSED_FOLDS = 1 << 24  # fp32 folds the core keeps between the norms and the coordinates (64 MiB)


class CoreBackend(_Backend):
    """The compiled C++ core (``ferret._core``)."""

    name = "core"

    def __init__(self):
        from . import _core

        self._core = _core

    def _use_threads(self) -> None:
        """Hand :func:`num_threads` to the core before its loops run (two int reads when unchanged)."""
        n = num_threads()
        if self._core.num_threads() != n:
            self._core.set_num_threads(n)

    def sum_squares(self, flats, bases=None) -> np.ndarray:
        """``sum(x**2)`` of each buffer in the spec's order (fp64); with ``bases``, of each buffer
        minus its base."""
        self._use_threads()
        return np.array(self._core.sum_squares_many(list(flats), None if bases is None else list(bases)),
                        dtype=np.float64)

    def compress(self, blocks: list[Block], counts) -> list[np.ndarray]:
        """Each block's ``counts[b]`` coordinates: fp64 (Rademacher, Gaussian) or fp32 (Hadamard kinds)."""
        self._use_threads()
        out, dense = [], []
        for block, m in zip(blocks, counts):
            m = int(m)
            if block.kind == "hadamard":  # all of them below, in one call
                coords = np.zeros(m, dtype=np.float32)
                dense.append((*_segment_lists(block), block.n, block.seed, _log2(block.hadamard), block.slot,
                              block.slots, coords, block.bases))
            elif block.kind == "srht":
                coords = np.zeros(m, dtype=np.float32)
                self._core.srht_compress(*_segment_lists(block), block.n, block.seed, _log2(block.hadamard), coords,
                                         block.bases)
            else:
                coords = np.zeros(m, dtype=np.float64)
                bases = block.bases or [None] * len(block.segments)
                for (x, start), base in zip(block.segments, bases):  # segment sums added in layout order, from 0
                    self._core.compress(x, start, block.seed, BASIS_CODES[block.kind], coords, base)
            out.append(coords)
        if dense:  # the pool takes every dense block's pieces at once
            self._core.dense_compress_many(dense)
        return out

    def compress_by_norms(self, blocks: list[Block], counts_from) -> tuple[list[np.ndarray], np.ndarray]:
        """As :meth:`_Backend.compress_by_norms`; dense Hadamard blocks whose segments start on a
        chunk (one tensor a block, the default grouping) give their sums of squares from the
        fold's own read of the update, so the norms cost no second pass."""
        if not (blocks and all(b.kind == "hadamard" and all(start % b.hadamard == 0 for _, start in b.segments)
                               for b in blocks) and sum(b.hadamard for b in blocks) <= FUSED_FOLDS):
            return super().compress_by_norms(blocks, counts_from)
        self._use_threads()
        folds = [np.zeros(b.hadamard, dtype=np.float32) for b in blocks]
        squares = [np.zeros(len(b.segments)) for b in blocks]
        self._core.dense_fold_many([(*_segment_lists(b), b.n, b.seed, _log2(b.hadamard), fold, sq, b.bases)
                                    for b, fold, sq in zip(blocks, folds, squares)])
        counts = counts_from(squares)
        coords = [np.zeros(int(m), dtype=np.float32) for m in counts]
        self._core.dense_pick_many([(b.seed, _log2(b.hadamard), b.slot, b.slots, fold, c)
                                    for b, fold, c in zip(blocks, folds, coords)])
        return coords, counts

    def reconstruct(self, blocks: list[Block], coords: list[np.ndarray], scales: list[np.float32]) -> None:
        """Add each block's estimate from its fp32 ``coords``, times its ``scale``, in place."""
        self._use_threads()
        dense = []  # every dense block in one call: their transforms and windows share the pool
        for block, c, scale in zip(blocks, coords, scales):
            c = np.ascontiguousarray(c, dtype=np.float32)
            if block.kind == "hadamard":
                dense.append((*_segment_lists(block), block.n, block.seed, _log2(block.hadamard), block.slot,
                              block.slots, c, float(scale), block.rows))
                continue
            if block.kind == "srht":
                self._core.srht_reconstruct(*_segment_lists(block), block.n, block.seed, _log2(block.hadamard), c,
                                            float(scale))
                continue
            for x, start in block.segments:
                self._core.reconstruct(x, start, block.seed, BASIS_CODES[block.kind], c, float(scale))
        if dense:
            self._core.dense_reconstruct_many(dense)

    def perturb(self, flats, seeds, basis: str, eps: float) -> None:
        """``flat += eps * v_0(seed)`` in place for each buffer and its seed."""
        self._use_threads()
        for flat, seed in zip(flats, seeds):
            self._core.perturb(flat, 0, seed, BASIS_CODES[basis], eps)


class TritonBackend(_Backend):
    """The Triton kernels (``ferret.kernels``); CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.

    Every call works a whole packet with a fixed number of launches whatever its number of
    tensors (the kernels walk tables of segments): blocks are gathered by kind, each kind's
    blocks go to its kernels at once, and the host waits on the device once, for the
    coordinates of a compress."""

    name = "triton"

    def __init__(self):
        try:
            from .kernels import groups, hadamard, projection, srht
        except ImportError as err:  # triton is the optional [gpu] extra
            raise RuntimeError("CUDA tensors need Triton: pip install 'ferret-fl[gpu]'") from err
        from . import _core

        self._k, self._srht, self._dense, self._groups, self._core = projection, srht, hadamard, groups, _core

    def sum_squares(self, flats, bases=None) -> np.ndarray:
        if not flats:
            return np.zeros(0)
        return self._k.sum_squares_many(list(flats), bases).cpu().numpy()

    def compress(self, blocks: list[Block], counts) -> list[np.ndarray]:
        if not blocks:
            return []
        counts = [int(m) for m in counts]
        kinds = _by_kind(blocks)
        parts = []
        for kind, members in kinds.items():
            if kind in BASIS_CODES:  # each segment's coordinates, summed per block on the host
                segments = [(x, start, blocks[b].seed, counts[b], base) for b in members
                            for (x, start), base in zip(blocks[b].segments, _bases(blocks[b]))]
                parts.append(self._k.compress_many(segments, BASIS_CODES[kind]))
            elif kind == "hadamard":
                parts.append(self._dense.compress([self._dense_job(blocks[b], counts[b]) for b in members]))
            else:
                parts.append(self._srht.compress([self._srht_job(blocks[b], counts[b]) for b in members]))
        # The packet's one synchronisation; + 0.0 is the core's start from 0 (it turns -0 into +0).
        host = torch.cat([p.double() for p in parts]).cpu().numpy() + 0.0
        out, at = [None] * len(blocks), 0
        for kind, members in kinds.items():
            for b in members:
                if kind in BASIS_CODES:
                    coords = np.zeros(counts[b])
                    for _ in blocks[b].segments:  # segment sums added in layout order, from 0
                        coords = coords + host[at : at + counts[b]]
                        at += counts[b]
                    out[b] = coords
                else:
                    out[b] = host[at : at + counts[b]].astype(np.float32)
                    at += counts[b]
        return out

    def reconstruct(self, blocks: list[Block], coords: list[np.ndarray], scales: list[np.float32]) -> None:
        if not blocks:
            return
        device = blocks[0].segments[0][0].device
        kinds = _by_kind(blocks)
        order = [b for members in kinds.values() for b in members]
        host = np.concatenate([np.asarray(coords[b], dtype=np.float32) for b in order])
        sent, at = self._groups.to_device(host, device), 0
        for kind, members in kinds.items():
            size = sum(np.size(coords[b]) for b in members)
            mine = sent[at : at + size]
            if kind in BASIS_CODES:
                segments, offset = [], 0
                for b in members:
                    m = np.size(coords[b])
                    segments += [(x, start, blocks[b].seed, offset, m, scales[b]) for x, start in blocks[b].segments]
                    offset += m
                self._k.reconstruct_many_(segments, BASIS_CODES[kind], mine)
            elif kind == "hadamard":
                self._dense.reconstruct_([self._dense_job(blocks[b], np.size(coords[b])) for b in members], mine,
                                         [float(scales[b]) for b in members])
            else:
                jobs = [self._srht_job(blocks[b], np.size(coords[b])) for b in members]
                factors = [_srht_factors(job[4]) * np.float32(scales[b]) for b, job in zip(members, jobs)]
                self._srht.reconstruct_(jobs, mine, factors)
            at += size

    def perturb(self, flats, seeds, basis: str, eps: float) -> None:
        flats = list(flats)
        if flats:  # v_0 * 1 is exact, so a reconstruction from the coordinate 1 is the spec's rounding
            one = self._groups.to_device(np.ones(1, dtype=np.float32), flats[0].device)
            self._k.reconstruct_many_([(x, 0, seed, 0, 1, eps) for x, seed in zip(flats, seeds)], BASIS_CODES[basis],
                                      one)

    def _dense_job(self, block: Block, m: int):
        """A dense Hadamard block's job for ``kernels.hadamard``: (segments, seed, size, its first
        m rows of its slot, on the host)."""
        if block.rows is not None:
            return block.segments, block.seed, block.hadamard, block.rows, block.bases
        rows = np.zeros(m, dtype=np.int64)
        self._core.dense_rows(block.seed, _log2(block.hadamard), block.slot, block.slots, rows)
        return block.segments, block.seed, block.hadamard, rows, block.bases

    def _srht_job(self, block: Block, m: int):
        """An SRHT block's job for ``kernels.srht``: (segments, seed, size, offsets, sizes, slots)."""
        offsets, sizes, slots = _srht_table(self._core, block.n, block.seed, block.hadamard, m)
        return block.segments, block.seed, block.hadamard, offsets, sizes, slots, block.bases


def _bases(block: Block) -> list:
    """Each segment's base buffer, None for a block compressed as it is."""
    return block.bases if block.bases is not None else [None] * len(block.segments)


def _by_kind(blocks: list[Block]) -> dict[str, list[int]]:
    """{basis kind: [block indices]}, kinds in order of first appearance."""
    kinds: dict[str, list[int]] = {}
    for b, block in enumerate(blocks):
        kinds.setdefault(block.kind, []).append(b)
    return kinds


def _srht_factors(sizes: np.ndarray) -> np.ndarray:
    """1 / size (fp32) of each chunk: a power of two, so a scale times it is exact."""
    return np.float32(1.0) / np.asarray(sizes).astype(np.float32)


def estimate_bound(block: Block, coords) -> float:
    """A bound on every |element| of a block's estimate from ``coords``, before the scale, with
    fp32 rounding included, or ``inf`` where the fp32 sum itself could overflow: Rademacher and
    dense Hadamard ``Σ|γ_k|``, Gaussian ``6 Σ|γ_k|``; SRHT, per chunk holding a row, ``Σ|γ_k|``
    over its rows bounds ``fwht`` and that over the chunk's size the estimate. Both backends
    compute the same estimate, so one bound serves them."""
    a = np.abs(np.asarray(coords, dtype=np.float64))
    if block.kind == "hadamard":
        acc = float(a.sum()) * _rounding_growth(block.hadamard.bit_length() + 1)
        return acc if acc <= FP32_MAX else math.inf
    if block.kind != "srht":
        acc = float(a.sum()) * (GAUSSIAN_MAX if block.kind == "gaussian" else 1.0) * _rounding_growth(a.size + 1)
        return acc if acc <= FP32_MAX else math.inf
    from . import _core

    _, sizes, slots = _srht_table(_core, block.n, block.seed, block.hadamard, a.size)
    per_chunk = np.bincount(slots // block.hadamard, weights=a, minlength=sizes.size) * _rounding_growth(
        block.hadamard.bit_length())
    return float(np.max(per_chunk / sizes)) if float(np.max(per_chunk)) <= FP32_MAX else math.inf


def estimate_bounds(blocks: list[Block], coords) -> list[float]:
    """:func:`estimate_bound` of every block, the sums of |γ| of all blocks but SRHT ones taken
    in one pass (a packet of many blocks pays no per-block NumPy calls)."""
    sizes = [np.size(c) for c in coords]
    owner = np.repeat(np.arange(len(blocks)), sizes)
    parts = [np.asarray(c, dtype=np.float64).ravel() for c in coords]
    sums = np.bincount(owner, weights=np.abs(np.concatenate(parts)) if parts else None, minlength=len(blocks))
    bounds = []
    for block, c, total, m in zip(blocks, coords, sums.tolist(), sizes):
        if block.kind == "srht":
            bounds.append(estimate_bound(block, c))
            continue
        if block.kind == "hadamard":
            acc = total * _rounding_growth(block.hadamard.bit_length() + 1)
        else:
            acc = total * (GAUSSIAN_MAX if block.kind == "gaussian" else 1.0) * _rounding_growth(m + 1)
        bounds.append(acc if acc <= FP32_MAX else math.inf)
    return bounds


def _rounding_growth(steps: int) -> float:
    """Generously above (1 + 2**-24) ** steps: how far fp32 rounding can grow a chain of additions."""
    return math.exp((steps + 8) * 2.0**-23)


def _srht_table(core, block_n: int, seed: int, size: int, m: int):
    """The chunks of a block that hold one of its first m rows (offsets, sizes) and each row's
    slot in the kernels' tile (chunk place * size + row - offset), on the host."""
    rows = np.zeros(m, dtype=np.int64)
    core.srht_rows(seed, block_n, rows)
    offsets, sizes = spec.hadamard_chunks(block_n, size)
    owner = np.searchsorted(offsets, rows, side="right") - 1  # spec.chunk_of, on the offsets at hand
    touched, position = np.unique(owner, return_inverse=True)
    slots = position * size + rows - offsets[owner]
    return offsets[touched], sizes[touched], slots


def _segment_lists(block: Block):
    return [x for x, _ in block.segments], [s for _, s in block.segments]


def _log2(size: int) -> int:
    return size.bit_length() - 1


_BACKENDS: dict[str, object] = {}


def backend_for(device: torch.device, choice: str | None):
    """The backend for tensors on ``device``; ``choice`` ("core" / "triton") overrides the default."""
    name = choice or ("triton" if device.type == "cuda" else "core")
    if name not in ("core", "triton"):
        raise ValueError(f"unknown backend {name!r}: use 'core' or 'triton'")
    if name == "core" and device.type != "cpu":
        raise ValueError(f"the CPU core cannot read tensors on {device}")
    if name not in _BACKENDS:
        _BACKENDS[name] = CoreBackend() if name == "core" else TritonBackend()
    return _BACKENDS[name]
