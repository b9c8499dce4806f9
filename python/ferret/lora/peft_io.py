"""Reading PEFT LoRA adapters into :class:`LoraAdapter` and writing them back out.

Module names are the base model's (``model.layers.0.self_attn.q_proj``): PEFT's
``base_model.model.`` prefix and adapter names are removed on the way in and restored on the
way out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from numbers import Integral, Real

import torch

from .adapter import LoraAdapter, LoraError, LoraTerm

_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")


def from_peft(source, config=None, *, adapter_name: str = "default") -> LoraAdapter:
    """A client's PEFT LoRA adapter as a :class:`LoraAdapter` (tensors shared, not copied).

    ``source`` is a ``PeftModel`` (its layers give each module's scaling), or a PEFT state dict
    (``get_peft_model_state_dict`` / ``adapter_model.safetensors``) with its ``LoraConfig`` (or
    the config as a dict) as ``config``. ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``,
    ``alpha_pattern`` and ``fan_in_fan_out`` are honoured. Raises :class:`LoraError` for DoRA,
    LoRA biases, embedding adapters, ranks that contradict the config, A without B, values that
    are not tensors, a rank ``r`` that is not a positive int and a ``lora_alpha`` that is not a
    finite number.
    """
    if isinstance(source, torch.nn.Module):
        if config is not None:
            raise LoraError("pass config only with a state dict; a PeftModel carries its own")
        return _from_model(source, adapter_name)
    if not isinstance(source, Mapping):
        raise TypeError(f"from_peft takes a PeftModel or a state dict, got {type(source).__name__}")
    if config is None:
        raise LoraError("a PEFT state dict needs its LoraConfig (the adapter_config.json) as config")
    return _from_state_dict(source, _config_dict(config), adapter_name)


def to_peft(adapter: LoraAdapter, base_config=None):
    """``adapter`` as a PEFT LoRA adapter: returns ``(LoraConfig, state_dict)``.

    Each module becomes one adapter of its total rank Σr with unit scaling (``lora_alpha = r``;
    the coefficients are folded into A), so loading it with PEFT reproduces the update exactly.
    ``base_config`` (a ``LoraConfig``) supplies fields such as ``task_type``.
    """
    from peft import LoraConfig

    ranks = {name: adapter.rank(name) for name in adapter.modules}
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    pattern = {re.escape(n): k for n, k in ranks.items() if k != r}
    fields = dict(base_config.to_dict()) if base_config is not None else {}
    for stale in ("peft_type", "revision", "auto_mapping", "base_model_name_or_path", "layers_to_transform"):
        fields.pop(stale, None)
    fields.update(r=r, lora_alpha=r, use_rslora=False, rank_pattern=pattern, alpha_pattern=dict(pattern),
                  target_modules=sorted(adapter.modules), fan_in_fan_out=adapter.fan_in_fan_out,
                  lora_dropout=fields.get("lora_dropout", 0.0), bias="none", use_dora=False)
    state = {}
    for name in adapter.modules:
        A, B = adapter.stacked(name)
        state[f"{_PREFIX}{name}.lora_A.weight"] = A.to(adapter.dtype).contiguous()
        state[f"{_PREFIX}{name}.lora_B.weight"] = B.to(adapter.dtype).contiguous()
    return LoraConfig(**fields), state


def to_peft_model(model: torch.nn.Module, adapter: LoraAdapter, *, adapter_name: str = "default"):
    """Wrap ``model`` (a transformers model; it is modified, as PEFT does) in a ``PeftModel`` that
    applies ``adapter`` unmerged. Returns the ``PeftModel``; save it with ``save_pretrained``."""
    from peft import get_peft_model, set_peft_model_state_dict

    config, state = to_peft(adapter)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name)
    if result.unexpected_keys:
        raise LoraError(f"PEFT did not take these keys: {result.unexpected_keys[:3]}")
    return peft_model


def _from_model(model: torch.nn.Module, adapter_name: str) -> LoraAdapter:
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if config is None:
        raise LoraError(f"the model has no PEFT adapter named {adapter_name!r}")
    _reject_unsupported(_config_dict(config))
    terms = {}
    for path, module in model.named_modules():
        lora_A = getattr(module, "lora_A", None)
        if not isinstance(lora_A, torch.nn.ModuleDict) or adapter_name not in lora_A:
            continue
        name = path[len(_PREFIX):] if path.startswith(_PREFIX) else path
        terms[name] = [LoraTerm(lora_A[adapter_name].weight, module.lora_B[adapter_name].weight,
                                module.scaling[adapter_name])]
    if not terms:
        raise LoraError(f"the model has no LoRA layers for adapter {adapter_name!r}")
    return LoraAdapter(terms, fan_in_fan_out=bool(getattr(config, "fan_in_fan_out", False)))


def _from_state_dict(state: Mapping[str, torch.Tensor], config: dict, adapter_name: str) -> LoraAdapter:
    _reject_unsupported(config)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if "lora_embedding" in key or "lora_magnitude" in key:
            raise LoraError(f"{key}: only LoRA on linear layers is supported (no embedding adapters, no DoRA)")
        match = _KEY.match(key)
        if match is None:
            raise LoraError(f"{key} is not a PEFT LoRA weight (expected '<module>.lora_A.weight' or '.lora_B.weight')")
        if match["adapter"] not in (None, adapter_name):
            continue
        if not isinstance(value, torch.Tensor):
            raise LoraError(f"{key} is a {type(value).__name__}, not a tensor")
        parts.setdefault(match["module"], {})[match["part"]] = value
    if not parts:
        raise LoraError(f"no LoRA weights for adapter {adapter_name!r} in the state dict")
    terms = {}
    for name, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise LoraError(f"module {name!r} has lora_{''.join(ab)} but not lora_{'B' if 'A' in ab else 'A'}")
        rank = ab["A"].shape[0]
        r, alpha = _rank_and_alpha(config, name)
        if r != rank:
            raise LoraError(f"module {name!r}: A has rank {rank} but the config says r={r}")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        terms[name] = [LoraTerm(ab["A"], ab["B"], scale)]
    return LoraAdapter(terms, fan_in_fan_out=bool(config.get("fan_in_fan_out", False)))


def _rank_and_alpha(config: dict, name: str) -> tuple[int, float]:
    """PEFT's rule: the first rank_pattern / alpha_pattern key matching the module, else r / lora_alpha."""
    from peft.utils.other import get_pattern_key

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), config["r"]) if rank_pattern else config["r"]
    alpha = (alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config["lora_alpha"])
             if alpha_pattern else config["lora_alpha"])
    if isinstance(r, bool) or not isinstance(r, Integral) or r < 1:
        raise LoraError(f"module {name!r}: the rank r must be a positive int, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha):
        raise LoraError(f"module {name!r}: lora_alpha must be a finite number, got {alpha!r}")
    return int(r), float(alpha)


def _config_dict(config) -> dict:
    if isinstance(config, Mapping):
        out = dict(config)
    elif hasattr(config, "to_dict"):
        out = config.to_dict()
    else:
        raise TypeError(f"config must be a peft LoraConfig or a dict, got {type(config).__name__}")
    for key in ("r", "lora_alpha"):
        if key not in out:
            raise LoraError(f"the LoRA config has no {key!r}")
    return out


def _reject_unsupported(config: dict) -> None:
    if config.get("use_dora"):
        raise LoraError("DoRA adapters (use_dora=True) are not plain LoRA and cannot be stacked")
    if config.get("lora_bias"):
        raise LoraError("LoRA biases (lora_bias=True) are not supported")
    peft_type = str(config.get("peft_type", "LORA"))
    if "LORA" not in peft_type.upper() or peft_type.upper().endswith("ADALORA"):
        raise LoraError(f"not a LoRA adapter: peft_type {peft_type}")
