"""Merging 10 client LoRA adapters (ranks 64, 32, 16, 16, 8, 8, 4, 4, 4, 4) into one layer.

Layers: 2048x2048, and SmolLM2-135M's shapes 576x576 (attention), 1536x576 and 576x1536 (MLP).
Methods, timed in the same process:
  ferret            lora.merge_into(W, lora.stack(clients, weights)): stacking, checks, one addmm (Σr = 160)
  per_client_addmm  W.addmm_(p_i s_i B_i, A_i) for each client
  peft_cat          PEFT's add_weighted_adapter(combination_type="cat") + merge of that adapter
  one_addmm         W.addmm_(B, A) with B, A of the stacked size already built: the bound
Run: python -m pytest bench/test_lora.py -q --benchmark-json bench/results/cpu_lora.json

On a CUDA GPU, ``test_merge_gpu`` times the Triton merge of 8 clients (ranks 64, 32, 16, 16, 8, 8,
4, 4; Σr = 152) into a 4096x4096 fp32 or bf16 weight, each method's device time (median of
``triton.testing.do_bench``, L2 flushed) in ``extra_info``, beside one ``addmm`` of the same size
and the memory bound (W read and written once at the measured device-to-device copy bandwidth):
  ferret_triton     lora.merge_into(W, lora.stack(clients, weights)): stacking + kernel, end to end
  triton_kernel     kernels.merge_stacked_(W, Bt, A) with the stacked factors already built
  one_addmm         W.addmm_(B, A), B and A stacked in W's dtype: the issue's yardstick
  per_client_addmm  W.addmm_(B_i, A_i, alpha=p_i s_i) for each client
  peft_cat          PEFT's combination_type="cat" merge: torch.cat of the scaled factors, then
                    W += B @ A with the update materialized
Run: python -m pytest bench/test_lora.py -q -k gpu --benchmark-json bench/results/gpu_lora.json
"""

import itertools

import pytest
import torch

from ferret import lora
from ferret.lora import LoraAdapter, LoraTerm

RANKS = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]
COUNTS = [120, 80, 50, 50, 30, 30, 10, 10, 10, 5]
LAYERS = [(2048, 2048), (576, 576), (1536, 576), (576, 1536)]
METHODS = ["ferret", "per_client_addmm", "peft_cat", "one_addmm"]


def clients(out_f, in_f):
    g = torch.Generator().manual_seed(0)
    return [LoraAdapter({"layer": [LoraTerm(torch.randn(r, in_f, generator=g) / in_f**0.5,
                                            torch.randn(out_f, r, generator=g) / r**0.5, 2.0)]}) for r in RANKS]


