"""Wall and CPU time of one study run: the pretraining of one topology plus one continual arm on it.

    python benchmarks/study_run.py --study studies/window-breaking-tiny/study.yaml [--arm dense-vanilla]
    python benchmarks/study_run.py --pretrain configs/pretrain/tiny-dense.yaml \\
        --continual configs/continual/tiny-dense-vanilla.yaml --continual-set stream_options.n_worlds=50

    python benchmarks/study_run.py --step-cost configs/pretrain/tiny-{dense,split,dsa,nsa}.yaml --batch 32 16

--step-cost measures only CPU seconds per training step (in this process, OMP_NUM_THREADS as set) of each
pretraining preset's model at the given batch sizes: the ratio between topologies, for runs not measured whole.
Each stage runs as the study runs it (`python -m topocl <kind> CONFIG k=v ...` through topocl.sweep_exec, with
OMP_NUM_THREADS=--threads), in a fresh scratch directory; CPU time is the child's own (os.wait4), so machine load
from other processes inflates wall time but not CPU time. Writes the JSON to --json (and prints it): per stage
wall_s, cpu_s, and for the continual stage the runner's cost.json (training step time, tokens), plus the
machine (CPU count, load average before and after) and the commit. `topocl study` sizes its budget from
measured numbers like these (the study file's `estimate`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from topocl.pretrain import git_sha
from topocl.sweep_exec import execute_run

ROOT = Path(__file__).resolve().parents[1]


def stage(kind: str, config: str, overrides: list[str], out: Path, threads: int) -> dict:
    run = {"kind": kind, "config": str(Path(config).resolve()), "overrides": [*overrides, f"out_dir={out}"],
           "out_dir": str(out), "cwd": str(ROOT)}
    res = execute_run(run, {"OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""})
    if res["status"] != "done":
        raise SystemExit(f"{kind} failed (exit {res['returncode']}): see {res['log']}\n"
                         + Path(res["log"]).read_text()[-3000:])
    row = {"config": os.path.relpath(config, ROOT), "overrides": overrides, "wall_s": round(res["wall_s"], 1),
           "cpu_s": round(res["cpu_s"], 1)}
    if kind == "continual":
        cost = json.loads((out / "cost.json").read_text())
        row["runner"] = {k: cost[k] for k in ("step_time_s", "tokens", "wall_s") if k in cost}
    else:
        row["summary"] = json.loads((out / "summary.json").read_text())
    return row


def reuse(kind: str, config: str, overrides: list[str], out: Path) -> dict:
    """The pretraining in `out` (a finished bench or study run, or a copy of a checkpoint of one) after checking
    that it has the same model, data and training settings (seed and out_dir may differ: they do not change the
    cost); its measured cost when it finished through sweep_exec (DONE.json)."""
    import yaml

    from topocl.config import PretrainConfig, from_dict, load_config, to_dict

    want = to_dict(load_config(PretrainConfig, config, overrides))
    have = to_dict(from_dict(PretrainConfig, yaml.safe_load((out / "config.yaml").read_text())))
    if want["model"]["vocab_size"] == 0:  # 0 = the tokenizer's: the run wrote the resolved size
        want["model"]["vocab_size"] = have["model"]["vocab_size"]
    for section in ("model", "data", "train"):
        if have[section] != want[section]:
            diff = sorted(k for k in want[section] if want[section][k] != have[section].get(k))
            raise SystemExit(f"{out} ran other {section} settings than the study's {kind} run: {diff}")
    row = {"config": os.path.relpath(config, ROOT), "overrides": overrides, "reused": str(out), "wall_s": None,
           "cpu_s": None}
    if (out / "DONE.json").is_file():  # a finished run through sweep_exec: its measured wall and CPU time
        done = json.loads((out / "DONE.json").read_text())
        row.update(wall_s=round(done["wall_s"], 1), cpu_s=round(done.get("cpu_s", float("nan")), 1),
                   summary=json.loads((out / "summary.json").read_text()))
    else:  # e.g. a copy of an unfinished run's checkpoint: the continual cost does not depend on the weights
        row["note"] = "pretraining not measured here (no DONE.json): only the continual stage is"
    return row


def from_study(path: str, arm: str) -> tuple[dict, dict]:
    """(pretraining run, continual run) of the study's first pretraining seed for `arm` (its first grid point)."""
    from topocl.study import expand, load_study

    cfg = load_study(path)
    runs = expand(cfg, path, check=False)
    name = arm or next(iter(cfg.arms))
    cont = next((r for r in runs if r["kind"] == "continual" and r["arm"] == name), None)
    if cont is None:
        raise SystemExit(f"no continual arm {name!r} in {path} (arms: {', '.join(cfg.arms)})")
    pre = next(r for r in runs if r["name"] == cont["needs"])
    return pre, cont


