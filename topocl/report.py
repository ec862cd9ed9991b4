"""`topocl report RUN_DIR [RUN_DIR ...] [--out DIR] [--baseline RUN]`: a comparison report from artifacts only.

Reads each run directory's results.jsonl, cost.json, config.yaml and meta.json (when present) and
writes report.md, summary.json and PNGs: accuracy-matrix heatmaps and forgetting curves per run,
average accuracy on seen tasks, retention vs delay, base ability over tasks, a table of all runs
(mean [95% Student-t CI] over units of replication: pretraining seeds, or streams of ONE pretrained model,
said in each row), the stability–plasticity frontier (F vs LA per arm over its learning-rate grid, ΔF at
matched LA) and a cost table. Bootstraps (the crossover interval) have a fixed seed, so the same artifacts give
byte-identical report.md (tests/fixtures/report/golden_report.md).
A run directory whose config.yaml says `reference: joint` is the joint reference for intransigence.
With a --baseline or analysis artifacts (telemetry.jsonl, `topocl analyze`), an "H1/H2/H3 evidence" section
states each hypothesis with its numbers and a computed verdict (evidence.json). docs/protocol.md.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from topocl.analysis.crossover import crossover_text
from topocl.results import (
    COST_FIELDS,
    ResultsError,
    json_safe,
    load_rows,
    matrices,
    read_run_dir,
    reference_runs,
    replicate_map,
    summarize,
    type_metric,
)

RETAIN = [("acc", "ACC ↑"), ("learning_acc", "LA ↑"), ("bwt_gem", "BWT ↑"), ("forgetting_chaudhry", "F Chaudhry ↓"),
          ("forgetting_mammoth", "F Mammoth ↓"), ("fwt_gem", "FWT ↑"), ("avg_incremental_acc", "Ā ↑"),
          ("intransigence", "I ↓")]


def fmt(s: dict | None, digits: int = 3) -> str:
    """'mean [low, high]' (just the mean when n = 1); '–' when missing."""
    if not s or s.get("mean") is None or math.isnan(s["mean"]):
        return "–"

    def f(x: float) -> str:
        txt = f"{x:.{digits}f}"
        return txt[1:] if txt.startswith("-") and not txt.strip("-0.") else txt  # no "-0.000"

    return f"{f(s['mean'])} [{f(s['ci_low'])}, {f(s['ci_high'])}]" if s["n"] > 1 else f(s["mean"])


def describe(config: dict) -> str:
    """One line naming the three axes (and a reference) from a run's config.yaml."""
    if not config:
        return ""
    parts = [f"strategies={'+'.join(config.get('strategies') or [])}", f"adapter={config.get('adapter', 'none')}"]
    if config.get("surgery"):  # an HF model's arm: surgery (head split) | full | lora
        parts[1] = f"surgery_arm={config.get('surgery_arm', 'surgery')}"
    roles = (config.get("train") or {}).get("roles") or {}
    if roles:
        parts.append("roles: " + ", ".join(f"{r}×{(v or {}).get('lr_scale', 1)}" for r, v in sorted(roles.items())))
    if config.get("reference", "none") != "none":
        parts.append(f"reference={config['reference']}")
    return "; ".join(parts)


def _bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def terminal_table(summary: dict) -> str:
    """A short plain-text table (means over seeds x orders) for the terminal; reads summary.json too."""
    def cell(d: dict | None) -> str:
        return f"{d['mean']:7.3f}" if d and d.get("mean") is not None and not math.isnan(d["mean"]) else f"{'–':>7}"

    lines = [f"{'run':<24} {'n':>2} {'ACC':>7} {'BWT':>7} {'F':>7} {'stale':>7} {'base acc':>8} {'base bpb':>8}"]
    for run, s in summary.items():
        r, u = s.get("retain", {}).get("acc", {}), s.get("update", {}).get("acc", {})
        base = {m: b["base_ability"]["final"] for m, b in s.get("base", {}).items()}
        lines.append(f"{run:<24} {s['n']['finished']:>2} {cell(r.get('acc'))} {cell(r.get('bwt_gem'))} "
                     f"{cell(r.get('forgetting_chaudhry'))} {cell(u.get('acc'))} {cell(base.get('acc')):>8} "
                     f"{cell(base.get('bpb')):>8}")
    return "\n".join(lines)


