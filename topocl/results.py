"""Run artifacts -> validated rows -> accuracy matrices -> named metrics. `topocl metrics RESULTS [...]`.

results.jsonl: one JSON object per line with exactly these keys (written by `topocl continual`):
    run, seed, order   arm name (str), seed (int), task order (int)
    after_task         -1 = before continual training, j = after task j (0-based, training order);
                       evaluations inside task j+1 keep after_task = j and have a larger step
    step               optimizer steps taken in this (seed, order) stream so far (>= 0)
    eval_task          training-order position of the task whose probes these are; always -1 for kind base
    kind               retain | update | base
    metric             acc (candidate accuracy) | em | nll | bpb (held-out base corpus, kind base) | ...
    value              number (NaN/inf allowed: a diverged model is a result)
A (run, seed, order, after_task, step, eval_task, kind, metric) key may occur only once.

cost.json (one per run directory): either one cost entry, or the runner's form {"runs": [entry with
seed and order, ...], plus the entries' numeric means}. An entry has COST_FIELDS (and optionally
trainable_by_role: {role: int}); the report averages the entries itself.

`topocl metrics` prints {run: {kind: {metric: {name: value}}}} (plus {run: {"cost": ...}} for run
directories with a cost.json); see `summarize` for the names. No torch here: this only reads artifacts.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import yaml

from topocl import metrics as M

KEYS = {"run": str, "seed": int, "order": int, "after_task": int, "step": int, "eval_task": int, "kind": str,
        "metric": str, "value": float}
KINDS = ("retain", "update", "base")
SCORES = ("acc", "em")  # higher-is-better task scores that the matrix metrics are computed on
COST_FIELDS = {"trainable_params": int, "optimizer_state_bytes": int, "peak_memory_bytes": int,
               "step_time_s": float, "tokens": int, "wall_s": float, "device": str}
COST_OPTIONAL = {"epochs_per_row": float}  # continual runs since issue 13 (passes over each task's rows)


class ResultsError(ValueError):
    pass


def _typed(v: object, tp: type) -> bool:
    if isinstance(v, bool):
        return False
    return isinstance(v, int | float) if tp is float else isinstance(v, tp)


def validate_row(obj: object, where: str) -> dict:
    """One results.jsonl object, strictly: exact keys, types, kinds, and eval_task -1 exactly for base."""
    if not isinstance(obj, dict):
        raise ResultsError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing, extra = set(KEYS) - set(obj), set(obj) - set(KEYS)
    if missing or extra:
        raise ResultsError(f"{where}: keys must be exactly {sorted(KEYS)}; missing {sorted(missing)}, "
                           f"unexpected {sorted(extra)}")
    for k, tp in KEYS.items():
        if not _typed(obj[k], tp):
            raise ResultsError(f"{where}: field '{k}' must be {tp.__name__}, got {obj[k]!r}")
    for k in ("run", "metric"):
        if not obj[k]:
            raise ResultsError(f"{where}: field '{k}' is empty")
    if obj["kind"] not in KINDS:
        raise ResultsError(f"{where}: field 'kind' is {obj['kind']!r}, not one of {KINDS}")
    if obj["after_task"] < -1 or obj["step"] < 0:
        raise ResultsError(f"{where}: after_task must be >= -1 and step >= 0, got {obj['after_task']}, {obj['step']}")
    if (obj["kind"] == "base") != (obj["eval_task"] == -1) or obj["eval_task"] < -1:
        raise ResultsError(f"{where}: field 'eval_task' must be -1 for kind base and >= 0 for task probes, "
                           f"got {obj['eval_task']} with kind {obj['kind']!r}")
    return {**obj, "value": float(obj["value"])}


def results_path(path: str | Path) -> Path:
    path = Path(path)
    return path / "results.jsonl" if path.is_dir() else path


def load_rows(*paths: str | Path) -> list[dict]:
    """Validated rows of results.jsonl files (or run directories); errors name the file and line."""
    rows, seen = [], {}
    for path in map(results_path, paths):
        if not path.is_file():
            raise ResultsError(f"no results file at {path}")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ResultsError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            row = validate_row(obj, f"{path}:{n}")
            key = tuple(row[k] for k in KEYS if k != "value")
            if key in seen:
                raise ResultsError(f"{path}:{n}: duplicate of {seen[key]} (same run, seed, order, after_task, "
                                   "step, eval_task, kind and metric)")
            seen[key] = f"{path}:{n}"
            rows.append(row)
    return rows


def _cost_entry(obj: object, where: str, extra: dict[str, type]) -> dict:
    if not isinstance(obj, dict):
        raise ResultsError(f"{where}: a cost entry must be a JSON object")
    need = {**COST_FIELDS, **extra}
    missing, unknown = set(need) - set(obj), set(obj) - set(need) - {"trainable_by_role", *COST_OPTIONAL}
    if missing or unknown:
        raise ResultsError(f"{where}: cost entry missing {sorted(missing)}, unexpected {sorted(unknown)}")
    for k, tp in need.items():
        if not _typed(obj[k], tp) or (tp is not str and obj[k] < 0):
            raise ResultsError(f"{where}: field '{k}' must be a non-negative {tp.__name__}, got {obj[k]!r}")
    roles = obj.get("trainable_by_role", {})
    if not isinstance(roles, dict) or not all(_typed(v, int) for v in roles.values()):
        raise ResultsError(f"{where}: 'trainable_by_role' must map role names to ints")
    return obj


def load_cost(path: str | Path) -> dict:
    """A validated cost.json as {"entries": [...], **means of the numeric fields, "device": "a, b"}."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(obj, dict) and "runs" in obj:
        if not isinstance(obj["runs"], list) or not obj["runs"]:
            raise ResultsError(f"{path}: 'runs' must be a non-empty list of cost entries")
        entries = [_cost_entry(e, f"{path}: runs[{i}]", {"seed": int, "order": int})
                   for i, e in enumerate(obj["runs"])]
        for k, v in obj.items():  # the runner also writes the numeric means at top level: allowed, recomputed
            tp = str if k == "device" else float
            if k != "runs" and (k not in {*COST_FIELDS, *COST_OPTIONAL, "seed", "order"} or not _typed(v, tp)):
                raise ResultsError(f"{path}: unexpected top-level field '{k}' = {v!r}")
    else:
        entries = [_cost_entry(obj, str(path), {})]
    out: dict = {"entries": entries, "device": ", ".join(sorted({e["device"] for e in entries}))}
    for k, tp in COST_FIELDS.items():
        if tp is not str:
            out[k] = sum(e[k] for e in entries) / len(entries)
    return out


