"""Report figures (matplotlib, Agg). Each function reads summaries/matrices and writes one PNG."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _mean_matrix(mats: list[list[list[float]]]) -> list[list[float]]:
    rows, cols = len(mats[0]), len(mats[0][0])
    out = []
    for i in range(rows):
        row = []
        for j in range(cols):
            vals = [m[i][j] for m in mats if not math.isnan(m[i][j])]
            row.append(sum(vals) / len(vals) if vals else math.nan)
        out.append(row)
    return out


def heatmaps(mats: dict[tuple, list[list[float]]], path: Path) -> None:
    runs = sorted({k[0] for k in mats})
    n = len(runs)
    cols = min(3, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4.4 * cols, 3.8 * ((n + cols - 1) // cols)),
                             squeeze=False, layout="constrained")
    for ax, run in zip(axes.flat, runs):
        R = _mean_matrix([m for k, m in sorted(mats.items()) if k[0] == run and len(m) == len(m[0]) + 1])
        im = ax.imshow(R, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(run, fontsize=9)
        ax.set_xlabel("task (training order)", fontsize=8)
        ax.set_ylabel("after task", fontsize=8)
        if len(R[0]) <= 12:
            for i, row in enumerate(R):
                for j, v in enumerate(row):
                    if not math.isnan(v):
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                                color="white" if v < 0.6 else "black")
        ax.set_xticks(range(len(R[0])))
        ax.set_yticks(range(len(R)))
        ax.set_yticklabels(["init"] + [str(i) for i in range(len(R) - 1)], fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="retain accuracy")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _lines(series: dict[str, list[float]], path: Path, xlabel: str, ylabel: str, title: str,
           x0: int = 0) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for run, ys in sorted(series.items()):
        ax.plot(range(x0, x0 + len(ys)), ys, marker="o", ms=3, label=run)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_all(summary: dict, mats: dict, out: Path) -> list[tuple[str, str]]:
    """Write every figure that the data supports; returns (file name, title) pairs."""
    figs = []
    if mats:
        heatmaps(mats, out / "accuracy_matrix.png")
        figs.append(("accuracy_matrix.png", "Accuracy matrices R[after task][task] (retain probes)"))
    acc = {r: s["retain"]["acc"]["avg_acc_curve"] for r, s in summary.items() if "retain" in s}
    if acc:
        _lines(acc, out / "forgetting_curves.png", "tasks trained", "mean accuracy on tasks seen so far",
               "Average accuracy on seen tasks (A_k)", x0=1)
        figs.append(("forgetting_curves.png", "Average accuracy on seen tasks vs tasks trained"))
    ret = {r: [s["retain"]["acc"]["retention_by_delay"][d] for d in sorted(s["retain"]["acc"]["retention_by_delay"])]
           for r, s in summary.items() if "retain" in s}
    if ret:
        _lines(ret, out / "retention_by_delay.png", "delay (tasks since learned)", "accuracy",
               "Retention vs delay")
        figs.append(("retention_by_delay.png", "Retention vs delay"))
    for metric, label in (("acc", "base-probe accuracy"), ("bpb", "held-out base bits/byte")):
        base = {r: s["base"][metric]["curve"] for r, s in summary.items() if metric in s.get("base", {})}
        if base:
            _lines(base, out / f"base_{metric}.png", "after task (-1 = before CL)", label, f"Base ability: {label}",
                   x0=-1)
            figs.append((f"base_{metric}.png", f"Base ability over tasks: {label}"))
    return figs
