"""The shared randomness: Philox known answers, seed rules, basis properties."""

import numpy as np
import pytest

import ferret
from ferret import _core, spec

# Random123 kat_vectors, philox4x32_10: (counter, key, expected output).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers_numpy(ctr, key, want):
    got = spec.philox4x32(*[np.array([c], dtype=np.uint32) for c in ctr], *key)
    assert tuple(int(w[0]) for w in got) == want


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers_core(ctr, key, want):
    assert _core.philox4x32_10(*ctr, *key) == want


def test_randint4x_uses_triton_counter_convention():
    seed, offset = (7 << 32) | 9, (5 << 32) | 3
    want = spec.philox4x32(3, 5, 0, 0, 9, 7)
    got = spec.randint4x(seed, np.array([offset]))
    assert [int(g[0]) for g in got] == [int(w) for w in want]


def test_rademacher_basis_known_answer():
    # The first Philox output word for seed 0, counter (0, 0, 0, 0) is 0x6627e8d5 (KAT above):
    # its bits, least significant first, are the signs of elements 0..31 of basis 0.
    v = spec.rademacher(0, 0, 32)
    bits = [(0x6627E8D5 >> i) & 1 for i in range(32)]
    assert v.tolist() == [-1.0 if b else 1.0 for b in bits]


@pytest.mark.parametrize("seed,want", [(5, 5), (-1, 2**63 - 1), (2**63, 0), (2**64 + 3, 3), (np.int64(-2), 2**63 - 2)])
def test_normalize_seed(seed, want):
    assert spec.normalize_seed(seed) == want


@pytest.mark.parametrize("bad", [1.5, "3", None, True])
def test_normalize_seed_rejects_non_ints(bad):
    with pytest.raises(TypeError, match="seed must be an int"):
        spec.normalize_seed(bad)


def test_block_seeds_are_distinct_in_range_and_seed_dependent():
    seeds = [spec.block_seed(42, b) for b in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert spec.block_seed(42, 0) != spec.block_seed(43, 0)
    assert spec.block_seed(-1, 3) == spec.block_seed(2**63 - 1, 3)
    assert spec.block_seeds(42, 1000) == seeds  # the vectorised form the API uses


def test_rademacher_basis_is_balanced_and_uncorrelated():
    v = np.stack([spec.rademacher(11, k, 4096) for k in range(8)])
    assert set(np.unique(v)) == {-1.0, 1.0}
    gram = v @ v.T / 4096
    assert np.abs(gram - np.eye(8)).max() < 5 / np.sqrt(4096)


def test_gaussian_basis_moments():
    z = spec.gaussian(3, 1, 1 << 16).astype(np.float64)
    assert abs(z.mean()) < 5 / 256 and abs(z.var() - 1) < 5 * np.sqrt(2) / 256


def test_basis_offset_matches_slice():
    full = spec.rademacher(9, 2, 1000)
    np.testing.assert_array_equal(spec.rademacher(9, 2, 300, start=613), full[613:913])
    np.testing.assert_array_equal(spec.gaussian(9, 2, 30, start=61), spec.gaussian(9, 2, 91)[61:])


def test_public_seed_helpers_are_the_spec():
    assert ferret.block_seed is spec.block_seed and ferret.normalize_seed is spec.normalize_seed


def test_pairwise_tree_pairs_absolute_indices():
    big = 2.0**53  # big + 1 rounds back to big: the grouping shows in the result
    v = np.array([1.0, big, 1.0, -big])
    assert spec.pairwise_tree(v, 0) == (1.0 + big) + (1.0 + -big) == 1.0
    # The same values from index 1: nodes (0, 1), (big, 1), (-big, 0) pair up differently.
    assert spec.pairwise_tree(v, 1) == ((0.0 + 1.0) + (big + 1.0)) + (-big + 0.0) == 0.0
    assert spec.pairwise_tree(np.array([3.5]), 7) == 3.5 and spec.pairwise_tree(np.array([]), 0) == 0.0


def test_compress_follows_the_written_order():
    # The order of the docstring, written out element by element for one group and one basis.
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(128) * np.exp(4 * rng.standard_normal(128))).astype(np.float32)
    y = x * spec.rademacher(SEED_ORDER, 0, 128)
    acc = [np.float32(0)] * 4
    for q in range(4):
        for m in range(11):
            a = 32 * q + 3 * m
            t = (y[a] + y[a + 1]) + y[a + 2] if m < 10 else y[a] + y[a + 1]
            acc[m % 4] = np.float32(acc[m % 4] + t)
    assert spec.compress(x, SEED_ORDER, 1)[0] == float((acc[0] + acc[1]) + (acc[2] + acc[3]))


def test_sum_squares_is_the_tree_over_squares():
    x = np.array([2.0**27, 1.0, -(2.0**27), 1.0, 3.0], np.float32)
    sq = x.astype(np.float64) ** 2
    assert spec.sum_squares(x) == ((sq[0] + sq[1]) + (sq[2] + sq[3])) + sq[4]


SEED_ORDER = 0x5EED
