"""Stability–plasticity frontier: forgetting against learning, per arm, and ΔF at matched learning. No torch.

Forgetting is only comparable at matched new-task learning (Biderman et al. 2024: LoRA and full FT sit on one
learning–forgetting curve), so an arm is run over a grid of learning rates (or EWC λ) and each grid point is
one run. A run's point is (LA, F): learning accuracy and Chaudhry forgetting of its retain-accuracy matrices,
each the mean over units of replication (pretraining seeds; see topocl.results.unit_keys) with a 95% t-CI.

Which runs form one arm: the run name minus a trailing grid suffix `-lr<value>` or `-lam<value>`
(`dense-vanilla-lr3e-4` and `dense-vanilla-lr1e-3` are the arm `dense-vanilla`; a run without the suffix is
an arm of one point). The point's knob is read from the run's resolved config.yaml (train.lr, ewc.lam), never
from the name.

An arm's frontier is the piecewise-linear curve F(LA) through its points sorted by LA (points with equal LA
averaged). ΔF at matched LA (`matched_gap`) is F_arm(LA) − F_base(LA) averaged over an even grid of the
matched range = the overlap of the two arms' LA ranges; outside it nothing is compared (never extrapolated),
and no overlap gives no value. For a CI, the gap is computed per unit from that unit's own points (the units
both arms have) and the t-interval is taken over units.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from topocl import metrics as M
from topocl.results import by_unit, matrices, probe_type, stats

GRID_SUFFIX = re.compile(r"^(?P<arm>.+)-(?P<knob>lr|lam)(?P<value>[0-9][0-9.eE+-]*)$")
N_GRID = 21
Curve = list[tuple[float, float]]


def arm_of(run: str) -> str:
    """The arm a run belongs to: its name without a trailing -lr<value> / -lam<value> grid suffix."""
    m = GRID_SUFFIX.match(run)
    return m.group("arm") if m else run


def knob(config: dict) -> str:
    """The grid coordinate of a run from its resolved config.yaml: 'lr=…' (and 'λ=…' for EWC runs)."""
    parts = []
    lr = (config.get("train") or {}).get("lr")
    if lr is not None:
        parts.append(f"lr={lr:g}")
    if "ewc" in (config.get("strategies") or []) and (config.get("ewc") or {}).get("lam") is not None:
        parts.append(f"λ={config['ewc']['lam']:g}")
    return ", ".join(parts)


def curve(points: Sequence[tuple[float, float]]) -> Curve:
    """(LA, F) points -> the frontier: NaN points dropped, sorted by LA, equal LA averaged."""
    by: dict[float, list[float]] = {}
    for la, f in points:
        if not (math.isnan(la) or math.isnan(f)):
            by.setdefault(la, []).append(f)
    return [(la, sum(fs) / len(fs)) for la, fs in sorted(by.items())]


def interp(c: Curve, x: float) -> float | None:
    """F at LA = x by linear interpolation on the curve; None outside [first LA, last LA] (no extrapolation)."""
    if not c or x < c[0][0] or x > c[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(c, c[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return c[0][1]  # a one-point curve at exactly x


def overlap(a: Curve, b: Curve) -> tuple[float, float] | None:
    """The matched-LA range: the intersection of both curves' LA ranges (None if they do not overlap)."""
    if not a or not b:
        return None
    lo, hi = max(a[0][0], b[0][0]), min(a[-1][0], b[-1][0])
    return (lo, hi) if lo <= hi else None


def matched_gap(a: Curve, b: Curve, n_grid: int = N_GRID) -> dict:
    """ΔF = F_a − F_b at matched LA: {"range": (lo, hi) | None, "grid": LAs, "delta": ΔF per grid LA, "mean":
    the average ΔF over the grid (NaN without overlap)}. A one-point overlap is compared at that point."""
    rng = overlap(a, b)
    if rng is None:
        return {"range": None, "grid": [], "delta": [], "mean": math.nan}
    lo, hi = rng
    # the last point is hi itself: lo + (hi - lo) can round past hi, and interp refuses anything outside a curve
    grid = [lo] if hi == lo else [lo + (hi - lo) * i / (n_grid - 1) for i in range(n_grid - 1)] + [hi]
    delta = [interp(a, x) - interp(b, x) for x in grid]
    return {"range": rng, "grid": grid, "delta": delta, "mean": sum(delta) / len(delta)}


# ----------------------------------------------------------------------------- from results rows


def run_points(rows: list[dict], run: str, replicates: dict[tuple, object] | None = None,
               metric: str = "acc") -> dict:
    """One run's frontier point: {"run", "LA": stats, "F": stats, "units": {unit: (LA, F)}} over its complete
    retain-accuracy matrices (streams nested in a replicate averaged first). A probe-type metric (`acc:TYPE`,
    topocl.results.type_block) takes finished matrices: a task without probes of the type is a NaN column."""
    typed = probe_type(metric) is not None
    mats = {(s, o): R for (r, s, o), R in matrices(rows, "retain", metric).items()
            if r == run and len(R) == len(R[0]) + 1 and (typed or not any(math.isnan(v) for row in R for v in row))}
    reps = {k: (replicates or {}).get((run, *k)) for k in mats}
    la = by_unit({k: M.learning_acc(R) for k, R in mats.items()}, reps)
    f = by_unit({k: M.forgetting_chaudhry(R) for k, R in mats.items()}, reps)
    return {"run": run, "LA": stats(list(la.values())), "F": stats(list(f.values())),
            "units": {u: (la[u], f[u]) for u in la}}


def frontiers(rows: list[dict], replicates: dict[tuple, object] | None = None,
              exclude: Sequence[str] = (), metric: str = "acc") -> dict[str, list[dict]]:
    """arm -> its runs' points, ordered by mean LA (runs named in `exclude`, e.g. the joint reference, left out)."""
    out: dict[str, list[dict]] = {}
    for run in sorted({r["run"] for r in rows} - set(exclude)):
        p = run_points(rows, run, replicates, metric)
        if p["units"]:
            out.setdefault(arm_of(run), []).append(p)
    return {a: sorted(ps, key=lambda p: (p["LA"]["mean"], p["run"])) for a, ps in out.items()}


def mean_curve(points: list[dict]) -> Curve:
    return curve([(p["LA"]["mean"], p["F"]["mean"]) for p in points])


def matched_delta(arm: list[dict], base: list[dict], n_grid: int = N_GRID) -> dict:
    """ΔF (arm − baseline) at matched LA: {"pooled": matched_gap of the mean curves, "stats": t-CI over the
    units both arms have of each unit's own matched_gap mean (units without overlap are left out),
    "units_without_overlap": how many}."""
    pooled = matched_gap(mean_curve(arm), mean_curve(base), n_grid)
    common = sorted({u for p in arm for u in p["units"]} & {u for p in base for u in p["units"]}, key=str)
    vals, units, missing = [], [], 0
    for u in common:
        g = matched_gap(curve([p["units"][u] for p in arm if u in p["units"]]),
                        curve([p["units"][u] for p in base if u in p["units"]]), n_grid)
        if g["range"] is None:
            missing += 1
            continue
        vals.append(g["mean"])
        units.append(list(u) if isinstance(u, tuple) else u)
    return {"pooled": pooled, "stats": {**stats(vals, units), "paired": True}, "units_without_overlap": missing}
