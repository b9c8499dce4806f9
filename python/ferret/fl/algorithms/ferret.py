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

from ... import check_budget, compress, merge_by_seed, reconstruct, spec
from ...basis import basis_name, dense_size, parse_basis
from ...layout import Layout, resolve_group_size
from ...packet import Packet, PacketError
from ...projection import block_counts
from ..defences import DefenceOptions, defended
from ..settings import one_of, positive_finite
from ..train import first_order_steps, trainable
from .base import Algorithm, LocalTraining, MalformedUpload, difference, snapshot


@dataclass(frozen=True)
class FerretOptions(DefenceOptions):
    """Ferret's options.

    ``budget``: coordinates per client per round (at most the model's trainable parameters).
    ``server_lr``: the server's step on the reconstructed update. ``basis``: ``"rademacher"``,
    ``"gaussian"``, ``"hadamard[:size]"`` or ``"srht[:size]"`` (see :mod:`ferret.basis`).
    ``allocation``: ``"norm"`` or ``"uniform"`` (coordinates per block). ``grouping``:
    ``"tensor"``, ``"paper"`` or a block size. ``bases``: ``"shared"`` (the paper's: every client
    projects onto the round's bases, so the server merges all coordinates and reconstructs once),
    ``"client"`` (each client projects onto bases of its own seed, so the server reconstructs once
    per client, and the estimate averages independent projections: its variance falls with the
    number of clients at the same upload), ``"disjoint"`` (``hadamard`` only: the clients share
    the round's signs but each takes its own rows, slot = its place among the round's clients, so
    their directions are orthogonal and the server still reconstructs once), or ``"auto"``
    (``"disjoint"`` for ``hadamard``, else ``"shared"``). The defaults, ``hadamard`` with
    disjoint rows, train as well as Rademacher bases at the cost of one read of the update
    (``docs/bases.md``); the ``ferret-paper`` preset keeps the paper's Rademacher bases, shared.
    ``momentum``: server momentum β on the reconstructed update (v ← βv + Δ̃, θ ← θ + server_lr·v).
    ``clip``: the server clips each tensor's update to this norm (the official code clips blocks at 10).
    ``aggregator``, ``byzantine``, ``norm_bound``: robust aggregation of the coordinate vectors
    (:mod:`ferret.fl.robust`); ``dp_clip``, ``dp_noise``, ``dp_mode``, ``dp_delta``,
    ``target_epsilon``: client-level differential privacy on them (:mod:`ferret.fl.privacy`). A
    robust statistic or a noisy mean combines coordinates across clients, so it needs
    ``bases="shared"`` and ``allocation="uniform"`` (every client's k-th coordinate on the same
    basis); with ``"client"`` or ``"disjoint"`` bases each client's coordinates live in a basis of
    its own, and only ``norm_bound`` applies (a coordinate vector's norm is its update's, scaled).
    """

    budget: int = 3800
    server_lr: float = 1.0
    basis: str = "hadamard"
    allocation: str = "norm"
    grouping: str | int = "tensor"
    bases: str = "auto"
    momentum: float = 0.0
    clip: float | None = None

    def validate(self) -> None:
        super().validate()
        aligned = self.sharing == "shared" and self.allocation == "uniform"
        if self.aggregator != "mean" and not aligned:
            raise ValueError(f"aggregator {self.aggregator!r} compares the clients' coordinates one by one: it needs "
                             f"bases='shared' and allocation='uniform' (with {self.sharing!r} bases or "
                             f"{self.allocation!r} allocation only norm_bound applies)")
        if self.private and not aligned:
            raise ValueError(f"differential privacy adds noise to the sum of the clients' coordinates: it needs "
                             f"bases='shared' and allocation='uniform', not {self.sharing!r} and {self.allocation!r}")
        check_budget(self.budget)
        positive_finite("server_lr", self.server_lr)
        parse_basis(self.basis)
        one_of("allocation", self.allocation, ("norm", "uniform"))
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

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ``ValueError`` if the budget does not fit ``model``: more coordinates than trainable
        parameters, or fewer than its blocks need."""
        layout = self._layout(model)
        if self.options.budget > layout.numel:
            raise ValueError(f"budget {self.options.budget} is above the model's {layout.numel} trainable "
                             f"parameters (FedAvg would send less)")
        block_counts(layout, self.options.budget, self.basis_of(1), "uniform")

    def seed_of(self, round_seed: int, client: int) -> int:
        """The seed client ``client`` projects with in the round of ``round_seed``."""
        return spec.block_seed(round_seed, 1 + client) if self.options.sharing == "client" else round_seed

    def slot_of(self, ctx) -> tuple[int, int]:
        """``(slot, slots)``: the rows client ``ctx.client`` projects onto (its place among the
        round's clients with disjoint bases, else 0 of 1)."""
        if self.options.sharing != "disjoint":
            return 0, 1
        if ctx.client not in ctx.clients:
            raise ValueError(f"client {ctx.client} is not among round {ctx.round}'s clients {list(ctx.clients)}")
        return ctx.clients.index(ctx.client), len(ctx.clients)

    def basis_of(self, slots: int) -> str:
        """The basis name packets carry for ``slots`` row slots (a ``"hadamard"`` basis gets its size)."""
        kind, size = parse_basis(self.options.basis)
        if kind == "hadamard" and not size:
            size = dense_size(self.options.budget, slots)
        return basis_name(kind, size)

    def client_update(self, model, data, ctx):
        o = self.options
        start = snapshot(model)
        first_order_steps(model, data, rng=ctx.rng, runtime=self.runtime, **vars(self.local))
        update = difference(model, start)
        slot, slots = self.slot_of(ctx)
        packet = compress(update, self.seed_of(ctx.round_seed, ctx.client), o.budget, basis=o.basis,
                          allocation=o.allocation, grouping=o.grouping, slot=slot, slots=slots,
                          backend=self.runtime.backend)
        self._warn_if_sparse(packet, update)
        return packet.to_bytes()

    def check_upload(self, upload, model, ctx):
        try:
            packet = Packet.from_bytes(upload)
        except (PacketError, TypeError) as err:
            raise MalformedUpload(f"not a Ferret packet: {err}") from None
        layout = self._layout(model)
        if packet.fingerprint != layout.fingerprint or packet.n_blocks != layout.n_blocks:
            raise MalformedUpload("the packet was made for another model or layout")
        if packet.round_seed != self.seed_of(ctx.round_seed, ctx.client):
            raise MalformedUpload(f"the packet uses seed {packet.round_seed}, not the round's")
        if int(packet.counts.sum()) > self.options.budget:
            raise MalformedUpload(f"{int(packet.counts.sum())} coordinates, above the budget of {self.options.budget}")
        slot, slots = self.slot_of(ctx)
        if packet.basis != self.basis_of(slots):
            raise MalformedUpload(f"basis {packet.basis!r}, not {self.basis_of(slots)!r}")
        if (packet.slot, packet.slots) != (slot, slots):
            raise MalformedUpload(f"rows of slot {packet.slot} of {packet.slots}, not {slot} of {slots}")
        if not np.all(np.isfinite(packet.coords)):
            raise MalformedUpload("the coordinates hold NaN or Inf")

    def aggregate(self, model, uploads, weights, ctx):
        uploads = defended(self, model, uploads, weights, ctx)
        if uploads is None:  # a private mean or a robust statistic aggregated the round
            return
        merged = merge_by_seed([Packet.from_bytes(u) for u in uploads], weights)
        self.broadcast = b"".join(p.to_bytes() for p in merged)  # Packet.split reads it back
        self.apply(model, self.broadcast, ctx)

    def apply(self, model, broadcast, ctx):
        o, params, backend = self.options, trainable(model), self.runtime.backend
        with torch.no_grad():
            if o.clip is None and o.momentum == 0.0:
                for packet in Packet.split(broadcast):  # straight into the weights: no full-size buffer
                    reconstruct(packet, into=params, scale=o.server_lr, backend=backend)
            else:
                update = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params}
                for packet in Packet.split(broadcast):
                    reconstruct(packet, into=update, backend=backend)
                self._step(params, update)

    def _step(self, params, update: dict[str, torch.Tensor]) -> None:
        o = self.options
        for name, p in params:
            u = update[name]
            if o.clip is not None:
                # on the device, no sync: times clip / norm where the norm exceeds clip (in fp64, the
                # factor a Python float was, so the weights equal the host computation's)
                norm = u.norm().double()
                u.mul_(torch.where(norm > o.clip, o.clip / norm, 1.0))
            if o.momentum:
                if name in self.velocity:
                    u = self.velocity[name].mul_(o.momentum).add_(u)
                self.velocity[name] = u
            p.add_(u.to(p.dtype), alpha=o.server_lr)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"velocity.{n}": v for n, v in self.velocity.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.velocity = {k.removeprefix("velocity."): v.clone() for k, v in state.items() if k.startswith("velocity.")}

    # -- secure aggregation (Flower's SecAgg+): shared bases and equal block counts make a round's
    # update a function of the weighted mean of the coordinates alone --------------------------------
    def check_summable(self) -> None:
        o = self.options
        if o.sharing != "shared" or o.allocation != "uniform" or o.clip is not None:
            raise ValueError("secure aggregation needs Ferret with bases='shared', allocation='uniform' and no "
                             "clip: every client's coordinates must mean the same thing")
        if o.robust or (o.private and o.dp_mode == "central"):
            raise ValueError("secure aggregation hides each client's coordinates, which robust aggregation and "
                             "central differential privacy need: use neither, or dp_mode='distributed'")

    def summable(self, upload):
        return Packet.from_bytes(upload).coords.astype(np.float64)

    def from_summable(self, upload, vector):
        coords = np.asarray(vector, dtype="<f4")
        packet = Packet.from_bytes(upload)
        if np.all(np.isfinite(coords)):
            return dataclasses.replace(packet, coords=coords).to_bytes()
        # a Packet refuses non-finite coordinates: a client that writes them writes the bytes itself
        body = upload[: len(upload) - 4 - coords.nbytes] + coords.tobytes()
        return body + struct.pack("<I", zlib.crc32(body))

    def aggregate_mean(self, model, mean, ctx):
        layout = self._layout(model)
        basis = self.basis_of(1)
        counts = block_counts(layout, self.options.budget, basis, "uniform")
        self.broadcast = Packet(ctx.round_seed, basis, layout.group_size, layout.fingerprint, counts,
                                np.asarray(mean, dtype=np.float32)).to_bytes()
        self.apply(model, self.broadcast, ctx)

    def _layout(self, model) -> Layout:
        return Layout.of(trainable(model), self.options.grouping)

    def _warn_if_sparse(self, packet: Packet, update) -> None:
        """Once: an SRHT packet moves at most K·B elements of a block, and training suffers when
        that is a small share of the model (docs/bases.md)."""
        kind, size = parse_basis(self.options.basis)
        if kind != "srht" or self._warned_sparse:
            return
        sizes = np.array(Layout.of(update, self.options.grouping).block_sizes, dtype=np.int64)
        share = np.minimum(sizes, packet.counts.astype(np.int64) * size).sum() / sizes.sum()
        if share < 0.5:
            warnings.warn(f"basis {self.options.basis!r} moves at most {share:.0%} of the weights per round (K·B "
                          f"is below the block sizes), which can hurt training: use a larger srht size or "
                          f"'rademacher' (docs/bases.md)", RuntimeWarning, stacklevel=2)
            self._warned_sparse = True
