"""Seeded projection on the CPU core: compress and reconstruct for d in 1e6..1e8, K in 64..1024.

Each figure is reported beside
  (a) the official-style reference measured in the same run: torch.manual_seed + trunc_normal_
      per seed, then a dot product (what the official Ferret code does), timed per seed at
      d = 1e6 and scaled to d x K;
  (b) this machine's bounds: the FMA bound (2·d·K flops at the measured fp32 peak) and the
      memory bound (reading Δ once).
Run: python -m pytest bench -q --benchmark-json bench/results/cpu_projection.json
"""

import numpy as np
import pytest
import torch

from ferret import _core

FMA_PEAK_FLOPS = 190e9  # fp32 FMA peak of the 2-core development machine (design notes §5)
MEMORY_BYTES_PER_S = 30e9  # its read bandwidth on 2 cores
REFERENCE_D = 1_000_000
DS = [1_000_000, 10_000_000, 100_000_000]
KS = [64, 200, 1024]

_reference_seconds_per_seed = {}


def official_style_seconds_per_seed() -> float:
    """One seed of the official code's projection at d = 1e6, best of 5."""
    if "s" not in _reference_seconds_per_seed:
        import time

        delta = torch.randn(REFERENCE_D)
        bound = REFERENCE_D**-0.5
        best = float("inf")
        for seed in range(5):
            t = time.perf_counter()
            torch.manual_seed(seed)
            base = torch.nn.init.trunc_normal_(torch.empty(REFERENCE_D), mean=0.0, std=1.0, a=-bound, b=bound)
            float(torch.sum(delta * base))
            best = min(best, time.perf_counter() - t)
        _reference_seconds_per_seed["s"] = best
    return _reference_seconds_per_seed["s"]


@pytest.fixture(scope="module", params=DS, ids=lambda d: f"d{d:.0e}".replace("+0", ""))
def delta(request):
    return np.random.default_rng(0).standard_normal(request.param, dtype=np.float32)


def _report(benchmark, d, k):
    seconds = benchmark.stats.stats.min
    reference = official_style_seconds_per_seed() * d / REFERENCE_D * k
    benchmark.extra_info.update(
        d=d, K=k, seconds=seconds, threads=_core.num_threads(), simd=_core.simd_level(),
        official_style_seconds=reference, speedup_vs_official_style=reference / seconds,
        fma_bound_seconds=2 * d * k / FMA_PEAK_FLOPS, memory_bound_seconds=4 * d / MEMORY_BYTES_PER_S,
    )
    benchmark.extra_info["x_fma_bound"] = seconds / benchmark.extra_info["fma_bound_seconds"]


@pytest.mark.parametrize("k", KS, ids=lambda k: f"K{k}")
def test_compress(benchmark, delta, k):
    gamma = np.zeros(k)
    benchmark.pedantic(lambda: _core.compress(delta, 0, 12345, 0, gamma), rounds=3, iterations=1, warmup_rounds=0)
    _report(benchmark, delta.size, k)


@pytest.mark.parametrize("k", KS, ids=lambda k: f"K{k}")
def test_reconstruct(benchmark, delta, k):
    out = np.zeros_like(delta)
    gamma = np.random.default_rng(1).standard_normal(k).astype(np.float32)
    benchmark.pedantic(lambda: _core.reconstruct(out, 0, 12345, 0, gamma, 1.0 / k), rounds=3, iterations=1,
                       warmup_rounds=0)
    _report(benchmark, delta.size, k)


MEMORY_PROBE = """
import numpy as np
from ferret import _core

def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

d, k = 100_000_000, 200
delta = np.full(d, 0.5, dtype=np.float32)
out = np.ones(d, dtype=np.float32)
gamma = np.zeros(k)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current resident size
before = peak_kib()
_core.compress(delta, 0, 1, 0, gamma)
_core.reconstruct(out, 0, 1, 0, gamma.astype(np.float32), 0.005)
print((peak_kib() - before) / 1024)
"""


def test_memory_beyond_input_and_output(benchmark):
    """Peak resident memory that compress + reconstruct add at d = 1e8, K = 200, in a fresh process
    (input and output allocated and touched first, so only the core's own memory counts)."""
    import subprocess
    import sys

    result = benchmark.pedantic(
        lambda: subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, check=True),
        rounds=1, iterations=1)
    benchmark.extra_info.update(d=100_000_000, K=200, extra_peak_rss_mib=float(result.stdout.strip()))
