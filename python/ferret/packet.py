"""The packet a client sends: K fp32 coordinates plus what the receiver needs to rebuild the
update from its own copy of the shared seeds, and a versioned binary encoding.

Encoding (little-endian), version 1 (Rademacher, Gaussian and SRHT packets)::

    magic      4 bytes  b"FRPK"
    version    u16      1
    basis      u8       0 rademacher, 1 gaussian, 2 srht
    basis_arg  u8       srht: log2 of the Hadamard size; otherwise 0
    round_seed u64      in [0, 2**63)
    group_size u64      the layout's grouping (0: one block per tensor)
    layout     16 bytes the layout fingerprint
    n_blocks   u32
    counts     n_blocks x u32   coordinates per block
    coords     sum(counts) x f32
    crc32      u32      zlib.crc32 of every byte before it

Version 2 (Hadamard packets) is version 1 with basis 3 (``hadamard``, ``basis_arg`` the log2 of
its Hadamard size) and two more header words after ``n_blocks``: ``slots u32`` and ``slot u32``,
the packet's row slot (see :mod:`ferret.spec`). Packets of the older bases are still written as
version 1, byte for byte as before.

Version 3 (a merged Hadamard packet of several slots holding exactly their rows) is version 2
with ``slot`` 0 and, after ``counts``, ``slot_counts``: ``n_blocks x slots`` u32, how many rows of
each slot each block holds (each block's row sums to its count). Block b then holds, in
increasing order, the positions ``c + slots * k`` (``k < slot_counts[b, c]``) of the slot-0-of-1
row order, with no place left for rows no client sent. Every version decodes.
"""

from __future__ import annotations

import operator
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from .basis import KINDS, basis_name, parse_basis

MAGIC = b"FRPK"
VERSIONS = (1, 2, 3)
_HEADER = struct.Struct("<4sHBBQQ16sI")
_SLOTS = struct.Struct("<II")  # version 2: slots, slot


class PacketError(ValueError):
    """Bytes that are not a valid packet, or a packet that does not fit the receiver's layout."""


