"""`topocl capacity CONFIG [k=v ...] [--report-only]`: the compression–writability capacity study.

For every model (a single activation-sparsity regime: `ffn=kwta` at ρ; or a two-system model: `dual`, `moe`,
a sparse attention topology) × pretraining seed: pretrain (topocl/pretrain.py), measure FFN activation
sparsity and active-set overlap between tasks (topocl/analysis), then for every depth d run the `capacity`
stream of n_max = max(n_tasks) tasks × d facts with the continual runner (topocl/continual.py). The stream is
prefix-consistent, so the evaluation after task n - 1 of that one run is the grid cell (n, d):

    final(n, d)    = mean_{j<n} R[n][j]        accuracy on all n·d facts after the n-th task (R row 0 = init)
    learned(n, d)  = mean_{j<n} R[j+1][j]      accuracy on each task right after learning it
    retained(n, d) = (final - c) / (1 - c)     chance-corrected (c = 1 / candidates): the share of the n·d
                                               taught facts still held at the end (0 = chance, 1 = all)

With `stream_options.warmup_tasks` = w, w format-teaching tasks come first and the cells read past them.
Training steps per task scale with d (`steps_per_fact`), so every fact gets the same exposure at every depth.
Capacity (topocl/capacity_report.py) = the largest n·d whose retained fraction is >= `threshold`.

    out_dir   (scratch: runs/...)  pretrain/<model>-s<seed>/  continual/<model>-s<seed>-d<d>/
    study_dir (committed, small)   config.yaml  cells.jsonl  matrices.jsonl  activations.jsonl  cost.json
                                   report/ (report.md, PNGs, capacity.json)   FINDINGS.md (written by hand)

Resumable: a finished pretraining (summary.json) or stream (DONE.json) is skipped, an unfinished one resumes;
study rows are keyed by (model, seed, d) and replaced, never duplicated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from topocl.checkpoint import latest_checkpoint, load_checkpoint, write_json_atomic
from topocl.config import ConfigError, PretrainConfig, load_config, save_config, to_dict
from topocl.results import load_rows, matrices


@dataclass
class ModelArm:
    overrides: list[str] = field(default_factory=list)  # pretrain overrides, e.g. [model.ffn=kwta, model.kwta.rho=0.1]
    system: str = "single"  # single (one sparsity regime) | two (two subsystems of different sparsity)
    rho: float = 1.0  # single: its active fraction (the x of capacity vs ρ)


@dataclass
class CapacityStudyConfig:
    name: str = ""  # "" = the config file's stem
    out_dir: str = ""  # scratch; "" = runs/capacity/<name>
    study_dir: str = ""  # committed artifacts; "" = studies/capacity-<name>
    pretrain: str = ""  # pretrain config, relative to this file
    pretrain_overrides: list[str] = field(default_factory=list)
    continual: str = ""  # continual config (train/strategy settings), relative to this file
    continual_overrides: list[str] = field(default_factory=list)
    models: dict[str, ModelArm] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # independent pretraining seeds
    n_tasks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    depths: list[int] = field(default_factory=lambda: [4, 8, 16])  # d, facts per task
    stream_seed: int = 0  # the same facts for every model and seed
    stream_options: dict[str, Any] = field(default_factory=dict)  # mentions, candidates, sentences_per_text
    steps_per_fact: float = 2.0  # train.steps per task = max(min_steps, ceil(steps_per_fact · d))
    min_steps: int = 4
    threshold: float = 0.5  # capacity = largest n·d with retained >= threshold
    overlap_rel: float = 0.1  # active unit: |h| > overlap_rel · RMS(h)
    device: str = "auto"
    estimate: str = ""  # measured cost and the estimated time of the whole grid (written by hand)


def load_study(path: str | Path, overrides: list[str] | None = None) -> CapacityStudyConfig:
    cfg = load_config(CapacityStudyConfig, path, overrides)
    cfg.name = cfg.name or Path(path).stem
    cfg.out_dir = cfg.out_dir or f"runs/capacity/{cfg.name}"
    cfg.study_dir = cfg.study_dir or f"studies/capacity-{cfg.name}"
    base = Path(path).resolve().parent
    for key in ("pretrain", "continual"):
        if not getattr(cfg, key):
            raise ConfigError(f"{path}: {key}: (a {key} config, relative to this file) is required")
        # relative to the working directory (the repository root): the saved study config then names the same
        # files in every checkout
        setattr(cfg, key, os.path.relpath((base / getattr(cfg, key)).resolve()))
    if not cfg.models:
        raise ConfigError(f"{path}: models: needs at least one model")
    for name, arm in cfg.models.items():
        if arm.system not in ("single", "two"):
            raise ConfigError(f"{path}: models.{name}.system={arm.system!r}: use single | two")
    if sorted(set(cfg.n_tasks)) != cfg.n_tasks or sorted(set(cfg.depths)) != cfg.depths or not cfg.seeds:
        raise ConfigError(f"{path}: n_tasks and depths must be ascending without repeats, seeds non-empty")
    return cfg


def task_steps(cfg: CapacityStudyConfig, d: int) -> int:
    return max(cfg.min_steps, math.ceil(cfg.steps_per_fact * d))


def stream_options(cfg: CapacityStudyConfig, n: int, d: int) -> dict:
    return {**cfg.stream_options, "n_tasks": n, "facts_per_task": d, "seed": cfg.stream_seed}


def chance(cfg: CapacityStudyConfig) -> float:
    from topocl.tasks.capacity import CapacityConfig

    return 1.0 / int(cfg.stream_options.get("candidates", CapacityConfig.candidates))


def cells_from_matrix(R: list[list[float]], n_tasks: list[int], c: float, warmup: int = 0) -> list[dict]:
    """Grid cells (n, final, learned, retained, learned_cc) of one stream's R ((T + 1) x T, row 0 = init), whose
    first `warmup` tasks are not measured: cell n reads row warmup + n, columns warmup .. warmup + n - 1."""
    out = []
    for n in n_tasks:
        row = warmup + n
        if row >= len(R) or any(math.isnan(R[row][warmup + j]) for j in range(n)):
            continue
        final = sum(R[row][warmup + j] for j in range(n)) / n
        learned = sum(R[warmup + j + 1][warmup + j] for j in range(n)) / n
        out.append({"n": n, "final": final, "learned": learned, "retained": (final - c) / (1 - c),
                    "learned_cc": (learned - c) / (1 - c)})
    return out


def warmup(cfg: CapacityStudyConfig) -> int:
    return int(cfg.stream_options.get("warmup_tasks", 0))


# ----------------------------------------------------------------------------- stages


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _upsert(path: Path, rows: list[dict], key: tuple[str, ...]) -> None:
    """Replace the rows of `path` whose `key` fields match a new row's, append the rest (atomic rewrite)."""
    new = {tuple(r[k] for k in key) for r in rows}
    kept = [r for r in _read_jsonl(path) if tuple(r.get(k) for k in key) not in new]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept + rows))
    tmp.replace(path)


