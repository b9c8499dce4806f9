"""One federated experiment from a :class:`~ferret.fl.config.Config` to a results directory.

The directory holds ``config.toml`` (the resolved configuration), ``metrics.jsonl`` (one record
per client per round and one per round), ``summary.md``, ``loss.png``, ``model/`` (the final
weights in safetensors, with the tokenizer), ``run.log`` and ``checkpoint.safetensors`` (the
server state after the last finished round, for :func:`run` with ``resume=True``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint, models, references, report
from .config import REFERENCES, RUNTIME_KEYS, Config, ConfigError
from .data import (DataError, Encoded, Example, dirichlet_split, encode, holdout, load_dolly,
                   load_natural_instructions, synthetic_tasks)
from .evaluate import eval_loss, load_mmlu, mmlu_accuracy, rouge_l
from .runtime import Runtime
from .simulation import RunResult
from .simulation import run as run_rounds

RESULT_FILES = ("config.toml", "metrics.jsonl", "checkpoint.safetensors", "summary.md")


@dataclass
class Setup:
    """Everything a run needs, loaded and checked before any training starts."""

    config: Config
    model: torch.nn.Module
    tokenizer: object
    shards: list[Encoded]
    eval_data: Encoded
    eval_examples: list[Example]
    mmlu: list[Example]
    runtime: Runtime             # the model is on its device


def prepare(config: Config) -> Setup:
    """Load the model (onto the configured device) and data and split them as ``config`` says;
    raises :class:`ConfigError`, :class:`~ferret.fl.data.DataError` or
    :class:`~ferret.fl.models.ModelError` on bad input."""
    if config.algorithm not in REFERENCES:
        config.build_algorithm()  # options are checked before the model loads
    runtime = config.runtime()
    model, tokenizer = models.load(config.model)
    runtime.place(model)
    train, held = holdout(examples_of(config), config.n_eval, seed=config.seed)
    if Path(config.data).is_dir():  # Natural Instructions: one client per task, as many as there are
        by_task: dict[str, list[Example]] = {}
        for ex in train:
            by_task.setdefault(ex.category, []).append(ex)
        if config.clients > len(by_task):
            raise DataError(f"{config.clients} clients asked for, but {config.data} holds {len(by_task)} tasks")
        parts = [by_task[t] for t in sorted(by_task)[: config.clients]]
    else:
        parts = dirichlet_split(train, config.clients, config.alpha, seed=config.seed,
                                min_per_client=config.min_per_client)
    enc = dict(max_prompt=config.max_prompt, max_length=config.max_length)
    mmlu = load_mmlu(config.mmlu, config.mmlu_questions) if config.mmlu else []
    return Setup(config, model, tokenizer, [encode(p, tokenizer, **enc) for p in parts], encode(held, tokenizer, **enc),
                 held, mmlu, runtime)


def examples_of(config: Config) -> list[Example]:
    """The configured dataset's examples."""
    if config.data == "synthetic":
        return synthetic_tasks(config.synthetic_per_family, seed=config.seed)
    path = Path(config.data)
    if path.is_dir():
        return [ex for task in load_natural_instructions(path).values() for ex in task]
    if path.suffix == ".jsonl" or path.is_file():
        return load_dolly(path)
    raise DataError(f"data {config.data!r} is neither 'synthetic', a Dolly .jsonl file nor a Natural "
                    f"Instructions directory")