def read_run_dir(path: str | Path) -> dict:
    """Everything a report may read from one run directory: rows, run names, config, cost, meta."""
    path = Path(path)
    if not path.is_dir():
        raise ResultsError(f"{path} is not a run directory")
    rows = load_rows(path)
    config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").is_file() else {}
    cost = load_cost(path / "cost.json") if (path / "cost.json").is_file() else None
    return {"dir": path, "rows": rows, "runs": sorted({r["run"] for r in rows}), "config": config or {},
            "meta": meta, "cost": cost}


# ----------------------------------------------------------------------------- rows -> matrices and curves


def boundary_rows(rows: list[dict]) -> list[dict]:
    """Keep, per (run, seed, order, after_task), only the evaluation at the task boundary (smallest step)."""
    first: dict[tuple, int] = {}
    for r in rows:
        key = (r["run"], r["seed"], r["order"], r["after_task"])
        first[key] = min(first.get(key, r["step"]), r["step"])
    return [r for r in rows if r["step"] == first[(r["run"], r["seed"], r["order"], r["after_task"])]]


def matrices(rows: list[dict], kind: str = "retain", metric: str = "acc") -> dict[tuple, list[list[float]]]:
    """(run, seed, order) -> R with one row per evaluated boundary (row 0 = after_task -1) of T task scores.

    T counts the tasks with probes of any kind in that stream; absent cells (a task without probes of this
    kind, a missing evaluation) are NaN. A finished stream has T + 1 rows."""
    cells: dict[tuple, dict[tuple[int, int], float]] = defaultdict(dict)
    for r in boundary_rows(rows):
        if r["kind"] == kind and r["metric"] == metric:
            cells[(r["run"], r["seed"], r["order"])][(r["after_task"], r["eval_task"])] = r["value"]
    shape = progress(rows)
    return {key: [[c.get((i - 1, j), math.nan) for j in range(shape[key][1])] for i in range(shape[key][0] + 1)]
            for key, c in sorted(cells.items())}