def _cost(study: Path, row: dict) -> None:
    path = study / "cost.json"
    old = json.loads(path.read_text()) if path.is_file() else {"stages": []}
    key = (row["model"], row["seed"], row["stage"], row.get("d"))
    old["stages"] = [r for r in old["stages"] if (r["model"], r["seed"], r["stage"], r.get("d")) != key] + [row]
    write_json_atomic(path, old)


def pretrain_model(cfg: CapacityStudyConfig, name: str, arm: ModelArm, seed: int, out: Path) -> tuple[Path, float]:
    """(run directory, wall seconds spent now; 0 when it was already done)."""
    from topocl.pretrain import pretrain

    run = out / "pretrain" / f"{name}-s{seed}"
    if (run / "summary.json").is_file():
        return run, 0.0
    pcfg = load_config(PretrainConfig, cfg.pretrain, [*cfg.pretrain_overrides, *arm.overrides, f"seed={seed}",
                                                      f"out_dir={run}", f"device={cfg.device}"])
    pcfg.resume = latest_checkpoint(run / "checkpoints") is not None
    t0 = time.perf_counter()
    pretrain(pcfg)
    return run, time.perf_counter() - t0


def continual_stream(cfg: CapacityStudyConfig, name: str, seed: int, d: int, init: Path, out: Path
                     ) -> tuple[Path, float]:
    from topocl.continual import ContinualConfig, run_continual

    run = out / "continual" / f"{name}-s{seed}-d{d}-n{cfg.n_tasks[-1]}"  # a longer grid is a new stream
    if (run / "DONE.json").is_file():
        return run, 0.0
    ccfg = load_config(ContinualConfig, cfg.continual, [*cfg.continual_overrides, f"init={init}", f"out_dir={run}",
                                                        f"run={name}", f"seeds=[{seed}]", "orders=[0]",
                                                        "stream=capacity", f"train.steps={task_steps(cfg, d)}",
                                                        f"device={cfg.device}"])
    ccfg.stream_options = stream_options(cfg, cfg.n_tasks[-1], d)
    ccfg.resume = (run / "results.jsonl").is_file()
    t0 = time.perf_counter()
    run_continual(ccfg)
    wall = time.perf_counter() - t0
    write_json_atomic(run / "DONE.json", {"wall_s": wall})
    return run, wall


