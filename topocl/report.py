"""`topocl report RUN_DIR [RUN_DIR ...] [--out DIR]`: a comparison report that only reads artifacts.

Reads each run directory's results.jsonl, cost.json and config.yaml; writes report.md and PNGs:
accuracy-matrix heatmaps, average accuracy on seen tasks vs tasks trained, retention vs delay, base
ability over tasks, a table of all runs (mean ± 95% bootstrap CI over seeds x orders) and a cost table.
Deterministic (fixed bootstrap seed), so a golden report can be tested.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml

from topocl.results import load_rows, matrices, summarize

TABLE = [("acc", "ACC ↑"), ("learning_acc", "LA ↑"), ("bwt_gem", "BWT ↑"), ("forgetting_chaudhry", "F (Chaudhry) ↓"),
         ("forgetting_mammoth", "F (Mammoth) ↓"), ("fwt_gem", "FWT ↑"), ("avg_incremental_acc", "Ā ↑")]


def fmt(s: dict | None, digits: int = 3) -> str:
    if not s or s.get("mean") is None or math.isnan(s["mean"]):
        return "–"
    if s["n"] > 1:
        return f"{s['mean']:.{digits}f} [{s['ci_low']:.{digits}f}, {s['ci_high']:.{digits}f}]"
    return f"{s['mean']:.{digits}f}"


def _describe(run_dir: Path) -> str:
    p = run_dir / "config.yaml"
    if not p.is_file():
        return ""
    c = yaml.safe_load(p.read_text()) or {}
    parts = [f"strategies={'+'.join(c.get('strategies', []))}", f"adapter={c.get('adapter', 'none')}"]
    roles = (c.get("train") or {}).get("roles") or {}
    if roles:
        parts.append("roles: " + ", ".join(f"{r}×{v.get('lr_scale', 1)}" for r, v in sorted(roles.items())))
    if c.get("reference", "none") != "none":
        parts.append(f"reference={c['reference']}")
    return "; ".join(parts)


def terminal_table(summary: dict) -> str:
    """A short plain-text table for the terminal."""
    lines = [f"{'run':<24} {'ACC':>7} {'BWT':>7} {'F':>7} {'base acc':>9} {'base bpb':>9}"]
    for run, s in summary.items():
        r = s.get("retain", {}).get("acc", {})
        b = s.get("base", {})
        cell = lambda d: f"{d['mean']:7.3f}" if d else f"{'–':>7}"  # noqa: E731
        lines.append(f"{run:<24} {cell(r.get('acc'))} {cell(r.get('bwt_gem'))} {cell(r.get('forgetting_chaudhry'))} "
                     f"{cell(b.get('acc', {}).get('final')):>9} {cell(b.get('bpb', {}).get('final')):>9}")
    return "\n".join(lines)


def write_report(run_dirs: list[Path], out: Path, baseline: str | None = None) -> Path:
    from topocl import plots

    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(*run_dirs)
    joint = next((r["run"] for r in rows if r["run"].endswith("joint")), None)
    summary = summarize(rows, joint_run=joint, baseline_run=baseline)
    runs = sorted(summary)
    costs = {}
    for d in run_dirs:
        if (d / "cost.json").is_file():
            name = {r["run"] for r in load_rows(d)}
            costs[next(iter(name))] = json.loads((d / "cost.json").read_text())
    md = ["# TopoCL comparison report", ""]
    md.append(f"Runs: {len(runs)}. Scores are candidate accuracy on `retain` probes unless stated; "
              "mean [95% bootstrap CI] over seeds × task orders. Metric definitions: `topocl/metrics.py`.")
    md += ["", "| run | setup | " + " | ".join(h for _, h in TABLE) + " | stale (update) ↓ | base acc end | "
           "base bits/byte start → end |", "|" + "---|" * (len(TABLE) + 5)]
    setups = {d.name: _describe(d) for d in run_dirs}
    for run in runs:
        s = summary[run]
        r = s.get("retain", {}).get("acc", {})
        b = s.get("base", {})
        bpb = b.get("bpb", {})
        bpb_txt = f"{fmt(bpb.get('initial'))} → {fmt(bpb.get('final'))}" if bpb else "–"
        md.append(f"| {run} | {setups.get(run, '')} | " + " | ".join(fmt(r.get(k)) for k, _ in TABLE)
                  + f" | {fmt(s.get('update', {}).get('acc', {}).get('final'))} | "
                  f"{fmt(b.get('acc', {}).get('final'))} | {bpb_txt} |")
    if joint:
        md += ["", f"Intransigence (vs joint reference `{joint}`): "
               + ", ".join(f"{run} {fmt(summary[run]['retain']['acc'].get('intransigence'))}" for run in runs
                           if "intransigence" in summary[run].get("retain", {}).get("acc", {}))]
    if baseline:
        md += ["", f"Crossover task vs `{baseline}` (first task after which the run's average accuracy stays above): "
               + ", ".join(f"{run} {summary[run]['retain']['acc'].get('crossover')}" for run in runs
                           if run != baseline and "retain" in summary[run])]
    if costs:
        md += ["", "## Cost", "", "| run | trainable params | optimizer state | peak memory | step time | tokens |",
               "|---|---|---|---|---|---|"]
        for run in runs:
            c = costs.get(run)
            if c:
                md.append(f"| {run} | {c['trainable_params']:,.0f} | {c['optimizer_state_bytes'] / 2**20:.2f} MiB | "
                          f"{c['peak_memory_bytes'] / 2**20:.0f} MiB | {1000 * c['step_time_s']:.1f} ms | "
                          f"{c['tokens']:,.0f} |")
    md += ["", "## Figures", ""]
    mats = matrices(rows, "retain", "acc")
    for name, title in plots.render_all(summary, mats, out):
        md.append(f"### {title}\n\n![{title}]({name})\n")
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return out / "report.md"


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="topocl report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="continual run directories")
    ap.add_argument("--out", type=Path, help="where to write (default: RUN_DIR/report for one run)")
    ap.add_argument("--baseline", help="run name of the dense baseline, for the crossover task")
    args = ap.parse_args(argv)
    out = args.out or (args.runs[0] / "report" if len(args.runs) == 1 else Path("report"))
    path = write_report(args.runs, out, args.baseline)
    print(terminal_table(json.loads((out / "summary.json").read_text())))
    print(f"report: {path}")
    return 0
