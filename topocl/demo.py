"""`topocl demo` (what `make demo` runs): the embedded default, end to end on 2 CPU cores.

1. pretrain the tiny dense model and the tiny sparse (split) model on the synthetic common-sense corpus;
2. run the same 10-world "window-breaking" stream on six arms (configs/continual/tiny-*.yaml):
   - the 2 x 2 control of topology and role policy, one head partition in every cell:
     {group B dense (the dense model, split_dense for ACFT), group B top-k (split)} x {vanilla, ACFT}:
     dense-vanilla, dense-acft, split-vanilla, split-acft;
   - the dense baselines as the seeds define them: dense-sota (EWC, lambda selected on a validation stream, +
     replay limited to 10% of the stream's rows) and dense-lora;
   with per-role telemetry on every arm and every task checkpoint kept for the split arms. No arm trains on the
   held-out rows scored for base bits/byte (the runner checks it);
3. analyse the split arms (grafting the slow / fast pathway back to its pre-task weights, routing stability of
   the top-k selections, activation sparsity) and the dense baseline (activation sparsity);
4. write one comparison report (with the H1/H2/H3 evidence section) and the analysis report, and print their
   paths and a short table.
Finished stages are reused when the demo runs again (delete the demo directory to start over);
an interrupted stage resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from topocl.checkpoint import latest_checkpoint
from topocl.config import PretrainConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ARMS = [("tiny-dense-vanilla", "dense"), ("tiny-dense-acft", "dense"), ("tiny-split-vanilla", "split"),
        ("tiny-split-acft", "split"), ("tiny-dense-sota", "dense"), ("tiny-dense-lora", "dense")]
ANALYSED = {"tiny-split-vanilla": ["graft", "routing", "sparsity"], "tiny-split-acft": ["graft", "routing", "sparsity"],
            "tiny-dense-vanilla": ["sparsity"]}


def pretrained(preset: str, out: Path, overrides: list[str]) -> Path:
    """Pretrain `preset` into `out` unless a finished run is already there."""
    from topocl.pretrain import finished, pretrain

    cfg = load_config(PretrainConfig, CONFIGS / "pretrain" / f"{preset}.yaml", [f"out_dir={out}", *overrides])
    ck = latest_checkpoint(out / "checkpoints")
    if finished(cfg, out):  # its summary.json is complete (a run killed before it resumes and finishes it)
        print(f"reusing finished pretraining run {out}")
        return out
    cfg.resume = ck is not None
    return pretrain(cfg)


def arm(config: str, init: Path, out: Path, overrides: list[str]) -> Path:
    from topocl.continual import ContinualConfig, run_continual

    cfg = load_config(ContinualConfig, CONFIGS / "continual" / f"{config}.yaml",
                      [f"init={init}", f"out_dir={out}", *overrides])
    if (out / "cost.json").is_file():
        print(f"reusing finished continual run {out}")
        return out
    cfg.resume = (out / "results.jsonl").is_file()
    return run_continual(cfg)


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="topocl demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="demo directory (default runs/demo)")
    ap.add_argument("--quick", action="store_true", help="a much smaller demo (seconds; for smoke tests)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    pre = ["train.steps=40", "data.synthetic_docs=2000", "train.eval_every=20"] if args.quick else []
    cl = ["stream_options.n_worlds=3", "train.steps=4", "base_rows=8"] if args.quick else []
    inits = {kind: pretrained(f"tiny-{kind}", out / f"pretrain-{kind}", pre) for kind in ("dense", "split")}
    for kind, run in inits.items():
        s = json.loads((run / "summary.json").read_text())
        acc = s.get("base_probes", {}).get("base", {}).get("acc", float("nan"))
        print(f"tiny {kind}: val {s['val_bpb']:.3f} bits/byte, base-probe accuracy {acc:.1%}, "
              f"{s['tokens_seen']:,} tokens")
    runs = []
    for config, kind in ARMS:
        keep = ["analysis.keep_task_checkpoints=true"] if "graft" in ANALYSED.get(config, []) else []
        runs.append(arm(config, inits[kind], out / config.removeprefix("tiny-"),
                        [*cl, "analysis.telemetry=true", *keep]))
    analysis = analyse(runs, out / "analysis")
    from topocl.report import terminal_table, write_report

    report = write_report(runs, out / "report", baseline="dense-vanilla")
    print()
    print(terminal_table(json.loads((out / "report" / "summary.json").read_text())))
    print(f"\ndemo finished in {(time.perf_counter() - t0) / 60:.1f} min; report: {report}; analysis: {analysis}")
    return 0


def analyse(runs: list[Path], out: Path) -> Path:
    """The analysis stages of ANALYSED on their arms (reused when their artifacts exist), then the analysis
    report over every arm against the dense-vanilla baseline."""
    from topocl.analysis.artifacts import stream_dirs
    from topocl.analysis.render import write_analysis
    from topocl.analysis.stages import analyze_run
    from topocl.results import load_rows, read_run_dir, replicate_map

    for run in runs:
        stages = [s for s in ANALYSED.get(f"tiny-{run.name}", [])
                  if not all((d / "analysis" / f"{s}.jsonl").is_file() for _, _, d in stream_dirs(run))]
        if stages:
            print(f"analysing {run.name}: {', '.join(stages)}")
            for note in analyze_run(run, stages):
                print(note)
    from topocl.analysis.artifacts import run_artifacts

    artifacts = {run.name: run_artifacts(run) for run in runs}
    replicates = replicate_map([read_run_dir(run) for run in runs])
    return write_analysis(load_rows(*runs), artifacts, out, "dense-vanilla", None, replicates)
