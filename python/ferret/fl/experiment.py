"""One federated experiment from a :class:`~ferret.fl.config.Config` to a results directory.

The directory holds ``config.toml`` (every setting, defaults resolved: rerunning from it
reproduces the run), ``metrics.jsonl`` (one record per client per round and one per round),
``summary.md``, ``loss.png``, ``model/`` (the final
weights in safetensors, with the tokenizer), ``run.log`` and ``checkpoint.safetensors`` (the
server state after the last finished round, for :func:`run` with ``resume=True``).

A run never writes over anything in its directory (:data:`RUN_FILES` names all it writes), but
for what a run killed before its first checkpoint left there: a new run may replace that, and
resuming it starts it over from its ``config.toml``.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint, health, models, privacy, references, report
from .config import DEFAULT_CLIENTS, REFERENCES, RUNTIME_KEYS, Config, ConfigError, tomllib
from .data import DataError, Encoded, Example, decode_utf8, encode, holdout, load_natural_instructions, read_bytes, \
    synthetic_tasks
from .evaluate import eval_loss, load_mmlu, mmlu_accuracy, rouge_l
from .partitions import partition
from .results import RunResult, append_metrics, read_lines, round_lines, start_extra, temporary, write_metrics
from .runtime import Runtime
from .server import check_shards
from .simulation import run as run_rounds
from .sources import is_saved_dataset, load_examples
from .templates import prompt_format

CONFIG, LOG, METRICS, CHECKPOINT, SUMMARY, PLOT, MODEL = ("config.toml", "run.log", "metrics.jsonl",
                                                         "checkpoint.safetensors", "summary.md", "loss.png", "model")
# What a run writes before its first checkpoint, in this order: what a run killed by then leaves,
# and what a rerun may replace (the temporary files of the atomic writes included).
BEFORE_CHECKPOINT = (CONFIG, LOG, METRICS, temporary(Path(METRICS)).name, temporary(Path(CHECKPOINT)).name)
RUN_FILES = (*BEFORE_CHECKPOINT, CHECKPOINT, SUMMARY, PLOT, MODEL)  # every name a run writes in its directory
RUN_DIRS = (MODEL,)                                                 # those of them that are directories
RESULT_FILES = (CHECKPOINT, METRICS, SUMMARY)                       # those that hold what a run measured


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
    prompt_format: object        # ferret.fl.templates: how examples become tokens, for training and scoring


def prepare(config: Config) -> Setup:
    """Load and split the data, then load the model (onto the configured device) and tokenise, as
    ``config`` says; every data problem (an empty client included) is found here, before a run
    writes anything. Raises :class:`ConfigError`, :class:`~ferret.fl.data.DataError` or
    :class:`~ferret.fl.models.ModelError` on bad input."""
    algorithm = None if config.algorithm in REFERENCES else config.build_algorithm()
    runtime = config.runtime()
    train, held = holdout(examples_of(config), config.n_eval, seed=config.seed)
    config = with_clients(config, train)
    parts = client_examples(config, train)
    mmlu = load_mmlu(config.mmlu, config.mmlu_questions) if config.mmlu else []
    model, tokenizer = models.load(config.model)
    if algorithm is not None:
        try:
            algorithm.check_model(model)  # options against the model, before anything is written
        except ValueError as err:
            raise ConfigError(f"{config.algorithm} options: {err}") from None
    fmt = prompt_format(tokenizer, config.template)
    runtime.place(model)
    enc = dict(max_prompt=config.max_prompt, max_length=config.max_length, template=fmt)
    shards = [encode(p, tokenizer, **enc) for p in parts]
    check_shards(shards, config.max_examples)
    return Setup(config=config, model=model, tokenizer=tokenizer, shards=shards,
                 eval_data=encode(held, tokenizer, **enc), eval_examples=held, mmlu=mmlu, runtime=runtime,
                 prompt_format=fmt)


def examples_of(config: Config) -> list[Example]:
    """The configured dataset's examples: synthetic, a Natural Instructions directory, or a file /
    saved dataset read with ``config.columns`` (:mod:`ferret.fl.sources`). Raises
    :class:`~ferret.fl.data.DataError`."""
    if config.data == "synthetic":
        return synthetic_tasks(config.synthetic_per_family, seed=config.seed)
    if _natural_instructions(config):
        if config.columns:
            raise DataError(f"{config.data} is a Natural Instructions directory, whose fields are fixed: columns "
                            f"({', '.join(sorted(config.columns))}) map a data file's columns; drop them")
        return [ex for task in load_natural_instructions(config.data).values() for ex in task]
    return load_examples(config.data, config.columns)


def _natural_instructions(config: Config) -> bool:
    """Whether ``config.data`` is a Natural Instructions directory (a directory of task files, not
    one written by ``save_to_disk``)."""
    return Path(config.data).is_dir() and not is_saved_dataset(Path(config.data))


def partition_of(config: Config) -> str:
    """The partition ``config`` asks for, ``auto`` resolved: one client per task for a Natural
    Instructions directory, else Dirichlet over the categories."""
    if config.partition != "auto":
        return config.partition
    return "column" if _natural_instructions(config) else "dirichlet"


def with_clients(config: Config, train: list[Example]) -> Config:
    """``config`` with its number of clients resolved: as given, else one per distinct category of
    ``train`` for the column partition, else :data:`~ferret.fl.config.DEFAULT_CLIENTS`. Raises
    :class:`ConfigError` for settings that do not fit that number (malicious clients, a robust
    statistic's round)."""
    if config.known_clients is not None:
        return dataclasses.replace(config, clients=config.known_clients)
    clients = len({ex.category for ex in train}) if partition_of(config) == "column" else DEFAULT_CLIENTS
    return dataclasses.replace(config, clients=clients)


def client_examples(config: Config, train: list[Example]) -> list[list[Example]]:
    """Each client's examples, as ``config.partition`` spreads ``train`` over ``config.clients``
    (``auto``: one client per task for a Natural Instructions directory, else Dirichlet over the
    categories). Raises :class:`~ferret.fl.data.DataError` when a client would hold too few."""
    return partition(train, partition_of(config), config.clients, config.seed, alpha=config.alpha,
                     min_per_client=config.min_per_client, shards_per_client=config.shards_per_client)


def check_out_dir(out: Path, resume: bool) -> None:
    """Refuse, with :class:`ConfigError` saying what to do, an output directory that a run cannot
    write or whose contents it would clash with: any name a run writes (:data:`RUN_FILES`) when
    not resuming, unless the directory holds only what a run killed before its first checkpoint
    left (:func:`killed_before_first_checkpoint`: a rerun replaces it); neither a checkpoint nor
    such a run when resuming; a file where a run writes a directory or the reverse. Leaves
    nothing behind: writability is probed by creating and removing a directory and a file."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a directory")
    if resume:
        _check_resumable(out)
    else:
        _check_fresh(out)
    for name in RUN_FILES:
        if (out / name).exists() and (out / name).is_dir() != (name in RUN_DIRS):
            kind = "directory" if name in RUN_DIRS else "file"
            raise ConfigError(f"{out / name} is in the way: a run writes a {kind} there; move it, or choose "
                              f"another --out")
    _probe_writable(out)


def killed_before_first_checkpoint(out: Path) -> bool:
    """Whether ``out`` holds a run's settings and otherwise only what a run writes before its first
    checkpoint (:data:`BEFORE_CHECKPOINT`, its metrics no more than the start record)."""
    present = _present(out)
    return CONFIG in present and set(present) <= set(BEFORE_CHECKPOINT) and _only_started(out / METRICS)


def saved_settings(out: Path) -> dict:
    """The settings of the run saved in ``out`` (a dict, not yet checked: its device may be one this
    machine lacks): its checkpoint's, or, for a run killed before its first checkpoint, its
    ``config.toml``. Raises :class:`~ferret.fl.checkpoint.CheckpointError` or :class:`ConfigError`."""
    if (out / CHECKPOINT).is_file():
        return tomllib.loads(checkpoint.config_of(out / CHECKPOINT))
    path = out / CONFIG
    try:
        return tomllib.loads(decode_utf8(read_bytes(path), str(path), ConfigError))
    except (DataError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{err}; no round of the run in {out} finished: start it again with "
                          f"ferret run --out {out} and the settings it had") from None


def resumed_config(out: Path, given: Config | None) -> Config:
    """The configuration saved in ``out``; ``given`` (if any) must equal it except for where it
    computes (device, dtype, backend: a run may resume on another machine), and is returned.
    Raises :class:`ConfigError` or :class:`~ferret.fl.checkpoint.CheckpointError`."""
    saved = saved_settings(out)
    if given is None:
        return Config.from_dict(saved, str(out / CONFIG))
    runtime = {k: getattr(given, k) for k in RUNTIME_KEYS}
    if given.clients is None and "clients" in saved:  # resolved from the data when the run began
        given = dataclasses.replace(given, clients=saved["clients"])
    a = given.resolved().to_dict()
    b = Config.from_dict({**saved, **runtime}, str(out / CONFIG)).resolved().to_dict()
    if a != b:
        key = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        raise ConfigError(f"{out} holds a run of another configuration: {key} is {b.get(key)!r} there, "
                          f"{a.get(key)!r} here")
    return given


def run(config: Config | None, out: str | Path, *, resume: bool = False, progress: bool = True,
        echo=print) -> RunResult:
    """Run the experiment into ``out`` (resuming the run there when ``resume``: from its checkpoint,
    or from the start when it was killed before its first one); returns its records.

    ``echo`` receives one line per round. Bad input raises (:class:`ConfigError`,
    :class:`~ferret.fl.data.DataError`, :class:`~ferret.fl.models.ModelError`,
    :class:`~ferret.fl.checkpoint.CheckpointError`) before anything is written.
    """
    out = Path(out)
    check_out_dir(out, resume)
    if resume:
        config = resumed_config(out, config)
    elif config is None:
        config = Config()
    config = config.resolved()  # config.toml and the checkpoint hold every setting, defaults included
    setup = prepare(config)
    config = setup.config  # the number of clients resolved from the data
    algorithm = None if config.algorithm in REFERENCES else config.build_algorithm()
    from_checkpoint = resume and (out / CHECKPOINT).is_file()
    previous = checkpoint.load(out / CHECKPOINT, setup.model, algorithm) if from_checkpoint else None
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(config.dumps(), encoding="utf-8")
    log = _logger(out / LOG)
    log.info("%s on %s, %s, %d clients, %d rounds", config.algorithm, config.model, config.data,
             config.clients, config.rounds)
    say = _teller(log, echo)
    if resume and not from_checkpoint:
        say(f"no round of the run in {out} had finished: starting over")
    extra = {}
    if setup.mmlu and not from_checkpoint:
        extra["mmlu"] = mmlu_accuracy(setup.model, setup.tokenizer, setup.mmlu, template=setup.prompt_format,
                                      runtime=setup.runtime)
    if algorithm is None:
        result = _run_reference(setup, out, say, extra)
    else:
        result = _run_federated(setup, algorithm, out, previous, progress, say, extra)
    _finish(setup, result, out, say)
    return result


def _finish(setup: Setup, result: RunResult, out: Path, say) -> None:
    """Score the final model and write the end record, the model, the plot and, last, the summary."""
    config = setup.config
    final = {"kind": "end", "round": len(result.rounds), "eval_loss": result.final_eval_loss}
    scored = config.algorithm != "standalone"  # standalone leaves one model per client, none global
    if config.rouge_samples and scored:
        last = result.rounds[-1] if result.rounds else None
        final["rouge_l"] = last.rouge_l if last is not None and last.rouge_l is not None else _rouge(setup)
        if last is not None:
            last.rouge_l = final["rouge_l"]  # for the plot
    if setup.mmlu and scored:
        final["mmlu"] = mmlu_accuracy(setup.model, setup.tokenizer, setup.mmlu, template=setup.prompt_format,
                                      runtime=setup.runtime)
    if scored:
        models.save(setup.model, setup.tokenizer, out / MODEL)
    report.plot({config.algorithm: result}, out / PLOT, title=f"{config.algorithm} on {config.model}, {Path(config.data).name} data, "
                                                             f"{config.clients} clients")
    append_metrics(out / METRICS, [final])
    summary = report.Summary.of(config.algorithm, result, rouge_l=final.get("rouge_l"))  # the start's from result
    # summary.md comes last: its presence marks a finished run (ferret compare --resume skips it)
    (out / SUMMARY).write_text(f"# {config.algorithm}\n\n" + report.table([summary]), encoding="utf-8")
    start_rouge = f"{result.initial_rouge_l:.2f} -> " if result.initial_rouge_l is not None else ""
    say(f"done: eval loss {result.initial_eval_loss:.4f} -> {result.final_eval_loss:.4f}"
        + (f", Rouge-L {start_rouge}{final['rouge_l']:.2f}" if "rouge_l" in final else "") + f"; results in {out}")


def _run_federated(setup: Setup, algorithm, out: Path, previous: RunResult | None, progress: bool, say,
                   extra: dict) -> RunResult:
    """Run the rounds (those after ``previous``, the records restored from the checkpoint, when
    given), checkpointing and recording each."""
    config = setup.config
    metrics, ckpt = out / METRICS, out / CHECKPOINT
    config_toml = config.dumps()
    if previous is None:
        previous = _start(setup, metrics, extra)
        say(_start_line(previous, setup))
    else:
        write_metrics(metrics, previous, start_extra(metrics))  # drop lines of a round cut short
        say(f"resuming after round {len(previous.rounds)} of {config.rounds}")

    rounds = privacy.rounds_allowed(algorithm.options, config.clients, config.fraction, config.rounds)
    if rounds < config.rounds:
        say(f"target_epsilon {algorithm.options.target_epsilon} allows {rounds} of the {config.rounds} rounds: round "
            f"{rounds + 1} would spend ε = "
            f"{privacy.spent(algorithm.options, config.clients, config.fraction, rounds + 1):.3g}")

    def on_round(record) -> None:
        kept = (f"{ckpt} holds round {record.round}, the last good one (ferret run --resume continues from it)"
                if ckpt.is_file() else "no round had ended well, so no checkpoint was written")
        _check_health(record, setup, metrics, algorithm.local.lr, kept)
        if config.rouge_every and (record.round + 1) % config.rouge_every == 0:
            record.rouge_l = _rouge(setup)
        checkpoint.save(ckpt, setup.model, algorithm, so_far, config_toml)
        append_metrics(metrics, round_lines(record))
        say(_round_line(record, config.rounds))

    so_far = RunResult(initial_eval_loss=previous.initial_eval_loss, rounds=list(previous.rounds),
                       initial_rouge_l=previous.initial_rouge_l)  # the engine appends
    return run_rounds(algorithm, setup.model, setup.shards, setup.eval_data, rounds=rounds,
                      fraction=config.fraction, seed=config.seed, weighting=config.weighting,
                      progress=progress, on_round=on_round, resume=so_far, device=config.device, dtype=config.dtype,
                      backend=config.backend, attack=config.attack, malicious=config.malicious,
                      max_examples=config.max_examples)


def _run_reference(setup: Setup, out: Path, say, extra: dict) -> RunResult:
    """Run the configured reference (centralized or standalone training), recording each round."""
    config = setup.config
    train = getattr(references, config.algorithm)
    local = config.local(references.LocalTraining())
    metrics = out / METRICS
    start = _start(setup, metrics, extra)
    say(_start_line(start, setup))

    def on_round(record):
        _check_health(record, setup, metrics, local.lr, "a reference run keeps no checkpoint")
        append_metrics(metrics, round_lines(record))
        say(_round_line(record, config.rounds))

    result = train(setup.model, setup.shards, setup.eval_data, local, rounds=config.rounds, seed=config.seed,
                   on_round=on_round, device=config.device, dtype=config.dtype)
    result.initial_rouge_l = start.initial_rouge_l
    return result


def _check_health(record, setup: Setup, metrics: Path, lr: float, kept: str) -> None:
    """Stop the run (:class:`~ferret.fl.health.RunDiverged`) when ``record``'s round left it broken,
    with the round's records appended to ``metrics`` and the message saying what was ``kept``."""
    try:
        health.check_round(record, setup.model, lr=lr)
    except health.RunDiverged as err:
        append_metrics(metrics, round_lines(record))
        raise health.RunDiverged(f"{err}; {kept}") from None


def _start(setup: Setup, metrics: Path, extra: dict) -> RunResult:
    """The records before the first round (the starting model's eval loss and, when the run scores
    generations, its Rouge-L), written to ``metrics`` with ``extra``."""
    start = RunResult(initial_eval_loss=eval_loss(setup.model, setup.eval_data, runtime=setup.runtime))
    if setup.config.rouge_samples and setup.config.algorithm != "standalone":
        start.initial_rouge_l = _rouge(setup)
    write_metrics(metrics, start, extra)
    return start


def _start_line(start: RunResult, setup: Setup) -> str:
    """The line that reports the starting model's scores."""
    line = f"round 0 (the starting model, {setup.prompt_format.name} prompts): eval loss {start.initial_eval_loss:.4f}"
    if start.initial_rouge_l is not None:
        scored = min(setup.config.rouge_samples, len(setup.eval_examples))
        line += f", Rouge-L {start.initial_rouge_l:.2f} on {scored} held-out examples"
    return line


def _rouge(setup: Setup) -> float:
    config = setup.config
    return rouge_l(setup.model, setup.tokenizer, setup.eval_examples[: config.rouge_samples],
                   max_new_tokens=config.max_new_tokens, max_prompt=config.max_prompt,
                   template=setup.prompt_format, runtime=setup.runtime)


def _round_line(record, rounds: int) -> str:
    sent = sum(record.upload_bytes.values())
    local = max(record.local_seconds.values(), default=0.0)
    line = (f"round {record.round + 1}/{rounds}: eval loss {record.eval_loss:.4f}, "
            f"sent {report.human_bytes(sent)} from {len(record.upload_bytes)} clients, "
            f"local {local:.1f} s (slowest client), aggregation {record.aggregate_seconds:.2f} s")
    if record.dropped:
        line += f", dropped clients {record.dropped}"
    if record.bounded:
        line += f", {record.bounded} bounded"
    if record.skipped is not None:
        line += f"; the model was left as it was ({record.skipped})"
    if record.rouge_l is not None:
        line += f", Rouge-L {record.rouge_l:.2f}"
    if record.epsilon is not None:
        line += f", ε = {record.epsilon:.3g}"
    return line


def _check_fresh(out: Path) -> None:
    """Refuse ``out`` if a new run there would clash with what it holds (see :func:`check_out_dir`)."""
    present = _present(out)
    if not present or killed_before_first_checkpoint(out):
        return
    if set(present) & set(RESULT_FILES):
        how = f"continue it with --resume {out}, or" if CHECKPOINT in present else "move it, or"
        raise ConfigError(f"{out} already holds the results of a run: {how} choose another --out")
    raise ConfigError(f"{out} already holds {', '.join(present)}, which a run writes: move "
                      f"{'it' if len(present) == 1 else 'them'}, or choose another --out")


def _check_resumable(out: Path) -> None:
    """Refuse ``out`` if it holds neither a checkpoint nor a run killed before its first one."""
    if (out / CHECKPOINT).is_file() or killed_before_first_checkpoint(out):
        return
    if set(_present(out)) & set(RESULT_FILES):
        raise ConfigError(f"{out} holds no checkpoint to resume from, only results (centralized and standalone "
                          f"runs keep no checkpoint): choose another --out to run again")
    raise ConfigError(f"{out} holds no checkpoint to resume from: start a run with --out {out}")


def _present(out: Path) -> list[str]:
    """The names of :data:`RUN_FILES` that exist in ``out``."""
    return [name for name in RUN_FILES if (out / name).exists() or (out / name).is_symlink()]


def _only_started(metrics: Path) -> bool:
    """Whether ``metrics`` is missing or holds no record but the start record."""
    try:
        return not metrics.exists() or all(x.get("kind") == "start" for x in read_lines(metrics))
    except (OSError, ValueError):
        return False


def _probe_writable(out: Path) -> None:
    """Raise :class:`ConfigError` unless a directory and a file can be created (and are removed
    again) in ``out``, or in its nearest existing ancestor when it does not exist yet."""
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cannot write to output directory {out}: {existing} is not a directory")
    try:
        probe = Path(tempfile.mkdtemp(prefix=".ferret-probe-", dir=existing))
        try:
            (probe / "probe").write_bytes(b"")
            (probe / "probe").unlink()
        finally:
            probe.rmdir()
    except OSError as err:
        raise ConfigError(f"cannot write to output directory {out}: {err.strerror} in {existing}") from None


def _teller(log: logging.Logger, echo):
    """A function that writes a line to ``log`` and to ``echo``."""
    def say(line: str) -> None:
        log.info(line)
        echo(line)

    return say


def _logger(path: Path) -> logging.Logger:
    log = logging.getLogger(f"ferret.run.{path}")
    log.setLevel(logging.INFO)
    log.propagate = False
    if not log.handlers:
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
    return log
