"""Crossover analysis: a CL arm's target-domain curve against its dense baseline's, and the dense model's
fine-tuning ceiling. No torch (reports use it).

Curves are A_k (mean retain accuracy on the tasks seen so far after task k, k = 0.. in training order), the
mean over units of replication, as `topocl.results.summarize` gives them. The crossover is `metrics.crossover`:
the first k from which the arm stays strictly above the baseline to the end (None = never); its 95% interval
is a percentile bootstrap over units (replicates; `metrics.crossover_interval`, units both runs have are
resampled together). The ceiling is the joint reference's best A_k (the initial model trained on tasks 0..k
together): what the dense model reaches when it is allowed to see everything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from topocl import metrics as M


def ceiling(joint_curve: Sequence[float]) -> float:
    """Best score of the joint-training reference (NaN if it has none)."""
    vals = [v for v in joint_curve if not math.isnan(v)]
    return max(vals) if vals else math.nan


def crossover_analysis(arm: Sequence[float], baseline: Sequence[float],
                       joint: Sequence[float] | None = None, arm_units: dict | None = None,
                       base_units: dict | None = None) -> dict:
    """{"crossover": k | None, "crossover_ci": [low, high] (None = never) or None, "final_gap": arm[-1] −
    baseline[-1], "tasks_above": how many k the arm is above, "ceiling": best joint score (NaN without joint),
    "final_vs_ceiling": arm[-1] − ceiling}. `arm_units` / `base_units`: unit -> curve, for the interval."""
    if len(arm) != len(baseline) or not arm:
        raise ValueError(f"curves must be non-empty and of equal length, got {len(arm)} and {len(baseline)}")
    top = ceiling(joint) if joint else math.nan
    ci = M.crossover_interval(arm_units, base_units) if arm_units and base_units else None
    return {"crossover": M.crossover(arm, baseline), "crossover_ci": list(ci) if ci else None,
            "final_gap": arm[-1] - baseline[-1], "tasks_above": sum(a > b for a, b in zip(arm, baseline)),
            "ceiling": top, "final_vs_ceiling": arm[-1] - top}


def when(k: int | None) -> str:
    return "never" if k is None else f"after task {k}"


def crossover_text(k: int | None, ci: list | None) -> str:
    """'after task 1 [0, never]': the crossover and its 95% interval over units (no interval: n < 2)."""
    return when(k) + (f" [{when(ci[0]).removeprefix('after task ')}, {when(ci[1]).removeprefix('after task ')}]"
                      if ci else "")


def plot_crossover(arm_name: str, arm: Sequence[float], base_name: str, baseline: Sequence[float],
                   result: dict, path: Path, joint: Sequence[float] | None = None) -> None:
    """A_k of arm and baseline vs tasks trained, the crossover task marked, the joint ceiling as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    xs = list(range(1, len(arm) + 1))  # after task k (0-based) = k + 1 tasks trained
    ax.plot(xs, arm, marker="o", ms=3, label=arm_name)
    ax.plot(xs, baseline, marker="s", ms=3, label=f"{base_name} (baseline)")
    if joint:
        ax.plot(list(range(1, len(joint) + 1)), joint, lw=0.8, ls=":", color="grey", label="joint reference")
    if not math.isnan(result.get("ceiling", math.nan)):
        ax.axhline(result["ceiling"], ls="--", color="grey", lw=1, label=f"dense ceiling {result['ceiling']:.3f}")
    if result.get("crossover") is not None:
        ax.axvline(result["crossover"] + 1, color="red", lw=1, alpha=0.6,
                   label=f"crossover after task {result['crossover']}")
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("mean retain accuracy on seen tasks (A_k)")
    ax.set_title(f"Crossover: {arm_name} vs {base_name}", fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
