"""Peak memory of one client's round: a Ferret client (trained weights compressed against its
snapshot, read in place) beside a FedAvg client and beside Ferret compressing a materialised
difference (what its client did before), on random-weight Llamas of stories260K's and a larger
shape, fp32, SGD.

On the CPU the peak counts the tensors torch allocates during the round (a dispatch mode tracks
every new storage until it is freed), beyond the model itself; on a GPU it is CUDA's
``max_memory_allocated`` beyond what was allocated before. Writes OUT.json and OUT.md.

    python bench/fl_memory.py bench/results/fl_memory
"""

from __future__ import annotations

import json
import platform
import sys
import weakref
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from ferret import fl
from ferret.fl import protocol
from ferret.fl.algorithms.base import difference, snapshot
from ferret.fl.data import Encoded
from ferret.fl.train import first_order_steps

SHAPES = {"stories260k-shape (260K)": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=5,
                                          num_attention_heads=8, num_key_value_heads=4, vocab_size=512),
          "llama-25M": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                            num_key_value_heads=4, vocab_size=8192)}
LOCAL = fl.LocalTraining(steps=2, batch_size=2, lr=1e-3)
BUDGET = 3800


class Tracked(TorchDispatchMode):
    """The bytes of tensor storages allocated while active and still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if not ptr:
            return
        if ptr in self.live:
            self.live[ptr][1] += 1
        else:
            self.live[ptr] = [t.untyped_storage().nbytes(), 1]
            self.now += self.live[ptr][0]
            self.peak = max(self.peak, self.now)
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[ptr]


def peak_bytes(fn) -> int:
    """Bytes the peak of ``fn()`` holds beyond what was allocated before."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    mode = Tracked()
    with mode:
        fn()
    return mode.peak


def ferret_with_difference(algorithm, model, data, ctx):
    """Ferret's client as it was: the difference materialised, then compressed."""
    start = snapshot(model)
    first_order_steps(model, data, rng=ctx.rng, runtime=algorithm.runtime, **vars(algorithm.local))
    return algorithm.round(ctx).compress(difference(model, start), ctx.client).to_bytes()


def main(out: Path) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(0)
    rows = []
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True)).to(device)
        params = sum(p.numel() for p in model.parameters())
        tokens = rng.integers(1, shape["vocab_size"], size=(16, 32)).tolist()
        data = Encoded(tokens, tokens, pad_id=0)
        ctx = protocol.client_context(1, 0, 0, [0, 1, 2])
        clients = {"fedavg": lambda: fl.FedAvg(local=LOCAL).client_update(model, data, ctx),
                   "ferret (against its snapshot)": lambda: fl.Ferret(budget=BUDGET, local=LOCAL).client_update(
                       model, data, ctx),
                   "ferret (a materialised difference)": lambda: ferret_with_difference(
                       fl.Ferret(budget=BUDGET, local=LOCAL), model, data, ctx)}
        for client, fn in clients.items():
            fn()  # warm: optimiser and kernel set-up outside the measurement
            rows.append({"model": name, "parameters": params, "client": client, "peak_bytes": peak_bytes(fn),
                         "model_bytes": 4 * params})
            print(rows[-1], flush=True)
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or 'cpu'} (tracked)"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"device": machine, "budget": BUDGET, "rows": rows}, indent=1))
    lines = ["# Peak memory of one client's round", "",
             f"{machine}; random-weight Llamas, fp32, SGD, {LOCAL.steps} steps of batch {LOCAL.batch_size}, budget "
             f"{BUDGET}; the peak beyond the model's own weights, in units of the model's size (4 bytes a weight).",
             "", "| model | parameters | client | peak MiB | × model |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters']:,} | {r['client']} | {r['peak_bytes'] / 2**20:.1f} | "
                     f"{r['peak_bytes'] / r['model_bytes']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
