"""The dense Hadamard basis on the CPU core, through the public API, beside the memory bound and
Rademacher bases, all measured in this process:

* one block of d = 1e8 fp32 elements, K from 64 to 65,536 (Rademacher at K = 64 and 200 only:
  its cost grows with K, about 0.14 s per 64 bases here);
* SmolLM2-135M's 272 tensors (random weights, per-tensor blocks, norm allocation), K = 3,800.

The references are torch's own passes over the same tensors: ``read`` sums Δ (one read, what
compress cannot beat) and ``read+write`` adds a scalar to ``out`` in place (one read and one
write, what reconstruct cannot beat). Targets (issue 15): compress ≤ 2× read, reconstruct ≤ 2×
read+write at every K, and ≥ 15× faster than Rademacher at K = 200.

Run alone (it uses both cores): python -m pytest bench/test_hadamard.py -q
    --benchmark-json bench/results/cpu_hadamard.json && python bench/summarize.py bench/results/cpu_hadamard.json
"""

import pytest
import torch
from shapes import SMOLLM2_135M, llama_shapes

import ferret

D = 100_000_000
KS = [64, 200, 1024, 4096, 16384, 65536]
RADEMACHER_KS = [64, 200]
SMOLLM2_BUDGET = 3800
SEED = 12345

@pytest.fixture(scope="module")
def block():
    gen = torch.Generator().manual_seed(0)
    return {"delta": torch.randn(D, generator=gen) * 1e-3}


@pytest.fixture(scope="module")
def smollm2():
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=gen) * 1e-3 for name, shape in llama_shapes(*SMOLLM2_135M).items()}


def _record(benchmark, layout, update, op, basis, k):
    seconds = benchmark.stats.stats.median
    d = sum(t.numel() for t in update.values())
    benchmark.extra_info.update(layout=layout, d=d, op=op, basis=basis, K=k, seconds=seconds,
                                threads=torch.get_num_threads(), simd=ferret._core.simd_level(),
                                ns_per_element=seconds / d * 1e9)


# bench/summarize.py sets every row beside the references measured here.
@pytest.mark.parametrize("layout", ["block", "smollm2"])
@pytest.mark.parametrize("op", ["read", "read+write"])
def test_memory_bound(benchmark, request, layout, op):
    update = request.getfixturevalue(layout)
    if op == "read":
        fn = lambda: [t.sum() for t in update.values()]  # noqa: E731
    else:
        fn = lambda: [t.add_(0.0) for t in update.values()]  # noqa: E731
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    _record(benchmark, layout, update, op, "torch", 0)


def _ops(update, basis, k):
    packet = ferret.compress(update, seed=SEED, budget=k, basis=basis)
    return {"compress": lambda: ferret.compress(update, seed=SEED, budget=k, basis=basis),
            "reconstruct": lambda: ferret.reconstruct(packet, into=update, scale=1e-9)}


@pytest.mark.parametrize("op", ["compress", "reconstruct"])
@pytest.mark.parametrize("k", RADEMACHER_KS, ids=lambda k: f"K{k}")
def test_rademacher_one_block(benchmark, block, op, k):
    benchmark.pedantic(_ops(block, "rademacher", k)[op], rounds=1, iterations=1)
    _record(benchmark, "block", block, op, "rademacher", k)


@pytest.mark.parametrize("op", ["compress", "reconstruct"])
@pytest.mark.parametrize("k", KS, ids=lambda k: f"K{k}")
def test_hadamard_one_block(benchmark, block, op, k):
    benchmark.pedantic(_ops(block, "hadamard", k)[op], rounds=5, iterations=1, warmup_rounds=1)
    _record(benchmark, "block", block, op, "hadamard", k)


@pytest.mark.parametrize("basis", ["rademacher", "hadamard"])
@pytest.mark.parametrize("op", ["compress", "reconstruct"])
def test_smollm2_layout(benchmark, smollm2, op, basis):
    rounds = 1 if basis == "rademacher" else 5
    benchmark.pedantic(_ops(smollm2, basis, SMOLLM2_BUDGET)[op], rounds=rounds, iterations=1,
                       warmup_rounds=0 if basis == "rademacher" else 1)
    _record(benchmark, "smollm2", smollm2, op, basis, SMOLLM2_BUDGET)
