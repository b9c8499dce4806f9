"""The dense Hadamard basis on the Triton backend: coordinates and reconstructions bit-identical to
the spec and the CPU core (full and ragged chunks, segments straddling chunks, row slots, every
dtype, folds of one and of several tree passes, each chunk in its own lane order), run in Triton's
interpreter on CPU tensors (or for real where a GPU is present), through the backend and the
public API."""

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton", reason="the [gpu] extra (triton) is not installed")

import triton.language as tl  # noqa: E402

import ferret  # noqa: E402
from ferret import _core, spec  # noqa: E402
from ferret.backends import Block, TritonBackend  # noqa: E402
from ferret.kernels import hadamard as H  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEED = 0x0DDB_A11_5EED_1234
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (block size n, block Hadamard size B, slot, slots, rows m, segment cuts): full chunks, a ragged
# tail, a block smaller than B, segments straddling chunks, slot 1 of 3, one element; B in
# {1, 2, 8, 64, 128, 256, 1024, 8192}; 5000 chunks of 2, 79 of 64 and 41 of 128 take two tree
# passes; from B = 256 up a chunk's mask moves whole groups of 128 lanes, and at B = 8192 a chunk
# is 64 such groups (masks up to 8191) and two tiles of the apply.
CASES = [
    (1024, 64, 0, 1, 20, [0]),
    (1000, 64, 0, 1, 64, [0, 333, 334]),
    (5000, 1024, 0, 1, 100, [0, 700, 3001]),
    (700, 1024, 1, 3, 40, [0, 350]),
    (50, 8, 1, 3, 2, [0, 5, 21]),
    (9, 2, 0, 1, 2, [0, 3]),
    (10_000, 2, 1, 2, 1, [0, 4095, 4097]),
    (5000, 64, 2, 3, 21, [0, 130, 4100]),
    (1, 1, 0, 1, 1, [0]),
    (300, 1, 0, 1, 1, [0, 100]),
    (1000, 128, 0, 1, 128, [0, 200, 201]),
    (41 * 128 + 5, 128, 1, 2, 30, [0, 2000]),
    (3000, 256, 1, 2, 50, [0, 255, 1500]),
    (3 * 8192 + 777, 8192, 0, 1, 300, [0, 4000, 8200, 20_000]),
]
IDS = [f"n{c[0]}-B{c[1]}-slot{c[2]}of{c[3]}-m{c[4]}" for c in CASES]


def pieces(x, cuts):
    return [(x[a:b], a) for a, b in zip(cuts, cuts[1:] + [x.numel() if torch.is_tensor(x) else len(x)])]


def block_of(segments, n, size, slot, slots, seed=SEED):
    return Block(segments, n, seed, "hadamard", size, slot, slots)


def core_compress(x, cuts, n, size, slot, slots, m, seed=SEED):
    got = np.zeros(m, np.float32)
    segs = pieces(x, cuts)
    _core.dense_compress([p for p, _ in segs], [a for _, a in segs], n, seed, size.bit_length() - 1, slot, slots, got)
    return got


def bits(a):
    return np.asarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n,size,slot,slots,m,cuts", CASES, ids=IDS)
def test_compress_bit_identical_to_spec_and_core(dtype, n, size, slot, slots, m, cuts):
    x = torch.from_numpy(np.random.default_rng(n + m).standard_normal(n).astype(np.float32)).to(DTYPES[dtype])
    want = spec.dense_compress(pieces(x.float().numpy(), cuts), SEED, m, size, slot, slots)
    [got] = TritonBackend().compress([block_of(pieces(x.to(DEVICE), cuts), n, size, slot, slots)], [m])
    assert got.dtype == np.float32 and got.shape == (m,)
    np.testing.assert_array_equal(bits(got), bits(want))
    np.testing.assert_array_equal(bits(got), bits(core_compress(x, cuts, n, size, slot, slots, m)))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n,size,slot,slots,m,cuts", CASES, ids=IDS)
