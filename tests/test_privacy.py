"""Client-level differential privacy: clipping, the noise's scale, the accountant against the
library's own computation, the budget that ends a run, and the settings that cannot work."""

from __future__ import annotations

import json
import math
import re

import dp_accounting
import numpy as np
import pytest

from ferret.fl import experiment
from ferret.fl.config import Config, ConfigError
from ferret.fl.privacy import ORDERS, PrivacyOptions, client_share, clip, epsilon, noisy_mean, rounds_within

SHARED = {"budget": 3800, "bases": "shared", "allocation": "uniform"}


def test_clipping_bounds_each_clients_contribution_exactly():
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(50) * s for s in (0.01, 0.5, 3.0, 40.0)]
    options = PrivacyOptions(dp_clip=1.0)
    got = noisy_mean(vectors, options, round_seed=5, clients=4)
    norms = [np.linalg.norm(v) for v in vectors]
    want = sum(v * min(1.0, 1.0 / n) for v, n in zip(vectors, norms)) / 4
    np.testing.assert_allclose(got, want, rtol=1e-14)
    for v in vectors:
        assert np.linalg.norm(clip(v, 1.0)) <= 1.0 + 1e-15
    # one client, however large, moves the mean by at most C / m
    without = noisy_mean(vectors[:3], options, round_seed=5, clients=4)
    assert np.linalg.norm(got - without) <= 1.0 / 4 + 1e-15


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_the_noise_on_the_sum_has_standard_deviation_z_times_c(mode):
    options = PrivacyOptions(dp_clip=2.0, dp_noise=1.5, dp_mode=mode)
    zeros = [np.zeros(200_000) for _ in range(4)]
    if mode == "distributed":
        rng = np.random.default_rng(11)
        zeros = [client_share(z, options, clients=4, rng=rng) for z in zeros]
    total = 4 * noisy_mean(zeros, options, round_seed=3, clients=4)
    assert abs(total.mean()) < 4 * 3.0 / math.sqrt(total.size)
    assert total.std() == pytest.approx(3.0, rel=0.01)  # 200,000 draws: the std is within 0.3 % of 3.0 (4 sigma)
    again = 4 * noisy_mean(zeros, options, round_seed=3, clients=4)
    assert np.array_equal(total, again)  # the server's noise is a function of the round's seed


@pytest.mark.parametrize("noise,rate,rounds", [(1.0, 0.3, 10), (0.8, 1.0, 5), (2.0, 0.01, 1000)])
def test_epsilon_is_the_libraries_own(noise, rate, rounds):
    event = dp_accounting.GaussianDpEvent(noise)
    if rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(rate, event)
    accountant = dp_accounting.rdp.RdpAccountant(orders=ORDERS)
    accountant.compose(event, rounds)
    assert epsilon(noise, rate, rounds, 1e-5) == accountant.get_epsilon(1e-5)
    assert epsilon(noise, rate, rounds + 1, 1e-5) > epsilon(noise, rate, rounds, 1e-5)
    assert epsilon(noise, rate, 0, 1e-5) == 0.0 and epsilon(0.0, rate, 1, 1e-5) == math.inf


def test_rounds_within_a_target_are_the_most_that_stay_below_it():
    allowed = rounds_within(8.0, 1.0, 1.0, 1e-5, 50)
    assert epsilon(1.0, 1.0, allowed, 1e-5) <= 8.0 < epsilon(1.0, 1.0, allowed + 1, 1e-5)


def test_target_epsilon_ends_the_run_before_the_budget_is_spent(tmp_path):
    options = {**SHARED, "dp_clip": 0.5, "dp_noise": 1.0, "target_epsilon": 8.0}
    config = Config(algorithm="ferret", options=options, weighting="equal", rounds=5, rouge_samples=0,
                    synthetic_per_family=20, n_eval=20)
    lines = []
    result = experiment.run(config, tmp_path / "run", progress=False, echo=lines.append)
    assert len(result.rounds) == 2
    assert "target_epsilon 8.0 allows 2 of the 5 rounds: round 3 would spend ε = 9.09" in lines
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    spent = [r["epsilon"] for r in records if r["kind"] == "round"]
    assert spent == [epsilon(1.0, 1.0, t, 1e-5) for t in (1, 2)] and spent[-1] <= 8.0
    assert "ε" in (tmp_path / "run" / "summary.md").read_text()


