"""The federated loop on the real stories260K model and the project's own instruction data:
every algorithm learns, Ferret tracks FedAvg, FLoRA with one client is plain LoRA training,
runs are deterministic, bytes are counted from the real payloads, bad data is refused."""

import copy
import dataclasses
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ferret
from ferret import fl
from ferret.fl import protocol
from ferret.fl.algorithms.lora import init_adapter
from ferret.fl.data import DataError
from ferret.fl.models import stories260k_dir
from ferret.packet import _HEADER, _SLOTS
from ferret.spec import block_seed

LOCAL = fl.LocalTraining(steps=5, batch_size=4, lr=0.1)
ADAM = fl.LocalTraining(steps=5, batch_size=4, lr=3e-3, optimizer="adamw")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(stories260k_dir())


@pytest.fixture(scope="module")
def data(tokenizer):
    train, held = fl.holdout(fl.synthetic_tasks(30, seed=0), 40, seed=0)
    shards = [fl.encode(s, tokenizer) for s in fl.partition(train, "dirichlet", 3, seed=0, alpha=0.5, min_per_client=2)]
    return shards, fl.encode(held, tokenizer)


def model():
    return AutoModelForCausalLM.from_pretrained(stories260k_dir())


ALGORITHMS = {
    "ferret": lambda: fl.Ferret(budget=3800, local=LOCAL),
    "ferret_paper": lambda: fl.build("ferret-paper", budget=3800, local=LOCAL),
    "ferret_srht": lambda: fl.Ferret(budget=3800, local=LOCAL, basis="srht"),
    "ferret_momentum": lambda: fl.Ferret(budget=3800, local=LOCAL, basis="rademacher", bases="client", momentum=0.5),
    "ferret_rademacher": lambda: fl.Ferret(budget=3800, local=LOCAL, basis="rademacher", bases="shared"),
    "fedavg": lambda: fl.FedAvg(local=LOCAL),
    "fedzo": lambda: fl.FedZO(local=fl.LocalTraining(steps=5, lr=5e-5), eps=1e-3),
    "fedkseed": lambda: fl.FedKSeed(k=32, local=fl.LocalTraining(steps=5, lr=5e-5), eps=1e-3),
    "flora": lambda: fl.FLoRA(ranks=[8, 4, 2], local=ADAM),
    "fedit": lambda: fl.FedIT(ranks=4, local=ADAM),
    "zeropad": lambda: fl.ZeroPadding(ranks=[8, 4, 2], local=ADAM),
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_algorithm_lowers_eval_loss(name, data):
    shards, held = data
    result = fl.run(ALGORITHMS[name](), model(), shards, held, rounds=2, device="cpu", seed=1)
    assert result.final_eval_loss < result.initial_eval_loss - 0.05, (name, result.initial_eval_loss,
                                                                       [r.eval_loss for r in result.rounds])


@pytest.mark.parametrize("name", ["ferret", "ferret_paper", "ferret_srht", "ferret_momentum", "ferret_rademacher",
                                  "fedavg", "fedkseed", "flora"])
def test_replaying_the_broadcasts_rebuilds_the_global_model(name, data):
    """What a distributed engine's clients do: apply each round's broadcast to their own replica."""
    from ferret.fl.algorithms import RoundContext

    shards, held = data
    global_model, replica, client_side = model(), model(), ALGORITHMS[name]()
    algorithm = ALGORITHMS[name]()

    def replay(record):
        ctx = RoundContext(round=record.round, round_seed=block_seed(3, record.round), clients=record.clients)
        client_side.apply(replica, algorithm.broadcast, ctx)

    fl.run(algorithm, global_model, shards, held, rounds=2, device="cpu", seed=3, on_round=replay)
    for (n, a), (_, b) in zip(global_model.state_dict().items(), replica.state_dict().items()):
        assert torch.equal(a, b), n


def test_ferret_tracks_fedavg(data):
    shards, held = data
    d = sum(p.numel() for p in model().parameters())
    free = {"local": LOCAL, "relative_bound": math.inf}  # the estimators alone: no influence bound shrinks them
    runs = {"fedavg": fl.FedAvg(**free), "small": fl.Ferret(budget=3800, basis="rademacher", bases="shared", **free),
            "client": fl.Ferret(budget=100_000, basis="rademacher", bases="client", **free),  # three independent
            # projections a round
            "lossless": fl.Ferret(budget=d, basis="srht:32768", **free)}  # every row of an orthogonal transform
    results = {name: fl.run(algorithm, model(), shards, held, rounds=3, device="cpu", seed=2)
               for name, algorithm in runs.items()}
    gain = {name: r.initial_eval_loss - r.final_eval_loss for name, r in results.items()}
    # the estimator's noise, (d_b - 1)/n_b · ‖Δ_b‖² per projection, shrinks with the budget and
    # with independent projections; with every SRHT row the reconstruction is exact (to rounding)
    assert 0 < gain["small"] < gain["client"] < gain["fedavg"] * 1.05, gain
    assert gain["client"] > 0.75 * gain["fedavg"], gain
    np.testing.assert_allclose([r.eval_loss for r in results["lossless"].rounds],
                               [r.eval_loss for r in results["fedavg"].rounds], atol=1e-2)


def test_runs_are_deterministic(data):
    shards, held = data
    a, b = model(), model()
    fl.run(fl.Ferret(budget=1000, local=LOCAL), a, shards, held, rounds=2, fraction=0.67, device="cpu", seed=3)
    fl.run(fl.Ferret(budget=1000, local=LOCAL), b, shards, held, rounds=2, fraction=0.67, device="cpu", seed=3)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="'auto' means CUDA on this machine")