def test_reconstruct_bit_identical_to_spec_and_core(dtype, n, size, slot, slots, m, cuts):
    rng = np.random.default_rng(n * m)
    coords = (rng.standard_normal(m) * 3).astype(np.float32)
    base = rng.standard_normal(n).astype(np.float32)
    base[::7] = -0.0  # the spec's out + 0 turns -0 into +0 where the term is +0
    base = torch.from_numpy(base).to(DTYPES[dtype])
    scale = np.float32(0.3 / m)
    want = torch.from_numpy(spec.dense_reconstruct(coords, SEED, n, scale, size, slot, slots, out=base.float().numpy()))
    on_core = base.clone()
    segs = pieces(on_core, cuts)
    _core.dense_reconstruct([p for p, _ in segs], [a for _, a in segs], n, SEED, size.bit_length() - 1, slot, slots,
                            coords, scale)
    on_triton = base.clone().to(DEVICE)
    TritonBackend().reconstruct([block_of(pieces(on_triton, cuts), n, size, slot, slots)], [coords], [scale])
    got = on_triton.cpu().view(torch.uint8)
    assert torch.equal(got, want.to(DTYPES[dtype]).view(torch.uint8))
    assert torch.equal(got, on_core.view(torch.uint8))


@pytest.mark.parametrize("size,start,n,passes", [(64, 70 * 64 + 5, 270_000, 3), (2, 3, 10_000, 2), (8, 100, 4000, 2),
                                                 (64, 5, 4000, 1), (1024, 0, 1, 1), (128, 100, 70 * 128, 2),
                                                 (256, 31 * 256 + 7, 3 * 256, 2), (8192, 31 * 8192 + 100, 2 * 8192, 2),
                                                 (1, 7, 5000, 2)])
def test_fold_of_one_and_several_tree_passes_is_the_spec_fold(size, start, n, passes):
    """4220 chunks of 64 (64 chunks a pass) starting mid-group take three passes, chunks 31 to 33
    of 128 lanes and more two (32 chunks a pass). The spec's tree may differ from the kernels' in
    nothing but the sign of a zero fold (lost in y = 0 + fold)."""
    per_pass = H.TILE // min(size, H.GROUP)
    c0, c1, taken = start // size, (start + n - 1) // size, 1
    while c0 // per_pass != c1 // per_pass:
        c0, c1, taken = c0 // per_pass, c1 // per_pass, taken + 1
    assert taken == passes
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    got = H.fold(torch.from_numpy(x).to(DEVICE), start, SEED, size).cpu().numpy()
    np.testing.assert_array_equal(got, spec.dense_fold(x, SEED, size, start))
    rows = spec.dense_rows(SEED, size, size)
    coords = H.compress([([(torch.from_numpy(x).to(DEVICE), start)], SEED, size, rows)])
    np.testing.assert_array_equal(bits(coords.cpu()), bits(spec.dense_compress([(x, start)], SEED, size, size)))


