"""The Triton kernels on a real GPU at real sizes, against the compiled core (bit for bit) and the
NumPy spec: every basis, fp32 / bf16 / fp16, blocks up to 1e8 elements, a model-shaped packet.
Skipped without CUDA: CI runs the same kernels at small sizes in Triton's interpreter
(tests/test_triton.py); ``bench/gpu/run.sh`` runs this file on a GPU machine."""

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tests/test_triton.py "
                                                                     "covers the kernels in the interpreter)")

import ferret  # noqa: E402
from ferret import _core, spec  # noqa: E402

SEED = 0x51DE_5EED
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _update(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(n, device="cuda", generator=g) * 1e-2).to(dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n,start,k", [(100_000_000, 0, 4), (30_000_000 + 7, 12_345, 24)])
def test_rademacher_bit_identical_to_core_at_scale(dtype, n, start, k):
    from ferret.kernels import projection as P

    x = _update(n, DTYPES[dtype])
    got = P.compress(x, start, SEED, P.RADEMACHER, k).cpu().numpy()
    on_core = np.zeros(k)
    _core.compress(x.cpu(), start, SEED, 0, on_core)
    np.testing.assert_array_equal(got, on_core)

    gamma = torch.randn(k, generator=torch.Generator().manual_seed(k))
    base = _update(n, DTYPES[dtype], seed=1)
    on_gpu = base.clone()
    P.reconstruct_(on_gpu, start, SEED, P.RADEMACHER, gamma.cuda(), 0.31)
    on_cpu = base.cpu()
    _core.reconstruct(on_cpu, start, SEED, 0, gamma.numpy(), 0.31)
    assert torch.equal(on_gpu.cpu().view(torch.uint8), on_cpu.view(torch.uint8))


def test_rademacher_matches_the_spec_on_a_gpu():
    from ferret.kernels import projection as P

    x = _update(1_000_003, torch.float32)
    got = P.compress(x, 77, SEED, P.RADEMACHER, 3).cpu().numpy()
    np.testing.assert_array_equal(got, spec.compress(x.cpu().numpy(), SEED, 3, "rademacher", 77))
    assert float(P.sum_squares(x)) == spec.sum_squares(x.cpu().numpy()) == _core.sum_squares(x.cpu())


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_sum_squares_bit_identical_to_core_at_scale(dtype):
    from ferret.kernels import projection as P

    x = _update(100_000_000, DTYPES[dtype], seed=2)
    assert float(P.sum_squares(x)) == _core.sum_squares(x.cpu())


def test_gaussian_within_tolerance_of_the_spec():
    from ferret.kernels import projection as P

    x = _update(1_000_000, torch.float32, seed=3)
    got = P.compress(x, 5, SEED, P.GAUSSIAN, 4).cpu().numpy()
    np.testing.assert_allclose(got, spec.compress(x.cpu().numpy(), SEED, 4, "gaussian", 5), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("basis", ["rademacher", "srht", "srht:1024", "hadamard", "hadamard:256"])
def test_model_shaped_packets_identical_on_gpu_and_core(basis):
    # Transformer-like tensors (sizes below a 1B model's, to keep the core's side quick).
    # (17 blocks: "hadamard:256" holds 17 × 256 rows, enough for the budget of 3800.)
    shapes = {"embed": (32000, 512)}
    for layer in range(4):
        for name, shape in (("q", (512, 512)), ("kv", (1024, 512)), ("mlp", (1408, 512)), ("norm", (512,))):
            shapes[f"l{layer}.{name}"] = shape
    update = {n: _update(int(np.prod(s)), torch.float32, seed=i).reshape(s) for i, (n, s) in enumerate(shapes.items())}
    on_gpu = ferret.compress(update, seed=11, budget=3800, basis=basis)
    on_core = ferret.compress({n: t.cpu() for n, t in update.items()}, seed=11, budget=3800, basis=basis)
    assert on_gpu.to_bytes() == on_core.to_bytes()
    params = {n: _update(t.numel(), torch.float32, seed=100 + i).reshape(t.shape) for i, (n, t) in enumerate(update.items())}
    cpu_params = {n: t.cpu() for n, t in params.items()}
    ferret.reconstruct(on_gpu, into=params, scale=0.5)
    ferret.reconstruct(on_core, into=cpu_params, scale=0.5)
    assert all(torch.equal(params[n].cpu(), cpu_params[n]) for n in params)


@pytest.mark.parametrize("basis,dtype", [("srht", torch.float32), ("hadamard", torch.float32),
                                         ("hadamard:65536", torch.bfloat16)])
def test_hadamard_kinds_bit_identical_to_core_at_scale(basis, dtype):
    update = {"w": _update(50_000_000, dtype, seed=4)}
    on_gpu = ferret.compress(update, seed=3, budget=200, basis=basis)
    on_core = ferret.compress({"w": update["w"].cpu()}, seed=3, budget=200, basis=basis)
    assert on_gpu.to_bytes() == on_core.to_bytes()
    out, cpu_out = update["w"].clone(), update["w"].cpu()
    ferret.reconstruct(on_gpu, into={"w": out}, scale=0.5)
    ferret.reconstruct(on_core, into={"w": cpu_out}, scale=0.5)
    assert torch.equal(out.cpu(), cpu_out)


def test_perturb_bit_identical_to_core_and_round_trip():
    theta = _update(10_000_000, torch.bfloat16, seed=5)
    on_cpu = theta.cpu()
    ferret.perturb({"t": theta}, seed=9, eps=1e-3)
    ferret.perturb({"t": on_cpu}, seed=9, eps=1e-3)
    assert torch.equal(theta.cpu(), on_cpu)


def _host_syncs(fn) -> int:
    """Host synchronisations torch reports (sync debug mode) during one ``fn()``."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(1 for w in caught if "synchroniz" in str(w.message))


@pytest.mark.parametrize("basis", ["rademacher", "srht", "hadamard"])
def test_one_host_wait_per_compress_whatever_the_number_of_tensors(basis):
    """A compress waits on the device once (its coordinates) with uniform allocation, twice with
    norm allocation (the norms, then the coordinates), and a reconstruct into tensors whose
    steps cannot overflow not at all: for 8 tensors and for 146."""
    for tensors in (8, 146):
        update = {f"t{i}": _update(20_000 + 64 * i, torch.float32, seed=i) for i in range(tensors)}
        assert _host_syncs(lambda: ferret.compress(update, seed=1, budget=2000, basis=basis,
                                                   allocation="uniform")) == 1
        assert _host_syncs(lambda: ferret.compress(update, seed=1, budget=2000, basis=basis)) == 2
        packet = ferret.compress(update, seed=1, budget=2000, basis=basis)
        assert _host_syncs(lambda: ferret.reconstruct(packet, into=update, scale=1e-3)) <= 1
