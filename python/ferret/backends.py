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
    chunk size; dense Hadamard: the block's own size) and its row ``slot`` of ``slots``."""

    segments: list
    n: int
    seed: int
    kind: str
    hadamard: int = 0
    slot: int = 0
    slots: int = 1


class CoreBackend:
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

    def sum_squares(self, flats) -> np.ndarray:
        """``sum(x**2)`` of each buffer in the spec's order (fp64)."""
        self._use_threads()
        return np.array(self._core.sum_squares_many(list(flats)), dtype=np.float64)

    def compress(self, blocks: list[Block], counts) -> list[np.ndarray]:
        """Each block's ``counts[b]`` coordinates: fp64 (Rademacher, Gaussian) or fp32 (Hadamard kinds)."""
        self._use_threads()
        out, dense = [], []
        for block, m in zip(blocks, counts):
            m = int(m)
            if block.kind == "hadamard":  # all of them below, in one call
                coords = np.zeros(m, dtype=np.float32)
                dense.append((*_segment_lists(block), block.n, block.seed, _log2(block.hadamard), block.slot,
                              block.slots, coords))
            elif block.kind == "srht":
                coords = np.zeros(m, dtype=np.float32)
                self._core.srht_compress(*_segment_lists(block), block.n, block.seed, _log2(block.hadamard), coords)
            else:
                coords = np.zeros(m, dtype=np.float64)
                for x, start in block.segments:  # segment sums added in layout order, from 0
                    self._core.compress(x, start, block.seed, BASIS_CODES[block.kind], coords)
            out.append(coords)
        if dense:  # the pool takes every dense block's pieces at once
            self._core.dense_compress_many(dense)
        return out

    def reconstruct(self, blocks: list[Block], coords: list[np.ndarray], scales: list[np.float32]) -> None:
        """Add each block's estimate from its fp32 ``coords``, times its ``scale``, in place."""
        self._use_threads()
        for block, c, scale in zip(blocks, coords, scales):
            c = np.ascontiguousarray(c, dtype=np.float32)
            if block.kind == "hadamard":
                self._core.dense_reconstruct(*_segment_lists(block), block.n, block.seed, _log2(block.hadamard),
                                             block.slot, block.slots, c, float(scale))
                continue
            if block.kind == "srht":
                self._core.srht_reconstruct(*_segment_lists(block), block.n, block.seed, _log2(block.hadamard), c,
                                            float(scale))
                continue
            for x, start in block.segments:
                self._core.reconstruct(x, start, block.seed, BASIS_CODES[block.kind], c, float(scale))

    def perturb(self, flat, seed: int, basis: str, eps: float) -> None:
        """``flat += eps * v_0(seed)`` in place."""
        self._use_threads()
        self._core.perturb(flat, 0, seed, BASIS_CODES[basis], eps)


