"""compress / reconstruct / perturb: the public face of the seeded projection.

A client turns its update into a :class:`~ferret.packet.Packet` of K coordinates; anyone holding
the same round seed and a model of the same shapes rebuilds an unbiased estimate of the update::

    packet = ferret.compress(delta, seed=round_seed, budget=1024)
    wire = packet.to_bytes()
    ferret.reconstruct(ferret.Packet.from_bytes(wire), into=model.named_parameters(), scale=lr)

Block ``b`` is projected on ``n_b`` bases drawn from ``block_seed(round_seed, b)``; its
estimate is ``(1/n_b) * sum_k gamma_k v_k``. With ``basis="hadamard"`` the bases are rows of a
randomized Hadamard transform repeated over the block, at the cost of one read of the update
whatever ``n_b`` (see :mod:`ferret.spec`); ``"srht"`` transforms only the chunks holding a row.
Hadamard clients may take disjoint rows (``slot`` of ``slots``), so that their merged packet
carries every client's directions and one reconstruction serves the round. Nothing is written
until every input is checked, and a reconstruction that would turn a finite value of its targets
into Inf or NaN writes nothing.

**Which receiver fits a packet.** Every packet carries its layout's fingerprint: a hash of the
update's tensor names and shapes, in order, and of the grouping's block size. A receiver must
pass tensors with the same names and shapes in the same order (a lone tensor or array has the
name ``""``); dtypes and devices may differ. ``model.named_parameters()`` and
``model.state_dict()`` differ (buffers, tied weights), so send and receive with the same one.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import torch

from .allocation import allocate, check_budget, client_weights
from .backends import Block, backend_for, estimate_bounds
from .basis import basis_name, dense_size, parse_basis
from .layout import Layout, resolve_group_size
from .packet import Packet, PacketError
from .sharded import compress_sharded, shards_of
from .spec import block_seeds, dense_block_size, dense_slot_rows, normalize_seed
from .tensors import check_tensor, device_of, max_abs, named_tensors, readable_flat, writable_flat

SCRATCH_ELEMENTS = 1 << 22  # elements per scratch piece of a checked reconstruction (16 MiB in fp32)


class NonFiniteError(ValueError):
    """An update holds NaN or Inf values (or its coordinates overflow fp32): nothing was made."""


def compress(update, seed: int, budget: int, *, basis: str = "rademacher", allocation: str = "norm",
             grouping="tensor", slot: int = 0, slots: int = 1, start=None, backend: str | None = None) -> Packet:
    """Project ``update`` onto ``budget`` seeded bases in all.

    Takes a tensor, a NumPy array, a state dict or an iterable of ``(name, tensor)`` pairs
    (fp32, bf16 or fp16, all on one device), the round ``seed`` (any int; normalised to
    ``[0, 2**63)``), and the total number of coordinates ``budget``, shared among blocks by
    ``allocation`` (``"norm"`` or ``"uniform"``); ``grouping`` forms the blocks (``"tensor"``,
    ``"paper"`` or a block size, see :mod:`ferret.layout`); ``basis`` is ``"rademacher"``,
    ``"gaussian"``, ``"hadamard"``, ``"srht"``, or a Hadamard kind with its size
    (``"hadamard:65536"``, see :mod:`ferret.basis`). A ``"hadamard"`` client ``slot`` of
    ``slots`` (ints, ``0 <= slot < slots``) projects onto rows no other slot uses.

    With ``start`` (tensors of the update's names, shapes, dtypes and device, in its order),
    ``update`` holds the new values and the packet is that of ``update - start`` as the tensors'
    own dtype subtracts them, byte for byte, read in place: no update-sized difference is made
    (a client compresses its trained weights against its snapshot).

    Returns a :class:`Packet`; the receiver needs tensors of the same names and shapes in the
    same order (see the module docstring). Raises ``ValueError`` for NaN/Inf in the update and
    for a budget outside :func:`ferret.allocation.check_budget`'s rule (a positive int, at least
    one per block, at most 16 per element of the update and ``2**31 - 1`` in all; ``TypeError``
    if it is not an int), more coordinates in a block than a Hadamard basis has rows for its slot,
    and bad slots, and ``ValueError`` / ``TypeError`` for bad tensors (see :func:`reconstruct`).
    """
    kind, hadamard = parse_basis(basis)
    slot, slots = check_slots(kind, slot, slots)
    seed = normalize_seed(seed)
    items = named_tensors(update)
    shards = shards_of(items)
    for name, x in items if shards is None else [(n, s.local) for n, s in shards]:
        check_tensor(name, x, "update")
    if shards is not None:  # DTensors: every rank its part, the packet of the whole
        if start is not None:
            raise ValueError("a sharded update is compressed as it is: start= takes whole tensors")
        return compress_sharded(shards, seed, budget, basis=basis, allocation=allocation, slot=slot, slots=slots,
                                grouping=resolve_group_size(grouping, [math.prod(s.shape) for _, s in shards]),
                                backend=backend)
    be = backend_for(device_of(items, "update"), backend)
    layout = Layout([(n, tuple(x.shape)) for n, x in items], resolve_group_size(grouping, [_numel(x) for _, x in items]))
    check_budget(budget, layout.n_blocks, layout.numel)
    if kind == "hadamard" and not hadamard:
        hadamard = dense_size(budget, slots)
    flats = [readable_flat(x) for _, x in items]
    bases = None if start is None else _start_flats(start, items)
    blocks = layout.block_entries

    if kind in ("srht", "hadamard") and 0 in layout.block_sizes:
        empty = blocks[layout.block_sizes.index(0)]
        raise ValueError(f"the {kind} basis cannot project an empty block ({_names(layout, empty)})")
    name = basis_name(kind, hadamard)
    seeds = block_seeds(seed, layout.n_blocks)
    jobs = [_block([(flats[i], layout.entries[i].offset) for i in entries], layout.block_sizes[b],
                   seeds[b], kind, hadamard, slot, slots, None if bases is None else [bases[i] for i in entries])
            for b, entries in enumerate(blocks)]
    if allocation == "norm" and layout.n_blocks == 1:
        allocation = "uniform"  # one block takes the whole budget: no need to read the update for its norm
    if allocation == "norm":
        def counts_from(squares):  # each block's segments' sums of squares, in layout order
            norms = [math.sqrt(sum(float(x) for x in block)) for block in squares]
            for b, norm in enumerate(norms):
                if not math.isfinite(norm):
                    raise NonFiniteError(f"the update holds NaN or Inf values in {_names(layout, blocks[b])}")
            return block_counts(layout, budget, name, allocation, norms, slot, slots)

        coords, counts = be.compress_by_norms(jobs, counts_from)
    else:
        counts = block_counts(layout, budget, name, allocation, None, slot, slots)
        coords = be.compress(jobs, counts)
    for b, gamma in enumerate(coords):
        if not np.all(np.isfinite(gamma.astype(np.float32))):
            raise NonFiniteError(f"the update holds NaN or Inf values (or overflows fp32) in "
                                 f"{_names(layout, blocks[b])}")
    return Packet(seed, name, layout.group_size, layout.fingerprint, counts,
                  np.concatenate(coords) if coords else np.zeros(0), slot, slots)


def block_counts(layout: Layout, budget: int, basis: str = "rademacher", allocation: str = "norm",
                 norms=None, slot: int = 0, slots: int = 1) -> np.ndarray:
    """Coordinates per block of ``layout`` (int64): ``allocate``'s, capped at the rows a block has:
    one per element for ``srht``, and for ``hadamard`` (its size named) the rows of ``slot`` of
    ``slots`` at the block's Hadamard size, and no more than one per element. ``norms`` are needed
    by the ``"norm"`` allocation. Raises as :func:`ferret.allocation.check_budget` does for a
    budget that does not fit the layout, and ``ValueError`` for one above the caps' sum."""
    check_budget(budget, layout.n_blocks, layout.numel)
    caps = block_rows(layout, basis, slot, slots)
    if caps is not None:  # and no more coordinates than elements
        caps = np.minimum(caps, layout.block_sizes)
    return allocate(budget, layout.n_blocks, allocation, norms, caps=caps)


