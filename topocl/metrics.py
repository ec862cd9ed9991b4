"""Continual-learning metrics as named pure functions (no torch). Definitions follow
../shared/research/continual_learning.md §3 and are unit-tested against its two worked examples.

R is the accuracy matrix as a list of T + 1 rows of T scores: R[0] is the model before continual
training, R[i] the scores on tasks 1..T after training on task i (1-based in the formulas, 0-based in
Python lists: R[i][j - 1]). Columns are tasks in training order; scores are task-averaged.

Missing entries are NaN (e.g. a task with no `update` probes). Every metric is an average of per-task
terms; a term that needs a NaN entry is skipped, and a metric with no terms left is NaN. On a complete R
this is exactly the textbook definition (and ACC = LA + (T-1)/T * BWT holds).

Forgetting has several incompatible definitions in common code; each is a separate, named function.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]


def _t(R: Matrix) -> int:
    t = len(R) - 1
    if t < 1 or any(len(row) != t for row in R):
        raise ValueError(f"R must have T + 1 rows of T scores, got {len(R)} rows of {[len(r) for r in R]}")
    return t


def nanmean(xs) -> float:
    """Mean of the non-NaN values (NaN if there are none)."""
    vals = [x for x in xs if not math.isnan(x)]
    return sum(vals) / len(vals) if vals else math.nan


def _max(xs) -> float:
    vals = [x for x in xs if not math.isnan(x)]
    return max(vals) if vals else math.nan


def acc(R: Matrix) -> float:
    """GEM ACC (TRACE "OP"): mean score over all tasks after the last task. (1/T) Σ_j R_{T,j}."""
    t = _t(R)
    return nanmean(R[t])


def avg_acc_after(R: Matrix, k: int) -> float:
    """Chaudhry A_k: mean score on the first k tasks after task k (1 <= k <= T)."""
    if not 1 <= k <= _t(R):
        raise ValueError(f"k={k} outside 1..{_t(R)}")
    return nanmean(R[k][:k])


def avg_acc_curve(R: Matrix) -> list[float]:
    """[A_1, ..., A_T]: mean score on the tasks seen so far, after each task (the forgetting curve)."""
    return [avg_acc_after(R, k) for k in range(1, _t(R) + 1)]


def learning_acc(R: Matrix) -> float:
    """Riemer et al. LA: mean score on each task right after learning it. (1/T) Σ_j R_{j,j}."""
    t = _t(R)
    return nanmean(R[j][j - 1] for j in range(1, t + 1))


def avg_incremental_acc(R: Matrix) -> float:
    """Rebuffi et al. (iCaRL): Ā = (1/T) Σ_k A_k."""
    return nanmean(avg_acc_curve(R))


def bwt_gem(R: Matrix) -> float:
    """GEM backward transfer: 1/(T-1) Σ_{j<T} (R_{T,j} - R_{j,j}); negative = forgetting."""
    t = _t(R)
    return nanmean(R[t][j - 1] - R[j][j - 1] for j in range(1, t))


def bwt_all_pairs(R: Matrix) -> float:
    """Díaz-Rodríguez et al. (Continuum): 2/(T(T-1)) Σ_{i=2..T} Σ_{j<i} (R_{i,j} - R_{j,j})."""
    t = _t(R)
    return nanmean(R[i][j - 1] - R[j][j - 1] for i in range(2, t + 1) for j in range(1, i))


def fwt_gem(R: Matrix) -> float:
    """GEM forward transfer with the initial model as baseline b_j = R_{0,j}: 1/(T-1) Σ_{j≥2} (R_{j-1,j} - b_j)."""
    t = _t(R)
    return nanmean(R[j - 1][j - 1] - R[0][j - 1] for j in range(2, t + 1))


def forgetting_chaudhry_per_task(R: Matrix, k: int | None = None) -> list[float]:
    """f_j^k = max_{l in j..k-1} R_{l,j} - R_{k,j} for j < k (can be negative)."""
    t = _t(R)
    k = t if k is None else k
    if not 1 <= k <= t:
        raise ValueError(f"k={k} outside 1..{t}")
    return [_max(R[l][j - 1] for l in range(j, k)) - R[k][j - 1] for j in range(1, k)]


def forgetting_chaudhry(R: Matrix, k: int | None = None) -> float:
    """Chaudhry et al. 2018 (RWalk) F_k = mean_j f_j^k (k = T by default)."""
    return nanmean(forgetting_chaudhry_per_task(R, k))


def forgetting_trajectory(R: Matrix) -> list[float]:
    """F_k for k = 2..T: a transient collapse shows up here even if it recovers by the end."""
    return [forgetting_chaudhry(R, k) for k in range(2, _t(R) + 1)]


def forgetting_avalanche(R: Matrix) -> float:
    """Avalanche StreamForgetting: mean over j < T of R_{j,j} - R_{T,j} (= -BWT on a complete R)."""
    t = _t(R)
    return nanmean(R[j][j - 1] - R[t][j - 1] for j in range(1, t))


def forgetting_mammoth(R: Matrix) -> float:
    """Mammoth: mean over j < T of max over rows j..T (final row included) of R_{l,j}, minus R_{T,j} (>= 0)."""
    t = _t(R)
    return nanmean(_max(R[l][j - 1] for l in range(j, t + 1)) - R[t][j - 1] for j in range(1, t))


def intransigence(R: Matrix, joint: Matrix) -> list[float]:
    """Chaudhry I_k = a*_k - R_{k,k}, a*_k = score on task k of the joint reference trained on tasks 1..k.

    `joint` is the reference run's own matrix (only its diagonal is used). Report the mean or I_T."""
    t = _t(R)
    if _t(joint) != t:
        raise ValueError(f"the joint reference covers {_t(joint)} tasks, the run {t}")
    return [joint[k][k - 1] - R[k][k - 1] for k in range(1, t + 1)]


