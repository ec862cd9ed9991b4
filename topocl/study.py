"""`topocl study STUDY.yaml [--budget 100m] [--shard i/n] [--dry-run]`: a resumable, shardable study.

    topocl study studies/window-breaking-tiny/study.yaml --dry-run      # the runs, what is done, missing presets
    topocl study studies/window-breaking-tiny/study.yaml --budget 3h    # run what is missing, within 3 hours
    topocl study status studies/window-breaking-tiny                    # one line: done/total, CPU time, estimate
    topocl study report studies/window-breaking-tiny                    # FINDINGS.md (topocl/study_report.py)

A study expands pretraining runs (topology x size x pretraining seed), named `pre-<topology>[-<size>]-s<seed>`,
and continual runs (arm x size x pretraining seed x order x learning-rate grid point), named
`<arm>[-<size>][-lr<lr>]-s<seed>-o<order>`; continual seed s runs on pretraining seed s, so each pretraining
seed is one independent replicate and arms compare paired on it. The results' run name (what the report pools
over seeds and orders) is `<arm>[-<size>][-lr<lr>]`.

Where things live: the study file's folder (studies/<name>/) is in the repository; every finished run's small
artifacts are copied into studies/<name>/runs/<run>/ (config.yaml, results.jsonl, cost.json, meta.json,
summary.json, metrics.jsonl when small, and run.json, written last: a run with a run.json is finished).
Checkpoints and logs stay in the scratch folder (`scratch`, default runs/studies/<name>/, ignored by git).
So a new machine continues where the repository left the study. A continual run needs its pretraining
checkpoint: when the pretraining run is committed but its checkpoint is not on this machine, the pretraining
is run again (same config and seed) into scratch and its summary.json must match the committed one (tokens
exactly, val_loss and val_bpb within `repretrain_tolerance`, relative); when it does not, that replicate's
missing continual runs are blocked (reported, not run), since they would start from a different model.

Execution (topocl/study_exec.py) reuses topocl.sweep_exec: one `python -m topocl <kind>` subprocess per run,
resumed when killed; with one worker the run's own progress bar shows, with more it goes to SCRATCH/<run>/sweep.log;
after each run a one-line study status (runs done / total, CPU time spent, estimated remaining). Work is
grouped in units (one pretraining run + the continual runs on it), in pretraining-seed-major order so a
budget-limited session finishes whole replicates first. `--budget` (e.g. 90m, 2h, 1h30m) is wall time: a run
is started only when its estimated wall time (the mean of this study's finished runs of the same arm or
topology, else of the same kind, else the file's `estimate`) fits in what is left; after the first run that
does not fit, nothing more starts and the study stops cleanly. `--shard i/n` takes a deterministic share of
the units (greedy on static run counts), disjoint across i and covering the study.

Analyses (H3 evidence): `analyze: {arms: [split-acft, dense-vanilla], lr: [0.001], stages: [graft],
graft_modes: [remove]}` names the continual arms (and their learning-rate grid points; lr [] = every point)
whose runs get the post-hoc analysis stages (topocl/analysis/stages.py; default graft, in both graft modes
unless graft_modes says). Such a run gets `analysis.keep_task_checkpoints=true`; after its continual
subprocess, `topocl analyze OUT --stages ... --no-report` runs in the same slot (its CPU and wall time are
counted in the run's cost), every stream's analysis/<stage>.jsonl is committed as
runs/<run>/seed{S}-order{O}/analysis/<stage>.jsonl (topocl.analysis.artifacts.run_artifacts reads the
committed folder), and the task checkpoints in scratch are deleted; run.json (written last) records the
analysis. A run committed without the analysis its key now asks for ("analysis missing" in status and report)
is run again: its task checkpoints are gone, so the analysis cannot be added to it.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from topocl.analysis.artifacts import GRAFT_MODES, STAGES
from topocl.config import ConfigError, PretrainConfig, load_config
from topocl.sweep_exec import ExecutorConfig

RECORD = "run.json"  # written last into the committed run directory: the run is finished


@dataclass
class Topology:
    config: str = ""  # pretraining preset, relative to the study file
    overrides: list[str] = field(default_factory=list)


@dataclass
class Arm:
    config: str = ""  # continual preset, relative to the study file
    topology: str = ""  # the study topology whose pretrained model this arm starts from
    lr: list[float] = field(default_factory=list)  # learning-rate grid; [] = the preset's train.lr
    overrides: list[str] = field(default_factory=list)


@dataclass
class Analyze:
    arms: list[str] = field(default_factory=list)  # continual arms whose runs are analysed
    lr: list[float] = field(default_factory=list)  # their grid points that are; [] = every point
    stages: list[str] = field(default_factory=lambda: ["graft"])  # topocl.analysis.artifacts.STAGES
    graft_modes: list[str] = field(default_factory=lambda: list(GRAFT_MODES))  # topocl/analysis/graft.py


@dataclass
class Cost:
    wall_s: float = 0.0
    cpu_s: float = 0.0


@dataclass
class Estimate:
    """Measured cost of one run per kind (benchmarks/study_run.py), used until the study has its own."""

    pretrain: Cost = field(default_factory=Cost)
    continual: Cost = field(default_factory=Cost)
    source: str = ""  # where the numbers come from (benchmark JSON, commit, machine)


@dataclass
class StudyConfig:
    name: str = ""  # "" = the study folder's name
    question: str = ""
    design: str = ""  # the choices (sizing, grid) and why, in words: FINDINGS.md repeats it
    scratch: str = ""  # checkpoints and logs; "" = runs/studies/<name>
    pretrain_from: str = ""  # another study folder whose pretraining runs (same names and settings) this one uses
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # pretraining seeds (= continual seeds)
    orders: list[int] = field(default_factory=lambda: [0])
    sizes: dict[str, list[str]] = field(default_factory=dict)  # size -> pretraining overrides; {} = one size
    pretrain_overrides: list[str] = field(default_factory=list)  # every pretraining run
    continual_overrides: list[str] = field(default_factory=list)  # every continual run
    topologies: dict[str, Topology] = field(default_factory=dict)
    arms: dict[str, Arm] = field(default_factory=dict)
    baseline: str = ""  # results run name of the dense baseline (report: crossover, paired verdicts)
    joint: str = ""  # results run name of the joint-training reference ("" = from its config)
    repretrain_tolerance: float = 0.02
    estimate: Estimate = field(default_factory=Estimate)
    analyze: Analyze = field(default_factory=Analyze)  # which continual runs get the analysis stages
    executor: ExecutorConfig = field(default_factory=lambda: ExecutorConfig(workers=1, threads=1))


def study_file(path: str | Path) -> Path:
    """STUDY.yaml itself, or the study folder holding study.yaml."""
    path = Path(path)
    path = path / "study.yaml" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no study file at {path}")
    return path


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    path = study_file(path)
    cfg = load_config(StudyConfig, path, overrides)
    cfg.name = cfg.name or path.resolve().parent.name
    cfg.scratch = cfg.scratch or f"runs/studies/{cfg.name}"
    if not cfg.topologies or not cfg.arms or not cfg.seeds:
        raise ConfigError(f"{path}: a study needs topologies:, arms: and seeds:")
    for name, arm in cfg.arms.items():
        if arm.topology not in cfg.topologies:
            raise ConfigError(f"{path}: arms.{name}.topology={arm.topology!r} is not one of the study's topologies "
                              f"({', '.join(cfg.topologies)})")
        if len(set(arm.lr)) != len(arm.lr) or any(lr <= 0 for lr in arm.lr):
            raise ConfigError(f"{path}: arms.{name}.lr={arm.lr}: distinct positive learning rates")
    for name, top in [*cfg.topologies.items(), *cfg.arms.items()]:
        if not top.config:
            raise ConfigError(f"{path}: {name}.config is required")
    check_analyze(cfg, path)
    if cfg.executor.kind != "local":
        raise ConfigError(f"{path}: executor.kind={cfg.executor.kind!r}: a study runs on local slots (its budget "
                          "is checked before each run starts); use topocl sweep for Slurm")
    return cfg


def check_analyze(cfg: StudyConfig, path: Path) -> None:
    """The `analyze:` key names existing arms, their grid points, known stages and graft modes."""
    an = cfg.analyze
    if not an.arms:
        return
    for name in an.arms:
        if name not in cfg.arms:
            raise ConfigError(f"{path}: analyze.arms: {name!r} is not one of the study's arms ({', '.join(cfg.arms)})")
        grid = cfg.arms[name].lr
        for lr in an.lr:
            if not any(math.isclose(lr, x) for x in grid):
                raise ConfigError(f"{path}: analyze.lr: {lr:g} is not a grid point of arm {name} "
                                  f"({', '.join(f'{x:g}' for x in grid) or 'no grid: the preset lr'})")
    if not an.stages or set(an.stages) - set(STAGES):
        raise ConfigError(f"{path}: analyze.stages={an.stages}: one or more of {', '.join(STAGES)}")
    if not an.graft_modes or set(an.graft_modes) - set(GRAFT_MODES):
        raise ConfigError(f"{path}: analyze.graft_modes={an.graft_modes}: one or more of {', '.join(GRAFT_MODES)}")


def analysed(cfg: StudyConfig, arm: str, lr: float | None) -> bool:
    """Whether the continual runs of this arm and grid point get the analysis stages."""
    an = cfg.analyze
    return arm in an.arms and (not an.lr or any(math.isclose(lr, x) for x in an.lr))


def analysis_missing(runs: list[dict], done: dict[str, dict]) -> list[str]:
    """Committed runs whose run.json lacks a stage their `analyze:` key asks for (committed before it did)."""
    return [r["name"] for r in runs if r.get("analyze") and r["name"] in done
            and not set(r["analyze"]["stages"]) <= set(done[r["name"]].get("analysis", {}).get("stages", []))]


def lr_label(lr: float) -> str:
    return f"lr{lr:g}"


def expand(cfg: StudyConfig, path: str | Path, check: bool = True) -> list[dict]:
    """Every run: {name, label, kind, arm, topology, size, seed, order, lr, unit, config, overrides, out_dir,
    needs, cwd, preset_exists}. With `check`, every run's config is loaded strictly (existing presets only)."""
    base = study_file(path).resolve().parent
    scratch = Path(cfg.scratch)
    sizes = list(cfg.sizes.items()) or [("", [])]
    runs = []
    for seed in cfg.seeds:  # pretraining-seed-major: whole replicates first
        for top_name, top in cfg.topologies.items():
            for size, size_ov in sizes:
                tag = f"-{size}" if size else ""
                pre = f"pre-{top_name}{tag}-s{seed}"
                unit = len({r["unit"] for r in runs})
                cfg_path = (base / top.config).resolve()
                runs.append({"name": pre, "label": pre, "kind": "pretrain", "arm": top_name, "topology": top_name,
                             "size": size, "seed": seed, "order": None, "lr": None, "unit": unit, "analyze": None,
                             "config": str(cfg_path), "preset_exists": cfg_path.is_file(), "needs": None,
                             "overrides": [*cfg.pretrain_overrides, *size_ov, *top.overrides,
                                           f"seed={seed}", f"out_dir={scratch / pre}"],
                             "out_dir": str(scratch / pre), "cwd": os.getcwd()})
                for arm_name, arm in cfg.arms.items():
                    if arm.topology != top_name:
                        continue
                    arm_path = (base / arm.config).resolve()
                    for lr in arm.lr or [None]:
                        label = arm_name + tag + (f"-{lr_label(lr)}" if lr is not None and len(arm.lr) > 1 else "")
                        for order in cfg.orders:
                            name = f"{label}-s{seed}-o{order}"
                            grid = [f"train.lr={lr!r}"] if lr is not None else []
                            an = analysed(cfg, arm_name, lr)
                            keep = ["analysis.keep_task_checkpoints=true"] if an else []
                            runs.append({"name": name, "label": label, "kind": "continual", "arm": arm_name,
                                         "topology": top_name, "size": size, "seed": seed, "order": order,
                                         "lr": lr, "unit": unit, "config": str(arm_path),
                                         "preset_exists": arm_path.is_file(), "needs": pre,
                                         "analyze": {"stages": list(cfg.analyze.stages),
                                                     "graft_modes": list(cfg.analyze.graft_modes)} if an else None,
                                         "overrides": [*cfg.continual_overrides, *arm.overrides, *grid, *keep,
                                                       f"seeds=[{seed}]", f"orders=[{order}]", f"run={label}",
                                                       f"init={scratch / pre}", f"out_dir={scratch / name}"],
                                         "out_dir": str(scratch / name), "cwd": os.getcwd()})
    if cfg.pretrain_from:
        share(cfg, base, runs)
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"run names collide: {sorted({n for n in names if names.count(n) > 1})}")
    labels = {r["label"] for r in runs}
    for key in ("baseline", "joint"):
        if getattr(cfg, key) and getattr(cfg, key) not in labels:
            raise ConfigError(f"{key}={getattr(cfg, key)!r} is not a run name of this study "
                              f"({', '.join(sorted(labels))})")
    if check:
        from topocl.continual import ContinualConfig

        for r in runs:
            if r["preset_exists"]:
                load_config(PretrainConfig if r["kind"] == "pretrain" else ContinualConfig, r["config"],
                            r["overrides"])
    return runs