@dataclass(frozen=True, eq=False)
class Packet:
    """Coordinates of one update: ``counts[b]`` fp32 numbers per block, block after block.

    Build packets with :func:`ferret.compress`; read them with :func:`ferret.reconstruct`.
    ``slot`` of ``slots`` names the rows a Hadamard packet holds (clients taking disjoint rows);
    every other packet has slot 0 of 1. A merged packet of several slots' rows has
    ``slot_counts`` (``n_blocks x slots``: each slot's rows in each block; see
    :meth:`positions`).
    """

    round_seed: int
    basis: str
    group_size: int
    fingerprint: bytes
    counts: np.ndarray  # uint32, one per block
    coords: np.ndarray  # float32, sum(counts)
    slot: int = 0
    slots: int = 1
    slot_counts: np.ndarray | None = None  # uint32 (n_blocks, slots): a merged packet of every slot's rows

    def __post_init__(self):
        counts = np.ascontiguousarray(self.counts, dtype=np.uint32)
        coords = np.ascontiguousarray(self.coords, dtype=np.float32)
        counts.flags.writeable = coords.flags.writeable = False
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "coords", coords)
        try:
            object.__setattr__(self, "basis", basis_name(*parse_basis(self.basis)))
        except (TypeError, ValueError) as err:
            raise PacketError(str(err)) from None
        kind, size = parse_basis(self.basis)
        if kind == "hadamard" and not size:
            raise PacketError("a hadamard packet names its Hadamard size ('hadamard:<size>')")
        try:
            object.__setattr__(self, "slot", operator.index(self.slot))
            object.__setattr__(self, "slots", operator.index(self.slots))
        except TypeError:
            raise PacketError(f"row slots are ints, got {self.slot!r} of {self.slots!r}") from None
        if not (1 <= self.slots <= 2**32 - 1 and 0 <= self.slot < self.slots):
            raise PacketError(f"row slot {self.slot} of {self.slots} is not one of 0 .. slots - 1")
        if self.slots > 1 and kind != "hadamard":
            raise PacketError(f"only hadamard packets take row slots, not {kind}")
        for name in ("round_seed", "group_size"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)):
                raise PacketError(f"{name} is an int, got {value!r}")
            try:
                object.__setattr__(self, name, operator.index(value))
            except TypeError:
                raise PacketError(f"{name} is an int, got {value!r}") from None
        if not 0 <= self.round_seed < 2**63:
            raise PacketError(f"round seed {self.round_seed} is outside [0, 2**63)")
        if not 0 <= self.group_size < 2**64:
            raise PacketError(f"group size {self.group_size} is outside [0, 2**64)")
        if not isinstance(self.fingerprint, bytes) or len(self.fingerprint) != 16:
            raise PacketError("a layout fingerprint is 16 bytes")
        if int(counts.sum(dtype=np.int64)) != coords.size:
            raise PacketError(f"counts sum to {int(counts.sum())} but the packet holds {coords.size} coordinates")
        if np.any(counts == 0):
            raise PacketError("every block needs at least one coordinate")
        if not np.all(np.isfinite(coords)):
            raise PacketError("the packet holds NaN or infinite coordinates")
        if self.slot_counts is not None:
            per_slot = np.ascontiguousarray(self.slot_counts, dtype=np.uint32)
            if kind != "hadamard" or self.slots < 2 or self.slot != 0:
                raise PacketError("rows of several slots go in a hadamard packet of slot 0 of 2 or more")
            if per_slot.shape != (counts.size, self.slots):
                raise PacketError(f"slot counts are {counts.size} x {self.slots}, got shape {per_slot.shape}")
            if not np.array_equal(per_slot.sum(axis=1, dtype=np.int64), counts.astype(np.int64)):
                raise PacketError("each block's slot counts must sum to its count")
            per_slot.flags.writeable = False
            object.__setattr__(self, "slot_counts", per_slot)

    @property
    def n_blocks(self) -> int:
        return self.counts.size

    def positions(self, b: int) -> np.ndarray:
        """Where block ``b``'s coordinates sit in the slot-0-of-1 row order of its basis (int64,
        increasing): ``slot + slots * k`` for a packet of one slot, every slot's own for a merged
        packet of several (``slot_counts``)."""
        if self.slot_counts is None:
            return self.slot + self.slots * np.arange(int(self.counts[b]), dtype=np.int64)
        return np.sort(np.concatenate([c + self.slots * np.arange(int(m), dtype=np.int64)
                                       for c, m in enumerate(self.slot_counts[b])]))

    def block_coords(self, b: int) -> np.ndarray:
        """The coordinates of block ``b`` (a read-only float32 view)."""
        start = int(self.counts[:b].sum(dtype=np.int64))
        return self.coords[start : start + int(self.counts[b])]

    def to_bytes(self) -> bytes:
        """The packet in its versioned binary encoding (see the module docstring)."""
        kind, size = parse_basis(self.basis)
        version = 1 if kind != "hadamard" else 2 if self.slot_counts is None else 3
        head = _HEADER.pack(MAGIC, version, KINDS.index(kind), size.bit_length() - 1 if size else 0, self.round_seed,
                            self.group_size, self.fingerprint, self.n_blocks)
        if version >= 2:
            head += _SLOTS.pack(self.slots, self.slot)
        per_slot = b"" if self.slot_counts is None else self.slot_counts.astype("<u4").tobytes()
        body = head + self.counts.astype("<u4").tobytes() + per_slot + self.coords.astype("<f4").tobytes()
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> "Packet":
        """Decode :meth:`to_bytes` output (``bytes``, ``bytearray`` or ``memoryview``); raises
        ``TypeError`` for any other type and :class:`PacketError` on anything malformed."""
        data = _bytes_of(data)
        if len(data) < _HEADER.size + 4:
            raise PacketError(f"{len(data)} bytes is too short for a packet")
        magic, version, basis, basis_arg, seed, group_size, fingerprint, n_blocks = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise PacketError("not a ferret packet (bad magic)")
        if version not in VERSIONS:
            raise PacketError(f"packet version {version} is not supported (this ferret reads versions 1, 2 and 3); "
                              f"upgrade ferret to read it")
        head_size = _head_size(version)
        if len(data) < head_size + 4:
            raise PacketError(f"{len(data)} bytes is too short for a version {version} packet")
        (crc,) = struct.unpack_from("<I", data, len(data) - 4)
        if zlib.crc32(data[:-4]) != crc:
            raise PacketError("packet checksum mismatch: the bytes were truncated or corrupted")
        if basis >= len(KINDS) or (KINDS[basis] == "hadamard") != (version >= 2):
            raise PacketError(f"basis code {basis} is not known to packet version {version}")
        kind = KINDS[basis]
        if basis_arg and kind in ("rademacher", "gaussian") or basis_arg > 30 or kind == "hadamard" and not basis_arg:
            raise PacketError(f"basis argument {basis_arg} does not fit basis {kind}")
        slots, slot = _SLOTS.unpack_from(data, _HEADER.size) if version >= 2 else (1, 0)
        counts_end = head_size + 4 * n_blocks
        if counts_end > len(data) - 4:
            raise PacketError("packet truncated inside the block counts")
        counts = np.frombuffer(data, dtype="<u4", count=n_blocks, offset=head_size)
        per_slot = None
        if version == 3:
            if counts_end + 4 * n_blocks * slots > len(data) - 4:
                raise PacketError("packet truncated inside the slot counts")
            per_slot = np.frombuffer(data, dtype="<u4", count=n_blocks * slots, offset=counts_end).reshape(n_blocks,
                                                                                                          slots)
            counts_end += 4 * n_blocks * slots
        n_coords = int(counts.sum(dtype=np.int64))
        if counts_end + 4 * n_coords != len(data) - 4:
            raise PacketError(f"packet length does not match its counts ({n_coords} coordinates)")
        coords = np.frombuffer(data, dtype="<f4", count=n_coords, offset=counts_end)
        name = kind if kind in ("rademacher", "gaussian") else f"{kind}:{1 << basis_arg}"
        return cls(seed, name, group_size, fingerprint, counts, coords, slot, slots, per_slot)

    @classmethod
    def split(cls, data: bytes) -> list["Packet"]:
        """Decode a concatenation of encoded packets (e.g. a broadcast of several), in order; raises
        as :meth:`from_bytes` does."""
        data, packets, at = _bytes_of(data), [], 0
        while at < len(data):
            if len(data) - at < _HEADER.size:
                raise PacketError(f"{len(data) - at} trailing bytes are too short for a packet")
            version, n_blocks = _HEADER.unpack_from(data, at)[1], _HEADER.unpack_from(data, at)[-1]
            if version not in VERSIONS:
                raise PacketError(f"packet version {version} is not supported (this ferret reads versions 1, 2 and 3)")
            if len(data) - at < _head_size(version):
                raise PacketError("packet truncated inside its header")
            counts_end = at + _head_size(version) + 4 * n_blocks
            if counts_end > len(data):
                raise PacketError("packet truncated inside the block counts")
            n_coords = int(np.frombuffer(data, dtype="<u4", count=n_blocks,
                                         offset=counts_end - 4 * n_blocks).sum(dtype=np.int64))
            slots = _SLOTS.unpack_from(data, at + _HEADER.size)[0] if version == 3 else 0
            end = counts_end + 4 * n_blocks * slots + 4 * n_coords + 4
            packets.append(cls.from_bytes(data[at:end]))
            at = end
        return packets

    def __eq__(self, other) -> bool:
        return isinstance(other, Packet) and self.to_bytes() == other.to_bytes()

    def __repr__(self) -> str:
        rows = f", slot {self.slot} of {self.slots}" if self.slots > 1 else ""
        if self.slot_counts is not None:
            rows = f", every slot's rows of {self.slots}"
        return (
            f"Packet({self.basis}{rows}, seed={self.round_seed}, {self.n_blocks} blocks, "
            f"{self.coords.size} coordinates, {len(self.to_bytes())} bytes)"
        )


def _head_size(version: int) -> int:
    return _HEADER.size + (_SLOTS.size if version >= 2 else 0)


def _bytes_of(data) -> bytes:
    # bytes(n) of an int would allocate n zero bytes: only bytes-like objects are packets' input
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"packets decode from bytes, bytearray or memoryview, got {type(data).__name__}")
    return bytes(data)
