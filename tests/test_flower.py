"""ferret on Flower: the records each algorithm sends, simulations that reach the embedded loop's
weights bit for bit, faulty clients dropped, and a real deployment (SuperLink and SuperNodes on
127.0.0.1, `flwr run`) that survives a SuperNode killed mid-run. Every process a test starts is
stopped by its own PID."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="the [flower] extra is not installed")

from flwr.app import RecordDict  # noqa: E402

import ferret  # noqa: E402
from ferret import fl  # noqa: E402
from ferret.fl.algorithms.lora import encode_adapter  # noqa: E402
from ferret.fl.config import Config, ConfigError  # noqa: E402
from ferret.fl.algorithms import MalformedUpload  # noqa: E402
from ferret.flower import config_from_run, from_record, to_record  # noqa: E402

APP = Path(__file__).parents[1] / "examples" / "flower"
CHAT_TEMPLATE = Path(__file__).parent / "data" / "chat_template.jinja"
BIN = Path(sys.executable).parent  # Flower's executables sit beside the interpreter that has flwr
# The SuperLink starts flower-superexec by name: the interpreter's bin directory goes first on PATH,
# so the tests run from a virtualenv that is not activated too.
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_TELEMETRY_ENABLED": "0",
       "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
SMALL = dict(clients=3, rounds=2, seed=5, synthetic_per_family=20, n_eval=20, steps=3, lr=0.02, rouge_samples=0)
OPTIONS = {"ferret": {"budget": 500}, "flora": {"ranks": [8, 4, 2]}}
MOMENTUM = {"budget": 500, "bases": "client", "momentum": 0.5}  # server state the clients replay too
DISJOINT = {"budget": 500, "basis": "hadamard", "bases": "disjoint"}  # slots from the round's sample, drawn by each client
SHARED = {"budget": 500, "bases": "shared", "allocation": "uniform"}  # aligned coordinates: robust statistics, DP


def small_config(algorithm: str, **changes) -> Config:
    return Config(**{"algorithm": algorithm, "options": OPTIONS.get(algorithm, {}), **SMALL, **changes})


def embedded_weights(config: Config) -> dict[str, torch.Tensor]:
    """The global weights after the embedded loop's run of ``config`` (one torch thread, as the apps)."""
    from ferret.fl.experiment import prepare

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        setup = prepare(config)
        fl.run(config.build_algorithm(), setup.model, setup.shards, setup.eval_data, rounds=config.rounds,
               seed=config.seed, fraction=config.fraction, weighting=config.weighting, device=config.device,
               dtype=config.dtype, backend=config.backend, attack=config.attack, malicious=config.malicious)
        return setup.model.state_dict()
    finally:
        torch.set_num_threads(threads)


def flower_weights(out: Path, config: Config) -> dict[str, torch.Tensor]:
    """The global weights the ServerApp saved (a model file with tied weights stored once)."""
    from safetensors.torch import load_model

    from ferret.fl import models

    model, _ = models.load(config.model)
    load_model(model, str(out / "model" / "model.safetensors"))
    return model.state_dict()


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- records -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ferret", "lora"])
def test_every_upload_travels_as_its_own_bytes(kind):
    from ferret.lora import LoraAdapter, LoraTerm

    if kind == "ferret":
        upload = ferret.compress({"w": torch.randn(20, 30)}, seed=7, budget=40).to_bytes()
    else:
        upload = encode_adapter(LoraAdapter({"proj": [LoraTerm(torch.randn(3, 8), torch.randn(5, 3), 1.0)]}))
    record = to_record(upload)
    assert record["upload"]["bytes"].numpy().dtype == np.uint8 and from_record(record) == upload
    with pytest.raises(MalformedUpload, match="no upload"):
        from_record(RecordDict({}))
    record["upload"]["bytes"] = type(record["upload"]["bytes"])(np.zeros((2, 3), np.float32))
    with pytest.raises(MalformedUpload, match="1-d uint8"):
        from_record(record)