def test_device_auto_without_cuda_is_the_cpu_run(data):
    shards, held = data
    a, b = model(), model()
    fl.run(fl.Ferret(budget=1000, local=LOCAL, momentum=0.5), a, shards, held, rounds=2, seed=3, device="cpu", dtype="fp32",
           backend="core")
    fl.run(fl.Ferret(budget=1000, local=LOCAL, momentum=0.5), b, shards, held, rounds=2, seed=3)  # every setting "auto"
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_bf16_autocasts_the_forward_passes_over_fp32_weights(data):
    shards, held = data
    fp32, bf16 = model(), model()
    local = dataclasses.replace(LOCAL, lr=0.03)  # SGD at 0.1 is at the edge of divergence in bf16 (torch 2.13)
    plain = fl.run(fl.FedAvg(local=local), fp32, shards[:1], held, rounds=1, seed=3, device="cpu")
    mixed = fl.run(fl.FedAvg(local=local), bf16, shards[:1], held, rounds=1, seed=3, device="cpu", dtype="bf16")
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    assert mixed.final_eval_loss < mixed.initial_eval_loss and mixed.final_eval_loss != plain.final_eval_loss
    assert any(not torch.equal(x, y) for x, y in zip(fp32.parameters(), bf16.parameters()))


@pytest.mark.parametrize("settings, message", [
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(device="cuda:x"), "unknown device 'cuda:x'"),
    (dict(dtype="fp16"), "unknown dtype 'fp16'"),
    (dict(backend="gpu"), "unknown backend 'gpu'"),
])
def test_bad_device_dtype_or_backend_is_refused_before_anything_runs(settings, message, data):
    from ferret.fl.config import Config, ConfigError
    from ferret.fl.references import centralized

    shards, held = data
    m = model()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ConfigError, match=message):
        Config(**settings)
    with pytest.raises(ConfigError, match=message):
        fl.run(fl.Ferret(budget=1000, local=LOCAL), m, shards, held, rounds=1, **settings)
    if "backend" not in settings:
        with pytest.raises(ConfigError, match=message):
            centralized(m, shards, held, LOCAL, rounds=1, **settings)
    assert all(torch.equal(x, before[n]) for n, x in m.state_dict().items())


