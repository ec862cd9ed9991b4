"""Running a study (`topocl study STUDY.yaml`, see topocl/study.py): execute what is missing, commit it.

    run_study(cfg, path, runs, budget_s, shard)   the missing runs of this shard, unit by unit (one pretraining
                                                   run, then the continual runs on it), within the budget
    commit_run(path, run, res)                     a finished run's small artifacts -> studies/<name>/runs/<run>/
    verify_repretrain(path, run, tol)              a re-pretrained checkpoint's summary vs the committed one
    execute(run, env, echo)                        one run in its slot: the subprocess, then an analysed run's
                                                   `topocl analyze` (the study's `analyze:` key)

Execution is topocl.sweep_exec.run_local (one subprocess per run; a killed run resumes), with its should_start
gate for the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import yaml

import topocl.study
import topocl.sweep_exec as sweep_exec  # module attribute: tests replace sweep_exec.execute_run
from topocl.checkpoint import write_json_atomic
from topocl.config import ConfigError
from topocl.study import (
    RECORD,
    Estimator,
    StudyConfig,
    analysis_missing,
    committed_dir,
    expand,
    load_study,
    missing_presets,
    parse_budget,
    parse_shard,
    print_expansion,
    records,
    shard_units,
    status_line,
    study_file,
)
from topocl.sweep_exec import DONE, LOG, is_done, run_local

KEEP = {"pretrain": ["config.yaml", "meta.json", "summary.json", "metrics.jsonl", "samples.txt"],
        "continual": ["config.yaml", "results.jsonl", "cost.json", "meta.json"]}
REQUIRED = {"pretrain": ["config.yaml", "summary.json"], "continual": ["config.yaml", "results.jsonl", "cost.json"]}
SMALL = 2 << 20  # optional files (metrics.jsonl, per-stream logs) are committed only up to this size
ANALYZED = "ANALYZED.json"  # in an analysed run's scratch folder, after its analysis: stages, modes, cost


# ----------------------------------------------------------------------------- committing finished runs


def _copy_small(src: Path, dst: Path, names: list[str], required: list[str]) -> None:
    for name in names:
        f = src / name
        if name in required and not f.is_file():
            raise FileNotFoundError(f"{src} finished without {name}")
        if f.is_file() and (name in required or f.stat().st_size <= SMALL):
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst / name)


def commit_run(path: str | Path, run: dict, res: dict) -> dict:
    """Copy a finished scratch run's small artifacts into the study folder; run.json last (atomically)."""
    src, dst = Path(run["out_dir"]), committed_dir(path, run)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names, required = list(KEEP[run["kind"]]), list(REQUIRED[run["kind"]])
    if run["kind"] == "continual":  # per-stream training logs, when small
        names += [str(f.relative_to(src)) for f in sorted(src.glob("seed*-order*/*.jsonl"))]
    analysis = json.loads((src / ANALYZED).read_text()) if run.get("analyze") else None
    if analysis:  # every stream's stage artifacts, whatever their size
        found = [str(f.relative_to(src)) for s in analysis["stages"]
                 for f in sorted(src.glob(f"seed*-order*/analysis/{s}.jsonl"))]
        names, required = names + found, required + found
    _copy_small(src, tmp, names, required)
    from topocl.pretrain import git_sha

    rec = {k: run[k] for k in ("name", "label", "kind", "arm", "topology", "size", "seed", "order", "lr")}
    rec.update(group=list(Estimator.group(run)), config=os.path.relpath(run["config"], study_file(path).parent),
               overrides=run["overrides"], wall_s=round(res.get("wall_s", 0.0), 2),
               cpu_s=round(res.get("cpu_s", 0.0), 2), host=socket.gethostname(), git_sha=git_sha(),
               finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if analysis:  # the run's cost includes its analysis
        rec.update(wall_s=round(rec["wall_s"] + analysis["wall_s"], 2),
                   cpu_s=round(rec["cpu_s"] + analysis["cpu_s"], 2), analysis=analysis)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    write_json_atomic(dst / RECORD, rec)
    return rec


def _kept_task_checkpoints(out: Path) -> bool:
    """Whether the continual run started in `out` keeps its task checkpoints (its resolved config.yaml)."""
    f = out / "config.yaml"
    return not f.is_file() or bool(((yaml.safe_load(f.read_text()) or {}).get("analysis") or {})
                                   .get("keep_task_checkpoints"))


def analyze_command(run: dict) -> list[str]:
    an = run["analyze"]
    return [sys.executable, "-m", "topocl", "analyze", run["out_dir"], "--stages", ",".join(an["stages"]),
            "--graft-modes", ",".join(an["graft_modes"]), "--no-report"]


def execute(run: dict, env: dict[str, str] | None = None, echo: bool = False) -> dict:
    """One study run in its slot: sweep_exec.execute_run; for a run the `analyze:` key covers, then its
    analysis subprocess (same environment and log), ANALYZED.json with the stages and the analysis's own wall
    and CPU seconds (commit_run adds them to the run's cost), and the per-task checkpoints deleted. A scratch
    run started without its task checkpoints (before `analyze:` asked for them) is started again from
    nothing, since it can never be analysed; one whose continual part finished is not run again."""
    out = Path(run["out_dir"])
    if not run.get("analyze"):
        return sweep_exec.execute_run(run, env, echo)
    if out.is_dir() and not _kept_task_checkpoints(out):
        shutil.rmtree(out)
    res = json.loads((out / DONE).read_text()) if is_done(out) else sweep_exec.execute_run(run, env, echo)
    if res["status"] != "done":
        return res
    t0 = time.perf_counter()
    rc, cpu = sweep_exec.run_logged(analyze_command(run), out / LOG, env, echo, run.get("cwd"))
    streams = sorted(out.glob("seed*-order*/"))
    lacking = [f"{d.name}/analysis/{s}.jsonl" for d in streams for s in run["analyze"]["stages"]
               if not (d / "analysis" / f"{s}.jsonl").is_file()]
    if rc != 0 or lacking or not streams:
        return {**res, "status": "failed", "returncode": rc or -1, "log": str(out / LOG),
                "error": f"analysis: exit {rc}" + (f", missing {lacking}" if lacking else "")}
    write_json_atomic(out / ANALYZED, {**run["analyze"], "wall_s": round(time.perf_counter() - t0, 2),
                                       "cpu_s": round(cpu, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    for d in streams:  # the per-task checkpoints are large and no longer needed
        shutil.rmtree(d / "checkpoints", ignore_errors=True)
    return res


def checkpoint_ready(run: dict) -> bool:
    out = Path(run["out_dir"])
    return is_done(out) and (out / "checkpoints" / "LATEST").is_file()


def verify_repretrain(path: str | Path, run: dict, tol: float) -> str:
    """'' when the scratch re-run's summary.json matches the committed one, else why not."""
    mine = json.loads((Path(run["out_dir"]) / "summary.json").read_text())
    ref = json.loads((committed_dir(path, run) / "summary.json").read_text())
    if mine.get("tokens_seen") != ref.get("tokens_seen"):
        return f"tokens_seen {mine.get('tokens_seen')} vs committed {ref.get('tokens_seen')}"
    for k in ("val_loss", "val_bpb"):
        a, b = mine.get(k), ref.get(k)
        if (a is None) != (b is None) or (b is not None and abs(a - b) > tol * abs(b)):
            return f"{k} {a} vs committed {b} (tolerance {tol:.0%} relative)"
    return ""


# ----------------------------------------------------------------------------- running


def run_study(cfg: StudyConfig, path: str | Path, runs: list[dict], budget_s: float = 0.0,
              shard: tuple[int, int] = (0, 1)) -> dict:
    """Run what is missing of this shard within the budget; returns {status per run name, stopped, ...}."""
    from tqdm import tqdm

    missing = missing_presets(runs)
    if missing:
        raise ConfigError("missing presets (create them or remove their arms): " + "; ".join(
            f"{p} (needed by {', '.join(a)})" for p, a in missing.items()))
    units = shard_units(runs, *shard)
    mine = [r for r in runs if r["unit"] in units]
    done = records(path, runs)
    est = Estimator(cfg, done)
    stale = analysis_missing(mine, done)
    for name in stale:  # committed before `analyze:` asked for its analysis: its task checkpoints are gone
        del done[name]
    status = {r["name"]: "done" for r in mine if r["name"] in done}
    for r in mine:  # finished in scratch but not committed (the last session stopped in between)
        out = Path(r["out_dir"])
        if r["name"] not in done and is_done(out) and (not r.get("analyze") or (out / ANALYZED).is_file()):
            done[r["name"]] = commit_run(path, r, json.loads((Path(r["out_dir"]) / DONE).read_text()))
            status[r["name"]] = "done"
    t0, stop = time.monotonic(), {"budget": False}
    bar = tqdm(total=len(mine), initial=len(status), desc=f"study {cfg.name}", unit="run", dynamic_ncols=True,
               file=sys.stderr)
    if stale:
        bar.write(f"analysis missing: {', '.join(stale)} committed without the analysis `analyze:` asks for; "
                  "run again (with their task checkpoints kept)")

    def should_start(run: dict) -> bool:
        if stop["budget"]:
            return False
        if budget_s and time.monotonic() - t0 + est(run) > budget_s:
            stop["budget"] = True
            bar.write(f"budget: {run['name']} (est. {est(run) / 60:.1f} min) does not fit in the "
                      f"{(budget_s - time.monotonic() + t0) / 60:.1f} min left; stopping")
            return False
        return True

    def on_finish(run: dict, res: dict) -> None:
        if res["status"] == "not started":
            status[run["name"]] = "not started"
            return
        if res["status"] != "done":
            status[run["name"]] = "failed"
            why = f", {res['error']}" if "error" in res else ""
            bar.write(f"FAILED {run['name']} (exit {res.get('returncode')}{why}): see {res.get('log')}")
            return
        if run.get("restore"):  # a re-pretraining for the checkpoint: never overwrites the committed record
            status[run["name"]] = "done"
            return
        done[run["name"]] = rec = commit_run(path, run, res)
        est.add(run, rec)
        status[run["name"]] = "done"
        bar.update(1)
        bar.write(status_line(cfg, runs, done, est))

    by_unit: dict[int, list[dict]] = {}
    for r in mine:
        by_unit.setdefault(r["unit"], []).append(r)
    todo_units = [u for u, rs in by_unit.items() if any(r["name"] not in done for r in rs)]
    width = max(1, cfg.executor.workers)
    echo = width == 1
    blocked: dict[str, str] = {}
    for g in range(0, len(todo_units), width):
        group = [by_unit[u] for u in todo_units[g:g + width]]
        wave = []
        for rs in group:
            pre, conts = rs[0], [r for r in rs[1:] if r["name"] not in done]
            if pre["name"] not in done:
                wave.append(pre)
            elif conts and not checkpoint_ready(pre):
                wave.append({**pre, "restore": True})
                bar.write(f"{pre['name']}: committed, but its checkpoint is not on this machine: pretraining again "
                          f"into {pre['out_dir']} (checked against the committed summary.json)")
        if wave:
            run_local(wave, cfg.executor, on_finish, should_start, echo, execute)
        batch = []
        for rs in group:
            pre, conts = rs[0], [r for r in rs[1:] if r["name"] not in done]
            if not conts:
                continue
            if pre["name"] not in done or not checkpoint_ready(pre):
                state = status.get(pre["name"], "not started")
                if state == "not started":  # the budget stopped before it
                    continue
                why = f"{pre['name']} {state}"
            else:
                why = verify_repretrain(path, pre, cfg.repretrain_tolerance)
                why = f"re-pretrained {pre['name']} differs from the committed run: {why}" if why else ""
            if why:
                for r in conts:
                    status[r["name"]] = blocked[r["name"]] = why
                continue
            batch += conts
        if batch:
            run_local(batch, cfg.executor, on_finish, should_start, echo, execute)
        if stop["budget"]:
            break
    bar.close()
    for r in mine:
        status.setdefault(r["name"], "not started")
    return {"status": status, "blocked": blocked, "budget_stop": stop["budget"], "done": done, "estimator": est,
            "wall_s": time.monotonic() - t0}


def cli(argv: list[str]) -> int:
    if argv and argv[0] in ("status", "report"):
        from topocl.study_report import cli as sub

        return sub(argv)
    ap = argparse.ArgumentParser(prog="topocl study", description=topocl.study.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", help="study file (studies/<name>/study.yaml) or its folder")
    ap.add_argument("overrides", nargs="*", help="study keys, e.g. seeds=[0,1] executor.workers=2")
    ap.add_argument("--budget", default="", help="wall-time budget, e.g. 90m, 2h, 1h30m (default: none)")
    ap.add_argument("--shard", default="0/1", help="i/n: run only this deterministic share of the study")
    ap.add_argument("--dry-run", action="store_true", help="print the runs, their state and missing presets")
    args = ap.parse_args(argv)
    cfg = load_study(args.study, args.overrides)
    shard = parse_shard(args.shard)
    budget = parse_budget(args.budget) if args.budget else 0.0
    runs = expand(cfg, args.study)
    if args.dry_run:
        return print_expansion(cfg, args.study, runs, shard)
    out = run_study(cfg, args.study, runs, budget, shard)
    print(status_line(cfg, runs, out["done"], out["estimator"]))
    counts: dict[str, int] = {}
    for s in out["status"].values():
        counts[s if s in ("done", "failed", "not started") else "blocked"] = counts.get(s, 0) + 1
    print(f"this session (shard {shard[0]}/{shard[1]}, {out['wall_s'] / 60:.1f} min): "
          + ", ".join(f"{n} {k}" for k, n in counts.items())
          + (" — stopped by the budget" if out["budget_stop"] else ""))
    for name, why in out["blocked"].items():
        print(f"  blocked: {name}: {why}")
    print(f"commit the finished runs: git add {study_file(args.study).parent}; report: topocl study report "
          f"{study_file(args.study).parent}")
    return 0 if not counts.get("failed") and not out["blocked"] else 1
