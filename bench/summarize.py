"""Turn a pytest-benchmark JSON file into the Markdown table kept beside it.

Usage: python bench/summarize.py bench/results/cpu_projection.json  (writes cpu_projection.md)
       python bench/summarize.py bench/results/cpu_lora.json        (writes cpu_lora.md)
       python bench/summarize.py bench/results/cpu_srht.json        (writes cpu_srht.md)
       python bench/summarize.py bench/results/cpu_hadamard.json    (writes cpu_hadamard.md)
"""

import json
import sys
from pathlib import Path


def main(path: str) -> None:
    data = json.loads(Path(path).read_text())
    if any("method" in b["extra_info"] for b in data["benchmarks"]):
        return lora_table(path, data)
    if any("layout" in b["extra_info"] for b in data["benchmarks"]) and \
            any(b["extra_info"].get("basis") == "hadamard" for b in data["benchmarks"]):
        return hadamard_table(path, data)
    if any("basis" in b["extra_info"] for b in data["benchmarks"]):
        return srht_table(path, data)
    machine = data.get("machine_info", {})
    rows = ["| op | d | K | seconds | × FMA bound | memory bound (s) | official-style (s) | speed-up |",
            "|---|---|---|---|---|---|---|---|"]
    notes = []
    for b in data["benchmarks"]:
        x = b["extra_info"]
        if "extra_peak_rss_mib" in x:
            notes.append(f"- peak memory beyond input and output, compress + reconstruct at d=1e8, K=200: "
                         f"{x['extra_peak_rss_mib']:.1f} MiB")
            continue
        op = b["name"].split("[")[0].replace("test_", "")
        rows.append(f"| {op} | {x['d']:.0e} | {x['K']} | {x['seconds']:.4f} | {x['x_fma_bound']:.2f} | "
                    f"{x['memory_bound_seconds']:.4f} | {x['official_style_seconds']:.1f} | "
                    f"{x['speedup_vs_official_style']:,.0f}× |")
    first = next(b["extra_info"] for b in data["benchmarks"] if "threads" in b["extra_info"])
    head = (f"# CPU projection benchmark\n\n{machine.get('cpu', {}).get('brand_raw', 'CPU')}, "
            f"{first['threads']} threads, {first['simd']} loops; {data.get('datetime', '')}\n\n")
    Path(path).with_suffix(".md").write_text(head + "\n".join(rows) + "\n\n" + "\n".join(notes) + "\n")


def lora_table(path: str, data: dict) -> None:
    """One row per layer: each method's seconds and its ratio to one addmm of the stacked size."""
    methods = ["ferret", "per_client_addmm", "peft_cat", "one_addmm"]
    seconds: dict[str, dict[str, float]] = {}
    for b in data["benchmarks"]:
        x = b["extra_info"]
        seconds.setdefault(x["layer"], {})[x["method"]] = x["seconds"]
    rows = ["| layer | " + " | ".join(methods) + " | ferret / one_addmm |", "|---" * (len(methods) + 2) + "|"]
    for layer, by_method in seconds.items():
        bound = by_method["one_addmm"]
        cells = [f"{by_method[m] * 1e3:.2f} ms ({by_method[m] / bound:.2f}×)" for m in methods]
        rows.append(f"| {layer} | " + " | ".join(cells) + f" | {by_method['ferret'] / bound:.2f} |")
    x = data["benchmarks"][0]["extra_info"]
    head = (f"# LoRA merge benchmark\n\n{data.get('machine_info', {}).get('cpu', {}).get('brand_raw', 'CPU')}, "
            f"{x['threads']} threads; 10 clients, total rank {x['total_rank']}, fp32, best of 20 "
            f"(PEFT: best of 5); {data.get('datetime', '')}\n\n")
    Path(path).with_suffix(".md").write_text(head + "\n".join(rows) + "\n")


def srht_table(path: str, data: dict) -> None:
    """One row per (op, K): Rademacher and SRHT seconds, their ratio, and SRHT against the memory bound."""
    cells: dict[tuple[str, int], dict[str, dict]] = {}
    for b in data["benchmarks"]:
        x = b["extra_info"]
        cells.setdefault((x["op"], x["K"]), {})[x["basis"]] = x
    rows = ["| op | K | rademacher (s) | srht (s) | srht speed-up | srht × memory bound | srht ns / element |",
            "|---|---|---|---|---|---|---|"]
    for (op, k), by_basis in cells.items():
        s = by_basis["srht"]
        r = by_basis.get("rademacher")
        rows.append(f"| {op} | {k:,} | {r['seconds']:.3f} | " if r else f"| {op} | {k:,} | – | ")
        rows[-1] += (f"{s['seconds']:.4f} | {r['seconds'] / s['seconds']:,.0f}× | " if r else f"{s['seconds']:.4f} | – | ")
        rows[-1] += f"{s['x_memory_bound']:.2f} | {s['ns_per_element']:.3f} |"
    x = data["benchmarks"][0]["extra_info"]
    head = (f"# SRHT against Rademacher bases\n\n{data.get('machine_info', {}).get('cpu', {}).get('brand_raw', 'CPU')}, "
            f"{x['threads']} threads, {x['simd']} loops; d = {x['d']:.0e} fp32 in one block, Hadamard size "
            f"{x['hadamard']}; memory bound (reading Δ once) {x['memory_bound_seconds']:.4f} s; best of 2 "
            f"(Rademacher) or 5 (SRHT); {data.get('datetime', '')}\n\n")
    Path(path).with_suffix(".md").write_text(head + "\n".join(rows) + "\n")


def hadamard_table(path: str, data: dict) -> None:
    """One row per (layout, op, K): the dense Hadamard seconds against the memory bound measured
    in the same run (compress: one read of Δ; reconstruct: one read and write of out) and
    against Rademacher bases at the same K where they were run."""
    seconds: dict[tuple, float] = {}
    rows_of: dict[tuple, dict] = {}
    for b in data["benchmarks"]:
        x = b["extra_info"]
        seconds[(x["layout"], x["op"], x["basis"], x["K"])] = x["seconds"]
        if x["basis"] == "hadamard":
            rows_of[(x["layout"], x["op"], x["K"])] = x
    rows = ["| layout | op | K | hadamard (s) | memory bound (s) | × bound | rademacher (s) | speed-up |",
            "|---|---|---|---|---|---|---|---|"]
    for (layout, op, k), x in rows_of.items():
        bound = seconds[(layout, "read" if op == "compress" else "read+write", "torch", 0)]
        rademacher = seconds.get((layout, op, "rademacher", k))
        tail = f"{rademacher:.3f} | {rademacher / x['seconds']:,.0f}× |" if rademacher else "– | – |"
        name = "one block" if layout == "block" else layout
        rows.append(f"| {name} (d = {x['d']:,}) | {op} | {k:,} | {x['seconds']:.4f} | {bound:.4f} | "
                    f"{x['seconds'] / bound:.2f} | {tail}")
    x = data["benchmarks"][0]["extra_info"]
    head = (f"# Dense Hadamard against the memory bound and Rademacher bases\n\n"
            f"{data.get('machine_info', {}).get('cpu', {}).get('brand_raw', 'CPU')}, {x['threads']} threads, "
            f"{x['simd']} loops; the public API (ferret.compress / reconstruct), fp32; medians of 5 (Rademacher: "
            f"1 run); memory bound: torch's sum of Δ (compress) and in-place add of a scalar to out "
            f"(reconstruct) in the same process; {data.get('datetime', '')}\n\n")
    Path(path).with_suffix(".md").write_text(head + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