def check_out_dir(out: Path, resume: bool) -> None:
    """Refuse an output directory that cannot be written, or that holds results when not resuming.
    Creates nothing."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a directory")
    if not resume and out.is_dir() and any((out / f).exists() for f in RESULT_FILES):
        raise ConfigError(f"{out} already holds the results of a run: continue it with --resume {out}, "
                          f"or choose another --out")
    if resume and not (out / "checkpoint.safetensors").is_file():
        raise ConfigError(f"{out} holds no checkpoint to resume from")
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to output directory {out}: {existing} is not a writable directory")


def saved_settings(out: Path) -> dict:
    """The settings of the run saved in ``out`` (a dict, not yet checked: its device may be
    one this machine lacks)."""
    return _toml(checkpoint.config_of(out / "checkpoint.safetensors"))


def resumed_config(out: Path, given: Config | None) -> Config:
    """The configuration saved in ``out``; ``given`` (if any) must equal it except for where it
    computes (device, dtype, backend: a run may resume on another machine), and is returned."""
    saved = saved_settings(out)
    if given is None:
        return Config.from_dict(saved, str(out / "config.toml"))
    runtime = {k: getattr(given, k) for k in RUNTIME_KEYS}
    a = given.to_dict()
    b = Config.from_dict({**saved, **runtime}, str(out / "config.toml")).to_dict()
    if a != b:
        key = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        raise ConfigError(f"{out} holds a run of another configuration: {key} is {b.get(key)!r} there, "
                          f"{a.get(key)!r} here")
    return given


def run(config: Config | None, out: str | Path, *, resume: bool = False, progress: bool = True,
        echo=print) -> RunResult:
    """Run the experiment into ``out`` (resuming the run there when ``resume``); returns its records.

    ``echo`` receives one line per round. Bad input raises before anything is written.
    """
    out = Path(out)
    check_out_dir(out, resume)
    if resume:
        config = resumed_config(out, config)
    elif config is None:
        config = Config()
    setup = prepare(config)
    out.mkdir(parents=True, exist_ok=True)
    log = _logger(out / "run.log")
    (out / "config.toml").write_text(config.dumps(), encoding="utf-8")
    log.info("%s on %s, %s, %d clients, %d rounds", config.algorithm, config.model, config.data,
             config.clients, config.rounds)

    def say(line: str) -> None:
        log.info(line)
        echo(line)

    extra = {}
    if setup.mmlu and not resume:
        extra["mmlu"] = mmlu_accuracy(setup.model, setup.tokenizer, setup.mmlu, runtime=setup.runtime)
    if config.algorithm in REFERENCES:
        result = _run_reference(setup, out, say, extra)
    else:
        result = _run_federated(setup, out, resume, progress, say, extra)
    final = {"kind": "end", "round": len(result.rounds), "eval_loss": result.final_eval_loss}
    scored = config.algorithm != "standalone"  # standalone leaves one model per client, none global
    if config.rouge_samples and scored:
        final["rouge_l"] = _rouge(setup)
    if setup.mmlu and scored:
        final["mmlu"] = mmlu_accuracy(setup.model, setup.tokenizer, setup.mmlu, runtime=setup.runtime)
    if scored:
        models.save(setup.model, setup.tokenizer, out / "model")
    report.plot({config.algorithm: result}, out / "loss.png", title=f"{config.algorithm} on {config.model}")
    report.append_metrics(out / "metrics.jsonl", [final])
    summary = report.Summary.of(config.algorithm, result, rouge_l=final.get("rouge_l"))
    # summary.md comes last: its presence marks a finished run (ferret compare --resume skips it)
    (out / "summary.md").write_text(f"# {config.algorithm}\n\n" + report.table([summary]), encoding="utf-8")
    say(f"done: eval loss {result.initial_eval_loss:.4f} -> {result.final_eval_loss:.4f}"
        + (f", Rouge-L {100 * final['rouge_l']:.2f}" if "rouge_l" in final else "") + f"; results in {out}")
    return result


def _run_federated(setup: Setup, out: Path, resume: bool, progress: bool, say, extra: dict) -> RunResult:
    config = setup.config
    algorithm = config.build_algorithm()
    metrics, ckpt = out / "metrics.jsonl", out / "checkpoint.safetensors"
    config_toml = config.dumps()
    if resume:
        previous = checkpoint.load(ckpt, setup.model, algorithm)
        report.write_metrics(metrics, previous, _start_extra(metrics))  # drop lines of a round cut short
        say(f"resuming after round {len(previous.rounds)} of {config.rounds}")
    else:
        previous = RunResult(initial_eval_loss=eval_loss(setup.model, setup.eval_data, runtime=setup.runtime))
        report.write_metrics(metrics, previous, extra)

    def on_round(record) -> None:
        if config.rouge_every and (record.round + 1) % config.rouge_every == 0:
            record.rouge_l = _rouge(setup)
        checkpoint.save(ckpt, setup.model, algorithm, so_far, config_toml)
        report.append_metrics(metrics, report.round_lines(record))
        say(_round_line(record, config.rounds))

    so_far = RunResult(previous.initial_eval_loss, list(previous.rounds))  # the engine appends each round
    return run_rounds(algorithm, setup.model, setup.shards, setup.eval_data, rounds=config.rounds,
                      fraction=config.fraction, seed=config.seed, weighting=config.weighting,
                      progress=progress, on_round=on_round, resume=so_far, device=config.device, dtype=config.dtype,
                      backend=config.backend)


def _run_reference(setup: Setup, out: Path, say, extra: dict) -> RunResult:
    config = setup.config
    train = getattr(references, config.algorithm)
    local = config.local(references.LocalTraining())
    metrics = out / "metrics.jsonl"
    report.write_metrics(metrics, RunResult(eval_loss(setup.model, setup.eval_data, runtime=setup.runtime)), extra)

    def on_round(record):
        report.append_metrics(metrics, report.round_lines(record))
        say(_round_line(record, config.rounds))

    return train(setup.model, setup.shards, setup.eval_data, local, rounds=config.rounds, seed=config.seed,
                 on_round=on_round, device=config.device, dtype=config.dtype)


def _rouge(setup: Setup) -> float:
    config = setup.config
    return rouge_l(setup.model, setup.tokenizer, setup.eval_examples[: config.rouge_samples],
                   max_new_tokens=config.max_new_tokens, max_prompt=config.max_prompt, runtime=setup.runtime)


def _start_extra(metrics: Path) -> dict:
    try:
        first = json.loads(metrics.read_text(encoding="utf-8").splitlines()[0])
    except (OSError, IndexError, json.JSONDecodeError):
        return {}
    return {k: v for k, v in first.items() if k not in ("kind", "round", "eval_loss")}


def _round_line(record, rounds: int) -> str:
    sent = sum(record.upload_bytes.values())
    local = max(record.local_seconds.values(), default=0.0)
    line = (f"round {record.round + 1}/{rounds}: eval loss {record.eval_loss:.4f}, "
            f"sent {report.human_bytes(sent)} from {len(record.upload_bytes)} clients, "
            f"local {local:.1f} s (slowest client), aggregation {record.aggregate_seconds:.2f} s")
    if record.dropped:
        line += f", dropped clients {record.dropped}"
    if record.rouge_l is not None:
        line += f", Rouge-L {100 * record.rouge_l:.2f}"
    return line


def _logger(path: Path) -> logging.Logger:
    log = logging.getLogger(f"ferret.run.{path}")
    log.setLevel(logging.INFO)
    log.propagate = False
    if not log.handlers:
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
    return log


def _toml(text: str) -> dict:
    from .config import tomllib

    return tomllib.loads(text)


