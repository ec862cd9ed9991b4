"""Run artifacts -> validated rows -> accuracy matrices -> named metrics. `topocl metrics RESULTS [...]`.

results.jsonl: one JSON object per line with exactly these keys (written by `topocl continual`):
    run, seed, order   arm name (str), seed (int), task order (int)
    after_task         -1 = before continual training, j = after task j (0-based, training order);
                       evaluations inside task j+1 keep after_task = j and have a larger step
    step               optimizer steps taken in this (seed, order) stream so far (>= 0)
    eval_task          training-order position of the task whose probes these are; always -1 for kind base
    kind               retain | update | base
    metric             acc (candidate accuracy) | em | nll | bpb (held-out base corpus, kind base) | ...
    value              number, or null for NaN/inf (a diverged model is a result; null reads back as NaN)
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
from topocl.jsonl import clean, iter_jsonl

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
    if obj["value"] is None:  # written for NaN/inf (strict JSON)
        obj = {**obj, "value": math.nan}
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
        for n, obj in iter_jsonl(path, error=ResultsError, objects=False):  # a torn last line: dropped, warned
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


def type_metric(probe_type: str) -> str:
    """The metric of one probe type's accuracy, as the evaluator names it: 'fact' -> 'acc:fact'."""
    return f"acc:{probe_type}"


def probe_type(metric: str) -> str | None:
    """The probe type of a probe-type metric ('acc:fact' -> 'fact'); None for any other metric."""
    return metric.split(":", 1)[1] if metric.startswith("acc:") else None


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


def stats(values: list[float], units: list | None = None) -> dict:
    """Mean and 95% Student-t CI (metrics.t_interval) of independent per-unit values, kept in that order
    (`units` names them). n counts the non-NaN values; with n < 2 the CI is NaN."""
    mean, lo, hi = M.t_interval(values)
    out = {"mean": mean, "ci_low": lo, "ci_high": hi, "n": sum(not math.isnan(v) for v in values), "values": values}
    if units is not None:
        out["units"] = units
    return out


def replicate_map(run_dirs: list[dict]) -> dict[tuple, int | str | None]:
    """(run, seed, order) -> replicate of every stream in the run directories: the pretraining seed of the
    model the stream started from (meta.json `replicate`, written by `topocl continual`); None when unknown."""
    return {(r["run"], r["seed"], r["order"]): d["meta"].get("replicate") for d in run_dirs for r in d["rows"]}


def unit_keys(streams: list[tuple[int, int]], reps: dict[tuple[int, int], object]) -> dict[tuple, object]:
    """(seed, order) -> its unit of replication. When any stream knows its replicate (pretraining seed), the
    unit is the replicate ("?" for streams that do not say) and the streams nested in it are averaged first;
    else every (seed, order) stream is a unit (they all continue one pretrained model)."""
    if any(reps.get(k) is not None for k in streams):
        return {k: reps.get(k) if reps.get(k) is not None else "?" for k in streams}
    return {k: k for k in streams}


def unit_label(streams: list[tuple[int, int]], reps: dict[tuple[int, int], object]) -> str:
    """What a CI over these streams is over, in words."""
    if not streams:
        return "no units"
    units = unit_keys(streams, reps)
    seeds, orders = len({s for s, _ in streams}), len({o for _, o in streams})
    nested = f"{seeds} continual seed{'s' * (seeds != 1)} × {orders} order{'s' * (orders != 1)}"
    if any(isinstance(u, tuple) for u in units.values()):
        return f"{len(streams)} streams ({nested}) of ONE pretrained model"
    per = sorted({list(units.values()).count(u) for u in set(units.values())})
    n = len(set(units.values()))
    k = "–".join(map(str, per)) if len(per) > 1 else str(per[0])
    return (f"{n} pretraining seed{'s' * (n != 1)} (replicates; the {k} stream{'s' * (per != [1])} of each "
            "averaged first)")


def by_unit(values: dict[tuple[int, int], float], reps: dict[tuple[int, int], object]) -> dict:
    """(seed, order) -> value  =>  unit -> mean of its streams' values (NaN-skipping), units sorted."""
    units = unit_keys(sorted(values), reps)
    groups: dict = defaultdict(list)
    for k, v in values.items():
        groups[units[k]].append(v)
    return {u: M.nanmean(groups[u]) for u in sorted(groups, key=str)}


def unit_stats(values: dict[tuple[int, int], float], reps: dict[tuple[int, int], object]) -> dict:
    """stats over units of per-stream values (streams nested in a replicate averaged first)."""
    u = by_unit(values, reps)
    return stats(list(u.values()), [list(k) if isinstance(k, tuple) else k for k in u])


