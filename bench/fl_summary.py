"""The issue-4 and issue-16 targets, read off a ``ferret compare`` directory, as Markdown.

Usage: python bench/fl_summary.py RUN_DIR OUT_PREFIX
  copies table.md / compare.json / loss.png and each entry's config.toml to OUT_PREFIX/, writes
  every entry's per-round records to OUT_PREFIX/runs.json, and writes OUT_PREFIX.md: the comparison table, then Ferret against FedAvg
  (final loss gap), FedKSeed (rounds to its final loss, compute per round) and the upload ratio;
  when the runs scored Rouge-L at round 0 and the end, each entry's gain and Ferret's gap to FedAvg.
"""

import json
import shutil
import sys
from pathlib import Path

from ferret.fl.compare import label_dir
from ferret.fl.results import read_metrics, to_json


def main(run_dir: str, out_prefix: str) -> None:
    run, out = Path(run_dir), Path(out_prefix)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("table.md", "compare.json", "loss.png"):
        shutil.copy(run / name, out / name)
    rows = {r["name"]: r for r in json.loads((run / "compare.json").read_text())}
    results = {}
    for sub in sorted(p for p in run.iterdir() if p.is_dir()):
        (out / sub.name).mkdir(exist_ok=True)
        shutil.copy(sub / "config.toml", out / sub.name / "config.toml")
    for label in rows:
        results[label] = read_metrics(run / label_dir(label) / "metrics.jsonl")[0]
    (out / "runs.json").write_text(json.dumps({k: to_json(v) for k, v in results.items()}, indent=1))

    lines = [(run / "table.md").read_text(), "## Targets\n"]
    fedavg = rows.get("fedavg")
    kseed = next((k for k in rows if k.startswith("fedkseed")), None)
    for label in (k for k in rows if k.startswith("ferret")):
        r, res = rows[label], results[label]
        if fedavg:
            gap = r["final_eval_loss"] / fedavg["final_eval_loss"] - 1
            lines.append(f"- {label}: final eval loss {r['final_eval_loss']:.4f}, {100 * gap:+.1f}% against FedAvg's "
                         f"{fedavg['final_eval_loss']:.4f} (target ≤ +5%); upload per client per round "
                         f"{fedavg['upload_per_round'] / r['upload_per_round']:,.0f}× smaller than FedAvg's")
        if kseed:
            target = rows[kseed]["final_eval_loss"]
            reached = next((x.round + 1 for x in res.rounds if x.eval_loss <= target), None)
            k_rounds = len(results[kseed].rounds)
            lines.append(f"  - reaches {kseed}'s final loss {target:.4f} in {reached} round(s) against its "
                         f"{k_rounds} (target ≤ {k_rounds / 5:g}); local compute per client per round "
                         f"{rows[kseed]['local_seconds'] / r['local_seconds']:.2f}× below {kseed}'s")
    lines += rouge_targets(rows)
    Path(str(out) + ".md").write_text("\n".join(lines) + "\n")


def rouge_targets(rows: dict) -> list[str]:
    """Issue 16's targets: every final Rouge-L above the starting model's, Ferret within 1 point of FedAvg."""
    scored = {k: r for k, r in rows.items() if r.get("rouge_l") is not None and r.get("initial_rouge_l") is not None}
    if not scored:
        return []
    lines = ["", "Rouge-L (0–100) of the starting model and the final one (target: above the start):", ""]
    for label, r in scored.items():
        start, end = r["initial_rouge_l"], r["rouge_l"]
        lines.append(f"- {label}: {start:.2f} → {end:.2f} ({end - start:+.2f}): {'met' if end > start else 'missed'}")
    fedavg = scored.get("fedavg")
    for label in (k for k in scored if k.startswith("ferret") and fedavg):
        gap = scored[label]["rouge_l"] - fedavg["rouge_l"]
        lines.append(f"- {label} against FedAvg: {gap:+.2f} points (target: within 1): "
                     f"{'met' if abs(gap) <= 1 or gap > 0 else 'missed'}")
    return lines


if __name__ == "__main__":
    main(*sys.argv[1:])
