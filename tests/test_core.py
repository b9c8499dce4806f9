"""The compiled CPU core against the NumPy spec: bit-identical bases and reconstructions (AVX2
and portable loops), compress within tolerance, identical results for 1 and 2 threads."""

import contextlib

import numpy as np
import pytest
import torch

from ferret import _core, spec

RAD, GAUSS = 0, 1
SEED = 0x1234_5678_9ABC_DEF  # wider than 32 bits on purpose
# (start, n, n_coords): aligned, unaligned, across a 64 Ki chunk edge, tiny, several tiles.
CASES = [(0, 4096, 8), (77, 3000, 3), (65536 - 700, 1500, 9), (5, 1, 1), (1 << 20, 2600, 13)]


@contextlib.contextmanager
def loops(portable: bool):
    old = _core.force_portable(portable)
    try:
        yield
    finally:
        _core.force_portable(old)


@contextlib.contextmanager
def threads(n: int):
    old = _core.num_threads()
    _core.set_num_threads(n)
    try:
        yield
    finally:
        _core.set_num_threads(old)


def torch_dtype(name):
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("start,n,k", CASES)
def test_rademacher_basis_bit_identical_to_spec(portable, start, n, k):
    for kk in range(k):
        gamma = np.zeros(k, np.float32)
        gamma[kk] = 1.0
        out = np.zeros(n, np.float32)
        with loops(portable):
            _core.reconstruct(out, start, SEED, RAD, gamma, 1.0)
        np.testing.assert_array_equal(out, spec.rademacher(SEED, kk, n, start))


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("start,n,k", CASES)
def test_reconstruct_bit_identical_to_spec(portable, dtype, start, n, k):
    rng = np.random.default_rng(n + k)
    gamma = (rng.standard_normal(k) * 3).astype(np.float32)
    base = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(torch_dtype(dtype))
    out = base.clone()
    with loops(portable):
        _core.reconstruct(out, start, SEED, RAD, gamma, 0.37)
    want = spec.reconstruct(gamma, SEED, n, np.float32(0.37), out=base.float().numpy(), start=start)
    want = torch.from_numpy(want).to(torch_dtype(dtype))  # torch rounds to nearest-even, as the spec says
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("start,n,k", CASES)
def test_compress_bit_identical_to_spec(portable, dtype, start, n, k):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(torch_dtype(dtype))
    gamma = np.zeros(k)
    with loops(portable):
        _core.compress(x, start, SEED, RAD, gamma)
    np.testing.assert_array_equal(gamma, spec.compress(x.float().numpy(), SEED, k, "rademacher", start))
    exact = np.array([x.double().numpy() @ spec.rademacher(SEED, j, n, start) for j in range(k)])
    np.testing.assert_allclose(gamma, exact, rtol=0, atol=1e-5 * np.sqrt(n))


@pytest.mark.parametrize("start", [-1, -65536, -100_000, -131072, 2**63 - 5])
def test_a_start_outside_the_block_is_refused_not_a_crash(start):
    x, gamma = np.ones(10, np.float32), np.zeros(4)
    for call in (lambda: _core.compress(x, start, SEED, RAD, gamma),
                 lambda: _core.reconstruct(x.copy(), start, SEED, RAD, gamma.astype(np.float32), 1.0),
                 lambda: _core.perturb(x.copy(), start, SEED, RAD, 0.1)):
        with pytest.raises(ValueError, match="start must be at least 0"):
            call()


def test_compress_accumulates_into_gamma():
    x = np.ones(100, np.float32)
    gamma = np.full(3, 10.0)
    _core.compress(x, 0, 1, RAD, gamma)
    np.testing.assert_array_equal(gamma, 10.0 + spec.compress(x, 1, 3))