def test_run_config_maps_onto_ferret_run_settings():
    config, flower = config_from_run({"algorithm": "flora", "n-eval": 30, "steps": "", "options": "ranks=[8,4]",
                                      "min-replies": 2})
    assert (config.algorithm, config.n_eval, config.steps, config.options) == ("flora", 30, None, {"ranks": [8, 4]})
    assert flower["min-replies"] == 2
    with pytest.raises(ConfigError, match="unknown key 'epochs'"):
        config_from_run({"epochs": 3})
    with pytest.raises(ConfigError, match="reference run"):
        config_from_run({"algorithm": "centralized"})
    with pytest.raises(ConfigError, match="budget must be a positive number"):
        config_from_run({"algorithm": "ferret", "options": "budget=0"})


def test_a_node_config_sets_where_that_node_computes():
    run = {"backend": "core", "device": "cpu"}
    config, _ = config_from_run(run, node_config={"partition-id": 0, "dtype": "bf16"})
    assert (config.device, config.dtype, config.backend) == ("cpu", "bf16", "core")
    if importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1":
        config, _ = config_from_run(run, node_config={"backend": "triton"})
        assert config.backend == "triton"
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        config_from_run({"device": "cpu"}, node_config={"partition-id": 1, "device": "tpu"})


def test_a_data_owner_trains_on_its_own_file(tmp_path):
    from flwr.app import Context, RecordDict

    from ferret.flower.apps import FLOWER_KEYS, local_update

    rows = [{"instruction": f"Name the number {i}.", "context": "", "response": f"It is {i}.", "category": "open_qa"}
            for i in range(7)]
    own = tmp_path / "mine.jsonl"
    own.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = small_config("ferret")
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "data": str(own)}, state=RecordDict(),
                      run_config={})
    round_seed = ferret.block_seed(config.seed, 0)
    info = {"round": 0, "round-seed": round_seed, "client": 0, "since": 0}
    upload, examples, _ = local_update(info, {}, context, config, dict(FLOWER_KEYS))
    assert examples == 7
    assert ferret.Packet.from_bytes(upload).round_seed == round_seed
    assert int(context.state["ferret-sync"]["synced"]) == 0


# -- simulation --------------------------------------------------------------------------------
SIMULATE = """
import json, sys
from flwr.simulation import run_simulation
from ferret.fl.config import Config
from ferret.flower import client_app, server_app
spec = json.loads(sys.argv[1])
config = Config(**spec["config"])
mods = []
if spec.get("faulty"):
    from flwr.app import Message
    def faulty(msg, context, call_next):  # client 1 sends bytes that are no packet; client 2 fails in round 1
        c = int(msg.content["round"]["client"])  # the server's number for this node
        if c == 2 and int(msg.content["round"]["round"]) == 1:
            raise RuntimeError("client 2 crashed")
        reply = call_next(msg, context)
        if c == 1 and not reply.has_error() and "upload" in reply.content:
            upload = reply.content["upload"]["bytes"]
            reply.content["upload"]["bytes"] = type(upload)(upload.numpy()[::-1].copy())
        return reply
    mods = [faulty]
if spec.get("late"):
    import time
    def late(msg, context, call_next):  # client 2 answers round 1 after the server stopped waiting
        if int(msg.content["round"]["client"]) == 2 and int(msg.content["round"]["round"]) == 0:
            time.sleep(spec["late"])
        return call_next(msg, context)
    mods = [late]
if spec.get("node"):
    def node_config(msg, context, call_next):  # as a SuperNode's --node-config would set them
        context.node_config.update(spec["node"])
        reply = call_next(msg, context)
        if "round" in msg.content:  # a training round: its algorithm ran with the node's backend
            from ferret.flower.client import _PROCESS
            backend = next(iter(_PROCESS.values()))[3].runtime.backend
            assert backend == spec["node"]["backend"], backend
        return reply
    mods = [node_config]
flower = spec.get("flower", {})
run_simulation(server_app(config, out=spec["out"], threads=1, **flower),
               client_app(config, threads=1, mods=mods, **flower), num_supernodes=config.clients,
               backend_config={"client_resources": {"num_cpus": 1},
                               "init_args": {"num_cpus": spec.get("slots", 2), "include_dashboard": False}})
"""


