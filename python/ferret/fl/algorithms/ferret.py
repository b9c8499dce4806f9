"""Ferret: first-order local steps, the update projected onto seeded bases (K coordinates
uploaded), the coordinates merged linearly and reconstructed on the server."""

from __future__ import annotations

import dataclasses
import math
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ... import NonFiniteError, Round, check_budget, reconstruct, slots
from ...basis import basis_name, dense_size, parse_basis
from ...layout import Layout, resolve_group_size
from ...packet import MAGIC, Packet, PacketError
from ...projection import block_counts, block_rows, estimate_norms
from ..defences import DefenceOptions
from ..runtime import model_device
from ..settings import one_of, positive_finite
from ..train import first_order_steps, trainable
from .base import Algorithm, LocalTraining, MalformedUpload, NonFiniteUpdate, UnsafeUpdate, add_update, snapshot
from .uploads import decode_tensors, encode_tensors

# Far above any honest coordinate (|γ| is at most the block's update in L1 norm), and far enough
# below float32's largest value that no weighted merge of accepted packets overflows (2**31 · 1e20).
MAX_COORDINATE = 1e20


@dataclass(frozen=True)
class FerretOptions(DefenceOptions):
    """Ferret's options.

    ``budget``: coordinates per client per round (at most the model's trainable parameters).
    ``server_lr``: the server's step on the reconstructed update. ``basis``: ``"rademacher"``,
    ``"gaussian"``, ``"hadamard[:size]"`` or ``"srht[:size]"`` (see :mod:`ferret.basis`).
    ``allocation``: ``"norm"`` or ``"uniform"`` (coordinates per block), or ``"auto"``: norm,
    but uniform under differential privacy or a robust statistic, which need every client's counts
    fixed in advance. ``grouping``: ``"tensor"``, ``"paper"`` or a block size. ``bases``:
    ``"shared"`` (the paper's: every client projects onto the round's bases, so the server merges
    all coordinates and reconstructs once), ``"client"`` (each client projects onto bases of its
    own seed, so the server reconstructs once per client, and the estimate averages independent
    projections: its variance falls with the number of clients at the same upload),
    ``"disjoint"`` (``hadamard`` only: the clients share the round's signs but each takes its own
    rows, slot = its place among the round's clients, so their directions are orthogonal and the
    server reconstructs once per group of clients a transform holds, :mod:`ferret.slots`), or
    ``"auto"`` (``"disjoint"`` for ``hadamard``, else ``"shared"``). The defaults, ``hadamard``
    with disjoint rows, train as well as Rademacher bases at the cost of one read of the update
    (``docs/bases.md``); the ``ferret-paper`` preset keeps the paper's Rademacher bases, shared.
    ``momentum``: server momentum β on the reconstructed update (v ← βv + Δ̃, θ ← θ + server_lr·v).
    ``clip``: the server clips each tensor's update to this norm (the official code clips blocks at 10).
    ``relative_bound``, ``norm_bound``: the influence bounds (:mod:`ferret.fl.bounds`), on the
    norm of each client's reconstruction block by block. ``aggregator``, ``byzantine``: robust
    aggregation of the coordinate vectors (:mod:`ferret.fl.robust`), which compares the clients'
    coordinates one by one, so it needs ``bases="shared"``. ``dp_clip``, ``dp_noise``,
    ``dp_mode``, ``dp_delta``, ``target_epsilon``: client-level differential privacy on the
    coordinate vectors (:mod:`ferret.fl.privacy`), with shared or disjoint bases (the distributed
    mode: shared only).
    """

    budget: int = 3800
    server_lr: float = 1.0
    basis: str = "hadamard"
    allocation: str = "auto"
    grouping: str | int = "tensor"
    bases: str = "auto"
    momentum: float = 0.0
    clip: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.robust and self.sharing != "shared":
            raise ValueError(f"aggregator {self.aggregator!r} compares the clients' coordinates one by one: it needs "
                             f"bases='shared' (with {self.sharing!r} bases each client's coordinates live in rows of "
                             f"its own; the influence bounds apply to every basis)")
        if self.private and self.sharing == "client":
            raise ValueError("differential privacy adds noise to the sum of the clients' coordinates: it needs "
                             "bases='shared' or 'disjoint', not 'client'")
        if self.private and self.dp_mode == "distributed" and self.sharing != "shared":
            raise ValueError(f"distributed differential privacy has each client add a share of the noise to rows "
                             f"every client uses: it needs bases='shared', not {self.sharing!r}")
        if self.allocation == "norm" and (self.private or self.robust):
            raise ValueError(f"{'differential privacy' if self.private else f'aggregator {self.aggregator!r}'} needs "
                             f"every client's block counts fixed in advance: use allocation='uniform' or 'auto', not "
                             f"'norm' (its counts follow the client's update)")
        check_budget(self.budget)
        positive_finite("server_lr", self.server_lr)
        parse_basis(self.basis)
        one_of("allocation", self.allocation, ("auto", "norm", "uniform"))
        resolve_group_size(self.grouping, [1])
        one_of("bases", self.bases, ("auto", "shared", "client", "disjoint"))
        if self.bases == "disjoint" and parse_basis(self.basis)[0] != "hadamard":
            raise ValueError(f"bases='disjoint' needs basis='hadamard' (disjoint rows of one transform), "
                             f"not {self.basis!r}")
        if not (math.isfinite(self.momentum) and 0.0 <= self.momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.clip is not None:
            positive_finite("clip", self.clip)

    @property
    def counts(self) -> str:
        """How a client shares its budget among blocks: ``allocation`` with ``"auto"`` resolved
        (``"uniform"`` under differential privacy or a robust statistic, else ``"norm"``)."""
        if self.allocation != "auto":
            return self.allocation
        return "uniform" if self.private or self.robust else "norm"

    @property
    def sharing(self) -> str:
        """How clients' bases relate: ``bases`` with ``"auto"`` resolved (``"disjoint"`` for the
        hadamard basis, else ``"shared"``)."""
        if self.bases != "auto":
            return self.bases
        return "disjoint" if parse_basis(self.basis)[0] == "hadamard" else "shared"


class Ferret(Algorithm):
    """Ferret with ``budget`` coordinates per client per round (see :class:`FerretOptions`)."""

    name = "ferret"
    Options = FerretOptions
    default_local = LocalTraining()

    def __init__(self, options: FerretOptions | None = None, *, local: LocalTraining | None = None, **values):
        super().__init__(options, local=local, **values)
        self.velocity: dict[str, torch.Tensor] = {}
        self._warned_sparse = False
        self._rows_cache = None

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ``ValueError`` if the budget does not fit ``model``: more coordinates than trainable
        parameters, fewer than its blocks need, or more than one client's rows of the basis hold."""
        layout = self._layout(model)
        if self.options.budget > layout.numel:
            raise ValueError(f"budget {self.options.budget} is above the model's {layout.numel} trainable "
                             f"parameters (FedAvg would send less)")
        block_counts(layout, self.options.budget, self.basis_of(1), "uniform")
        if self.options.sharing == "disjoint":
            slots.grouping(1, layout.block_sizes, self.options.budget, self.options.basis)

    def round(self, ctx) -> Round:
        """The public :class:`ferret.Round` of ``ctx``'s round: every upload is made and every
        broadcast applied through it."""
        o = self.options
        return Round(ctx.round_seed, ctx.clients or (ctx.client,), o.budget, basis=o.basis, bases=o.sharing,
                     allocation=o.counts, grouping=o.grouping)

    def place(self, ctx, layout: Layout) -> slots.Place:
        """Where client ``ctx.client``'s coordinates go in its round (:meth:`ferret.Round.place`).
        Raises ``ValueError`` for a client that is not among the round's."""
        return self.round(ctx).place(ctx.client, layout)

    def basis_of(self, n_slots: int) -> str:
        """The basis name packets carry for ``n_slots`` row slots (a ``"hadamard"`` basis gets its size)."""
        kind, size = parse_basis(self.options.basis)
        if kind == "hadamard" and not size:
            size = dense_size(self.options.budget, n_slots)
        return basis_name(kind, size)

    def client_update(self, model, data, ctx):
        start = snapshot(model)
        first_order_steps(model, data, rng=ctx.rng, runtime=self.runtime, **vars(self.local))
        try:  # the trained weights against the snapshot, read in place: no update-sized difference
            packet = self.round(ctx).compress(model, ctx.client, start=start, backend=self.runtime.backend)
        except NonFiniteError as err:
            raise NonFiniteUpdate(f"the local update holds NaN or Inf ({err})") from None
        self._warn_if_sparse(packet, model)
        return packet.to_bytes()

    def check_upload(self, upload, model, ctx):
        try:
            packet = Packet.from_bytes(upload)
        except (PacketError, TypeError) as err:
            raise MalformedUpload(f"not a Ferret packet: {err}") from None
        layout = self._layout(model)
        if (packet.fingerprint, packet.n_blocks, packet.group_size) != (layout.fingerprint, layout.n_blocks,
                                                                        layout.group_size):
            raise MalformedUpload("the packet was made for another model or layout")
        try:
            place = self.place(ctx, layout)
        except ValueError as err:
            raise MalformedUpload(str(err)) from None
        if packet.round_seed != place.seed:
            raise MalformedUpload(f"the packet uses seed {packet.round_seed}, not the round's")
        if packet.basis != place.basis:
            raise MalformedUpload(f"basis {packet.basis!r}, not {place.basis!r}")
        if (packet.slot, packet.slots) != (place.slot, place.slots):
            raise MalformedUpload(f"rows of slot {packet.slot} of {packet.slots}, not {place.slot} of {place.slots}")
        counts = packet.counts.astype(np.int64)
        if int(counts.sum()) != self.options.budget:
            raise MalformedUpload(f"{int(counts.sum())} coordinates, not the budget of {self.options.budget}")
        if self.options.counts == "uniform":
            expected = block_counts(layout, self.options.budget, place.basis, "uniform", None, place.slot, place.slots)
            if not np.array_equal(counts, expected):
                b = int(np.argmax(counts != expected))
                raise MalformedUpload(f"block {b} holds {counts[b]} coordinates, not the {expected[b]} uniform "
                                      f"allocation gives it")
        caps = block_rows(layout, place.basis, place.slot, place.slots)
        if caps is not None and np.any(counts > np.minimum(caps, layout.block_sizes)):
            b = int(np.argmax(counts > np.minimum(caps, layout.block_sizes)))
            raise MalformedUpload(f"block {b} holds {counts[b]} coordinates, more than its "
                                  f"{min(int(caps[b]), layout.block_sizes[b])} rows")
        if packet.coords.size and float(np.max(np.abs(packet.coords))) > MAX_COORDINATE:
            raise MalformedUpload(f"a coordinate of magnitude {float(np.max(np.abs(packet.coords))):.3g}, above "
                                  f"{MAX_COORDINATE:g}")

    def block_norms(self, upload, model):
        return estimate_norms(Packet.from_bytes(upload), self._layout(model))

    def scale_blocks(self, upload, factors):
        packet = Packet.from_bytes(upload)
        coords = packet.coords * np.repeat(np.asarray(factors, dtype=np.float64), packet.counts).astype(np.float32)
        return dataclasses.replace(packet, coords=coords).to_bytes()

    def aggregate(self, model, uploads, weights, ctx):
        self._broadcast(self.round(ctx).merge([Packet.from_bytes(u) for u in uploads], weights), model, ctx)

    def _broadcast(self, packets: list[Packet], model, ctx) -> None:
        """Broadcast the round's merged ``packets`` (one per seed) and apply them; where they take
        as many bytes as FedAvg's broadcast (every weight in fp32), the update they reconstruct
        is sent instead (Packet.split reads the packets back; a client replays either)."""
        self.broadcast = b"".join(p.to_bytes() for p in packets)
        if len(self.broadcast) >= 4 * self._layout(model).numel:
            self.broadcast = encode_tensors(self._reconstructed(packets, model))
        self.apply(model, self.broadcast, ctx)

    def apply(self, model, broadcast, ctx):
        o, params, backend = self.options, trainable(model), self.runtime.backend
        if broadcast[:len(MAGIC)] != MAGIC:  # the reconstructed update itself
            self._step(params, decode_tensors(broadcast, model_device(model)))
            return
        packets = Packet.split(broadcast)
        if o.clip is None and o.momentum == 0.0:
            try:  # one packet goes straight into the weights; nothing is written if it would overflow
                self.round(ctx).apply(packets, into=params, scale=o.server_lr, backend=backend)
            except PacketError as err:
                raise UnsafeUpdate(str(err)) from None
            return
        self._step(params, self._reconstructed(packets, model))

    def _reconstructed(self, packets: list[Packet], model) -> dict[str, torch.Tensor]:
        """The sum of ``packets``' reconstructions: fp32 tensors on the model's device, by name."""
        update = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in trainable(model)}
        with torch.no_grad():
            for packet in packets:
                reconstruct(packet, into=update, backend=self.runtime.backend)
        return update

    def _step(self, params, update: dict[str, torch.Tensor]) -> None:
        o = self.options
        velocity = {}
        with torch.no_grad():
            for name, _ in params:
                u = update[name]
                if o.clip is not None:
                    # on the device, no sync: times clip / norm where the norm exceeds clip (in fp64, the
                    # factor a Python float was, so the weights equal the host computation's)
                    norm = u.norm().double()
                    u.mul_(torch.where(norm > o.clip, o.clip / norm, 1.0))
                if o.momentum:
                    if name in self.velocity:
                        u = self.velocity[name].mul(o.momentum).add_(u)
                    velocity[name] = u
                update[name] = u
            add_update(params, update, o.server_lr)
        self.velocity.update(velocity)  # only once the step is taken: a refused round leaves it as it was

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"velocity.{n}": v for n, v in self.velocity.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.velocity = {k.removeprefix("velocity."): v.clone() for k, v in state.items() if k.startswith("velocity.")}

    # -- coordinates as vectors --------------------------------------------------------------------
    def vector(self, upload):
        return Packet.from_bytes(upload).coords.astype(np.float64)

    def from_vector(self, upload, vector):
        coords = np.asarray(vector, dtype="<f4")
        packet = Packet.from_bytes(upload)
        if np.all(np.isfinite(coords)):
            return dataclasses.replace(packet, coords=coords).to_bytes()
        # a Packet refuses non-finite coordinates: a client that writes them writes the bytes itself
        body = upload[: len(upload) - 4 - coords.nbytes] + coords.tobytes()
        return body + struct.pack("<I", zlib.crc32(body))

    # -- the round as a mean of coordinate vectors (uniform counts): shared bases put every client's
    # k-th coordinate on the same basis vector; disjoint rows put each client's in rows of its own,
    # laid out as the group's merged packet holds them, group after group --------------------------
    def check_summable(self) -> None:
        o = self.options
        if o.sharing != "shared" or o.counts != "uniform" or o.clip is not None:
            raise ValueError("secure aggregation needs Ferret with bases='shared', allocation='uniform' and no "
                             "clip: every client's coordinates must mean the same thing")
        if o.robust or (o.private and o.dp_mode == "central"):
            raise ValueError("secure aggregation hides each client's coordinates, which robust aggregation and "
                             "central differential privacy need: use neither, or dp_mode='distributed'")

    def summable(self, upload, model, ctx):
        coords = self.vector(upload)
        if self.options.sharing != "disjoint":
            return coords
        layout = self._layout(model)
        place = self.place(ctx, layout)
        rows = self._rows(layout, len(ctx.clients))
        out = np.zeros(rows.groups * rows.length)
        at = place.group * rows.length + rows.index[place.slot]
        out[at] = coords
        return out

    def aggregate_mean(self, model, mean, ctx):
        layout = self._layout(model)
        mean = np.asarray(mean, dtype=np.float64)
        if self.options.sharing != "disjoint":
            counts = block_counts(layout, self.options.budget, self.basis_of(1), "uniform")
            packets = [Packet(ctx.round_seed, self.basis_of(1), layout.group_size, layout.fingerprint, counts,
                              mean.astype(np.float32))]
        else:  # group g's merged packet: row j of block b holds n_b / m_bc times the mean, c = j mod slots
            rows = self._rows(layout, len(ctx.clients))
            packets = []
            for g in range(rows.groups):
                coords = mean[g * rows.length : (g + 1) * rows.length] * rows.scale
                first = slots.place(ctx.round_seed, g * rows.slots, len(ctx.clients), layout.block_sizes,
                                    self.options.budget, self.options.basis)
                packets.append(Packet(first.seed, first.basis, layout.group_size, layout.fingerprint, rows.merged,
                                      coords.astype(np.float32)))
        self._broadcast(packets, model, ctx)

    def _rows(self, layout: Layout, clients: int) -> "_Rows":
        """Where each slot's uniform coordinates sit in its group's merged packet."""
        key = (layout.fingerprint, clients)
        if self._rows_cache is None or self._rows_cache[0] != key:
            groups, n_slots = slots.grouping(clients, layout.block_sizes, self.options.budget, self.options.basis)
            basis = self.basis_of(n_slots)
            counts = [block_counts(layout, self.options.budget, basis, "uniform", None, c, n_slots)
                      for c in range(n_slots)]
            merged = np.max([c + n_slots * (k - 1) + 1 for c, k in enumerate(counts)], axis=0)
            starts = np.concatenate([[0], np.cumsum(merged)[:-1]])
            index = [np.concatenate([starts[b] + c + n_slots * np.arange(k[b]) for b in range(layout.n_blocks)])
                     for c, k in enumerate(counts)]
            scale = np.zeros(int(merged.sum()))
            for c, k in enumerate(counts):
                scale[index[c]] = np.repeat(merged / k, k)
            self._rows_cache = (key, _Rows(groups, n_slots, int(merged.sum()), merged, index, scale))
        return self._rows_cache[1]

    def _layout(self, model) -> Layout:
        return Layout.of(trainable(model), self.options.grouping)

    def _warn_if_sparse(self, packet: Packet, model) -> None:
        """Once: an SRHT packet moves at most K·B elements of a block, and training suffers when
        that is a small share of the model (docs/bases.md)."""
        kind, size = parse_basis(self.options.basis)
        if kind != "srht" or self._warned_sparse:
            return
        sizes = np.array(self._layout(model).block_sizes, dtype=np.int64)
        share = np.minimum(sizes, packet.counts.astype(np.int64) * size).sum() / sizes.sum()
        if share < 0.5:
            warnings.warn(f"basis {self.options.basis!r} moves at most {share:.0%} of the weights per round (K·B "
                          f"is below the block sizes), which can hurt training: use a larger srht size or "
                          f"'rademacher' (docs/bases.md)", RuntimeWarning, stacklevel=2)
            self._warned_sparse = True


@dataclass(frozen=True)
class _Rows:
    """Where a round's uniform coordinates sit with disjoint rows: ``groups`` groups of ``slots``
    slots, each group's merged packet holding ``merged[b]`` coordinates in block b (``length`` in
    all); slot c's coordinates at positions ``index[c]`` of it, each scaled by ``scale`` (n_b / m_bc)
    when a mean becomes the packet."""

    groups: int
    slots: int
    length: int
    merged: np.ndarray
    index: list
    scale: np.ndarray