def block_rows(layout: Layout, basis: str, slot: int = 0, slots: int = 1):
    """How many rows (coordinates at most) each block of ``layout`` has under ``basis`` for
    ``slot`` of ``slots`` (an int64 array), or ``None`` for bases without a limit (Rademacher,
    Gaussian). Raises ``ValueError`` for a ``"hadamard"`` basis whose size is not named."""
    kind, size = parse_basis(basis)
    if kind == "srht":
        return np.asarray(layout.block_sizes, dtype=np.int64)
    if kind != "hadamard":
        return None
    if not size:
        raise ValueError("block_rows needs the Hadamard size: name it ('hadamard:<size>')")
    return np.array([dense_slot_rows(dense_block_size(size, n, slots), slot, slots) for n in layout.block_sizes],
                    dtype=np.int64)


def check_slots(kind: str, slot, slots) -> tuple[int, int]:
    """``(slot, slots)`` as ints, checked: ints with ``0 <= slot < slots``, and ``slots == 1``
    unless the basis is ``"hadamard"``. Raises ``TypeError`` / ``ValueError`` otherwise."""
    for value, what in ((slot, "slot"), (slots, "slots")):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    slot, slots = int(slot), int(slots)
    if not 0 <= slot < slots or slots > 2**32 - 1:
        raise ValueError(f"slot must be one of 0 .. slots - 1 (slots at most 2**32 - 1); got slot {slot} of {slots}")
    if slots > 1 and kind != "hadamard":
        raise ValueError(f"disjoint row slots need the 'hadamard' basis, not {kind!r}")
    return slot, slots