def simulate(config: Config, out: Path, **extra) -> subprocess.CompletedProcess:
    spec = {"config": {**config.to_dict()}, "out": str(out), **extra}
    proc = subprocess.run([sys.executable, "-c", SIMULATE, json.dumps(spec)], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and (out / "model" / "model.safetensors").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# Every registered algorithm. ferret-momentum samples 2 of 3 clients per round: clients catch up
# on the rounds they missed, weights and server momentum alike.
ZEROTH = {"lr": 1e-5}
CASES = {"ferret": ("ferret", {}),
         "ferret-momentum": ("ferret", {"options": MOMENTUM, "fraction": 0.67, "rounds": 3}),
         "ferret-disjoint": ("ferret", {"options": DISJOINT, "fraction": 0.67, "rounds": 3}),
         "ferret-paper": ("ferret-paper", {"options": {"budget": 500}}),
         "fedavg": ("fedavg", {}), "fedzo": ("fedzo", ZEROTH), "fedkseed": ("fedkseed", {**ZEROTH, "options": {"k": 16}}),
         "flora": ("flora", {}), "fedit": ("fedit", {"options": {"ranks": 4}}),
         "zeropad": ("zeropad", {"options": {"ranks": [4, 2, 2]}}),
         # every partition gives each client the same examples in both engines; a chat template too
         "fedavg-iid": ("fedavg", {"partition": "iid"}), "fedavg-column": ("fedavg", {"partition": "column", "clients": 5}),
         "fedavg-shards-chat": ("fedavg", {"partition": "shards", "template": str(CHAT_TEMPLATE)}),
         # defences and attacks: the same weights in both engines
         "ferret-trimmed-sign-flip": ("ferret", {"options": {**SHARED, "aggregator": "trimmed-mean", "byzantine": 1},
                                                 "attack": "sign-flip", "malicious": [1]}),
         "fedavg-median-scaled": ("fedavg", {"options": {"aggregator": "median", "norm_bound": 1.0},
                                             "attack": "scale:10", "malicious": [2]}),
         # DP with the default bases: each client's rows its own, noise on every row
         "ferret-dp-central": ("ferret", {"options": {"budget": 500, "dp_clip": 0.5, "dp_noise": 0.7},
                                          "weighting": "equal"}),
         "fedavg-dp-distributed": ("fedavg", {"options": {"dp_clip": 0.5, "dp_noise": 0.2, "dp_mode": "distributed"},
                                              "weighting": "equal"}),
         "flora-dp": ("flora", {"options": {"ranks": [8, 4, 2], "dp_clip": 0.05, "dp_noise": 0.5}, "weighting": "equal"})}


def test_every_algorithm_has_a_simulation_case():
    assert {algorithm for algorithm, _ in CASES.values()} == set(fl.ALGORITHMS)


@pytest.mark.parametrize("case", list(CASES))
def test_simulation_reaches_the_embedded_loops_weights(case, tmp_path):
    algorithm, changes = CASES[case]
    config = small_config(algorithm, **changes)
    simulate(config, tmp_path)
    want = embedded_weights(config)
    got = flower_weights(tmp_path, config)
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    rounds = [m for m in metrics(tmp_path) if m["kind"] == "round"]
    assert len(rounds) == config.rounds and all(not r["dropped"] for r in rounds)
    assert all(len(r["clients"]) == round(config.fraction * config.clients) for r in rounds)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs Triton's interpreter (the CPU half of a Triton/core comparison)")
@pytest.mark.filterwarnings("ignore:basis 'srht.* moves at most:RuntimeWarning")  # small K keeps the interpreter quick
def test_clients_on_triton_and_a_server_on_the_core_reach_the_embedded_loops_weights(tmp_path):
    """SRHT coordinates from the clients' Triton kernels (interpreted), merged and rebuilt by the
    server's core, and the broadcasts replayed with Triton on the clients' replicas: the weights
    of the embedded loop on the core, bit for bit."""
    # lr 1e-3: 64 coordinates of 260K weights make an estimate whose noise breaks the model at lr 0.02
    config = small_config("ferret", options={"budget": 64, "basis": "srht:256"}, device="cpu", backend="core", lr=1e-3)
    proc = simulate(config, tmp_path, node={"backend": "triton"})
    want = embedded_weights(config)
    got = flower_weights(tmp_path, config)
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    rounds = [m for m in metrics(tmp_path) if m["kind"] == "round"]
    assert len(rounds) == config.rounds and all(not r["dropped"] for r in rounds), proc.stdout[-2000:]


def test_malformed_and_failed_clients_are_dropped_and_the_rounds_complete(tmp_path):
    config = small_config("ferret")
    proc = simulate(config, tmp_path, faulty=True)
    rounds = [m for m in metrics(tmp_path) if m["kind"] == "round"]
    assert [r["dropped"] for r in rounds] == [[1], [1, 2]]
    assert all(np.isfinite(r["eval_loss"]) for r in rounds)
    log = proc.stdout + proc.stderr
    assert "round 1: client 1 dropped: not a Ferret packet" in log and "round 2: client 2 dropped: it failed" in log
    # the rounds aggregated what arrived: the model moved in both rounds
    start = next(m for m in metrics(tmp_path) if m["kind"] == "start")["eval_loss"]
    assert rounds[0]["eval_loss"] != start and rounds[1]["eval_loss"] != rounds[0]["eval_loss"]


HOSTILE = "huge,scale:1e6,scale:-100,concentrate,group-size,short,examples:1e15"  # tests/test_hostile.py's uploads


def test_hostile_clients_are_dropped_or_bounded_alike_on_flower_and_in_the_embedded_loop(tmp_path):
    config = small_config("ferret", clients=9, attack=HOSTILE, malicious=[1, 2, 3, 4, 5, 6, 7])
    simulate(config, tmp_path)
    want = embedded_weights(config)
    got = flower_weights(tmp_path, config)
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    rounds = [m for m in metrics(tmp_path) if m["kind"] == "round"]
    assert all(r["dropped"] == [1, 5, 6, 7] and r["bounded"] >= 2 for r in rounds), rounds
    assert all(np.isfinite(r["eval_loss"]) for r in rounds)


class _Grid:
    """The SuperLink's view that the strategy asks: which nodes are connected."""

    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _reply(node: int, upload: bytes | None, examples, seconds=0.5, error: bool = False):
    from flwr.app import Error, Message, MessageType, Metadata, MetricRecord

    metadata = Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id="train", group_id="0", created_at=0.0, ttl=60.0,
                        message_type=MessageType.TRAIN)
    if error:
        return Message(metadata=metadata, error=Error(code=0, reason="the client crashed"))
    content = to_record(upload)
    content["metrics"] = MetricRecord({"num-examples": examples, "local-seconds": seconds})
    return Message(metadata=metadata, content=content)


