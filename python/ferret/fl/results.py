"""A run's records and their two serialisations, in one place.

:class:`RoundRecord` and :class:`RunResult` (built with keywords only) are what the engines
return. A checkpoint carries them as JSON (:func:`to_json`, :func:`from_json`); a results
directory carries them as ``metrics.jsonl`` (:func:`write_metrics`, :func:`append_metrics`,
:func:`read_metrics`): a ``start`` record, then per round one ``client`` record per client and
one ``round`` record, and an ``end`` record once the run is done. A value that is not finite
(an eval loss without eval data) is written as ``null``, so every line is valid JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(kw_only=True)
class RoundRecord:
    """One round's accounting: the columns of the Ferret paper's Tables 2 and 3."""

    round: int
    eval_loss: float
    clients: list[int]
    dropped: list[int]
    upload_bytes: dict[int, int]       # per client
    download_bytes: int                # per client: the previous round's broadcast
    local_seconds: dict[int, float]    # per client
    aggregate_seconds: float
    rouge_l: float | None = None       # when the caller scores generations this round
    epsilon: float | None = None       # differential privacy spent after this round (at the run's δ)
    bounded: int = 0                   # uploads a bound or a clip cut (ferret.fl.bounds)
    skipped: str | None = None         # why the model was left as it was this round (None: it was updated)


@dataclass(kw_only=True)
class RunResult:
    """A run's eval loss (and Rouge-L, when scored) before its first round and the records of the
    rounds done."""

    initial_eval_loss: float
    rounds: list[RoundRecord] = field(default_factory=list)
    initial_rouge_l: float | None = None

    @property
    def final_eval_loss(self) -> float:
        """The eval loss after the last round done (before the first when none is)."""
        return self.rounds[-1].eval_loss if self.rounds else self.initial_eval_loss


def to_json(result: RunResult) -> dict:
    """``result`` as plain JSON values (what :func:`from_json` reads back)."""
    return {"initial_eval_loss": result.initial_eval_loss, "initial_rouge_l": result.initial_rouge_l,
            "rounds": [dataclasses.asdict(r) for r in result.rounds]}


def from_json(data: dict) -> RunResult:
    """The :class:`RunResult` that :func:`to_json` gave ``data`` for; raises KeyError, TypeError or
    ValueError when ``data`` is not such a dict."""
    rounds = []
    for r in data["rounds"]:
        r = dict(r)
        for key in ("upload_bytes", "local_seconds"):
            r[key] = {int(c): v for c, v in r[key].items()}  # JSON object keys are strings
        rounds.append(RoundRecord(**r))
    return RunResult(initial_eval_loss=data["initial_eval_loss"], rounds=rounds,
                     initial_rouge_l=data.get("initial_rouge_l"))


def round_lines(record: RoundRecord) -> list[dict]:
    """The metrics.jsonl records of one round: one per client, then the round's overall record."""
    lines = [{"kind": "client", "round": record.round + 1, "client": c, "upload_bytes": record.upload_bytes[c],
              "local_seconds": record.local_seconds[c]} for c in record.upload_bytes]
    overall = {"kind": "round", "round": record.round + 1, "eval_loss": record.eval_loss, "clients": record.clients,
               "dropped": record.dropped, "upload_bytes": sum(record.upload_bytes.values()),
               "download_bytes": record.download_bytes * len(record.clients),
               "local_seconds": sum(record.local_seconds.values()), "aggregate_seconds": record.aggregate_seconds,
               "bounded": record.bounded}
    if record.skipped is not None:
        overall["skipped"] = record.skipped
    if record.rouge_l is not None:
        overall["rouge_l"] = record.rouge_l
    if record.epsilon is not None:
        overall["epsilon"] = record.epsilon
    return lines + [overall]