def _block(segments, n: int, seed: int, kind: str, size: int, slot: int, slots: int, bases=None) -> Block:
    """The backend's job for one block; a Hadamard block carries its own Hadamard size."""
    if kind == "hadamard":
        return Block(segments, n, seed, kind, dense_block_size(size, n, slots), slot, slots, bases)
    return Block(segments, n, seed, kind, size, bases=bases)


def _check_rows(packet: Packet, layout: Layout) -> None:
    """Raise :class:`PacketError` when a block of ``packet`` holds more coordinates than its rows
    (every slot's, for a merged packet of several) under the packet's basis."""
    per_slot = packet.slot_counts if packet.slot_counts is not None else None
    for c in range(packet.slots) if per_slot is not None else [packet.slot]:
        caps = block_rows(layout, packet.basis, c, packet.slots)
        held = per_slot[:, c] if per_slot is not None else packet.counts
        if caps is not None and np.any(held > caps):
            b = int(np.argmax(held > caps))
            raise PacketError(f"block {b} ({layout.block_sizes[b]} elements) has at most {int(caps[b])} rows under "
                              f"{packet.basis} (slot {c} of {packet.slots}), but the packet holds "
                              f"{int(held[b])} coordinates for it")


def _rows_at(job: Block, positions: np.ndarray) -> np.ndarray:
    """The rows of a dense block at ``positions`` of its slot-0-of-1 order (int64)."""
    from . import _core

    order = np.zeros(int(positions[-1]) + 1 if positions.size else 0, dtype=np.int64)
    _core.dense_rows(job.seed, job.hadamard.bit_length() - 1, 0, 1, order)
    return order[positions]


def _start_flats(start, items) -> list:
    """The 1-d buffers of ``start``, checked to match the update's ``items`` name by name (shape,
    dtype, device); ``ValueError`` / ``TypeError`` otherwise."""
    named = named_tensors(start, "start")
    if [n for n, _ in named] != [n for n, _ in items]:
        raise ValueError("start must hold the update's tensors: the same names in the same order")
    flats = []
    for (name, x), (_, s) in zip(items, named):
        check_tensor(name, s, "start")
        if tuple(s.shape) != tuple(x.shape) or s.dtype != x.dtype or isinstance(s, torch.Tensor) != isinstance(
                x, torch.Tensor) or (isinstance(x, torch.Tensor) and s.device != x.device):
            raise ValueError(f"start: {name or 'the tensor'} differs from the update's in shape, dtype or device")
        flats.append(readable_flat(s))
    return flats


