"""Tidy result rows -> accuracy matrices -> named metrics. `topocl metrics RESULTS.jsonl [...]`.

A row (one JSON object per line of results.jsonl, exactly these keys):
    run, seed, order   which arm, seed and task order
    after_task         -1 = before continual training, j = after task j (0-based, training order);
                       rows evaluated inside task j+1 keep after_task = j and have a larger step
    step               optimizer steps taken in the stream so far
    eval_task          position (training order) of the task whose probes these are; -1 = base knowledge
    kind               retain | update | base
    metric             acc (candidate accuracy) | em | nll | bpb (held-out base corpus, kind base)
    value              float
No torch here: reports and metrics only read artifacts.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

from topocl import metrics as M

KEYS = {"run": str, "seed": int, "order": int, "after_task": int, "step": int, "eval_task": int, "kind": str,
        "metric": str, "value": float}
KINDS = ("retain", "update", "base")


class ResultsError(ValueError):
    pass


def validate_row(obj: object, where: str) -> dict:
    if not isinstance(obj, dict):
        raise ResultsError(f"{where}: expected a JSON object")
    missing, extra = set(KEYS) - set(obj), set(obj) - set(KEYS)
    if missing or extra:
        raise ResultsError(f"{where}: keys must be exactly {sorted(KEYS)}; missing {sorted(missing)}, "
                           f"unexpected {sorted(extra)}")
    for k, tp in KEYS.items():
        v = obj[k]
        ok = isinstance(v, int | float) and not isinstance(v, bool) if tp is float else isinstance(v, tp)
        if not ok or (tp is int and isinstance(v, bool)):
            raise ResultsError(f"{where}: field '{k}' must be {tp.__name__}, got {v!r}")
    if obj["kind"] not in KINDS:
        raise ResultsError(f"{where}: kind {obj['kind']!r} not in {KINDS}")
    return {**obj, "value": float(obj["value"])}


def load_rows(*paths: str | Path) -> list[dict]:
    rows = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            path = path / "results.jsonl"
        if not path.is_file():
            raise ResultsError(f"no results file at {path}")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ResultsError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            rows.append(validate_row(obj, f"{path}:{n}"))
    return rows


def boundary_rows(rows: list[dict]) -> list[dict]:
    """Keep, per (run, seed, order, after_task), only the evaluation at the task boundary (smallest step)."""
    first: dict[tuple, int] = {}
    for r in rows:
        key = (r["run"], r["seed"], r["order"], r["after_task"])
        first[key] = min(first.get(key, r["step"]), r["step"])
    return [r for r in rows if r["step"] == first[(r["run"], r["seed"], r["order"], r["after_task"])]]


def matrices(rows: list[dict], kind: str = "retain", metric: str = "acc") -> dict[tuple, list[list[float]]]:
    """(run, seed, order) -> R with T + 1 rows (row 0 = after_task -1) of T task scores (NaN if absent)."""
    cells: dict[tuple, dict[tuple[int, int], float]] = defaultdict(dict)
    for r in boundary_rows(rows):
        if r["kind"] == kind and r["metric"] == metric and r["eval_task"] >= 0:
            cells[(r["run"], r["seed"], r["order"])][(r["after_task"], r["eval_task"])] = r["value"]
    out = {}
    for key, c in cells.items():
        t = max(j for _, j in c) + 1
        done = max(i for i, _ in c) + 1  # tasks trained so far (a run may be unfinished)
        out[key] = [[c.get((i - 1, j), math.nan) for j in range(t)] for i in range(done + 1)]
    return out


def complete(R: list[list[float]]) -> bool:
    """Square (all tasks trained) and every needed entry present."""
    t = len(R[0])
    return len(R) == t + 1 and all(not math.isnan(R[i][j]) for i in range(t + 1) for j in range(t))


def base_curve(rows: list[dict], metric: str) -> dict[tuple, list[float]]:
    """(run, seed, order) -> base-knowledge metric per after_task (-1, 0, 1, ...)."""
    cells: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in boundary_rows(rows):
        if r["kind"] == "base" and r["metric"] == metric:
            cells[(r["run"], r["seed"], r["order"])][r["after_task"]] = r["value"]
    return {k: [v[i] for i in sorted(v)] for k, v in cells.items()}


def _ci(values: list[float]) -> dict:
    mean, lo, hi = M.bootstrap_ci(values)
    return {"mean": mean, "ci_low": lo, "ci_high": hi, "n": len(values), "values": values}


def summarize(rows: list[dict], joint_run: str | None = None, baseline_run: str | None = None) -> dict:
    """Every named metric per run (mean and 95% bootstrap CI over seeds x orders)."""
    out: dict = {}
    runs = sorted({r["run"] for r in rows})
    for metric in ("acc", "em"):
        Rs = matrices(rows, "retain", metric)
        for run in runs:
            mats = [R for (r, _, _), R in sorted(Rs.items()) if r == run and complete(R)]
            if not mats:
                continue
            block = out.setdefault(run, {}).setdefault("retain", {}).setdefault(metric, {})
            for name, fn in M.SCALARS.items():
                block[name] = _ci([fn(R) for R in mats])
            delays = [M.retention_by_delay(R) for R in mats]
            block["retention_by_delay"] = {d: sum(x[d] for x in delays) / len(delays) for d in delays[0]}
            trajs = [M.forgetting_trajectory(R) for R in mats]
            block["forgetting_trajectory"] = [sum(t[k] for t in trajs) / len(trajs) for k in range(len(trajs[0]))]
            curves = [[M.avg_acc_after(R, k) for k in range(1, len(R))] for R in mats]
            block["avg_acc_curve"] = [sum(c[k] for c in curves) / len(curves) for k in range(len(curves[0]))]
            if joint_run and joint_run != run:
                joint = [R for (r, _, _), R in sorted(Rs.items()) if r == joint_run and complete(R)]
                if joint:
                    per = [M.intransigence(R, joint[0]) for R in mats if len(R) == len(joint[0])]
                    block["intransigence"] = _ci([sum(p) / len(p) for p in per])
            if baseline_run and baseline_run != run and metric == "acc":
                base = [R for (r, _, _), R in sorted(Rs.items()) if r == baseline_run and complete(R)]
                if base:
                    b = [sum(M.avg_acc_after(R, k) for R in base) / len(base) for k in range(1, len(base[0]))]
                    block["crossover"] = M.crossover(block["avg_acc_curve"], b)
    for run in runs:  # update probes: accuracy on the old answer after the overwrite = stale-answer rate
        for metric in ("acc",):
            mats = [R for (r, _, _), R in sorted(matrices(rows, "update", metric).items()) if r == run]
            finals = [[v for v in R[-1] if not math.isnan(v)] for R in mats]
            finals = [sum(f) / len(f) for f in finals if f]
            if finals:
                out.setdefault(run, {}).setdefault("update", {})[metric] = {"final": _ci(finals)}
        for metric in ("acc", "bpb"):
            curves = [c for (r, _, _), c in sorted(base_curve(rows, metric).items()) if r == run]
            if curves:
                n = min(len(c) for c in curves)
                out.setdefault(run, {}).setdefault("base", {})[metric] = {
                    "curve": [sum(c[i] for c in curves) / len(curves) for i in range(n)],
                    "final": _ci([c[n - 1] for c in curves]), "initial": _ci([c[0] for c in curves])}
    return out


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="topocl metrics", description="Named CL metrics of result rows, as JSON.")
    ap.add_argument("results", nargs="+", help="results.jsonl files or run directories")
    ap.add_argument("--joint", help="run name of the joint-training reference (for intransigence)")
    ap.add_argument("--baseline", help="run name of the dense baseline (for crossover)")
    args = ap.parse_args(argv)
    print(json.dumps(summarize(load_rows(*args.results), args.joint, args.baseline), indent=1))
    return 0