def progress(rows: list[dict]) -> dict[tuple, tuple[int, int]]:
    """(run, seed, order) -> (tasks trained so far, tasks in the stream)."""
    out: dict[tuple, tuple[int, int]] = {}
    for r in rows:
        key = (r["run"], r["seed"], r["order"])
        done, t = out.get(key, (0, 0))
        out[key] = (max(done, r["after_task"] + 1), max(t, r["eval_task"] + 1))
    return out


def finished(R: list[list[float]]) -> bool:
    """All tasks trained (T + 1 rows)."""
    return len(R) == len(R[0]) + 1


def complete(R: list[list[float]]) -> bool:
    """Finished and every entry present."""
    return finished(R) and not any(math.isnan(v) for row in R for v in row)


def base_curves(rows: list[dict], metric: str) -> dict[tuple, list[float]]:
    """(run, seed, order) -> base-probe metric at after_task -1, 0, 1, ... (boundary evaluations)."""
    cells: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in boundary_rows(rows):
        if r["kind"] == "base" and r["metric"] == metric:
            cells[(r["run"], r["seed"], r["order"])][r["after_task"]] = r["value"]
    return {k: [v.get(i, math.nan) for i in range(-1, max(v) + 1)] for k, v in sorted(cells.items())}


# ----------------------------------------------------------------------------- summary


def stats(values: list[float]) -> dict:
    """Mean and 95% percentile-bootstrap CI (fixed seed) of per-(seed, order) values, kept in that order."""
    mean, lo, hi = M.bootstrap_ci(values)
    return {"mean": mean, "ci_low": lo, "ci_high": hi, "n": len(values), "values": values}


def _pointwise_mean(curves: list[list[float]]) -> list[float]:
    n = min(len(c) for c in curves)
    return [M.nanmean(c[i] for c in curves) for i in range(n)]


def _block(mats: list[list[list[float]]]) -> dict:
    block = {name: stats([fn(R) for R in mats]) for name, fn in M.SCALARS.items()}
    delays = [M.retention_by_delay(R) for R in mats]
    block["retention_by_delay"] = {d: stats([x[d] for x in delays]) for d in delays[0]}
    block["forgetting_trajectory"] = _pointwise_mean([M.forgetting_trajectory(R) for R in mats])
    curves = [M.avg_acc_curve(R) for R in mats]
    block["avg_acc_curve"] = _pointwise_mean(curves)
    block["avg_acc_curve_ci"] = [list(M.bootstrap_ci([c[k] for c in curves])[1:]) for k in range(len(curves[0]))]
    return block


def _joint_for(joint: dict[tuple, list], seed: int, order: int) -> list[list[float]] | None:
    """The joint reference with the same seed and order, else the mean over seeds with the same order."""
    if (seed, order) in joint:
        return joint[(seed, order)]
    same = [R for (_, o), R in joint.items() if o == order]
    if not same:
        return None
    return [[M.nanmean(R[i][j] for R in same) for j in range(len(same[0][0]))] for i in range(len(same[0]))]


