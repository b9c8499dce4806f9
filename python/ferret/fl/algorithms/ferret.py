"""Ferret: first-order local steps, the update projected onto seeded bases (K coordinates
uploaded), the coordinates merged linearly and reconstructed on the server."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

import torch

from ... import compress, merge_packets, reconstruct, spec
from ...basis import parse_basis
from ...layout import Layout
from ...packet import Packet
from ..train import first_order_steps, trainable
from .base import Algorithm, LocalTraining, difference, snapshot

BASES = ("shared", "client")


class Ferret(Algorithm):
    """Ferret with ``budget`` coordinates per client per round.

    ``bases``: ``"shared"`` (the paper's: every client projects onto the round's bases, so the
    server merges all coordinates and reconstructs once) or ``"client"`` (each client projects
    onto bases of its own seed, so the server reconstructs once per client, and the estimate
    averages independent projections: its variance falls with the number of clients at the
    same upload). ``momentum``: server momentum β on the reconstructed update (v ← βv + Δ̃,
    θ ← θ + server_lr·v). ``clip``: the server clips each tensor's update to this norm (the
    official code clips blocks at 10). ``basis``: ``"rademacher"``, ``"gaussian"`` or
    ``"srht[:size]"`` (see :mod:`ferret.basis`). :meth:`paper` gives the official code's choices.
    """

    name = "ferret"
    default_local = LocalTraining()

    def __init__(self, budget: int = 3800, local: LocalTraining | None = None, server_lr: float = 1.0, *,
                 basis: str = "rademacher", allocation: str = "norm", grouping="tensor",
                 bases: str = "shared", momentum: float = 0.0, clip: float | None = None):
        super().__init__()
        if bases not in BASES:
            raise ValueError(f"unknown bases {bases!r}: use one of {', '.join(BASES)}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        parse_basis(basis)
        self.budget, self.server_lr = budget, server_lr
        self.local = local or self.default_local
        self.basis, self.allocation, self.grouping = basis, allocation, grouping
        self.bases, self.momentum, self.clip = bases, momentum, clip
        self.velocity: dict[str, torch.Tensor] = {}
        self._warned_sparse = False

    @classmethod
    def paper(cls, budget: int = 3800, local: LocalTraining | None = None, server_lr: float = 1.0) -> "Ferret":
        """The official code's method: shared bases, blocks of 0.9 × the median tensor, norm
        allocation, updates clipped to norm 10. Its server learning rate (3 to 10) compensates a
        reconstruction that is about Δ/3 in expectation; ours is unbiased, so 1 matches it."""
        return cls(budget, local, server_lr, grouping="paper", allocation="norm", clip=10.0)

    def seed_of(self, round_seed: int, client: int) -> int:
        """The seed client ``client`` projects with in the round of ``round_seed``."""
        return round_seed if self.bases == "shared" else spec.block_seed(round_seed, 1 + client)

    def client_update(self, model, data, ctx):
        start = snapshot(model)
        first_order_steps(model, data, rng=ctx.rng, runtime=self.runtime, **vars(self.local))
        update = difference(model, start)
        packet = compress(update, self.seed_of(ctx.round_seed, ctx.client), self.budget, basis=self.basis,
                          allocation=self.allocation, grouping=self.grouping, backend=self.runtime.backend)
        self._warn_if_sparse(packet, update)
        return packet.to_bytes()

    def _warn_if_sparse(self, packet: Packet, update) -> None:
        """Once: an SRHT packet moves at most K·B elements of a block, and training suffers when
        that is a small share of the model (docs/bases.md)."""
        kind, size = parse_basis(self.basis)
        if kind != "srht" or self._warned_sparse:
            return
        sizes = np.array(Layout.of(update, self.grouping).block_sizes, dtype=np.int64)
        share = np.minimum(sizes, packet.counts.astype(np.int64) * size).sum() / sizes.sum()
        if share < 0.5:
            warnings.warn(f"basis {self.basis!r} moves at most {share:.0%} of the weights per round (K·B is below "
                          f"the block sizes), which can hurt training: use a larger srht size or 'rademacher' "
                          f"(docs/bases.md)", RuntimeWarning, stacklevel=2)
            self._warned_sparse = True

    def aggregate(self, model, uploads, weights, ctx):
        merged = merge_by_seed([Packet.from_bytes(u) for u in uploads], weights)
        self.broadcast = b"".join(p.to_bytes() for p in merged)  # Packet.split reads it back
        self.apply(model, self.broadcast, ctx)

    def apply(self, model, broadcast, ctx):
        params = trainable(model)
        backend = self.runtime.backend
        with torch.no_grad():
            if self.clip is None and self.momentum == 0.0:
                for packet in Packet.split(broadcast):  # straight into the weights: no full-size buffer
                    reconstruct(packet, into=params, scale=self.server_lr, backend=backend)
            else:
                update = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params}
                for packet in Packet.split(broadcast):
                    reconstruct(packet, into=update, backend=backend)
                self._apply(params, update)

    def _apply(self, params, update: dict[str, torch.Tensor]) -> None:
        for name, p in params:
            u = update[name]
            if self.clip is not None:
                # on the device, no sync: times clip / norm where the norm exceeds clip (in fp64, the
                # factor a Python float was, so the weights equal the host computation's)
                norm = u.norm().double()
                u.mul_(torch.where(norm > self.clip, self.clip / norm, 1.0))
            if self.momentum:
                if name in self.velocity:
                    u = self.velocity[name].mul_(self.momentum).add_(u)
                self.velocity[name] = u
            p.add_(u.to(p.dtype), alpha=self.server_lr)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"velocity.{n}": v for n, v in self.velocity.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.velocity = {k.removeprefix("velocity."): v.clone() for k, v in state.items() if k.startswith("velocity.")}


def merge_by_seed(packets: list[Packet], weights: list[float]) -> list[Packet]:
    """One packet per distinct seed whose reconstructions sum to Σ_i w_i·(packet i's reconstruction)."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(packets):
        groups.setdefault(p.round_seed, []).append(i)
    out = []
    for members in groups.values():
        w = [weights[i] for i in members]
        m = merge_packets([packets[i] for i in members], w)
        out.append(m if len(groups) == 1 else dataclasses.replace(m, coords=(m.coords * np.float32(sum(w)))))
    return out
