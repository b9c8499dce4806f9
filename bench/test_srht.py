"""The SRHT basis against Rademacher bases on the CPU core: compress and reconstruct of one
block of d = 1e8 fp32 elements for K in 64..4096, plus a budget large enough that every
Hadamard chunk holds a row (the transform's full O(d log B) cost).

Each figure is reported beside the Rademacher time at the same K (measured in the same run:
the reference) and the memory bound (reading Δ once at 30 GB/s on 2 cores).
Run: python -m pytest bench/test_srht.py -q --benchmark-json bench/results/cpu_srht.json
"""

import numpy as np
import pytest

from ferret import _core

MEMORY_BYTES_PER_S = 30e9  # read bandwidth of the 2-core development machine (design notes §5)
D = 100_000_000
KS = [64, 256, 1024, 4096]
DENSE_K = 200_000  # all but about 0.03 % of the chunks of 4096 hold a row
LOG2_SIZE = 12
SEED = 12345

_rademacher_seconds: dict[tuple[str, int], float] = {}


@pytest.fixture(scope="module")
def delta():
    return np.random.default_rng(0).standard_normal(D, dtype=np.float32)


def _ops(delta, basis, k):
    gamma = np.zeros(k)
    coords = np.random.default_rng(1).standard_normal(k).astype(np.float32)
    out = np.zeros_like(delta)
    if basis == "rademacher":
        return {"compress": lambda: _core.compress(delta, 0, SEED, 0, gamma),
                "reconstruct": lambda: _core.reconstruct(out, 0, SEED, 0, coords, 1.0 / k)}
    return {"compress": lambda: _core.srht_compress([delta], [0], D, SEED, LOG2_SIZE, coords),
            "reconstruct": lambda: _core.srht_reconstruct([out], [0], D, SEED, LOG2_SIZE, coords, D / k)}


def _report(benchmark, op, basis, k):
    seconds = benchmark.stats.stats.min
    memory_bound = 4 * D / MEMORY_BYTES_PER_S
    benchmark.extra_info.update(op=op, basis=basis, d=D, K=k, hadamard=1 << LOG2_SIZE, seconds=seconds,
                                threads=_core.num_threads(), simd=_core.simd_level(),
                                memory_bound_seconds=memory_bound, x_memory_bound=seconds / memory_bound,
                                ns_per_element=seconds / D * 1e9)
    if basis == "rademacher":
        _rademacher_seconds[(op, k)] = seconds
    elif (op, k) in _rademacher_seconds:
        benchmark.extra_info["speedup_vs_rademacher"] = _rademacher_seconds[(op, k)] / seconds


# Rademacher first (the reference), so each SRHT row can report its ratio.
@pytest.mark.parametrize("basis", ["rademacher", "srht"])
@pytest.mark.parametrize("k", KS, ids=lambda k: f"K{k}")
@pytest.mark.parametrize("op", ["compress", "reconstruct"])
def test_projection(benchmark, delta, op, k, basis):
    rounds = 2 if basis == "rademacher" else 5
    warmup = 1 if basis == "srht" else 0
    benchmark.pedantic(_ops(delta, basis, k)[op], rounds=rounds, iterations=1, warmup_rounds=warmup)
    _report(benchmark, op, basis, k)


@pytest.mark.parametrize("op", ["compress", "reconstruct"])
def test_srht_every_chunk(benchmark, delta, op):
    benchmark.pedantic(_ops(delta, "srht", DENSE_K)[op], rounds=3, iterations=1, warmup_rounds=1)
    _report(benchmark, op, "srht", DENSE_K)