def share(cfg: StudyConfig, base: Path, runs: list[dict]) -> None:
    """Point this study's pretraining runs (and the continual runs' init) at the `pretrain_from` study's runs of
    the same name, which must have the same preset and overrides (seed included; out_dir aside). The other
    study is read with this study's pretrain_overrides (so a command-line data.corpus= reaches both)."""
    other_file = study_file(base / cfg.pretrain_from)
    other = load_study(other_file)
    other.pretrain_overrides = list(cfg.pretrain_overrides)
    theirs = {r["name"]: r for r in expand(other, other_file, check=False)}
    moved = {}
    for r in runs:
        if r["kind"] != "pretrain":
            continue
        t = theirs.get(r["name"])
        mine_ov, their_ov = ([o for o in x["overrides"] if not o.startswith("out_dir=")] for x in (r, t or r))
        if t is None or t["config"] != r["config"] or mine_ov != their_ov:
            raise ConfigError(f"pretrain_from={cfg.pretrain_from}: {r['name']} is not a pretraining run of that "
                              "study with the same preset and overrides" + ("" if t is None else
                                                                            f" ({their_ov} vs {mine_ov})"))
        moved[r["name"]] = t["out_dir"]
        r.update(out_dir=t["out_dir"], overrides=t["overrides"], home=str(other_file.resolve().parent))
    for r in runs:
        if r["needs"] in moved:
            r["overrides"] = [f"init={moved[r['needs']]}" if o.startswith("init=") else o for o in r["overrides"]]


