"""FLoRA, FedIT and zero-padding on PEFT LoRA: each round every sampled client trains a fresh
adapter of its own rank on the global weights; the server aggregates the adapters with
:mod:`ferret.lora` and merges the result into the global weights."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ... import lora
from ..bounds import BoundOptions
from ..privacy import NOISE_DOMAIN, PrivacyOptions
from ..runtime import model_device
from ..settings import positive_finite
from ..train import first_order_steps
from .base import Algorithm, LocalTraining, MalformedUpload, NonFiniteUpdate, UnsafeUpdate
from .uploads import decode_tensors, encode_tensors, metadata_of

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_RANK = 4096
# Far above any honest factor, and low enough that B·A of rank MAX_RANK stays finite in float32.
MAX_FACTOR = 1e15


@dataclass(frozen=True)
class LoraOptions(BoundOptions, PrivacyOptions):
    """``ranks``: every client's LoRA rank, or one per client (client c takes ``ranks[c % len]``);
    ``alpha_per_rank``: LoRA's alpha over the rank (the scaling is alpha / r); ``target_modules``:
    the module names (or one name) the adapters wrap: a module whose name is one of them or ends
    with ``"." + name`` (PEFT's rule for a list). ``relative_bound``, ``norm_bound``: the
    influence bounds, module by module on B·A (:mod:`ferret.fl.bounds`). ``dp_clip``,
    ``dp_noise``, ``dp_delta``, ``target_epsilon``: client-level differential privacy
    (:mod:`ferret.fl.privacy`), central only: each client's update Σ_modules B_i A_i is clipped to
    Frobenius norm ``dp_clip`` (its scaling, not its factors, shrinks), and the server adds Gaussian
    noise of ``dp_noise`` × ``dp_clip`` / m to every adapted weight after merging the m clients'
    clipped updates."""

    ranks: int | list[int] = 8
    alpha_per_rank: float = 2.0
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def validate(self) -> None:
        super().validate()
        if self.private and self.dp_mode != "central":
            raise ValueError("LoRA uploads are low-rank factors, which cannot carry dense noise shares: use "
                             "dp_mode='central'")
        ranks = [self.ranks] if isinstance(self.ranks, int) else self.ranks
        if not ranks or any(not 1 <= r <= MAX_RANK for r in ranks):
            raise ValueError(f"ranks must be a rank or a non-empty list of ranks from 1 to {MAX_RANK}, got {self.ranks}")
        positive_finite("alpha_per_rank", self.alpha_per_rank)
        if not self.modules or any(not m for m in self.modules):
            raise ValueError(f"target_modules must name at least one module, got {self.target_modules!r}")

    @property
    def modules(self) -> list[str]:
        """The target module names as a list."""
        return [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules)


@dataclass(frozen=True)
class EqualRankOptions(LoraOptions):
    """:class:`LoraOptions` for an aggregation that averages A and B: one rank for every client."""

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.ranks, int) and len(set(self.ranks)) > 1:
            raise ValueError(f"averaging A and B needs one rank for every client, got ranks {self.ranks}")


class LoraAlgorithm(Algorithm):
    """Shared client side; subclasses choose the server's aggregation."""

    Options = LoraOptions
    full_parameter = False
    default_local = LocalTraining(lr=1e-3, optimizer="adamw")

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ``ValueError`` unless ``target_modules`` names at least one linear module of ``model``."""
        if not self.adapted(model):
            raise ValueError(f"target_modules {self.options.modules} match no linear module of the model (its "
                             f"modules include {', '.join(_example_names(model))})")

    def adapted(self, model: torch.nn.Module) -> list[str]:
        """The names of the modules of ``model`` an adapter wraps, sorted."""
        targets = self.options.modules
        return sorted(name for name, module in model.named_modules()
                      if any(name == t or name.endswith("." + t) for t in targets)
                      and getattr(getattr(module, "weight", None), "ndim", 0) == 2)

    def rank_of(self, client: int) -> int:
        """Client ``client``'s LoRA rank."""
        ranks = self.options.ranks
        return ranks if isinstance(ranks, int) else ranks[client % len(ranks)]

    def client_update(self, model, data, ctx):
        from peft import LoraConfig, get_peft_model

        r = self.rank_of(ctx.client)
        config = LoraConfig(r=r, lora_alpha=self.options.alpha_per_rank * r, target_modules=self.options.modules,
                            lora_dropout=0.0)
        with torch.random.fork_rng(devices=[]):  # PEFT's own initialisation leaves torch's global RNG as it was
            # The engine's working copy is wrapped in place and unwrapped afterwards: no copy of the model.
            peft_model = get_peft_model(model, config)
        try:
            init_adapter(peft_model, ctx.generator)
            first_order_steps(peft_model, data, rng=ctx.rng, runtime=self.runtime, **vars(self.local))
            adapter = lora.from_peft(peft_model)
        except lora.LoraError as err:
            raise NonFiniteUpdate(str(err)) from None
        finally:
            peft_model.unload()
        return encode_adapter(adapter)

    def check_upload(self, upload, model, ctx):
        adapter = decode_adapter(upload)
        modules = dict(model.named_modules())
        expected = self.adapted(model)
        if sorted(adapter.modules) != expected:
            name = sorted(set(adapter.modules) ^ set(expected))[0]
            raise MalformedUpload(f"the adapter {'lacks' if name in expected else 'has an extra'} module {name}")
        for name in adapter.modules:
            A, B = adapter.stacked(name)
            weight = modules[name].weight
            if A.shape[0] != B.shape[1] or (B.shape[0], A.shape[1]) != tuple(weight.shape[:2]):
                raise MalformedUpload(f"adapter module {name} does not fit the model")
            if A.shape[0] > self.rank_of(ctx.client):
                raise MalformedUpload(f"adapter module {name} has rank {A.shape[0]}, above the client's "
                                      f"{self.rank_of(ctx.client)}")
            if max(float(A.abs().max()), float(B.abs().max())) > MAX_FACTOR:
                raise MalformedUpload(f"adapter module {name} has a factor entry above {MAX_FACTOR:g}")

    def block_norms(self, upload, model):
        return module_norms(decode_adapter(upload))

    def scale_blocks(self, upload, factors):
        adapter = decode_adapter(upload)
        return encode_adapter(lora.LoraAdapter(
            {name: [lora.LoraTerm(t.A, t.B, t.coef * float(f)) for t in adapter.terms[name]]
             for name, f in zip(adapter.modules, factors)}, fan_in_fan_out=adapter.fan_in_fan_out))

    def combine(self, adapters, weights) -> lora.LoraAdapter:
        """The one adapter the server merges from the clients' ``adapters`` (weights sum to 1)."""
        raise NotImplementedError

    def aggregate(self, model, uploads, weights, ctx):
        device = model_device(model)
        adapters = [decode_adapter(u, device) for u in uploads]
        self.broadcast = encode_adapter(self.combine(adapters, weights))
        self.apply(model, self.broadcast, ctx)

    def apply(self, model, broadcast, ctx):
        adapter = decode_adapter(broadcast, model_device(model))
        try:
            lora.merge_into(model, adapter, backend=self.runtime.lora_backend)
        except lora.LoraError as err:  # the merge checks every module first: nothing was written
            raise UnsafeUpdate(str(err)) from None
        o = self.options
        if o.private and o.dp_noise:
            modules = dict(model.named_modules())
            std = o.dp_noise * o.dp_clip / len(ctx.clients)
            with torch.no_grad():
                for i, name in enumerate(sorted(adapter.modules)):  # the round's public seed: every replica adds the same
                    weight = modules[name].weight
                    rng = np.random.default_rng([ctx.round_seed, NOISE_DOMAIN, i])
                    noise = torch.from_numpy(rng.standard_normal(tuple(weight.shape)).astype(np.float32))
                    weight.add_((noise * std).to(weight.device, weight.dtype))


def module_norms(adapter: lora.LoraAdapter) -> np.ndarray:
    """The Frobenius norm of each module's update Σ_terms coef · B @ A (float64, in the adapter's
    module order), from the factors: ‖B A‖² = Σ (BᵀB) ∘ (A Aᵀ), never forming B A."""
    norms = []
    for name in adapter.modules:
        A, B = adapter.stacked(name)
        norms.append(math.sqrt(max(float(((B.T.double() @ B.double()) * (A.double() @ A.T.double())).sum()), 0.0)))
    return np.array(norms)


def _example_names(model: torch.nn.Module) -> list[str]:
    """A few last parts of the names of ``model``'s linear modules, to say what target_modules may name."""
    names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                    if getattr(getattr(m, "weight", None), "ndim", 0) == 2})
    return names[:8]


