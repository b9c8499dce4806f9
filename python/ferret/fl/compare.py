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
from .config import Config, ConfigError, parse_assignments
from .health import RunDiverged
from .results import RunResult, read_metrics

TABLE, JSON, PLOT = "table.md", "compare.json", "loss.png"  # what a comparison writes besides its runs


def parse_entry(entry: str, base: Config) -> tuple[str, Config]:
    """(label, config) for one entry on top of ``base``; raises :class:`ConfigError`."""
    name, _, rest = entry.partition(":")
    name = name.strip()
    fields = {f.name for f in dataclasses.fields(Config)} - {"options", "algorithm"}
    settings, options = {}, {}
    for key, value in parse_assignments(rest, repr(entry)).items():
        (settings if key in fields else options)[key] = value
    inherited = base.options if name == base.algorithm else {}  # options belong to one algorithm
    values = {**base.to_dict(), **settings, "algorithm": name, "options": {**inherited, **options}}
    return entry, Config.from_dict(values, entry)


def label_dir(label: str) -> str:
    """A directory name for an entry's label."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)


def compare(base: Config, entries: list[str], out: str | Path, *, target: float | None = None,
            resume: bool = False, progress: bool = True, echo=print) -> dict[str, RunResult]:
    """Run every entry into ``out/<label>`` (when ``resume``, skipping finished ones and continuing
    the others), then write ``table.md``, ``compare.json`` and ``loss.png`` in ``out``. ``target``
    (default: the worst final eval loss, so every run reaches it) is the loss the table counts
    rounds to. Every entry and directory is checked before anything runs (:class:`ConfigError`,
    or :class:`~ferret.fl.checkpoint.CheckpointError` for a damaged checkpoint). An entry whose
    run stops broken (:class:`~ferret.fl.health.RunDiverged`) is shown up to its last good round
    and the others still run; then :class:`~ferret.fl.health.RunDiverged` names the stopped
    entries, after the table is written. Returns the records by label."""
    out = Path(out)
    if not entries:
        raise ConfigError("nothing to compare: name at least one algorithm")
    runs = [parse_entry(e, base) for e in entries]
    labels = [label for label, _ in runs]
    _check_distinct(out, labels)
    _check_out(out, resume)
    plans = [_plan(out, label, config, resume) for label, config in runs]
    results, finals, stopped = {}, {}, {}
    for (label, _), (config, cont) in zip(runs, plans):
        sub = out / label_dir(label)
        echo(f"== {label} ==")
        if config is None:
            results[label], finals[label] = read_metrics(sub / experiment.METRICS)
            if results[label].rounds and results[label].rounds[-1].rouge_l is None:
                results[label].rounds[-1].rouge_l = finals[label].get("rouge_l")  # the end's, for the plot
            echo(f"already finished: eval loss {results[label].final_eval_loss:.4f}")
            continue
        try:
            results[label] = experiment.run(config, sub, resume=cont, progress=progress, echo=echo)
        except RunDiverged as err:
            echo(f"stopped: {err}")
            stopped[label] = str(err)
            records, _ = read_metrics(sub / experiment.METRICS)
            results[label] = dataclasses.replace(records, rounds=records.rounds[:-1])  # up to the last good round
        finals[label] = read_metrics(sub / experiment.METRICS)[1]
    if target is None:
        finished = [r for label, r in results.items() if label not in stopped] or list(results.values())
        target = max(r.final_eval_loss for r in finished)
    names = {label: f"{label} (stopped after round {len(results[label].rounds)})" if label in stopped else label
             for label in labels}
    rows = [report.Summary.of(names[label], results[label], target, finals[label].get("rouge_l")) for label in labels]
    who = f"{base.clients} clients" if base.clients is not None else "clients by the partition"
    title = f"{base.model}, {Path(base.data).name}, {who}, {base.rounds} rounds"
    (out / TABLE).write_text(f"# {title}\n\n" + report.table(rows, target), encoding="utf-8")
    (out / JSON).write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1), encoding="utf-8")
    report.plot(results, out / PLOT, title=title)
    echo(report.table(rows, target))
    if stopped:
        raise RunDiverged(f"{len(stopped)} of {len(labels)} entries stopped broken ({'; '.join(stopped.values())}); "
                          f"{out / TABLE} shows each up to its last good round")
    return results


def _check_out(out: Path, resume: bool) -> None:
    """Refuse ``out`` if a comparison's own files would clash with what it holds (any of them when
    not resuming, a directory in their place when resuming)."""
    present = [name for name in (TABLE, JSON, PLOT) if (out / name).exists()]
    if resume:
        present = [name for name in present if (out / name).is_dir()]
        if present:
            raise ConfigError(f"{out / present[0]} is in the way: a comparison writes a file there; move it")
    elif TABLE in present:
        raise ConfigError(f"{out} already holds a comparison: continue it with --resume --out {out}, "
                          f"or choose another --out")
    elif present:
        raise ConfigError(f"{out} already holds {', '.join(present)}, which a comparison writes: move "
                          f"{'it' if len(present) == 1 else 'them'}, or choose another --out")


def _plan(out: Path, label: str, config: Config, resume: bool) -> tuple[Config | None, bool]:
    """(the config to run the entry ``label`` with, None when its run is finished; whether to resume
    its checkpoint), with its directory checked as :func:`~ferret.fl.experiment.run` would."""
    sub = out / label_dir(label)
    if resume and (sub / experiment.SUMMARY).exists():
        _check_finished(sub)
        return None, False
    cont = (sub / experiment.CHECKPOINT).is_file()
    if cont and not resume:
        raise ConfigError(f"{out} holds an unfinished comparison ({sub} holds a run): continue it with "
                          f"--resume --out {out}, or choose another --out")
    experiment.check_out_dir(sub, resume=cont)
    return (experiment.resumed_config(sub, config) if cont else config), cont


def _check_distinct(out: Path, labels: list[str]) -> None:
    """Raise :class:`ConfigError` when two entries would run into one directory."""
    dirs = [label_dir(label) for label in labels]
    for i, d in enumerate(dirs):
        if d in dirs[:i]:
            raise ConfigError(f"an entry is named twice: {labels[dirs.index(d)]!r} and {labels[i]!r} would both "
                              f"run in {out / d}")


def _check_finished(sub: Path) -> None:
    """Raise :class:`ConfigError` unless the finished run in ``sub`` has metrics that read back."""
    try:
        read_metrics(sub / experiment.METRICS)
    except (OSError, ValueError, KeyError, StopIteration) as err:
        raise ConfigError(f"{sub / experiment.METRICS} cannot be read back ({type(err).__name__}: {err}): "
                          f"move {sub} away to run that entry again") from None