def reconstruct(packet: Packet, like=None, *, into=None, scale: float = 1.0, backend: str | None = None,
                device=None):
    """Rebuild ``scale`` times the update a packet encodes.

    Give either ``like`` (a :class:`Layout`, or tensors with the update's names and shapes) to
    get new float32 tensors back (a tensor or array if ``like`` was one, else a dict by name;
    on ``device``, default: like's device or CPU), or ``into`` (the receiver's parameters:
    contiguous, writable fp32 / bf16 / fp16 tensors or arrays) to add ``scale * update`` to them
    in place and get them back. ``like`` or ``into`` must hold tensors with the names and shapes
    the sender compressed, in the same order: the packet's layout fingerprint is a hash of them
    (and of the grouping), and dtypes and devices may differ.

    Raises :class:`~ferret.packet.PacketError` if the packet was made for another layout, or if
    its estimate times ``scale`` would write a non-finite value (Inf or NaN) where a target holds
    a finite one (coordinates or a scale too large for the targets' dtype: one client cannot
    poison a model); ``ValueError`` for a non-finite ``scale``, non-contiguous or read-only
    targets, and torch tensors whose negative or conjugate bit is set; ``TypeError`` for other
    dtypes. Nothing is written when it raises.
    """
    if (like is None) == (into is None):
        raise TypeError("reconstruct takes exactly one of like= (new tensors) or into= (in place)")
    if not isinstance(packet, Packet):
        raise TypeError(f"expected a Packet, got {type(packet).__name__} (decode bytes with Packet.from_bytes)")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")

    shifts = None  # where a rank's part of each tensor starts in the whole (sharded targets)
    if into is not None:
        items = named_tensors(into, "parameters")
        shards = shards_of(items)
        if shards is not None:  # every rank writes its own part: no communication
            items = [(n, s.local) for n, s in shards]
            shifts = [s.offset for _, s in shards]
        layout = _layout_for(packet, items if shards is None else [(n, torch.empty(s.shape, device="meta"))
                                                                   for n, s in shards])
        for name, x in items:
            check_tensor(name, x, "parameters")
        flats = [writable_flat(n, x) for n, x in items]  # refused here, before anything is written
        targets = items
    else:
        layout = like if isinstance(like, Layout) else _layout_for(packet, named_tensors(like, "like"))
        _check_fingerprint(packet, layout)
        if isinstance(like, np.ndarray):
            targets = [("", np.zeros(like.shape, dtype=np.float32))]
        else:
            if device is None:
                device = device_of(named_tensors(like, "like"), "like") if not isinstance(like, Layout) else "cpu"
            targets = [(e.name, torch.zeros(e.shape, dtype=torch.float32, device=device)) for e in layout.entries]
        flats = [writable_flat(n, x) for n, x in targets]
    kind, hadamard = parse_basis(packet.basis)
    _check_rows(packet, layout)
    be = backend_for(device_of(targets, "parameters"), backend)
    jobs, coords, scales = [], [], []
    seeds = block_seeds(packet.round_seed, layout.n_blocks)
    per_block = np.split(packet.coords, np.cumsum(packet.counts, dtype=np.int64)[:-1])
    for b, entries in enumerate(layout.block_entries):
        block_coords = per_block[b]
        job = _block([(flats[i], layout.entries[i].offset + (shifts[i] if shifts else 0)) for i in entries],
                     layout.block_sizes[b], seeds[b], kind, hadamard, packet.slot, packet.slots)
        if packet.slot_counts is not None:  # every slot's rows: named one by one
            job = dataclasses.replace(job, slot=0, slots=1, rows=_rows_at(job, packet.positions(b)))
        jobs.append(job)
        coords.append(block_coords)
        n_over_m = layout.block_sizes[b] if kind == "srht" else 1  # srht: alpha * n / m; the others alpha / m
        with np.errstate(over="ignore"):  # a scale that overflows fp32 is refused by the check below
            scales.append(np.float32(scale * n_over_m / block_coords.size) if block_coords.size else np.float32(0))
    if not _cannot_overflow(jobs, coords, scales, fresh=into is None):
        _refuse_overflow(be, layout, jobs, coords, scales, scale)
    be.reconstruct(jobs, coords, scales)

    if into is not None:
        return into
    if isinstance(like, (torch.Tensor, np.ndarray)) or (len(targets) == 1 and targets[0][0] == ""):
        return targets[0][1]
    return dict(targets)


