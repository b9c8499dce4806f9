"""How each algorithm's upload travels as Flower records, and how the server checks a reply.

An algorithm object speaks bytes (``client_update`` returns them, ``aggregate`` reads them). On
Flower the bytes become typed records, so the payload is what the method sends and nothing more:

* Ferret: the packet's K float32 coordinates and per-block counts (an ``ArrayRecord``) plus its
  seed, basis, grouping and layout fingerprint (a ``ConfigRecord``);
* FLoRA, FedIT, zero-padding: each module's A and B of the client's own rank;
* FedAvg, FedZO: the full update, tensor by tensor;
* FedKSeed: the K accumulated scalars.

``from_record`` rebuilds the bytes and ``check`` refuses anything the server must not aggregate
(wrong shapes, another layout, NaN/Inf) with :class:`MalformedReply`.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..fl.algorithms import FedAvg, FedKSeed, Ferret
from ..fl.algorithms.lora import LoraAlgorithm, decode_adapter, safetensors_metadata
from ..fl.train import trainable
from ..layout import Layout
from ..packet import Packet, PacketError


class MalformedReply(ValueError):
    """A client's reply that cannot be aggregated; the server drops that client from the round."""


class Codec:
    """Upload bytes <-> Flower records for one algorithm."""

    def to_record(self, upload: bytes) -> RecordDict:
        raise NotImplementedError

    def from_record(self, content: RecordDict) -> bytes:
        raise NotImplementedError

    def check(self, upload: bytes, model: torch.nn.Module, expected_seed: int) -> None:
        """Raise :class:`MalformedReply` if ``upload`` does not fit the global ``model``."""


class FerretCodec(Codec):
    def __init__(self, algorithm: Ferret):
        self.algorithm = algorithm

    def to_record(self, upload):
        p = Packet.from_bytes(upload)
        return RecordDict({
            "upload": ArrayRecord({"coords": Array(np.array(p.coords)), "counts": Array(p.counts.astype(np.int64))}),
            "packet": ConfigRecord({"round-seed": p.round_seed, "basis": p.basis, "group-size": p.group_size,
                                    "fingerprint": p.fingerprint}),
        })

    def from_record(self, content):
        try:
            arrays, meta = content["upload"], content["packet"]
            counts, coords = arrays["counts"].numpy(), arrays["coords"].numpy()
            if coords.dtype != np.float32 or coords.ndim != 1 or counts.ndim != 1:
                raise MalformedReply(f"coordinates must be 1-d float32, got {coords.dtype} of shape {coords.shape}")
            if np.any(counts < 1) or np.any(counts >= 2**32):
                raise MalformedReply("block counts out of range")
            return Packet(int(meta["round-seed"]), str(meta["basis"]), int(meta["group-size"]),
                          bytes(meta["fingerprint"]), counts, coords).to_bytes()
        except (KeyError, TypeError, PacketError) as err:
            raise MalformedReply(f"not a Ferret packet: {err}") from None

    def check(self, upload, model, expected_seed):
        p = Packet.from_bytes(upload)
        layout = Layout.of(trainable(model), self.algorithm.grouping)
        if p.fingerprint != layout.fingerprint or p.n_blocks != layout.n_blocks:
            raise MalformedReply("the packet was made for another model or layout")
        if p.round_seed != expected_seed:
            raise MalformedReply(f"the packet uses seed {p.round_seed}, the round's is {expected_seed}")
        if int(p.counts.sum()) > self.algorithm.budget:
            raise MalformedReply(f"{int(p.counts.sum())} coordinates, above the budget of {self.algorithm.budget}")


class TensorsCodec(Codec):
    """Uploads that are safetensors bytes (FedAvg and FedZO updates, LoRA adapters)."""

    def to_record(self, upload):
        meta = safetensors_metadata(upload)
        return RecordDict({"upload": ArrayRecord({k: Array(v.numpy()) for k, v in st_load(upload).items()}),
                           "metadata": ConfigRecord(dict(meta))})

    def from_record(self, content):
        try:
            tensors = {k: torch.from_numpy(a.numpy().copy()) for k, a in content["upload"].items()}
            meta = {k: str(v) for k, v in content["metadata"].items()}
        except (KeyError, TypeError, ValueError) as err:
            raise MalformedReply(f"not a tensor upload: {err}") from None
        bad = [k for k, t in tensors.items() if t.dtype != torch.float32 or not torch.isfinite(t).all()]
        if bad:
            raise MalformedReply(f"tensor {bad[0]} is not finite float32")
        return st_save(tensors, metadata=meta or None)


class FedAvgCodec(TensorsCodec):
    def check(self, upload, model, expected_seed):
        params = dict(trainable(model))
        for name, t in st_load(upload).items():
            if name not in params or tuple(t.shape) != tuple(params[name].shape):
                raise MalformedReply(f"update tensor {name} {tuple(t.shape)} does not fit the model")


class LoraCodec(TensorsCodec):
    def check(self, upload, model, expected_seed):
        adapter = decode_adapter(upload)
        modules = dict(model.named_modules())
        for name in adapter.modules:
            A, B = adapter.stacked(name)
            weight = getattr(modules.get(name), "weight", None)
            if weight is None or A.shape[0] != B.shape[1] or (B.shape[0], A.shape[1]) != tuple(weight.shape[:2]):
                raise MalformedReply(f"adapter module {name} does not fit the model")


class FedKSeedCodec(Codec):
    def __init__(self, algorithm: FedKSeed):
        self.algorithm = algorithm

    def to_record(self, upload):
        return RecordDict({"upload": ArrayRecord({"grads": Array(np.frombuffer(upload, dtype="<f4").copy())})})

    def from_record(self, content):
        try:
            grads = content["upload"]["grads"].numpy()
        except (KeyError, TypeError) as err:
            raise MalformedReply(f"not a FedKSeed upload: {err}") from None
        if grads.dtype != np.float32 or grads.shape != (self.algorithm.k,) or not np.all(np.isfinite(grads)):
            raise MalformedReply(f"expected {self.algorithm.k} finite float32 scalars")
        return grads.astype("<f4").tobytes()


def codec_for(algorithm) -> Codec:
    """The codec of an algorithm object."""
    if isinstance(algorithm, Ferret):
        return FerretCodec(algorithm)
    if isinstance(algorithm, LoraAlgorithm):
        return LoraCodec()
    if isinstance(algorithm, FedKSeed):
        return FedKSeedCodec(algorithm)
    if isinstance(algorithm, FedAvg):
        return FedAvgCodec()
    raise TypeError(f"no Flower codec for {type(algorithm).__name__}")
