"""The Triton kernels: bit-identical to the CPU core and the spec for Rademacher bases, run in
Triton's interpreter on CPU tensors (or for real where a GPU is present), and compiled for
sm_90 ahead of time without a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton", reason="the [gpu] extra (triton) is not installed")

import triton.language as tl  # noqa: E402

import ferret  # noqa: E402
from ferret import _core, spec  # noqa: E402
from ferret.kernels import projection as P  # noqa: E402
from ferret.kernels.groups import Table, fp32_bits  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEED = 0x0DDB_A11_5EED_1234
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Small sizes: the interpreter runs about 1-16 M element-bases per second.
CASES = [(0, 9000, 4), (8000, 10000, 3), (65536 - 50, 300, 5), (3, 1, 2)]


@triton.jit
def _philox_kernel(out_ptr, seed, N: tl.constexpr):
    i = tl.arange(0, N).to(tl.int64)
    r0, r1, r2, r3 = tl.randint4x(seed, (i << 32) | (i * 7 + 3))
    tl.store(out_ptr + i * 4 + 0, r0)
    tl.store(out_ptr + i * 4 + 1, r1)
    tl.store(out_ptr + i * 4 + 2, r2)
    tl.store(out_ptr + i * 4 + 3, r3)


def test_raw_philox_matches_spec():
    out = torch.zeros(64 * 4, dtype=torch.int32, device=DEVICE)
    _philox_kernel[(1,)](out, SEED, N=64)
    i = np.arange(64, dtype=np.int64)
    want = np.stack(spec.randint4x(SEED, (i << 32) | (i * 7 + 3)), axis=1).reshape(-1)
    np.testing.assert_array_equal(out.cpu().numpy().view(np.uint32), want)


@pytest.mark.parametrize("start,n,k", CASES)
def test_rademacher_basis_bit_identical(start, n, k):
    for kk in range(k):
        gamma = torch.zeros(k, dtype=torch.float32, device=DEVICE)
        gamma[kk] = 1.0
        out = torch.zeros(n, dtype=torch.float32, device=DEVICE)
        P.reconstruct_(out, start, SEED, P.RADEMACHER, gamma, 1.0)
        np.testing.assert_array_equal(out.cpu().numpy(), spec.rademacher(SEED, kk, n, start))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("start,n,k", CASES)
def test_reconstruct_bit_identical_to_core(dtype, start, n, k):
    rng = np.random.default_rng(n)
    gamma = (rng.standard_normal(k) * 2).astype(np.float32)
    base = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(DTYPES[dtype])
    on_core = base.clone()
    _core.reconstruct(on_core, start, SEED, 0, gamma, 0.77)
    on_triton = base.clone().to(DEVICE)
    P.reconstruct_(on_triton, start, SEED, P.RADEMACHER, torch.from_numpy(gamma).to(DEVICE), 0.77)
    assert torch.equal(on_triton.cpu().view(torch.uint8), on_core.view(torch.uint8))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("start,n,k", CASES + [(3 * 16384 - 5, 40000, 2)])
def test_rademacher_compress_bit_identical_to_spec_and_core(dtype, start, n, k):
    x = torch.randn(n, generator=torch.Generator().manual_seed(k)).to(DTYPES[dtype])
    got = P.compress(x.to(DEVICE), start, SEED, P.RADEMACHER, k).cpu().numpy()
    np.testing.assert_array_equal(got, spec.compress(x.float().numpy(), SEED, k, "rademacher", start))
    on_core = np.zeros(k)
    _core.compress(x, start, SEED, 0, on_core)
    np.testing.assert_array_equal(got, on_core)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs these kernels in every other test")
@pytest.mark.parametrize("groups", [P.WARP, P.GROUPS])
@pytest.mark.parametrize("start,n,k", [(0, 9000, 3), (16384 * 2 - 300, 17000, 2)])
def test_gpu_kernels_arithmetic_in_the_interpreter(start, n, k, groups):
    """The GPU's own kernels (one group per thread, tuples of rows), run in the interpreter: the
    arithmetic the GPU does, bit for bit the spec's (only the warp's shuffles are replaced), with
    one warp and with the GPU's four (whose sums the program adds up itself)."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    first, count = P._tiles(start, n, P.GROUP * groups)
    table = Table(8)
    table.add(count, x.data_ptr(), n, start, first, SEED, k, 0, 0)
    part = torch.empty((count, k), dtype=torch.float64)
    P._compress_kernel[(count,)](*table.to(x.device), 1, part, DTYPE=tl.float32, GROUPS=groups, INTERPRET=True)
    got = P.tree_sum(part, first).numpy()
    np.testing.assert_array_equal(got, spec.compress(x.numpy(), SEED, k, "rademacher", start))
    gamma = torch.randn(k, generator=torch.Generator().manual_seed(k))
    out, on_core = x.clone(), x.clone()
    table = Table(8)
    table.add(count, out.data_ptr(), n, start, first, SEED, k, 0, int(fp32_bits(0.3)))
    P._reconstruct_kernel[(count,)](*table.to(x.device), 1, gamma, DTYPE=tl.float32, GROUPS=groups)
    _core.reconstruct(on_core, start, SEED, 0, gamma.numpy(), 0.3)
    assert torch.equal(out, on_core)


