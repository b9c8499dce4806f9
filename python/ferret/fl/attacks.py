"""Hostile clients, simulated so that defences are measured rather than assumed.

An attack rewrites a malicious client's upload vector (the vector its upload stands for: Ferret's
coordinates, FedAvg's flattened update) before it is sent, as a client that controls its own
software could:

- ``sign-flip``: −x (the update pointed uphill);
- ``scale:S``: S·x (an update S times too large; ``scale`` alone is ``scale:10``);
- ``noise``: Gaussian noise of the same norm as x, from the client's own generator;
- ``nan``: every value NaN (a broken client; the server's upload check drops it).

The engines apply the attack in :func:`ferret.fl.protocol.run_client`, so the embedded loop and
a Flower simulation replay the same attacks on the same clients.
"""

from __future__ import annotations

import math

import numpy as np

KINDS = ("sign-flip", "scale", "noise", "nan")


def parse_attack(attack: str) -> tuple[str, float]:
    """(kind, scale) of an attack name; raises ``ValueError`` for an unknown one or a bad scale."""
    kind, _, arg = attack.partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown attack {attack!r}: use one of sign-flip, scale:S, noise, nan")
    if arg and kind != "scale":
        raise ValueError(f"attack {kind!r} takes no argument, got {attack!r}")
    try:
        scale = float(arg) if arg else 10.0
    except ValueError:
        raise ValueError(f"attack {attack!r}: the scale must be a number") from None
    if not math.isfinite(scale):
        raise ValueError(f"attack {attack!r}: the scale must be finite")
    return kind, scale


def tamper(x: np.ndarray, attack: str, rng: np.random.Generator) -> np.ndarray:
    """The vector a client running ``attack`` sends instead of its honest ``x`` (float64)."""
    kind, scale = parse_attack(attack)
    x = np.asarray(x, dtype=np.float64)
    if kind == "sign-flip":
        return -x
    if kind == "scale":
        return scale * x
    if kind == "nan":
        return np.full_like(x, np.nan)
    noise = rng.standard_normal(x.shape)
    return noise * (np.linalg.norm(x) / max(np.linalg.norm(noise), np.finfo(np.float64).tiny))
