"""`topocl sweep SWEEP.yaml [k=v ...] [--dry-run]`: a grid of runs in one sweep directory.

    name: tiny-arms                       # "" = the file's stem
    out_dir: runs/sweeps/tiny-arms        # "" = runs/sweeps/<name>
    seeds: [0, 1]
    orders: [0]                           # continual arms only (task orders)
    sizes: {small: [model.d_model=64]}    # optional axis: size name -> pretrain overrides ({} = no size axis)
    overrides: [train.steps=30]           # every run
    arms:
      dense-vanilla: {config: ../continual/tiny-dense-vanilla.yaml}
      split-acft: {config: ../continual/tiny-split-acft.yaml, overrides: [train.lr=1e-3]}
      dense: {config: ../pretrain/tiny-dense.yaml}                      # kind from the folder name
      dense-cl: {config: ../continual/tiny-dense-vanilla.yaml, init_arm: dense}
    executor: {kind: local, workers: 2}   # or slurm (submitit): see topocl/sweep_exec.py

Runs = arms x sizes x seeds (x orders for continual arms), in that order, named
`<arm>[-<size>]-s<seed>[-o<order>]`, each in SWEEP/runs/<name>. A size's overrides go to pretrain arms; a
continual arm runs once per size only with an init_arm (on that size's model). Overrides of a run, in order: the
sweep's, the size's, the arm's, `all.` ones from the command line, then the grid's (seed, out_dir; for continual
arms seeds=[s] orders=[o] run=<arm>[-<size>], so `topocl report SWEEP` pools seeds and orders per arm).
`init_arm: P` starts a continual arm from the pretrain arm P's run of the same size and seed; such runs wait for
the pretraining wave and are skipped when it failed. Every run's config is loaded (strictly) before anything
starts. Command-line `k=v` set sweep keys; `all.k=v` is appended to every run's overrides. A run is done when
RUN/DONE.json exists (written last, atomically): a re-launch skips done runs and resumes the others.
SWEEP/sweep.json lists every run with its overrides, status and log.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from topocl.checkpoint import write_json_atomic
from topocl.config import ConfigError, PretrainConfig, load_config
from topocl.sweep_exec import ExecutorConfig, is_done, run_local, run_submitit

MANIFEST = "sweep.json"
KINDS = ("pretrain", "continual")


@dataclass
class ArmConfig:
    config: str = ""  # config file, relative to the sweep file
    kind: str = "auto"  # auto (the config's folder name: pretrain | continual) | pretrain | continual
    overrides: list[str] = field(default_factory=list)
    init_arm: str = ""  # continual: start from this sweep's run of that pretrain arm (same size and seed)
    seeds: list[int] = field(default_factory=list)  # [] = the sweep's


@dataclass
class SweepConfig:
    name: str = ""
    out_dir: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    orders: list[int] = field(default_factory=lambda: [0])
    sizes: dict[str, list[str]] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    arms: dict[str, ArmConfig] = field(default_factory=dict)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)


def _config_class(kind: str) -> type:
    if kind == "pretrain":
        return PretrainConfig
    from topocl.continual import ContinualConfig

    return ContinualConfig


def arm_kind(name: str, arm: ArmConfig, path: Path) -> str:
    kind = path.parent.name if arm.kind == "auto" else arm.kind
    if kind not in KINDS:
        raise ConfigError(f"arms.{name}.kind={arm.kind!r}: use pretrain | continual (auto reads the config's "
                          f"folder name, here {path.parent.name!r})")
    return kind


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepConfig, list[str]]:
    """The sweep config (sweep keys from `overrides`) and the `all.` overrides for every run."""
    own = [o for o in overrides or [] if not o.startswith("all.")]
    every = [o[len("all."):] for o in overrides or [] if o.startswith("all.")]
    cfg = load_config(SweepConfig, path, own)
    cfg.name = cfg.name or Path(path).stem
    cfg.out_dir = cfg.out_dir or f"runs/sweeps/{cfg.name}"
    if not cfg.arms:
        raise ConfigError(f"{path}: a sweep needs at least one arm under arms:")
    return cfg, every


def expand(cfg: SweepConfig, sweep_file: str | Path, every: list[str] | None = None) -> list[dict]:
    """Every run of the grid: {name, arm, kind, size, seed, order, config, overrides, out_dir, needs, cwd}."""
    base = Path(sweep_file).resolve().parent
    root = Path(cfg.out_dir)
    sizes = list(cfg.sizes.items()) or [("", [])]
    no_size = [("", [])]
    kinds = {}
    for name, arm in cfg.arms.items():
        if not arm.config:
            raise ConfigError(f"arms.{name}.config is required")
        kinds[name] = arm_kind(name, arm, base / arm.config)
    runs = []
    for name, arm in cfg.arms.items():
        path = (base / arm.config).resolve()
        if arm.init_arm and (kinds.get(arm.init_arm) != "pretrain" or kinds[name] != "continual"):
            raise ConfigError(f"arms.{name}.init_arm={arm.init_arm!r} must name a pretrain arm of this sweep "
                              f"(and {name} must be a continual arm)")
        own_sizes = sizes if kinds[name] == "pretrain" or arm.init_arm else no_size
        for size, size_ov in own_sizes:
            size_ov = size_ov if kinds[name] == "pretrain" else []  # continual: the size is its init's
            label = f"{name}-{size}" if size else name
            for seed in arm.seeds or cfg.seeds:
                for order in cfg.orders if kinds[name] == "continual" else [None]:
                    run = f"{label}-s{seed}" + ("" if order is None else f"-o{order}")
                    out = root / "runs" / run
                    grid = [f"out_dir={out}"]
                    needs = None
                    if kinds[name] == "pretrain":
                        grid.append(f"seed={seed}")
                    else:
                        grid += [f"seeds=[{seed}]", f"orders=[{order}]", f"run={label}"]
                        if arm.init_arm:
                            needs = f"{arm.init_arm}-{size}-s{seed}" if size else f"{arm.init_arm}-s{seed}"
                            grid.append(f"init={root / 'runs' / needs}")
                    runs.append({"name": run, "arm": name, "kind": kinds[name], "size": size, "seed": seed,
                                 "order": order, "config": str(path),
                                 "overrides": [*cfg.overrides, *size_ov, *arm.overrides, *(every or []), *grid],
                                 "out_dir": str(out), "needs": needs, "cwd": os.getcwd()})
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"run names collide: {sorted({n for n in names if names.count(n) > 1})}")
    missing = {r["needs"] for r in runs if r["needs"]} - set(names)
    if missing:
        raise ConfigError(f"init_arm runs missing from the grid (seeds/sizes must match): {sorted(missing)}")
    for r in runs:  # strict: every key of every run, before anything starts
        load_config(_config_class(r["kind"]), r["config"], r["overrides"])
    return runs


def write_manifest(root: Path, cfg: SweepConfig, sweep_file: str | Path, runs: list[dict]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    counts = {s: sum(r["status"] == s for r in runs) for s in ("done", "failed", "skipped", "pending")}
    write_json_atomic(root / MANIFEST, {"name": cfg.name, "sweep_file": str(Path(sweep_file).resolve()),
                                  "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "counts": counts, "runs": runs})


def load_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not a sweep directory (no {MANIFEST})")
    return json.loads(path.read_text())


def run_sweep(cfg: SweepConfig, sweep_file: str | Path, runs: list[dict]) -> list[dict]:
    """Execute the runs that are not done, in waves (pretraining before the continual runs that need it)."""
    root = Path(cfg.out_dir)
    for r in runs:
        r["status"] = "done" if is_done(Path(r["out_dir"])) else "pending"
        r["log"] = str(Path(r["out_dir"]) / "sweep.log")
    write_manifest(root, cfg, sweep_file, runs)
    todo = [r for r in runs if r["status"] == "pending"]
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=f"sweep {cfg.name}", unit="run",
               dynamic_ncols=True, file=sys.stderr)
    by_name = {r["name"]: r for r in runs}

    def on_finish(run: dict, res: dict) -> None:
        run.update(res)
        write_manifest(root, cfg, sweep_file, runs)
        bar.update(1)
        if run["status"] == "failed":
            bar.write(f"FAILED {run['name']} (exit {run['returncode']}): see {run['log']}")

    for wave in (0, 1):
        batch = []
        for r in todo:
            if bool(r["needs"]) != bool(wave):
                continue
            if wave and by_name[r["needs"]]["status"] != "done":
                r.update(status="skipped", reason=f"{r['needs']} is {by_name[r['needs']]['status']}")
                bar.update(1)
                continue
            batch.append(r)
        if not batch:
            continue
        if cfg.executor.kind == "local":
            run_local(batch, cfg.executor, on_finish)
        else:
            run_submitit(batch, cfg.executor, root / "submitit", on_finish)
    bar.close()
    write_manifest(root, cfg, sweep_file, runs)
    return runs


def print_expansion(cfg: SweepConfig, runs: list[dict]) -> None:
    print(f"sweep {cfg.name}: {len(runs)} runs under {cfg.out_dir} (executor {cfg.executor.kind})")
    for r in runs:
        state = "done" if is_done(Path(r["out_dir"])) else "todo"
        needs = f"  [after {r['needs']}]" if r["needs"] else ""
        print(f"  {r['name']:<32} {state:<4} topocl {r['kind']} {os.path.relpath(r['config'])} "
              f"{' '.join(r['overrides'])}{needs}")


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="topocl sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", help="sweep YAML, e.g. configs/sweeps/tiny-arms.yaml")
    ap.add_argument("overrides", nargs="*", help="sweep keys (executor.workers=2, seeds=[0,1]) or all.k=v for "
                                                 "every run (all.train.steps=10)")
    ap.add_argument("--dry-run", action="store_true", help="print the expansion and exit")
    args = ap.parse_args(argv)
    cfg, every = load_sweep(args.sweep, args.overrides)
    runs = expand(cfg, args.sweep, every)
    if args.dry_run:
        print_expansion(cfg, runs)
        return 0
    runs = run_sweep(cfg, args.sweep, runs)
    counts = {s: sum(r["status"] == s for r in runs) for s in ("done", "failed", "skipped")}
    print(f"sweep {cfg.name}: {counts['done']}/{len(runs)} done, {counts['failed']} failed, "
          f"{counts['skipped']} skipped  (manifest: {Path(cfg.out_dir) / MANIFEST}; report: topocl report "
          f"{cfg.out_dir})")
    for r in runs:
        if r["status"] in ("failed", "skipped"):
            print(f"  {r['status']}: {r['name']}  {r.get('log') if r['status'] == 'failed' else r.get('reason')}")
    return 0 if counts["failed"] == counts["skipped"] == 0 else 1
