"""Merging 10 client LoRA adapters (ranks 64, 32, 16, 16, 8, 8, 4, 4, 4, 4) into one layer.

Layers: 2048x2048, and SmolLM2-135M's shapes 576x576 (attention), 1536x576 and 576x1536 (MLP).
Methods, timed in the same process:
  ferret            lora.merge_into(W, lora.stack(clients, weights)): one addmm, inner dim Σr = 160
  per_client_addmm  W.addmm_(p_i s_i B_i, A_i) for each client
  peft_cat          PEFT's add_weighted_adapter(combination_type="cat") + merge of that adapter
  one_addmm         W.addmm_(B, A) with B, A of the stacked size already built: the bound
Run: python -m pytest bench/test_lora.py -q --benchmark-json bench/results/cpu_lora.json
"""

import pytest
import torch

from ferret import lora
from ferret.lora import LoraAdapter, LoraTerm

RANKS = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]
COUNTS = [120, 80, 50, 50, 30, 30, 10, 10, 10, 5]
LAYERS = [(2048, 2048), (576, 576), (1536, 576), (576, 1536)]
METHODS = ["ferret", "per_client_addmm", "peft_cat", "one_addmm"]


def clients(out_f, in_f):
    g = torch.Generator().manual_seed(0)
    return [LoraAdapter({"layer": [LoraTerm(torch.randn(r, in_f, generator=g) / in_f**0.5,
                                            torch.randn(out_f, r, generator=g) / r**0.5, 2.0)]}) for r in RANKS]


def peft_layer(out_f, in_f, adapters):
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential()
    model.add_module("layer", torch.nn.Linear(in_f, out_f, bias=False))
    for i, (r, adapter) in enumerate(zip(RANKS, adapters)):
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["layer"])
        if i == 0:
            model = get_peft_model(model, config, adapter_name="c0")
        else:
            model.add_adapter(f"c{i}", config)
        layer = model.base_model.model.layer
        with torch.no_grad():
            layer.lora_A[f"c{i}"].weight.copy_(adapter.terms["layer"][0].A)
            layer.lora_B[f"c{i}"].weight.copy_(adapter.terms["layer"][0].B)
    return model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", LAYERS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_merge(benchmark, shape, method):
    out_f, in_f = shape
    adapters = clients(out_f, in_f)
    p = [c / sum(COUNTS) for c in COUNTS]
    weight = torch.randn(out_f, in_f)
    if method == "ferret":
        state = {"layer.weight": weight}
        benchmark.pedantic(lambda: lora.merge_into(state, lora.stack(adapters, COUNTS)), rounds=20, warmup_rounds=2)
    elif method == "per_client_addmm":
        def loop():
            for p_i, a in zip(p, adapters):
                t = a.terms["layer"][0]
                weight.addmm_(t.B, t.A, alpha=p_i * t.coef)
        benchmark.pedantic(loop, rounds=20, warmup_rounds=2)
    elif method == "one_addmm":
        A, B = lora.stack(adapters, COUNTS).stacked("layer")
        benchmark.pedantic(lambda: weight.addmm_(B, A), rounds=20, warmup_rounds=2)
    else:
        model = peft_layer(out_f, in_f, adapters)
        names = [f"c{i}" for i in range(len(RANKS))]

        def peft_cat():
            model.add_weighted_adapter(names, p, "agg", combination_type="cat")
            model.base_model.merge_adapter(["agg"])

        def drop_previous():
            if "agg" in model.peft_config:
                model.base_model.unmerge_adapter()
                model.delete_adapter("agg")

        benchmark.pedantic(peft_cat, setup=drop_previous, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(layer=f"{out_f}x{in_f}", method=method, seconds=benchmark.stats.stats.min,
                                threads=torch.get_num_threads(), total_rank=sum(RANKS))
