"""The dense Hadamard basis: its spec against a matrix built from the definition, the C++ core
bit-identical to the spec (every dtype, split blocks, row slots, both instruction sets, any
thread count), unbiased reconstruction with the error theory predicts for full and ragged
chunks, versioned packets, disjoint row slots that merge into one packet, and bad input refused
with nothing written."""

import struct
import zlib

import numpy as np
import pytest
import torch

import ferret
from ferret import _core, spec
from ferret.basis import dense_size, parse_basis
from ferret.packet import PacketError

SEED = 0xD0_5E_1F
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (block size n, Hadamard size S, slots F, slot c, rows m): full chunks, a ragged tail, a block
# smaller than S, one chunk of 2, the largest slot of several, every row of a slot, chunks of
# several 16384-element tiles
CASES = [(1024, 64, 1, 0, 10), (1000, 64, 3, 2, 7), (100, 256, 1, 0, 20), (70_000, 1024, 4, 1, 200),
         (77, 8, 2, 1, 4), (5, 2, 1, 0, 2), (300, 64, 1, 0, 64), (300_001, 32768, 2, 1, 50)]


def sylvester(size: int) -> np.ndarray:
    r = np.arange(size)
    parity = np.vectorize(lambda v: bin(v).count("1") % 2)(r[:, None] & r[None, :])
    return np.where(parity, -1.0, 1.0)


