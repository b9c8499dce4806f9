"""The public API: round trips, layouts, allocation, packets, statistics of the estimator, and
every bad input refused with a clear message and nothing changed."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ferret
from ferret import Layout, Packet, PacketError


def update_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"embed": torch.randn(64, 32, generator=g), "attn.q": torch.randn(32, 32, generator=g),
            "norm": torch.randn(32, generator=g), "mlp": torch.randn(32, 96, generator=g)}


# ---- round trips and containers --------------------------------------------------------------

def test_state_dict_round_trip_through_bytes():
    update = update_dict()
    packet = ferret.compress(update, seed=5, budget=64)
    decoded = Packet.from_bytes(packet.to_bytes())
    assert decoded == packet and decoded.counts.sum() == 64
    a = ferret.reconstruct(packet, like=update)
    b = ferret.reconstruct(decoded, like=update)
    assert a.keys() == update.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_containers_give_the_same_packet():
    update = update_dict()
    as_dict = ferret.compress(update, seed=1, budget=20)
    as_pairs = ferret.compress(list(update.items()), seed=1, budget=20)
    as_numpy = ferret.compress({k: v.numpy() for k, v in update.items()}, seed=1, budget=20)
    assert as_dict == as_pairs == as_numpy


def test_named_parameters_and_in_place_scale():
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
    update = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    packet = ferret.compress(update, seed=3, budget=10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ferret.reconstruct(packet, into=model.named_parameters(), scale=-0.5)
    delta = ferret.reconstruct(packet, like=update)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach() - before[n], -0.5 * delta[n], rtol=1e-5, atol=1e-6)


def test_single_tensor_and_array_return_their_kind():
    t = torch.randn(300)
    assert isinstance(ferret.reconstruct(ferret.compress(t, 0, 4), like=t), torch.Tensor)
    a = np.random.default_rng(0).standard_normal((10, 30)).astype(np.float32)
    out = ferret.reconstruct(ferret.compress(a, 0, 4), like=a)
    assert isinstance(out, np.ndarray) and out.shape == (10, 30)


def test_reconstruct_from_layout_object():
    update = update_dict()
    packet = ferret.compress(update, seed=2, budget=16, grouping="paper")
    layout = Layout.of(update, grouping="paper")
    got = ferret.reconstruct(packet, like=layout)
    want = ferret.reconstruct(packet, like=update)
    assert all(torch.equal(got[k], want[k]) for k in update)


def test_bf16_and_fp16_updates_and_parameters():
    update = {k: v.bfloat16() for k, v in update_dict().items()}
    packet = ferret.compress(update, seed=4, budget=32)
    params = {k: torch.zeros_like(v, dtype=torch.float16) for k, v in update.items()}
    ferret.reconstruct(packet, into=params)
    full = ferret.reconstruct(packet, like=update)
    assert all(torch.equal(params[k], full[k].half()) for k in update)


def test_compress_is_deterministic_and_seeded():
    update = update_dict()
    assert ferret.compress(update, 7, 40) == ferret.compress(update, 7, 40)
    assert ferret.compress(update, 7, 40) != ferret.compress(update, 8, 40)
    assert ferret.compress(update, -1, 40) == ferret.compress(update, 2**63 - 1, 40)


def test_compress_does_not_copy_or_modify_the_update():
    update = update_dict()
    before = {k: v.clone() for k, v in update.items()}
    ferret.compress(update, 0, 8)
    assert all(torch.equal(update[k], before[k]) for k in update)


# ---- layout and allocation -------------------------------------------------------------------

def test_paper_grouping_follows_the_official_rule():
    sizes = [100, 100, 300, 50, 50, 50, 400, 10]
    shapes = [(f"t{i}", (s,)) for i, s in enumerate(sizes)]
    layout = Layout(shapes, group_size=120)  # pack while the block stays <= 120; big tensors alone
    assert [e.block for e in layout.entries] == [0, 1, 2, 3, 3, 4, 5, 6]
    assert layout.block_sizes == (100, 100, 300, 100, 50, 400, 10)
    assert [e.offset for e in layout.entries][3:5] == [0, 50]
    paper = Layout.of({n: torch.zeros(s) for n, s in shapes}, grouping="paper")
    assert paper.group_size == int(0.9 * np.median(sizes)) == 67


def test_layout_fingerprint_depends_on_names_shapes_and_grouping():
    a = Layout([("w", (4, 4))])
    assert a == Layout([("w", (4, 4))])
    assert a != Layout([("w", (16,))]) and a != Layout([("v", (4, 4))]) and a != Layout([("w", (4, 4))], 8)


def test_uniform_and_norm_allocation():
    assert ferret.allocate(10, 3, "uniform").tolist() == [4, 3, 3]
    counts = ferret.allocate(100, 3, "norm", [0.0, 1.0, 3.0])
    assert counts.sum() == 100 and counts[0] == 2 and counts[2] > 2.5 * counts[1]
    assert ferret.allocate(4, 3, "norm", [1.0, 0.0, 0.0]).tolist() == [2, 1, 1]  # floor drops to 1
    assert ferret.allocate(6, 2, "norm", [0.0, 0.0]).tolist() == [3, 3]


def test_norm_allocation_favours_large_blocks_in_packets():
    update = {"big": torch.randn(4000) * 10, "small": torch.randn(4000) * 0.1}
    packet = ferret.compress(update, 0, 100, allocation="norm")
    assert packet.counts.tolist() == [96, 4] or packet.counts[0] > 90


# ---- statistics of the estimator ---------------------------------------------------------------

@pytest.mark.parametrize("basis,excess", [("rademacher", -1), ("gaussian", 1)])
def test_reconstruction_is_unbiased_with_theoretical_error(basis, excess):
    d, n, trials = 64, 8, 3000
    delta = torch.randn(d, generator=torch.Generator().manual_seed(0))
    norm2 = float(delta.double().pow(2).sum())
    estimates = torch.stack([ferret.reconstruct(ferret.compress(delta, s, n, basis=basis), like=delta)
                             for s in range(trials)]).double()
    # Mean: every coordinate within 5 standard errors (variance <= ||Δ||² (1 + 2/d) / n per coordinate).
    stderr = np.sqrt(norm2 * 1.1 / n / trials)
    assert float((estimates.mean(0) - delta.double()).abs().max()) < 5 * stderr
    # Mean squared error: (d - 1)/n ||Δ||² for Rademacher, (d + 1)/n ||Δ||² for Gaussian.
    mse = float((estimates - delta.double()).pow(2).sum(1).mean())
    assert mse == pytest.approx((d + excess) / n * norm2, rel=0.06)


# ---- bad input ---------------------------------------------------------------------------------

def test_packet_for_another_layout_is_refused_and_nothing_changes():
    packet = ferret.compress(update_dict(), 0, 16)
    params = {k: torch.zeros_like(v) for k, v in update_dict().items()}
    params["mlp"] = torch.zeros(32, 95)
    with pytest.raises(PacketError, match="another layout or model"):
        ferret.reconstruct(packet, into=params)
    assert all(float(v.abs().sum()) == 0 for v in params.values())
    with pytest.raises(PacketError, match="another layout"):
        ferret.reconstruct(packet, like=Layout.of(update_dict(), grouping="paper"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "magic", "version", "empty"])
def test_damaged_bytes_are_refused(damage):
    data = bytearray(ferret.compress(update_dict(), 0, 16).to_bytes())
    if damage == "truncate":
        data = data[:-7]
    elif damage == "flip":
        data[60] ^= 0x10
    elif damage == "magic":
        data[0:4] = b"NOPE"
    elif damage == "version":
        data[4] = 9
    else:
        data = b""
    with pytest.raises(PacketError):
        Packet.from_bytes(bytes(data))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("allocation", ["norm", "uniform"])
def test_non_finite_updates_are_refused_by_name(bad, allocation):
    update = update_dict()
    update["attn.q"][3, 4] = bad
    with pytest.raises(ValueError, match="NaN or Inf.*attn.q"):
        ferret.compress(update, 0, 16, allocation=allocation)


def test_bad_dtypes_devices_and_containers():
    with pytest.raises(TypeError, match="float64"):
        ferret.compress(torch.zeros(10, dtype=torch.float64), 0, 2)
    with pytest.raises(TypeError, match="int64"):
        ferret.compress({"a": torch.zeros(10, dtype=torch.int64)}, 0, 2)
    with pytest.raises(TypeError, match="not a tensor"):
        ferret.compress({"a": [1.0, 2.0]}, 0, 2)
    with pytest.raises(TypeError, match="iterable of"):
        ferret.compress(3.0, 0, 2)
    with pytest.raises(ValueError, match="devices"):
        ferret.compress({"a": torch.zeros(4), "b": torch.zeros(4, device="meta")}, 0, 2)
    packet = ferret.compress(torch.zeros(10), 0, 2)
    with pytest.raises(TypeError, match="float32, bfloat16 and float16"):
        ferret.reconstruct(packet, into=torch.zeros(10, dtype=torch.float64))


def test_budget_below_block_count_and_unknown_options():
    with pytest.raises(ValueError, match="below the number of blocks"):
        ferret.compress(update_dict(), 0, 3)
    with pytest.raises(ValueError, match="unknown allocation"):
        ferret.compress(update_dict(), 0, 16, allocation="best")
    with pytest.raises(ValueError, match="unknown basis"):
        ferret.compress(update_dict(), 0, 16, basis="sobol")
    with pytest.raises(ValueError, match="grouping"):
        ferret.compress(update_dict(), 0, 16, grouping=-4)
    with pytest.raises(TypeError, match="seed must be an int"):
        ferret.compress(update_dict(), 1.5, 16)


def test_reconstruct_argument_errors_change_nothing():
    t = torch.zeros(8, 8)
    packet = ferret.compress(torch.randn(8, 8), 0, 4)
    with pytest.raises(TypeError, match="exactly one"):
        ferret.reconstruct(packet)
    with pytest.raises(TypeError, match="Packet.from_bytes"):
        ferret.reconstruct(packet.to_bytes(), into=t)
    with pytest.raises(ValueError, match="finite"):
        ferret.reconstruct(packet, into=t, scale=float("nan"))
    with pytest.raises(ValueError, match="not contiguous"):
        ferret.reconstruct(packet, into=torch.zeros(8, 8).t())
    ro = np.zeros((8, 8), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        ferret.reconstruct(packet, into=ro)
    assert float(t.abs().sum()) == 0


def test_perturb_round_trip_and_errors():
    params = {"a": torch.randn(100), "b": torch.randn(5, 5).bfloat16()}
    before = {k: v.clone() for k, v in params.items()}
    ferret.perturb(params, seed=11, eps=1e-3)
    assert not torch.equal(params["a"], before["a"])
    want = before["a"] + 1e-3 * torch.from_numpy(ferret.spec.rademacher(ferret.block_seed(11, 0), 0, 100))
    assert torch.equal(params["a"], want)
    with pytest.raises(ValueError, match="finite"):
        ferret.perturb(params, 0, float("inf"))
    with pytest.raises(ValueError, match="unknown basis"):
        ferret.perturb(params, 0, 1e-3, basis="x")


def test_packet_constructor_validates():
    with pytest.raises(PacketError, match="counts sum"):
        Packet(0, "rademacher", 0, bytes(16), np.array([2]), np.zeros(3, np.float32))
    with pytest.raises(PacketError, match="NaN"):
        Packet(0, "rademacher", 0, bytes(16), np.array([1]), np.array([np.nan], np.float32))
    with pytest.raises(PacketError, match="outside"):
        Packet(-1, "rademacher", 0, bytes(16), np.array([1]), np.zeros(1, np.float32))
    # every field is checked when the packet is made, not when it is encoded
    for changes, message in [({"round_seed": 1.5}, "round_seed is an int, got 1.5"),
                             ({"round_seed": True}, "round_seed is an int"),
                             ({"group_size": "7"}, "group_size is an int"), ({"group_size": -1}, "group size -1"),
                             ({"group_size": 2**64}, "outside"), ({"fingerprint": "x" * 16}, "16 bytes")]:
        fields = {"round_seed": 0, "basis": "rademacher", "group_size": 0, "fingerprint": bytes(16),
                  "counts": np.array([1]), "coords": np.zeros(1, np.float32), **changes}
        with pytest.raises(PacketError, match=message):
            Packet(**fields)


def test_parameters_that_require_grad():
    model = torch.nn.Linear(6, 3)
    packet = ferret.compress(dict(model.named_parameters()), 0, 4)  # leaf tensors with requires_grad
    before = model.weight.detach().clone()
    ferret.reconstruct(packet, into=model.named_parameters(), scale=0.1)
    ferret.perturb(model.named_parameters(), 1, 1e-3)
    assert not torch.equal(model.weight.detach(), before) and model.weight.requires_grad


# ---- issue 14: hostile and huge input ------------------------------------------------------------

@pytest.mark.parametrize("budget,error,message", [
    (10**12, ValueError, "at most 1600 "), (np.uint64(2**64 - 1), ValueError, "at most 1600 "),
    (2**31, ValueError, "at most 1600 "), (0, ValueError, "positive"), (-3, ValueError, "positive"),
    (True, TypeError, "an int"), (4.0, TypeError, "an int"), ("8", TypeError, "an int"),
])
def test_budget_must_be_a_sane_int(budget, error, message):
    with pytest.raises(error, match=message):
        ferret.compress(torch.randn(100), 0, budget)


def test_check_budget_states_the_rule():
    from ferret.allocation import MAX_BUDGET, check_budget

    assert MAX_BUDGET == 2**31 - 1
    assert check_budget(np.int64(5)) == 5 and type(check_budget(np.int64(5))) is int
    assert check_budget(MAX_BUDGET) == MAX_BUDGET  # no update size given: only the packet format's limit
    with pytest.raises(ValueError, match="at most 2147483647"):
        check_budget(MAX_BUDGET + 1)
    assert check_budget(16 * 10, n_blocks=2, numel=10) == 160  # 16 coordinates per element
    with pytest.raises(ValueError, match="at most 160 .*16 per element"):
        check_budget(161, n_blocks=2, numel=10)
    assert check_budget(3, n_blocks=3, numel=0) == 3  # empty tensors still get one coordinate per block
    with pytest.raises(ValueError, match="below the number of blocks"):
        check_budget(2, n_blocks=3, numel=100)
    assert ferret.compress(torch.randn(10), 0, np.uint8(160)).coords.size == 160


BACKENDS = ["core", pytest.param("triton", marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["huge coordinates", "huge scale", "fp16 target", "bf16 target"])
def test_reconstruct_refuses_results_that_overflow_and_changes_nothing(backend, case):
    dtype = {"fp16 target": torch.float16, "bf16 target": torch.bfloat16}.get(case, torch.float32)
    params = {"a": torch.randn(300).to(dtype), "b": torch.randn(40, 7).to(dtype)}
    layout = Layout.of(params)
    # per block: acc = ±c ± c, written as out + acc * scale / 2
    coords, scale = {"huge coordinates": ([3e38, 3e38], 1.0), "huge scale": ([2.0, 2.0], 3e38),
                     "fp16 target": ([1e5, 1e5], 1.0), "bf16 target": ([1.7e38, 1.7e38], 2.0)}[case]
    packet = Packet(1, "rademacher", 0, layout.fingerprint, [2, 2], np.array(coords * 2, np.float32))
    before = {k: v.clone() for k, v in params.items()}
    with pytest.raises(PacketError, match="non-finite.*nothing was written"):
        ferret.reconstruct(packet, into=params, scale=scale, backend=backend)
    assert all(torch.equal(params[k].view(torch.uint8), before[k].view(torch.uint8)) for k in params)
    if dtype == torch.float32:
        with pytest.raises(PacketError, match="non-finite"):
            ferret.reconstruct(packet, like=params, scale=scale, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("basis", ["gaussian", "srht:64"])
def test_other_bases_refuse_overflowing_results_too(backend, basis):
    params = {"a": torch.randn(300), "b": torch.randn(40, 7)}
    layout = Layout.of(params)
    packet = Packet(1, basis, 0, layout.fingerprint, [3, 3], np.full(6, 3e38, np.float32))
    before = {k: v.clone() for k, v in params.items()}
    with pytest.raises(PacketError, match="non-finite"):
        ferret.reconstruct(packet, into=params, backend=backend)
    assert all(torch.equal(params[k], before[k]) for k in params)
    with pytest.raises(PacketError, match="non-finite"):
        ferret.reconstruct(packet, like=layout, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_values_already_in_the_target_are_not_the_packets_fault(backend):
    params = torch.randn(500)
    params[7] = float("inf")
    params[9] = float("nan")
    packet = ferret.compress(torch.randn(500), 3, 8)
    want = ferret.reconstruct(packet, into=params.clone(), backend=backend)
    ferret.reconstruct(packet, into=params, backend=backend)
    assert torch.equal(params.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("basis", ["rademacher", "gaussian", "srht:64"])
def test_checked_reconstruction_writes_the_same_bits(basis, backend, monkeypatch):
    """Where the cheap bound cannot rule out an overflow, a dry run into scratch pieces checks the
    result first; what is then written is bit for bit the unchecked reconstruction."""
    from ferret import projection

    update = {"w": torch.randn(30, 33), "b": torch.randn(200)}
    packet = ferret.compress(update, 5, 40, basis=basis)
    params = {k: torch.randn(v.shape).half() for k, v in update.items()}
    fast = ferret.reconstruct(packet, into={k: v.clone() for k, v in params.items()}, scale=0.3, backend=backend)
    monkeypatch.setattr(projection, "_cannot_overflow", lambda *args, **kwargs: False)
    monkeypatch.setattr(projection, "SCRATCH_ELEMENTS", 300)  # several pieces per tensor
    checked = ferret.reconstruct(packet, into=params, scale=0.3, backend=backend)
    assert all(torch.equal(fast[k].view(torch.int16), checked[k].view(torch.int16)) for k in update)


def test_merge_packets_with_huge_weights_and_without_normalising():
    updates = [update_dict(s) for s in range(3)]
    packets = [ferret.compress(u, seed=4, budget=40 + 8 * i) for i, u in enumerate(updates)]
    assert ferret.merge_packets(packets[:2], [1e308, 1e308]) == ferret.merge_packets(packets[:2], [1, 1])
    assert ferret.merge_packets(packets, [2, 6, 2]) == ferret.merge_packets(packets, [0.2, 0.6, 0.2])
    summed = ferret.reconstruct(ferret.merge_packets(packets, [2, 6, 2], normalize=False), like=updates[0])
    mean = ferret.reconstruct(ferret.merge_packets(packets, [2, 6, 2]), like=updates[0])
    for k in summed:
        torch.testing.assert_close(summed[k], 10 * mean[k], rtol=1e-5, atol=1e-5)
    for weights, error, message in [(["1", 2, 3], TypeError, "real numbers"), ([True, 1, 1], TypeError, "real"),
                                    ([1, -1, 1], ValueError, "non-negative"), ([0, 0, 0], ValueError, "positive"),
                                    ([1, 2], ValueError, "2 weights for 3"),
                                    ([1, float("inf"), 1], ValueError, "finite")]:
        with pytest.raises(error, match=message):
            ferret.merge_packets(packets, weights)
    with pytest.raises(ValueError, match="overflow"):
        ferret.merge_packets(packets[:2], [1e308, 1e308], normalize=False)


def test_merge_by_seed_sums_to_the_weighted_mean():
    updates = [update_dict(s) for s in range(4)]
    seeds = [10, 11, 10, 12]
    packets = [ferret.compress(u, seed=s, budget=40) for u, s in zip(updates, seeds)]
    weights = [1.0, 2.0, 3.0, 4.0]
    merged = ferret.merge_by_seed(packets, weights)
    assert [p.round_seed for p in merged] == [10, 11, 12]
    got = {k: torch.zeros_like(v) for k, v in updates[0].items()}
    for p in merged:
        ferret.reconstruct(p, into=got)
    for k in got:
        want = sum(w / 10 * ferret.reconstruct(p, like=updates[0])[k] for w, p in zip(weights, packets))
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-5)
    one_seed = [ferret.compress(u, seed=1, budget=40) for u in updates]
    assert ferret.merge_by_seed(one_seed, weights) == [ferret.merge_packets(one_seed, weights)]
    unnormalised = ferret.merge_by_seed(packets, weights, normalize=False)
    np.testing.assert_allclose(unnormalised[1].coords, 10 * merged[1].coords, rtol=1e-6)


@pytest.mark.parametrize("data", [10**11, "FRPK", None, np.zeros(64, np.uint8), [70, 82]])
def test_packet_decoding_takes_only_bytes(data):
    with pytest.raises(TypeError, match="bytes, bytearray or memoryview"):
        Packet.from_bytes(data)
    with pytest.raises(TypeError, match="bytes, bytearray or memoryview"):
        Packet.split(data)


def test_packet_decoding_takes_bytearray_and_memoryview():
    packet = ferret.compress(update_dict(), 0, 16)
    wire = packet.to_bytes()
    assert Packet.from_bytes(bytearray(wire)) == Packet.from_bytes(memoryview(wire)) == packet
    assert Packet.split(memoryview(wire + wire)) == [packet, packet]


def test_negated_and_conjugated_views_are_refused():
    x = torch.zeros(300)
    packet = ferret.compress(torch.randn(300), 0, 4)
    with pytest.raises(ValueError, match="negated view.*resolve_neg"):
        ferret.reconstruct(packet, into=torch._neg_view(x))
    with pytest.raises(ValueError, match="negated view"):
        ferret.compress(torch._neg_view(torch.randn(300)), 0, 4)
    with pytest.raises(ValueError, match="negated view"):
        ferret.perturb({"x": torch._neg_view(x)}, 0, 1e-3)
    with pytest.raises(ValueError, match="conjugated view"):
        ferret.compress(torch.zeros(4, dtype=torch.complex64).conj(), 0, 2)
    assert float(x.abs().sum()) == 0


def test_threads_follow_torch_unless_overridden():
    from ferret import _core

    torch_threads, override = torch.get_num_threads(), ferret.set_num_threads(None)
    try:
        torch.set_num_threads(1)
        assert ferret.num_threads() == 1
        ferret.compress(torch.randn(10), 0, 2)
        assert _core.num_threads() == 1  # what the core's loops ran with
        torch.set_num_threads(2)
        assert ferret.num_threads() == 2
        assert ferret.set_num_threads(3) is None
        assert ferret.num_threads() == 3
        ferret.compress(torch.randn(10), 0, 2)
        assert _core.num_threads() == 3
        with pytest.raises(ValueError, match="positive"):
            ferret.set_num_threads(0)
        assert ferret.set_num_threads(None) == 3
        assert ferret.num_threads() == 2
    finally:
        ferret.set_num_threads(override)
        torch.set_num_threads(torch_threads)
    code = "import torch, ferret; torch.set_num_threads(1); print(ferret.num_threads())"
    env = {**os.environ, "FERRET_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_steps_too_small_to_reach_inf_leave_the_largest_values_finite(dtype):
    """Below a quarter of the top binade's spacing no finite value can round to Inf, so the
    targets are not read for the overflow check; at the dtype's largest values they stay finite."""
    top = torch.finfo(dtype).max
    for sign in (1.0, -1.0):
        target = torch.full((64,), sign * top, dtype=dtype)
        packet = ferret.compress(torch.randn(64), seed=0, budget=8)
        ferret.reconstruct(packet, into=target, scale=1e-3)
        assert torch.isfinite(target).all() and torch.equal(target, torch.full((64,), sign * top, dtype=dtype))


