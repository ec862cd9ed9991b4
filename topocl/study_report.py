"""`topocl study status STUDY_DIR` and `topocl study report STUDY_DIR`: read a study's committed artifacts only.

    status   one line (runs done / total, CPU time spent, estimated remaining) and the finished pretraining
             seeds per results run name
    report   STUDY_DIR/FINDINGS.md: the question and design (from study.yaml), n (independent pretraining seeds),
             what is finished and what is not, cost (CPU time), the pretraining table (topocl/sweep_report.py) and
             the comparison that topocl.report.write_report produces over every finished continual run (its
             figures and summary.json go to STUDY_DIR/report/). Unfinished runs are left out and listed. With an
             `analyze:` key, an H3 section: topocl/analysis/evidence.py over the analysed runs' committed
             graft.jsonl (statistics, 95% t-CIs, n, computed verdicts), and which arms / grid points it covers.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from topocl.study import (
    Estimator,
    analysis_missing,
    committed_dir,
    expand,
    hours,
    load_study,
    records,
    status_line,
    study_file,
)


def progress_by_label(cfg, runs: list[dict], done: dict[str, dict]) -> dict[str, tuple[list[int], int]]:
    """Results run name (pretraining: "pretraining <topology>") -> (pretraining seeds whose runs are all
    finished, planned seeds)."""

    def key(r: dict) -> str:
        size = f"-{r['size']}" if r["size"] else ""
        return r["label"] if r["kind"] == "continual" else f"pretraining {r['arm']}{size}"

    out: dict[str, tuple[list[int], int]] = {}
    for label in dict.fromkeys(map(key, runs)):
        mine = [r for r in runs if key(r) == label]
        seeds = sorted({r["seed"] for r in mine})
        full = [s for s in seeds if all(r["name"] in done for r in mine if r["seed"] == s)]
        out[label] = (full, len(seeds))
    return out


def _design(cfg, path: Path, runs: list[dict]) -> list[str]:
    repo = path.parent.parent.parent  # studies/<name>/study.yaml -> the repository

    def rel(p: str) -> str:
        return os.path.relpath((path.parent / p).resolve(), repo)

    md = ["## Design", ""]
    if cfg.design.strip():
        md += [cfg.design.strip(), ""]
    md += [f"Pretraining seeds {cfg.seeds} (n = {len(cfg.seeds)} independent replicates; continual seed s runs on "
           f"pretraining seed s, so arms are compared paired on a replicate), task orders {cfg.orders}"
           + (f", sizes {list(cfg.sizes)}" if cfg.sizes else "") + f"; {len(runs)} runs in all.", "",
           "| topology | preset | overrides |", "|---|---|---|"]
    md += [f"| {n} | `{rel(t.config)}` | {' '.join(t.overrides) or '–'} |"
           for n, t in cfg.topologies.items()]
    md += ["", "| arm | on | preset | lr grid | overrides |", "|---|---|---|---|---|"]
    md += [f"| {n} | {a.topology} | `{rel(a.config)}` | "
           f"{', '.join(f'{x:g}' for x in a.lr) or 'preset'} | {' '.join(a.overrides) or '–'} |"
           for n, a in cfg.arms.items()]
    for kind, ovs in (("pretraining", cfg.pretrain_overrides), ("continual", cfg.continual_overrides)):
        if ovs:
            md += ["", f"Every {kind} run: `{' '.join(ovs)}`."]
    return md


def _progress(cfg, runs: list[dict], done: dict[str, dict]) -> list[str]:
    md = ["## What is finished", "", status_line(cfg, runs, done, Estimator(cfg, done)) + ".", "",
          "| results run | pretraining seeds finished | n |", "|---|---|---|"]
    for label, (full, planned) in progress_by_label(cfg, runs, done).items():
        md.append(f"| {label} | {', '.join(map(str, full)) or '–'} | {len(full)}/{planned} |")
    left = [r["name"] for r in runs if r["name"] not in done]
    listed = ", ".join(f"`{n}`" for n in left) if len(left) <= 40 else "see the table (seeds not listed there)"
    md += ["", f"Not finished ({len(left)}): " + (listed if left else "none") + "."]
    stale = analysis_missing(runs, done)
    if stale:
        md += ["", f"Analysis missing ({len(stale)}): " + ", ".join(f"`{n}`" for n in stale) + " were committed "
               "before `analyze:` asked for their analysis (their task checkpoints are gone); they are pooled in the "
               "comparison but not in the H3 evidence, and the next `topocl study` runs them again."]
    return md


def _h3(cfg, path: Path, runs: list[dict], done: dict[str, dict]) -> list[str]:
    """The H3 section: topocl/analysis/evidence.py's grafting statistics (95% t-CIs over replicates, n, verdicts)
    over the committed analysis artifacts of the runs the study's `analyze:` key covers."""
    from topocl.analysis.artifacts import artifacts_by_run
    from topocl.analysis.evidence import evidence, evidence_markdown
    from topocl.results import read_run_dir, replicate_map

    an = cfg.analyze
    if not an.arms:
        return []
    planned = [r for r in runs if r.get("analyze")]
    stale = set(analysis_missing(runs, done))
    have = [r for r in planned if r["name"] in done and r["name"] not in stale]
    labels = ", ".join(f"`{x}`" for x in dict.fromkeys(r["label"] for r in planned))
    md = ["## H3 evidence", "",
          f"Analysed (`analyze:`): arms {', '.join(an.arms)} at "
          + (f"learning rate {', '.join(f'{x:g}' for x in an.lr)}" if an.lr else "every grid point")
          + f" (results runs {labels}); stages {', '.join(an.stages)}, graft modes {', '.join(an.graft_modes)}. "
          f"{len(have)}/{len(planned)} analysed runs are finished with their analysis. H3's statistic uses the "
          "remove mode only (the group's weights from before task j put into the final model; topocl/analysis/"
          "graft.py); every role group is grafted, the groups other than slow/fast are shown without a verdict.", ""]
    if "graft" not in an.stages or "remove" not in an.graft_modes:
        return md + ["H3 needs the graft stage in mode remove, which `analyze:` does not run: not measured."]
    if not have:
        return md + ["No analysed run is finished yet: no H3 evidence."]
    dirs = [read_run_dir(committed_dir(path, r)) for r in have]
    ev = evidence([], artifacts_by_run(dirs), replicates=replicate_map(dirs))
    body = evidence_markdown(ev, ("H3",))[2:]  # below this section's own heading
    return md + body


