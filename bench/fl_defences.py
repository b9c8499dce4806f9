"""Issue 17's recorded comparison on the Dolly anchor (bench/configs/dolly_stories260k.toml):
(a) eval loss against ε for Ferret and FedAvg at the same noise multipliers, (b) 2 of 10 clients
attacking, the plain mean against each robust aggregator.

    python bench/fl_defences.py run RUN_DIR [--resume]  # two `ferret compare` runs side by side, one thread each
    python bench/fl_defences.py summary RUN_DIR OUT  # OUT/ (tables, JSON, plots) and OUT.md

Clipping norms are the median upload norms of the first round (FedAvg's update 1.70, Ferret's
3,800 coordinates 15.8), so each defence clips about half the clients at the same noise multiplier.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

CONFIG = Path(__file__).parent / "configs" / "dolly_stories260k.toml"
SHARED = "bases='shared',allocation='uniform'"
CLIP = {"fedavg": 1.70, "ferret": 15.8}
NOISES = (0.1, 0.2, 0.5, 1.0, 2.0)
ATTACKS = ("sign-flip", "scale:10")  # the targets' attacks; noise and nan are covered by tests/test_robust.py
AGGREGATORS = {"mean": "", "median": ",aggregator='median'", "trimmed-mean": ",aggregator='trimmed-mean',byzantine=2",
               "multi-krum": ",aggregator='multi-krum',byzantine=2"}


def privacy_entries() -> list[str]:
    entries = ["fedavg:weighting='equal'", f"ferret:{SHARED},weighting='equal'"]
    for z in NOISES:
        entries.append(f"fedavg:weighting='equal',dp_clip={CLIP['fedavg']},dp_noise={z}")
        entries.append(f"ferret:{SHARED},weighting='equal',dp_clip={CLIP['ferret']},dp_noise={z}")
    return entries


def attack_entries() -> list[str]:
    entries = [f"ferret:{SHARED}"]
    for attack in ATTACKS:
        for extra in AGGREGATORS.values():
            entries.append(f"ferret:{SHARED}{extra},attack='{attack}',malicious=[0,1]")
    return entries


def run(run_dir: Path, resume: bool = False, only: str | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FERRET_NUM_THREADS": "1"}
    procs = []
    for name, entries in (("privacy", privacy_entries()), ("attacks", attack_entries())):
        if only and name != only:
            continue
        cmd = ["ferret", "compare", "--config", str(CONFIG), "--rouge-samples", "0", "--no-progress",
               "--out", str(run_dir / name), *(["--resume"] if resume else []), *entries]
        log = open(run_dir.with_name(run_dir.name + f"-{name}.log"), "a")
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    sys.exit(max(p.wait() for p in procs))


def rows_of(compare_dir: Path) -> dict:
    from ferret.fl.compare import label_dir
    from ferret.fl.results import read_metrics

    rows = {r["name"]: r for r in json.loads((compare_dir / "compare.json").read_text())}
    for label, row in rows.items():
        row["result"] = read_metrics(compare_dir / label_dir(label) / "metrics.jsonl")[0]
    return rows


def summary(run_dir: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    privacy, attacks = rows_of(run_dir / "privacy"), rows_of(run_dir / "attacks")
    for name in ("privacy", "attacks"):
        for f in ("table.md", "compare.json", "loss.png"):
            shutil.copy(run_dir / name / f, out / f"{name}_{f}")
    start = next(iter(privacy.values()))["result"].initial_eval_loss
    lines = [f"Starting eval loss {start:.4f}; 10 clients, all in every round, 10 rounds (Dolly anchor).", "",
             "## (a) Eval loss against ε (δ = 1e-5), the same noise multipliers", "",
             "| noise multiplier z | ε after 10 rounds | FedAvg (d = 260K numbers) | Ferret (K = 3,800 coordinates) |",
             "|---|---|---|---|"]
    table = {}
    for label, row in privacy.items():
        algorithm = label.split(":")[0]
        z = next((float(p.split("=")[1]) for p in label.split(",") if p.startswith("dp_noise")), 0.0)
        table.setdefault(z, {})[algorithm] = row
    points = {"fedavg": [], "ferret": []}
    for z in sorted(table):
        eps = table[z]["ferret"]["epsilon"]
        lines.append(f"| {z if z else 'no DP'} | {'∞ (no noise)' if eps is None else f'{eps:.2f}'} | "
                     f"{table[z]['fedavg']['final_eval_loss']:.4f} | {table[z]['ferret']['final_eval_loss']:.4f} |")
        for algorithm in points:
            if eps is not None:
                points[algorithm].append((eps, table[z][algorithm]["final_eval_loss"]))
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    for algorithm, pts in points.items():
        ax.plot(*zip(*sorted(pts)), marker="o", label=f"{algorithm} (clip {CLIP[algorithm]})")
        ax.axhline(table[0.0][algorithm]["final_eval_loss"], ls="--", lw=0.8,
                   color=ax.lines[-1].get_color(), label=f"{algorithm}, no DP")
    ax.axhline(start, color="grey", lw=0.8, label="starting model")
    ax.set(xscale="log", yscale="log", xlabel="ε after 10 rounds (δ = 1e-5)", ylabel="final eval loss",
           title="client-level DP: noise in K dimensions against d")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "privacy_epsilon.png", dpi=110)
    plt.close(fig)

    clean = attacks[f"ferret:{SHARED}"]["final_eval_loss"]
    lines += ["", "## (b) 2 of 10 clients attacking: Ferret's final eval loss by aggregator", "",
              f"Clean run (plain mean, no attack): {clean:.4f}. Targets: with sign-flip or scale:10, a robust "
              f"aggregator within 5 % of the clean run ({1.05 * clean:.4f}) while the plain mean ends above the start "
              f"({start:.4f}).", "", "| attack | " + " | ".join(AGGREGATORS) + " |",
              "|---|" + "---|" * len(AGGREGATORS)]
    grid = {}
    for attack in ATTACKS:
        cells = []
        for name, extra in AGGREGATORS.items():
            loss = attacks[f"ferret:{SHARED}{extra},attack='{attack}',malicious=[0,1]"]["final_eval_loss"]
            grid[(attack, name)] = loss
            cells.append(f"{loss:.4f} ({100 * (loss / clean - 1):+.1f} %)")
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    lines += ["", "Targets:"]
    for attack in ("sign-flip", "scale:10"):
        best = min((grid[(attack, a)], a) for a in AGGREGATORS if a != "mean")
        plain = grid[(attack, "mean")]
        lines.append(f"- {attack}: plain mean {plain:.4f} ({'above' if plain > start else 'below'} the start: "
                     f"{'met' if plain > start else 'missed'}); best robust {best[1]} {best[0]:.4f}, "
                     f"{100 * (best[0] / clean - 1):+.1f} % against the clean run "
                     f"({'met' if best[0] <= 1.05 * clean else 'missed'})")
    fig, ax = plt.subplots(figsize=(8, 4.4))
    width = 0.8 / len(AGGREGATORS)
    for i, name in enumerate(AGGREGATORS):
        ax.bar([j + i * width for j in range(len(ATTACKS))], [min(grid[(a, name)], 3 * start) for a in ATTACKS],
               width, label=name)
    ax.axhline(clean, color="k", ls="--", lw=0.8, label="clean run")
    ax.axhline(start, color="grey", lw=0.8, label="starting model")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ATTACKS))], ATTACKS)
    ax.set(ylabel="final eval loss (capped at 3 × start)", title="2 of 10 clients attacking Ferret")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "attacks.png", dpi=110)
    plt.close(fig)
    Path(str(out) + ".md").write_text("# Privacy and robustness on the Dolly anchor\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(Path(sys.argv[2]), resume="--resume" in sys.argv, only=next((a for a in sys.argv[3:] if a != "--resume"), None))
    else:
        summary(Path(sys.argv[2]), Path(sys.argv[3]))