def test_a_transform_holds_as_many_clients_as_its_smallest_block_and_the_budget_allow():
    """Known answers of ferret.slots: blocks of 8 and 300 elements hold 8 slots of 24 coordinates
    (the 8-element block has 8 rows); 20 clients make 3 groups of at most 7; a budget the rows
    of two 64-element blocks hold once only, one slot; a named Hadamard size of 1024 over four
    4096-element blocks, 20 slots of 200 (4 x 1024 / 200)."""
    from ferret import slots
    from ferret.spec import group_seed

    assert slots.capacity([8, 300], 24) == 8
    assert slots.grouping(8, [8, 300], 24) == (1, 8) and slots.grouping(20, [8, 300], 24) == (3, 7)
    assert slots.capacity([64, 64], 100) == 1 and slots.capacity([4096] * 4, 200, "hadamard:1024") == 20
    assert slots.capacity([64], 100) == 0
    with pytest.raises(ValueError, match="a budget of 100 coordinates does not fit one client's rows"):
        slots.grouping(3, [64], 100)
    first, last = slots.place(77, 0, 20, [8, 300], 24), slots.place(77, 19, 20, [8, 300], 24)
    assert (first.seed, first.slot, first.slots, first.group) == (77, 0, 7, 0)  # group 0 keeps the round's seed
    assert (last.seed, last.slot, last.slots, last.group) == (group_seed(77, 2), 5, 7, 2)
    assert len({slots.place(77, i, 20, [8, 300], 24).seed for i in range(20)}) == 3
    assert last.basis == "hadamard:1024"
    with pytest.raises(ValueError, match="place 20 is not one of a round's 20 clients"):
        slots.place(77, 20, 20, [8, 300], 24)
    with pytest.raises(ValueError, match="disjoint rows need the 'hadamard' basis"):
        slots.capacity([8, 300], 24, "rademacher")


