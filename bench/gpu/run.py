"""The GPU proof: what ferret does on a machine with an NVIDIA GPU, in one command.

    bench/gpu/run.sh OUTDIR            installs the package from this checkout, then runs this file
    python bench/gpu/run.py OUTDIR     the steps below (the package already installed)
    python bench/gpu/run.py OUTDIR --dry-run   the same steps at tiny sizes on the CPU

Steps, each recorded whatever the others do (the figures first, should time run short):
  1. the machine: GPU, driver, clocks, torch and Triton versions;
  2. the kernel benchmarks (bench/test_gpu.py, the GPU cases of bench/test_lora.py);
  3. one Ferret round on random-weight models of SmolLM2-135M's and a 1B Llama's shapes: local
     training seconds beside compress + reconstruct seconds;
  4. the tests that need CUDA (tests/test_gpu_sizes.py at real sizes, the Triton and LoRA kernel
     tests) in parallel processes;
  5. a short federated job: Ferret and FedAvg on stories260K, 2 rounds, on the GPU (Triton
     kernels) and on the CPU (the compiled core), final weights compared.
Writes OUTDIR/summary.md and OUTDIR/summary.json, plus the tests' JUnit XML, the benchmarks'
pytest-benchmark JSON and a log. Without a GPU it runs its dry run (Triton's interpreter, tiny
sizes) so the script is exercised in CI and cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ["tests/test_gpu_sizes.py", "tests/test_triton.py", "tests/test_lora_triton.py"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory for summary.md, summary.json and the raw results")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (the default without CUDA)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["tests", "bench", "federated", "round"],
                        help="steps to leave out")
    args = parser.parse_args(argv)
    dry = args.dry_run or not _cuda()
    if dry:  # before anything imports triton: the kernels run in its interpreter
        os.environ.update(TRITON_INTERPRET="1", FERRET_GPU_PROFILE="dry")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"dry_run": dry, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": {}}
    steps = [("machine", machine), ("bench", bench), ("round", ferret_round), ("tests", tests), ("federated", federated)]
    for name, step in steps:
        if name in args.skip:
            continue
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            result = step(args.out, dry)
        except Exception:  # a step's failure is a finding: record it and go on
            result = {"error": traceback.format_exc(limit=6)}
            print(result["error"], flush=True)
        result["seconds"] = round(time.perf_counter() - started, 1)
        summary["steps"][name] = result
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    (args.out / "summary.md").write_text(markdown(summary), encoding="utf-8")
    print((args.out / "summary.md").read_text(encoding="utf-8"))
    failed = [n for n, r in summary["steps"].items() if "error" in r or r.get("failed")]
    return 1 if failed else 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def machine(out: Path, dry: bool) -> dict:
    """The GPU and the software stack."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if dry:
        return {**info, "device": f"CPU ({os.cpu_count()} cores), dry run"}
    props = torch.cuda.get_device_properties(0)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    return {**info, "device": props.name, "sms": props.multi_processor_count, "cuda": torch.version.cuda,
            "memory_gib": round(props.total_memory / 2**30, 1), "nvidia_smi": smi}


def tests(out: Path, dry: bool) -> dict:
    """The CUDA tests, eight processes at a time; counts from the JUnit XML."""
    if dry:  # CI runs these files itself (in the interpreter); here only check that they collect
        cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", *TESTS]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        return {"collected": proc.returncode == 0, "failed": proc.returncode != 0, "output": proc.stdout[-500:]}
    xml = out / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "8", f"--junitxml={xml}", *TESTS]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout[-3000:], proc.stderr[-2000:], flush=True)
    counts = _junit_counts(xml)
    return {**counts, "failed": counts.get("failures", 0) + counts.get("errors", 0) > 0 or proc.returncode not in (0, 5),
            "returncode": proc.returncode, "failures_list": _junit_failures(xml)}


def _junit_counts(xml: Path) -> dict:
    if not xml.is_file():
        return {}
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"time": suite.get("time")}