def _pointwise_mean(curves: list[list[float]]) -> list[float]:
    n = min(len(c) for c in curves)
    return [M.nanmean(c[i] for c in curves) for i in range(n)]


def unit_curves(curves: dict[tuple[int, int], list[float]], reps: dict[tuple[int, int], object]) -> dict:
    """(seed, order) -> curve  =>  unit -> pointwise mean curve of its streams."""
    units = unit_keys(sorted(curves), reps)
    groups: dict = defaultdict(list)
    for k, c in curves.items():
        groups[units[k]].append(c)
    return {u: _pointwise_mean(groups[u]) for u in sorted(groups, key=str)}


def _block(mats: dict[tuple[int, int], list[list[float]]], reps: dict) -> dict:
    block = {name: unit_stats({k: fn(R) for k, R in mats.items()}, reps) for name, fn in M.SCALARS.items()}
    delays = {k: M.retention_by_delay(R) for k, R in mats.items()}
    first = next(iter(delays.values()))
    block["retention_by_delay"] = {d: unit_stats({k: x[d] for k, x in delays.items()}, reps) for d in first}
    block["forgetting_trajectory"] = _pointwise_mean(list(unit_curves(
        {k: M.forgetting_trajectory(R) for k, R in mats.items()}, reps).values()))
    curves = unit_curves({k: M.avg_acc_curve(R) for k, R in mats.items()}, reps)
    block["avg_acc_curve"] = _pointwise_mean(list(curves.values()))
    block["avg_acc_curve_ci"] = [list(M.t_interval([c[k] for c in curves.values()])[1:])
                                 for k in range(len(block["avg_acc_curve"]))]
    return block


TYPE_SCALARS = ("learning_acc", "acc", "forgetting_chaudhry")


def type_block(mats: dict[tuple[int, int], list[list[float]]], reps: dict) -> dict:
    """LA, final ACC, F (Chaudhry) and retention by delay of one probe type's matrices (metric `acc:TYPE`). A
    task that teaches nothing of the type is a NaN column, skipped by every metric (campaign: each world rule is
    taught in one session only); `tasks` counts the columns that have the type (per stream, the mean); delays
    no stream has are left out."""
    block = {name: unit_stats({k: M.SCALARS[name](R) for k, R in mats.items()}, reps) for name in TYPE_SCALARS}
    delays = {k: M.retention_by_delay(R) for k, R in mats.items()}
    rbd = {d: unit_stats({k: x[d] for k, x in delays.items()}, reps) for d in next(iter(delays.values()))}
    block["retention_by_delay"] = {d: st for d, st in rbd.items() if st["n"]}
    block["tasks"] = M.nanmean(sum(not math.isnan(v) for v in R[-1]) for R in mats.values())
    return block


def _joint_for(joint: dict[tuple, list], seed: int, order: int) -> list[list[float]] | None:
    """The joint reference with the same seed and order, else the mean over seeds with the same order."""
    if (seed, order) in joint:
        return joint[(seed, order)]
    same = [R for (_, o), R in joint.items() if o == order]
    if not same:
        return None
    return [[M.nanmean(R[i][j] for R in same) for j in range(len(same[0][0]))] for i in range(len(same[0]))]


