"""Where the loops run: the compiled CPU core for CPU tensors and NumPy arrays, the Triton
kernels for CUDA tensors. Both take 1-d contiguous buffers and block-relative offsets; neither
knows about layouts or packets."""

from __future__ import annotations

import numpy as np
import torch

from . import spec

BASIS_CODES = {"rademacher": 0, "gaussian": 1}


class CoreBackend:
    """The compiled C++ core (``ferret._core``)."""

    name = "core"

    def __init__(self):
        from . import _core

        self._core = _core

    def compress(self, flat, start: int, seed: int, basis: str, gamma: np.ndarray) -> None:
        self._core.compress(flat, start, seed, BASIS_CODES[basis], gamma)

    def reconstruct(self, flat, start: int, seed: int, basis: str, coords: np.ndarray, scale: np.float32) -> None:
        self._core.reconstruct(flat, start, seed, BASIS_CODES[basis], coords, float(scale))

    def perturb(self, flat, seed: int, basis: str, eps: float) -> None:
        self._core.perturb(flat, 0, seed, BASIS_CODES[basis], eps)

    def srht_compress(self, segments, block_n: int, seed: int, size: int, m: int) -> np.ndarray:
        coords = np.zeros(m, dtype=np.float32)
        self._core.srht_compress([x for x, _ in segments], [s for _, s in segments], block_n, seed,
                                 size.bit_length() - 1, coords)
        return coords

    def srht_reconstruct(self, segments, block_n: int, seed: int, size: int, coords: np.ndarray,
                         scale: np.float32) -> None:
        self._core.srht_reconstruct([x for x, _ in segments], [s for _, s in segments], block_n, seed,
                                    size.bit_length() - 1, np.ascontiguousarray(coords, dtype=np.float32), float(scale))

    def sum_squares(self, flat) -> float:
        return self._core.sum_squares(flat)


class TritonBackend:
    """The Triton kernels (``ferret.kernels``); CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""

    name = "triton"

    def __init__(self):
        try:
            from .kernels import projection, srht
        except ImportError as err:  # triton is the optional [gpu] extra
            raise RuntimeError("CUDA tensors need Triton: pip install 'ferret-fl[gpu]'") from err
        self._k, self._srht = projection, srht

    def compress(self, flat, start: int, seed: int, basis: str, gamma: np.ndarray) -> None:
        gamma += self._k.compress(flat, start, seed, BASIS_CODES[basis], gamma.size).cpu().numpy()

    def reconstruct(self, flat, start: int, seed: int, basis: str, coords: np.ndarray, scale: np.float32) -> None:
        g = torch.from_numpy(np.array(coords, dtype=np.float32)).to(flat.device)
        self._k.reconstruct_(flat, start, seed, BASIS_CODES[basis], g, float(scale))

    def perturb(self, flat, seed: int, basis: str, eps: float) -> None:
        self._k.perturb_(flat, 0, seed, BASIS_CODES[basis], eps)

    def srht_compress(self, segments, block_n: int, seed: int, size: int, m: int) -> np.ndarray:
        offsets, sizes, slots = _srht_table(block_n, seed, size, m, segments[0][0].device)
        return self._srht.compress(segments, seed, offsets, sizes, slots, size).cpu().numpy()

    def srht_reconstruct(self, segments, block_n: int, seed: int, size: int, coords: np.ndarray,
                         scale: np.float32) -> None:
        device = segments[0][0].device
        offsets, sizes, slots = _srht_table(block_n, seed, size, coords.size, device)
        factors = np.float32(scale) * (np.float32(1.0) / sizes.cpu().numpy().astype(np.float32))  # exact: powers of two
        g = torch.from_numpy(np.array(coords, dtype=np.float32)).to(device)
        self._srht.reconstruct_(segments, seed, offsets, sizes, slots, g, torch.from_numpy(factors).to(device), size)

    def sum_squares(self, flat, chunk: int = 1 << 24) -> float:
        # fp64 in chunks: no full-size fp64 copy of a large update.
        return float(sum(torch.sum(flat[i : i + chunk].double() ** 2) for i in range(0, flat.numel(), chunk)))


def _srht_table(block_n: int, seed: int, size: int, m: int, device):
    """The chunks of a block that hold one of its first m rows, and each row's slot in the kernels' tile."""
    from . import _core

    rows = np.zeros(m, dtype=np.int64)
    _core.srht_rows(seed, block_n, rows)
    offsets, sizes = spec.hadamard_chunks(block_n, size)
    owner = np.searchsorted(offsets, rows, side="right") - 1  # spec.chunk_of, on the offsets at hand
    touched, position = np.unique(owner, return_inverse=True)
    slots = position * size + rows - offsets[owner]
    return tuple(torch.from_numpy(a).to(device) for a in (offsets[touched], sizes[touched], slots))


_BACKENDS: dict[str, object] = {}


def backend_for(device: torch.device, choice: str | None):
    """The backend for tensors on ``device``; ``choice`` ("core" / "triton") overrides the default."""
    name = choice or ("triton" if device.type == "cuda" else "core")
    if name not in ("core", "triton"):
        raise ValueError(f"unknown backend {name!r}: use 'core' or 'triton'")
    if name == "core" and device.type != "cpu":
        raise ValueError(f"the CPU core cannot read tensors on {device}")
    if name not in _BACKENDS:
        _BACKENDS[name] = CoreBackend() if name == "core" else TritonBackend()
    return _BACKENDS[name]
