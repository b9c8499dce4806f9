"""The projection kernels on a GPU: compress, reconstruct and perturb at d = 1e9, the per-tensor
layout of a 1B Llama with a 3,800-coordinate budget, SRHT and dense Hadamard (K = 200 and
65,536), and one Ferret round on models of
SmolLM2-135M's and a 1B Llama's shapes (random weights: no model travels to the GPU machine).

Each figure is the median device time (``triton.testing.do_bench``, CUDA events) beside
  (a) the memory bound: the bytes the op must move (Δ read once; reconstruct reads and writes
      the weights) at the device-to-device copy bandwidth measured in the same run;
  (b) for Rademacher bases, the issue bound: 3 instructions per element and basis (sign shift,
      sign xor, add: the fewest the spec's arithmetic allows) on every SM's 4 schedulers at the
      card's maximum clock;
  (c) the peak GPU memory the op adds beyond its inputs and outputs.
Run on a GPU machine: python -m pytest bench/test_gpu.py -q --benchmark-json OUT/gpu_projection.json
(``bench/gpu/run.sh`` does that and more). ``FERRET_GPU_PROFILE=dry`` runs the same code at tiny
sizes on the CPU (Triton's interpreter), so the script is exercised where there is no GPU.
"""

import os
import subprocess
import time

import pytest
import torch

import ferret
from shapes import LLAMA_1B, llama_shapes

DRY = os.environ.get("FERRET_GPU_PROFILE") == "dry"
if not DRY and not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (FERRET_GPU_PROFILE=dry runs tiny sizes on the CPU)", allow_module_level=True)

DEVICE = "cpu" if DRY else "cuda"
BACKEND = "triton" if DRY else None  # dry: the Triton kernels in the interpreter, not the CPU core
REPS = 1 if DRY else 5
BIG_D = 1 << 16 if DRY else 1_000_000_000
BIG_K = 4 if DRY else 200
BUDGET = 64 if DRY else 3800
TARGETS = {"compress": 0.020, "reconstruct": 0.025}  # seconds at d = 1e9, K = 200 on one H100 (the issue)


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def device_seconds(fn, reps: int = REPS) -> float:
    """Median seconds of ``fn`` on the device (CUDA events after a warm-up; wall clock when dry)."""
    fn()
    if DEVICE == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=1, rep=max(50, reps * 10), return_mode="median") / 1e3
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def extra_peak_bytes(fn) -> int:
    """GPU memory the peak of one ``fn()`` adds beyond what was allocated before (0 when dry)."""
    if DEVICE != "cuda":
        fn()
        return 0
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@pytest.fixture(scope="module")
def machine():
    """Copy bandwidth (bytes/s, read + write) and the issue rate (instructions/s over all SMs)."""
    if DEVICE != "cuda":
        return {"name": "cpu (dry run)", "copy_bandwidth": 1e10, "issue_rate": 1e10}
    a = torch.empty(1 << 28, device="cuda").normal_()
    b = torch.empty_like(a)
    copy = device_seconds(lambda: b.copy_(a))
    props = torch.cuda.get_device_properties(0)
    clock_mhz = float(subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True).stdout.split()[0])
    del a, b
    return {"name": props.name, "copy_bandwidth": 2 * (1 << 28) * 4 / copy, "sms": props.multi_processor_count,
            "max_clock_mhz": clock_mhz, "issue_rate": props.multi_processor_count * 4 * 32 * clock_mhz * 1e6}


def record(benchmark, machine, op, seconds, *, d, k, moved_bytes, extra_bytes, basis="rademacher", **info):
    issue_bound = 3 * d * k / machine["issue_rate"] if basis == "rademacher" and k else None
    memory_bound = moved_bytes / machine["copy_bandwidth"]
    benchmark.extra_info.update(
        op=op, basis=basis, d=d, K=k, device=machine["name"], seconds=seconds, memory_bound_seconds=memory_bound,
        x_memory_bound=seconds / memory_bound, issue_bound_seconds=issue_bound,
        x_issue_bound=seconds / issue_bound if issue_bound else None, extra_peak_bytes=extra_bytes, **info)


def launches_and_syncs(fn) -> dict:
    """Device operations (kernels, copies, fills) and host synchronisations of one ``fn()``: on
    CUDA the profiler's device events and torch's sync debug mode; dry, the interpreter's Triton
    launches (syncs not counted). A failure to count is recorded, not raised."""
    try:
        if DEVICE != "cuda":
            from triton.runtime.interpreter import InterpretedFunction

            run, launches = InterpretedFunction.run, []
            InterpretedFunction.run = lambda kernel, *a, **k: launches.append(kernel) or run(kernel, *a, **k)
            try:
                fn()
            finally:
                InterpretedFunction.run = run
            return {"launches": len(launches), "host_syncs": None}
        import warnings

        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught, profile(activities=[ProfilerActivity.CUDA]) as prof:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
        device_ops = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
        syncs = sum(1 for w in caught if "synchroniz" in str(w.message))
        return {"launches": device_ops, "host_syncs": syncs}
    except Exception as err:  # a count that fails is a finding, not a lost benchmark
        return {"launches": None, "host_syncs": None, "count_error": repr(err)}