def activations(cfg: CapacityStudyConfig, init: Path, final: Path | None) -> list[dict]:
    """FFN sparsity (topocl/analysis/sparsity.py) and active-set overlap (topocl/analysis/overlap.py) of the
    pretrained model (stage "pre") and, when given, of the end of the deepest stream (stage "post")."""
    from topocl.analysis.overlap import task_overlap
    from topocl.analysis.sparsity import activation_stats
    from topocl.continual import task_rows
    from topocl.pretrain import load_run
    from topocl.tasks.streams import build_stream
    from topocl.train import resolve_device

    device = resolve_device(cfg.device)
    model, tok, pcfg = load_run(init, device)
    tasks = build_stream("capacity", stream_options(cfg, cfg.n_tasks[-1], cfg.depths[-1]))[warmup(cfg):]
    ids = torch.cat([task_rows(t, tok, pcfg.data.seq_len)[:2] for t in tasks])[:, :-1].to(device)  # [R, T]
    rows = []
    for stage in ("pre", "post"):
        if stage == "post":
            if final is None:
                break
            load_checkpoint(latest_checkpoint(final), model, restore_rng=False)
        stats = [r for r in activation_stats(model, ids, cfg.overlap_rel) if r["module"].endswith("down")]
        sparsity = {m: _mean([r["value"] for r in stats if r["measure"] == m])
                    for m in ("frac_near_zero", "effective_rank")}  # over the FFN `down` inputs of all layers
        rows.append({"stage": stage, "ffn_frac_near_zero": sparsity["frac_near_zero"],
                     "ffn_effective_rank": sparsity["effective_rank"],
                     **task_overlap(model, tok, tasks, device, cfg.overlap_rel)})
    return rows


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


GRID_KEYS = ("seeds", "models", "n_tasks", "depths", "estimate", "device", "name")  # may grow between launches


def check_study_config(cfg: CapacityStudyConfig, study: Path) -> None:
    """A study directory holds one design: a relaunch may add seeds, models, n and d (and a model already in it
    must keep its overrides), but any other setting that shapes a cell must be the one its rows were made with."""
    path = study / "config.yaml"
    if not path.is_file():
        return
    old, new = yaml.safe_load(path.read_text()), to_dict(cfg)
    diff = sorted(k for k in new if k not in GRID_KEYS and old.get(k) != new[k])
    diff += sorted(f"models.{m}" for m in set(old.get("models", {})) & set(new["models"])
                   if old["models"][m] != new["models"][m])
    if diff:
        raise ConfigError(f"{path} was made with other settings ({', '.join(diff)}); its rows would mix designs. "
                          "Use another study_dir= (and out_dir=) or the saved settings")


def run_study(cfg: CapacityStudyConfig) -> Path:
    out, study = Path(cfg.out_dir), Path(cfg.study_dir)
    check_study_config(cfg, study)
    study.mkdir(parents=True, exist_ok=True)
    path = study / "config.yaml"
    if path.is_file():  # keep the union of the grid (what the rows cover) in the saved config
        old = yaml.safe_load(path.read_text())
        cfg_saved = dataclasses.replace(cfg, seeds=sorted(set(old["seeds"]) | set(cfg.seeds)),
                                        n_tasks=sorted(set(old["n_tasks"]) | set(cfg.n_tasks)),
                                        depths=sorted(set(old["depths"]) | set(cfg.depths)),
                                        models={**{k: ModelArm(**v) for k, v in old["models"].items()},
                                                **cfg.models})
        save_config(cfg_saved, path)
    else:
        save_config(cfg, path)
    c = chance(cfg)
    for name, arm in cfg.models.items():
        for seed in cfg.seeds:
            ident = {"model": name, "seed": seed, "system": arm.system, "rho": arm.rho}
            init, wall = pretrain_model(cfg, name, arm, seed, out)
            if wall:
                _cost(study, {**ident, "stage": "pretrain", "wall_s": wall})
            meta = json.loads((init / "meta.json").read_text())
            last = None
            for d in cfg.depths:
                run, wall = continual_stream(cfg, name, seed, d, init, out)
                if wall:
                    _cost(study, {**ident, "stage": "continual", "d": d, "n": cfg.n_tasks[-1], "warmup": warmup(cfg),
                                  "steps_per_task": task_steps(cfg, d), "wall_s": wall})
                (R,) = matrices(load_rows(run / "results.jsonl")).values()
                key = {**ident, "d": d}
                _upsert(study / "matrices.jsonl", [{**key, "R": R}], ("model", "seed", "d"))
                _upsert(study / "cells.jsonl", [{**key, **cell, "load": cell["n"] * d,
                                                 "params": meta["params_total"]}
                                                for cell in cells_from_matrix(R, cfg.n_tasks, c, warmup(cfg))],
                        ("model", "seed", "d", "n"))
                last = run / f"seed{seed}-order0" / "checkpoints"
            done = {(r["model"], r["seed"], r["stage"]) for r in _read_jsonl(study / "activations.jsonl")}
            if (name, seed, "post") not in done:
                rows = [{**ident, **r} for r in activations(cfg, init, last)]
                _upsert(study / "activations.jsonl", rows, ("model", "seed", "stage"))
    return study


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="topocl capacity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="e.g. configs/capacity/tiny.yaml")
    ap.add_argument("overrides", nargs="*", help="study keys, e.g. seeds=[0] depths=[4,8]")
    ap.add_argument("--report-only", action="store_true", help="only (re)write the report from the artifacts")
    args = ap.parse_args(argv)
    cfg = load_study(args.config, args.overrides)
    from topocl.capacity_report import write_report

    study = Path(cfg.study_dir) if args.report_only else run_study(cfg)
    report = write_report(study)
    print(f"study directory: {study}  (report: {report})")
    return 0