def peft_layer(out_f, in_f, adapters):
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential()
    model.add_module("layer", torch.nn.Linear(in_f, out_f, bias=False))
    for i, (r, adapter) in enumerate(zip(RANKS, adapters)):
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["layer"])
        if i == 0:
            model = get_peft_model(model, config, adapter_name="c0")
        else:
            model.add_adapter(f"c{i}", config)
        layer = model.base_model.model.layer
        with torch.no_grad():
            layer.lora_A[f"c{i}"].weight.copy_(adapter.terms["layer"][0].A)
            layer.lora_B[f"c{i}"].weight.copy_(adapter.terms["layer"][0].B)
    return model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", LAYERS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_merge(benchmark, shape, method):
    out_f, in_f = shape
    adapters = clients(out_f, in_f)
    p = [c / sum(COUNTS) for c in COUNTS]
    weight = torch.randn(out_f, in_f)
    if method == "ferret":
        state = {"layer.weight": weight}
        benchmark.pedantic(lambda: lora.merge_into(state, lora.stack(adapters, COUNTS)), rounds=20, warmup_rounds=2)
    elif method == "per_client_addmm":
        def loop():
            for p_i, a in zip(p, adapters):
                t = a.terms["layer"][0]
                weight.addmm_(t.B, t.A, alpha=p_i * t.coef)
        benchmark.pedantic(loop, rounds=20, warmup_rounds=2)
    elif method == "one_addmm":
        A, B = lora.stack(adapters, COUNTS).stacked("layer")
        benchmark.pedantic(lambda: weight.addmm_(B, A), rounds=20, warmup_rounds=2)
    else:
        model = peft_layer(out_f, in_f, adapters)
        names = [f"c{i}" for i in range(len(RANKS))]

        def peft_cat():
            model.add_weighted_adapter(names, p, "agg", combination_type="cat")
            model.base_model.merge_adapter(["agg"])

        def drop_previous():
            if "agg" in model.peft_config:
                model.base_model.unmerge_adapter()
                model.delete_adapter("agg")

        benchmark.pedantic(peft_cat, setup=drop_previous, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(layer=f"{out_f}x{in_f}", method=method, seconds=benchmark.stats.stats.min,
                                threads=torch.get_num_threads(), total_rank=sum(RANKS))


GPU_RANKS = [64, 32, 16, 16, 8, 8, 4, 4]
GPU_COUNTS = [120, 80, 50, 50, 30, 30, 10, 10]
GPU_LAYER = (4096, 4096)
GPU_METHODS = ["ferret_triton", "triton_kernel", "one_addmm", "per_client_addmm", "peft_cat"]
ROTATE = 4  # W buffers cycled through, so that no call finds W in L2 (a bf16 4096x4096 fits)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="the Triton merge benchmarks time a CUDA GPU and none is present")


def device_seconds(fn) -> float:
    """The median device time of ``fn()`` in seconds (CUDA events, L2 flushed before each call)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3


@pytest.fixture(scope="module")
def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth of this GPU in bytes/s, counting bytes read and written."""
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * src.element_size() / device_seconds(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return bandwidth


def gpu_clients(dtype):
    out_f, in_f = GPU_LAYER
    g = torch.Generator(device="cuda").manual_seed(0)
    return [LoraAdapter({"layer": [LoraTerm((torch.randn(r, in_f, generator=g, device="cuda") / in_f**0.5).to(dtype),
                                            (torch.randn(out_f, r, generator=g, device="cuda") / r**0.5).to(dtype),
                                            2.0)]}) for r in GPU_RANKS]


def gpu_method(method, clients, dtype):
    """``method`` as a function of the weight it merges into."""
    from ferret.kernels import lora as kernels

    p = [c / sum(GPU_COUNTS) for c in GPU_COUNTS]
    terms = [(a.terms["layer"][0], p_i) for p_i, a in zip(p, clients)]
    if method == "ferret_triton":
        return lambda w: lora.merge_into({"layer.weight": w}, lora.stack(clients, GPU_COUNTS), backend="triton")
    if method == "triton_kernel":
        probe = torch.empty(0, dtype=dtype, device="cuda")
        Bt, A = kernels.stack_rank_major([(t.A, t.B, p_i * t.coef) for t, p_i in terms],
                                         kernels.factor_dtype(probe, dtype))
        return lambda w: kernels.merge_stacked_(w, Bt, A)
    if method == "one_addmm":
        Bt, A = kernels.stack_rank_major([(t.A, t.B, p_i * t.coef) for t, p_i in terms], dtype)
        B = Bt.T.contiguous()
        return lambda w: w.addmm_(B, A)
    if method == "per_client_addmm":
        def loop(w):
            for t, p_i in terms:
                w.addmm_(t.B, t.A, alpha=p_i * t.coef)
        return loop

    def peft_cat(w):
        A = torch.cat([t.A * (p_i * t.coef) for t, p_i in terms])
        B = torch.cat([t.B for t, _ in terms], dim=1)
        w += B @ A
    return peft_cat


@needs_cuda
@pytest.mark.parametrize("method", GPU_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_gpu(benchmark, copy_bandwidth, dtype, method):
    clients = gpu_clients(dtype)
    weights = [torch.randn(*GPU_LAYER, device="cuda").to(dtype) for _ in range(ROTATE)]
    merge = gpu_method(method, clients, dtype)
    addmm = gpu_method("one_addmm", clients, dtype)
    merge(weights[0])  # compiles the kernel, outside every measurement
    extra_bytes, peak_bytes = peak_bytes_of(lambda: merge(weights[0]))
    cycle = itertools.cycle(weights)

    def timed():
        merge(next(cycle))
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=50, warmup_rounds=5)
    seconds = device_seconds(lambda: merge(next(cycle)))
    addmm_seconds = device_seconds(lambda: addmm(next(cycle)))
    bound = 2 * weights[0].numel() * weights[0].element_size() / copy_bandwidth
    benchmark.extra_info.update(
        layer="x".join(map(str, GPU_LAYER)), dtype=str(dtype).removeprefix("torch."), method=method,
        total_rank=sum(GPU_RANKS), device=torch.cuda.get_device_name(), seconds=seconds,
        wall_seconds=benchmark.stats.stats.min, one_addmm_seconds=addmm_seconds,
        ratio_to_one_addmm=seconds / addmm_seconds, memory_bound_seconds=bound, ratio_to_memory_bound=seconds / bound,
        copy_bandwidth=copy_bandwidth, peak_memory_bytes=peak_bytes, extra_memory_bytes=extra_bytes,
        allow_tf32=torch.backends.cuda.matmul.allow_tf32)


def peak_bytes_of(fn) -> tuple[int, int]:
    """GPU memory at the peak of one ``fn()``: (bytes beyond what was allocated before, in all)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak - before, peak