def missing_presets(runs: list[dict]) -> dict[str, list[str]]:
    """Preset file -> the arms/topologies that need it, for presets that do not exist."""
    out: dict[str, list[str]] = {}
    for r in runs:
        if not r["preset_exists"] and r["arm"] not in out.setdefault(os.path.relpath(r["config"]), []):
            out[os.path.relpath(r["config"])].append(r["arm"])
    return out


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise ConfigError(f"--shard {text!r}: use i/n with 0 <= i < n (e.g. 0/2 and 1/2)")
    return int(m[1]), int(m[2])


def shard_units(runs: list[dict], i: int, n: int) -> set[int]:
    """The units of shard i of n: units in study order, each to the shard with the fewest runs so far (ties: the
    lowest index). Depends only on the study file, so shards are disjoint and together cover every unit."""
    sizes: dict[int, int] = {}
    for r in runs:
        sizes[r["unit"]] = sizes.get(r["unit"], 0) + 1
    load = [0] * n
    mine = set()
    for unit, size in sizes.items():
        k = min(range(n), key=lambda s: (load[s], s))
        load[k] += size
        if k == i:
            mine.add(unit)
    return mine


def parse_budget(text: str) -> float:
    """'90m', '2h', '1h30m', '45s' -> seconds."""
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text.strip())
    if not text.strip() or not m:
        raise ConfigError(f"--budget {text!r}: give a duration such as 90m, 2h, 1h30m or 600s")
    h, mins, s = (float(x) if x else 0.0 for x in m.groups())
    return 3600 * h + 60 * mins + s