def merge_packets(packets, weights=None, *, normalize: bool = True) -> Packet:
    """One packet whose reconstruction is the weighted mean of the packets' reconstructions (or,
    with ``normalize=False``, their weighted sum ``Σ_i w_i · reconstruction_i``).

    ``packets`` share a round seed, basis and layout (their clients projected onto the same
    bases); their per-block counts may differ (``norm`` allocation). Block b of client i rebuilds
    (1/n_bi) Σ_k γ_ik v_k, so the merged coordinate k is n_b · Σ_i p_i γ_ik / n_bi over the clients
    with k < n_bi, with n_b = max_i n_bi: one reconstruction serves the whole round. Hadamard
    packets of different row slots (of the same number of slots) merge into one packet holding
    every client's rows and no others: client i's coordinate k goes to row ``slot_i + slots * k``
    of the slot-0-of-1 order, n_b counts the rows held, and the merged packet is of slot 0 of 1
    when those rows are the first n_b, else it names each slot's rows (``slot_counts``, packet
    version 3), so its coordinates number exactly the uploads' distinct rows. ``weights``
    (default: equal) follow :func:`ferret.allocation.client_weights`: finite, non-negative real
    numbers with a positive sum, normalised to sum to 1 without overflow unless ``normalize`` is
    false. Raises :class:`PacketError` for packets that do not share seed, basis and layout,
    ``TypeError`` for non-packets and weights that are not numbers, and ``ValueError`` for bad
    weights or merged coordinates that overflow float32.
    """
    packets = _packets(packets)
    first = packets[0]
    for i, p in enumerate(packets):
        if (p.round_seed, p.basis, p.group_size, p.fingerprint, p.n_blocks, p.slots) != (
                first.round_seed, first.basis, first.group_size, first.fingerprint, first.n_blocks, first.slots):
            raise PacketError(f"packet {i} was made with another round seed, basis, layout or number of row slots "
                              f"than packet 0")
        _check_slot_rows(i, p)
    w = client_weights(weights, len(packets), normalize=normalize)
    if all(p.slot == first.slot and p.slot_counts is None for p in packets):  # one slot's rows: k to k
        spaces = [[np.arange(int(m), dtype=np.int64) for m in p.counts] for p in packets]
    else:  # every slot's rows, each in its place of the slot-0-of-1 order
        spaces = [[p.positions(b) for b in range(p.n_blocks)] for p in packets]
    places = [np.unique(np.concatenate([space[b] for space in spaces])) for b in range(first.n_blocks)]
    counts = np.array([place.size for place in places], dtype=np.int64)
    merged = np.zeros(int(counts.sum()), dtype=np.float64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused below
        for p, p_i, space in zip(packets, w, spaces):
            for b in range(p.n_blocks):
                own = p.block_coords(b).astype(np.float64)
                merged[starts[b] + np.searchsorted(places[b], space[b])] += p_i * int(counts[b]) / own.size * own
        coords = merged.astype(np.float32)
    if not np.all(np.isfinite(coords)):
        raise ValueError(f"the weighted coordinates overflow float32 (weights {w.tolist()}): use smaller weights")
    one_slot = all(p.slot == first.slot and p.slot_counts is None for p in packets)
    if one_slot:
        return Packet(first.round_seed, first.basis, first.group_size, first.fingerprint, counts, coords, first.slot,
                      first.slots)
    if all(place[-1] == place.size - 1 for place in places):  # no row left out: the rows 0 .. count of slot 0 of 1
        return Packet(first.round_seed, first.basis, first.group_size, first.fingerprint, counts, coords, 0, 1)
    per_slot = np.array([np.bincount(place % first.slots, minlength=first.slots) for place in places], dtype=np.int64)
    return Packet(first.round_seed, first.basis, first.group_size, first.fingerprint, counts, coords, 0, first.slots,
                  per_slot)


def estimate_norms(packet: Packet, layout: Layout) -> np.ndarray:
    """The L2 norm of what reconstructing ``packet`` (scale 1) adds to each block of ``layout``,
    from its coordinates alone: a float64 array, one per block. Exact when a block's basis vectors
    are orthogonal (the Hadamard bases on whole chunks), close to it for Rademacher and Gaussian
    bases with fewer coordinates than elements. A server bounds each client's influence with it.
    Raises :class:`PacketError` if the packet was made for another layout."""
    _check_fingerprint(packet, layout)
    counts = packet.counts.astype(np.float64)
    starts = np.concatenate([[0], np.cumsum(packet.counts.astype(np.int64))[:-1]])
    squares = np.add.reduceat(np.square(packet.coords.astype(np.float64)), starts) if packet.n_blocks else np.zeros(0)
    sizes = np.asarray(layout.block_sizes, dtype=np.float64)
    kind, size = parse_basis(packet.basis)
    if kind == "srht":  # alpha * n / m times an unnormalised transform of chunks of (about) `size`
        return np.sqrt(squares) * sizes / (counts * np.sqrt(np.minimum(size, sizes)))
    return np.sqrt(squares) * np.sqrt(sizes) / counts  # ±1 vectors of norm sqrt(n), scaled by 1/m


def _check_slot_rows(i: int, p: Packet) -> None:
    """A Hadamard packet's counts fit its slot's rows at the basis's size (no block's is larger)."""
    kind, size = parse_basis(p.basis)
    if kind == "hadamard" and np.any(p.counts > dense_slot_rows(size, p.slot, p.slots)):
        raise PacketError(f"packet {i} holds more coordinates in a block than slot {p.slot} of {p.slots} has rows "
                          f"under {p.basis} ({dense_slot_rows(size, p.slot, p.slots)})")


def merge_by_seed(packets, weights=None, *, normalize: bool = True) -> list[Packet]:
    """Merge packets of several round seeds: one packet per seed (in order of first appearance)
    whose reconstructions add up to the weighted mean of all the packets' reconstructions (with
    ``normalize=False``, to their weighted sum).

    This is the server's merge when every client projects onto bases of its own seed: reconstruct
    each returned packet into the model (``reconstruct(p, into=params, scale=lr)``) and the model
    gets ``lr`` times the weighted mean. ``weights`` are normalised over all packets, then each
    seed's packets are merged by :func:`merge_packets` with their share; seeds whose weights are
    all zero are left out. Raises as :func:`merge_packets` does.
    """
    packets = _packets(packets)
    w = client_weights(weights, len(packets), normalize=normalize)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(packets):
        groups.setdefault(p.round_seed, []).append(i)
    return [merge_packets([packets[i] for i in members], w[members], normalize=False)
            for members in groups.values() if np.any(w[members] > 0)]


def _packets(packets) -> list[Packet]:
    """``packets`` as a non-empty list of :class:`Packet`; ``ValueError`` / ``TypeError`` otherwise."""
    packets = list(packets)
    if not packets:
        raise ValueError("no packets to merge")
    for i, p in enumerate(packets):
        if not isinstance(p, Packet):
            raise TypeError(f"packet {i} is a {type(p).__name__}, not a Packet")
    return packets


def perturb(params, seed: int, eps: float, *, basis: str = "rademacher", backend: str | None = None):
    """In place: add ``eps * z`` to every tensor, ``z`` drawn from ``block_seed(seed, i)`` for tensor ``i``.

    The zeroth-order baselines perturb with ``+eps`` and undo with ``-eps`` (for Rademacher the
    round trip is exact in fp32 whenever ``theta ± eps`` is). ``basis`` is ``"rademacher"`` or
    ``"gaussian"``. Takes the same containers as :func:`compress`; returns ``params``.
    """
    kind = parse_basis(basis)[0]
    if kind in ("srht", "hadamard"):
        raise ValueError(f"perturb draws a direction from 'rademacher' or 'gaussian'; {kind!r} is a projection basis")
    seed = normalize_seed(seed)
    eps = float(eps)
    if not math.isfinite(eps):
        raise ValueError(f"eps must be finite, got {eps}")
    items = named_tensors(params, "parameters")
    for name, x in items:
        check_tensor(name, x, "parameters")
    be = backend_for(device_of(items, "parameters"), backend)
    flats = [writable_flat(n, x) for n, x in items]
    be.perturb(flats, block_seeds(seed, len(flats)), basis, eps)
    return params


def _numel(x) -> int:
    return int(x.numel()) if isinstance(x, torch.Tensor) else int(x.size)


def _layout_for(packet: Packet, items) -> Layout:
    layout = Layout([(n, tuple(x.shape)) for n, x in items], packet.group_size)
    _check_fingerprint(packet, layout)
    return layout


def _check_fingerprint(packet: Packet, layout: Layout) -> None:
    if packet.fingerprint != layout.fingerprint or packet.n_blocks != layout.n_blocks:
        raise PacketError(
            f"the packet was made for another layout or model (fingerprint {packet.fingerprint.hex()[:12]}, "
            f"{packet.n_blocks} blocks) than the receiver's ({layout.fingerprint.hex()[:12]}, {layout.n_blocks} blocks)"
        )


def _names(layout: Layout, entries) -> str:
    names = [layout.entries[i].name or "the tensor" for i in entries]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _cannot_overflow(jobs, coords, scales, fresh: bool) -> bool:
    """Whether a bound proves that adding every block's estimate keeps each target element finite:
    the largest |value| of a segment (0 for ``fresh`` zeros) plus the largest |scale * estimate|
    stays below the segment dtype's largest finite value, with room for fp32 rounding. One read
    of the targets, one transfer from their device, unless every step is too small to move any
    finite value to Inf; NaN or Inf in a target fails the bound."""
    flats = [flat for job in jobs for flat, _ in job.segments]
    steps = [abs(float(scale)) * bound * (1 + 2.0**-20) for bound, scale in zip(estimate_bounds(jobs, coords), scales)]
    if all(step < _unmovable(flat.dtype) for job, step in zip(jobs, steps) for flat, _ in job.segments):
        return True  # no finite value can round to Inf: no need to read the targets
    peaks = iter([0.0] * len(flats) if fresh else _peaks(flats))
    for job, step in zip(jobs, steps):
        for flat, _ in job.segments:
            if not next(peaks) + step <= _largest(flat.dtype):
                return False
    return True


@functools.lru_cache(maxsize=None)
def _unmovable(dtype) -> float:
    """A step below which adding to any finite value of ``dtype`` (in fp32, then rounded back)
    cannot give Inf: a quarter of the spacing of the dtype's largest values."""
    info = torch.finfo(dtype) if isinstance(dtype, torch.dtype) else np.finfo(dtype)
    return float(info.eps) * 2.0 ** math.floor(math.log2(float(info.max))) / 4


def _peaks(flats) -> list[float]:
    """max |x| of each buffer (NaN if it holds one), in one transfer."""
    peaks = [max_abs(torch.as_tensor(f)) for f in flats]
    return torch.stack(peaks).cpu().tolist() if peaks else []


def _largest(dtype) -> float:
    return float(torch.finfo(dtype).max) if isinstance(dtype, torch.dtype) else float(np.finfo(dtype).max)


def _refuse_overflow(be, layout: Layout, jobs, coords, scales, scale: float) -> None:
    """Raise :class:`PacketError` if adding a block's estimate would turn a finite target element
    non-finite: each segment is rebuilt, piece by piece, into a scratch copy (``SCRATCH_ELEMENTS``
    at a time, by the same backend, so with the very bits it would write) and compared."""
    for b, job in enumerate(jobs):
        for (flat, start), entry in zip(job.segments, layout.block_entries[b]):
            target = torch.as_tensor(flat)
            for a in range(0, target.numel(), SCRATCH_ELEMENTS):
                piece = target[a : a + SCRATCH_ELEMENTS]
                scratch = piece.clone()
                with np.errstate(over="ignore", invalid="ignore"):  # Triton's interpreter computes in NumPy
                    be.reconstruct([Block([(scratch, start + a)], job.n, job.seed, job.kind, job.hadamard, job.slot,
                                          job.slots)],
                                   [coords[b]], [scales[b]])
                if bool((torch.isfinite(piece) & ~torch.isfinite(scratch)).any()):
                    raise PacketError(
                        f"reconstructing this packet with scale {scale} would write non-finite values (Inf or "
                        f"NaN) over finite ones in {_names(layout, [entry])}: the estimate times the scale, added "
                        f"to it, overflows {piece.dtype}; nothing was written")