def test_clients_are_the_nodes_the_superlink_knows_and_their_claims_are_checked(monkeypatch):
    """Client c is the c-th smallest node id; a reply counts only from the node the round sent to,
    once, with an example count from 1 to max_examples and finite seconds; the rest are dropped."""
    from flwr.supercore.task_identity import TaskIdentity

    from ferret.fl.algorithms.uploads import encode_tensors
    from ferret.fl.models import load
    from ferret.flower.strategy import AlgorithmStrategy

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what a ServerApp's process is told
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)
    model, _ = load("stories260k")
    strategy = AlgorithmStrategy(fl.FedAvg(), model, clients=3, seed=1, max_examples=1000, discovery_timeout=1.0)
    messages = list(strategy.configure_train(1, None, None, _Grid([30, 10, 20, 40])))
    assert strategy.nodes == {0: 10, 1: 20, 2: 30}  # node 40 connected late: no client
    assert [(m.metadata.dst_node_id, m.content["round"]["client"]) for m in messages] == [(10, 0), (20, 1), (30, 2)]
    upload = encode_tensors({n: torch.full_like(p, 1e-3) for n, p in model.named_parameters()})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    replies = [_reply(10, upload, 5), _reply(10, upload, 5),  # a second upload from client 0: dropped
               _reply(20, upload, 10**15), _reply(30, upload, -5), _reply(40, upload, 5), _reply(50, upload, 5)]
    strategy.aggregate_train(1, replies)
    record = strategy.result.rounds[-1]
    assert list(record.upload_bytes) == [0] and record.dropped == [1, 2] and record.skipped is None
    assert all(torch.allclose(p.detach(), before[n] + 1e-3) for n, p in model.named_parameters())
    messages = list(strategy.configure_train(2, None, None, _Grid([30, 10, 20, 40])))
    for claim in (float("inf"), float("nan"), 2.5, 1001):
        strategy.configure_train(2, None, None, _Grid([]))
        strategy.aggregate_train(2, [_reply(20, upload, claim), _reply(30, upload, 3, float("inf")),
                                     _reply(10, None, 3, error=True)])
        record = strategy.result.rounds[-1]
        assert not record.upload_bytes and record.dropped == [0, 1, 2] and record.skipped is not None


