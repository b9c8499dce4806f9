"""A run never ends quietly broken: a round that leaves it broken stops it with one message, a
non-zero exit status, valid metrics and the last good round's checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from ferret.fl import experiment, health
from ferret.fl.checkpoint import load as load_checkpoint
from ferret.fl.config import Config
from ferret.fl.results import RoundRecord, read_metrics
from test_cli import SMALL, ferret


def strict_lines(path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON: a bare NaN or Infinity raises."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def record(eval_loss: float = 3.0, dropped=()) -> RoundRecord:
    return RoundRecord(round=2, eval_loss=eval_loss, clients=[0, 1, 2], dropped=list(dropped),
                       upload_bytes={c: 10 for c in range(3) if c not in dropped}, download_bytes=0,
                       local_seconds={c: 0.1 for c in range(3) if c not in dropped}, aggregate_seconds=0.0)


class Vocab(torch.nn.Linear):
    class config:  # what a Hugging Face model carries
        vocab_size = 512


@pytest.mark.parametrize("rec,weight,message", [
    (record(float("nan")), 1.0, "round 3: the eval loss is nan"),
    (record(13.0), 1.0, "round 3: the eval loss is 13, more than 2 times that of guessing uniformly over the 512"),
    (record(dropped=[0, 1, 2]), 1.0, r"round 3: every client was dropped \(clients \[0, 1, 2\]"),
    (record(), 2e4, "round 3: a weight is 2e\\+04"),
    (record(), float("inf"), "round 3: a weight is not finite"),
    (record(), float("nan"), "round 3: a weight is not finite"),
])
def test_a_broken_round_is_named_with_its_likely_cause(rec, weight, message):
    model = Vocab(4, 4)
    with torch.no_grad():
        model.weight[1, 2] = weight
    with pytest.raises(health.RunDiverged, match=message) as err:
        health.check_round(rec, model, lr=0.3)
    assert "lower the learning rate (lr 0.3)" in str(err.value)


def test_a_healthy_round_passes():
    model = Vocab(4, 4)
    health.check_round(record(12.4, dropped=[1]), model, lr=0.1)  # below 2 ln 512 = 12.48; one client left
    idle = RoundRecord(round=0, eval_loss=3.0, clients=[], dropped=[], upload_bytes={}, download_bytes=0,
                       local_seconds={}, aggregate_seconds=0.0)
    health.check_round(idle, torch.nn.Linear(2, 2))  # no client sampled, no vocabulary: nothing to say
    # Flower's server: no eval data (NaN by design), and a round that dropped every client goes on
    health.check_round(record(float("nan"), dropped=[0, 1, 2]), model, scored=False, every_client_dropped=False)


def test_a_diverging_run_stops_with_one_message_and_status_1(tmp_path):
    out = tmp_path / "run"
    proc = ferret("run", *SMALL, "--lr", "1000", "--out", out)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ferret run: stopped: round 1: every client was dropped"), last
    assert "lower the learning rate (lr 1000)" in last and "no checkpoint was written" in last
    lines = strict_lines(out / "metrics.jsonl")
    assert [x["kind"] for x in lines] == ["start", "round"] and lines[1]["dropped"] == [0, 1, 2]
    assert not (out / "checkpoint.safetensors").exists() and not (out / "model").exists()


def test_the_checkpoint_left_is_the_last_good_rounds(tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = Config(clients=3, rounds=3, steps=2, n_eval=10, synthetic_per_family=10, rouge_samples=0)
    checked = health.check_round

    def third_round_breaks(rec, model, **kw):
        if rec.round == 2:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        checked(rec, model, **kw)

    monkeypatch.setattr(health, "check_round", third_round_breaks)
    with pytest.raises(health.RunDiverged, match=r"round 3: a weight is not finite.*checkpoint.safetensors holds "
                                                 r"round 2, the last good one"):
        experiment.run(config, out, progress=False, echo=lambda line: None)
    result, end = read_metrics(out / "metrics.jsonl")
    assert [r.round for r in result.rounds] == [0, 1, 2] and not end
    assert strict_lines(out / "metrics.jsonl")[-1]["round"] == 3  # the broken round is on record
    model = experiment.prepare(config).model
    saved = load_checkpoint(out / "checkpoint.safetensors", model, config.build_algorithm())
    assert len(saved.rounds) == 2 and all(torch.isfinite(p).all() for p in model.parameters())


def test_a_comparison_shows_a_stopped_entry_and_runs_the_others(tmp_path):
    out = tmp_path / "cmp"
    proc = ferret("compare", "fedavg:lr=1000", "fedavg", *SMALL, "--out", out)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("ferret compare: stopped: 1 of 2 entries stopped broken "
                                                            "(round 1: every client was dropped")
    rows = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in rows] == ["fedavg:lr=1000 (stopped after round 0)", "fedavg"]
    assert rows[1]["final_eval_loss"] < rows[1]["initial_eval_loss"]  # the other entry ran to its end
    assert (out / "fedavg" / "summary.md").is_file() and not (out / "fedavg_lr=1000" / "summary.md").exists()
