"""``ferret`` on the command line.

``ferret run``      one federated fine-tuning experiment (with no flags: the offline default)
``ferret compare``  several algorithms on identical splits and seeds, one table and plots
``ferret bench``    the microbenchmarks, then their summary
``ferret demo``     compress and reconstruct a real model's weights, with sizes and error

Bad input (an unknown key, a wrong type, a device, dtype or backend this machine cannot run, a
path that does not load, an output directory that cannot be written or already holds results)
exits with status 2 and one message. A run stopped because a round left it broken (a non-finite
eval loss, weights out of range, every client dropped) exits with status 1 and one message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 1  # a run stopped at a round that left it broken (ferret.fl.health)
# what the `fl` extra installs (pyproject.toml): a run without them says what to install
LOOP_LIBRARIES = {"transformers", "peft", "rouge_score", "tqdm", "matplotlib", "tomli_w", "tomli", "datasets",
                  "flwr_datasets", "dp_accounting"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    if args.command is None:
        parser.print_help()
        return 0
    from .fl.checkpoint import CheckpointError
    from .fl.config import ConfigError
    from .fl.data import DataError
    from .fl.health import RunDiverged
    from .fl.models import ModelError

    try:
        return args.handler(args)
    except (ConfigError, DataError, ModelError, CheckpointError) as err:
        print(f"ferret {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunDiverged as err:
        print(f"ferret {args.command}: stopped: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print(f"ferret {args.command}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as err:
        if err.name not in LOOP_LIBRARIES:
            raise
        print(f"ferret {args.command}: error: the loop needs {err.name}: pip install 'ferret-fl[fl]'", file=sys.stderr)
        return EXIT_BAD_INPUT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferret", description="Federated fine-tuning of LLMs: Ferret, FLoRA "
                                     "and their baselines.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:6]))
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run one federated experiment (no flags: the offline default)")
    run.add_argument("--resume", type=Path, metavar="DIR", help="continue the killed or stopped run in DIR")
    _experiment_flags(run, algorithm=True)
    run.set_defaults(handler=cmd_run)

    compare = sub.add_parser("compare", help="compare algorithms on identical splits and seeds")
    compare.add_argument("entries", nargs="*", default=["ferret", "fedavg", "fedkseed", "flora"],
                         metavar="ALGORITHM[:key=value,...]",
                         help="algorithms to run (default: ferret fedavg fedkseed flora)")
    compare.add_argument("--target", type=float, help="eval loss to count rounds to (default: the worst final loss)")
    compare.add_argument("--resume", action="store_true", help="continue the comparison in --out")
    _experiment_flags(compare, algorithm=False)
    compare.set_defaults(handler=cmd_compare)

    bench = sub.add_parser("bench", help="run the microbenchmarks and print their summary")
    bench.add_argument("--path", type=Path, help="the bench/ directory (default: the checkout's)")
    bench.add_argument("-k", dest="select", help="only benchmarks matching this pytest -k expression")
    bench.add_argument("--out", type=Path, help="where the JSON and Markdown results go (default: a temporary "
                       "directory; bench/results holds the recorded ones)")
    bench.set_defaults(handler=cmd_bench)

    demo = sub.add_parser("demo", help="compress and reconstruct a real model's weights")
    demo.add_argument("--model", type=Path, help="a Hugging Face model dir with model.safetensors")
    demo.add_argument("--budget", type=int, default=1024, help="coordinates in the packet")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--grouping", choices=["tensor", "paper"], default="tensor")
    demo.set_defaults(handler=cmd_demo)
    return parser


def _experiment_flags(parser: argparse.ArgumentParser, algorithm: bool) -> None:
    from .fl.config import Config

    parser.add_argument("--config", type=Path, help="a TOML file of settings (flags override it)")
    parser.add_argument("--out", type=Path, help="results directory (default: runs/<name>-<time>)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the algorithm, e.g. --option budget=3800 (repeatable)")
    parser.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN",
                        help="the data's column for one of ferret's fields, e.g. --column instruction=prompt "
                             "(repeatable; fields: instruction, response, context, category, messages)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars, only per-round lines")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch and ferret's core "
                        "(default: theirs); where the run computes, not part of its settings")
    kinds = {"str": str, "int": int, "float": float, "list[int]": client_list}
    for f in dataclasses.fields(Config):
        if f.name in ("options", "columns") or (f.name == "algorithm" and not algorithm):
            continue
        kind = kinds[str(f.type).split("|")[0].strip()]
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=argparse.SUPPRESS,
                            metavar=f.name.upper(), help=f.metadata.get("help"))


def client_list(text: str) -> list[int]:
    """``"0,3"`` as ``[0, 3]`` (the --malicious flag)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of client numbers, got {text!r}") from None


