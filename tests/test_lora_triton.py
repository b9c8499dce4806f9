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
    # fp32: summation order differs; bf16: one rounding (the interpreter truncates, a GPU rounds)
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