def summarize(rows: list[dict], joint_run: str | None = None, baseline_run: str | None = None) -> dict:
    """Every named metric per run: {run: {"n": ..., kind: {metric: {name: ...}}}}.

    retain/update, per metric in SCORES, over finished streams (retain: complete R only):
        every name in metrics.SCALARS, retention_by_delay {d: ...}  -> stats (mean, 95% CI, per-stream values)
        avg_acc_curve (A_k, k = 1..T) with avg_acc_curve_ci, forgetting_trajectory (F_k, k = 2..T): pointwise means
        intransigence (retain, vs `joint_run` with the same order): stats of mean_k I_k
        crossover (retain acc, vs `baseline_run`): after_task index from which mean A_k stays above the baseline's
      For update probes `acc` is the stale-answer rate (old answer still preferred after the overwrite);
      their forgetting_* values are overwrite rates, so higher means updated.
    base, per metric present (acc, em, nll, bpb): base_ability {curve (mean per after_task -1, 0, ...),
        initial, final, change (stats)}.
    Stats "values" are ordered by (seed, order)."""
    out: dict = {}
    joint = {(s, o): R for (r, s, o), R in matrices(rows, "retain", "acc").items() if r == joint_run and finished(R)}
    for run in sorted({r["run"] for r in rows}):
        mine = [r for r in rows if r["run"] == run]
        prog = progress(mine)
        s = out[run] = {"n": {"streams": len(prog), "finished": sum(d == t for d, t in prog.values()),
                              "tasks": max(t for _, t in prog.values())}}
        for kind in ("retain", "update"):
            for metric in SCORES:
                Rs = matrices(mine, kind, metric)
                keep = [k for k, R in Rs.items() if (complete(R) if kind == "retain" else finished(R))]
                if not keep or len({len(Rs[k]) for k in keep}) > 1:
                    continue
                block = s.setdefault(kind, {})[metric] = _block([Rs[k] for k in keep])
                if kind != "retain" or metric != "acc":
                    continue
                if joint and run != joint_run:
                    pairs = [(Rs[k], _joint_for(joint, k[1], k[2])) for k in keep]
                    vals = [M.nanmean(M.intransigence(R, J)) for R, J in pairs if J is not None and len(J) == len(R)]
                    if vals:
                        block["intransigence"] = stats(vals)
        for metric in sorted({r["metric"] for r in mine if r["kind"] == "base"}):
            curves = list(base_curves(mine, metric).values())
            n = min(len(c) for c in curves)
            parts = [M.base_ability(c[:n]) for c in curves]
            s.setdefault("base", {})[metric] = {"base_ability": {
                "curve": _pointwise_mean(curves), **{k: stats([p[k] for p in parts]) for k in parts[0]}}}
    base_curve = out.get(baseline_run, {}).get("retain", {}).get("acc", {}).get("avg_acc_curve")
    for run, s in out.items():
        block = s.get("retain", {}).get("acc")
        if base_curve and block and run not in (baseline_run, joint_run):
            if len(block["avg_acc_curve"]) == len(base_curve):
                block["crossover"] = M.crossover(block["avg_acc_curve"], base_curve)
    return out


def reference_runs(run_dirs: list[dict]) -> dict[str, str]:
    """Run name -> reference kind (joint | single) for run directories whose config.yaml says so."""
    return {name: d["config"]["reference"] for d in run_dirs if d["config"].get("reference", "none") != "none"
            for name in d["runs"]}


def json_safe(x):
    """NaN/inf -> None, recursively, so the output is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="topocl metrics", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="results.jsonl files or run directories")
    ap.add_argument("--joint", help="run name of the joint-training reference (default: a run directory whose "
                                    "config.yaml has reference: joint)")
    ap.add_argument("--baseline", help="run name of the dense baseline (for crossover)")
    args = ap.parse_args(argv)
    dirs = [read_run_dir(p) for p in args.results if Path(p).is_dir()]
    rows = load_rows(*args.results)
    joint = args.joint or next((n for n, ref in reference_runs(dirs).items() if ref == "joint"), None)
    out = summarize(rows, joint, args.baseline)
    for d in dirs:
        for name in d["runs"]:
            if d["cost"] and name in out:
                out[name]["cost"] = d["cost"]
    print(json.dumps(json_safe(out), indent=1))
    return 0
