"""One round of Ferret as a value: what each client uploads and what the server sends back.

A :class:`Round` holds what a round's clients and server agree on (the round's seed, who takes
part, the budget and how the coordinates are laid out) and does the round's three steps::

    rnd = ferret.Round(seed, clients=10, budget=3800)     # Ferret's defaults
    packet = rnd.compress(update, client=3)                # on client 3: its upload
    broadcast = rnd.merge(packets, weights)                # on the server: the weighted mean
    rnd.apply(broadcast, into=model, scale=server_lr)      # everywhere: model += lr * mean

The defaults are ``fl.Ferret``'s, which trains through this class: the dense Hadamard basis with
disjoint rows (each client takes its own rows of the round's transforms, in groups when the
clients outnumber what one transform holds, :mod:`ferret.slots`), coordinates shared among
blocks by their norms. :func:`ferret.compress`'s own defaults are the paper's instead (Rademacher
bases that every client shares); ``Round(..., basis="rademacher", bases="shared")`` is that.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from . import slots as row_slots
from .allocation import POLICIES, check_budget
from .basis import basis_name, dense_size, parse_basis
from .layout import Layout, resolve_group_size
from .packet import Packet, PacketError
from .projection import compress, merge_by_seed, reconstruct
from .sharded import shards_of
from .spec import block_seed, normalize_seed
from .tensors import named_tensors

SHARINGS = ("auto", "shared", "client", "disjoint")


class Round:
    """A round seeded ``seed`` with ``clients`` taking part (their number, or their ids: any
    distinct non-negative ints), ``budget`` coordinates per client.

    ``basis``: ``"hadamard[:size]"`` (the default), ``"rademacher"``, ``"gaussian"`` or
    ``"srht[:size]"`` (:mod:`ferret.basis`). ``bases``: ``"disjoint"`` (Hadamard only: each client
    its own rows of the round's transforms, so their directions are orthogonal), ``"shared"``
    (every client the round's bases), ``"client"`` (each client bases of its own seed), or
    ``"auto"``: disjoint for Hadamard, else shared. ``allocation``: ``"norm"`` or ``"uniform"``
    (coordinates per block). ``grouping``: ``"tensor"``, ``"paper"`` or a block size
    (:mod:`ferret.layout`). Raises ``ValueError`` / ``TypeError`` for settings that do not go
    together or are not of their kind.
    """

    def __init__(self, seed: int, clients: int | Sequence[int], budget: int = 3800, *, basis: str = "hadamard",
                 bases: str = "auto", allocation: str = "norm", grouping: str | int = "tensor"):
        self.seed = normalize_seed(seed)
        self.clients = _clients(clients)
        check_budget(budget)
        self.budget = int(budget)
        kind, _ = parse_basis(basis)
        if bases not in SHARINGS:
            raise ValueError(f"bases must be one of {', '.join(SHARINGS)}, got {bases!r}")
        self.sharing = ("disjoint" if kind == "hadamard" else "shared") if bases == "auto" else bases
        if self.sharing == "disjoint" and kind != "hadamard":
            raise ValueError(f"bases='disjoint' needs basis='hadamard' (disjoint rows of one transform), not {basis!r}")
        if allocation not in POLICIES:
            raise ValueError(f"allocation must be one of {', '.join(POLICIES)}, got {allocation!r}")
        resolve_group_size(grouping, [1])
        self.basis, self.allocation, self.grouping = basis, allocation, grouping

    def __repr__(self) -> str:
        return (f"Round(seed={self.seed}, clients={len(self.clients)}, budget={self.budget}, basis={self.basis!r}, "
                f"bases={self.sharing!r}, allocation={self.allocation!r}, grouping={self.grouping!r})")

    def layout(self, update) -> Layout:
        """The :class:`Layout` of ``update`` (or of the model it comes from) under this round's grouping."""
        return Layout.of(_named(update), self.grouping)

    def place(self, client: int, layout: Layout) -> row_slots.Place:
        """Where ``client``'s coordinates go for tensors of ``layout``: the seed it projects with
        (the round's; its own with ``"client"`` bases; its group's with ``"disjoint"`` bases),
        its row slot and the basis name its packet carries. Raises ``ValueError`` for a client
        that is not among the round's."""
        index = bisect.bisect_left(self.clients, client)
        if index == len(self.clients) or self.clients[index] != client:
            raise ValueError(f"client {client} is not among the round's {len(self.clients)} clients")
        if self.sharing == "disjoint":
            return row_slots.place(self.seed, index, len(self.clients), layout.block_sizes, self.budget, self.basis)
        seed = block_seed(self.seed, 1 + client) if self.sharing == "client" else self.seed
        kind, size = parse_basis(self.basis)
        if kind == "hadamard" and not size:
            size = dense_size(self.budget, 1)
        return row_slots.Place(seed, 0, 1, basis_name(kind, size))

    def compress(self, update, client: int = 0, *, start=None, backend: str | None = None) -> Packet:
        """``client``'s packet for ``update`` (what :func:`ferret.compress` takes: a tensor, a
        state dict, ``(name, tensor)`` pairs or a module's trainable parameters). With ``start``
        (the same tensors before training), the packet of ``update - start``, read in place with
        no difference made. Raises as :func:`ferret.compress` does, and ``ValueError`` for a
        client not among the round's."""
        items = _named(update)
        place = self.place(client, Layout.of(items, self.grouping))
        return compress(items, place.seed, self.budget, basis=place.basis, allocation=self.allocation,
                        grouping=self.grouping, slot=place.slot, slots=place.slots,
                        start=None if start is None else _named(start), backend=backend)

    def merge(self, packets, weights=None) -> list[Packet]:
        """The broadcast: packets (one per seed the clients projected with: one for shared bases
        and each group of disjoint rows, one per client with ``"client"`` bases) whose
        reconstructions add up to the ``weights``-weighted mean of ``packets``' (equal weights by
        default). Raises as :func:`ferret.merge_by_seed` does."""
        return merge_by_seed(packets, weights)

    def apply(self, broadcast, into, scale: float = 1.0, *, backend: str | None = None):
        """Add ``scale`` times what ``broadcast`` (a :meth:`merge` result, or its packets'
        bytes one after another) rebuilds to ``into`` in place, and return ``into``: a module
        (its trainable parameters), ``named_parameters()``, a state dict or ``(name, tensor)``
        pairs; DTensors sharded over ranks write each rank's part. Raises
        :class:`~ferret.packet.PacketError` for packets of another layout and when the step would
        make a finite weight non-finite, with nothing written (sharded targets: by that packet)."""
        packets = Packet.split(broadcast) if isinstance(broadcast, (bytes, bytearray)) else list(broadcast)
        items = _named(into)
        if len(packets) == 1 or shards_of(items) is not None:  # sharded targets: each packet in turn, each
            for packet in packets:  # refused whole if it would overflow (each rank writes its own part)
                reconstruct(packet, into=items, scale=scale, backend=backend)
            return into
        total = {n: torch.zeros(x.shape, dtype=torch.float32, device=x.device) if isinstance(x, torch.Tensor)
                 else np.zeros(x.shape, dtype=np.float32) for n, x in items}
        for packet in packets:  # the sum first: a step that would overflow is refused before any write
            reconstruct(packet, into=total, backend=backend)
        _add_checked(items, total, scale)
        return into


def _clients(clients) -> tuple[int, ...]:
    """The round's client ids, sorted: ``range(clients)`` for a count."""
    if isinstance(clients, bool):
        raise TypeError("clients is a count or a sequence of client ids, not a bool")
    if isinstance(clients, (int, np.integer)):
        if clients < 1:
            raise ValueError(f"a round needs at least one client, got {clients}")
        return tuple(range(int(clients)))
    ids = list(clients)
    if not ids or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0 for c in ids):
        raise ValueError("clients must be a positive count or a non-empty sequence of non-negative int ids")
    if len(set(ids)) != len(ids):
        raise ValueError("a client id appears twice among the round's clients")
    return tuple(sorted(int(c) for c in ids))


def _named(obj) -> list[tuple[str, object]]:
    """Tensors by name: a module gives its trainable parameters, anything else goes to
    :func:`ferret.tensors.named_tensors` (tensor, array, mapping, ``(name, tensor)`` pairs)."""
    if isinstance(obj, torch.nn.Module):
        return [(n, p) for n, p in obj.named_parameters() if p.requires_grad]
    return named_tensors(obj if isinstance(obj, (torch.Tensor, np.ndarray, Mapping)) else list(obj), "tensors")


def _add_checked(items, total, scale: float) -> None:
    """``x += scale * total[name]`` for every item, or nothing at all when a finite element would
    not stay finite (:class:`~ferret.packet.PacketError`)."""
    with torch.no_grad():
        pairs = [(torch.as_tensor(x), torch.as_tensor(total[n]).to(torch.as_tensor(x).dtype)) for n, x in items]
        safe = [(torch.isfinite(x.add(u, alpha=scale)) | ~torch.isfinite(x)).all() for x, u in pairs]
        if safe and not bool(torch.stack(safe).all()):
            raise PacketError("the broadcast times the scale would make weights non-finite (it overflows their dtype)")
        for x, u in pairs:
            x.add_(u, alpha=scale)