def timed(benchmark, fn):
    """pytest-benchmark's own wall-clock rounds (device synchronised), beside the device timing."""
    def call():
        fn()
        synchronize()

    benchmark.pedantic(call, rounds=REPS, warmup_rounds=0 if DRY else 1)


@pytest.fixture(scope="module")
def big():
    return torch.empty(BIG_D, device=DEVICE).normal_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compress_one_block(benchmark, machine, big, dtype):
    from ferret.kernels import projection as P

    x = big.to(dtype)
    seconds = device_seconds(lambda: P.compress(x, 0, 12345, P.RADEMACHER, BIG_K))
    extra = extra_peak_bytes(lambda: P.compress(x, 0, 12345, P.RADEMACHER, BIG_K))
    timed(benchmark, lambda: P.compress(x, 0, 12345, P.RADEMACHER, BIG_K))
    record(benchmark, machine, "compress", seconds, d=BIG_D, k=BIG_K, moved_bytes=x.numel() * x.element_size(),
           extra_bytes=extra, dtype=str(dtype)[6:], target_seconds=None if DRY else TARGETS["compress"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reconstruct_one_block(benchmark, machine, big, dtype):
    from ferret.kernels import projection as P

    out = big.to(dtype)
    gamma = torch.randn(BIG_K, device=DEVICE)
    seconds = device_seconds(lambda: P.reconstruct_(out, 0, 12345, P.RADEMACHER, gamma, 1e-3))
    extra = extra_peak_bytes(lambda: P.reconstruct_(out, 0, 12345, P.RADEMACHER, gamma, 1e-3))
    timed(benchmark, lambda: P.reconstruct_(out, 0, 12345, P.RADEMACHER, gamma, 1e-3))
    record(benchmark, machine, "reconstruct", seconds, d=BIG_D, k=BIG_K,
           moved_bytes=2 * out.numel() * out.element_size(), extra_bytes=extra, dtype=str(dtype)[6:],
           target_seconds=None if DRY else TARGETS["reconstruct"])


def test_perturb_one_block(benchmark, machine, big):
    seconds = device_seconds(lambda: ferret.perturb(big, 7, 1e-3, backend=BACKEND))
    timed(benchmark, lambda: ferret.perturb(big, 7, 1e-3, backend=BACKEND))
    record(benchmark, machine, "perturb", seconds, d=BIG_D, k=1, moved_bytes=8 * big.numel(), extra_bytes=0,
           dtype="fp32")


@pytest.mark.parametrize("basis,k", [("srht", BIG_K), ("hadamard", BIG_K), ("hadamard", 65536)],
                         ids=["srht", "hadamard-K200", "hadamard-K65536"])
def test_hadamard_kinds_one_block(benchmark, machine, big, basis, k):
    update = {"w": big}
    fn = lambda: ferret.compress(update, seed=3, budget=k, basis=basis, backend=BACKEND)  # noqa: E731
    seconds = device_seconds(fn)
    packet = fn()
    extra = extra_peak_bytes(fn)
    timed(benchmark, fn)
    rebuilt = device_seconds(lambda: ferret.reconstruct(packet, into=update, scale=1e-9, backend=BACKEND))
    record(benchmark, machine, "compress", seconds, d=BIG_D, k=k, basis=basis, moved_bytes=4 * BIG_D,
           extra_bytes=extra, dtype="fp32", reconstruct_seconds=rebuilt,
           reconstruct_x_memory_bound=rebuilt / (8 * BIG_D / machine["copy_bandwidth"]))


LAYOUTS = {"llama1b": (64, 128, 2, 1000, 32) if DRY else LLAMA_1B}


@pytest.mark.parametrize("basis", ["rademacher", "srht", "hadamard"])
@pytest.mark.parametrize("op", ["compress", "reconstruct"])
def test_llama1b_layout(benchmark, machine, op, basis):
    """The 1B layout's tensors beside one block of the same total size and budget (what grouped
    launches should reach), with the device operations and host waits of one call."""
    shapes = llama_shapes(*LAYOUTS["llama1b"])
    update = {n: torch.empty(s, device=DEVICE).normal_(std=1e-3) for n, s in shapes.items()}
    d = sum(t.numel() for t in update.values())
    one_block = {"w": torch.cat([t.reshape(-1) for t in update.values()])}

    def call(tensors):
        packet = ferret.compress(tensors, seed=5, budget=BUDGET, basis=basis, backend=BACKEND)
        if op == "compress":
            return lambda: ferret.compress(tensors, seed=5, budget=BUDGET, basis=basis, backend=BACKEND), packet
        return lambda: ferret.reconstruct(packet, into=tensors, scale=1e-6, backend=BACKEND), packet

    fn, packet = call(update)
    seconds = device_seconds(fn)
    extra = extra_peak_bytes(fn)
    counts = launches_and_syncs(fn)
    timed(benchmark, fn)
    single, _ = call(one_block)
    one_block_seconds = device_seconds(single)
    del one_block
    k_elements = sum(int(c) * n for c, n in zip(packet.counts, ferret.Layout.of(update).block_sizes))
    record(benchmark, machine, op, seconds, d=d, k=k_elements / d, basis=basis, layout="llama1b", tensors=len(shapes),
           budget=BUDGET, moved_bytes=(4 if op == "compress" else 8) * d, extra_bytes=extra, dtype="fp32",
           one_block_seconds=one_block_seconds, x_one_block=seconds / one_block_seconds, **counts)