def init_adapter(peft_model, generator: torch.Generator) -> None:
    """A fresh adapter's A drawn from the client's own generator as PEFT draws it (Kaiming uniform,
    a = √5), on the CPU so every device starts from the same bits; B stays zero."""
    for module in peft_model.modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and "default" in lora_a:
            weight = lora_a["default"].weight
            fresh = torch.empty(weight.shape, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            with torch.no_grad():
                weight.copy_(fresh)


class FLoRA(LoraAlgorithm):
    """Stacking: the merged update is exactly Σ p_i s_i B_i A_i, for any ranks."""

    name = "flora"

    def combine(self, adapters, weights):
        return lora.stack(adapters, weights)


class FedIT(LoraAlgorithm):
    """Averaging A and B (equal ranks)."""

    name = "fedit"
    Options = EqualRankOptions

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
    return encode_tensors(tensors, metadata={"fan_in_fan_out": json.dumps(adapter.fan_in_fan_out)})


def decode_adapter(data: bytes, device: torch.device | str = "cpu") -> lora.LoraAdapter:
    """Inverse of :func:`encode_adapter`, onto ``device``; :class:`MalformedUpload` for anything else."""
    tensors = decode_tensors(data, device)
    fan_in_fan_out = metadata_of(data).get("fan_in_fan_out", "false")
    names = sorted({k[:-2] for k in tensors})
    if fan_in_fan_out not in ("true", "false") or any(f"{n}.A" not in tensors or f"{n}.B" not in tensors for n in names):
        raise MalformedUpload("not an adapter: every module needs its .A and .B, fan_in_fan_out true or false")
    try:
        return lora.LoraAdapter({n: [lora.LoraTerm(tensors[f"{n}.A"], tensors[f"{n}.B"], 1.0)] for n in names},
                                fan_in_fan_out=fan_in_fan_out == "true")
    except lora.LoraError as err:
        raise MalformedUpload(f"not an adapter: {err}") from None