# ----------------------------------------------------------------------------- state of the study


def committed_dir(path: str | Path, run: dict) -> Path:
    """studies/<name>/runs/<run> (a shared pretraining run: in the study it comes from)."""
    return Path(run.get("home") or study_file(path).resolve().parent) / "runs" / run["name"]


def records(path: str | Path, runs: list[dict]) -> dict[str, dict]:
    """Run name -> its committed run.json, for the finished runs."""
    out = {}
    for r in runs:
        f = committed_dir(path, r) / RECORD
        if f.is_file():
            out[r["name"]] = json.loads(f.read_text())
    return out


class Estimator:
    """Expected wall / CPU seconds of a run: this session's runs of the same group, else the committed ones of
    the group, else of the same kind, else the study file's measured estimate (0 when it has none)."""

    def __init__(self, cfg: StudyConfig, done: dict[str, dict]):
        self.cfg, self.done, self.session = cfg, dict(done), {}

    @staticmethod
    def group(r: dict) -> tuple:
        """Runs that cost alike: kind, arm, size, and whether the analysis stages run after it."""
        return (r["kind"], r["arm"], r["size"], *(["analysed"] if r.get("analyze") else []))

    def add(self, r: dict, rec: dict) -> None:
        self.session[r["name"]] = rec

    def __call__(self, r: dict, key: str = "wall_s") -> float:
        for pool in (self.session, self.done):
            same = [x[key] for x in pool.values() if tuple(x["group"]) == self.group(r)]
            if same:
                return sum(same) / len(same)
        kind = [x[key] for x in {**self.done, **self.session}.values() if x["kind"] == r["kind"]]
        if kind:
            return sum(kind) / len(kind)
        return getattr(getattr(self.cfg.estimate, r["kind"]), key)


