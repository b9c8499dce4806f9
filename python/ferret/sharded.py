"""Updates sharded over ranks: each rank holds part of every tensor (FSDP2's DTensors sharded on
dim 0, or :class:`Shard`s: a local part and where it sits in the whole), and the packet is the
one the whole update would give, byte for byte.

Compress (dense Hadamard bases): a block's fold and each tensor's sum of squares are pairwise
trees over absolute indices (:mod:`ferret.spec`), so each rank computes the roots of the largest
aligned subtrees inside its part (whole chunks; elements for the squares) and the chunks it
holds only part of (their other lanes zero), the ranks exchange those nodes (O(B log n) numbers a
tensor), and every rank adds them up in the tree's own order: the whole update's fold and norms,
then its packet. Reconstruct writes each rank's part in place, with no communication.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .basis import basis_name, dense_size, parse_basis
from .layout import Layout
from .packet import Packet
from .spec import block_seeds, dense_block_size


@dataclass(frozen=True)
class Shard:
    """A rank's part of one tensor, for updates sharded some other way than DTensors: ``local``
    (contiguous) holds elements ``offset ..`` of the whole tensor of ``shape``, flattened in
    row-major order. Pass them where ferret takes tensors (``compress(update)``,
    ``reconstruct(into=)``, ``Round``); every rank calls with its own, and together they must
    cover each tensor exactly once (a tensor whole on every rank counts once)."""

    local: torch.Tensor
    offset: int
    shape: tuple

    def __post_init__(self):
        if not isinstance(self.local, torch.Tensor):
            raise TypeError(f"a Shard's local part is a torch tensor, got {type(self.local).__name__}")
        numel = math.prod(self.shape)
        if not 0 <= self.offset <= self.offset + self.local.numel() <= numel:
            raise ValueError(f"a shard of {self.local.numel()} elements at {self.offset} does not fit a tensor of "
                             f"{numel}")


def shards_of(items) -> list[tuple[str, Shard]] | None:
    """``items`` (``(name, tensor)`` pairs) as :class:`Shard`s when any of them is sharded (a
    DTensor or a Shard), else None. A DTensor sharded on dim 0 gives its local rows, a replicated
    one the whole tensor (a compress counts it on the first rank only)."""
    if not any(isinstance(x, Shard) or _is_dtensor(x) for _, x in items):
        return None
    return [(name, _as_shard(x)) for name, x in items]


def _is_dtensor(x) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(x, DTensor)


def _as_shard(x) -> Shard:
    """A :class:`Shard` of a tensor, a Shard or a DTensor (sharded on dim 0, or replicated)."""
    if isinstance(x, Shard):
        return x
    if not _is_dtensor(x):
        return Shard(x, 0, tuple(x.shape))
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor import Shard as Dim
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if x.device_mesh.ndim != 1 or not isinstance(x.placements[0], (Dim, Replicate)) or (
            isinstance(x.placements[0], Dim) and x.placements[0].dim != 0):
        raise ValueError(f"ferret reads DTensors sharded on dim 0 or replicated over a 1-d mesh, got "
                         f"{x.placements}")
    local = x.to_local()
    if isinstance(x.placements[0], Replicate):
        return Shard(local, 0, tuple(x.shape))
    _, offset = compute_local_shape_and_global_offset(x.shape, x.device_mesh, x.placements)
    row = math.prod(x.shape[1:])
    return Shard(local, int(offset[0]) * row if local.numel() else 0, tuple(x.shape))


def compress_sharded(shards: list[tuple[str, Shard]], seed: int, budget: int, *, basis: str, allocation: str,
                     grouping: int, slot: int, slots: int, backend: str | None = None, group=None) -> Packet:
    """The packet of the whole update from every rank's :class:`Shard`s (each rank calls it with
    its own; collective over ``group``): byte for byte the unsharded :func:`ferret.compress`'s.
    Shards on CUDA (or ``backend="triton"``) are read by the Triton kernels, others by the core.
    Dense Hadamard bases only; raises ``ValueError`` for others."""
    import torch.distributed as dist

    from . import _core
    from .projection import block_counts

    kind, size = parse_basis(basis)
    if kind != "hadamard":
        raise ValueError(f"a sharded update compresses with the dense hadamard basis, not {basis!r}")
    layout = Layout([(n, tuple(s.shape)) for n, s in shards], grouping)
    size = size or dense_size(budget, slots)
    seeds = block_seeds(seed, layout.n_blocks)
    sizes = [dense_block_size(size, layout.block_sizes[layout.entries[i].block], slots) for i in range(len(shards))]
    replicated = [s.local.numel() == math.prod(s.shape) and s.offset == 0 for _, s in shards]
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    mine = []  # (entry, kind, level, index, values) of this rank's nodes
    for i, (_, s) in enumerate(shards):
        if replicated[i] and rank != 0:
            continue  # a whole tensor on every rank counts once
        flat = s.local.detach().reshape(-1)
        reader = _TritonReader() if backend == "triton" or (backend is None and flat.is_cuda) else _CoreReader(_core)
        entry = layout.entries[i]
        mine += _square_nodes(reader, i, flat, s.offset)
        mine += _fold_nodes(reader, i, flat, entry.offset + s.offset, layout.block_sizes[entry.block],
                            seeds[entry.block], sizes[i])
    every = [mine]
    if dist.is_initialized():
        every = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, mine, group=group)
    nodes = [node for part in every for node in part]
    squares = [_combine([(lv, ix, v) for e, k, lv, ix, v in nodes if e == i and k == "sq"], np.float64)
               for i in range(len(shards))]
    folds = [_combine(_leaves_summed([(lv, ix, v) for e, k, lv, ix, v in nodes if e == i and k == "fold"]), np.float32,
                      sizes[i]) for i in range(len(shards))]
    norms = [math.sqrt(sum(float(squares[i]) for i in entries)) for entries in layout.block_entries]
    if not all(math.isfinite(x) for x in norms):
        from .projection import NonFiniteError

        raise NonFiniteError("the update holds NaN or Inf values")
    name = basis_name(kind, size)
    counts = block_counts(layout, budget, name, allocation, norms if allocation == "norm" else None, slot, slots)
    coords = []
    for b, entries in enumerate(layout.block_entries):
        y = np.zeros(sizes[entries[0]], dtype=np.float32)
        for i in entries:  # y = 0 + fold + fold .., the block's tensors in layout order
            y = y + folds[i]
        out = np.zeros(int(counts[b]), dtype=np.float32)
        _core.dense_pick_many([(seeds[b], y.size.bit_length() - 1, slot, slots, y, out)])
        coords.append(out)
    return Packet(seed, name, layout.group_size, layout.fingerprint, counts, np.concatenate(coords), slot, slots)


def _dyadic(lo: int, hi: int):
    """[lo, hi) as the largest aligned intervals: (level, index) pairs, ``index << level`` their start."""
    out = []
    while lo < hi:
        level = (lo & -lo).bit_length() - 1 if lo else 62
        while (1 << level) > hi - lo:
            level -= 1
        out.append((level, lo >> level))
        lo += 1 << level
    return out


class _CoreReader:
    """A node's value from the compiled core (CPU tensors)."""

    def __init__(self, core):
        self.core = core

    def squares(self, piece) -> float:
        return float(self.core.sum_squares_many([piece])[0])

    def fold(self, piece, start: int, block_n: int, seed: int, size: int) -> np.ndarray:
        fold = np.zeros(size, dtype=np.float32)
        self.core.dense_fold_many([([piece], [start], block_n, seed, size.bit_length() - 1, fold, None)])
        return fold


