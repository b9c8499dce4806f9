"""Settings that check themselves when they are made.

A settings class is a dataclass that inherits :class:`Settings`: building one checks every
field's type against its annotation (``int``, ``float``, ``str``, ``bool``, ``None``, ``list[...]``,
``dict`` and unions of them; a bool is not a number, an int is a float) and then runs the class's
``validate`` for the values. :class:`~ferret.fl.config.Config`, :class:`LocalTraining` and every
algorithm's options are settings, so a bad value is refused when the settings are made: before a
model loads or a file is written. Errors are ``ValueError`` (``TypeError`` for a wrong type) with
the field's name in the message.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing


class ConfigError(ValueError):
    """A configuration that cannot run: an unknown key, a wrong type, a value out of range, a
    device this machine lacks."""


class Settings:
    """Base of the checked settings dataclasses (see the module docstring)."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not matches(value, hints[field.name]):
                raise TypeError(f"{field.name} must be {describe(hints[field.name])}, got {value!r}")
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` for a value out of range (types are already checked)."""


def matches(value, kind) -> bool:
    """Whether ``value`` fits the annotation ``kind``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, alt) for alt in args)
    if kind is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(matches(v, args[0]) for v in value)
    if origin is dict or kind is dict:
        return isinstance(value, dict)
    if kind is bool:
        return isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)


def describe(kind) -> str:
    """An annotation in words: ``"an integer or unset"``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(alt) for alt in args)
    if origin is list:
        return f"a list of {describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a table",
             type(None): "unset"}
    return words.get(kind, getattr(kind, "__name__", str(kind)))


def at_least(name: str, value, low) -> None:
    """Raise ``ValueError`` unless ``value >= low``."""
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")


def positive_finite(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``value`` is finite and above 0."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number above 0, got {value}")


def one_of(name: str, value, choices) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
