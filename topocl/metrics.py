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

import functools
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


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b), 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return max(0.0, min(1.0, x))
    lnf = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(lnf) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lnf) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tt = t * t  # the lower tail mass P(|T| > |t|) / 2, from whichever argument of I_x is not close to 1
    tail = 0.5 * (_betai(df / 2, 0.5, df / (df + tt)) if tt > df else 1.0 - _betai(0.5, df / 2, tt / (df + tt)))
    return 1.0 - tail if t > 0 else tail


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (bisection on t_cdf; |error| < 1e-10)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-10:
            break
    return (lo + hi) / 2


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t confidence interval of the mean, mean ± t_{(1+level)/2, n-1} · s/√n,
    over independent values (NaN dropped). Fewer than two values: the interval is (NaN, NaN)."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan, math.nan
    n, mean = len(vals), sum(vals) / len(vals)
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def crossover_interval(arm: dict, baseline: dict, n_boot: int = 2000, level: float = 0.95, seed: int = 0
                       ) -> tuple[int | None, int | None] | None:
    """Percentile-bootstrap interval of `crossover` over independent units (replicates): `arm` and `baseline`
    map unit -> A_k curve. Units both runs have are resampled together (paired), the rest on their own. In
    each resample the crossover of the mean curves is taken; "never" counts as one past the last index and is
    returned as None. None when either side has fewer than two units."""
    if len(arm) < 2 or len(baseline) < 2:
        return None
    common = sorted(set(arm) & set(baseline), key=str)
    a_only = sorted(set(arm) - set(common), key=str)
    b_only = sorted(set(baseline) - set(common), key=str)
    n = len(next(iter(arm.values())))
    rng = random.Random(seed)

    def mean(curves: list) -> list[float]:
        return [nanmean(c[k] for c in curves) for k in range(n)]

    xs = []
    for _ in range(n_boot):
        both = rng.choices(common, k=len(common)) if common else []
        ka = both + (rng.choices(a_only, k=len(a_only)) if a_only else [])
        kb = both + (rng.choices(b_only, k=len(b_only)) if b_only else [])
        c = crossover(mean([arm[k] for k in ka]), mean([baseline[k] for k in kb]))
        xs.append(n if c is None else c)
    xs.sort()
    lo, hi = xs[int((1 - level) / 2 * n_boot)], xs[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return (None if lo >= n else lo), (None if hi >= n else hi)


SCALARS = {f.__name__: f for f in (acc, learning_acc, avg_incremental_acc, bwt_gem, bwt_all_pairs, fwt_gem,
                                   forgetting_chaudhry, forgetting_avalanche, forgetting_mammoth)}
"""The scalar metrics of one R, by name (all of `topocl metrics`' per-matrix keys)."""