@pytest.mark.parametrize("basis,rel", [("hadamard", 1e-5), ("srht:64", 1e-5), ("rademacher", 0.15)])
def test_estimate_norms_are_the_norms_of_each_blocks_reconstruction(basis, rel):
    """Exact where a block's rows are orthogonal (the Hadamard kinds on whole chunks), close for
    Rademacher bases with fewer coordinates than elements: what a server bounds a client by."""
    rng = np.random.default_rng(4)
    update = {"a": torch.from_numpy(rng.standard_normal(1024).astype(np.float32)),
              "b": torch.from_numpy(rng.standard_normal(4096).astype(np.float32) * 3)}
    packet = ferret.compress(update, 3, 200, basis=basis)
    rebuilt = ferret.reconstruct(packet, like=update)
    got = ferret.estimate_norms(packet, ferret.Layout.of(update))
    np.testing.assert_allclose(got, [float(rebuilt[n].double().norm()) for n in ("a", "b")], rtol=rel)
    with pytest.raises(PacketError, match="another layout"):
        ferret.estimate_norms(packet, ferret.Layout.of({"a": update["a"]}))


def _start_and_new(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    old = {"w": torch.randn(300, 70, generator=gen).to(dtype), "b": torch.randn(70, generator=gen).to(dtype),
           "n": torch.randn(1000, generator=gen).to(dtype)}
    new = {k: (v.float() + 1e-2 * torch.randn(v.shape, generator=gen)).to(dtype) for k, v in old.items()}
    return old, new


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_compress_against_a_start_is_the_packet_of_the_difference(dtype):
    """compress(new, start=old) reads both in place and gives compress(new - old)'s bytes, the
    difference rounded as the dtype subtracts: every basis, grouping and allocation."""
    old, new = _start_and_new(dtype)
    diff = {k: new[k] - old[k] for k in old}
    for basis in ("rademacher", "hadamard", "hadamard:256", "srht:64", "gaussian"):
        for grouping in ("tensor", 5000):
            for allocation in ("norm", "uniform"):
                kwargs = dict(seed=3, budget=200, basis=basis, grouping=grouping, allocation=allocation)
                assert ferret.compress(new, start=old, **kwargs).to_bytes() == ferret.compress(diff, **kwargs).to_bytes()


def test_a_start_that_does_not_match_the_update_is_refused():
    old, new = _start_and_new(torch.float32)
    with pytest.raises(ValueError, match="start must hold the update's tensors: the same names in the same order"):
        ferret.compress(new, 1, 100, start={"w": old["w"]})
    with pytest.raises(ValueError, match="start: b differs from the update's in shape, dtype or device"):
        ferret.compress(new, 1, 100, start={**old, "b": old["b"].bfloat16()})
    with pytest.raises(ValueError, match="start: w differs"):
        ferret.compress(new, 1, 100, start={**old, "w": old["w"].T.contiguous()})
    bad = {**new, "n": new["n"].clone()}
    bad["n"][5] = float("nan")
    with pytest.raises(ferret.NonFiniteError, match="NaN or Inf values in n"):
        ferret.compress(bad, 1, 100, start=old)