def write_metrics(path: str | Path, result: RunResult, extra: dict | None = None) -> None:
    """Rewrite ``path`` atomically with every record of ``result``: a start record (with the
    starting Rouge-L when scored) carrying ``extra``, then the rounds' records. Raises OSError."""
    path = Path(path)
    tmp = temporary(path)
    start = {"kind": "start", "round": 0, "eval_loss": result.initial_eval_loss}
    if result.initial_rouge_l is not None:
        start["rouge_l"] = result.initial_rouge_l
    with open(tmp, "w", encoding="utf-8") as f:
        _write_lines(f, [{**start, **(extra or {})}])
        for record in result.rounds:
            _write_lines(f, round_lines(record))
    replace(tmp, path)


def append_metrics(path: str | Path, lines: list[dict]) -> None:
    """Append ``lines`` (records such as :func:`round_lines` gives) to ``path``. Raises OSError."""
    with open(path, "a", encoding="utf-8") as f:
        _write_lines(f, lines)


def read_lines(path: str | Path) -> list[dict]:
    """Every record of the metrics.jsonl file ``path``, in order. Raises OSError, or ValueError
    for text that is not UTF-8 or a line that is not a JSON object."""
    lines = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not all(isinstance(x, dict) for x in lines):
        raise ValueError(f"{path}: a line is not a JSON object")
    return lines


def read_metrics(path: str | Path) -> tuple[RunResult, dict]:
    """(the records, the end record or ``{}``) from the metrics.jsonl file ``path``, inverse of
    :func:`write_metrics` and :func:`append_metrics`. Raises OSError, ValueError or KeyError for
    a file they did not write."""
    lines = read_lines(path)
    start = next(x for x in lines if x["kind"] == "start")
    rounds = [_record(x, [c for c in lines if c["kind"] == "client" and c["round"] == x["round"]])
              for x in lines if x["kind"] == "round"]
    end = next((x for x in lines if x["kind"] == "end"), {})
    return RunResult(initial_eval_loss=_float(start["eval_loss"]), rounds=rounds,
                     initial_rouge_l=start.get("rouge_l")), end


def start_extra(path: str | Path) -> dict:
    """What the start record of the metrics.jsonl file ``path`` carries beyond its kind, round and
    eval loss (``extra`` of :func:`write_metrics`); ``{}`` when that record cannot be read. Only
    the first line is read: a run killed while appending leaves a last line cut short."""
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return {}
    if not isinstance(first, dict):
        return {}
    return {k: v for k, v in first.items() if k not in ("kind", "round", "eval_loss", "rouge_l")}


def temporary(path: Path) -> Path:
    """Where a new version of ``path`` is written before :func:`replace` puts it in place."""
    return path.with_name(path.name + ".tmp")


def replace(tmp: Path, path: Path) -> None:
    """Put the written file ``tmp`` in place of ``path`` so that a crash at any instant leaves the
    old file or the new one, whole (fsync the file, rename it, fsync the directory). Raises OSError."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _record(line: dict, clients: list[dict]) -> RoundRecord:
    """The :class:`RoundRecord` that :func:`round_lines` gave ``line`` and ``clients`` for."""
    return RoundRecord(round=line["round"] - 1, eval_loss=_float(line["eval_loss"]), clients=line["clients"],
                       dropped=line["dropped"], upload_bytes={c["client"]: c["upload_bytes"] for c in clients},
                       download_bytes=line["download_bytes"] // max(len(line["clients"]), 1),
                       local_seconds={c["client"]: c["local_seconds"] for c in clients},
                       aggregate_seconds=line["aggregate_seconds"], rouge_l=line.get("rouge_l"),
                       epsilon=line.get("epsilon"), bounded=line.get("bounded", 0), skipped=line.get("skipped"))


def _write_lines(f, lines: list[dict]) -> None:
    for line in lines:
        f.write(json.dumps(_json_safe(line), allow_nan=False) + "\n")


def _json_safe(value):
    """``value`` with every non-finite float as None (JSON has no NaN or Infinity; :func:`_float`
    reads None back as NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _float(value) -> float:
    """A loss as metrics.jsonl holds it: a number, or None for one that was not finite (NaN)."""
    return float("nan") if value is None else float(value)
