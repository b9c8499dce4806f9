"""The server's state after a round, saved atomically so a killed run resumes where it stopped.

One safetensors file: the model's parameters, the algorithm's state (``algorithm.*``), its last
broadcast (``broadcast``, bytes), and in the metadata the run's records, the configuration it
belongs to and a checksum over all of it. Written to a temporary file, fsynced, then renamed over
the old checkpoint, so a kill at any instant leaves either the previous round's checkpoint or
this one; a damaged one is refused on load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import tomllib
from .results import RunResult, from_json, replace, temporary, to_json
from .runtime import to_host

FORMAT = "ferret-checkpoint-2"  # 2: with a checksum
_KEYS = ("format", "config", "result", "broadcast_bytes", "checksum")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, damaged, or belongs to another configuration."""


def save(path: str | Path, model: torch.nn.Module, algorithm, result: RunResult, config_toml: str) -> None:
    """Write the state after ``result``'s last round, with ``config_toml`` (the run's settings), to
    ``path`` atomically (tensors on any device). Raises OSError."""
    path = Path(path)
    tensors = {f"model.{n}": p.detach().contiguous() for n, p in model.named_parameters()}
    tensors.update({f"algorithm.{k}": v.detach().contiguous() for k, v in algorithm.state_dict().items()})
    tensors = to_host(tensors)  # safetensors writes CPU tensors
    tensors["broadcast"] = torch.frombuffer(bytearray(algorithm.broadcast or b"\0"), dtype=torch.uint8)
    meta = {"format": FORMAT, "config": config_toml, "result": json.dumps(to_json(result)),
            "broadcast_bytes": str(len(algorithm.broadcast))}
    meta["checksum"] = digest(tensors, meta)
    tmp = temporary(path)
    save_file(tensors, str(tmp), metadata=meta)
    replace(tmp, path)


def digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """The checksum of a checkpoint: the hex BLAKE2b of ``metadata`` (all but its ``checksum``) and
    of each CPU tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.blake2b(digest_size=32)
    h.update(json.dumps({k: v for k, v in metadata.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def config_of(path: str | Path) -> str:
    """The configuration (TOML text) the checkpoint ``path`` was written for; raises
    :class:`CheckpointError` for a file that is not a readable checkpoint of this format."""
    return _metadata(path)[0]["config"]


def load(path: str | Path, model: torch.nn.Module, algorithm) -> RunResult:
    """Restore ``model`` and ``algorithm`` from ``path`` onto the model's device (whichever device
    wrote it); returns the records of the rounds done. Raises :class:`CheckpointError`, changing
    nothing, for a file that is unreadable, damaged (checksum) or written for another model."""
    meta, result, broadcast_bytes = _metadata(path)
    tensors = _tensors(path)
    if digest(tensors, meta) != meta["checksum"]:
        raise CheckpointError(f"{path} is damaged (its checksum does not match its contents): it cannot be "
                              f"resumed; run again with another --out")
    params = dict(model.named_parameters())
    _check_fits(path, tensors, params)
    device = next(iter(params.values())).device
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"model.{n}"])
    algorithm.load_state_dict({k.removeprefix("algorithm."): v.to(device) for k, v in tensors.items()
                               if k.startswith("algorithm.")})
    algorithm.broadcast = tensors["broadcast"].numpy().tobytes()[:broadcast_bytes]
    return result


def _metadata(path) -> tuple[dict, RunResult, int]:
    """(the metadata, the records it holds, the broadcast's length), every field checked."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # OSError, or safetensors' own error type for a bad header
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a ferret checkpoint of this version (format {meta.get('format')!r}, "
                              f"this ferret reads {FORMAT!r})")
    missing = [k for k in _KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path} has malformed metadata: no {missing[0]!r}")
    try:
        tomllib.loads(meta["config"])
        broadcast_bytes = int(meta["broadcast_bytes"])
        return meta, from_json(json.loads(meta["result"])), broadcast_bytes
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # JSON and TOML errors are ValueErrors
        raise CheckpointError(f"{path} has malformed metadata ({type(err).__name__}: {err})") from None


def _tensors(path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors' own error type for truncated data
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None


def _check_fits(path, tensors: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter]) -> None:
    """Raise :class:`CheckpointError` unless ``tensors`` hold the broadcast and every parameter, shaped alike."""
    if "broadcast" not in tensors:
        raise CheckpointError(f"{path} holds no broadcast: it was not written by ferret run")
    missing = [n for n in params if f"model.{n}" not in tensors]
    if missing:
        raise CheckpointError(f"{path} was written for another model ({len(missing)} parameters missing)")
    for n, p in params.items():
        if tensors[f"model.{n}"].shape != p.shape:
            raise CheckpointError(f"{path} was written for another model: {n} is "
                                  f"{tuple(tensors[f'model.{n}'].shape)} there, {tuple(p.shape)} here")
