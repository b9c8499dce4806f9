"""Block layouts: how the tensors of an update are cut into blocks that each get their own seed
and their own share of the coordinate budget.

Two rules:

* ``"tensor"``: one block per tensor.
* grouped: consecutive tensors are packed into one block while the block stays within a target
  size (a tensor larger than the target gets a block of its own). ``"paper"`` sets the target as
  the official Ferret code does, ``int(0.9 * median(tensor sizes))``; an int sets it directly.

A layout depends only on names, shapes and the rule, so a server derives the same one from its
own copy of the model; its fingerprint travels in every packet.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from math import prod

import numpy as np

from .tensors import named_tensors

LAYOUT_VERSION = 1


@dataclass(frozen=True)
class Entry:
    """One tensor of the layout: its name, shape, block, and offset inside that block."""

    name: str
    shape: tuple[int, ...]
    block: int
    offset: int

    @property
    def numel(self) -> int:
        return prod(self.shape)


class Layout:
    """Entries (in the update's order) and the blocks they form; compare with ``fingerprint``."""

    def __init__(self, shapes: list[tuple[str, tuple[int, ...]]], group_size: int = 0):
        if not shapes:
            raise ValueError("the update holds no tensors")
        if group_size < 0:
            raise ValueError(f"group_size must be >= 0, got {group_size}")
        self.group_size = group_size
        entries, block, offset = [], 0, 0
        for name, shape in shapes:
            numel = prod(shape)
            if entries and (group_size == 0 or (offset > 0 and offset + numel > group_size)):
                block, offset = block + 1, 0
            entries.append(Entry(name, tuple(int(s) for s in shape), block, offset))
            offset += numel
        self.entries: tuple[Entry, ...] = tuple(entries)
        members: list[list[int]] = [[] for _ in range(block + 1)]
        for i, e in enumerate(entries):
            members[e.block].append(i)
        self._block_entries = tuple(tuple(m) for m in members)
        self.block_sizes: tuple[int, ...] = tuple(sum(entries[i].numel for i in m) for m in members)
        canonical = json.dumps(
            {"v": LAYOUT_VERSION, "group_size": group_size, "entries": [[e.name, list(e.shape)] for e in entries]},
            separators=(",", ":"),
        )
        self.fingerprint: bytes = hashlib.blake2b(canonical.encode(), digest_size=16).digest()

    @classmethod
    def of(cls, update, grouping="tensor") -> "Layout":
        """The layout of ``update`` (tensor, array, state dict or ``(name, tensor)`` pairs).

        ``grouping`` is ``"tensor"``, ``"paper"`` or a target block size (int > 0).
        """
        shapes = [(name, tuple(x.shape)) for name, x in named_tensors(update)]
        return cls(shapes, resolve_group_size(grouping, [prod(s) for _, s in shapes]))

    @property
    def block_entries(self) -> tuple[tuple[int, ...], ...]:
        """For each block, the indices of its entries in order."""
        return self._block_entries

    @property
    def n_blocks(self) -> int:
        return len(self.block_sizes)

    @property
    def numel(self) -> int:
        return sum(self.block_sizes)

    def __eq__(self, other) -> bool:
        return isinstance(other, Layout) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        rule = "tensor" if self.group_size == 0 else f"grouped<= {self.group_size}"
        return f"Layout({len(self.entries)} tensors, {self.n_blocks} blocks, {self.numel} elements, {rule})"


def resolve_group_size(grouping, sizes: list[int]) -> int:
    """Turn a grouping rule into a target block size (0 means one block per tensor)."""
    if isinstance(grouping, str):
        if grouping == "tensor":
            return 0
        if grouping == "paper":
            return max(1, int(0.9 * float(np.median(sizes))))
        raise ValueError(f"unknown grouping {grouping!r}: use 'tensor', 'paper' or a block size")
    if isinstance(grouping, (int, np.integer)) and not isinstance(grouping, bool) and grouping > 0:
        return int(grouping)
    raise ValueError(f"grouping must be 'tensor', 'paper' or a positive int, got {grouping!r}")