def dense_matrix(seed: int, n: int, size: int, m: int, slot: int = 0, slots: int = 1) -> np.ndarray:
    """The (m, n) matrix whose row k is basis v_k, from the definition:
    v_k[i] = d_i H[r_k, (i mod B) xor s_c] for element i of chunk c."""
    block = spec.dense_block_size(size, n, slots)
    rows = spec.dense_rows(seed, block, m, slot, slots)
    signs = spec.rademacher(seed, 0, n).astype(np.float64)
    i = np.arange(n)
    lanes = np.array([(j % block) ^ int(spec.dense_lanes(seed, [j // block], block)[0]) for j in i])
    return sylvester(block)[rows][:, lanes] * signs


def segments(x, cuts):
    return [(x[a:b], a) for a, b in zip(cuts, cuts[1:] + [len(x)])]


@pytest.mark.parametrize("n,size,slots,slot,m", CASES[:-1])  # the last one's matrix would take 8 GiB
def test_spec_matches_the_explicit_matrix(n, size, slots, slot, m):
    block = spec.dense_block_size(size, n, slots)
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    matrix = dense_matrix(SEED, n, size, m, slot, slots)
    coords = spec.dense_compress(segments(x, [0, n // 3]), SEED, m, block, slot, slots)
    np.testing.assert_allclose(coords, matrix @ x, rtol=1e-5, atol=1e-4)
    rebuilt = spec.dense_reconstruct(coords, SEED, n, np.float32(1 / m), block, slot, slots)
    np.testing.assert_allclose(rebuilt, coords.astype(np.float64) @ matrix / m, rtol=1e-5, atol=1e-5)
    assert np.all(np.abs(matrix) == 1)  # every basis moves every weight


def test_block_sizes_rows_and_slots():
    assert [spec.dense_block_size(1024, n) for n in (1, 2, 3, 1000, 1024, 5000)] == [1, 2, 4, 1024, 1024, 1024]
    assert spec.dense_block_size(1024, 3, slots=5) == 8  # room for every slot's first row
    assert [spec.dense_slot_rows(64, c, 3) for c in range(3)] == [22, 21, 21]
    full = spec.srht_rows(SEED, 64, 64)
    slots = [spec.dense_rows(SEED, 64, spec.dense_slot_rows(64, c, 3), c, 3) for c in range(3)]
    assert sorted(np.concatenate(slots).tolist()) == list(range(64))  # disjoint, and all of them
    for c, rows in enumerate(slots):
        np.testing.assert_array_equal(rows, full[c::3])
        np.testing.assert_array_equal(spec.dense_rows(SEED, 64, 5, c, 3), rows[:5])  # prefixes agree
        got = np.zeros(rows.size, np.int64)
        _core.dense_rows(SEED, 6, c, 3, got)
        np.testing.assert_array_equal(got, rows)
    with pytest.raises(ValueError, match="slot 2 of 3 holds 21 of 64 rows; 22 were asked for"):
        spec.dense_rows(SEED, 64, 22, 2, 3)


def test_rows_of_full_chunks_are_orthogonal_and_every_row_rebuilds_exactly():
    n, size = 256, 64
    matrix = dense_matrix(SEED, n, size, size)
    np.testing.assert_array_equal(matrix @ matrix.T, n * np.eye(size))
    lanes = spec.dense_lanes(SEED, np.arange(n // size), size)
    assert len(set(lanes.tolist())) > 1  # every chunk its own order of lanes
    x = np.random.default_rng(2).standard_normal(n).astype(np.float32)
    coords = spec.dense_compress([(x, 0)], SEED, size, size)
    # every row: the estimate is the projection onto the rows' span, scaled by n / B
    rebuilt = spec.dense_reconstruct(coords, SEED, n, np.float32(1 / n), size)
    np.testing.assert_allclose(rebuilt, matrix.T @ (matrix @ x) / n, rtol=1e-4, atol=1e-5)
    ragged = dense_matrix(SEED, 100, 64, 64)
    gram = ragged @ ragged.T
    assert np.all(np.diag(gram) == 100) and np.any(gram - np.diag(np.diag(gram)))  # the tail breaks orthogonality


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n,size,slots,slot,m", CASES)
def test_core_compress_is_bit_identical_to_spec(dtype, n, size, slots, slot, m):
    block = spec.dense_block_size(size, n, slots)
    x = torch.from_numpy(np.random.default_rng(m).standard_normal(n).astype(np.float32)).to(DTYPES[dtype])
    for cuts in ([0], [0, n // 3, n // 3 + 1] if n > 3 else [0, 1]):  # segments straddling chunks
        want = spec.dense_compress(segments(x.float().numpy(), cuts), SEED, m, block, slot, slots)
        got = np.zeros(m, np.float32)
        pieces = segments(x, cuts)
        _core.dense_compress([p for p, _ in pieces], [a for _, a in pieces], n, SEED, block.bit_length() - 1, slot,
                             slots, got)
        np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n,size,slots,slot,m", CASES)
def test_core_reconstruct_is_bit_identical_to_spec(dtype, n, size, slots, slot, m):
    block = spec.dense_block_size(size, n, slots)
    rng = np.random.default_rng(n + m)
    coords = (rng.standard_normal(m) * 3).astype(np.float32)
    base = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(DTYPES[dtype])
    scale = np.float32(0.3 / m)
    want = spec.dense_reconstruct(coords, SEED, n, scale, block, slot, slots, out=base.float().numpy())
    got = base.clone()
    cuts = [0, n // 2] if n > 1 else [0]
    pieces = segments(got, cuts)
    _core.dense_reconstruct([p for p, _ in pieces], [a for _, a in pieces], n, SEED, block.bit_length() - 1, slot,
                            slots, coords, scale)
    assert torch.equal(got.view(torch.uint8), torch.from_numpy(want).to(DTYPES[dtype]).view(torch.uint8))


def test_core_results_do_not_depend_on_threads_or_instruction_set():
    n, m, log2 = 1_000_003, 300, 12  # 245 full chunks and a ragged one, on several threads' pieces
    x = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    want = spec.dense_compress([(x[:400_000], 0), (x[400_000:], 400_000)], SEED, m, 1 << log2)
    results = []
    old = _core.num_threads()
    try:
        for threads, portable in ((1, False), (2, False), (2, True), (1, True)):
            _core.set_num_threads(threads)
            was = _core.force_portable(portable)
            coords = np.zeros(m, np.float32)
            _core.dense_compress([x[:400_000], x[400_000:]], [0, 400_000], n, SEED, log2, 0, 1, coords)
            out = x.copy()
            _core.dense_reconstruct([out], [0], n, SEED, log2, 0, 1, coords, 0.5)
            _core.force_portable(was)
            results.append((coords, out))
    finally:
        _core.set_num_threads(old)
    np.testing.assert_array_equal(results[0][0], want)
    np.testing.assert_array_equal(results[0][1], spec.dense_reconstruct(want, SEED, n, np.float32(0.5), 1 << log2,
                                                                        out=x))
    for coords, out in results[1:]:
        np.testing.assert_array_equal(coords, results[0][0])
        np.testing.assert_array_equal(out, results[0][1])


def _mean_and_error(basis, x, m, seeds):
    total, sq_error = torch.zeros_like(x, dtype=torch.float64), 0.0
    for s in range(seeds):
        est = ferret.reconstruct(ferret.compress(x, seed=s, budget=m, basis=basis), like=x)
        total += est.double()
        sq_error += float(torch.sum((est.double() - x.double()) ** 2))
    return total / seeds, sq_error / seeds


@pytest.mark.parametrize("n,size,m", [(1024, 64, 16), (100, 64, 32)])
def test_reconstruction_is_unbiased_with_the_error_theory_predicts(n, size, m):
    seeds = 2000
    x = np.random.default_rng(4).standard_normal(n)
    tail = n % size
    x[n - tail :] *= 5  # energy in the ragged tail: its term is 19% here
    x = torch.from_numpy(x.astype(np.float32))
    norm2 = float(torch.sum(x.double() ** 2))
    predicted = (n / m - 1) * norm2
    if tail:  # the spec's term for a last chunk of `tail` < B elements
        predicted += (m - 1) * size / (m * (size - 1)) * (1 - tail / size) * float(torch.sum(x.double()[n - tail :] ** 2))
    mean, error = _mean_and_error(f"hadamard:{size}", x, m, seeds)
    assert abs(error / predicted - 1) < 0.05, (error, predicted)
    bias2 = float(torch.sum((mean - x.double()) ** 2))  # E|mean - x|^2 = predicted / seeds
    assert 0.8 < bias2 / (predicted / seeds) < 1.25, (bias2, predicted / seeds)


def test_public_api_picks_the_size_and_packets_round_trip():
    model = {"w": torch.randn(300, 70), "b": torch.randn(70), "e": torch.randn(5000, 3)}
    packet = ferret.compress(model, seed=3, budget=600, basis="hadamard")
    assert packet.basis == "hadamard:1024" == f"hadamard:{dense_size(600)}" and (packet.slot, packet.slots) == (0, 1)
    assert packet.counts.sum() == 600 and packet.counts[1] <= 64  # "b": a block of 70 has a Hadamard size of 128
    wire = packet.to_bytes()
    assert struct.unpack_from("<H", wire, 4)[0] == 2 and ferret.Packet.from_bytes(wire) == packet
    assert ferret.compress(model, seed=3, budget=3000, basis="hadamard").basis == "hadamard:4096"
    assert ferret.compress(model, seed=3, budget=600, basis="hadamard", slot=1, slots=4).basis == "hadamard:4096"
    x = torch.randn(64)  # every row of a full chunk: the estimate is exact
    torch.testing.assert_close(ferret.reconstruct(ferret.compress(x, seed=3, budget=64, basis="hadamard"), like=x), x,
                               rtol=1e-5, atol=1e-5)


def test_older_packets_keep_their_bytes_and_unknown_versions_are_refused():
    x = torch.randn(20)
    packet = ferret.compress(x, seed=5, budget=3)
    head = struct.pack("<4sHBBQQ16sI", b"FRPK", 1, 0, 0, 5, 0, packet.fingerprint, 1)
    body = head + struct.pack("<I", 3) + packet.coords.astype("<f4").tobytes()
    assert packet.to_bytes() == body + struct.pack("<I", zlib.crc32(body))  # version 1, as before
    dense = ferret.compress(x, seed=5, budget=3, basis="hadamard:8", slot=1, slots=2).to_bytes()

    def forged(raw, at, fmt, value):
        raw = bytearray(raw)
        struct.pack_into(fmt, raw, at, value)
        return bytes(raw[:-4]) + struct.pack("<I", zlib.crc32(bytes(raw[:-4])))

    with pytest.raises(PacketError, match="packet version 4 is not supported .* upgrade ferret"):
        ferret.Packet.from_bytes(forged(dense, 4, "<H", 4))
    with pytest.raises(PacketError, match="packet length does not match its counts"):  # version 3: no slot counts
        ferret.Packet.from_bytes(forged(dense, 4, "<H", 3))
    with pytest.raises(PacketError, match="basis code 3 is not known to packet version 1"):
        ferret.Packet.from_bytes(forged(dense, 4, "<H", 1))
    with pytest.raises(PacketError, match="basis code 0 is not known to packet version 2"):
        ferret.Packet.from_bytes(forged(dense, 6, "<B", 0))
    with pytest.raises(PacketError, match="row slot 2 of 2"):
        ferret.Packet.from_bytes(forged(dense, 48, "<I", 2))
    with pytest.raises(PacketError, match="packet truncated"):
        ferret.Packet.split(dense[:50])
    assert [p.slot for p in ferret.Packet.split(dense + packet.to_bytes() + dense)] == [1, 0, 1]


def test_disjoint_slots_merge_into_one_packet_of_every_clients_rows():
    updates = [{"w": torch.randn(40, 30), "b": torch.randn(30)} for _ in range(3)]
    packets = [ferret.compress(u, seed=8, budget=b, basis="hadamard", slot=i, slots=3)
               for i, (u, b) in enumerate(zip(updates, (40, 60, 25)))]
    assert len({p.basis for p in packets}) == 1
    weights = [0.5, 0.3, 0.2]
    merged = ferret.merge_packets(packets, weights)
    # exactly the clients' rows, each slot's named (version 3): no place for rows nobody sent
    assert (merged.slot, merged.slots) == (0, 3) and merged.slot_counts is not None
    assert merged.coords.size == sum(p.coords.size for p in packets)
    np.testing.assert_array_equal(merged.slot_counts, np.stack([p.counts for p in packets], axis=1))
    assert ferret.Packet.from_bytes(merged.to_bytes()) == merged
    rebuilt = ferret.reconstruct(merged, like=updates[0])
    for name in updates[0]:
        mean = sum(w * ferret.reconstruct(p, like=updates[0])[name] for w, p in zip(weights, packets))
        torch.testing.assert_close(rebuilt[name], mean, rtol=1e-5, atol=1e-5)
    # over full chunks, one slot's bases are orthogonal to another's
    x = torch.randn(64)
    a = ferret.compress(x, seed=1, budget=10, basis="hadamard:64", slot=0, slots=2)
    b = ferret.compress(x, seed=1, budget=10, basis="hadamard:64", slot=1, slots=2)
    va, vb = (dense_matrix(ferret.spec.block_seed(1, 0), 64, 64, 10, s, 2) for s in (0, 1))
    np.testing.assert_array_equal(va @ vb.T, np.zeros((10, 10)))
    assert not np.array_equal(a.coords, b.coords)
    same_slot = ferret.merge_packets([a, a])
    assert (same_slot.slot, same_slot.slots) == (0, 2) and np.array_equal(same_slot.coords, a.coords)
    both = ferret.merge_packets([a, b])  # as many rows each: the first 20 of slot 0 of 1
    assert (both.slot, both.slots, both.slot_counts) == (0, 1, None) and both.coords.size == 20


def test_merge_refuses_mixed_slot_counts_and_rows_beyond_a_slot():
    x = torch.randn(64)
    a = ferret.compress(x, seed=1, budget=10, basis="hadamard:64", slot=0, slots=2)
    c = ferret.compress(x, seed=1, budget=10, basis="hadamard:64", slot=0, slots=3)
    with pytest.raises(PacketError, match="number of row slots"):
        ferret.merge_packets([a, c])
    hostile = ferret.Packet(a.round_seed, a.basis, a.group_size, a.fingerprint, [33], np.ones(33), 1, 2)
    with pytest.raises(PacketError, match="packet 1 holds more coordinates in a block than slot 1 of 2 has rows"):
        ferret.merge_packets([a, hostile])
    out = torch.ones(64)
    with pytest.raises(PacketError, match="at most 32 rows under hadamard:64 \\(slot 1 of 2\\)"):
        ferret.reconstruct(hostile, into=out)
    assert torch.equal(out, torch.ones(64))


@pytest.mark.parametrize("name,message", [
    ("hadamard:3", "power of two from 2 to 4194304"), ("hadamard:8388608", "power of two from 2 to 4194304"),
    ("hadamard:1", "power of two"), ("hadamard:", "power of two"), ("hadamard:x", "power of two"),
    ("hadamards", "unknown basis"),
])
def test_bad_hadamard_sizes_are_refused(name, message):
    with pytest.raises(ValueError, match=message):
        parse_basis(name)
    with pytest.raises(ValueError, match=message):
        ferret.compress(torch.randn(100), seed=0, budget=4, basis=name)


def test_bad_budgets_slots_and_uses_are_refused():
    x = torch.randn(100)
    with pytest.raises(ValueError, match="exceeds the 64 rows"):  # a block of 100 at size 64 has 64 rows
        ferret.compress(x, seed=0, budget=65, basis="hadamard:64")
    with pytest.raises(ValueError, match="exceeds the 100 rows"):  # and never more than its elements
        ferret.compress(x, seed=0, budget=101, basis="hadamard:1024")
    with pytest.raises(ValueError, match="exceeds the 21 rows"):  # slot 2 of 3 at size 64
        ferret.compress(x, seed=0, budget=22, basis="hadamard:64", slot=2, slots=3)
    with pytest.raises(ValueError, match="needs a Hadamard size of 8388608, above the largest"):
        ferret.compress(torch.randn(5_000_000), seed=0, budget=4_200_000, basis="hadamard")
    with pytest.raises(ValueError, match="slot must be one of 0 .. slots - 1"):
        ferret.compress(x, seed=0, budget=4, basis="hadamard", slot=3, slots=3)
    with pytest.raises(TypeError, match="slot must be an int"):
        ferret.compress(x, seed=0, budget=4, basis="hadamard", slot=1.0, slots=3)
    with pytest.raises(ValueError, match="disjoint row slots need the 'hadamard' basis"):
        ferret.compress(x, seed=0, budget=4, basis="rademacher", slot=0, slots=2)
    with pytest.raises(ValueError, match="empty block"):
        ferret.compress({"a": torch.zeros(0), "b": torch.ones(4)}, seed=0, budget=2, basis="hadamard")
    with pytest.raises(ValueError, match="'hadamard' is a projection basis"):
        ferret.perturb(torch.zeros(10), seed=0, eps=1e-3, basis="hadamard")
    with pytest.raises(ValueError, match="NaN or Inf"):  # one block: no norm is read, the coordinates catch it
        ferret.compress(torch.tensor([1.0, float("nan"), 2.0]), seed=0, budget=2, basis="hadamard")
    with pytest.raises(PacketError, match="names its Hadamard size"):
        ferret.Packet(1, "hadamard", 0, bytes(16), [1], np.ones(1))
    with pytest.raises(PacketError, match="only hadamard packets take row slots"):
        ferret.Packet(1, "rademacher", 0, bytes(16), [1], np.ones(1), 0, 2)
    with pytest.raises(ValueError, match="slot 0 of 1 holds 4 rows of a Hadamard size of 4; 5 were asked for"):
        _core.dense_compress([np.zeros(10, np.float32)], [0], 10, 0, 2, 0, 1, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="the Hadamard size must be 2\\^0 .. 2\\^22, got 2\\^23"):
        _core.dense_compress([np.zeros(10, np.float32)], [0], 10, 0, 23, 0, 1, np.zeros(1, np.float32))


def test_many_blocks_in_one_call_equal_one_call_each():
    rng = np.random.default_rng(7)
    jobs, want = [], []
    for n, log2, slot, slots, m in [(100, 6, 0, 1, 7), (70_000, 10, 1, 3, 40), (1, 0, 0, 1, 1), (300_001, 15, 0, 1, 9)]:
        x = rng.standard_normal(n).astype(np.float32)
        single = np.zeros(m, np.float32)
        _core.dense_compress([x[: n // 2], x[n // 2 :]], [0, n // 2], n, SEED + n, log2, slot, slots, single)
        want.append(single)
        jobs.append(([x[: n // 2], x[n // 2 :]], [0, n // 2], n, SEED + n, log2, slot, slots, np.zeros(m, np.float32)))
    _core.dense_compress_many(jobs)
    for job, single in zip(jobs, want):
        np.testing.assert_array_equal(job[7], single)
    bad = [jobs[0], (jobs[1][0], jobs[1][1], jobs[1][2], SEED, 10, 3, 3, np.zeros(1, np.float32))]
    jobs[0][7][:] = -1.0
    with pytest.raises(ValueError, match="slot 3 is not one of 0 .. 2"):
        _core.dense_compress_many(bad)  # every job is checked before any is run
    assert np.all(jobs[0][7] == -1.0)


@pytest.mark.parametrize("size,n,cuts,dtype", [(4096, 10_000, [0], "fp32"), (64, 1000, [0, 128], "fp32"),
                                               (8, 77, [0], "bf16"), (1 << 17, 300_000, [0, 1 << 17], "fp32"),
                                               (256, 256 * 40 + 3, [0, 512, 1024], "bf16"), (128, 129, [0], "fp16")])
def test_fold_then_pick_is_compress_and_gives_each_segments_sum_of_squares(size, n, cuts, dtype):
    """The two steps of a norm-allocated dense compress: the fold with every segment's sum of
    squares from the same read (bit for bit sum_squares and the spec: chunks are aligned subtrees
    of a segment that starts on one), then the rows: the coordinates of dense_compress."""
    rng = np.random.default_rng(size + n)
    x = torch.from_numpy((rng.standard_normal(n) * np.exp(rng.standard_normal(n))).astype(np.float32)).to(DTYPES[dtype])
    segments = [(x[a:b], a) for a, b in zip(cuts, cuts[1:] + [n])]
    xs, starts, log2, m = [p for p, _ in segments], [a for _, a in segments], size.bit_length() - 1, min(size // 2, 50)
    want = np.zeros(m, np.float32)
    _core.dense_compress(xs, starts, n, SEED, log2, 1, 2, want)
    fold, squares = np.zeros(size, np.float32), np.zeros(len(segments))
    _core.dense_fold_many([(xs, starts, n, SEED, log2, fold, squares)])
    got = np.zeros(m, np.float32)
    _core.dense_pick_many([(SEED, log2, 1, 2, fold, got)])
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    for (piece, _), total in zip(segments, squares):
        assert total == _core.sum_squares(piece) == spec.sum_squares(piece.float().numpy())


def test_a_segment_off_a_chunk_gets_no_fused_squares_and_nothing_is_written():
    x = np.ones(100, np.float32)
    fold, squares = np.full(8, 7.0, np.float32), np.full(1, 7.0)
    with pytest.raises(ValueError, match="starts on a chunk \\(start 3, Hadamard size 8\\)"):
        _core.dense_fold_many([([x], [3], 103, SEED, 3, fold, squares)])
    assert np.all(fold == 7.0) and np.all(squares == 7.0)


def test_norm_allocation_reads_a_dense_update_once_on_the_core(monkeypatch):
    """With one tensor a block, the norms come from the fold's own read: the packet of the
    separate sum-of-squares pass (Triton's path, and the core's for blocks of several tensors),
    with no call to it."""
    from ferret import backends

    gen = torch.Generator().manual_seed(1)
    update = {"w": torch.randn(300, 70, generator=gen), "b": torch.randn(70, generator=gen).bfloat16() * 10,
              "n": torch.randn(700, generator=gen)}
    with monkeypatch.context() as patch:
        patch.setattr(backends, "FUSED_FOLDS", 0)  # no room for the folds: the separate pass
        separate = ferret.compress(update, seed=4, budget=400, basis="hadamard:256")
    monkeypatch.setattr(backends.CoreBackend, "sum_squares", lambda self, flats: pytest.fail("a second read"))
    fused = ferret.compress(update, seed=4, budget=400, basis="hadamard:256")
    assert fused.to_bytes() == separate.to_bytes()


def test_many_reconstructions_in_one_call_equal_one_call_each_and_bad_jobs_write_nothing():
    rng = np.random.default_rng(8)
    jobs, want = [], []
    for n, log2, slot, slots, m in [(100, 6, 0, 1, 7), (70_000, 10, 1, 3, 40), (1, 0, 0, 1, 1), (300_001, 15, 0, 1, 9)]:
        base = rng.standard_normal(n).astype(np.float32)
        coords = rng.standard_normal(m).astype(np.float32)
        single = base.copy()
        _core.dense_reconstruct([single[: n // 2], single[n // 2 :]], [0, n // 2], n, SEED + n, log2, slot, slots,
                                coords, 0.3)
        want.append(single)
        out = base.copy()
        jobs.append(([out[: n // 2], out[n // 2 :]], [0, n // 2], n, SEED + n, log2, slot, slots, coords, 0.3))
    before = [np.concatenate(job[0]).copy() for job in jobs]
    bad = jobs[:2] + [(jobs[2][0], jobs[2][1], jobs[2][2], SEED, 0, 1, 1, np.zeros(1, np.float32), 0.3)]
    with pytest.raises(ValueError, match="slot 1 is not one of 0 .. 0"):
        _core.dense_reconstruct_many(bad)  # every job is checked before any is run
    assert all(np.array_equal(np.concatenate(job[0]), b) for job, b in zip(jobs, before))
    _core.dense_reconstruct_many(jobs)
    for job, single in zip(jobs, want):
        np.testing.assert_array_equal(np.concatenate(job[0]), single)