class TritonBackend:
    """The Triton kernels (``ferret.kernels``); CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""

    name = "triton"

    def __init__(self):
        try:
            from .kernels import hadamard, projection, srht
        except ImportError as err:  # triton is the optional [gpu] extra
            raise RuntimeError("CUDA tensors need Triton: pip install 'ferret-fl[gpu]'") from err
        from . import _core

        self._k, self._srht, self._dense, self._core = projection, srht, hadamard, _core

    def sum_squares(self, flats) -> np.ndarray:
        if not flats:
            return np.zeros(0)
        return torch.stack([self._k.sum_squares(x) for x in flats]).cpu().numpy()

    def compress(self, blocks: list[Block], counts) -> list[np.ndarray]:
        if not blocks:
            return []
        device = blocks[0].segments[0][0].device
        tables = self._tables(blocks, counts, device)
        dense, jobs = _dense_jobs(blocks, tables)
        dense_coords = dict(zip(dense, self._dense.compress(jobs)))  # batched: one transform per Hadamard size
        out = []
        for b, (block, m, table) in enumerate(zip(blocks, counts, tables)):
            m = int(m)
            if block.kind == "hadamard":
                out.append(dense_coords[b])
                continue
            if block.kind == "srht":
                offsets, sizes, slots, _ = table
                out.append(self._srht.compress(block.segments, block.seed, offsets, sizes, slots, block.hadamard))
                continue
            coords = None
            for x, start in block.segments:  # segment sums added in layout order
                seg = self._k.compress(x, start, block.seed, BASIS_CODES[block.kind], m)
                coords = seg if coords is None else coords + seg
            out.append(coords)
        # The packet's one synchronisation; + 0.0 is the core's start from 0 (it turns -0 into +0).
        host = torch.cat([c.double() for c in out]).cpu().numpy() + 0.0
        pieces = np.split(host, np.cumsum([int(m) for m in counts])[:-1])
        return [p.astype(np.float32) if b.kind in _FP32_KINDS else p for b, p in zip(blocks, pieces)]

    def reconstruct(self, blocks: list[Block], coords: list[np.ndarray], scales: list[np.float32]) -> None:
        if not blocks:
            return
        device = blocks[0].segments[0][0].device
        sizes = [c.size for c in coords]
        sent = torch.from_numpy(np.concatenate([np.asarray(c, dtype=np.float32) for c in coords])).to(device)
        tables = self._tables(blocks, sizes, device)
        received = torch.split(sent, sizes)
        dense, jobs = _dense_jobs(blocks, tables)
        self._dense.reconstruct_(jobs, [received[b] for b in dense], [scales[b] for b in dense])
        for block, c, scale, table in zip(blocks, received, scales, tables):
            if block.kind == "hadamard":
                continue
            if block.kind == "srht":
                offsets, chunk_sizes, slots, factors = table
                factors = factors * float(scale)  # exact: an fp32 scale times a power of two
                self._srht.reconstruct_(block.segments, block.seed, offsets, chunk_sizes, slots, c, factors,
                                        block.hadamard)
                continue
            for x, start in block.segments:
                self._k.reconstruct_(x, start, block.seed, BASIS_CODES[block.kind], c, float(scale))

    def perturb(self, flat, seed: int, basis: str, eps: float) -> None:
        self._k.perturb_(flat, 0, seed, BASIS_CODES[basis], eps)

    def _tables(self, blocks: list[Block], counts, device) -> list:
        """The host-made tables of each block, on ``device`` in one transfer (made before the
        packet's kernels are queued, which the transfer would wait for): for SRHT (offsets, sizes,
        slots, 1/size factors) of the chunks holding one of its rows, for dense Hadamard (rows,) of
        its slot, None for the others."""
        host = []
        for b, m in zip(blocks, counts):
            if b.kind == "srht":
                host.append(_srht_table(self._core, b.n, b.seed, b.hadamard, int(m)))
            elif b.kind == "hadamard":
                host.append(_dense_table(self._core, b, int(m)))
            else:
                host.append(None)
        arrays = [a for t in host if t is not None for a in t]
        if not arrays:
            return host
        lengths = [a.size for a in arrays]
        sent = torch.split(torch.from_numpy(np.concatenate(arrays)).to(device), lengths)
        tables, at = [], 0
        for t in host:
            if t is None:
                tables.append(None)
            elif len(t) == 1:
                tables.append(sent[at : at + 1])
            else:
                offsets, sizes, slots, factors = sent[at : at + 4]
                tables.append((offsets, sizes, slots, factors.view(torch.float64).float()))
            at += 0 if t is None else len(t)
        return tables


_FP32_KINDS = ("srht", "hadamard")  # kinds whose coordinates are fp32 (the others: fp64)


def _dense_jobs(blocks: list[Block], tables: list):
    """The indices of a packet's dense Hadamard blocks and their jobs for ``kernels.hadamard``:
    (segments, seed, Hadamard size, rows on the device)."""
    dense = [b for b, block in enumerate(blocks) if block.kind == "hadamard"]
    return dense, [(blocks[b].segments, blocks[b].seed, blocks[b].hadamard, tables[b][0]) for b in dense]


def _dense_table(core, block: Block, m: int):
    """The rows (int64) of a dense Hadamard block's slot, its first m, as a one-array table."""
    rows = np.zeros(m, dtype=np.int64)
    core.dense_rows(block.seed, _log2(block.hadamard), block.slot, block.slots, rows)
    return (rows,)


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

    _, sizes, slots, _ = _srht_table(_core, block.n, block.seed, block.hadamard, a.size)
    per_chunk = np.bincount(slots // block.hadamard, weights=a, minlength=sizes.size) * _rounding_growth(
        block.hadamard.bit_length())
    return float(np.max(per_chunk / sizes)) if float(np.max(per_chunk)) <= FP32_MAX else math.inf


def _rounding_growth(steps: int) -> float:
    """Generously above (1 + 2**-24) ** steps: how far fp32 rounding can grow a chain of additions."""
    return math.exp((steps + 8) * 2.0**-23)


def _srht_table(core, block_n: int, seed: int, size: int, m: int):
    """The chunks of a block that hold one of its first m rows (offsets, sizes), each row's slot in
    the kernels' tile, and each chunk's 1/size (as int64-sized float64, to travel in one transfer)."""
    rows = np.zeros(m, dtype=np.int64)
    core.srht_rows(seed, block_n, rows)
    offsets, sizes = spec.hadamard_chunks(block_n, size)
    owner = np.searchsorted(offsets, rows, side="right") - 1  # spec.chunk_of, on the offsets at hand
    touched, position = np.unique(owner, return_inverse=True)
    slots = position * size + rows - offsets[owner]
    factors = (np.float32(1.0) / sizes[touched].astype(np.float32)).astype(np.float64).view(np.int64)
    return offsets[touched], sizes[touched], slots, factors


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