def _cost(runs: list[dict], done: dict[str, dict]) -> list[str]:
    recs = [done[r["name"]] for r in runs if r["name"] in done]
    if not recs:
        return []
    by_kind = {k: [x for x in recs if x["kind"] == k] for k in ("pretrain", "continual")}
    md = ["## Cost", "", f"Total CPU time {hours(sum(x['cpu_s'] for x in recs))} over {len(recs)} finished runs "
          f"(wall {hours(sum(x['wall_s'] for x in recs))}, summed over runs; hosts: "
          f"{', '.join(sorted({x['host'] for x in recs}))}). CPU time is the run process's own (os.wait4), so "
          "it does not grow with other load on the machine; wall time does.", "",
          "| kind | group | runs | CPU per run | wall per run |", "|---|---|---|---|---|"]
    for kind, xs in by_kind.items():
        groups: dict[str, list[dict]] = {}
        for x in xs:
            groups.setdefault(x["label"] if kind == "continual" else x["topology"], []).append(x)
        for g, ys in groups.items():
            md.append(f"| {kind} | {g} | {len(ys)} | {hours(sum(y['cpu_s'] for y in ys) / len(ys))} | "
                      f"{hours(sum(y['wall_s'] for y in ys) / len(ys))} |")
    return md


def write_findings(path: str | Path) -> Path:
    """STUDY_DIR/FINDINGS.md (+ STUDY_DIR/report/) from the committed artifacts."""
    from topocl.report import write_report
    from topocl.sweep_report import pretrain_section

    path = study_file(path).resolve()
    root = path.parent
    cfg = load_study(path)
    runs = expand(cfg, path, check=False)
    done = records(path, runs)
    md = [f"# Findings: {cfg.name}", "",
          f"Generated by `topocl study report` on {time.strftime('%Y-%m-%d')} from the artifacts committed under "
          f"`runs/` (study file: `study.yaml`). Only finished runs are pooled; the list below says what is not.", ""]
    if cfg.question.strip():
        md += ["## Question", "", cfg.question.strip(), ""]
    md += _design(cfg, path, runs) + [""] + _progress(cfg, runs, done) + [""]
    if cfg.pretrain_from:
        md += [f"The pretraining runs are shared with `{cfg.pretrain_from}` (committed there; their cost is "
               "counted in both studies).", ""]
    md += _cost(runs, done) + [""]
    pre = [{**r, "out_dir": str(committed_dir(path, r)), "status": "done" if r["name"] in done else "todo"}
           for r in runs if r["kind"] == "pretrain"]
    md += pretrain_section(pre) + [""]
    md += _h3(cfg, path, runs, done) + [""]
    cont = [root / "runs" / r["name"] for r in runs if r["kind"] == "continual" and r["name"] in done]
    md += ["## Comparison", ""]
    if not cont:
        md.append("No continual run is finished yet: nothing to compare.")
    else:
        labels = {done[r.name]["label"] for r in cont}
        notes = []
        baseline = cfg.baseline if cfg.baseline in labels else None
        joint = cfg.joint if cfg.joint in labels else None
        for key, want, got in (("baseline", cfg.baseline, baseline), ("joint reference", cfg.joint, joint)):
            if want and not got:
                notes.append(f"The {key} `{want}` has no finished run yet, so what needs it is left out.")
        report = write_report(cont, root / "report", baseline=baseline, joint=joint)
        body = report.read_text().split("\n", 1)[1].lstrip("\n")  # without its "# ..." title
        body = body.replace("](", "](report/").replace("](report/http", "](http")
        md += [*notes, *([""] if notes else []), "The comparison below is `topocl report` over the finished "
               f"continual runs ({len(cont)}); its summary.json and figures are in `report/`.", "",
               body.replace("\n### ", "\n#### ").replace("\n## ", "\n### ")]
    out = root / "FINDINGS.md"
    out.write_text("\n".join(md).rstrip("\n") + "\n")
    return out


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="topocl study status|report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["status", "report"])
    ap.add_argument("study", help="study folder (studies/<name>) or its study.yaml")
    args = ap.parse_args(argv)
    if args.what == "report":
        print(f"findings: {write_findings(args.study)}")
        return 0
    cfg = load_study(args.study)
    runs = expand(cfg, args.study, check=False)
    done = records(args.study, runs)
    print(status_line(cfg, runs, done, Estimator(cfg, done)))
    for label, (full, planned) in progress_by_label(cfg, runs, done).items():
        print(f"  {label:<32} {len(full)}/{planned} seeds finished")
    return 0
