"""Grouped launches: one launch works the tiles of many buffers.

A kernel that walks many 1-d buffers at once (the tensors of a model) takes a *segment table*:
row ``s`` holds what the kernel reads for segment ``s`` (its buffer's address, length, block
index of its first element, seed, ...) as int64 columns, and the running count of the programs
before each segment. Program ``p`` finds its segment by a binary search of those counts
(:func:`segment_of`), so the number of launches does not depend on the number of segments,
as in Triton's grouped GEMM tutorial. Segments whose buffers differ in dtype go to separate
launches (one per dtype). Tables reach the device from pinned memory without waiting for it.
"""

import numpy as np
import torch
import triton
import triton.language as tl

SEARCH_STEPS = tl.constexpr(20)  # a launch takes at most 2**20 segments
MAX_SEGMENTS = 1 << 20


def to_device(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """``host`` on ``device`` without a host synchronisation: on CUDA copied from pinned memory,
    queued behind the kernels already launched (a copy from pageable memory would first wait for
    them); elsewhere the array's own memory."""
    x = torch.from_numpy(np.ascontiguousarray(host))
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def fp32_bits(values) -> np.ndarray:
    """fp32 values as their bit patterns in int64 (a table column, which a kernel reads back with
    ``.to(tl.int32).to(tl.float32, bitcast=True)``)."""
    return np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.int64)


class Table:
    """A launch's segment table on the host: ``add(programs, *columns)`` a segment at a time,
    then :meth:`to` ships it. ``columns`` are ints (a buffer's address, counts, seeds, fp32
    bits)."""

    def __init__(self, width: int):
        self.width, self.rows, self.programs = width, [], [0]

    def add(self, programs: int, *columns) -> None:
        """Append a segment worked by ``programs`` programs (> 0) with its ``columns``."""
        if programs < 1:
            raise ValueError(f"a segment takes at least one program, got {programs}")
        if len(columns) != self.width:
            raise ValueError(f"a segment has {self.width} columns, got {len(columns)}")
        self.rows.append(columns)
        self.programs.append(self.programs[-1] + programs)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def grid(self) -> int:
        """Programs in all."""
        return self.programs[-1]

    def to(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(program counts before each segment (S + 1), rows (S x width)) as int64 on ``device``,
        in one transfer."""
        if len(self.rows) > MAX_SEGMENTS:
            raise ValueError(f"a launch takes at most {MAX_SEGMENTS} segments, got {len(self.rows)}")
        host = np.concatenate([np.asarray(self.programs, dtype=np.int64),
                               np.asarray(self.rows, dtype=np.int64).reshape(-1)])
        sent = to_device(host, device)
        return sent[: len(self.programs)], sent[len(self.programs):]


@triton.jit
def segment_of(programs_ptr, count, p):
    """The segment whose programs include program ``p``, and ``p``'s index among them:
    ``programs[s] <= p < programs[s + 1]``, ``count`` segments."""
    lo = tl.zeros((), tl.int64)  # programs[lo] <= p < programs[hi]
    hi = tl.zeros((), tl.int64) + count
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2  # lo itself once hi = lo + 1: then nothing moves
        after = tl.load(programs_ptr + mid) <= p
        lo = tl.where(after, mid, lo)
        hi = tl.where(after, hi, mid)
    return lo, p - tl.load(programs_ptr + lo)


TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
             torch.float64: tl.float64}