class _TritonReader:
    """A node's value from the Triton kernels (CUDA tensors), brought to the host (B numbers)."""

    def __init__(self):
        from .kernels import hadamard, projection

        self.hadamard, self.projection = hadamard, projection

    def squares(self, piece) -> float:
        return float(self.projection.sum_squares_many([piece]).cpu()[0])

    def fold(self, piece, start: int, block_n: int, seed: int, size: int) -> np.ndarray:
        return self.hadamard.fold(piece, start, seed, size).cpu().numpy()


def _square_nodes(reader, entry: int, flat: torch.Tensor, offset: int):
    """The sum-of-squares tree's nodes over elements ``offset ..`` of the tensor (fp64 scalars)."""
    nodes = []
    for level, index in _dyadic(offset, offset + flat.numel()):
        piece = flat[(index << level) - offset : ((index + 1) << level) - offset]
        nodes.append((entry, "sq", level, index, reader.squares(piece)))
    return nodes


def _fold_nodes(reader, entry: int, flat: torch.Tensor, start: int, block_n: int, seed: int, size: int):
    """The fold tree's nodes over the part at block indices ``start ..``: the roots of aligned
    runs of chunks it holds whole, and the chunks it holds only part of (level 0, other lanes 0)."""
    end = start + flat.numel()
    if end == start:
        return []
    c0, c1 = start // size, (end - 1) // size
    whole0 = c0 if start == c0 * size else c0 + 1
    whole1 = c1 if end == (c1 + 1) * size else c1 - 1
    runs = _dyadic(whole0, whole1 + 1) if whole0 <= whole1 else []
    partial = sorted({c for c in (c0, c1) if not whole0 <= c <= whole1})
    nodes = []
    for level, index in runs + [(0, c) for c in partial]:
        a = max(start, (index << level) * size)
        b = min(end, ((index + 1) << level) * size)
        nodes.append((entry, "fold", level, index, reader.fold(flat[a - start : b - start], a, block_n, seed, size)))
    return nodes


def _leaves_summed(nodes):
    """Level-0 nodes at the same index (one chunk held in parts) added up: their lanes are disjoint."""
    merged: dict = {}
    for level, index, values in nodes:
        key = (level, index)
        merged[key] = values if key not in merged else merged[key] + values
    return [(lv, ix, v) for (lv, ix), v in merged.items()]


def _combine(nodes, dtype, width: int | None = None):
    """The root of the pairwise tree holding ``nodes`` ((level, index, values) of disjoint
    subtrees): siblings added left + right level by level, a node without one carried up (its
    sibling's subtree is empty: zeros)."""
    zero = np.zeros(width, dtype=dtype) if width else dtype(0.0)
    levels: dict = {}
    for level, index, values in nodes:
        levels.setdefault(level, {})[index] = np.asarray(values, dtype=dtype) if width else dtype(values)
    if not levels:
        return zero
    level = min(levels)
    while True:
        here = levels.pop(level, {})
        if not levels and len(here) <= 1:
            return next(iter(here.values())) if here else zero
        up = levels.setdefault(level + 1, {})
        for index in sorted(here):
            if index % 2 and index - 1 in here:
                continue
            left = here[index] if index % 2 == 0 else zero
            right = here.get(index + 1, zero) if index % 2 == 0 else here[index]
            up[index // 2] = left + right
        level += 1
