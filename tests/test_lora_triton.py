"""The LoRA Triton kernels (Triton's interpreter on CPU tensors, or for real on a GPU) against
the CPU path: the stack merge over heterogeneous ranks and the fused unmerged forward."""

import pytest
import torch

triton = pytest.importorskip("triton", reason="the [gpu] extra (triton) is not installed")

from ferret import lora  # noqa: E402
from ferret.lora import LoraAdapter, LoraTerm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def client(rank, shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return {name: LoraTerm(torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g), 16.0 / rank)
            for name, (o, i) in shapes.items()}



@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_merge_equals_cpu_path(dtype, fan_in_fan_out):
    out_f, in_f = 48, 40
    adapters = []
    for seed, rank in enumerate([64, 32, 16, 16, 8, 8, 4]):  # several rank blocks, ranks below 16
        t = client(rank, {"layer.a": (out_f, in_f)}, seed)["layer.a"]
        adapters.append(LoraAdapter({"layer.a": [LoraTerm(t.A.to(DEVICE, dtype), t.B.to(DEVICE, dtype), t.coef)]},
                                    fan_in_fan_out=fan_in_fan_out))
    stacked = lora.stack(adapters, weights=[7, 6, 5, 4, 3, 2, 1])
    w0 = torch.randn(*((in_f, out_f) if fan_in_fan_out else (out_f, in_f))).to(DEVICE, dtype)
    w_cpu, w_triton = {"layer.a.weight": w0.clone()}, {"layer.a.weight": w0.clone()}
    lora.merge_into(w_cpu, stacked, backend="torch")
    lora.merge_into(w_triton, stacked, backend="triton")
    # fp32: summation order differs; bf16: the final rounding (the interpreter truncates, a GPU rounds),
    # and on a GPU a second where the coefficients are folded into the bf16 factors
    tol = dict(rtol=1e-5, atol=1e-3) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-1)
    torch.testing.assert_close(w_triton["layer.a.weight"].float(), w_cpu["layer.a.weight"].float(), **tol)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_triton_stacked_linear_equals_cpu_path(fan_in_fan_out):
    out_f, in_f = 40, 72
    adapters = []
    for seed, rank in enumerate([8, 8, 4, 4]):  # stacked rank 24
        t = client(rank, {"layer.b": (out_f, in_f)}, seed)["layer.b"]
        adapters.append(LoraAdapter({"layer.b": [LoraTerm(t.A.to(DEVICE), t.B.to(DEVICE), t.coef)]},
                                    fan_in_fan_out=fan_in_fan_out))
    stacked = lora.stack(adapters)
    w = torch.randn(*((in_f, out_f) if fan_in_fan_out else (out_f, in_f)), device=DEVICE)
    x = torch.randn(3, 7, in_f, device=DEVICE)
    y = lora.forward(x, w, stacked, "layer.b", backend="triton")
    assert y.shape == (3, 7, out_f)
    torch.testing.assert_close(y, lora.forward(x, w, stacked, "layer.b", backend="torch"), rtol=1e-4, atol=1e-3)
    dense = w.T if fan_in_fan_out else w
    torch.testing.assert_close(y, x @ (dense + stacked.delta("layer.b")).T, rtol=1e-4, atol=1e-3)


# Σr = 152, 9, 16 and 1: below 16, not a multiple of any BLOCK_R, a multiple of 16 (which Triton
# would specialize on), and 1 (which it would turn into a constant).
COMPOSITIONS = [[64, 32, 16, 16, 8, 8, 4, 4], [5, 3, 1], [16], [1]]


def merged_both_ways(ranks, dtype, shape=(200, 136)):
    """W (not a multiple of any tile) merged with a stack of the given ranks by torch and by Triton."""
    adapters = []
    for seed, rank in enumerate(ranks):
        t = client(rank, {"layer.c": shape}, seed)["layer.c"]
        adapters.append(LoraAdapter({"layer.c": [LoraTerm(t.A.to(DEVICE, dtype), t.B.to(DEVICE, dtype), t.coef)]}))
    stacked = lora.stack(adapters, weights=list(range(len(ranks), 0, -1)))
    w0 = torch.randn(*shape).to(DEVICE, dtype)
    w_cpu, w_triton = {"layer.c.weight": w0.clone()}, {"layer.c.weight": w0.clone()}
    lora.merge_into(w_cpu, stacked, backend="torch")
    lora.merge_into(w_triton, stacked, backend="triton")
    return w_triton["layer.c.weight"].float(), w_cpu["layer.c.weight"].float()


@pytest.mark.parametrize("ranks", COMPOSITIONS, ids=lambda r: f"R{sum(r)}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_merge_of_any_rank_composition_equals_cpu_path(dtype, ranks):
    tol = dict(rtol=1e-5, atol=1e-3) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-1)
    torch.testing.assert_close(*merged_both_ways(ranks, dtype), **tol)


def compiled_merge_kernels() -> set:
    """Keys of every compiled variant of the merge kernel, over all devices (Triton 3.6 to 3.9
    keep ``device_caches[device] = (kernel_cache, ...)``)."""
    from ferret.kernels import lora as kernels

    return {key for caches in kernels._merge_kernel.device_caches.values() for key in caches[0]}


@pytest.mark.skipif(DEVICE != "cuda",
                    reason="Triton's interpreter compiles nothing: the compile cache exists on a GPU only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_merge_compiles_once_per_dtype_whatever_the_ranks(dtype):
    merged_both_ways(COMPOSITIONS[0], dtype)
    first = compiled_merge_kernels()
    for ranks in COMPOSITIONS[1:]:
        merged_both_ways(ranks, dtype)
    assert compiled_merge_kernels() == first, "a new rank composition compiled the merge kernel again"


def test_merge_kernel_with_16_bit_factors():
    # The tensor-core tile (fp16 runs in the interpreter too; bf16 factors are covered on a GPU above).
    from ferret.kernels import lora as kernels

    g = torch.Generator().manual_seed(3)
    M, N, R = 150, 70, 37
    w = torch.randn(M, N, generator=g).half()
    Bt, A = torch.randn(R, M, generator=g).half(), (torch.randn(R, N, generator=g) / R).half()
    want = w.float() + Bt.float().T @ A.float()
    w = w.to(DEVICE)
    kernels.merge_stacked_(w, Bt.to(DEVICE), A.to(DEVICE))
    torch.testing.assert_close(w.cpu().float(), want, rtol=2e-3, atol=2e-3)


def test_merge_kernel_refuses_factors_that_do_not_fit():
    from ferret.kernels import lora as kernels

    w = torch.zeros(8, 6, device=DEVICE)
    with pytest.raises(ValueError, match="needs Bt 3x8 and A 3x6"):
        kernels.merge_stacked_(w, torch.zeros(3, 6, device=DEVICE), torch.zeros(3, 6, device=DEVICE))
    with pytest.raises(TypeError, match="factors must share"):
        kernels.merge_stacked_(w, torch.zeros(3, 8, device=DEVICE), torch.zeros(3, 6, device=DEVICE).double())
