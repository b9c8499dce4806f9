"""What a run leaves for people: a summary table in the layout of the Ferret paper's Tables 2 and
3, and plots of eval loss against rounds and bytes. The records and metrics.jsonl are
:mod:`ferret.fl.results`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .results import RunResult


@dataclass
class Summary:
    """One run's row of the comparison table."""

    name: str
    local_seconds: float        # per client per round (mean)
    aggregate_seconds: float    # per round (mean)
    upload_per_round: float     # bytes per client per round (mean)
    upload_total: int           # bytes, all clients, all rounds
    download_per_round: float   # bytes per client per round (mean over rounds 2 on)
    rounds_to_target: int | None
    final_eval_loss: float
    rouge_l: float | None
    initial_eval_loss: float | None = None
    initial_rouge_l: float | None = None
    epsilon: float | None = None  # differential privacy spent by the end (None: not private)

    @classmethod
    def of(cls, name: str, result: RunResult, target: float | None = None, rouge_l: float | None = None) -> "Summary":
        """The row of the run ``name`` with records ``result``: means over its rounds and clients, the
        first round whose eval loss is at most ``target`` (None when none is, or no target) and
        ``rouge_l`` as given."""
        rounds = result.rounds
        per_client = [s for r in rounds for s in r.local_seconds.values()]
        uploads = [b for r in rounds for b in r.upload_bytes.values()]
        reached = next((r.round + 1 for r in rounds if target is not None and r.eval_loss <= target), None)
        return cls(name=name, local_seconds=_mean(per_client),
                   aggregate_seconds=_mean([r.aggregate_seconds for r in rounds]), upload_per_round=_mean(uploads),
                   upload_total=int(sum(uploads)), download_per_round=_mean([r.download_bytes for r in rounds if r.round > 0]),  # round 1 downloads nothing
                   rounds_to_target=reached, final_eval_loss=result.final_eval_loss, rouge_l=rouge_l,
                   initial_eval_loss=result.initial_eval_loss, initial_rouge_l=result.initial_rouge_l,
                   epsilon=rounds[-1].epsilon if rounds else None)


def table(rows: list[Summary], target: float | None = None) -> str:
    """A Markdown table of ``rows`` (Ferret paper Tables 2 and 3: compute, communication, quality)."""
    reach = f"rounds to loss ≤ {target:.3f}" if target is not None else "rounds to target"
    head = ["algorithm", "local s / client / round", "aggregation s / round", "upload / client / round",
            "upload total", "download / client / round", reach, "eval loss (start → end)", "Rouge-L (start → end)", "ε spent"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.name, f"{r.local_seconds:.2f}", f"{r.aggregate_seconds:.3f}", human_bytes(r.upload_per_round),
                 human_bytes(r.upload_total), human_bytes(r.download_per_round),
                 "—" if r.rounds_to_target is None else str(r.rounds_to_target),
                 _start_end(r.initial_eval_loss, r.final_eval_loss, "{:.4f}"),
                 "—" if r.rouge_l is None else _start_end(r.initial_rouge_l, r.rouge_l, "{:.2f}"),
                 "—" if r.epsilon is None else f"{r.epsilon:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _start_end(start: float | None, end: float, fmt: str, scale: float = 1) -> str:
    return (f"{fmt.format(scale * start)} → " if start is not None else "") + fmt.format(scale * end)


def human_bytes(n: float) -> str:
    """``n`` bytes with a binary unit, e.g. ``15.2 KiB``."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"


def plot(results: dict[str, RunResult], path: str | Path, title: str = "") -> None:
    """A PNG of eval loss against rounds and against cumulative upload per client, one line per run;
    of Rouge-L against rounds (the start, and the rounds that scored it) when any run has it; and of
    eval loss against the privacy spent when any run is differentially private."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rouge = {name: rouge_points(result) for name, result in results.items()}
    scored = any(rouge.values())
    private = any(r.epsilon is not None for result in results.values() for r in result.rounds)
    panels = 2 + scored + private
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.6))
    by_round, by_bytes = axes[:2]
    colors = plt.get_cmap("tab10" if len(results) <= 10 else "tab20").colors
    for i, (name, result) in enumerate(results.items()):
        style = dict(color=colors[i % len(colors)], marker="o", markersize=3)
        losses = [result.initial_eval_loss] + [r.eval_loss for r in result.rounds]
        by_round.plot(range(len(losses)), losses, label=name, **style)
        sent = np.cumsum([_mean(list(r.upload_bytes.values())) for r in result.rounds])
        if sent.size and sent[-1] > 0:
            by_bytes.plot(sent, losses[1:], **style)
        if scored and rouge[name]:
            axes[2].plot(*zip(*rouge[name]), **{**style, "linestyle": "none", "markersize": 6})  # measured only
        spent = [(r.epsilon, r.eval_loss) for r in result.rounds if r.epsilon is not None]
        if private and spent:
            axes[-1].plot(*zip(*spent), **style)
    by_round.set(xlabel="round", ylabel="eval loss (response tokens)", title="eval loss by round")
    by_bytes.set(xlabel="bytes uploaded per client (cumulative)", ylabel="eval loss", xscale="log",
                 title="eval loss by communication")
    if scored:
        axes[2].set(xlabel="round", ylabel="Rouge-L (0–100)", title="Rouge-L of greedy answers (round 0: the start)")
    if private:
        axes[-1].set(xlabel="ε spent (at the run's δ)", ylabel="eval loss", title="eval loss against privacy spent")
    for ax in axes:
        ax.grid(alpha=0.3)
    for ax in [by_round] + ([axes[2]] if scored else []):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.legend(loc="lower center", ncol=min(len(results), 3), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * ((len(results) + 2) // 3), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rouge_points(result: RunResult) -> list[tuple[int, float]]:
    """(round, Rouge-L) of ``result``: round 0 for the starting model, then each scored round."""
    points = [(0, result.initial_rouge_l)] + [(r.round + 1, r.rouge_l) for r in result.rounds]
    return [(t, v) for t, v in points if v is not None]


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else 0.0
