"""The federated loop on either kernel backend: the same small jobs (stories260K, the project's
synthetic data, 2 rounds) run once on the compiled core and once on the Triton kernels (Triton's
interpreter on the CPU) and must end with the same weights: bit for bit for Ferret (Rademacher and
SRHT bases: the spec fixes every sum's order) and FedKSeed (perturbations), within fp32 rounding
for the LoRA merge (the GEMM's summation order is the kernel's own)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ferret import fl
from ferret.fl.models import stories260k_dir

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed"),
    # on a GPU machine triton is imported for the GPU: its interpreter cannot run the CPU half
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton's interpreter is not selected"),
]

# The interpreter runs a kernel launch in tens of milliseconds: few trainable tensors keep a job
# to seconds (the algorithms project, perturb and update only what requires grad).
TRAINABLE = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight", "model.norm.weight")
LOCAL = fl.LocalTraining(steps=2, batch_size=4, lr=0.05)
ZEROTH = fl.LocalTraining(steps=2, batch_size=4, lr=5e-5)
ADAM = fl.LocalTraining(steps=2, batch_size=4, lr=3e-3, optimizer="adamw")

JOBS = {
    "ferret_rademacher": lambda: fl.Ferret(budget=64, local=LOCAL, basis="rademacher", bases="shared"),
    "ferret_srht": lambda: fl.Ferret(budget=64, local=LOCAL, basis="srht:256"),
    "fedkseed": lambda: fl.FedKSeed(k=4, local=ZEROTH, eps=1e-3),
    "flora": lambda: fl.FLoRA(ranks=[4, 2], local=ADAM, target_modules=["q_proj"]),
}


@pytest.fixture(scope="module")
def data():
    tokenizer = AutoTokenizer.from_pretrained(stories260k_dir())
    train, held = fl.holdout(fl.synthetic_tasks(8, seed=0), 10, seed=0)
    shards = [fl.encode(s, tokenizer) for s in fl.partition(train, "dirichlet", 2, seed=0, alpha=1.0, min_per_client=2)]
    return shards, fl.encode(held, tokenizer)


def small_model() -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(stories260k_dir())
    for name, p in model.named_parameters():
        p.requires_grad_(name in TRAINABLE)
    return model


def final_weights(job: str, backend: str, data) -> dict[str, torch.Tensor]:
    shards, held = data
    model = small_model()
    fl.run(JOBS[job](), model, shards, held, rounds=2, seed=7, device="cpu", backend=backend)
    return model.state_dict()


@pytest.mark.parametrize("job", ["ferret_rademacher", "ferret_srht", "fedkseed"])
def test_core_and_triton_reach_the_same_weights_bit_for_bit(job, data):
    core, triton = final_weights(job, "core", data), final_weights(job, "triton", data)
    before = small_model().state_dict()
    assert not all(torch.equal(core[k], before[k]) for k in TRAINABLE)  # it trained
    different = [k for k in core if not torch.equal(core[k], triton[k])]
    assert not different, different


def test_flora_on_core_and_triton_agrees_to_fp32_rounding(data):
    core, triton = final_weights("flora", "core", data), final_weights("flora", "triton", data)
    before = small_model().state_dict()
    assert any(not torch.equal(core[k], before[k]) for k in core)
    for k in core:
        torch.testing.assert_close(triton[k], core[k], rtol=1e-5, atol=1e-6, msg=k)
