"""analysis.md + PNGs from analysis artifacts (telemetry, graft, routing, sparsity) and results rows. No torch.

Every table of measures is a mean over seeds x orders (and over layers / tasks where a row says so); the
evidence and crossover intervals are over units of replication (pretraining seeds; docs/protocol.md); every
number is also in analysis.json.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from topocl.analysis.crossover import crossover_analysis, crossover_text, plot_crossover
from topocl.analysis.evidence import evidence, evidence_markdown
from topocl.metrics import nanmean
from topocl.results import json_safe, summarize


def mean_by(rows: list[dict], keys: tuple[str, ...], where: dict | None = None) -> dict[tuple, float]:
    """Mean 'value' of the rows matching `where`, grouped by `keys` (NaN-skipping)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if all(r.get(k) == v for k, v in (where or {}).items()):
            groups[tuple(r[k] for k in keys)].append(r["value"])
    return {k: nanmean(v) for k, v in sorted(groups.items())}


def _f(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.3f}"


def _lines(series: dict[str, dict[int, float]], path: Path, xlabel: str, ylabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, pts in series.items():
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def telemetry_md(run: str, rows: list[dict], out: Path) -> list[str]:
    groups = sorted({r["group"] for r in rows}, key=lambda g: (not g.startswith(("pathway", "all")), g))
    last = max(r["after_task"] for r in rows)
    md = [f"### {run}: per-role telemetry", "",
          "Drift ‖Δθ‖/‖θ‖ vs the stream start after the last task, mean per-task drift vs the task start, mean "
          "gradient cosine with earlier tasks' mean gradients, mean squared gradient per parameter.", "",
          "| group | drift (stream) | drift (task, mean) | Fisher drift (stream) | grad cos (mean) | grad energy |",
          "|---|---|---|---|---|---|"]
    for g in groups:
        m = {meas: nanmean(r["value"] for r in rows if r["group"] == g and r["measure"] == meas
                           and (r["after_task"] == last or not meas.endswith("stream")))
             for meas in ("drift_stream", "drift_task", "fisher_drift_stream", "grad_cos", "grad_energy")}
        md.append(f"| {g} | {_f(m['drift_stream'])} | {_f(m['drift_task'])} | {_f(m['fisher_drift_stream'])} | "
                  f"{_f(m['grad_cos'])} | {m['grad_energy']:.3g} |")
    show = [g for g in groups if g.startswith("pathway") or g == "all"] or groups
    for meas, label in (("drift_stream", "‖θ − θ_start‖ / ‖θ_start‖"), ("grad_cos", "mean cos with earlier tasks")):
        series = {g: {j + 1: v for (j,), v in mean_by(rows, ("after_task",), {"group": g, "measure": meas}).items()}
                  for g in show}
        series = {g: s for g, s in series.items() if s}
        if series:
            name = f"{run}_telemetry_{meas}.png"
            _lines(series, out / name, "tasks trained", label, f"{run}: {meas}")
            md += ["", f"![{meas}]({name})"]
    return md + [""]


def graft_md(run: str, rows: list[dict]) -> list[str]:
    md = [f"### {run}: grafting", "",
          "Δ = grafted − final accuracy. remove: the group's weights from before task j (a drop on task j = task "
          "j's knowledge was written there); recover: from right after task j (a gain on task j = it was "
          "overwritten there later). Own = task j's probes, others = every other task's.", "",
          "| group | mode | type | Δ own task | Δ other tasks |", "|---|---|---|---|---|"]
    keys = sorted({(r["group"], r["mode"], r["type"]) for r in rows if r["kind"] == "retain"})
    for g, mode, typ in keys:
        sel = [r for r in rows if (r["group"], r["mode"], r["type"], r["kind"]) == (g, mode, typ, "retain")]
        own = nanmean(r["value"] - r["final"] for r in sel if r["eval_task"] == r["task"])
        other = nanmean(r["value"] - r["final"] for r in sel if r["eval_task"] != r["task"])
        md.append(f"| {g} | {mode} | {typ} | {_f(own)} | {_f(other)} |")
    return md + [""]


def routing_md(run: str, rows: list[dict], out: Path) -> list[str]:
    md = [f"### {run}: routing stability", "",
          "Means over layers, probes and old tasks; delay = checkpoints since the task was learned.", "",
          "| measure | " + " | ".join(f"delay {d}" for d in sorted({r["ckpt"] - r["ref_ckpt"] for r in rows
                                                                      if r["ref_ckpt"] >= 0})) + " |"]
    delays = sorted({r["ckpt"] - r["ref_ckpt"] for r in rows if r["ref_ckpt"] >= 0})
    md.append("|---" * (len(delays) + 1) + "|")
    measures = sorted({r["measure"] for r in rows if r["ref_ckpt"] >= 0})
    series = {}
    for m in measures:
        by = {d: nanmean(r["value"] for r in rows if r["measure"] == m and r["ref_ckpt"] >= 0
                         and r["ckpt"] - r["ref_ckpt"] == d) for d in delays}
        md.append(f"| {m} | " + " | ".join(_f(by[d]) for d in delays) + " |")
        if m.startswith("jaccard"):
            series[m] = by
    for m in ("fact_mass", "fact_selected"):
        pts = {k: v for (k,), v in mean_by(rows, ("ckpt",), {"measure": m}).items()}
        if pts:
            md.append(f"\n{m} by checkpoint (before task k; 0 = initial): "
                      + ", ".join(f"{k}: {_f(v)}" for k, v in pts.items()))
    if series:
        name = f"{run}_routing_jaccard.png"
        _lines(series, out / name, "delay (tasks since learned)", "Jaccard of selections", f"{run}: routing")
        md += ["", f"![routing]({name})"]
    return md + [""]


def sparsity_md(run: str, rows: list[dict]) -> list[str]:
    ckpts = sorted({r["ckpt"] for r in rows})
    md = [f"### {run}: activation sparsity (inputs of each role's Linear layers)", "",
          "| role | " + " | ".join(f"near-zero @{k} | eff. rank @{k}" for k in ckpts) + " |",
          "|---" * (1 + 2 * len(ckpts)) + "|"]
    roles = sorted({r["role"] for r in rows})
    for role in roles:
        cells = []
        for k in ckpts:
            for m in ("frac_near_zero", "effective_rank"):
                cells.append(_f(nanmean(r["value"] for r in rows if r["module"] == f"role:{role}"
                                        and r["ckpt"] == k and r["measure"] == m)))
        md.append(f"| {role} | " + " | ".join(cells) + " |")
    return md + ["", f"Checkpoint {ckpts[0]} = before the stream, {ckpts[-1]} = after it.", ""]


def write_analysis(rows: list[dict], artifacts: dict[str, dict[str, list[dict]]], out: Path,
                   baseline: str | None = None, joint: str | None = None,
                   replicates: dict[tuple, object] | None = None) -> Path:
    """analysis.md, analysis.json and PNGs in `out` from results rows and per-run analysis artifacts;
    `replicates`: (run, seed, order) -> pretraining seed (topocl.results.replicate_map)."""
    out.mkdir(parents=True, exist_ok=True)
    md = ["# TopoCL analysis", "", "Artifacts: telemetry.jsonl (during the run), analysis/{graft,routing,"
          "sparsity}.jsonl (`topocl analyze`) in each seed{S}-order{O} directory.", ""]
    ev = evidence(rows, artifacts, baseline, joint, replicates)
    md += evidence_markdown(ev)
    summary = summarize(rows, joint, baseline, replicates) if rows else {}
    cross = {}
    base_curve = summary.get(baseline, {}).get("retain", {}).get("acc", {}).get("avg_acc_curve") if baseline else None
    joint_curve = summary.get(joint, {}).get("retain", {}).get("acc", {}).get("avg_acc_curve") if joint else None
    if base_curve:
        md += ["## Crossover", "", "Crossover [95% bootstrap interval over units of replication].", "",
               "| run | crossover | tasks above baseline | final gap | dense ceiling | final − ceiling |",
               "|---|---|---|---|---|---|"]
        for run, s in summary.items():
            curve = s.get("retain", {}).get("acc", {}).get("avg_acc_curve")
            if run in (baseline, joint) or not curve or len(curve) != len(base_curve):
                continue
            c = cross[run] = crossover_analysis(curve, base_curve, joint_curve)
            c["crossover_ci"] = s["retain"]["acc"].get("crossover_ci")
            name = f"{run}_crossover.png"
            plot_crossover(run, curve, baseline, base_curve, c, out / name, joint_curve)
            md += [f"| {run} | {crossover_text(c['crossover'], c['crossover_ci'])} | {c['tasks_above']}/{len(curve)} | "
                   f"{_f(c['final_gap'])} | "
                   f"{_f(c['ceiling'])} | {_f(c['final_vs_ceiling'])} |"]
        md += [""] + [f"![crossover {r}]({r}_crossover.png)" for r in cross] + [""]
    for run, art in artifacts.items():
        if any(art.values()):
            md += [f"## {run}", ""]
        if art.get("telemetry"):
            md += telemetry_md(run, art["telemetry"], out)
        if art.get("graft"):
            md += graft_md(run, art["graft"])
        if art.get("routing"):
            md += routing_md(run, art["routing"], out)
        if art.get("sparsity"):
            md += sparsity_md(run, art["sparsity"])
    (out / "analysis.md").write_text("\n".join(md).rstrip("\n") + "\n")
    (out / "analysis.json").write_text(json.dumps(json_safe({"evidence": ev, "crossover": cross}), indent=1))
    return out / "analysis.md"
