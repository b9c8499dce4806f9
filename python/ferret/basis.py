"""Basis names as users write them and packets carry them.

* ``"rademacher"`` (the paper's), ``"gaussian"``: K seeded ±1 or normal vectors per block.
* ``"hadamard"``: the dense randomized Hadamard basis (:mod:`ferret.spec`), at the cost of one
  read of the update for any K. Its Hadamard size is chosen at compress time (the smallest power
  of two at or above 1024 and the budget times the number of row slots) and packets carry it:
  ``"hadamard:65536"``. Naming the size (a power of two from 2 to ``2**22``) fixes it.
* ``"srht"``: the chunk-sparse subsampled randomized Hadamard transform with chunks of 4096
  elements (``"srht:1024"`` picks another chunk size, a power of two from 2 to 32768). It reads
  only the chunks holding a row, so it is the cheapest, but a round moves only those chunks.

Which to choose, with measured figures: ``docs/bases.md``.
"""

from __future__ import annotations

from .spec import MAX_DENSE_SIZE, pow2

KINDS = ("rademacher", "gaussian", "srht", "hadamard")
DEFAULT_HADAMARD_SIZE = 4096  # srht's chunk size
MAX_HADAMARD_SIZE = 1 << 15  # srht's largest chunk
MIN_DENSE_SIZE = 1024  # the smallest size "hadamard" picks by itself


def parse_basis(name) -> tuple[str, int]:
    """Split a basis name into ``(kind, hadamard_size)``; the size is 0 for Rademacher and Gaussian
    bases and for a ``"hadamard"`` whose size is still to be chosen (:func:`dense_size`).

    Raises ``TypeError`` for a non-string and ``ValueError`` with the accepted forms for anything else.
    """
    if not isinstance(name, str):
        raise TypeError(f"a basis is named by a string, got {type(name).__name__}")
    kind, colon, size = name.partition(":")
    if kind not in KINDS or (colon and kind not in ("srht", "hadamard")):
        raise ValueError(f"unknown basis {name!r}: use 'rademacher', 'gaussian', 'hadamard', 'hadamard:<size>', "
                         f"'srht' or 'srht:<size>'")
    if kind in ("rademacher", "gaussian"):
        return kind, 0
    if not colon:
        return kind, DEFAULT_HADAMARD_SIZE if kind == "srht" else 0
    largest = MAX_HADAMARD_SIZE if kind == "srht" else MAX_DENSE_SIZE
    if not size.isdigit() or not _power_of_two(int(size)) or not 2 <= int(size) <= largest:
        raise ValueError(f"bad Hadamard size in {name!r}: use a power of two from 2 to {largest}, "
                         f"e.g. '{kind}:{DEFAULT_HADAMARD_SIZE}'")
    return kind, int(size)


def basis_name(kind: str, hadamard_size: int = 0) -> str:
    """The canonical name of a basis: ``"srht"`` for the default chunk size, ``"hadamard"`` for a
    size still to be chosen, else ``"<kind>:<size>"`` for the Hadamard kinds."""
    if kind in ("rademacher", "gaussian") or not hadamard_size:
        return kind
    if kind == "srht" and hadamard_size == DEFAULT_HADAMARD_SIZE:
        return kind
    return f"{kind}:{hadamard_size}"


def dense_size(budget: int, slots: int = 1) -> int:
    """The Hadamard size ``"hadamard"`` picks for a budget of ``budget`` coordinates shared by
    ``slots`` row slots: every block can take the whole budget in every slot. Raises
    ``ValueError`` when that is above ``2**22``."""
    size = max(MIN_DENSE_SIZE, pow2(budget * slots))
    if size > MAX_DENSE_SIZE:
        raise ValueError(f"a budget of {budget} coordinates in each of {slots} row slots needs a Hadamard size "
                         f"of {size}, above the largest ({MAX_DENSE_SIZE}): lower the budget or use 'rademacher'")
    return size


def _power_of_two(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0