def retention_by_delay(R: Matrix) -> dict[int, float]:
    """Mean score on a task d tasks after it was learned: d -> mean_j R_{j+d,j} (d = 0 is LA)."""
    t = _t(R)
    return {d: nanmean(R[j + d][j - 1] for j in range(1, t - d + 1)) for d in range(t)}


def base_ability(curve: Sequence[float]) -> dict[str, float]:
    """Base (pretraining) ability over time: the curve c[0] (before CL), c[1] (after task 1), ...

    Returns initial, final and change = final - initial (for bits/byte, lower is better)."""
    if not curve:
        raise ValueError("base_ability needs at least the value before continual training")
    return {"initial": curve[0], "final": curve[-1], "change": curve[-1] - curve[0]}


def crossover(cl: Sequence[float], baseline: Sequence[float]) -> int | None:
    """First index k from which the CL curve is strictly above the baseline at every later index (None if
    it ends at or below it). With A_k curves, index k means "after task k" (0-based, training order)."""
    if len(cl) != len(baseline):
        raise ValueError(f"curves must have the same length, got {len(cl)} and {len(baseline)}")
    first = None
    for k in range(len(cl) - 1, -1, -1):
        if cl[k] > baseline[k]:  # False for NaN: a missing point breaks "stays above"
            first = k
        else:
            break
    return first


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0
                 ) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap over per-seed/per-order values, with a fixed seed so that
    reports are reproducible. NaN values are dropped; one value gives a zero-width interval."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan, math.nan
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, mean, mean
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(vals, k=len(vals))) / len(vals) for _ in range(n_boot))
    lo = means[int((1 - level) / 2 * n_boot)]
    hi = means[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return mean, lo, hi


SCALARS = {f.__name__: f for f in (acc, learning_acc, avg_incremental_acc, bwt_gem, bwt_all_pairs, fwt_gem,
                                   forgetting_chaudhry, forgetting_avalanche, forgetting_mammoth)}
"""The scalar metrics of one R, by name (all of `topocl metrics`' per-matrix keys)."""