def _tables(summary: dict, setups: dict, joint: str | None, baseline: str | None) -> list[str]:
    md = ["## Retain probes (must still be known)", "",
          "| run | setup | streams | CI over | " + " | ".join(h for _, h in RETAIN) + " | crossover |",
          "|" + "---|" * (len(RETAIN) + 5)]
    for run, s in summary.items():
        r = s.get("retain", {}).get("acc", {})
        if not baseline or run in (baseline, joint) or "acc" not in r:
            cross = "–"
        else:
            cross = crossover_text(r.get("crossover"), r.get("crossover_ci"))
        md.append(f"| {run} | {setups.get(run, '')} | {s['n']['finished']}/{s['n']['streams']} | {s['n']['unit']} | "
                  + " | ".join(fmt(r.get(k)) for k, _ in RETAIN) + f" | {cross} |")
    md += ["", "Streams = finished / started (seed, order) pairs; the CIs are over the finished ones' units "
           "(CI over: pretraining seeds, each the mean of its nested streams, or else streams of one pretrained "
           "model, which are not independent tests of a topology). "
           "ACC = final mean over tasks, LA = right after learning, BWT (GEM) < 0 = forgetting, F Chaudhry = best "
           "earlier score minus final (can be < 0), F Mammoth = the same with the final row in the max (≥ 0), "
           "FWT (GEM) vs the model before continual training, Ā = average incremental accuracy."]
    md.append(f"I = intransigence, mean over k of a*_k − R_kk against the joint reference `{joint}`."
              if joint else "I = intransigence: needs a joint reference run (config `reference: joint`).")
    if baseline:
        md.append(f"Crossover: first task after which the run's mean accuracy on seen tasks (A_k) exceeds "
                  f"`{baseline}`'s and stays above to the end [95% percentile-bootstrap interval over the units, "
                  "2000 resamples, seed 0; never = it does not cross].")
    md += ["", "## Update probes (deliberately contradicted later) and base ability", "",
           "| run | update: learned (LA) ↑ | update: stale at end ↓ | base acc start → end | "
           "base bits/byte start → end ↓ |", "|---|---|---|---|---|"]
    for run, s in summary.items():
        u, b = s.get("update", {}).get("acc", {}), s.get("base", {})
        arrow = {m: f"{fmt(v['base_ability']['initial'])} → {fmt(v['base_ability']['final'])}" for m, v in b.items()}
        md.append(f"| {run} | {fmt(u.get('learning_acc'))} | {fmt(u.get('acc'))} | {arrow.get('acc', '–')} | "
                  f"{arrow.get('bpb', '–')} |")
    md += ["", "Stale = the overwritten (old) answer is still the model's preferred candidate after the stream "
           "(update probes are graded on the old answer, so a low final score means the update took)."]
    return md