def test_secagg_mean_equals_the_plain_mean_within_the_documented_bound(tmp_path):
    from ferret.flower.secagg import QUANTIZATION_RANGE, error_bound

    # the plain run unbounded, as the secure sum must be: the server sees no single client's coordinates
    config = small_config("ferret", options={"budget": 500, "allocation": "uniform", "bases": "shared",
                                             "relative_bound": float("inf")})
    proc = simulate(config, tmp_path, flower={"secagg": True, "secagg_range": 16.0})
    assert "coordinates into SecAgg+" in proc.stdout + proc.stderr
    secure = ferret.Packet.from_bytes((tmp_path / "broadcast-0.bin").read_bytes())

    from ferret.fl.experiment import prepare

    setup = prepare(dataclasses.replace(config, rounds=1))
    algorithm = config.build_algorithm()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fl.run(algorithm, setup.model, setup.shards, setup.eval_data, rounds=1, seed=config.seed)
    finally:
        torch.set_num_threads(threads)
    plain = ferret.Packet.from_bytes(algorithm.broadcast)
    assert (secure.round_seed, secure.counts.tolist()) == (plain.round_seed, plain.counts.tolist())
    sizes = np.array([len(s) for s in setup.shards], dtype=np.float64)
    ratios = np.round(sizes / sizes.max() * QUANTIZATION_RANGE) / QUANTIZATION_RANGE
    bound = error_bound(len(sizes), 16.0, ratios) + 1e-6 * np.abs(plain.coords).max()  # + weights' rounding
    error = np.abs(secure.coords - plain.coords).max()
    assert 0 < error <= bound, (error, bound)  # 0 would mean nothing was quantized: not SecAgg+
    rounds = [m for m in metrics(tmp_path) if m["kind"] == "round"]
    assert [r["clients"] for r in rounds] == [[0, 1, 2]] * 2 and all(np.isfinite(r["eval_loss"]) for r in rounds)


def test_secagg_refuses_what_cannot_be_summed():
    from ferret.flower.secagg import check_secure

    with pytest.raises(ConfigError, match="allocation='uniform'"):
        check_secure(fl.Ferret(budget=500, bases="shared"))
    with pytest.raises(ConfigError, match="cannot be summed"):
        check_secure(fl.FLoRA(ranks=[4]))
    with pytest.raises(ConfigError, match="bases='shared'"):
        check_secure(fl.Ferret(budget=500, allocation="uniform"))  # disjoint rows: each client its own
    check_secure(fl.Ferret(budget=500, allocation="uniform", bases="shared"))


def test_a_late_reply_is_left_out_and_the_client_rejoins(tmp_path):
    config = small_config("ferret")  # a slot per client: the sleeper must not keep another client from starting
    proc = simulate(config, tmp_path, late=45.0, slots=3, flower={"round_timeout": 25.0})
    rounds = [m for m in metrics(tmp_path) if m["kind"] == "round"]
    assert [r["dropped"] for r in rounds] == [[2], []], proc.stdout[-2000:]
    assert "round 1: no reply from clients [2]" in proc.stdout + proc.stderr


