"""Issue 22's recorded comparisons on the Dolly anchor (bench/configs/dolly_stories260k.toml):
(a) what the default influence bound costs an honest run (the default Ferret and FedAvg with and
without it), (b) one client of ten sending each hostile upload against the default Ferret, Ferret
with shared bases under every aggregator, and FedAvg, and (c) rounds of 65, 1,000 and 10,000
clients with the default basis, timed.

    python bench/fl_hostile.py run RUN_DIR [--resume] [--part a|b]  # (a) and (b): two `ferret compare` runs side by side
    python bench/fl_hostile.py clients RUN_DIR           # (c): one `ferret run` per client count, one at a time
    python bench/fl_hostile.py summary RUN_DIR OUT       # OUT/ (tables, JSON, plots) and OUT.md
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fl_defences import rows_of  # the records of a `ferret compare` directory, by entry

CONFIG = Path(__file__).parent / "configs" / "dolly_stories260k.toml"
DOLLY = Path(os.environ.get("DOLLY", Path(__file__).resolve().parents[2] / "shared" / "assets" / "data" / "dolly"
                            / "databricks-dolly-15k.jsonl"))  # DOLLY=path: where yours is
SETUPS = {"ferret": "ferret", "ferret-shared-mean": "ferret:bases='shared'",
          "ferret-shared-median": "ferret:bases='shared',aggregator='median'",
          "ferret-shared-trimmed-mean": "ferret:bases='shared',aggregator='trimmed-mean',byzantine=1",
          "ferret-shared-krum": "ferret:bases='shared',aggregator='krum',byzantine=1",
          "ferret-shared-multi-krum": "ferret:bases='shared',aggregator='multi-krum',byzantine=1",
          "fedavg": "fedavg"}
ATTACKS = ("huge", "scale:1e6", "scale:-100", "concentrate", "group-size", "short", "examples:1e15")
CLIENTS = (65, 1000, 10_000)


def entry(setup: str, attack: str | None = None, unbounded: bool = False) -> str:
    base = SETUPS[setup]
    extra = []
    if unbounded:
        extra.append("relative_bound=inf")
    if attack:
        extra.append(f"attack='{attack}',malicious=[0]")
    return base + (("," if ":" in base else ":") + ",".join(extra) if extra else "")


def entries(part: str = "ab") -> list[str]:
    """Part (a): the bound's cost (4 runs); part (b): every setup clean and under every attack (53 runs,
    about 5 minutes each on one core)."""
    out = []
    if "a" in part:
        out += [entry("ferret"), entry("ferret", unbounded=True), entry("fedavg"), entry("fedavg", unbounded=True)]
    if "b" in part:
        out += [entry(s) for s in SETUPS if s not in ("ferret", "fedavg") or "a" not in part]
        out += [entry(s, a) for s in SETUPS for a in ATTACKS if not (a == "group-size" and s == "fedavg")]
    return out


def _compare(run_dir: Path, name: str, chosen: list[str], resume: bool) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FERRET_NUM_THREADS": "1"}
    cmd = ["ferret", "compare", "--config", str(CONFIG), "--data", str(DOLLY), "--rouge-samples", "0",
           "--no-progress", "--out", str(run_dir / name), *(["--resume"] if resume else []), *chosen]
    log = open(run_dir.with_name(run_dir.name + f"-{name}.log"), "a")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def run(run_dir: Path, resume: bool = False, part: str = "ab") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    chosen = entries(part)
    procs = [_compare(run_dir, "half0", chosen[0::2], resume), _compare(run_dir, "half1", chosen[1::2], resume)]
    sys.exit(max(p.wait() for p in procs))


def clients(run_dir: Path) -> None:
    """Two rounds of the default Ferret per client count, on Dolly split iid, one example a client
    at least, one local step of one example at lr 0.02 (0.1 overshoots from a single example,
    with or without the bound); the second round's download is the first round's broadcast."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for n in CLIENTS:
        out = run_dir / f"clients-{n}"
        if (out / "summary.md").exists():
            continue
        start = time.perf_counter()
        subprocess.run(["ferret", "run", "--data", str(DOLLY), "--partition", "iid", "--clients", str(n),
                        "--min-per-client", "1", "--rounds", "2", "--steps", "1", "--batch-size", "1",
                        "--lr", "0.02", "--n-eval", "200", "--rouge-samples", "0", "--no-progress", "--out", str(out)],
                       check=True)
        (out / "wall.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))


def summary(run_dir: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ferret.fl.results import read_metrics

    out.mkdir(parents=True, exist_ok=True)
    rows = {**rows_of(run_dir / "half0"), **rows_of(run_dir / "half1")}
    loss = {label: row["final_eval_loss"] for label, row in rows.items()}
    start = next(iter(rows.values()))["result"].initial_eval_loss
    lines = [f"Starting eval loss {start:.4f}; stories260K, Dolly split over 10 clients by Dirichlet(0.5), all in "
             f"every round, 10 SGD steps of 4 at lr 0.1, 10 rounds, 200 held-out records (the Dolly anchor).", "",
             "## (a) What the default bound costs an honest run", "",
             "| algorithm | bounded (relative_bound = 2) | unbounded | difference | uploads bounded, rounds 1-10 |",
             "|---|---|---|---|---|"]
    cost = {}
    for setup in ("ferret", "fedavg"):
        bounded, free = loss[entry(setup)], loss[entry(setup, unbounded=True)]
        counts = [r.bounded for r in rows[entry(setup)]["result"].rounds]
        cost[setup] = 100 * (bounded / free - 1)
        lines.append(f"| {setup} | {bounded:.4f} | {free:.4f} | {cost[setup]:+.2f} % | {counts} |")
    grid = {}
    measured = [s for s in SETUPS if any(entry(s, a) in loss for a in ATTACKS)]
    if measured:
        lines += ["", "## (b) One client of ten sending a hostile upload: final eval loss against the clean run", "",
                  "| setup | clean | " + " | ".join(ATTACKS) + " |", "|---|---|" + "---|" * len(ATTACKS)]
    for setup in measured:
        clean = loss[entry(setup)]
        cells = []
        for attack in ATTACKS:
            label = entry(setup, attack)
            if label not in loss:
                cells.append("n/a")
                continue
            grid[(setup, attack)] = 100 * (loss[label] / clean - 1)
            result = rows[label]["result"]
            how = ("dropped" if all(0 in r.dropped for r in result.rounds) else
                   f"bounded {sum(r.bounded for r in result.rounds)}×" if any(r.bounded for r in result.rounds) else "")
            cells.append(f"{loss[label]:.4f} ({grid[(setup, attack)]:+.1f} %{', ' + how if how else ''})")
        lines.append(f"| {setup} | {clean:.4f} | " + " | ".join(cells) + " |")
    if grid:
        lines += ["", f"Worst case {max(grid.values()):+.1f} % against its clean run (target: within 10 %); every run "
                      f"ended with finite weights and exit status 0."]
    timings = []
    for n in CLIENTS:
        d = run_dir / f"clients-{n}"
        if not (d / "metrics.jsonl").exists():
            continue
        result, _ = read_metrics(d / "metrics.jsonl")
        wall = json.loads((d / "wall.json").read_text())["seconds"] if (d / "wall.json").exists() else float("nan")
        timings.append((n, result, wall))
    if timings:
        lines += ["", "## (c) Clients per round with the default basis (two rounds of one local step of one "
                      "example each)", "",
                  "| clients | eval loss, start → round 2 | dropped | bounded (rounds 1, 2) | local seconds a round "
                  "(every client, one process) | server seconds a round (check, bound, merge, reconstruct) | "
                  "upload per client | broadcast (round 1) | FedAvg's | whole run (s) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        fedavg = rows[entry("fedavg")]["result"].rounds[1].download_bytes  # its broadcast: every weight in fp32
        for n, result, wall in timings:
            first, second = result.rounds
            up = sum(first.upload_bytes.values()) / max(len(first.upload_bytes), 1)
            lines.append(f"| {n:,} | {result.initial_eval_loss:.4f} → {second.eval_loss:.4f} | "
                         f"{len(first.dropped) + len(second.dropped)} | {first.bounded}, {second.bounded} | "
                         f"{sum(first.local_seconds.values()):.1f}, {sum(second.local_seconds.values()):.1f} | "
                         f"{first.aggregate_seconds:.2f}, {second.aggregate_seconds:.2f} | {up / 1024:.1f} KiB | "
                         f"{second.download_bytes / 2**20:.3f} MiB | {fedavg / 2**20:.3f} MiB | {wall:.0f} |")
    if grid:
        _plot(grid, out / "hostile.png", plt)
    json.dump({"start": start, "final_eval_loss": loss, "bound_cost_percent": cost,
               "attack_percent": {f"{s}|{a}": v for (s, a), v in grid.items()}}, open(out / "hostile.json", "w"),
              indent=1)
    for name in ("half0", "half1"):
        shutil.copy(run_dir / name / "table.md", out / f"{name}_table.md")
    Path(str(out) + ".md").write_text("# A server no client can stop or steer, on the Dolly anchor\n\n"
                                      + "\n".join(lines) + "\n")


def _plot(grid: dict, path: Path, plt) -> None:
    """Bars of every setup's final eval loss under each attack against its clean run."""
    fig, ax = plt.subplots(figsize=(9, 4.4))
    width = 0.8 / len(SETUPS)
    for i, setup in enumerate(SETUPS):
        ax.bar([j + i * width for j in range(len(ATTACKS))], [grid.get((setup, a), 0.0) for a in ATTACKS], width,
               label=setup)
    ax.axhline(10, color="k", ls="--", lw=0.8, label="target: +10 %")
    ax.axhline(-10, color="k", ls="--", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ATTACKS))], ATTACKS, fontsize=8)
    ax.set(ylabel="final eval loss against the clean run (%)", title="one hostile client of ten, Dolly anchor")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(Path(sys.argv[2]), resume="--resume" in sys.argv,
            part=sys.argv[sys.argv.index("--part") + 1] if "--part" in sys.argv else "ab")
    elif sys.argv[1] == "clients":
        clients(Path(sys.argv[2]))
    else:
        summary(Path(sys.argv[2]), Path(sys.argv[3]))
