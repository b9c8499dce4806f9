"""Several algorithms on identical client splits and seeds, one table and overlaid plots.

An entry is an algorithm name, optionally with settings after a colon, e.g. ``ferret``,
``ferret:budget=1000,bases=client`` or ``flora:lr=0.003``: keys of
:class:`~ferret.fl.config.Config` override the shared settings for that entry, other keys are
options of the algorithm (added to the shared config's options when it names the same
algorithm). Each entry runs into its own subdirectory.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from . import experiment, report
from .config import Config, ConfigError, tomllib
from .simulation import RunResult


def parse_entry(entry: str, base: Config) -> tuple[str, Config]:
    """(label, config) for one entry on top of ``base``; raises :class:`ConfigError`."""
    name, _, rest = entry.partition(":")
    fields = {f.name for f in dataclasses.fields(Config)} - {"options", "algorithm"}
    settings, options = {}, {}
    for item in filter(None, re.split(r",(?![^\[]*\])", rest)):  # commas inside [...] belong to a list
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"{entry!r}: settings are key=value, got {item!r}")
        (settings if key in fields else options)[key.strip()] = parse_value(value.strip())
    inherited = base.options if name == base.algorithm else {}  # options belong to one algorithm
    values = {**base.to_dict(), **settings, "algorithm": name, "options": {**inherited, **options}}
    return entry, Config.from_dict(values, entry)


def parse_value(text: str):
    """A TOML value (number, boolean, quoted string, array), or the text itself as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def label_dir(label: str) -> str:
    """A directory name for an entry's label."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)


def compare(base: Config, entries: list[str], out: str | Path, *, target: float | None = None,
            resume: bool = False, progress: bool = True, echo=print) -> dict[str, RunResult]:
    """Run every entry into ``out/<label>`` (resuming unfinished ones when ``resume``), then write
    ``table.md``, ``compare.json`` and ``loss.png`` in ``out``. ``target`` (default: the worst
    final eval loss, so every run reaches it) is the loss the table counts rounds to. Returns the
    records by label."""
    out = Path(out)
    if not entries:
        raise ConfigError("nothing to compare: name at least one algorithm")
    runs = [parse_entry(e, base) for e in entries]  # every entry is checked before anything runs
    labels = [label for label, _ in runs]
    if len(set(labels)) != len(labels):
        raise ConfigError("an entry is named twice")
    if (out / "table.md").exists() and not resume:
        raise ConfigError(f"{out} already holds a comparison: continue it with --resume {out}, or choose another --out")
    if not resume:
        for label, _ in runs:
            experiment.check_out_dir(out / label_dir(label), resume=False)
    results, finals = {}, {}
    for label, config in runs:
        sub = out / label_dir(label)
        echo(f"== {label} ==")
        if resume and (sub / "summary.md").exists():
            results[label], finals[label] = read_metrics(sub / "metrics.jsonl")
            echo(f"already finished: eval loss {results[label].final_eval_loss:.4f}")
            continue
        cont = resume and (sub / "checkpoint.safetensors").exists()
        results[label] = experiment.run(None if cont else config, sub, resume=cont, progress=progress, echo=echo)
        finals[label] = read_metrics(sub / "metrics.jsonl")[1]
    if target is None:
        target = max(r.final_eval_loss for r in results.values())
    rows = [report.Summary.of(label, results[label], target, finals[label].get("rouge_l")) for label in labels]
    title = f"{base.model}, {Path(base.data).name}, {base.clients} clients, {base.rounds} rounds"
    (out / "table.md").write_text(f"# {title}\n\n" + report.table(rows, target), encoding="utf-8")
    (out / "compare.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1), encoding="utf-8")
    report.plot(results, out / "loss.png", title=title)
    echo(report.table(rows, target))
    return results


def read_metrics(path: str | Path) -> tuple[RunResult, dict]:
    """(records, the end record) from a finished run's metrics.jsonl."""
    from .simulation import RoundRecord

    lines = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    start = next(x for x in lines if x["kind"] == "start")
    rounds = []
    for x in (x for x in lines if x["kind"] == "round"):
        clients = [c for c in lines if c["kind"] == "client" and c["round"] == x["round"]]
        rounds.append(RoundRecord(x["round"] - 1, x["eval_loss"], x["clients"], x["dropped"],
                                  {c["client"]: c["upload_bytes"] for c in clients},
                                  x["download_bytes"] // max(len(x["clients"]), 1),
                                  {c["client"]: c["local_seconds"] for c in clients}, x["aggregate_seconds"],
                                  x.get("rouge_l")))
    end = next((x for x in lines if x["kind"] == "end"), {})
    return RunResult(start["eval_loss"], rounds), end
