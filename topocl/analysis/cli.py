"""`topocl analyze RUN_DIR [RUN_DIR ...]`: run the post-hoc analysis stages on continual runs and write a report.

For every seed{S}-order{O} stream of every run directory (reference runs skipped), the stages write
    analysis/graft.jsonl     grafting (needs analysis.keep_task_checkpoints=true at run time)
    analysis/routing.jsonl   routing stability (sparse attention; needs the task checkpoints too)
    analysis/sparsity.jsonl  activation sparsity / effective rank before and after the stream
then analysis.md + analysis.json + PNGs go to --out (default RUN_DIR/analysis for one run, else analysis/
next to the first): H1/H2/H3 evidence, crossover vs --baseline with the --joint ceiling, telemetry (written
during the run with analysis.telemetry=true), grafting, routing and sparsity tables. `--stages ""` only
re-renders the report from the artifacts already there; `--no-report` only writes the stages' artifacts (what
`topocl study` does after an analysed run). `--graft-modes remove` grafts in one mode only (half the cost).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from topocl.analysis.artifacts import GRAFT_MODES, STAGES, artifacts_by_run
from topocl.analysis.render import write_analysis
from topocl.analysis.stages import analyze_run
from topocl.results import load_rows, read_run_dir, reference_runs, replicate_map


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="topocl analyze", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="continual run directories")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)} ('' = none)")
    ap.add_argument("--baseline", help="run name of the dense baseline (H2, crossover)")
    ap.add_argument("--joint", help="run name of the joint reference (default: config.yaml reference: joint)")
    ap.add_argument("--graft-roles", default="", help="extra roles to graft one by one, e.g. mlp,attn.o")
    ap.add_argument("--graft-modes", default=",".join(GRAFT_MODES), help=f"comma list of {', '.join(GRAFT_MODES)}")
    ap.add_argument("--no-report", action="store_true", help="write the stages' artifacts only, no analysis.md")
    ap.add_argument("--max-probes", type=int, default=8, help="probes per task for routing")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"--stages: unknown {sorted(unknown)}; use {', '.join(STAGES)}")
    modes = tuple(m for m in args.graft_modes.split(",") if m)
    if not modes or set(modes) - set(GRAFT_MODES):
        raise ValueError(f"--graft-modes {args.graft_modes!r}: a comma list of {', '.join(GRAFT_MODES)}")
    dirs = [read_run_dir(d) for d in args.runs]
    refs = reference_runs(dirs)
    rows = load_rows(*[d["dir"] for d in dirs])
    names = {n for d in dirs for n in d["runs"]}
    for name in (args.baseline, args.joint):
        if name and name not in names:
            raise ValueError(f"run {name!r} is not among the runs {sorted(names)}")
    for d in dirs:
        if stages and not any(n in refs for n in d["runs"]):
            for note in analyze_run(d["dir"], stages, args.device, [r for r in args.graft_roles.split(",") if r],
                                    args.max_probes, modes):
                print(note)
    if args.no_report:
        return 0
    artifacts = artifacts_by_run(dirs)
    joint = args.joint or next((n for n, ref in sorted(refs.items()) if ref == "joint"), None)
    out = args.out or (args.runs[0] / "analysis" if len(args.runs) == 1 else args.runs[0].parent / "analysis")
    path = write_analysis(rows, artifacts, out, args.baseline, joint, replicate_map(dirs))
    print(f"analysis: {path}")
    return 0