def summarize(rows: list[dict], joint_run: str | None = None, baseline_run: str | None = None,
              replicates: dict[tuple, object] | None = None) -> dict:
    """Every named metric per run: {run: {"n": ..., kind: {metric: {name: ...}}}}.

    The unit of every CI is the replicate (`replicates`: (run, seed, order) -> pretraining seed, see
    replicate_map): the streams (continual seeds x orders) nested in one replicate are averaged first. Without
    replicates every (seed, order) stream is a unit, and n["unit"] says they continue ONE pretrained model.
    retain/update, per metric in SCORES, over finished streams (retain: complete R only):
        every name in metrics.SCALARS, retention_by_delay {d: ...}  -> stats (mean, 95% t-CI, per-unit values)
        avg_acc_curve (A_k, k = 1..T) with avg_acc_curve_ci, forgetting_trajectory (F_k, k = 2..T): pointwise means
        intransigence (retain, vs `joint_run` with the same order): stats of mean_k I_k
        crossover (retain acc, vs `baseline_run`): after_task index from which mean A_k stays above the
        baseline's, and crossover_ci: its 95% bootstrap interval over units ([low, high], None = never)
      For update probes `acc` is the stale-answer rate (old answer still preferred after the overwrite);
      their forgetting_* values are overwrite rates, so higher means updated.
    by_type, per probe type a stream tags (metric `acc:TYPE`, e.g. campaign fact / rule; retain probes):
        type_block (learning_acc, acc, forgetting_chaudhry, retention_by_delay, tasks).
    base, per metric present (acc, em, nll, bpb): base_ability {curve (mean per after_task -1, 0, ...),
        initial, final, change (stats)}.
    Stats "values" are ordered by unit (listed in "units")."""
    out: dict = {}
    replicates = replicates or {}
    joint = {(s, o): R for (r, s, o), R in matrices(rows, "retain", "acc").items() if r == joint_run and finished(R)}
    curves: dict[str, dict] = {}
    for run in sorted({r["run"] for r in rows}):
        mine = [r for r in rows if r["run"] == run]
        prog = progress(mine)
        reps = {(s, o): replicates.get((run, s, o)) for _, s, o in prog}
        done = [(s, o) for (_, s, o), (d, t) in sorted(prog.items()) if d == t]
        s = out[run] = {"n": {"streams": len(prog), "finished": len(done), "tasks": max(t for _, t in prog.values()),
                              "units": len(set(unit_keys(done, reps).values())), "unit": unit_label(done, reps)}}
        for kind in ("retain", "update"):
            for metric in SCORES:
                Rs = {(k[1], k[2]): R for k, R in matrices(mine, kind, metric).items()}
                keep = {k: R for k, R in Rs.items() if (complete(R) if kind == "retain" else finished(R))}
                if not keep or len({len(R) for R in keep.values()}) > 1:
                    continue
                block = s.setdefault(kind, {})[metric] = _block(keep, reps)
                if kind != "retain" or metric != "acc":
                    continue
                curves[run] = unit_curves({k: M.avg_acc_curve(R) for k, R in keep.items()}, reps)
                if joint and run != joint_run:
                    pairs = {k: (R, _joint_for(joint, *k)) for k, R in keep.items()}
                    vals = {k: M.nanmean(M.intransigence(R, J)) for k, (R, J) in pairs.items()
                            if J is not None and len(J) == len(R)}
                    if vals:
                        block["intransigence"] = unit_stats(vals, reps)
        for metric in sorted({r["metric"] for r in mine if r["kind"] == "retain" and probe_type(r["metric"])}):
            Rs = {(k[1], k[2]): R for k, R in matrices(mine, "retain", metric).items()}
            keep = {k: R for k, R in Rs.items() if finished(R)}  # NaN columns allowed: see type_block
            if keep and len({len(R) for R in keep.values()}) == 1:
                s.setdefault("by_type", {})[probe_type(metric)] = type_block(keep, reps)
        for metric in sorted({r["metric"] for r in mine if r["kind"] == "base"}):
            bc = {(k[1], k[2]): c for k, c in base_curves(mine, metric).items()}
            n = min(len(c) for c in bc.values())
            parts = {k: M.base_ability(c[:n]) for k, c in bc.items()}
            s.setdefault("base", {})[metric] = {"base_ability": {
                "curve": _pointwise_mean(list(unit_curves(bc, reps).values())),
                **{name: unit_stats({k: p[name] for k, p in parts.items()}, reps) for name in M.base_ability([0.0])}}}
    base_curve = out.get(baseline_run, {}).get("retain", {}).get("acc", {}).get("avg_acc_curve")
    for run, s in out.items():
        block = s.get("retain", {}).get("acc")
        if base_curve and block and run not in (baseline_run, joint_run):
            if len(block["avg_acc_curve"]) == len(base_curve):
                block["crossover"] = M.crossover(block["avg_acc_curve"], base_curve)
                ci = M.crossover_interval(curves[run], curves[baseline_run])
                block["crossover_ci"] = list(ci) if ci else None
    return out


def reference_runs(run_dirs: list[dict]) -> dict[str, str]:
    """Run name -> reference kind (joint | single) for run directories whose config.yaml says so."""
    return {name: d["config"]["reference"] for d in run_dirs if d["config"].get("reference", "none") != "none"
            for name in d["runs"]}


def json_safe(x):
    """NaN/inf -> None, recursively, so the output is strict JSON."""
    return clean(x)


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
    out = summarize(rows, joint, args.baseline, replicate_map(dirs))
    for d in dirs:
        for name in d["runs"]:
            if d["cost"] and name in out:
                out[name]["cost"] = d["cost"]
    print(json.dumps(json_safe(out), indent=1))
    return 0