# -- deployment --------------------------------------------------------------------------------
class Deployment:
    """A SuperLink and SuperNodes on 127.0.0.1, each in its own session, stopped by PID."""

    def __init__(self, root: Path, nodes: int):
        self.root, self.procs = root, {}
        self.port = _free_port()
        self.start("superlink", [str(BIN / "flower-superlink"), "--insecure",
                                 "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                                 "--port", str(self.port), "--database", str(root / "state.db")])
        deadline = time.monotonic() + 120
        while not _accepts(self.port):
            assert time.monotonic() < deadline, (root / "superlink.log").read_text()[-2000:]
            time.sleep(0.5)
        for i in range(nodes):
            self.start(f"supernode{i}", [str(BIN / "flower-supernode"), "--insecure",  # no partition-id: the
                                         "--superlink", f"127.0.0.1:{self.port}",   # server numbers the nodes
                                         "--port", str(_free_port())])
        cli = root / "cli"
        cli.mkdir()
        (cli / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                         f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')

    def start(self, name: str, args: list[str]) -> None:
        home = self.root / name
        home.mkdir()
        log = open(self.root / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(args, env={**ENV, "FLWR_HOME": str(home)}, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def flwr_run(self, run_config: str) -> subprocess.Popen:
        return subprocess.Popen([str(BIN / "flwr"), "run", str(APP), "local", "--stream", "--run-config", run_config],
                                env={**ENV, "FLWR_HOME": str(self.root / "cli")}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the SuperNode and the ClientApp processes it started
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop(self) -> None:
        for name in self.procs:
            self.kill(name)
        assert all(p.poll() is not None for p in self.procs.values())


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_config(config: Config, out: Path, **flower) -> str:
    items = {"clients": config.clients, "rounds": config.rounds, "seed": config.seed, "steps": config.steps,
             "lr": config.lr, "n-eval": config.n_eval, "synthetic-per-family": config.synthetic_per_family,
             "options": ",".join(f"{k}={v}" for k, v in config.options.items()), "out": str(out), "threads": 1,
             **flower}
    return " ".join(f"{k}={json.dumps(v)}" for k, v in items.items())


@pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason="Flower's executables are not installed")
def test_deployment_on_localhost_reaches_the_embedded_loops_weights(tmp_path):
    config = small_config("ferret", clients=2)
    deployment = Deployment(tmp_path, nodes=2)
    try:
        run = deployment.flwr_run(_run_config(config, tmp_path / "out"))
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output[-3000:]
    finally:
        deployment.stop()
    want = embedded_weights(config)
    got = flower_weights(tmp_path / "out", config)
    assert all(torch.equal(got[k], want[k]) for k in want)
    rounds = [m for m in metrics(tmp_path / "out") if m["kind"] == "round"]
    assert [r["clients"] for r in rounds] == [[0, 1], [0, 1]] and all(not r["dropped"] for r in rounds)


@pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason="Flower's executables are not installed")
def test_a_supernode_killed_mid_run_leaves_the_others_finishing(tmp_path):
    config = small_config("ferret", clients=3, rounds=3)
    deployment = Deployment(tmp_path, nodes=3)
    try:
        run = deployment.flwr_run(_run_config(config, tmp_path / "out", **{"round-timeout": 45.0}))
        lines = []
        for line in run.stdout:  # kill SuperNode 2 as soon as the first round is aggregated
            lines.append(line)
            if "round 1: eval loss" in line:
                deployment.kill("supernode2")
                break
        rest, _ = run.communicate(timeout=600)
        output = "".join(lines) + rest
        assert run.returncode == 0, output[-3000:]
    finally:
        deployment.stop()
    rounds = [m for m in metrics(tmp_path / "out") if m["kind"] == "round"]
    assert len(rounds) == 3 and not rounds[0]["dropped"]
    killed = rounds[1]["dropped"]  # the client the server numbered that node (clients follow node ids)
    assert len(killed) == 1 and rounds[2]["dropped"] == killed, [r["dropped"] for r in rounds]
    assert f"round 2: no reply from clients {killed}" in output


def test_a_diverging_flower_run_stops_with_the_message_and_keeps_no_broken_model(tmp_path):
    config = small_config("ferret", lr=0.5)
    spec = {"config": config.to_dict(), "out": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", SIMULATE, json.dumps(spec)], env=ENV, capture_output=True, text=True,
                          timeout=600)
    output = proc.stdout + proc.stderr
    assert "stopped: round 1: the eval loss is" in output and "lower the learning rate (lr 0.5)" in output, \
        output[-3000:]
    lines = [json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name}"))
             for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines if x["kind"] != "client"] == ["start", "round"]
    assert not (tmp_path / "model").exists()
