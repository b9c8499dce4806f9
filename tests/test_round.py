"""ferret.Round, the public round: byte for byte what fl.Ferret uploads, the same weights as its
aggregation (one group of disjoint rows, several, shared and per-client bases), every form of
``into=``, and bad settings refused."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ferret
from ferret import fl
from ferret.fl import protocol
from ferret.fl.algorithms import RoundContext
from ferret.fl.models import stories260k_dir
from ferret.fl.train import trainable

LOCAL = fl.LocalTraining(steps=3, batch_size=4, lr=0.1)


def model():
    return AutoModelForCausalLM.from_pretrained(stories260k_dir())


@pytest.fixture(scope="module")
def shard():
    tokenizer = AutoTokenizer.from_pretrained(stories260k_dir())
    return fl.encode(fl.synthetic_tasks(10, seed=1), tokenizer)


def weights_of(net):
    return {n: p.detach().clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("options", [{}, {"basis": "rademacher", "bases": "shared"},
                                     {"basis": "rademacher", "bases": "client"}, {"allocation": "uniform"}],
                         ids=["default", "shared", "client", "uniform"])
def test_a_clients_packet_is_what_fl_ferret_uploads(shard, options):
    algorithm = fl.Ferret(budget=500, local=LOCAL, **options)
    ctx = protocol.client_context(7, 2, 5, [1, 5, 9])
    net = model()
    before = weights_of(net)
    upload = algorithm.client_update(net, shard, ctx)
    update = {n: (p.detach() - before[n]).float() for n, p in trainable(net)}
    rnd = ferret.Round(ctx.round_seed, [1, 5, 9], 500, **options)
    assert rnd.compress(update, client=5).to_bytes() == upload


@pytest.mark.parametrize("clients,options", [(3, {}), (70, {}), (3, {"basis": "rademacher", "bases": "client"}),
                                             (4, {"basis": "srht:64", "bases": "shared"})],
                         ids=["disjoint", "disjoint-groups", "client", "shared-srht"])
def test_apply_leaves_the_weights_fl_ferret_aggregates_to(clients, options):
    """Random updates as the round's clients' (70 clients need two groups of rows on stories260K,
    so the broadcast is two packets); fl.Ferret's aggregation and Round.merge + Round.apply
    give the same weights bit for bit."""
    gen = torch.Generator().manual_seed(clients)
    net, mine = model(), model()
    rnd = ferret.Round(11, clients, 300, **options)
    uploads = [rnd.compress({n: torch.randn(p.shape, generator=gen) * 1e-3 for n, p in trainable(net)}, client=c)
               for c in range(clients)]
    weights = np.arange(1, clients + 1, dtype=np.float64)
    algorithm = fl.Ferret(budget=300, server_lr=0.5, **options)
    algorithm.aggregate(net, [u.to_bytes() for u in uploads], weights, RoundContext(0, 11, list(range(clients))))
    broadcast = rnd.merge(uploads, weights)
    assert len(broadcast) == (2 if clients == 70 else 3 if options.get("bases") == "client" else 1)
    rnd.apply(broadcast, into=mine, scale=0.5)
    got, want = weights_of(mine), weights_of(net)
    assert all(torch.equal(got[n], want[n]) for n in want)
    again = model()
    rnd.apply(b"".join(p.to_bytes() for p in broadcast), into=again, scale=0.5)  # as the bytes sent
    assert all(torch.equal(p.detach(), want[n]) for n, p in again.named_parameters())


def test_into_takes_a_module_its_named_parameters_a_state_dict_or_pairs():
    gen = torch.Generator().manual_seed(0)
    rnd = ferret.Round(3, 2, 200)
    update = {n: torch.randn(p.shape, generator=gen) for n, p in trainable(model())}
    broadcast = rnd.merge([rnd.compress(update, client=c) for c in range(2)])
    results = []
    for form in ("module", "named_parameters", "state_dict", "pairs"):
        net = model()
        into = {"module": lambda: net, "named_parameters": net.named_parameters,
                "state_dict": lambda: {n: p.detach() for n, p in net.named_parameters()},
                "pairs": lambda: [(n, p.detach()) for n, p in net.named_parameters()]}[form]()
        assert rnd.apply(broadcast, into=into, scale=0.1) is into
        results.append(weights_of(net))
    assert all(torch.equal(r[n], results[0][n]) for r in results[1:] for n in results[0])
    fresh = weights_of(model())
    assert all(not torch.equal(results[0][n], fresh[n]) for n in fresh)


def test_a_step_that_would_overflow_is_refused_with_nothing_written():
    rnd = ferret.Round(5, 70, 300)  # two groups: the broadcast's packets are summed before the step
    net = model()
    params = {n: p.detach() for n, p in trainable(net)}
    broadcast = rnd.merge([rnd.compress({n: torch.ones_like(p) for n, p in params.items()}, client=c)
                           for c in range(70)])
    assert len(broadcast) == 2
    for p in params.values():
        p.copy_(p.to(torch.bfloat16).float())
    low = {n: p.to(torch.bfloat16) for n, p in params.items()}
    before = {n: p.clone() for n, p in low.items()}
    with pytest.raises(ferret.PacketError, match="non-finite"):
        rnd.apply(broadcast, into=low, scale=1e38)
    assert all(torch.equal(low[n], before[n]) for n in low)


def test_bad_settings_and_strangers_are_refused():
    with pytest.raises(ValueError, match="bases='disjoint' needs basis='hadamard'"):
        ferret.Round(1, 3, basis="rademacher", bases="disjoint")
    with pytest.raises(ValueError, match="bases must be one of auto, shared, client, disjoint, got 'own'"):
        ferret.Round(1, 3, bases="own")
    with pytest.raises(ValueError, match="allocation must be one of uniform, norm"):
        ferret.Round(1, 3, allocation="size")
    with pytest.raises(ValueError, match="a round needs at least one client"):
        ferret.Round(1, 0)
    with pytest.raises(ValueError, match="a client id appears twice"):
        ferret.Round(1, [3, 3])
    with pytest.raises(TypeError, match="budget must be an int"):
        ferret.Round(1, 3, budget=1.5)
    with pytest.raises(ValueError, match="client 4 is not among the round's 3 clients"):
        ferret.Round(1, 3).compress({"w": torch.ones(100)}, client=4)
    assert "bases='disjoint'" in repr(ferret.Round(1, 3))


def test_the_broadcast_holds_exactly_the_coordinates_uploaded():
    """Norm allocation gives the clients different rows per block; the merged broadcast carries
    each of them once and no padding (it was 6-19 % more before), and rebuilds the weighted mean."""
    gen = torch.Generator().manual_seed(3)
    net = model()
    rnd = ferret.Round(9, 10, 3800)
    scales = torch.rand(10, generator=gen) * 10
    uploads = [rnd.compress({n: torch.randn(p.shape, generator=gen) * scales[c] ** (i % 3)
                             for i, (n, p) in enumerate(trainable(net))}, client=c) for c in range(10)]
    assert len({u.counts.tobytes() for u in uploads}) > 1  # the clients' allocations differ
    [broadcast] = rnd.merge(uploads)
    assert broadcast.coords.size == sum(u.coords.size for u in uploads) == 38_000
    assert ferret.Packet.from_bytes(broadcast.to_bytes()) == broadcast
    like = {n: p.detach() for n, p in trainable(net)}
    got = ferret.reconstruct(broadcast, like=like)
    for n in like:
        mean = sum(ferret.reconstruct(u, like=like)[n] for u in uploads) / 10
        torch.testing.assert_close(got[n], mean, rtol=1e-5, atol=1e-5 * float(mean.abs().max()))
