"""The federated algorithms, one module each, behind one interface (:class:`Algorithm`), and the
one place that names them: :data:`ALGORITHMS` maps a name to its class and the options the name
fixes (a preset such as ``ferret-paper``). :func:`build` makes one, checking every option value.

A new algorithm: subclass :class:`Algorithm` in a module of its own (its ``Options`` dataclass,
``client_update``, ``check_upload``, ``aggregate``, ``apply``), then :func:`register` it below.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .base import (Algorithm, ClientContext, LocalTraining, MalformedUpload, NonFiniteUpdate, RoundContext,
                   UnsafeUpdate)
from .fedavg import FedAvg, FedZO
from .fedkseed import FedKSeed
from .ferret import Ferret
from .lora import FedIT, FLoRA, ZeroPadding


@dataclass(frozen=True)
class Entry:
    """A registered name: the algorithm class and the option values the name presets."""

    name: str
    cls: type[Algorithm]
    preset: dict = field(default_factory=dict)
    doc: str = ""

    @property
    def option_names(self) -> tuple[str, ...]:
        """The options a user may set."""
        return tuple(f.name for f in fields(self.cls.Options))

    def build(self, local: LocalTraining | None = None, **options) -> Algorithm:
        """The algorithm with ``local`` training and ``options`` over the preset; raises ``ValueError``
        (``TypeError``) naming an unknown option or a bad value."""
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r} for {self.name}: it takes "
                             f"{', '.join(self.option_names) or 'no options'}")
        return self.cls(local=local, **{**self.preset, **options})


ALGORITHMS: dict[str, Entry] = {}


def register(name: str, cls: type[Algorithm], doc: str = "", **preset) -> None:
    """Make ``cls`` (with the ``preset`` option values) available under ``name``."""
    if name in ALGORITHMS:
        raise ValueError(f"an algorithm is already registered as {name!r}")
    ALGORITHMS[name] = Entry(name, cls, preset, doc)
    Entry(name, cls, preset).build()  # the preset's values must be valid options


def build(name: str, local: LocalTraining | None = None, **options) -> Algorithm:
    """The algorithm registered as ``name``; raises ``ValueError`` for an unknown name, option or value."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}: use one of {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name].build(local, **options)


for _cls in (Ferret, FedAvg, FedZO, FedKSeed, FLoRA, FedIT, ZeroPadding):
    register(_cls.name, _cls)
# The official code's method: shared Rademacher bases, blocks of 0.9 × the median tensor, norm
# allocation, updates clipped to norm 10. Its server learning rate (3 to 10) compensates a reconstruction that
# is about Δ/3 in expectation; ours is unbiased, so 1 matches it.
register("ferret-paper", Ferret, "Ferret as the official code runs it", basis="rademacher", bases="shared",
         grouping="paper", allocation="auto", clip=10.0)

__all__ = ["ALGORITHMS", "Algorithm", "ClientContext", "Entry", "FLoRA", "FedAvg", "FedIT", "FedKSeed", "FedZO",
           "Ferret", "LocalTraining", "MalformedUpload", "NonFiniteUpdate", "RoundContext", "UnsafeUpdate", "ZeroPadding",
           "build", "register"]