def _junit_failures(xml: Path) -> list[str]:
    if not xml.is_file():
        return []
    return [f"{case.get('classname')}::{case.get('name')}" for case in ET.parse(xml).getroot().iter("testcase")
            if case.find("failure") is not None or case.find("error") is not None]


def bench(out: Path, dry: bool) -> dict:
    """bench/test_gpu.py and bench/test_lora.py's GPU cases, each into its pytest-benchmark JSON."""
    results = {}
    runs = [("projection", ["bench/test_gpu.py"]), ("lora", ["bench/test_lora.py", "-k", "gpu"])]
    for name, target in runs:
        if dry and name == "lora":
            continue  # the GPU LoRA cases need CUDA; bench/test_lora.py's CPU cases are the CPU benchmark
        path = out / f"gpu_{name}.json"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *target, f"--benchmark-json={path}"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        print(proc.stdout[-2000:], proc.stderr[-1000:], flush=True)
        rows = []
        if path.is_file():
            rows = [{"name": b["name"], **b["extra_info"]} for b in json.loads(path.read_text())["benchmarks"]]
        results[name] = {"returncode": proc.returncode, "rows": rows}
    results["failed"] = any(r["returncode"] != 0 for r in results.values())
    return results


def federated(out: Path, dry: bool) -> dict:
    """Ferret and FedAvg on stories260K: the GPU run (Triton) beside the CPU run (the core)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ferret import fl
    from ferret.fl.models import stories260k_dir

    tokenizer = AutoTokenizer.from_pretrained(stories260k_dir())
    train, held = fl.holdout(fl.synthetic_tasks(30, seed=0), 40, seed=0)
    # every third example per client: the GPU image has no Flower Datasets, and any fixed split will do
    shards = [fl.encode(train[c::3], tokenizer) for c in range(3)]
    eval_data = fl.encode(held, tokenizer)
    local = fl.LocalTraining(steps=2 if dry else 5, batch_size=4, lr=0.1)
    budget = 64 if dry else 3800
    makers = {"ferret": lambda: fl.Ferret(budget=budget, local=local), "fedavg": lambda: fl.FedAvg(local=local)}
    # GPU: Triton kernels; CPU: the compiled core. Dry: both on the CPU, Triton in its interpreter.
    runs = {"gpu": dict(device="cpu" if dry else "cuda", backend="triton" if dry else "auto", dtype="fp32"),
            "cpu": dict(device="cpu", backend="core", dtype="fp32")}
    if not dry:
        runs["gpu_bf16"] = dict(device="cuda", backend="auto", dtype="bf16")
    results = {}
    for name, make in makers.items():
        weights, row = {}, {}
        for label, settings in runs.items():
            model = AutoModelForCausalLM.from_pretrained(stories260k_dir())
            started = time.perf_counter()
            result = fl.run(make(), model, shards, eval_data, rounds=2, seed=1, **settings)
            row[label] = {"seconds": round(time.perf_counter() - started, 2),
                          "eval_loss": [result.initial_eval_loss] + [r.eval_loss for r in result.rounds],
                          "local_seconds": [max(r.local_seconds.values()) for r in result.rounds],
                          "aggregate_seconds": [r.aggregate_seconds for r in result.rounds]}
            weights[label] = {n: p.detach().float().cpu() for n, p in model.named_parameters()}
        base = weights["cpu"]
        for label in weights:
            if label != "cpu":
                diff = max(float((weights[label][n] - base[n]).abs().max()) for n in base)
                scale = max(float(base[n].abs().max()) for n in base)
                row[label]["max_abs_weight_diff_vs_cpu"] = diff
                row[label]["max_rel_weight_diff_vs_cpu"] = diff / scale
                row[label]["bit_identical_to_cpu"] = all(torch.equal(weights[label][n], base[n]) for n in base)
        results[name] = row
    return results


SHAPES = {  # (hidden, intermediate, layers, heads, kv heads, vocab)
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "llama-1b": (2048, 8192, 16, 32, 8, 128256),
}
DRY_SHAPE = (64, 128, 2, 4, 2, 1000)


def ferret_round(out: Path, dry: bool) -> dict:
    """One Ferret client round and the server's reconstruction on random-weight models: local
    training (10 steps, batch 4 x 256 tokens, SGD, bf16 autocast on a GPU) against compress +
    reconstruct (budget 3800), each timed with the device synchronised."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import ferret
    from ferret import fl
    from ferret.fl.algorithms.base import difference, snapshot
    from ferret.fl.data import Encoded
    from ferret.fl.runtime import resolve
    from ferret.fl.train import first_order_steps, trainable

    runtime = resolve("cpu" if dry else "cuda", "fp32" if dry else "auto", "triton" if dry else "auto")
    results = {}
    for name, shape in SHAPES.items():
        hidden, inter, layers, heads, kv, vocab = DRY_SHAPE if dry else shape
        config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                             tie_word_embeddings=True, max_position_embeddings=512)
        with torch.device(runtime.device):
            model = LlamaForCausalLM(config)
        seq = 32 if dry else 256
        rng = np.random.default_rng(0)
        ids = [rng.integers(0, vocab, seq).tolist() for _ in range(64)]
        data = Encoded(ids, ids, 0)
        local = fl.LocalTraining(steps=2 if dry else 10, batch_size=4, lr=1e-4)
        params = dict(trainable(model))

        def train():
            first_order_steps(model, data, rng=np.random.default_rng(1), runtime=runtime, **vars(local))

        def project(seed):
            update = difference(model, start)
            return ferret.compress(update, seed, 64 if dry else 3800, backend=runtime.backend)

        def timed(fn):
            runtime.synchronize()
            started = time.perf_counter()
            value = fn()
            runtime.synchronize()
            return time.perf_counter() - started, value

        start = snapshot(model)
        train()  # warm-up: kernels compiled, allocator primed
        ferret.reconstruct(project(0), into=params, scale=0.0, backend=runtime.backend)
        start = snapshot(model)
        seconds = {}
        seconds["local_training"], _ = timed(train)
        seconds["compress"], packet = timed(lambda: project(1))
        seconds["reconstruct"], _ = timed(
            lambda: ferret.reconstruct(packet, into=params, scale=1.0, backend=runtime.backend))
        share = (seconds["compress"] + seconds["reconstruct"]) / seconds["local_training"]
        results[name] = {"parameters": sum(p.numel() for p in params.values()), "tensors": len(params),
                         "steps": local.steps, "tokens_per_step": 4 * seq, **{f"{k}_seconds": v for k, v in seconds.items()},
                         "projection_share_of_training": share, "packet_bytes": len(packet.to_bytes())}
        del model, start, params
        if not dry:
            torch.cuda.empty_cache()
    return results


