"""Uploads that are tensors (FedAvg's updates, LoRA adapters) as bytes: safetensors with a small
metadata table, decoded onto a device, and checked against the model they are meant for."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..runtime import to_host
from .base import MalformedUpload


def encode_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Tensors (on any device) as safetensors bytes, with ``metadata`` (strings) in the header."""
    return st_save(to_host(tensors), metadata=metadata or None)


def decode_tensors(data: bytes, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_tensors`, onto ``device``; raises :class:`MalformedUpload` for
    bytes that are not safetensors, or tensors that are not finite float32."""
    try:
        tensors = st_load(bytes(data))
    except Exception as err:  # safetensors raises its own error types for every kind of bad input
        raise MalformedUpload(f"not safetensors bytes: {err}") from None
    bad = [n for n, t in tensors.items() if t.dtype != torch.float32 or not bool(torch.isfinite(t).all())]
    if bad:
        raise MalformedUpload(f"tensor {bad[0]} is not finite float32")
    return {name: t.to(device, non_blocking=True) for name, t in tensors.items()}


def metadata_of(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` table of safetensors bytes (empty if none); :class:`MalformedUpload` for a bad header."""
    try:
        header_len = int.from_bytes(bytes(data[:8]), "little")
        header = json.loads(bytes(data[8 : 8 + header_len]))
        meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    except (ValueError, UnicodeDecodeError) as err:
        raise MalformedUpload(f"not safetensors bytes: {err}") from None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise MalformedUpload("the safetensors metadata is not a table of strings")
    return meta
