"""The server's state after a round, saved atomically so a killed run resumes where it stopped.

One safetensors file: the model's parameters, the algorithm's state (``algorithm.*``), its last
broadcast (``broadcast``, bytes), and in the metadata the run's records and the configuration
it belongs to. Written to a temporary file, fsynced, then renamed over the old checkpoint, so a
kill at any instant leaves either the previous round's checkpoint or this one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .runtime import to_host
from .simulation import RoundRecord, RunResult

FORMAT = "ferret-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or belongs to another configuration."""


def save(path: str | Path, model: torch.nn.Module, algorithm, result: RunResult, config_toml: str) -> None:
    """Write the state after ``result``'s last round to ``path`` atomically (tensors on any device)."""
    path = Path(path)
    tensors = {f"model.{n}": p.detach().contiguous() for n, p in model.named_parameters()}
    tensors.update({f"algorithm.{k}": v.detach().contiguous() for k, v in algorithm.state_dict().items()})
    tensors = to_host(tensors)  # safetensors writes CPU tensors
    tensors["broadcast"] = torch.frombuffer(bytearray(algorithm.broadcast or b"\0"), dtype=torch.uint8)
    meta = {"format": FORMAT, "config": config_toml, "result": json.dumps(to_json(result)),
            "broadcast_bytes": str(len(algorithm.broadcast))}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def config_of(path: str | Path) -> str:
    """The configuration (TOML text) a checkpoint was written for."""
    return _metadata(path)["config"]


def load(path: str | Path, model: torch.nn.Module, algorithm) -> RunResult:
    """Restore ``model`` and ``algorithm`` from ``path`` onto the model's device (whichever device
    wrote it); returns the records of the rounds done."""
    meta = _metadata(path)
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    state = {}
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        wanted = {f"model.{n}" for n in params}
        if not wanted <= names:
            raise CheckpointError(f"{path} was written for another model ({len(wanted - names)} parameters missing)")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(f.get_tensor(f"model.{n}"))
        for key in names:
            if key.startswith("algorithm."):
                state[key.removeprefix("algorithm.")] = f.get_tensor(key).to(device)
        broadcast = f.get_tensor("broadcast").numpy().tobytes()[: int(meta["broadcast_bytes"])]
    algorithm.load_state_dict(state)
    algorithm.broadcast = broadcast
    return from_json(json.loads(meta["result"]))


def to_json(result: RunResult) -> dict:
    """``result`` as plain JSON values."""
    return {"initial_eval_loss": result.initial_eval_loss, "rounds": [dataclasses.asdict(r) for r in result.rounds]}


def from_json(data: dict) -> RunResult:
    """Inverse of :func:`to_json`."""
    rounds = []
    for r in data["rounds"]:
        r = dict(r)
        for key in ("upload_bytes", "local_seconds"):
            r[key] = {int(c): v for c, v in r[key].items()}
        rounds.append(RoundRecord(**r))
    return RunResult(data["initial_eval_loss"], rounds)


def _metadata(path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # OSError, or safetensors' own error type for a bad header
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a ferret checkpoint")
    return meta