def markdown(summary: dict) -> str:
    """The human-readable report of a run."""
    steps = summary["steps"]
    info = steps.get("machine", {})
    lines = [f"# ferret on a GPU: {info.get('device', '?')}", "",
             f"{summary['started']}; torch {info.get('torch')}, Triton {info.get('triton')}"
             + (f"; {info.get('nvidia_smi')}" if info.get("nvidia_smi") else "")
             + ("; **dry run** (CPU, Triton's interpreter, tiny sizes)" if summary["dry_run"] else ""), ""]
    for name, result in steps.items():
        if "error" in result:
            lines += [f"## {name}: failed", "", "```", result["error"].strip(), "```", ""]
    sections = {"tests": _tests_md, "bench": _kernels_md, "round": _round_md, "federated": _federated_md}
    for name, section in sections.items():
        if name in steps and "error" not in steps[name]:
            lines += section(steps[name]) + [""]
    lines.append("Step times: " + ", ".join(f"{n} {s.get('seconds')} s" for n, s in steps.items()))
    return "\n".join(lines) + "\n"


def _tests_md(t: dict) -> list[str]:
    if "tests" not in t:
        return ["## Tests", "", f"collected: {t.get('collected')}"]
    passed = t["tests"] - t["failures"] - t["errors"] - t["skipped"]
    return ["## Tests", "", f"{t['tests']} tests: {passed} passed, {t['failures']} failed, {t['errors']} errors, "
            f"{t['skipped']} skipped ({t['seconds']} s)"] + [f"- failed: `{f}`" for f in t.get("failures_list", [])]


