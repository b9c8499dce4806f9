"""Row slots for any number of clients: which rows of a round's Hadamard transforms each client
takes, so that a round's clients project onto disjoint directions.

Clients that share the dense Hadamard basis can take disjoint rows, slot ``c`` of ``F``
(:mod:`ferret.spec`): their directions are then orthogonal, and one reconstruction of their merged
packet serves them all. One transform holds only so many slots (:func:`capacity`):

* every block must keep its Hadamard size when the slots merge into one packet (``F`` at most
  ``pow2`` of the smallest block: a 64-element norm weight has 64 rows);
* the transform's size is at most ``2**22`` (``budget * F`` rows at most, when the size is chosen
  from the budget);
* the slot with the fewest rows must still hold the whole budget (its rows in every block,
  at most one per element, sum to at least ``budget``).

A round whose clients outnumber that is split into ``G`` groups of consecutive places, as even
as possible: each group takes disjoint rows of a transform of its own seed
(:func:`ferret.spec.group_seed`; group 0 keeps the round's seed), so the server merges each group
into one packet and reconstructs once per group. Every client's estimate stays unbiased (its
signs are independent of every other group's), and a round of ``N`` clients needs
``ceil(N / capacity)`` reconstructions. With no more clients than a transform holds there is one
group and nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .basis import basis_name, dense_size, parse_basis
from .spec import MAX_DENSE_SIZE, dense_block_size, dense_slot_rows, group_seed, pow2


@dataclass(frozen=True)
class Place:
    """Where one client's coordinates go: the ``seed`` it projects with, its row ``slot`` of
    ``slots``, the ``basis`` name its packet carries (the Hadamard size included) and its
    ``group`` (the packets of one group merge into one)."""

    seed: int
    slot: int
    slots: int
    basis: str
    group: int = 0


def capacity(block_sizes, budget: int, basis: str = "hadamard") -> int:
    """The most clients one transform of ``basis`` (``"hadamard"`` or ``"hadamard:<size>"``) holds
    with disjoint rows for blocks of ``block_sizes`` elements and ``budget`` coordinates per
    client (see the module docstring); 0 when not even one client fits."""
    return _capacity(tuple(int(n) for n in block_sizes), int(budget), _named_size(basis))


def grouping(clients: int, block_sizes, budget: int, basis: str = "hadamard") -> tuple[int, int]:
    """``(groups, slots)``: how a round of ``clients`` clients taking disjoint rows is split into
    groups of at most ``slots`` consecutive places. Raises ``ValueError`` when the budget does not
    fit even one client (see :func:`capacity`)."""
    if clients < 1:
        raise ValueError(f"a round needs at least one client, got {clients}")
    return _grouping(int(clients), tuple(int(n) for n in block_sizes), int(budget), _named_size(basis))


def place(round_seed: int, index: int, clients: int, block_sizes, budget: int, basis: str = "hadamard") -> Place:
    """The :class:`Place` of the client at ``index`` (0-based) among a round's ``clients`` clients
    taking disjoint rows of ``basis`` for blocks of ``block_sizes`` elements and ``budget``
    coordinates each. Raises ``ValueError`` for an index outside the round or a budget that does
    not fit (see :func:`grouping`)."""
    if not 0 <= index < clients:
        raise ValueError(f"place {index} is not one of a round's {clients} clients")
    groups, slots = grouping(clients, block_sizes, budget, basis)
    group, slot = divmod(index, slots)
    size = _named_size(basis) or dense_size(budget, slots)
    return Place(group_seed(round_seed, group), slot, slots, basis_name("hadamard", size), group)


def _named_size(basis: str) -> int:
    kind, size = parse_basis(basis)
    if kind != "hadamard":
        raise ValueError(f"disjoint rows need the 'hadamard' basis, not {basis!r}")
    return size


def _fits(slots: int, sizes: np.ndarray, budget: int, named: int) -> bool:
    """Whether ``slots`` slots of one transform each hold ``budget`` coordinates."""
    if slots > pow2(int(sizes.min())):
        return False
    size = named or pow2(max(budget * slots, 1))
    if size > MAX_DENSE_SIZE:
        return False
    size = named or dense_size(budget, slots)
    last = slots - 1  # the slot with the fewest rows
    rows = np.array([dense_slot_rows(dense_block_size(size, int(n), slots), last, slots) for n in sizes])
    rows = np.minimum(rows, sizes)
    return bool(rows.min() >= 1 and rows.sum() >= budget)


@lru_cache(maxsize=256)
def _capacity(sizes: tuple, budget: int, named: int, at_most: int | None = None) -> int:
    array = np.asarray(sizes, dtype=np.int64)
    top = min(pow2(int(array.min())), max(MAX_DENSE_SIZE // max(budget, 1), 1))
    if named:
        top = min(top, named)
    top = min(top, max(int(array.sum()) // max(budget, 1), 1))  # each slot needs budget rows of the elements
    if at_most is not None:
        top = min(top, at_most)
    for slots in range(top, 0, -1):
        if _fits(slots, array, budget, named):
            return slots
    return 0


@lru_cache(maxsize=256)
def _grouping(clients: int, sizes: tuple, budget: int, named: int) -> tuple[int, int]:
    most = _capacity(sizes, budget, named, clients)
    if most == 0:
        raise ValueError(f"a budget of {budget} coordinates does not fit one client's rows of the hadamard basis "
                         f"for blocks of {min(sizes)} to {max(sizes)} elements: lower the budget")
    array = np.asarray(sizes, dtype=np.int64)
    groups = -(-clients // most)
    slots = -(-clients // groups)
    while not _fits(slots, array, budget, named):  # fewer slots than a transform holds can have fewer rows
        groups += 1
        slots = -(-clients // groups)
    return groups, slots
