"""FLoRA, FedIT and zero-padding on PEFT LoRA: each round every sampled client trains a fresh
adapter of its own rank on the global weights; the server aggregates the adapters with
:mod:`ferret.lora` and merges the result into the global weights."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ... import lora
from ..runtime import model_device, to_host
from ..train import first_order_steps
from .base import Algorithm, LocalTraining, NonFiniteUpdate

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraAlgorithm(Algorithm):
    """Shared client side; subclasses choose the server's aggregation."""

    full_parameter = False
    default_local = LocalTraining(lr=1e-3, optimizer="adamw")

    def __init__(self, ranks: int | list[int] = 8, local: LocalTraining | None = None, *,
                 alpha_per_rank: float = 2.0, target_modules=DEFAULT_TARGETS):
        super().__init__()
        self.ranks = ranks
        self.local = local or self.default_local
        self.alpha_per_rank = alpha_per_rank
        self.target_modules = list(target_modules)

    def rank_of(self, client: int) -> int:
        """Client ``client``'s LoRA rank."""
        return self.ranks if isinstance(self.ranks, int) else self.ranks[client % len(self.ranks)]

    def client_update(self, model, data, ctx):
        from peft import LoraConfig, get_peft_model

        r = self.rank_of(ctx.client)
        torch.manual_seed(ctx.round_seed ^ ctx.client)  # the fresh adapter's A
        # The engine's working copy is wrapped in place and unwrapped afterwards: no copy of the model.
        peft_model = get_peft_model(model, LoraConfig(
            r=r, lora_alpha=self.alpha_per_rank * r, target_modules=self.target_modules, lora_dropout=0.0))
        try:
            first_order_steps(peft_model, data, rng=ctx.rng, runtime=self.runtime, **vars(self.local))
            adapter = lora.from_peft(peft_model)
        except lora.LoraError as err:
            raise NonFiniteUpdate(str(err)) from None
        finally:
            peft_model.unload()
        return encode_adapter(adapter)

    def combine(self, adapters, weights) -> lora.LoraAdapter:
        raise NotImplementedError

    def aggregate(self, model, uploads, weights, ctx):
        device = model_device(model)
        self.broadcast = encode_adapter(self.combine([decode_adapter(u, device) for u in uploads], weights))
        self.apply(model, self.broadcast, ctx)

    def apply(self, model, broadcast, ctx):
        lora.merge_into(model, decode_adapter(broadcast, model_device(model)), backend=self.runtime.lora_backend)


class FLoRA(LoraAlgorithm):
    """Stacking: the merged update is exactly Σ p_i s_i B_i A_i, for any ranks."""

    name = "flora"

    def combine(self, adapters, weights):
        return lora.stack(adapters, weights)


class FedIT(LoraAlgorithm):
    """Averaging A and B (equal ranks)."""

    name = "fedit"

    def combine(self, adapters, weights):
        return lora.fedit(adapters, weights)


class ZeroPadding(LoraAlgorithm):
    """Padding every adapter to the largest rank, then averaging."""

    name = "zeropad"

    def combine(self, adapters, weights):
        return lora.zero_pad(adapters, weights)


def encode_adapter(adapter: lora.LoraAdapter) -> bytes:
    """An adapter (on any device) as safetensors bytes: each module's stacked A and B (fp32), unit scaling."""
    tensors = {}
    for name in adapter.modules:
        A, B = adapter.stacked(name)
        tensors[f"{name}.A"], tensors[f"{name}.B"] = A.contiguous(), B.contiguous()
    return st_save(to_host(tensors), metadata={"fan_in_fan_out": json.dumps(adapter.fan_in_fan_out)})


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` table of safetensors bytes (empty if none)."""
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len]).get("__metadata__", {})


def decode_adapter(data: bytes, device: torch.device | str = "cpu") -> lora.LoraAdapter:
    """Inverse of :func:`encode_adapter`, onto ``device``."""
    tensors = {k: t.to(device, non_blocking=True) for k, t in st_load(data).items()}
    meta = safetensors_metadata(data)
    names = sorted({k[:-2] for k in tensors})
    return lora.LoraAdapter({n: [lora.LoraTerm(tensors[f"{n}.A"], tensors[f"{n}.B"], 1.0)] for n in names},
                            fan_in_fan_out=json.loads(meta.get("fan_in_fan_out", "false")))