@pytest.mark.parametrize("start,n,k", CASES[:3])
def test_gaussian_matches_spec_within_tolerance(start, n, k):
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    gamma = np.zeros(k)
    _core.compress(x, start, SEED, GAUSS, gamma)
    np.testing.assert_allclose(gamma, spec.compress(x, SEED, k, "gaussian", start), atol=1e-4 * np.sqrt(n))
    out = np.zeros(n, np.float32)
    g32 = gamma.astype(np.float32)
    _core.reconstruct(out, start, SEED, GAUSS, g32, 1.0)
    np.testing.assert_allclose(out, spec.reconstruct(g32, SEED, n, 1.0, "gaussian", start=start), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("basis", [RAD, GAUSS])
def test_one_and_two_threads_give_identical_results(basis):
    n, k = 3 * 65536 + 1234, 24
    x = np.random.default_rng(5).standard_normal(n).astype(np.float32)
    results = []
    for t in (1, 2):
        with threads(t):
            gamma = np.zeros(k)
            _core.compress(x, 999, SEED, basis, gamma)
            out = np.zeros(n, np.float32)
            _core.reconstruct(out, 999, SEED, basis, gamma.astype(np.float32), 0.5)
            results.append((gamma, out, _core.sum_squares(x)))
    (g1, o1, s1), (g2, o2, s2) = results
    assert g1.tobytes() == g2.tobytes() and o1.tobytes() == o2.tobytes() and s1 == s2


def test_avx2_and_portable_compress_are_bit_identical():
    x = np.random.default_rng(7).standard_normal(150_000).astype(np.float32)
    g = []
    for portable in (False, True):
        gamma = np.zeros(20)
        with loops(portable):
            _core.compress(x, 3, SEED, RAD, gamma)
        g.append(gamma)
    assert g[0].tobytes() == g[1].tobytes()


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_perturb_adds_eps_times_basis_zero(dtype):
    theta = torch.randn(5000, generator=torch.Generator().manual_seed(1)).to(torch_dtype(dtype))
    before = theta.clone()
    _core.perturb(theta, 0, SEED, RAD, 1e-3)
    want = torch.from_numpy(before.float().numpy() + spec.rademacher(SEED, 0, 5000) * np.float32(1e-3))
    assert torch.equal(theta, want.to(torch_dtype(dtype)))


def test_perturb_round_trip_is_exact_in_fp32():
    # On a 2^-10 grid, theta ± 0.25 is exact, so +eps then -eps must restore theta bit for bit.
    theta = (np.round(np.random.default_rng(2).standard_normal(10_000) * 1024) / 1024).astype(np.float32)
    before = theta.copy()
    _core.perturb(theta, 0, SEED, RAD, 0.25)
    _core.perturb(theta, 0, SEED, RAD, -0.25)
    np.testing.assert_array_equal(theta, before)


def test_sum_squares_all_dtypes_is_the_spec_tree():
    x = torch.randn(70_000, generator=torch.Generator().manual_seed(3))
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        y = x.to(dt)
        assert _core.sum_squares(y) == spec.sum_squares(y.float().numpy())
        assert _core.sum_squares(y) == pytest.approx(float((y.double() ** 2).sum()), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rounding_to_half_matches_torch(dtype):
    # Special values, subnormals, overflow and ties, then random magnitudes: out = 0 + (±1) * s.
    special = [0.0, 1e-8, 6e-8, 3e-5, 65504, 65519, 65520, 1e6, 2.0**-25, 1.5 * 2.0**-24, 1 + 2.0**-11,
               1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 3.0e38, 1e-40]
    rng = np.random.default_rng(0)
    scalars = np.concatenate([special, rng.standard_normal(1500) * 2.0 ** rng.integers(-30, 20, 1500)])
    signs = spec.rademacher(0, 0, 256)
    for s in scalars.astype(np.float32):
        out = torch.zeros(256, dtype=dtype)
        _core.reconstruct(out, 0, 0, RAD, np.ones(1, np.float32), float(s))
        want = torch.from_numpy(np.float32(0) + signs * s).to(dtype)  # 0 + (-0) is +0
        assert torch.equal(out.view(torch.int16), want.view(torch.int16)), s


def test_bad_buffers_are_refused():
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        _core.compress(np.zeros(4, np.float64), 0, 1, RAD, np.zeros(2))
    with pytest.raises(TypeError, match="gamma must be a 1-d float64"):
        _core.compress(np.zeros(4, np.float32), 0, 1, RAD, np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="basis"):
        _core.compress(np.zeros(4, np.float32), 0, 1, 7, np.zeros(2))
    with pytest.raises(TypeError):
        _core.reconstruct(np.zeros((4, 4), np.float32)[:, 0], 0, 1, RAD, np.ones(1, np.float32), 1.0)


def _strided_outputs():
    return [np.zeros((20, 2), np.float32)[:, 0], torch.zeros(20, 2)[:, 0], np.zeros(40, np.float32)[::2]]


@pytest.mark.parametrize("out", _strided_outputs(), ids=["numpy columns", "torch column", "numpy step"])
def test_writes_into_strided_buffers_are_refused_not_lost_in_a_copy(out):
    gamma = np.ones(3, np.float32)
    with pytest.raises(TypeError, match="C-contiguous"):
        _core.srht_reconstruct([out], [0], 20, 1, 2, gamma, 1.0)
    with pytest.raises(TypeError, match="C-contiguous"):
        _core.reconstruct(out, 0, 1, RAD, gamma, 1.0)
    with pytest.raises(TypeError, match="C-contiguous"):
        _core.perturb(out, 0, 1, RAD, 1.0)
    assert float(np.abs(np.asarray(out)).sum()) == 0


def test_read_only_outputs_are_refused():
    ro = np.zeros(20, np.float32)
    ro.flags.writeable = False
    with pytest.raises(TypeError, match="writable"):
        _core.reconstruct(ro, 0, 1, RAD, np.ones(1, np.float32), 1.0)
    with pytest.raises(TypeError, match="writable"):
        _core.srht_reconstruct([ro], [0], 20, 1, 2, np.ones(1, np.float32), 1.0)


def test_negated_views_are_refused_by_every_entry_point():
    x = torch.zeros(20)
    neg = torch._neg_view(x)
    gamma32, gamma64 = np.ones(2, np.float32), np.zeros(2)
    calls = [
        lambda: _core.compress(neg, 0, 1, RAD, gamma64),
        lambda: _core.reconstruct(neg, 0, 1, RAD, gamma32, 1.0),
        lambda: _core.perturb(neg, 0, 1, RAD, 1.0),
        lambda: _core.sum_squares(neg),
        lambda: _core.srht_compress([neg], [0], 20, 1, 2, np.zeros(2, np.float32)),
        lambda: _core.srht_reconstruct([neg], [0], 20, 1, 2, gamma32, 1.0),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="negated or conjugated view"):
            call()
    assert float(x.abs().sum()) == 0 and not gamma64.any()