def _config(args, base: dict | None = None, source: str = "flags"):
    """The configuration: ``base`` (settings, from ``source``) or defaults, then ``--config``, then
    flags and options."""
    from .fl.config import Config, ConfigError, parse_value

    values = dict(base or {})
    if args.config is not None:
        values = Config.load(args.config).to_dict()
    fields = {f.name for f in dataclasses.fields(Config)} - {"options", "columns"}
    values.update({k: v for k, v in vars(args).items() if k in fields})
    for flag, key, parse in (("option", "options", parse_value), ("column", "columns", str.strip)):
        table = dict(values.get(key, {}))
        for item in getattr(args, flag):
            name, eq, value = item.partition("=")
            if not eq or not name.strip():
                raise ConfigError(f"--{flag} takes {'KEY=VALUE' if flag == 'option' else 'FIELD=COLUMN'}, got {item!r}")
            table[name.strip()] = parse(value.strip())
        values[key] = table
    return Config.from_dict(values, str(args.config or source))


def _default_out(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def set_threads(n: int | None) -> None:
    """Make torch and ferret's compiled core use ``n`` CPU threads, whatever ``FERRET_NUM_THREADS``
    says (``None``: leave both as they are); raises :class:`~ferret.fl.config.ConfigError` when
    ``n`` is below 1 or above the machine's CPUs."""
    from .fl.config import ConfigError
    from .fl.runtime import check_threads

    if n is None:
        return
    try:
        check_threads(n)
    except ConfigError as err:
        raise ConfigError(f"--{err}") from None
    import torch

    from . import set_num_threads

    torch.set_num_threads(n)
    set_num_threads(n)


def silence_progress_bars() -> None:
    """No library's progress bar (Hugging Face datasets, transformers' model and GGUF loading): what
    --no-progress promises, besides ferret's own."""
    import datasets
    import transformers

    datasets.disable_progress_bars()  # the model loader (ferret.fl.models) shows none either way
    transformers.utils.logging.disable_progress_bar()


def cmd_run(args) -> int:
    from .fl import experiment
    from .fl.config import ConfigError

    set_threads(args.threads)
    if args.no_progress:
        silence_progress_bars()
    if args.resume is not None:
        if args.out is not None and args.out != args.resume:
            raise ConfigError("--resume names the run directory: leave out --out")
        experiment.check_out_dir(args.resume, resume=True)
        # the saved settings are checked once the flags are on them: --device may replace a GPU the run had
        config = _config(args, base=experiment.saved_settings(args.resume),
                         source=f"the settings saved in {args.resume}")
        experiment.run(config, args.resume, resume=True, progress=not args.no_progress, echo=_echo)
        return 0
    config = _config(args)
    experiment.run(config, args.out or _default_out(config.algorithm), progress=not args.no_progress, echo=_echo)
    return 0


def cmd_compare(args) -> int:
    from .fl import compare
    from .fl.config import ConfigError

    set_threads(args.threads)
    if args.no_progress:
        silence_progress_bars()
    base = _config(args)
    if args.resume and args.out is None:
        raise ConfigError("--resume needs --out, the comparison's directory")
    compare.compare(base, args.entries, args.out or _default_out("compare"), target=args.target,
                    resume=args.resume, progress=not args.no_progress, echo=_echo)
    return 0


def cmd_bench(args) -> int:
    from .fl.config import ConfigError

    bench = find_bench(args.path)
    if bench is None:
        raise ConfigError(f"no benchmarks at {args.path}" if args.path else "no bench/ directory here, above here or "
                          "beside the installed package: run from a ferret checkout or pass --path")
    results = args.out or Path(tempfile.mkdtemp(prefix="ferret-bench-"))
    results.mkdir(parents=True, exist_ok=True)
    status = 0
    for path in sorted(bench.glob("test_*.py")):  # every bench file; those needing a GPU skip without one
        out = results / f"{'gpu' if path.stem == 'test_gpu' else 'cpu'}_{path.stem.removeprefix('test_')}.json"
        print(f"== {path.name} ==", flush=True)
        cmd = [sys.executable, "-m", "pytest", str(path), "-q", "--benchmark-only",
               f"--benchmark-json={out}"] + (["-k", args.select] if args.select else [])
        code = subprocess.call(cmd)
        status = status or (code if code not in (0, 5) else 0)  # 5: nothing selected or all skipped
        if out.is_file() and json.loads(out.read_text(encoding="utf-8")).get("benchmarks"):
            subprocess.call([sys.executable, str(bench / "summarize.py"), str(out)])
            print(out.with_suffix(".md").read_text(encoding="utf-8"))
        else:
            print(f"{path.name}: no benchmark ran here")
    print(f"results in {results}")
    return status


def find_bench(given: Path | None) -> Path | None:
    """The bench/ directory: ``given``; else ``bench/`` in the working directory or one above it;
    else the one beside the package (an editable install). None when there is none."""
    if given is not None:
        return given if (given / "summarize.py").is_file() else None
    cwd = Path.cwd().resolve()
    for place in (*[d / "bench" for d in (cwd, *cwd.parents)], Path(__file__).resolve().parents[2] / "bench"):
        if (place / "summarize.py").is_file():
            return place
    return None


def cmd_demo(args) -> int:
    from .demo import demo
    from .fl.models import stories260k_dir

    model = args.model or stories260k_dir()
    if not (model / "model.safetensors").is_file():
        print(f"ferret demo: error: {model} holds no model.safetensors", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        demo(model, args.budget, args.seed, args.grouping)
    except (ValueError, TypeError) as err:
        print(f"ferret demo: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _echo(line: str) -> None:
    try:
        from tqdm.auto import tqdm

        tqdm.write(line)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
