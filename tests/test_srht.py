"""The SRHT basis: its spec against an explicit Hadamard matrix, the C++ core bit-identical to
the spec (every dtype, split blocks, both instruction sets, any thread count), unbiased
reconstruction with the error theory predicts (below Rademacher's), and bad input refused."""

import numpy as np
import pytest
import torch

import ferret
from ferret import _core, spec
from ferret.basis import parse_basis
from ferret.packet import PacketError

SEED = 0x5EED_0F_5A7
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (block size, Hadamard size, rows): non-powers of two, tails of every length, a full budget
CASES = [(100, 64, 37), (12365, 4096, 300), (5000, 2, 5000), (3, 4096, 3), (70_000, 1024, 900)]


def sylvester(size: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < size:
        h = np.kron(np.array([[1, 1], [1, -1]]), h)
    return h


def srht_matrix(seed: int, n: int, m: int, size: int) -> np.ndarray:
    """Row k of the returned (m, n) matrix maps a block to coordinate k: built from the definition."""
    offsets, sizes = spec.hadamard_chunks(n, size)
    signs = spec.rademacher(seed, 0, n)
    rows = spec.srht_rows(seed, n, m)
    out = np.zeros((m, n))
    for k, r in enumerate(rows):
        c = int(spec.chunk_of([r], n, size)[0])
        o, sz = int(offsets[c]), int(sizes[c])
        out[k, o : o + sz] = sylvester(sz)[r - o] * signs[o : o + sz]
    return out


def test_chunks_follow_the_binary_digits_of_the_tail():
    offsets, sizes = spec.hadamard_chunks(100, 64)
    assert offsets.tolist() == [0, 64, 96] and sizes.tolist() == [64, 32, 4]
    offsets, sizes = spec.hadamard_chunks(2 * 4096 + 5, 4096)
    assert offsets.tolist() == [0, 4096, 8192, 8196] and sizes.tolist() == [4096, 4096, 4, 1]
    assert spec.chunk_of([0, 63, 64, 95, 96, 99], 100, 64).tolist() == [0, 0, 1, 1, 2, 2]


def test_fwht_known_answer_and_matrix():
    np.testing.assert_array_equal(spec.fwht(np.array([1, 2, 3, 4], np.float32)), [10, -2, -4, 0])
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    np.testing.assert_allclose(spec.fwht(x), sylvester(64) @ x, rtol=1e-5, atol=1e-5)


def test_rows_are_a_seeded_permutation_whose_prefixes_agree():
    assert spec.srht_rows(SEED, 1000, 8).tolist() == [731, 894, 370, 604, 545, 608, 789, 190]
    full = spec.srht_rows(SEED, 1000, 1000)
    assert sorted(full.tolist()) == list(range(1000))
    assert spec.srht_rows(SEED, 1000, 10).tolist() == full[:10].tolist()
    rows = np.zeros(1000, np.int64)
    _core.srht_rows(SEED, 1000, rows)
    np.testing.assert_array_equal(rows, full)
    first = np.array([spec.srht_rows(s, 10, 1)[0] for s in range(2000)])
    counts = np.bincount(first, minlength=10)
    assert counts.min() > 150 and counts.max() < 250, counts  # uniform: 200 ± 4.5 sigma


def test_spec_matches_the_explicit_matrix_and_rows_are_orthogonal():
    n, size = 100, 64
    x = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    matrix = srht_matrix(SEED, n, n, size)
    np.testing.assert_allclose(spec.srht_compress(x, SEED, n, size), matrix @ x, rtol=1e-5, atol=1e-5)
    gram = matrix @ matrix.T
    np.testing.assert_array_equal(gram, np.diag(np.diag(gram)))  # orthogonal rows, norms = chunk sizes
    # every row kept: the reconstruction is exact (up to fp32 rounding)
    rebuilt = spec.srht_reconstruct(spec.srht_compress(x, SEED, n, size), SEED, n, np.float32(1.0), size)
    np.testing.assert_allclose(rebuilt, x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,size,m", CASES)
def test_core_compress_is_bit_identical_to_spec(n, size, m):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    want = spec.srht_compress(x, SEED, m, size)
    got = np.zeros(m, np.float32)
    _core.srht_compress([x], [0], n, SEED, size.bit_length() - 1, got)
    np.testing.assert_array_equal(got, want)
    cut = [0, n // 3, n // 3 + 1, n]  # three segments; chunks straddle them
    split = np.zeros(m, np.float32)
    _core.srht_compress([x[a:b].copy() for a, b in zip(cut, cut[1:])], cut[:-1], n, SEED, size.bit_length() - 1, split)
    np.testing.assert_array_equal(split, want)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n,size,m", CASES)
def test_core_reconstruct_is_bit_identical_to_spec(dtype, n, size, m):
    rng = np.random.default_rng(m)
    coords = (rng.standard_normal(m) * 3).astype(np.float32)
    base = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(DTYPES[dtype])
    scale = np.float32(0.3 * n / m)
    want = spec.srht_reconstruct(coords, SEED, n, scale, size, base.float().numpy())
    cut = [0, n // 2, n]
    got = base.clone()
    _core.srht_reconstruct([got[a:b] for a, b in zip(cut, cut[1:])], cut[:-1], n, SEED, size.bit_length() - 1,
                           coords, scale)
    assert torch.equal(got.view(torch.uint8), torch.from_numpy(want).to(DTYPES[dtype]).view(torch.uint8))


def test_core_results_do_not_depend_on_threads_or_instruction_set():
    n, m = 300_000, 200  # Hadamard size 2^12
    x = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    results = []
    old = _core.num_threads()
    try:
        for threads, portable in ((1, False), (2, False), (2, True)):
            _core.set_num_threads(threads)
            was = _core.force_portable(portable)
            coords = np.zeros(m, np.float32)
            _core.srht_compress([x], [0], n, SEED, 12, coords)
            out = x.copy()
            _core.srht_reconstruct([out], [0], n, SEED, 12, coords, 0.5)
            _core.force_portable(was)
            results.append((coords, out))
    finally:
        _core.set_num_threads(old)
    for coords, out in results[1:]:
        np.testing.assert_array_equal(coords, results[0][0])
        np.testing.assert_array_equal(out, results[0][1])


def test_chunks_without_a_row_are_left_untouched():
    out = np.full(8192 + 3, -0.0, np.float32)
    _core.srht_reconstruct([out], [0], out.size, SEED, 12, np.ones(1, np.float32), 1.0)
    touched = spec.chunk_of(spec.srht_rows(SEED, out.size, 1), out.size, 4096)[0]
    offsets, sizes = spec.hadamard_chunks(out.size, 4096)
    untouched = np.ones(out.size, bool)
    untouched[offsets[touched] : offsets[touched] + sizes[touched]] = False
    assert np.all(np.signbit(out[untouched]))  # -0.0 + 0.0 would have turned them into +0.0


def _mean_and_error(basis: str, x: torch.Tensor, budget: int, seeds: int):
    total, sq_error = torch.zeros_like(x, dtype=torch.float64), 0.0
    for s in range(seeds):
        est = ferret.reconstruct(ferret.compress(x, seed=s, budget=budget, basis=basis), like=x)
        total += est.double()
        sq_error += float(torch.sum((est.double() - x.double()) ** 2))
    return total / seeds, sq_error / seeds


def test_reconstruction_is_unbiased_with_the_predicted_error_below_rademachers():
    n, m, seeds = 1000, 50, 2000
    x = torch.from_numpy(np.random.default_rng(4).standard_normal(n).astype(np.float32))
    norm2 = float(torch.sum(x.double() ** 2))
    mean, error = _mean_and_error("srht:64", x, m, seeds)
    predicted = (n / m - 1) * norm2
    assert abs(error / predicted - 1) < 0.05, (error, predicted)
    # the mean of `seeds` estimates: E|mean - x|^2 = predicted / seeds
    bias2 = float(torch.sum((mean - x.double()) ** 2))
    assert 0.8 < bias2 / (predicted / seeds) < 1.25, (bias2, predicted / seeds)
    _, rademacher_error = _mean_and_error("rademacher", x, m, seeds)
    assert abs(rademacher_error / ((n - 1) / m * norm2) - 1) < 0.05
    assert error < rademacher_error


def test_public_api_round_trip_with_grouped_blocks_and_packets():
    model = {"w": torch.randn(300, 70), "b": torch.randn(70), "e": torch.randn(5000, 3)}
    total = sum(v.numel() for v in model.values())
    for grouping in ("tensor", 40_000):  # 40_000 puts all three tensors in one block
        packet = ferret.compress(model, seed=3, budget=total, basis="srht:256", grouping=grouping, allocation="uniform")
        assert packet.basis == "srht:256" and ferret.Packet.from_bytes(packet.to_bytes()) == packet
        rebuilt = ferret.reconstruct(packet, like=model)
        for name in model:
            torch.testing.assert_close(rebuilt[name], model[name], rtol=1e-4, atol=1e-5)
    default = ferret.compress(model, seed=3, budget=300, basis="srht:4096")
    assert default.basis == "srht" and ferret.Packet.from_bytes(default.to_bytes()).basis == "srht"


def test_budget_is_capped_by_block_sizes():
    update = {"big": torch.randn(1000), "tiny": torch.randn(3)}
    packet = ferret.compress(update, seed=1, budget=500, basis="srht", allocation="uniform")
    assert packet.counts.tolist() == [497, 3]
    with pytest.raises(ValueError, match="exceeds the 1003 rows"):
        ferret.compress(update, seed=1, budget=1004, basis="srht")


def test_merged_packets_rebuild_the_weighted_mean():
    updates = [{"w": torch.randn(40, 30), "b": torch.randn(30)} for _ in range(3)]
    packets = [ferret.compress(u, seed=8, budget=b, basis="srht:16") for u, b in zip(updates, (40, 60, 25))]
    weights = [0.5, 0.3, 0.2]
    merged = ferret.reconstruct(ferret.merge_packets(packets, weights), like=updates[0])
    for name in updates[0]:
        mean = sum(w * ferret.reconstruct(p, like=updates[0])[name] for w, p in zip(weights, packets))
        torch.testing.assert_close(merged[name], mean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,message", [
    ("srht:1000", "power of two from 2 to 32768"), ("srht:1", "power of two"), ("srht:65536", "power of two"),
    ("srht:x", "power of two"), ("srht:-8", "power of two"), ("gaussian:64", "unknown basis"),
    ("srht:", "power of two"), ("hadamard:5", "power of two from 2 to 4194304"),
])
def test_bad_basis_names_are_refused(name, message):
    with pytest.raises(ValueError, match=message):
        parse_basis(name)
    with pytest.raises(ValueError, match=message):
        ferret.compress(torch.randn(100), seed=0, budget=4, basis=name)


def test_bad_srht_input_is_refused():
    with pytest.raises(ValueError, match="'srht' is a projection basis"):
        ferret.perturb(torch.zeros(10), seed=0, eps=1e-3, basis="srht")
    with pytest.raises(ValueError, match="2\\^1 .. 2\\^15"):
        _core.srht_compress([np.zeros(10, np.float32)], [0], 10, 0, 16, np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="has that many rows"):
        _core.srht_compress([np.zeros(10, np.float32)], [0], 10, 0, 4, np.zeros(11, np.float32))
    with pytest.raises(ValueError, match="outside its block"):
        _core.srht_compress([np.zeros(10, np.float32)], [5], 10, 0, 4, np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="empty block"):
        ferret.compress({"a": torch.zeros(0), "b": torch.ones(4)}, seed=0, budget=2, basis="srht")
    # a packet asking for more rows than the receiver's block has
    forged = ferret.Packet(1, "srht", 0, ferret.Layout.of(torch.zeros(4)).fingerprint, [5], np.ones(5))
    with pytest.raises(PacketError, match="at most 4 rows under srht"):
        ferret.reconstruct(forged, like=torch.zeros(4))
    raw = bytearray(ferret.compress(torch.randn(20), seed=0, budget=3).to_bytes())
    raw[7] = 3  # a basis argument on a Rademacher packet
    with pytest.raises(PacketError, match="does not fit basis rademacher"):
        ferret.Packet.from_bytes(bytes(raw[:-4]) + __import__("zlib").crc32(bytes(raw[:-4])).to_bytes(4, "little"))
