"""Basis names as users write them and packets carry them.

``"rademacher"`` (the default), ``"gaussian"``, and ``"srht"``, the subsampled randomized
Hadamard transform with Hadamard chunks of 4096 elements; ``"srht:1024"`` picks another chunk
size (a power of two from 2 to 32768). Which to choose: ``docs/bases.md``.
"""

from __future__ import annotations

KINDS = ("rademacher", "gaussian", "srht")
DEFAULT_HADAMARD_SIZE = 4096
MAX_HADAMARD_SIZE = 1 << 15


def parse_basis(name) -> tuple[str, int]:
    """Split a basis name into ``(kind, hadamard_size)``; the size is 0 for the non-SRHT bases.

    Raises ``ValueError`` with the accepted forms for anything else.
    """
    if not isinstance(name, str):
        raise TypeError(f"a basis is named by a string, got {type(name).__name__}")
    kind, _, size = name.partition(":")
    if kind not in KINDS or (size and kind != "srht"):
        raise ValueError(f"unknown basis {name!r}: use 'rademacher', 'gaussian', 'srht' or 'srht:<size>'")
    if kind != "srht":
        return kind, 0
    if not size:
        return kind, DEFAULT_HADAMARD_SIZE
    if not size.isdigit() or not _power_of_two(int(size)) or not 2 <= int(size) <= MAX_HADAMARD_SIZE:
        raise ValueError(
            f"bad SRHT Hadamard size in {name!r}: use a power of two from 2 to {MAX_HADAMARD_SIZE}, "
            f"e.g. 'srht:{DEFAULT_HADAMARD_SIZE}'"
        )
    return kind, int(size)


def basis_name(kind: str, hadamard_size: int = 0) -> str:
    """The canonical name of a basis: ``"srht"`` for the default Hadamard size, else ``"srht:<size>"``."""
    if kind != "srht" or hadamard_size == DEFAULT_HADAMARD_SIZE:
        return kind
    return f"srht:{hadamard_size}"


def _power_of_two(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0
