"""A run's records and their two serialisations (checkpoint JSON, metrics.jsonl), written and read back."""

from __future__ import annotations

import json

import pytest

from ferret import fl
from ferret.fl import server, simulation
from ferret.fl.results import (RoundRecord, RunResult, append_metrics, from_json, read_metrics, round_lines,
                               start_extra, to_json, write_metrics)


def _result() -> RunResult:
    return RunResult(initial_eval_loss=7.25, rounds=[
        RoundRecord(round=0, eval_loss=5.5, clients=[0, 1, 2], dropped=[1], upload_bytes={0: 100, 2: 120},
                    download_bytes=64, local_seconds={0: 0.25, 2: 0.125}, aggregate_seconds=0.01),
        RoundRecord(round=1, eval_loss=4.75, clients=[0, 2], dropped=[], upload_bytes={2: 100, 0: 90},
                    download_bytes=32, local_seconds={0: 0.5, 2: 0.375}, aggregate_seconds=0.02, rouge_l=0.3125),
    ])


def test_metrics_writer_and_reader_round_trip(tmp_path):
    path = tmp_path / "metrics.jsonl"
    result = _result()
    write_metrics(path, RunResult(initial_eval_loss=result.initial_eval_loss), {"mmlu": 0.25})
    for record in result.rounds:
        append_metrics(path, round_lines(record))
    end = {"kind": "end", "round": 2, "eval_loss": 4.75, "rouge_l": 0.5}
    append_metrics(path, [end])
    assert read_metrics(path) == (result, end)
    with open(path, "a") as f:
        f.write('{"kind": "cli')  # a run killed while appending
    assert start_extra(path) == {"mmlu": 0.25}
    write_metrics(path, result)  # rewriting gives the same records
    assert read_metrics(path) == (result, {})
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_checkpoint_json_round_trips():
    result = _result()
    assert from_json(json.loads(json.dumps(to_json(result)))) == result


def test_records_live_in_one_module_and_are_built_with_keywords():
    assert server.RoundRecord is fl.RoundRecord is RoundRecord
    assert server.RunResult is simulation.RunResult is fl.RunResult is RunResult
    with pytest.raises(TypeError):
        RunResult(7.25)


def test_a_non_finite_loss_is_written_as_null_and_read_back_as_nan(tmp_path):
    import math

    path = tmp_path / "metrics.jsonl"
    result = RunResult(initial_eval_loss=float("nan"), rounds=[
        RoundRecord(round=0, eval_loss=float("inf"), clients=[0], dropped=[], upload_bytes={0: 8}, download_bytes=0,
                    local_seconds={0: 0.5}, aggregate_seconds=0.0)])
    write_metrics(path, result)
    lines = [json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name}")) for line in open(path)]
    assert lines[0]["eval_loss"] is None and lines[-1]["eval_loss"] is None
    back, _ = read_metrics(path)
    assert math.isnan(back.initial_eval_loss) and math.isnan(back.rounds[0].eval_loss)


def test_the_download_per_round_counts_the_rounds_that_download():
    from ferret.fl.report import Summary

    row = Summary.of("x", _result())  # round 1 downloads nothing: clients start from the model they hold
    assert row.download_per_round == 32 and row.upload_per_round == (100 + 120 + 100 + 90) / 4