@pytest.mark.parametrize("settings,message", [
    ({"algorithm": "ferret", "options": {**SHARED, "dp_clip": 1.0, "dp_noise": -1.0}},
     "dp_noise (the noise multiplier) must be a finite number at least 0"),
    ({"algorithm": "fedavg", "options": {"dp_clip": 1.0, "dp_delta": 1.0}}, "dp_delta must be in (0, 1)"),
    ({"algorithm": "fedavg", "options": {"dp_noise": 1.0}}, "dp_noise and target_epsilon need dp_clip"),
    ({"algorithm": "fedavg", "options": {"dp_clip": 1.0, "target_epsilon": 3.0}}, "target_epsilon needs dp_noise above 0"),
    ({"algorithm": "fedavg", "options": {"dp_clip": 1.0, "dp_mode": "local"}}, "dp_mode must be one of"),
    ({"algorithm": "fedavg", "options": {"dp_clip": 1.0}}, "differential privacy weighs every client equally"),
    ({"algorithm": "ferret", "weighting": "equal", "options": {"dp_clip": 1.0, "bases": "client", "basis": "rademacher"}},
     "differential privacy adds noise to the sum of the clients' coordinates: it needs bases='shared' or 'disjoint'"),
    ({"algorithm": "ferret", "weighting": "equal", "options": {"dp_clip": 1.0, "allocation": "norm"}},
     "differential privacy needs every client's block counts fixed in advance: use allocation='uniform' or 'auto'"),
    ({"algorithm": "ferret", "weighting": "equal", "options": {"dp_clip": 1.0, "dp_mode": "distributed"}},
     "distributed differential privacy has each client add a share of the noise to rows every client uses: it "
     "needs bases='shared', not 'disjoint'"),
    ({"algorithm": "fedavg", "weighting": "equal", "options": {"dp_clip": 1e300, "dp_noise": 1e10}},
     "dp_noise × dp_clip = inf is the noise's standard deviation: above 1e+06"),
    ({"algorithm": "ferret", "weighting": "equal", "options": {"dp_clip": 0.5, "dp_noise": 1e308}},
     "dp_noise × dp_clip = 5e+307 is the noise's standard deviation"),
    ({"algorithm": "flora", "weighting": "equal", "options": {"dp_clip": 1.0, "dp_noise": 1e300}},
     "dp_noise × dp_clip = 1e+300 is the noise's standard deviation"),
    ({"algorithm": "fedavg", "weighting": "equal", "options": {"dp_clip": 0.5, "dp_noise": 1e30}},
     "dp_noise × dp_clip = 5e+29 is the noise's standard deviation"),
    ({"algorithm": "fedavg", "weighting": "equal", "options": {"dp_clip": 1e-300}},
     "dp_clip must be a finite number of at least 1e-06"),
    ({"algorithm": "fedavg", "weighting": "equal", "options": {"dp_clip": 1.0, "aggregator": "median"}},
     "differential privacy calibrates its noise to the clipped sum"),
])
def test_bad_privacy_settings_stop_with_one_message(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config(**settings)


def test_a_lora_clients_update_is_clipped_as_a_whole_and_the_noise_lands_on_the_adapted_weights():
    import torch
    from transformers import AutoModelForCausalLM

    from ferret import fl, lora
    from ferret.fl.algorithms.base import RoundContext
    from ferret.fl.algorithms.lora import encode_adapter, module_norms
    from ferret.fl.defences import aggregate
    from ferret.fl.models import stories260k_dir

    gen = torch.Generator().manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(stories260k_dir())
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    modules = dict(model.named_modules())

    def adapter(scale):
        terms = {}
        for n in names:
            out, inp = modules[n].weight.shape
            terms[n] = [lora.LoraTerm(torch.randn(4, inp, generator=gen) * scale, torch.randn(out, 4, generator=gen), 0.5)]
        return lora.LoraAdapter(terms)

    small, big = adapter(1e-4), adapter(10.0)
    dense = sum(float((0.5 * t.B.double() @ t.A.double()).square().sum()) for ts in big.terms.values() for t in ts)
    assert float(np.linalg.norm(module_norms(big))) == pytest.approx(math.sqrt(dense), rel=1e-9)
    before = {n: modules[n].weight.detach().clone() for n in names}
    algorithm = fl.FLoRA(ranks=4, target_modules=["q_proj", "down_proj"], dp_clip=1.0, dp_noise=0.0)
    ctx = RoundContext(round=0, round_seed=7, clients=[0, 1, 2])
    clipped = aggregate(algorithm, model, [encode_adapter(small), encode_adapter(big)], [0.5, 0.5], [None, None], ctx)
    assert clipped == 1
    moved = math.sqrt(sum(float((modules[n].weight - before[n]).double().square().sum()) for n in names))
    # Σ clip(update_i) / m with m = 3: the big client contributes exactly 1/3 in norm, the small one ~0
    assert moved == pytest.approx(1.0 / 3, abs=1e-3)
    noisy = fl.FLoRA(ranks=4, target_modules=["q_proj", "down_proj"], dp_clip=1.0, dp_noise=2.0)
    after_clean = {n: modules[n].weight.detach().clone() for n in names}
    noisy.apply(model, encode_adapter(lora.LoraAdapter({n: [lora.LoraTerm(torch.zeros(1, modules[n].weight.shape[1]),
                                                                          torch.zeros(modules[n].weight.shape[0], 1), 1.0)]
                                                        for n in names})), ctx)
    noise = torch.cat([(modules[n].weight - after_clean[n]).flatten() for n in names])
    assert float(noise.std()) == pytest.approx(2.0 / 3, rel=0.02)  # z·C / m


def test_dp_with_disjoint_rows_is_the_clipped_mean_with_noise_on_every_row():
    """With the default bases each client's coordinates sit in rows of its own: its summable vector
    is zero off them, so adding or removing it changes the sum by at most its clipped norm; the
    mean of the vectors rebuilds exactly what the plain mean of the packets does, group by group
    (12 clients, a block of 8 elements: two groups of rows)."""
    import torch

    import ferret
    from ferret import fl
    from ferret.fl.algorithms import ClientContext, RoundContext

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 40))

    clients = list(range(12))
    ctx = RoundContext(round=0, round_seed=11, clients=clients)
    private = fl.Ferret(budget=24, dp_clip=1e6, dp_noise=0.0)  # a clip that never binds, no noise
    plain = fl.Ferret(budget=24, allocation="uniform", relative_bound=math.inf)
    rng = np.random.default_rng(2)
    a, b = net(), net()
    layout = ferret.Layout.of(list(a.named_parameters()))
    assert ferret.slots.grouping(12, layout.block_sizes, 24)[0] == 2
    uploads, vectors = [], []
    for c in clients:
        cctx = ClientContext(0, c, 11, None, None, tuple(clients))
        place = private.place(cctx, layout)
        update = {n: torch.from_numpy(rng.standard_normal(tuple(p.shape)).astype(np.float32)) for n, p in a.named_parameters()}
        upload = ferret.compress(update, place.seed, 24, basis=place.basis, allocation="uniform", slot=place.slot,
                                 slots=place.slots).to_bytes()
        uploads.append(upload)
        vectors.append(private.summable(upload, a, cctx))
        assert np.count_nonzero(vectors[-1]) == 24 and np.isclose(np.linalg.norm(vectors[-1]),
                                                                 np.linalg.norm(private.vector(upload)))
    support = np.stack([v != 0 for v in vectors])
    assert support.sum(axis=0).max() == 1  # no two clients share a row
    private.aggregate_mean(a, noisy_mean(vectors, private.options, 11, len(clients)), ctx)
    plain.aggregate(b, uploads, [1 / 12] * 12, ctx)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
