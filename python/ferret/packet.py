"""The packet a client sends: K fp32 coordinates plus what the receiver needs to rebuild the
update from its own copy of the shared seeds, and a versioned binary encoding.

Encoding (little-endian), version 1::

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
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from .basis import KINDS, basis_name, parse_basis

MAGIC = b"FRPK"
VERSION = 1
_HEADER = struct.Struct("<4sHBBQQ16sI")


class PacketError(ValueError):
    """Bytes that are not a valid packet, or a packet that does not fit the receiver's layout."""


@dataclass(frozen=True, eq=False)
class Packet:
    """Coordinates of one update: ``counts[b]`` fp32 numbers per block, block after block.

    Build packets with :func:`ferret.compress`; read them with :func:`ferret.reconstruct`.
    """

    round_seed: int
    basis: str
    group_size: int
    fingerprint: bytes
    counts: np.ndarray  # uint32, one per block
    coords: np.ndarray  # float32, sum(counts)

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
        if not 0 <= self.round_seed < 2**63:
            raise PacketError(f"round seed {self.round_seed} is outside [0, 2**63)")
        if len(self.fingerprint) != 16:
            raise PacketError("a layout fingerprint has 16 bytes")
        if int(counts.sum(dtype=np.int64)) != coords.size:
            raise PacketError(f"counts sum to {int(counts.sum())} but the packet holds {coords.size} coordinates")
        if np.any(counts == 0):
            raise PacketError("every block needs at least one coordinate")
        if not np.all(np.isfinite(coords)):
            raise PacketError("the packet holds NaN or infinite coordinates")

    @property
    def n_blocks(self) -> int:
        return self.counts.size

    def block_coords(self, b: int) -> np.ndarray:
        """The coordinates of block ``b`` (a read-only float32 view)."""
        start = int(self.counts[:b].sum(dtype=np.int64))
        return self.coords[start : start + int(self.counts[b])]

    def to_bytes(self) -> bytes:
        """The packet in its versioned binary encoding (see the module docstring)."""
        kind, size = parse_basis(self.basis)
        head = _HEADER.pack(MAGIC, VERSION, KINDS.index(kind), size.bit_length() - 1 if size else 0, self.round_seed,
                            self.group_size, self.fingerprint, self.n_blocks)
        body = head + self.counts.astype("<u4").tobytes() + self.coords.astype("<f4").tobytes()
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
        if version != VERSION:
            raise PacketError(f"packet version {version} is not supported (this ferret reads version {VERSION})")
        (crc,) = struct.unpack_from("<I", data, len(data) - 4)
        if zlib.crc32(data[:-4]) != crc:
            raise PacketError("packet checksum mismatch: the bytes were truncated or corrupted")
        if basis >= len(KINDS):
            raise PacketError(f"unknown basis code {basis}")
        if basis_arg and KINDS[basis] != "srht" or basis_arg > 30:
            raise PacketError(f"basis argument {basis_arg} does not fit basis {KINDS[basis]}")
        counts_end = _HEADER.size + 4 * n_blocks
        if counts_end > len(data) - 4:
            raise PacketError("packet truncated inside the block counts")
        counts = np.frombuffer(data, dtype="<u4", count=n_blocks, offset=_HEADER.size)
        n_coords = int(counts.sum(dtype=np.int64))
        if counts_end + 4 * n_coords != len(data) - 4:
            raise PacketError(f"packet length does not match its counts ({n_coords} coordinates)")
        coords = np.frombuffer(data, dtype="<f4", count=n_coords, offset=counts_end)
        name = KINDS[basis] if KINDS[basis] != "srht" else f"srht:{1 << basis_arg}"
        return cls(seed, name, group_size, fingerprint, counts, coords)

    @classmethod
    def split(cls, data: bytes) -> list["Packet"]:
        """Decode a concatenation of encoded packets (e.g. a broadcast of several), in order; raises
        as :meth:`from_bytes` does."""
        data, packets, at = _bytes_of(data), [], 0
        while at < len(data):
            if len(data) - at < _HEADER.size:
                raise PacketError(f"{len(data) - at} trailing bytes are too short for a packet")
            n_blocks = _HEADER.unpack_from(data, at)[-1]
            counts_end = at + _HEADER.size + 4 * n_blocks
            if counts_end > len(data):
                raise PacketError("packet truncated inside the block counts")
            n_coords = int(np.frombuffer(data, dtype="<u4", count=n_blocks, offset=at + _HEADER.size).sum(dtype=np.int64))
            end = counts_end + 4 * n_coords + 4
            packets.append(cls.from_bytes(data[at:end]))
            at = end
        return packets

    def __eq__(self, other) -> bool:
        return isinstance(other, Packet) and self.to_bytes() == other.to_bytes()

    def __repr__(self) -> str:
        return (
            f"Packet({self.basis}, seed={self.round_seed}, {self.n_blocks} blocks, "
            f"{self.coords.size} coordinates, {len(self.to_bytes())} bytes)"
        )


def _bytes_of(data) -> bytes:
    # bytes(n) of an int would allocate n zero bytes: only bytes-like objects are packets' input
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"packets decode from bytes, bytearray or memoryview, got {type(data).__name__}")
    return bytes(data)