def _kernels_md(b: dict) -> list[str]:
    lines = ["## Kernels", "", "| op | basis | dtype | d | K | ms | × memory bound | × issue bound | target ms | extra MiB "
             "| × one block | device ops | host syncs |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in b.get("projection", {}).get("rows", []):
        issue = f"{row['x_issue_bound']:.2f}" if row.get("x_issue_bound") else "–"
        target = f"{1e3 * row['target_seconds']:.0f}" if row.get("target_seconds") else "–"
        what = row["op"] + (f" ({row['layout']}, {row['tensors']} tensors)" if row.get("layout") else "")
        lines.append(f"| {what} | {row['basis']} | {row['dtype']} | {row['d']:.3g} | {row['K']:.3g} | "
                     f"{1e3 * row['seconds']:.2f} | {row['x_memory_bound']:.2f} | {issue} | {target} | "
                     f"{row['extra_peak_bytes'] / 2**20:.1f} | {_cell(row.get('x_one_block'), '.2f')} | "
                     f"{_cell(row.get('launches'), 'd')} | {_cell(row.get('host_syncs'), 'd')} |")
        if row.get("reconstruct_x_memory_bound"):  # a compress row that timed its reconstruction too
            lines.append(f"| reconstruct | {row['basis']} | {row['dtype']} | {row['d']:.3g} | {row['K']:.3g} | "
                         f"{1e3 * row['reconstruct_seconds']:.2f} | {row['reconstruct_x_memory_bound']:.2f} | – | – | – | – "
                         f"| – | – |")
    lora = b.get("lora", {}).get("rows", [])
    if lora:
        lines += ["", "| LoRA merge | dtype | ms | × one addmm | × memory bound | extra MiB |", "|---|---|---|---|---|---|"]
        lines += [f"| {row['method']} | {row['dtype']} | {1e3 * row['seconds']:.3f} | {row['ratio_to_one_addmm']:.2f} | "
                  f"{row['ratio_to_memory_bound']:.2f} | {row['extra_memory_bytes'] / 2**20:.1f} |" for row in lora]
    return lines


def _cell(value, spec: str) -> str:
    """A table cell: ``value`` formatted, or a dash where it was not measured."""
    return "–" if value is None else format(value, spec)


def _round_md(r: dict) -> list[str]:
    lines = ["## One Ferret round on random-weight models (budget 3800)", "",
             "| model | parameters | tensors | local training s | compress s | reconstruct s | projection / training |",
             "|---|---|---|---|---|---|---|"]
    for name, row in r.items():
        if isinstance(row, dict):
            lines.append(f"| {name} | {row['parameters']:,} | {row['tensors']} | {row['local_training_seconds']:.3f} "
                         f"({row['steps']} steps × {row['tokens_per_step']} tokens) | {row['compress_seconds']:.4f} | "
                         f"{row['reconstruct_seconds']:.4f} | {100 * row['projection_share_of_training']:.2f} % |")
    return lines


def _federated_md(f: dict) -> list[str]:
    lines = ["## Federated job (stories260K, 3 clients, 2 rounds)", "",
             "| algorithm | run | eval loss by round | seconds | max abs Δw vs CPU core (relative) | bit-identical |",
             "|---|---|---|---|---|---|"]
    for algorithm, runs in f.items():
        if not isinstance(runs, dict):
            continue
        for label, r in runs.items():
            diff = (f"{r['max_abs_weight_diff_vs_cpu']:.2e} ({r['max_rel_weight_diff_vs_cpu']:.1e})"
                    if "max_abs_weight_diff_vs_cpu" in r else "–")
            lines.append(f"| {algorithm} | {label} | {' → '.join(f'{x:.4f}' for x in r['eval_loss'])} | "
                         f"{r['seconds']} | {diff} | {r.get('bit_identical_to_cpu', '–')} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
