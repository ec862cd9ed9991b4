"""Report figures (matplotlib, Agg). Each function reads a summary or matrices and writes one PNG.

Matrices of several streams of one run are averaged cell by cell: column j is the j-th task in each
stream's own training order, so with several task orders a column mixes tasks by position.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from topocl.metrics import nanmean  # noqa: E402

BASE_LABELS = {"acc": "base-probe accuracy", "em": "base-probe exact match", "nll": "base-probe NLL (nats)",
               "bpb": "held-out base bits/byte"}


def mean_matrix(mats: list[list[list[float]]]) -> list[list[float]]:
    """Cell-wise mean (NaN-skipping) of same-shaped matrices."""
    return [[nanmean(m[i][j] for m in mats) for j in range(len(mats[0][0]))] for i in range(len(mats[0]))]


def _grid(n: int, w: float, h: float):
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False, layout="constrained")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, axes


def heatmaps(runs: dict[str, list[list[float]]], path: Path) -> None:
    """One accuracy-matrix heatmap per run: rows = after task (init first), columns = task."""
    fig, axes = _grid(len(runs), 4.4, 3.8)
    for ax, (run, R) in zip(axes.flat, runs.items()):
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
        step = max(1, len(R[0]) // 12)
        ax.set_xticks(range(0, len(R[0]), step))
        ax.set_yticks(range(0, len(R), step))
        ax.set_yticklabels(["init" if i == 0 else str(i - 1) for i in range(0, len(R), step)], fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="retain accuracy")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def forgetting_curves(runs: dict[str, list[list[float]]], path: Path) -> None:
    """Per run: each task's retain accuracy from when it is learned on (thin), and A_k, the mean over
    the tasks seen so far (thick), against the number of tasks trained."""
    fig, axes = _grid(len(runs), 4.4, 3.4)
    cmap = plt.get_cmap("viridis")
    for ax, (run, R) in zip(axes.flat, runs.items()):
        t = len(R[0])
        for j in range(t):
            xs = list(range(j + 1, len(R)))
            ax.plot(xs, [R[i][j] for i in xs], lw=0.9, marker="o", ms=2, alpha=0.75, color=cmap(j / max(t - 1, 1)))
        xs = list(range(1, len(R)))
        ax.plot([], [], lw=0.9, color=cmap(0.4), label="one task (darker = learned earlier)")
        ax.plot(xs, [nanmean(R[k][:k]) for k in xs], lw=2.4, color="black", label="mean over seen tasks (A_k)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(run, fontsize=9)
        ax.set_xlabel("tasks trained", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("retain accuracy", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lines(series: dict[str, list[float]], path: Path, xlabel: str, ylabel: str, title: str, x0: int = 0,
          bands: dict[str, list[list[float]]] | None = None) -> None:
    """One line per run, with an optional shaded [low, high] band per point."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for run, ys in series.items():
        xs = list(range(x0, x0 + len(ys)))
        (line,) = ax.plot(xs, ys, marker="o", ms=3, label=run)
        if bands and run in bands and any(lo != hi for lo, hi in bands[run]):
            ax.fill_between(xs, [b[0] for b in bands[run]], [b[1] for b in bands[run]], color=line.get_color(),
                            alpha=0.15, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def retention_lines(rbd: dict[str, dict[int, dict]], path: Path, ylabel: str, title: str) -> None:
    """Retention vs delay, one line per run with its 95% CI band; run -> {delay d: stats}. A delay a run has no
    cell for (a probe type no task taught that long ago) is a gap in its line."""
    span = range(max(int(d) for v in rbd.values() for d in v) + 1)
    nan = float("nan")
    lines({r: [v[d]["mean"] if d in v else nan for d in span] for r, v in rbd.items()}, path,
          "delay d (tasks trained since the task was learned)", ylabel, title,
          bands={r: [[v[d]["ci_low"], v[d]["ci_high"]] if d in v else [nan, nan] for d in span]
                 for r, v in rbd.items()})


def render_all(summary: dict, mats: dict[tuple, list[list[float]]], out: Path) -> list[tuple[str, str]]:
    """Write every figure the data supports; returns (file name, title) pairs in report order."""
    figs = []
    by_run: dict[str, list] = {}
    for (run, _, _), R in sorted(mats.items()):
        if len(R) == len(R[0]) + 1:
            by_run.setdefault(run, []).append(R)
    means = {run: mean_matrix(ms) for run, ms in by_run.items() if len({len(m) for m in ms}) == 1}
    if means:
        heatmaps(means, out / "accuracy_matrix.png")
        figs.append(("accuracy_matrix.png", "Accuracy matrices R[after task][task] (retain probes)"))
        forgetting_curves(means, out / "forgetting_curves.png")
        figs.append(("forgetting_curves.png", "Forgetting curves: retain accuracy per task vs tasks trained"))
    blocks = {r: s["retain"]["acc"] for r, s in summary.items() if "acc" in s.get("retain", {})}
    if blocks:
        lines({r: b["avg_acc_curve"] for r, b in blocks.items()}, out / "seen_accuracy.png", "tasks trained",
              "mean retain accuracy on tasks seen so far", "Average accuracy on seen tasks A_k (95% CI band)", x0=1,
              bands={r: b["avg_acc_curve_ci"] for r, b in blocks.items()})
        figs.append(("seen_accuracy.png", "Average accuracy on seen tasks vs tasks trained, all runs"))
        retention_lines({r: b["retention_by_delay"] for r, b in blocks.items()}, out / "retention_by_delay.png",
                        "mean retain accuracy", "Retention vs delay (95% CI band)")
        figs.append(("retention_by_delay.png", "Retention vs delay"))
    present = {m for s in summary.values() for m in s.get("base", {})}
    for metric in [m for m in ("acc", "bpb") if m in present] or sorted(present):  # the rest is in summary.json
        label = BASE_LABELS.get(metric, f"base {metric}")
        curves = {r: s["base"][metric]["base_ability"]["curve"] for r, s in summary.items()
                  if metric in s.get("base", {})}
        lines(curves, out / f"base_{metric}.png", "after task (-1 = before continual training)", label,
              f"Base ability: {label}", x0=-1)
        figs.append((f"base_{metric}.png", f"Base ability over tasks: {label}"))
    for t in sorted({t for s in summary.values() for t in s.get("by_type", {})}):  # results.type_block
        title = f"Retention vs delay: {t} probes (95% CI band)"
        retention_lines({r: b["retention_by_delay"] for r, s in summary.items() if (b := s.get("by_type", {}).get(t))},
                        out / f"retention_by_delay_{t}.png", f"mean retain accuracy ({t})", title)
        figs.append((f"retention_by_delay_{t}.png", title))
    return figs


def _err(pts: list[dict], key: str) -> list[list[float]]:
    """[[mean − low], [high − mean]] per point (0 where the CI is undefined) for errorbar."""
    return [[0.0 if math.isnan(p[key]["ci_low"]) else p[key]["mean"] - p[key]["ci_low"] for p in pts],
            [0.0 if math.isnan(p[key]["ci_high"]) else p[key]["ci_high"] - p[key]["mean"] for p in pts]]


def frontier(arms: dict[str, list[dict]], path: Path, labels: dict[str, str] | None = None) -> None:
    """Stability–plasticity frontier: F Chaudhry vs LA, one line per arm through its grid points (sorted by LA),
    95% CIs as error bars on both axes; `labels`: run -> point label (its learning rate)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    many = len(arms) > 10  # beyond the 10-colour cycle: 20 colours and a marker per arm, so no two arms look alike
    for i, (arm, pts) in enumerate(arms.items()):
        xs, ys = [p["LA"]["mean"] for p in pts], [p["F"]["mean"] for p in pts]
        style = {"color": plt.get_cmap("tab20").colors[i % 20], "marker": "os^Dv<>PX*"[i % 10]} if many else {
            "marker": "o"}
        bars = ax.errorbar(xs, ys, xerr=_err(pts, "LA"), yerr=_err(pts, "F"), ms=4, capsize=2, lw=1.2, label=arm,
                           **style)
        for x, y, p in zip(xs, ys, pts):
            if labels and labels.get(p["run"]):
                ax.annotate(labels[p["run"]], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points",
                            color=bars[0].get_color())
    ax.set_xlabel("learning accuracy LA (right after each task) ↑")
    ax.set_ylabel("forgetting F Chaudhry ↓")
    ax.set_title("Stability–plasticity frontier (95% CI bars over units of replication)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