def step_cost(presets: list[str], batches: list[int], steps: int) -> dict:
    """{preset: {batch: CPU seconds per training step}} (median of `steps` steps after one warm-up step)."""
    import statistics

    import torch

    from topocl.config import PretrainConfig, load_config
    from topocl.model import GPT
    from topocl.optim import build_optimizer
    from topocl.train import train_steps

    out = {}
    for preset in presets:
        cfg = load_config(PretrainConfig, preset)
        cfg.model.vocab_size = cfg.data.vocab_size
        torch.manual_seed(0)
        model = GPT(cfg.model)
        opt = build_optimizer(model, cfg.train)
        out[os.path.relpath(preset, ROOT)] = row = {}
        for b in batches:
            data = torch.randint(0, cfg.model.vocab_size, (b, cfg.data.seq_len + 1))
            times, t = [], time.process_time()
            for _ in train_steps(model, opt, lambda s, x=data: x, range(steps + 1), cfg=cfg.train,
                                 device=torch.device("cpu")):
                now = time.process_time()
                times.append(now - t)
                t = now
            row[str(b)] = round(statistics.median(times[1:]), 4)
        print(preset, row, flush=True)
    return out


def strip(overrides: list[str]) -> list[str]:
    """A study run's overrides without its own paths (the bench sets out_dir and init itself)."""
    return [o for o in overrides if not o.startswith(("out_dir=", "init="))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", help="take both stages from this study file (its first pretraining seed)")
    ap.add_argument("--arm", default="", help="with --study: the continual arm (default: the study's first)")
    ap.add_argument("--pretrain", default="configs/pretrain/tiny-dense.yaml")
    ap.add_argument("--pretrain-set", nargs="*", default=[], help="pretraining overrides k=v")
    ap.add_argument("--continual", default="configs/continual/tiny-dense-vanilla.yaml")
    ap.add_argument("--continual-set", nargs="*", default=[], help="continual overrides k=v")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each stage (the study's executor)")
    ap.add_argument("--json", default="", help="write the measurement here")
    ap.add_argument("--pretrained", default="", help="reuse this finished pretraining run (same settings) and "
                                                     "its measured cost instead of pretraining again")
    ap.add_argument("--step-cost", nargs="*", default=None, help="pretraining presets: CPU s per step only")
    ap.add_argument("--batch", type=int, nargs="*", default=[32, 16], help="with --step-cost: batch sizes")
    ap.add_argument("--steps", type=int, default=4, help="with --step-cost: timed steps per batch size")
    ap.add_argument("--keep", default="", help="keep the scratch runs in this directory (default: deleted)")
    args = ap.parse_args()
    if args.step_cost is not None:
        t0 = time.strftime("%Y-%m-%dT%H:%M:%S")
        res = {"step_cpu_s": step_cost(args.step_cost, args.batch, args.steps),
               "threads": os.environ.get("OMP_NUM_THREADS", ""), "machine": {"cpus": os.cpu_count(),
                                                                           "loadavg": os.getloadavg()},
               "commit": git_sha(), "started": t0, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res, indent=1))
        return
    if args.study:
        pre, cont = from_study(args.study, args.arm)
        args.pretrain, args.pretrain_set = pre["config"], strip(pre["overrides"])
        args.continual, args.continual_set = cont["config"], strip(cont["overrides"])
    scratch = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="study_run-"))
    load0, t0 = os.getloadavg(), time.strftime("%Y-%m-%dT%H:%M:%S")
    try:
        if args.pretrained:
            init = Path(args.pretrained).resolve()
            p = reuse("pretrain", args.pretrain, args.pretrain_set, init)
        else:
            init = scratch / "pretrain"
            p = stage("pretrain", args.pretrain, args.pretrain_set, init, args.threads)
        c = stage("continual", args.continual, [*args.continual_set, f"init={init}"], scratch / "continual",
                  args.threads)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    out = {"study": args.study or "", "arm": args.arm, "threads": args.threads, "pretrain": p, "continual": c,
           "total": {k: None if p[k] is None else round(p[k] + c[k], 1) for k in ("wall_s", "cpu_s")},
           "machine": {"cpus": os.cpu_count(), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
                       "processor": platform.processor() or platform.machine()},
           "commit": git_sha(), "started": t0, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    text = json.dumps(out, indent=1)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