def hours(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 360 else f"{s / 60:.1f} min"


def status_line(cfg: StudyConfig, runs: list[dict], done: dict[str, dict], est: Estimator) -> str:
    """One line: runs done / total (pretraining, continual), CPU time spent, estimated remaining."""
    n = {k: sum(r["kind"] == k for r in runs) for k in ("pretrain", "continual")}
    d = {k: sum(r["kind"] == k and r["name"] in done for r in runs) for k in n}
    cpu = sum(x["cpu_s"] for x in done.values())
    left = [r for r in runs if r["name"] not in done]
    rem_cpu = sum(est(r, "cpu_s") for r in left)
    rem_wall = sum(est(r, "wall_s") for r in left) / max(1, cfg.executor.workers)
    stale = analysis_missing(runs, done)
    return (f"study {cfg.name}: {len(done)}/{len(runs)} runs done (pretraining {d['pretrain']}/{n['pretrain']}, "
            f"continual {d['continual']}/{n['continual']}), CPU time {hours(cpu)} spent, est. remaining "
            f"{hours(rem_cpu)} CPU (~{hours(rem_wall)} wall on {max(1, cfg.executor.workers)} worker(s))"
            + (f"; analysis missing: {len(stale)} committed run(s) without the analysis `analyze:` asks for "
               f"({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}; the next `topocl study` runs them "
               "again)" if stale else ""))


def print_expansion(cfg: StudyConfig, path: str | Path, runs: list[dict], shard: tuple[int, int]) -> int:
    done = records(path, runs)
    units = shard_units(runs, *shard)
    mine = [r for r in runs if r["unit"] in units]
    print(f"study {cfg.name}: {len(runs)} runs ({len(mine)} in shard {shard[0]}/{shard[1]}), scratch {cfg.scratch}")
    for r in mine:
        state = "done" if r["name"] in done else ("scratch" if Path(r["out_dir"]).exists() else "todo")
        flag = "" if r["preset_exists"] else "  MISSING PRESET"
        after = f"  [after {r['needs']}]" if r["needs"] else ""
        after += f"  [then analyze {','.join(r['analyze']['stages'])}]" if r.get("analyze") else ""
        print(f"  {r['name']:<34} {state:<7} topocl {r['kind']} {os.path.relpath(r['config'])} "
              f"{' '.join(r['overrides'])}{after}{flag}")
    print(status_line(cfg, runs, done, Estimator(cfg, done)))
    missing = missing_presets(runs)
    for p, arms in missing.items():
        print(f"missing preset: {p} (needed by {', '.join(arms)}); the study cannot start until it exists",
              file=sys.stderr)
    return 1 if missing else 0