def test_gpu_settings_are_checked_against_the_machine(monkeypatch):
    """What a machine with one pre-Ampere GPU (no bf16) refuses, and what "auto" picks on it."""
    from ferret.fl.config import ConfigError
    from ferret.fl.runtime import resolve

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.version, "hip", None)
    assert resolve() == resolve("cuda:0", "fp32", "auto")
    assert resolve().device == torch.device("cuda", 0) and resolve().dtype == torch.float32
    with pytest.raises(ConfigError, match=r"device 'cuda:7': this machine has 1 GPU \(cuda:0\)"):
        resolve("cuda:7")
    with pytest.raises(ConfigError, match="dtype 'bf16': cuda:0 has no bf16 support"):
        resolve("cuda", "bf16")
    with pytest.raises(ConfigError, match="backend 'core' reads CPU memory only"):
        resolve("cuda", "fp32", "core")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve().dtype == torch.bfloat16 and resolve("cuda", "fp32").dtype == torch.float32
    assert resolve("cpu").dtype == torch.float32 and resolve("cpu", "bf16").dtype == torch.bfloat16


def test_triton_on_the_cpu_needs_its_interpreter_chosen_before_triton_loads(monkeypatch):
    import sys

    from ferret.fl.config import ConfigError
    from ferret.fl.runtime import resolve

    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="triton was imported without it: set TRITON_INTERPRET=1"):
        resolve("cpu", "fp32", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        resolve("cpu", "fp32", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve("cpu", "fp32", "triton").backend == "triton"
    monkeypatch.delitem(sys.modules, "triton")  # not imported yet: the interpreter is chosen for it
    monkeypatch.delenv("TRITON_INTERPRET")
    assert resolve("cpu", "fp32", "triton").backend == "triton"
    assert os.environ["TRITON_INTERPRET"] == "1"


def test_upload_bytes_are_the_encoded_payloads(data):
    shards, held = data
    m = model()
    n_tensors = sum(1 for p in m.parameters() if p.requires_grad)
    d = sum(p.numel() for p in m.parameters() if p.requires_grad)
    algorithm, broadcasts = fl.Ferret(budget=1000, local=LOCAL), []
    ferret_ = fl.run(algorithm, m, shards, held, rounds=2, device="cpu", seed=4,
                     on_round=lambda r: broadcasts.append(algorithm.broadcast))
    for record in ferret_.rounds:
        assert set(record.upload_bytes.values()) == {_HEADER.size + _SLOTS.size + 4 * n_tensors + 4 * 1000 + 4}
    assert ferret_.rounds[0].download_bytes == 0
    merged = ferret.Packet.from_bytes(broadcasts[0])  # exactly the rows the clients sent, each slot's counted
    clients = len(ferret_.rounds[0].clients)
    assert merged.coords.size == clients * 1000 and merged.slot_counts.shape == (n_tensors, clients)
    assert ferret_.rounds[1].download_bytes == len(broadcasts[0]) == (_HEADER.size + _SLOTS.size + 4 * n_tensors
                                                                       + 4 * n_tensors * clients
                                                                       + 4 * merged.coords.size + 4)
    fedavg = fl.run(fl.FedAvg(local=LOCAL), model(), shards, held, rounds=1, device="cpu", seed=4)
    assert all(4 * d < b < 4 * d + 16384 for b in fedavg.rounds[0].upload_bytes.values())
    kseed = fl.run(fl.FedKSeed(k=32, local=fl.LocalTraining(steps=2, lr=1e-5)), model(), shards, held, rounds=1,
                   device="cpu", seed=4)
    assert set(kseed.rounds[0].upload_bytes.values()) == {4 * 32}


def test_flora_with_one_client_is_plain_lora_training(data, tokenizer):
    from peft import LoraConfig, get_peft_model

    shards, held = data
    seed = 5
    federated = model()
    fl.run(fl.FLoRA(ranks=4, local=ADAM), federated, shards[:1], held, rounds=1, device="cpu", seed=seed)

    client = protocol.client_context(seed, 0, 0)
    plain = get_peft_model(model(), LoraConfig(r=4, lora_alpha=8, target_modules=fl.FLoRA(ranks=4).options.modules,
                                               lora_dropout=0.0))
    init_adapter(plain, client.generator)
    fl.train.first_order_steps(plain, shards[0], rng=client.rng, **vars(ADAM))
    plain = plain.merge_and_unload()
    for (name, x), (_, y) in zip(federated.state_dict().items(), plain.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


def test_non_finite_client_is_dropped(data):
    shards, held = data
    m = model()
    before = copy.deepcopy(m.state_dict())
    with pytest.warns(RuntimeWarning, match="client 0 dropped"):
        result = fl.run(fl.FedAvg(local=fl.LocalTraining(steps=2, lr=1e30)), m, shards[:1], held, rounds=1, device="cpu",
                        seed=6)
    assert result.rounds[0].dropped == [0]
    for name, x in m.state_dict().items():
        assert torch.equal(x, before[name])


def test_merge_packets_reconstructs_the_weighted_mean():
    rng = np.random.default_rng(0)
    updates = [{"a": torch.from_numpy(rng.standard_normal(3000).astype(np.float32)),
                "b": torch.from_numpy(rng.standard_normal((40, 50)).astype(np.float32) * (i + 1))} for i in range(3)]
    packets = [ferret.compress(u, seed=77, budget=60 + 20 * i) for i, u in enumerate(updates)]  # counts differ
    assert len({tuple(p.counts) for p in packets}) > 1
    weights = [0.5, 0.3, 0.2]
    merged = ferret.reconstruct(ferret.merge_packets(packets, weights), like=updates[0])
    want = {k: sum(w * ferret.reconstruct(p, like=updates[0])[k] for w, p in zip(weights, packets)) for k in "ab"}
    for k in "ab":
        torch.testing.assert_close(merged[k], want[k], rtol=1e-4, atol=1e-4)
    with pytest.raises(ferret.PacketError, match="another round seed"):
        ferret.merge_packets([packets[0], ferret.compress(updates[0], seed=78, budget=60)])


@pytest.mark.parametrize("bases", ["shared", "client", "disjoint"])
def test_ferret_server_applies_the_weighted_mean_of_reconstructions(bases):
    from ferret.fl.algorithms import ClientContext, RoundContext

    rng = np.random.default_rng(1)
    net = torch.nn.Linear(30, 20)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    basis = "hadamard" if bases == "disjoint" else "rademacher"
    algorithm = fl.Ferret(budget=40, bases=bases, basis=basis, momentum=0.5)
    weights = [0.6, 0.4]
    expected_velocity = None
    for t in range(2):
        ctx = RoundContext(round=t, round_seed=100 + t, clients=[0, 1])
        updates = [{n: torch.from_numpy(rng.standard_normal(p.shape).astype(np.float32))
                    for n, p in net.named_parameters()} for _ in weights]
        places = [algorithm.place(ClientContext(t, c, ctx.round_seed, None, None, (0, 1)), ferret.Layout.of(updates[0]))
                  for c in range(2)]
        packets = [ferret.compress(u, place.seed, 40, basis=place.basis, slot=place.slot, slots=place.slots)
                   for place, u in zip(places, updates)]
        assert (packets[0].round_seed == packets[1].round_seed) == (bases != "client")
        algorithm.aggregate(net, [p.to_bytes() for p in packets], weights, ctx)
        mean = {n: sum(w * ferret.reconstruct(p, like=updates[0])[n] for w, p in zip(weights, packets)) for n in start}
        broadcast = ferret.Packet.split(algorithm.broadcast)
        assert len(broadcast) == (2 if bases == "client" else 1)
        for n in start:
            rebuilt = sum(ferret.reconstruct(p, like=updates[0])[n] for p in broadcast)
            torch.testing.assert_close(rebuilt, mean[n], rtol=1e-5, atol=1e-5)
        expected_velocity = mean if expected_velocity is None else {
            n: 0.5 * expected_velocity[n] + mean[n] for n in start}
        start = {n: start[n] + expected_velocity[n] for n in start}
        for n, p in net.named_parameters():
            torch.testing.assert_close(p.detach(), start[n], rtol=1e-5, atol=1e-5)
    restored = fl.Ferret(budget=40, bases=bases, basis=basis, momentum=0.5)
    restored.load_state_dict(algorithm.state_dict())
    assert restored.velocity.keys() == algorithm.velocity.keys()


def test_ferret_warns_once_when_srht_moves_a_small_share_of_the_model(data):
    shards, _ = data
    algorithm = fl.Ferret(budget=100, local=LOCAL, basis="srht:16")  # K·B = 1600 of 260K weights
    ctx = protocol.client_context(1, 0, 0)
    with pytest.warns(RuntimeWarning, match="moves at most 1% of the weights"):
        algorithm.client_update(model(), shards[0], ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        algorithm.client_update(model(), shards[0], ctx)  # once only
        fl.Ferret(budget=100, local=LOCAL, basis="rademacher").client_update(model(), shards[0], ctx)


def test_ferret_rejects_unknown_options():
    with pytest.raises(ValueError, match="bases must be one of 'auto', 'shared', 'client', 'disjoint', got 'own'"):
        fl.Ferret(bases="own")
    with pytest.raises(ValueError, match="momentum must be in"):
        fl.Ferret(momentum=1.0)
    with pytest.raises(ValueError, match="bad Hadamard size in 'srht:100'"):
        fl.Ferret(basis="srht:100")
    with pytest.raises(ValueError, match="bases='disjoint' needs basis='hadamard'"):
        fl.Ferret(basis="rademacher", bases="disjoint")


def test_disjoint_bases_take_the_clients_places_and_the_server_checks_them(data):
    shards, _ = data
    algorithm = fl.Ferret(budget=300, local=LOCAL, basis="hadamard", bases="disjoint")
    net = model()
    ctx = protocol.client_context(1, 0, 2, [0, 2, 5])
    packet = ferret.Packet.from_bytes(algorithm.client_update(model(), shards[0], ctx))
    assert (packet.slot, packet.slots, packet.basis) == (1, 3, "hadamard:1024")
    algorithm.check_upload(packet.to_bytes(), net, ctx)
    other = protocol.client_context(1, 0, 5, [0, 2, 5])
    with pytest.raises(fl.MalformedUpload, match="rows of slot 1 of 3, not 2 of 3"):
        algorithm.check_upload(packet.to_bytes(), net, other)
    with pytest.raises(ValueError, match="client 2 is not among the round's 2 clients"):
        algorithm.client_update(model(), shards[0], protocol.client_context(1, 0, 2, [0, 5]))


def test_packets_split_from_a_concatenation():
    rng = np.random.default_rng(2)
    packets = [ferret.compress(torch.from_numpy(rng.standard_normal(500).astype(np.float32)), seed=s, budget=10 + s)
               for s in range(3)]
    wire = b"".join(p.to_bytes() for p in packets)
    assert ferret.Packet.split(wire) == packets
    with pytest.raises(ferret.PacketError):
        ferret.Packet.split(wire[:-3])


# --- data ------------------------------------------------------------------------------------------


def test_synthetic_data_split_is_deterministic_and_non_iid():
    train = fl.synthetic_tasks(40, seed=0)
    a = fl.partition(train, "dirichlet", 5, seed=9, alpha=0.3, min_per_client=2)
    b = fl.partition(train, "dirichlet", 5, seed=9, alpha=0.3, min_per_client=2)
    assert a == b and sum(map(len, a)) == len(train) and min(map(len, a)) >= 2
    shares = [max(np.unique([e.category for e in s], return_counts=True)[1]) / len(s) for s in a]
    assert max(shares) > 0.4  # some client is dominated by one task family
    with pytest.raises(DataError, match="cannot give 200 clients"):
        fl.partition(train, "dirichlet", 200, seed=0, alpha=0.5, min_per_client=2)


def test_holdout_is_stratified():
    examples = fl.synthetic_tasks(40, seed=0)  # 5 families x 40
    train, held = fl.holdout(examples, 50, seed=0)
    assert len(held) == 50 and len(train) == 150
    assert sorted(np.unique([e.category for e in held], return_counts=True)[1]) == [10] * 5


def test_loss_covers_response_tokens_only(tokenizer):
    enc = fl.encode([fl.Example("Spell cat backwards.", "tac", "reverse")], tokenizer)
    labels = enc.labels[0]
    assert tokenizer.decode([t for t in labels if t != -100], skip_special_tokens=True).strip() == "tac"
    assert labels[-1] == tokenizer.eos_token_id


def test_bad_data_files_are_refused(tmp_path):
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text(json.dumps({"instruction": "a", "response": "b", "category": "c"}) + "\n{\"instruction\": 1}\n")
    with pytest.raises(DataError, match="dolly.jsonl:2: not a Dolly record"):
        fl.load_dolly(dolly)
    tasks = tmp_path / "ni"
    tasks.mkdir()
    (tasks / "task001_add.json").write_text(json.dumps(
        {"Definition": ["Add the numbers."], "Instances": [{"input": "1 2", "output": ["3"]}]}))
    loaded = fl.load_natural_instructions(tasks)
    assert loaded == {"task001_add": [fl.Example("Add the numbers.", "3", "task001_add", "1 2")]}
    (tasks / "task002_bad.json").write_text(json.dumps({"Instances": []}))
    with pytest.raises(DataError, match="task002_bad.json: not a Natural Instructions task"):
        fl.load_natural_instructions(tasks)


def shared_asset(relative: str) -> Path:
    """A dataset under ../shared/assets (datasets never ship with the repo), or skip the test."""
    path = Path(__file__).resolve().parents[2] / "shared/assets/data" / relative
    if not path.is_file():
        pytest.skip(f"{relative} is not on this machine (datasets never ship with the repo)")
    return path


def test_real_dolly_loads_when_present():
    path = shared_asset("dolly/databricks-dolly-15k.jsonl")
    examples = fl.load_dolly(path)
    assert len(examples) > 15000 and len({e.category for e in examples}) == 8


# --- references and evaluation --------------------------------------------------------------------

def test_centralized_and_standalone_references_learn(data):
    from ferret.fl.references import centralized, standalone

    shards, held = data
    pooled = centralized(model(), shards, held, LOCAL, rounds=2, device="cpu", seed=0)
    assert pooled.final_eval_loss < pooled.initial_eval_loss - 0.5
    base = model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    alone = standalone(base, shards, held, LOCAL, rounds=2, device="cpu", seed=0)
    assert alone.final_eval_loss < alone.initial_eval_loss - 0.5
    assert len(alone.rounds[0].local_seconds) == len(shards)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # each client trained a copy


def test_mmlu_scores_the_most_likely_letter(tmp_path, tokenizer):
    letters = "ABCD"
    records = [{"instruction": "Answer.", "input": f"Question: {q}? Options: A. red, B. blue, C. one, D. cat",
                "output": f"The answer is: {letters[i % 4]}. x", "class": "toy"}
               for i, q in enumerate(["what color is the sky", "how many suns", "which is a pet", "what is red",
                                      "what is big", "who runs"])]
    path = tmp_path / "mmlu.json"
    path.write_text(json.dumps(records))
    questions = fl.load_mmlu(path)
    m = model()
    got = fl.mmlu_accuracy(m, tokenizer, questions)
    # naive: the log-likelihood of every token after the prompt, one sequence at a time
    correct = 0
    with torch.no_grad():
        for q in questions:
            # the plain template (stories260K has no chat template), written out
            prompt = tokenizer(f"### Instruction:\n{q.instruction}\n\n### Input:\n{q.context}\n\n### Response:\n")["input_ids"]
            scores = []
            for x in letters:
                ids = prompt + tokenizer(f"The answer is: {x}", add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(m(input_ids=torch.tensor([ids])).logits[0].float(), -1)
                scores.append(sum(float(logp[p - 1, ids[p]]) for p in range(len(prompt), len(ids))))
            correct += letters[int(np.argmax(scores))] == q.response
    assert got == correct / len(questions)
    path.write_text(json.dumps(records[:1] + [{"instruction": "x", "input": "y", "output": "no answer"}]))
    with pytest.raises(fl.DataError, match="record 1 is not an MMLU question"):
        fl.load_mmlu(path)
    path.write_bytes(b'[{"instruction": "caf\xe9"}]')
    with pytest.raises(fl.DataError, match="not UTF-8 text"):
        fl.load_mmlu(path)


def test_real_mmlu_subset_loads_when_present():
    path = shared_asset("mmlu/mmlu_test_1444.json")
    questions = fl.load_mmlu(path)
    assert len(questions) == 1444 and {q.response for q in questions} == set("ABCD")


def test_both_engines_take_sampling_and_seeding_from_the_round_protocol(data, monkeypatch):
    """The embedded loop and the Flower strategy and client call ferret.fl.protocol for every
    client a round samples and seeds: spies on it see every call, so no engine keeps a copy."""
    pytest.importorskip("flwr", reason="the [flower] extra is not installed")
    from flwr.app import Context, RecordDict

    from ferret.fl.config import Config
    from ferret.flower.apps import FLOWER_KEYS
    from ferret.flower.client import local_update
    from ferret.flower.strategy import AlgorithmStrategy

    calls = {"round_context": [], "client_context": []}
    for name in calls:
        real = getattr(protocol, name)
        monkeypatch.setattr(protocol, name, lambda *a, _real=real, _name=name: calls[_name].append(a) or _real(*a))
    shards, held = data
    fl.run(fl.FedAvg(local=fl.LocalTraining(steps=1)), model(), shards, held, rounds=2, device="cpu", seed=9,
           fraction=0.67)
    assert [a[1] for a in calls["round_context"]] == [0, 1]
    sampled = {(t, c) for t in (0, 1) for c in protocol.sample(9, t, 3, 0.67)}
    assert {a[1:3] for a in calls["client_context"]} == sampled and all(a[0] == 9 for a in calls["client_context"])

    config = Config(algorithm="fedavg", clients=3, rounds=1, seed=9, steps=1, synthetic_per_family=20, n_eval=20,
                    rouge_samples=0, device="cpu")
    strategy = AlgorithmStrategy(fl.FedAvg(), model(), clients=3, seed=9, fraction=0.67)
    strategy.nodes = {99: 10}  # no node runs the round's clients: nothing is sent, the round is still drawn
    assert list(strategy.configure_train(1, None, None, grid=None)) == []
    assert calls["round_context"][-1] == (9, 0, 3, 0.67) and strategy.round_context.clients == [0, 2]
    context = Context(run_id=1, node_id=10, node_config={}, state=RecordDict(), run_config={})
    info = {"round": 0, "round-seed": ferret.block_seed(9, 0), "client": 0, "since": 0}
    local_update(info, {}, context, config, dict(FLOWER_KEYS))
    assert calls["client_context"][-1] == (9, 0, 0, [0, 1, 2])  # the client draws the round's sample (fraction 1)