@triton.jit
def _masks_of_tile(out_ptr, seed, chunk0, size, BL: tl.constexpr):
    """The masks the kernels give the elements of a tile of 32 rows of 128 whose row r starts chunk
    chunk0 + r * 128 // BL (or lies in it), as the fold and the apply take them."""
    r = tl.arange(0, 32)
    at = r[:, None] * 128 + tl.arange(0, 128)[None, :]
    if BL == 128:
        masks = tl.max(H._mask_table(seed, chunk0 + r, size, BL), axis=1)[:, None] + tl.zeros_like(at)
    else:
        masks = H._spread(H._mask_table(seed, chunk0 + r * 128 // BL, size, BL), BL)
    tl.store(out_ptr + at, masks)


@pytest.mark.parametrize("seed", [SEED, 1, 2**63 - 1])
@pytest.mark.parametrize("size", [2, 8, 64, 128, 1024, 1 << 22])
def test_lane_masks_are_the_spec_masks(seed, size):
    """tl.philox keyed by the seed's two words, counter (c lo32, c hi32, DENSE_LANE_DOMAIN, 0):
    the spec's masks, for chunk indices past 2**32 too."""
    assert H.LANE_DOMAIN == spec.DENSE_LANE_DOMAIN
    lanes = min(size, H.GROUP)
    for chunk0 in (0, 7 * (H.TILE // lanes), (1 << 33) + 5 * (H.TILE // lanes)):
        got = torch.zeros(H.TILE, dtype=torch.int32, device=DEVICE)
        _masks_of_tile[(1,)](got, seed, chunk0, size, BL=lanes)
        want = spec.dense_lanes(seed, chunk0 + np.arange(H.TILE) // lanes, size)
        np.testing.assert_array_equal(got.cpu().numpy(), want)


@pytest.mark.parametrize("size,start,n", [(2, 2**33 + 3, 3000), (64, 2**40 + 1, 5000), (8192, 2**45 + 77, 9000)])
def test_segments_far_into_a_block(size, start, n):
    """Chunk indices past 2**32 (the masks' counter high word) in the fold and the apply."""
    rng = np.random.default_rng(size)
    x = rng.standard_normal(n).astype(np.float32)
    got = H.fold(torch.from_numpy(x).to(DEVICE), start, SEED, size).cpu().numpy()
    np.testing.assert_array_equal(bits(got), bits(spec.dense_fold(x, SEED, size, start)))
    m = min(size, 40)
    rows = spec.dense_rows(SEED, size, m)
    coords = (rng.standard_normal(m) * 3).astype(np.float32)
    scale = np.float32(0.3 / m)
    z = np.zeros(size, np.float32)
    z[rows] = coords
    z = spec.fwht(z)
    i = np.arange(start, start + n, dtype=np.int64)  # dense_reconstruct's formula at block indices i
    lanes = (i & (size - 1)) ^ spec.dense_lanes(SEED, i // size, size)
    want = x + (spec.rademacher(SEED, 0, n, start) * z[lanes]) * scale
    out = torch.from_numpy(x.copy()).to(DEVICE)
    H.reconstruct_([([(out, start)], SEED, size, rows)], torch.from_numpy(coords).to(DEVICE), [float(scale)])
    np.testing.assert_array_equal(bits(out.cpu()), bits(want))


def test_zeros_and_cancellations_give_the_spec_bits():
    """Zero folds (signed zeros, exact cancellations) and zero coordinates: +0 as the spec has them."""
    x = np.zeros(300, np.float32)
    x[::3] = -0.0
    x[100:104] = [1.5, 1.5, -2.0, 2.0]  # cancels in some rows of the transform
    for cuts in ([0], [0, 64, 65]):
        want = spec.dense_compress(pieces(x, cuts), SEED, 64, 64)
        [got] = TritonBackend().compress([block_of(pieces(torch.from_numpy(x).to(DEVICE), cuts), 300, 64, 0, 1)], [64])
        np.testing.assert_array_equal(bits(got), bits(want))
        np.testing.assert_array_equal(bits(got), bits(core_compress(torch.from_numpy(x), cuts, 300, 64, 0, 1, 64)))


def test_transform_is_the_spec_fwht():
    y = (np.random.default_rng(0).standard_normal((3, 256)) * 10.0 ** np.arange(3)[:, None]).astype(np.float32)
    got = H.fwht(torch.from_numpy(y).to(DEVICE)).cpu().numpy()
    for row, want in zip(got, y):
        np.testing.assert_array_equal(bits(row), bits(spec.fwht(want)))
    one = torch.tensor([[2.5]], device=DEVICE)
    assert H.fwht(one).item() == 2.5


def test_a_packet_of_mixed_blocks_and_sizes_in_one_call():
    """Hadamard blocks of two sizes (batched transforms) among Rademacher and SRHT blocks, one
    block with no rows: every block as the core computes it."""
    rng = np.random.default_rng(5)
    xs = [torch.from_numpy(rng.standard_normal(n).astype(np.float32)) for n in (300, 100, 2000, 64, 77, 500)]
    kinds = [("hadamard", 64, 0, 1), ("rademacher", 0, 0, 1), ("hadamard", 1024, 1, 2), ("hadamard", 64, 0, 1),
             ("srht", 64, 0, 1), ("hadamard", 8, 0, 1)]
    counts = [30, 3, 50, 0, 20, 8]
    seeds = [spec.block_seed(SEED, b) for b in range(len(xs))]

    def jobs(bufs):
        return [Block([(x[: x.numel() // 2], 0), (x[x.numel() // 2 :], x.numel() // 2)], x.numel(), s, k, size, c, f)
                for x, s, (k, size, c, f) in zip(bufs, seeds, kinds)]

    from ferret.backends import CoreBackend

    want = CoreBackend().compress(jobs(xs), counts)
    got = TritonBackend().compress(jobs([x.to(DEVICE) for x in xs]), counts)
    for (kind, *_), g, w in zip(kinds, got, want):
        assert g.dtype == w.dtype
        if kind == "rademacher":
            np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_array_equal(bits(g), bits(w))
    coords = [(rng.standard_normal(max(c, 1)) * 2).astype(np.float32)[:c] for c in counts]
    scales = [np.float32(0.5 / max(c, 1)) for c in counts]
    on_core = [x.clone() for x in xs]
    on_triton = [x.clone().to(DEVICE) for x in xs]
    CoreBackend().reconstruct(jobs(on_core), coords, scales)
    TritonBackend().reconstruct(jobs(on_triton), coords, scales)
    for a, b in zip(on_core, on_triton):
        assert torch.equal(a.view(torch.int32), b.cpu().view(torch.int32))


@pytest.mark.parametrize("basis,slot,slots,budget", [("hadamard:64", 0, 1, 40), ("hadamard:64", 1, 3, 30),
                                                     ("hadamard", 0, 1, 200)])
def test_public_api_on_triton_backend_equals_core(basis, slot, slots, budget):
    gen = torch.Generator().manual_seed(3)
    update = {"w": torch.randn(40, 50, generator=gen), "b": torch.randn(700, generator=gen).bfloat16(),
              "c": torch.randn(3, generator=gen)}
    on_device = {k: v.to(DEVICE) for k, v in update.items()}
    for grouping in ("tensor", 1500):
        kwargs = dict(seed=9, budget=budget, basis=basis, grouping=grouping, slot=slot, slots=slots)
        on_core = ferret.compress(update, **kwargs)
        on_triton = ferret.compress(on_device, backend="triton", **kwargs)
        assert on_core == on_triton  # the same packet: coordinates identical bit for bit
        np.testing.assert_array_equal(bits(on_core.coords), bits(on_triton.coords))
        a = ferret.reconstruct(on_core, like=update, scale=0.7)
        b = ferret.reconstruct(on_core, like=on_device, scale=0.7, backend="triton")
        assert all(torch.equal(a[k].view(torch.uint8), b[k].cpu().view(torch.uint8)) for k in update)
        into_core = {k: v.clone() for k, v in update.items()}
        into_triton = {k: v.clone() for k, v in on_device.items()}
        ferret.reconstruct(on_core, into=into_core, scale=-0.25)
        ferret.reconstruct(on_core, into=into_triton, scale=-0.25, backend="triton")
        assert all(torch.equal(into_core[k].view(torch.uint8), into_triton[k].cpu().view(torch.uint8))
                   for k in update)


def test_bad_buffers_are_refused():
    with pytest.raises(ValueError, match="1-d contiguous"):
        H.fold(torch.zeros(4, 4, device=DEVICE), 0, 1, 4)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        TritonBackend().compress([block_of([(torch.zeros(4, dtype=torch.float64, device=DEVICE), 0)], 4, 4, 0, 1)],
                                 [2])
    rows = np.zeros(1, dtype=np.int64)
    with pytest.raises(ValueError, match="1-d contiguous"):
        H.reconstruct_([([(torch.zeros(4, 4, device=DEVICE)[:, 0], 0)], 1, 4, rows)], torch.ones(1, device=DEVICE),
                       [1.0])


def test_a_merged_packet_of_every_slots_rows_rebuilds_as_on_the_core():
    """A version-3 broadcast (each slot's rows named per block) rebuilt by the kernels from the
    rows the host names: the core's bits."""
    gen = torch.Generator().manual_seed(4)
    updates = [{"w": torch.randn(40, 30, generator=gen), "b": torch.randn(30, generator=gen)} for _ in range(3)]
    packets = [ferret.compress(u, seed=8, budget=b, basis="hadamard", slot=i, slots=3)
               for i, (u, b) in enumerate(zip(updates, (40, 60, 25)))]
    merged = ferret.merge_packets(packets, [0.5, 0.3, 0.2])
    assert merged.slot_counts is not None
    on_core = ferret.reconstruct(merged, like=updates[0], scale=0.7)
    on_triton = ferret.reconstruct(merged, like={k: v.to(DEVICE) for k, v in updates[0].items()}, scale=0.7,
                                   backend="triton")
    assert all(torch.equal(on_core[k].view(torch.int32), on_triton[k].cpu().view(torch.int32)) for k in on_core)