@pytest.mark.parametrize("start,n,k", CASES)
def test_gaussian_compress_matches_spec(start, n, k):
    x = torch.randn(n, generator=torch.Generator().manual_seed(k))
    got = P.compress(x.to(DEVICE), start, SEED, P.GAUSSIAN, k).cpu().numpy()
    want = spec.compress(x.numpy(), SEED, k, "gaussian", start)
    np.testing.assert_allclose(got, want, atol=2e-5 * np.sqrt(n))


@pytest.mark.parametrize("n", [1, 127, 128, 129, 40000, 300001])
def test_sum_squares_bit_identical_to_spec_and_core(n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * np.exp(3 * rng.standard_normal(n))).astype(np.float32)
    got = float(P.sum_squares(torch.from_numpy(x).to(DEVICE)))
    assert got == spec.sum_squares(x) == _core.sum_squares(x)


@pytest.mark.parametrize("rows,first", [(1, 0), (2, 1), (700, 3), (70000, 255), (513, 256)])
def test_tree_sum_is_the_spec_tree(rows, first):
    part = np.random.default_rng(rows).standard_normal((rows, 3)) * 10.0 ** np.arange(3)
    got = P.tree_sum(torch.from_numpy(part).to(DEVICE), first).cpu().numpy()
    np.testing.assert_array_equal(got, [spec.pairwise_tree(part[:, k], first) for k in range(3)])


def test_gaussian_reconstruct_matches_spec_within_tolerance():
    gamma = np.array([1.5, -0.5, 2.0], np.float32)
    out = torch.zeros(5000, device=DEVICE)
    P.reconstruct_(out, 100, SEED, P.GAUSSIAN, torch.from_numpy(gamma).to(DEVICE), 0.5)
    want = spec.reconstruct(gamma, SEED, 5000, 0.5, "gaussian", start=100)
    np.testing.assert_allclose(out.cpu().numpy(), want, rtol=1e-4, atol=1e-5)


def test_perturb_bit_identical_to_core():
    theta = torch.randn(3000, generator=torch.Generator().manual_seed(0)).bfloat16()
    on_core = theta.clone()
    _core.perturb(on_core, 0, SEED, 0, 1e-3)
    on_triton = theta.clone().to(DEVICE)
    P.perturb_(on_triton, 0, SEED, P.RADEMACHER, 1e-3)
    assert torch.equal(on_triton.cpu(), on_core)


