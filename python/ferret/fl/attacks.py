"""Hostile clients, simulated so that defences are measured rather than assumed.

An attack rewrites a malicious client's upload before it is sent, as a client that controls its
own software could. On the upload's vector (Ferret's coordinates, FedAvg's flattened update,
FedKSeed's scalars):

- ``sign-flip``: −x (the update pointed uphill);
- ``scale:S``: S·x (an update S times too large; ``scale`` alone is ``scale:10``, ``scale:-100``
  is a sign flip a hundred times over);
- ``noise``: Gaussian noise of the same norm as x, from the client's own generator;
- ``nan``: every value NaN (a broken client);
- ``huge``: every value ±3.4e38, the largest float32, with x's signs;

on the upload's blocks (:meth:`~ferret.fl.algorithms.Algorithm.block_norms`):

- ``concentrate``: the upload's whole norm moved into its block of smallest norm (a small block,
  where a bound on the whole vector would not look);

on its format:

- ``short``: one number fewer (a Ferret packet with one coordinate fewer in its last block, still
  a valid packet; a FedAvg tensor one element short);
- ``group-size``: a Ferret packet whose header names another layout group size, checksum
  recomputed;

and on what it claims:

- ``examples:N``: the client claims ``N`` examples (``examples`` alone: 10**15), to weigh more.

An attack of several comma-separated kinds (``"huge,short,examples"``) gives the i-th malicious
client the i-th kind. The engines apply the attack in :func:`ferret.fl.protocol.run_client`, so the
embedded loop and a Flower simulation replay the same attacks on the same clients.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import safetensors.torch

from ..packet import MAGIC, Packet

KINDS = ("sign-flip", "scale", "noise", "nan", "huge", "concentrate", "short", "group-size", "examples")
VECTOR_KINDS = ("sign-flip", "scale", "noise", "nan", "huge", "concentrate", "short")  # need vectors
PACKET_KINDS = ("group-size",)  # need Ferret packets
FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_CONCENTRATION = 1e6  # how much ``concentrate`` may scale its block


def parse_attack(attack: str) -> tuple[str, float]:
    """(kind, argument) of an attack name; raises ``ValueError`` for an unknown one or a bad argument."""
    kind, _, arg = attack.partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown attack {attack!r}: use one of sign-flip, scale:S, noise, nan, huge, concentrate, "
                         f"short, group-size, examples:N")
    if arg and kind not in ("scale", "examples"):
        raise ValueError(f"attack {kind!r} takes no argument, got {attack!r}")
    try:
        value = float(arg) if arg else (10.0 if kind == "scale" else 1e15)
    except ValueError:
        raise ValueError(f"attack {attack!r}: the argument must be a number") from None
    if not math.isfinite(value) and kind == "scale":
        raise ValueError(f"attack {attack!r}: the scale must be finite")
    return kind, value


def split_attacks(attack: str) -> list[str]:
    """The kinds of an attack of one or several comma-separated kinds, each checked
    (:func:`parse_attack`)."""
    kinds = [k.strip() for k in attack.split(",")]
    for kind in kinds:
        parse_attack(kind)
    return kinds


def tamper(x: np.ndarray, attack: str, rng: np.random.Generator) -> np.ndarray:
    """The vector a client running a vector ``attack`` sends instead of its honest ``x`` (float64)."""
    kind, scale = parse_attack(attack)
    x = np.asarray(x, dtype=np.float64)
    if kind == "sign-flip":
        return -x
    if kind == "scale":
        return scale * x
    if kind == "nan":
        return np.full_like(x, np.nan)
    if kind == "huge":
        return np.where(x < 0, -FLOAT32_MAX, FLOAT32_MAX)
    if kind != "noise":
        raise ValueError(f"attack {kind!r} does not rewrite a vector")
    noise = rng.standard_normal(x.shape)
    return noise * (np.linalg.norm(x) / max(np.linalg.norm(noise), np.finfo(np.float64).tiny))


def tamper_upload(algorithm, model, upload: bytes, attack: str, rng: np.random.Generator) -> bytes:
    """The bytes a client running ``attack`` sends instead of its honest ``upload`` (see the
    module docstring); ``model`` has the global model's shapes. ``examples`` leaves them alone."""
    kind, _ = parse_attack(attack)
    if kind == "examples":
        return upload
    if kind == "concentrate":
        norms = algorithm.block_norms(upload, model)
        live = np.flatnonzero(norms > 0)
        if live.size == 0:
            return upload
        target = live[np.argmin(norms[live])]
        factors = np.zeros_like(norms)
        factors[target] = min(float(np.linalg.norm(norms)) / norms[target], MAX_CONCENTRATION)
        return algorithm.scale_blocks(upload, factors)
    if kind == "short":
        return _short(upload)
    if kind == "group-size":
        packet = Packet.from_bytes(upload)
        return dataclasses.replace(packet, group_size=packet.group_size + 1).to_bytes()
    return algorithm.from_vector(upload, tamper(algorithm.vector(upload), attack, rng))


def claimed_examples(attack: str | None, examples: int) -> float:
    """The example count a client running ``attack`` claims, holding ``examples``."""
    if attack is None:
        return examples
    kind, value = parse_attack(attack)
    return value if kind == "examples" else examples


def _short(upload: bytes) -> bytes:
    """``upload`` with one number fewer, still well formed where its format allows."""
    if upload[: len(MAGIC)] == MAGIC:
        packet = Packet.from_bytes(upload)
        counts = packet.counts.astype(np.int64)
        b = int(np.flatnonzero(counts > 1)[-1]) if np.any(counts > 1) else packet.n_blocks - 1
        end = int(counts[: b + 1].sum())
        counts[b] -= 1
        coords = np.delete(packet.coords, end - 1)
        if counts[b] == 0:  # a block of one coordinate: drop the last block's only one anyway, packet invalid
            return upload[:-8] + upload[-4:]
        return dataclasses.replace(packet, counts=counts, coords=coords).to_bytes()
    try:
        tensors = safetensors.torch.load(bytes(upload))
    except Exception:  # not safetensors (FedKSeed's raw scalars)
        return upload[:-4]
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].flatten()[:-1].clone()
    return safetensors.torch.save(tensors)