def _by_type(summary: dict, rows: list[dict], replicates: dict, baseline: str | None,
             references: list[str]) -> list[str]:
    """Retain probes split by content type where the stream tags one (campaign: facts vs world rules), and per
    type ΔF at matched LA against the baseline arm (the frontier of that type's matrices; no verdict)."""
    from topocl.analysis.frontier import arm_of, frontiers, matched_delta

    types = sorted({t for s in summary.values() for t in s.get("by_type", {})})
    if not types:
        return []
    delays = sorted({d for s in summary.values() for b in s.get("by_type", {}).values()
                     for d in b["retention_by_delay"]}, key=int)
    show = [d for d in delays if int(d) > 0][:: max(1, len(delays) // 4)][:4]
    md = ["", "## By probe type (headline retain probes)", "",
          "| run | type | tasks with it | LA ↑ | ACC (final) ↑ | F Chaudhry ↓ | " + " | ".join(
              f"recall at delay {d}" for d in show) + " |", "|" + "---|" * (6 + len(show))]
    for run, s in summary.items():
        for t in types:
            if b := s.get("by_type", {}).get(t):
                md.append(f"| {run} | {t} | {b['tasks']:.1f} | {fmt(b['learning_acc'])} | {fmt(b['acc'])} | "
                          f"{fmt(b['forgetting_chaudhry'])} | "
                          + " | ".join(fmt(b["retention_by_delay"].get(d)) for d in show) + " |")
    md += ["", "Each type's accuracy matrix keeps only the tasks that teach it (campaign: every session teaches "
           "facts, each world rule is taught by one session only, so rule figures rest on few probes). Recall at "
           "delay d = mean score on a task d tasks after it was learned (mean [95% t-CI] over the units)."]
    base_arm = arm_of(baseline) if baseline else None
    if not base_arm:
        return md
    md += ["", f"ΔF at matched LA vs `{base_arm}`, per probe type (each type's own frontier; paired per unit as in the "
           "frontier section; no verdict: not one of the protocol's hypotheses):", "",
           "| arm | type | matched LA range | ΔF per unit, mean [95% t-CI] | n |", "|---|---|---|---|---|"]
    for t in types:
        fr = frontiers(rows, replicates, exclude=references, metric=type_metric(t))
        for arm, pts in fr.items():
            if arm == base_arm or base_arm not in fr:
                continue
            d = matched_delta(pts, fr[base_arm])
            rng = d["pooled"]["range"]
            span = "no overlap (not extrapolated)" if rng is None else f"[{rng[0]:.3f}, {rng[1]:.3f}]"
            md.append(f"| {arm} | {t} | {span} | {fmt(d['stats'])} | {d['stats']['n']} |")
    return md


def _evidence(dirs: list[dict], rows: list[dict], out: Path, baseline: str | None, joint: str | None) -> list[str]:
    """The H1/H2/H3 evidence section (topocl/analysis/evidence.py) when a baseline is named or a run has analysis
    artifacts; the numbers also go to evidence.json."""
    from topocl.analysis.artifacts import artifacts_by_run
    from topocl.analysis.evidence import evidence, evidence_markdown

    artifacts = artifacts_by_run(dirs)
    if not baseline and not any(any(a.values()) for a in artifacts.values()):
        return []
    ev = evidence(rows, artifacts, baseline, joint, replicate_map(dirs))
    out.mkdir(parents=True, exist_ok=True)
    (out / "evidence.json").write_text(json.dumps(json_safe(ev), indent=1))
    return ["", *evidence_markdown(ev)]


def _frontier(rows: list[dict], summary: dict, replicates: dict, configs: dict[str, dict], out: Path,
              baseline: str | None, references: list[str]) -> list[str]:
    """The stability–plasticity frontier section (topocl/analysis/frontier.py) and frontier.png; reference runs
    (joint, single) are no arm."""
    from topocl import plots
    from topocl.analysis.frontier import arm_of, frontiers, knob, matched_delta

    fr = frontiers(rows, replicates, exclude=references)
    if not fr or not (baseline or any(len(p) > 1 for p in fr.values())):
        return []
    labels = {run: knob(c) for run, c in configs.items()}
    md = ["", "## Stability–plasticity frontier (forgetting vs learning)", "",
          "Forgetting is compared at matched new-task learning: each arm's runs over a learning-rate (or λ) grid "
          "give points (LA, F Chaudhry), mean [95% t-CI] over units; runs `ARM-lr<x>` / `ARM-lam<x>` belong to "
          "ARM, the grid point is read from config.yaml. ΔF at matched LA = F_arm(LA) − F_baseline(LA) on the "
          "piecewise-linear frontiers, averaged over the overlap of both arms' LA ranges (never extrapolated); its "
          "CI is over the units both arms have, each on its own points.", "",
          "| arm | run | grid point | LA ↑ | F Chaudhry ↓ | n | CI over |", "|---|---|---|---|---|---|---|"]
    for arm, pts in fr.items():
        md += [f"| {arm} | {p['run']} | {labels.get(p['run']) or '–'} | {fmt(p['LA'])} | {fmt(p['F'])} | "
               f"{p['LA']['n']} | {summary.get(p['run'], {}).get('n', {}).get('unit', '')} |" for p in pts]
    base_arm = arm_of(baseline) if baseline else None
    if base_arm in fr and len(fr) > 1:
        md += ["", f"ΔF at matched LA vs `{base_arm}` (H2's statistic, verdict in the evidence section):", "",
               "| arm | matched LA range | ΔF, mean frontiers | ΔF per unit, mean [95% t-CI] | n |",
               "|---|---|---|---|---|"]
        for arm, pts in fr.items():
            if arm == base_arm:
                continue
            d = matched_delta(pts, fr[base_arm])
            rng = d["pooled"]["range"]
            span = "no overlap (not extrapolated)" if rng is None else f"[{rng[0]:.3f}, {rng[1]:.3f}]"
            pooled = "–" if rng is None else f"{d['pooled']['mean']:.3f}"
            md.append(f"| {arm} | {span} | {pooled} | {fmt(d['stats'])} | {d['stats']['n']} |")
    plots.frontier(fr, out / "frontier.png", labels)
    return md + ["", "![Stability–plasticity frontier](frontier.png)"]


def pooled_costs(dirs: list[dict]) -> dict[str, dict]:
    """Run name -> cost, pooling the entries of every directory that holds the run (a sweep's seeds and orders)."""
    entries: dict[str, list[dict]] = {}
    for d in dirs:
        for n in d["runs"] if d["cost"] else []:
            entries.setdefault(n, []).extend(d["cost"]["entries"])
    return {n: {"entries": es, "device": ", ".join(sorted({e["device"] for e in es})),
                **{k: sum(e[k] for e in es) / len(es) for k, tp in COST_FIELDS.items() if tp is not str}}
            for n, es in entries.items()}


def write_report(run_dirs: list[Path], out: Path, baseline: str | None = None, joint: str | None = None) -> Path:
    """Render report.md + summary.json + PNGs into `out` from the artifacts in `run_dirs`."""
    from topocl import plots

    dirs = [read_run_dir(d) for d in run_dirs]
    rows = load_rows(*[d["dir"] for d in dirs])  # also rejects the same rows passed twice
    refs = reference_runs(dirs)
    joint = joint or next((n for n, ref in sorted(refs.items()) if ref == "joint"), None)
    names = {n for d in dirs for n in d["runs"]}
    for name in (baseline, joint):
        if name and name not in names:
            raise ResultsError(f"run {name!r} is not among the runs {sorted(names)}")
    replicates = replicate_map(dirs)
    summary = summarize(rows, joint_run=joint, baseline_run=baseline, replicates=replicates)
    by_run = {n: d for d in dirs for n in d["runs"]}
    setups = {n: describe(d["config"]) for n, d in by_run.items()}
    out.mkdir(parents=True, exist_ok=True)
    md = ["# TopoCL comparison report", "",
          f"Runs: {len(summary)} from {', '.join('`' + d['dir'].name + '`' for d in dirs)}. Scores are candidate "
          "accuracy (`acc`), task-averaged; each cell is the mean [95% Student-t CI] over the run's units of "
          "replication, named in the CI over column: a replicate is one pretraining seed (continual seeds × task "
          "orders nested in it are averaged first); without replicate information the units are the streams of "
          "ONE pretrained model (the mean alone for one unit). Protocol: docs/protocol.md; definitions: "
          "`topocl/metrics.py`; every number is also in summary.json.", ""]
    references = sorted({*refs, *([joint] if joint else [])})  # joint / single reference runs: no arm
    md += _tables(summary, setups, joint, baseline)
    md += _by_type(summary, rows, replicates, baseline, references)
    md += _frontier(rows, summary, replicates, {n: d["config"] for n, d in by_run.items()}, out, baseline,
                    references)
    md += _evidence(dirs, rows, out, baseline, joint)
    costs = pooled_costs(dirs)
    if costs:
        md += ["", "## Cost", "", "Means per (seed, order) stream.", "",
               "| run | device | trainable params | optimizer state | peak memory | step time | tokens | wall |",
               "|---|---|---|---|---|---|---|---|"]
        for run in summary:
            if c := costs.get(run):
                md.append(f"| {run} | {c['device']} | {c['trainable_params']:,.0f} | "
                          f"{_bytes(c['optimizer_state_bytes'])} | {_bytes(c['peak_memory_bytes'])} | "
                          f"{1000 * c['step_time_s']:.1f} ms | "
                          f"{c['tokens']:,.0f} | {c['wall_s']:.1f} s |")
    metas = {n: d["meta"] for n, d in by_run.items() if d["meta"]}
    if metas:
        keys = sorted({k for m in metas.values() for k, v in m.items() if isinstance(v, str | int | float)})
        md += ["", "## Provenance (meta.json)", "", "| run | " + " | ".join(keys) + " |",
               "|---" * (len(keys) + 1) + "|"]
        md += [f"| {run} | " + " | ".join(str(metas[run].get(k, "–")) for k in keys) + " |" for run in metas]
    md += ["", "## Figures", ""]
    for name, title in plots.render_all(summary, matrices(rows, "retain", "acc"), out):
        md.append(f"### {title}\n\n![{title}]({name})\n")
    (out / "report.md").write_text("\n".join(md).rstrip("\n") + "\n")
    (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=1))
    return out / "report.md"


def write_sweep_report(root: Path, out: Path, baseline: str | None = None, joint: str | None = None) -> Path:
    """report.md (+ summary.json and PNGs when the sweep has continual results) for sweep directory `root`."""
    from topocl.sweep_report import sweep_parts

    name, cont, extra = sweep_parts(root)
    out.mkdir(parents=True, exist_ok=True)
    if cont:
        path = write_report(cont, out, baseline, joint)
        text = path.read_text().rstrip("\n")
        head, sep, figs = text.partition("\n## Figures")
        path.write_text(head.rstrip("\n") + "\n\n" + "\n".join(extra) + "\n" + (sep + figs if sep else "") + "\n")
        return path
    path = out / "report.md"
    path.write_text("\n".join([f"# TopoCL sweep report: {name}", "", *extra]) + "\n")
    return path


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="topocl report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="continual run directories, or one sweep directory")
    ap.add_argument("--out", type=Path, help="where to write (default: RUN_DIR/report for one run, else "
                                             "report/ next to the first run directory)")
    ap.add_argument("--baseline", help="run name of the dense baseline, for the crossover task")
    ap.add_argument("--joint", help="run name of the joint reference (default: from config.yaml reference: joint)")
    args = ap.parse_args(argv)
    from topocl.sweep_report import is_sweep

    if len(args.runs) == 1 and is_sweep(args.runs[0]):  # a sweep directory: the comparison over its runs
        path = write_sweep_report(args.runs[0], args.out or args.runs[0] / "report", args.baseline, args.joint)
        if (path.parent / "summary.json").is_file():
            print(terminal_table(json.loads((path.parent / "summary.json").read_text())))
        print(f"report: {path}")
        return 0
    out = args.out or (args.runs[0] / "report" if len(args.runs) == 1 else args.runs[0].parent / "report")
    path = write_report(args.runs, out, args.baseline, args.joint)
    print(terminal_table(json.loads((out / "summary.json").read_text())))
    print(f"report: {path}")
    return 0