def test_public_api_on_triton_backend_equals_core():
    update = {"w": torch.randn(40, 50), "b": torch.randn(700)}
    on_core = ferret.compress(update, seed=9, budget=12)
    on_triton = ferret.compress({k: v.to(DEVICE) for k, v in update.items()}, seed=9, budget=12, backend="triton")
    assert on_core.counts.tolist() == on_triton.counts.tolist()
    np.testing.assert_allclose(on_core.coords, on_triton.coords, rtol=1e-5, atol=1e-4)
    a = ferret.reconstruct(on_core, like=update)
    b = ferret.reconstruct(on_core, like={k: v.to(DEVICE) for k, v in update.items()}, backend="triton")
    assert all(torch.equal(a[k], b[k].cpu()) for k in update)


SRHT_CASES = [(100, 64, 37), (12365, 4096, 30), (500, 2, 500), (3, 8, 3)]


def _srht_segments(x: torch.Tensor):
    cut = [0, x.numel() // 3, x.numel()]
    return [(x[a:b], a) for a, b in zip(cut, cut[1:]) if b > a]


def _srht_block(segments, n, size):
    from ferret.backends import Block

    return Block(segments, n, SEED, "srht", size)


@pytest.mark.parametrize("n,size,m", SRHT_CASES)
def test_srht_compress_bit_identical_to_spec_and_core(n, size, m):
    from ferret.backends import TritonBackend

    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    [got] = TritonBackend().compress([_srht_block(_srht_segments(torch.from_numpy(x).to(DEVICE)), n, size)], [m])
    np.testing.assert_array_equal(got, spec.srht_compress(x, SEED, m, size))
    on_core = np.zeros(m, np.float32)
    _core.srht_compress([x], [0], n, SEED, size.bit_length() - 1, on_core)
    np.testing.assert_array_equal(got, on_core)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n,size,m", SRHT_CASES)
def test_srht_reconstruct_bit_identical_to_core(dtype, n, size, m):
    from ferret.backends import TritonBackend

    rng = np.random.default_rng(m)
    coords = (rng.standard_normal(m) * 2).astype(np.float32)
    base = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(DTYPES[dtype])
    scale = np.float32(0.7 * n / m)
    on_core = base.clone()
    _core.srht_reconstruct([on_core], [0], n, SEED, size.bit_length() - 1, coords, scale)
    on_triton = base.clone().to(DEVICE)
    TritonBackend().reconstruct([_srht_block(_srht_segments(on_triton), n, size)], [coords], [scale])
    assert torch.equal(on_triton.cpu().view(torch.uint8), on_core.view(torch.uint8))


def test_srht_public_api_on_triton_backend_equals_core():
    update = {"w": torch.randn(40, 50), "b": torch.randn(700)}
    on_core = ferret.compress(update, seed=9, budget=60, basis="srht:256", grouping=5000)
    on_triton = ferret.compress({k: v.to(DEVICE) for k, v in update.items()}, seed=9, budget=60, basis="srht:256",
                                grouping=5000, backend="triton")
    assert on_core == on_triton  # the transform is fp32 everywhere: identical coordinates
    a = ferret.reconstruct(on_core, like=update)
    b = ferret.reconstruct(on_core, like={k: v.to(DEVICE) for k, v in update.items()}, backend="triton")
    assert all(torch.equal(a[k], b[k].cpu()) for k in update)


def test_bad_buffers_are_refused():
    with pytest.raises(ValueError, match="1-d contiguous"):
        P.reconstruct_(torch.zeros(4, 4), 0, 1, 0, torch.ones(1), 1.0)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        P.compress(torch.zeros(4, dtype=torch.float64), 0, 1, 0, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels for real")
def test_kernels_compile_for_sm90_without_a_gpu():
    script = Path(__file__).with_name("aot_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fused-fma 0" in proc.stdout
    assert proc.stdout.count("sm_90 srht") == 7
    assert proc.stdout.count("sm_90 lora merge") == 2 and "sm_90 lora stacked linear" in proc.stdout


class _Launches:
    """Counts Triton launches (in the interpreter) and torch operations other than views while active."""

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode
        from triton.runtime.interpreter import InterpretedFunction

        self.kernels, self.ops = [], []
        run = InterpretedFunction.run
        counts = self

        def counted(kernel, *args, **kwargs):
            counts.kernels.append(kernel.__name__)
            return run(kernel, *args, **kwargs)

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not func.is_view:  # views move no data
                    counts.ops.append(str(func))
                return func(*args, **(kwargs or {}))

        monkeypatch.setattr(InterpretedFunction, "run", counted)
        self.mode = Ops()

    def __enter__(self):
        self.kernels.clear()
        self.ops.clear()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts the interpreter's launches")
@pytest.mark.parametrize("basis", ["rademacher", "gaussian", "hadamard", "srht:64"])
def test_launches_per_packet_do_not_grow_with_the_number_of_tensors(basis, monkeypatch):
    """A compress (with the norms), a reconstruct and a perturbation of 20 tensors and of 146 (a 1B
    Llama's count) take the same Triton launches and the same torch operations: the kernels walk
    tables of segments."""
    counted = _Launches(monkeypatch)
    seen = {}
    for tensors in (20, 146):
        gen = torch.Generator().manual_seed(tensors)
        update = {f"t{i}": torch.randn(6, 32 + 8 * (i % 2), generator=gen) for i in range(tensors)}
        update["bf16"] = torch.randn(300, generator=gen).bfloat16()
        budget = 4 * len(update)
        with counted:
            packet = ferret.compress(update, seed=3, budget=budget, basis=basis, backend="triton")
        compress = (list(counted.kernels), list(counted.ops))
        rebuilt, want = ({k: v.clone() for k, v in update.items()} for _ in range(2))
        with counted:
            ferret.reconstruct(packet, into=rebuilt, backend="triton")
        seen[tensors] = (compress, (list(counted.kernels), list(counted.ops)))
        if basis in ("rademacher", "gaussian"):
            with counted:
                ferret.perturb(rebuilt, 5, 1e-3, basis=basis, backend="triton")
            seen[tensors] += ((list(counted.kernels), list(counted.ops)),)
        ferret.reconstruct(ferret.compress(update, seed=3, budget=budget, basis=basis), into=want)
        if basis in ("rademacher", "gaussian"):
            ferret.perturb(want, 5, 1e-3, basis=basis)
        if basis != "gaussian":
            assert all(torch.equal(rebuilt[k], want[k]) for k in update)
    for (k20, ops20), (k146, ops146) in zip(seen[20], seen[146]):
        assert k20 == k146
        assert ops20 == ops146, [op for op in ops146 if op not in ops20]
    (kernels, _), (rebuilt, _), *_ = seen[146]
    assert 0 < len(kernels) <= 12 and 0 < len(rebuilt) <= 6, (kernels, rebuilt)


@pytest.mark.parametrize("basis", ["rademacher", "gaussian", "hadamard", "srht:64"])
def test_compress_against_a_start_on_triton_is_the_packet_of_the_difference(basis):
    """The kernels read new - old in place (the dtype's own subtraction): the packet of the
    materialised difference, byte for byte, and the core's."""
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        old = {"w": torch.randn(40, 70, generator=gen).to(dtype), "n": torch.randn(300, generator=gen).to(dtype)}
        new = {k: (v.float() + 1e-2 * torch.randn(v.shape, generator=gen)).to(dtype) for k, v in old.items()}
        diff = {k: new[k] - old[k] for k in old}
        on = lambda d: {k: v.to(DEVICE) for k, v in d.items()}  # noqa: E731
        for allocation in ("norm", "uniform"):
            kwargs = dict(seed=5, budget=120, basis=basis, allocation=allocation)
            got = ferret.compress(on(new), start=on(old), backend="triton", **kwargs).to_bytes()
            assert got == ferret.compress(on(diff), backend="triton", **kwargs).to_bytes()
            if basis != "gaussian":
                assert got == ferret.compress(new, start=old, **kwargs).to_bytes()
