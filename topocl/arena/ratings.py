"""Arena ratings: pure functions of vote rows (no database, no web code).

A vote is (session, model_a, model_b, outcome) with outcome a | b | tie | both_bad; ties and both-bad both
count as half a win for each side (FastChat's convention).

    bt_fit            Bradley-Terry maximum likelihood: P(i beats j) = sigmoid(beta_i - beta_j), fitted by
                      Newton's method on the (optionally L2-penalised) log-likelihood; reported on the Elo
                      scale R = 1000 + 400 / ln(10) * beta, centred so the mean rating is 1000 (or so that an
                      anchor model is 1000). Two models: R_a - R_b = 400 * log10(p / (1 - p)), p = (W + T/2)/N.
    bootstrap_bt      percentile CIs from refits on resampled *sessions* (votes within a session are
                      correlated, so resampling votes would make the intervals too narrow)
    online_elo        the order-dependent online Elo (K = 4), for comparison only
    leaderboard       all of the above per model, with the CI-aware rank 1 + #{m': lo(m') > hi(m)}
    proxy_agreement   how often the automatic proxy score picks the side the human picked
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

OUTCOMES = ("a", "b", "tie", "both_bad")
SCALE = 400.0 / math.log(10.0)  # natural-log strength -> Elo points
MIN_SESSIONS = 2  # a session-bootstrap interval needs at least two sessions


@dataclass(frozen=True)
class Vote:
    session: str
    model_a: str
    model_b: str
    outcome: str  # a | b | tie | both_bad
    proxy_a: float | None = None  # automatic proxy score of side A's reply (higher = better)
    proxy_b: float | None = None
    turn: int = 0  # turn index within the session
    len_a: int | None = None  # reply lengths (characters), for the length covariate
    len_b: int | None = None

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"vote outcome {self.outcome!r} not in {OUTCOMES}")
        if self.model_a == self.model_b:
            raise ValueError(f"a vote needs two different models, got {self.model_a!r} twice")

    @property
    def score_a(self) -> float:
        """Side A's share of the win: 1, 0 or 1/2 (tie and both-bad)."""
        return {"a": 1.0, "b": 0.0}.get(self.outcome, 0.5)


def _models(votes: Sequence[Vote], models: Iterable[str] | None) -> list[str]:
    names = set(models or ())
    for v in votes:
        names.update((v.model_a, v.model_b))
    return sorted(names)


def _pairs(votes: Sequence[Vote], idx: dict[str, int]) -> dict[tuple[int, int], tuple[float, float]]:
    """(i, j) -> (summed score of i, count) over the votes."""
    pairs: dict[tuple[int, int], tuple[float, float]] = {}
    for v in votes:
        key = (idx[v.model_a], idx[v.model_b])
        s, c = pairs.get(key, (0.0, 0.0))
        pairs[key] = (s + v.score_a, c + 1.0)
    return pairs


def _newton(x: np.ndarray, y: np.ndarray, w: np.ndarray, reg: float, max_iter: int = 100,
            tol: float = 1e-10, n_free: int = 0) -> np.ndarray:
    """Strengths beta [n] maximising sum_k y_k log p_k + (w_k - y_k) log(1 - p_k) - reg/2 |beta|^2,
    p_k = sigmoid(x_k . beta), x [K, n] = e_i - e_j per matchup, y [K] summed scores, w [K] counts.
    Models without votes keep 0; the mean over the others is 0. The last n_free columns are covariates
    (e.g. the length difference): always fitted, never centred."""
    n_models = x.shape[1] - n_free
    present = (np.abs(x) * (w[:, None] > 0)).sum(0) > 0  # [n]
    present[n_models:] = True
    beta = np.zeros(x.shape[1])
    if not present.any():
        return beta
    x = x[:, present]
    k = int(present[:n_models].sum())  # model columns come first
    b = np.zeros(x.shape[1])
    eye = np.eye(x.shape[1])
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(x @ b)))
        grad = x.T @ (y - w * p) - reg * b
        hess = x.T @ ((w * p * (1.0 - p))[:, None] * x) + reg * eye  # negative Hessian
        step = np.linalg.lstsq(hess, grad, rcond=None)[0]  # minimum norm: the common shift stays unidentified
        step = np.clip(step, -5.0, 5.0)  # damp the first steps of a near-separable fit
        b += step
        b[:k] -= b[:k].mean()
        if float(np.max(np.abs(step))) < tol:
            break
    beta[present] = b
    return beta


def _to_elo(beta: np.ndarray, names: list[str], present: np.ndarray, anchor: str | None) -> dict[str, float]:
    ratings = 1000.0 + SCALE * beta
    idx = {m: i for i, m in enumerate(names)}
    if anchor is not None and anchor in idx and present[idx[anchor]]:
        shift = ratings[idx[anchor]] - 1000.0
    else:
        shift = float(ratings[present].mean()) - 1000.0 if present.any() else 0.0
    return {m: float(ratings[i] - shift) if present[i] else math.nan for m, i in idx.items()}


def _design(pairs: Iterable[tuple[int, int]], n: int) -> np.ndarray:
    keys = list(pairs)
    x = np.zeros((len(keys), n))
    for k, (i, j) in enumerate(keys):
        x[k, i], x[k, j] = 1.0, -1.0
    return x


def bt_fit(votes: Sequence[Vote], models: Iterable[str] | None = None, *, reg: float = 0.0,
           anchor: str | None = None, max_iter: int = 100, tol: float = 1e-10) -> dict[str, float]:
    """Bradley-Terry MLE on the Elo scale (see module docstring).

    reg is an L2 penalty reg/2 * sum(beta^2) on the natural-log strengths: 0 is the plain MLE (which is
    infinite for a model that won every vote: Newton then stops at max_iter), a small value (the leaderboard
    uses 1e-2, a prior with sd 10 nats) keeps every rating finite. Models without votes get 1000."""
    names = _models(votes, models)
    idx = {m: i for i, m in enumerate(names)}
    pairs = _pairs(votes, idx)
    x = _design(pairs, len(names))
    y = np.array([s for s, _ in pairs.values()])
    w = np.array([c for _, c in pairs.values()])
    beta = _newton(x, y, w, reg, max_iter, tol)
    out = _to_elo(beta, names, np.ones(len(names), dtype=bool), anchor)
    return out


def length_z(votes: Sequence[Vote]) -> np.ndarray:
    """Per vote the relative length difference (len_a - len_b) / (len_a + len_b + 1), divided by its standard
    deviation over the votes (FastChat's style control); 0 where a length is unknown."""
    z = np.array([(v.len_a - v.len_b) / (v.len_a + v.len_b + 1.0) if v.len_a is not None and v.len_b is not None
                  else 0.0 for v in votes])
    sd = float(z.std())
    return z / sd if sd > 0 else z


def bt_fit_length(votes: Sequence[Vote], models: Iterable[str] | None = None, *, reg: float = 1e-2
                  ) -> tuple[dict[str, float], float]:
    """Length-controlled Bradley-Terry: logit P(A beats B) = beta_a - beta_b + gamma * z (z = length_z), fitted
    jointly per vote. Returns (ratings on the Elo scale at equal lengths, gamma): exp(gamma) is the odds factor
    a reply one standard deviation relatively longer gets whatever the model."""
    names = _models(votes, models)
    idx = {m: i for i, m in enumerate(names)}
    x = np.zeros((len(votes), len(names) + 1))
    for r, v in enumerate(votes):
        x[r, idx[v.model_a]], x[r, idx[v.model_b]] = 1.0, -1.0
    x[:, -1] = length_z(votes)
    y = np.array([v.score_a for v in votes])
    beta = _newton(x, y, np.ones(len(votes)), reg, n_free=1)
    return _to_elo(beta[:-1], names, np.ones(len(names), dtype=bool), None), float(beta[-1])


def top_robustness(votes: Sequence[Vote], models: Iterable[str] | None = None, *, reg: float = 1e-2,
                   max_drop: int = 200) -> int | None:
    """How many votes dropping takes until the BT leader is no longer strictly first: greedily, the leader's
    wins over the current runner-up first, then its other wins, then its ties (an upper bound on the fewest
    such votes). None with fewer than two rated models, or when max_drop votes do not suffice."""
    left = list(votes)
    fit = bt_fit(left, models, reg=reg)
    rated = sorted((m for m in fit if any(m in (v.model_a, v.model_b) for v in left)), key=lambda m: -fit[m])
    if len(rated) < 2:
        return None
    leader = rated[0]
    for dropped in range(max_drop + 1):
        others = [m for m in rated if m != leader]
        runner = max(others, key=lambda m: fit[m])
        if fit[runner] >= fit[leader] - 1e-6:  # no longer strictly first
            return dropped
        best, key = None, (0.0, False)
        for i, v in enumerate(left):
            if leader not in (v.model_a, v.model_b):
                continue
            share = v.score_a if v.model_a == leader else 1.0 - v.score_a
            k = (share, runner in (v.model_a, v.model_b))
            if share > 0 and k > key:
                best, key = i, k
        if best is None or dropped == max_drop:
            return None
        del left[best]
        fit = bt_fit(left, rated, reg=reg)
    return None


def bootstrap_bt(votes: Sequence[Vote], models: Iterable[str] | None = None, *, rounds: int = 200, seed: int = 0,
                 reg: float = 1e-2, anchor: str | None = None, level: float = 0.95
                 ) -> dict[str, tuple[float, float]]:
    """Percentile interval per model from `rounds` BT refits, each on sessions drawn with replacement (all
    votes of a drawn session come along). A model absent from a resample is left out of that round. A model
    voted on in fewer than MIN_SESSIONS sessions gets (nan, nan): every resample of one session is that
    session, so its "interval" would be the point estimate, claiming a certainty one story cannot give."""
    names = _models(votes, models)
    idx = {m: i for i, m in enumerate(names)}
    sessions = sorted({v.session for v in votes})
    if not sessions or rounds <= 0:
        return {m: (math.nan, math.nan) for m in names}
    keys = list(_pairs(votes, idx))
    col = {k: c for c, k in enumerate(keys)}
    srow = {s: r for r, s in enumerate(sessions)}
    score = np.zeros((len(sessions), len(keys)))  # per session: summed score of the first model per matchup
    count = np.zeros((len(sessions), len(keys)))
    for v in votes:
        r, c = srow[v.session], col[(idx[v.model_a], idx[v.model_b])]
        score[r, c] += v.score_a
        count[r, c] += 1.0
    x = _design(keys, len(names))
    rng = np.random.default_rng(seed)
    draws = np.full((rounds, len(names)), np.nan)
    for r in range(rounds):
        times = np.bincount(rng.integers(0, len(sessions), len(sessions)), minlength=len(sessions)).astype(float)
        y, w = times @ score, times @ count
        present = (np.abs(x) * (w[:, None] > 0)).sum(0) > 0
        fit = _to_elo(_newton(x, y, w, reg), names, present, anchor)
        draws[r] = [fit[m] for m in names]
    lo_q, hi_q = 50.0 * (1.0 - level), 50.0 * (1.0 + level)
    seen = session_counts(votes)
    out = {}
    for i, m in enumerate(names):
        col_i = draws[:, i][~np.isnan(draws[:, i])]
        out[m] = (float(np.percentile(col_i, lo_q)), float(np.percentile(col_i, hi_q))) if (
            len(col_i) and seen.get(m, 0) >= MIN_SESSIONS) else (math.nan, math.nan)
    return out


def session_counts(votes: Sequence[Vote]) -> dict[str, int]:
    """Model -> number of distinct sessions with a vote on it."""
    seen: dict[str, set[str]] = {}
    for v in votes:
        for m in (v.model_a, v.model_b):
            seen.setdefault(m, set()).add(v.session)
    return {m: len(s) for m, s in seen.items()}


def online_elo(votes: Sequence[Vote], models: Iterable[str] | None = None, *, k: float = 4.0,
               init: float = 1000.0) -> dict[str, float]:
    """Online Elo in vote order: R_a += K (s_a - E_a), R_b -= K (s_a - E_a), E_a = 1/(1 + 10^((R_b-R_a)/400))."""
    r = {m: init for m in _models(votes, models)}
    for v in votes:
        ea = 1.0 / (1.0 + 10.0 ** ((r[v.model_b] - r[v.model_a]) / 400.0))
        delta = k * (v.score_a - ea)
        r[v.model_a] += delta
        r[v.model_b] -= delta
    return r


@dataclass
class Row:
    model: str
    rating: float  # Bradley-Terry, Elo scale
    ci_low: float
    ci_high: float
    elo: float  # online Elo
    rank: int  # 1 + number of models whose CI lies entirely above this one's
    votes: int
    wins: int
    ties: int  # tie and both-bad
    losses: int
    both_bad: int
    sessions: int = 0  # sessions with a vote on this model (an interval needs MIN_SESSIONS)


def leaderboard(votes: Sequence[Vote], models: Iterable[str] | None = None, *, rounds: int = 200, seed: int = 0,
                reg: float = 1e-2) -> list[Row]:
    """One row per model, best rating first."""
    names = _models(votes, models)
    bt = bt_fit(votes, names, reg=reg)
    ci = bootstrap_bt(votes, names, rounds=rounds, seed=seed, reg=reg)
    elo = online_elo(votes, names)
    tally = {m: [0, 0, 0, 0, 0] for m in names}  # votes, wins, ties, losses, both_bad
    for v in votes:
        for side, m in (("a", v.model_a), ("b", v.model_b)):
            t = tally[m]
            t[0] += 1
            if v.outcome in ("tie", "both_bad"):
                t[2] += 1
                t[4] += v.outcome == "both_bad"
            elif v.outcome == side:
                t[1] += 1
            else:
                t[3] += 1
    rows = []
    seen = session_counts(votes)
    for m in names:
        lo, hi = ci[m]
        above = sum(1 for o in names if o != m and not math.isnan(ci[o][0]) and not math.isnan(hi) and ci[o][0] > hi)
        rows.append(Row(m, bt[m], lo, hi, elo[m], 1 + above, *tally[m], sessions=seen.get(m, 0)))
    return sorted(rows, key=lambda r: (-r.rating, r.model))


def proxy_agreement(votes: Sequence[Vote]) -> dict[str, float]:
    """Agreement between human votes and the proxy score.

    rate: over votes with a human winner (a or b) and proxy scores that differ, the fraction where the proxy
    favours the human's choice (n counts them). kappa: Cohen's kappa over all votes with proxy scores, three
    classes (a, b, tie), a human both-bad counting as tie and equal proxy scores as a proxy tie."""
    scored = [v for v in votes if v.proxy_a is not None and v.proxy_b is not None]
    decided = [v for v in scored if v.outcome in ("a", "b") and v.proxy_a != v.proxy_b]
    agree = sum((v.outcome == "a") == (v.proxy_a > v.proxy_b) for v in decided)
    out = {"rate": agree / len(decided) if decided else math.nan, "n": float(len(decided)),
           "n_scored": float(len(scored)), "kappa": math.nan}
    if scored:
        def proxy(v: Vote) -> str:
            return "a" if v.proxy_a > v.proxy_b else "b" if v.proxy_b > v.proxy_a else "tie"

        human = ["tie" if v.outcome == "both_bad" else v.outcome for v in scored]
        auto = [proxy(v) for v in scored]
        po = sum(h == a for h, a in zip(human, auto)) / len(scored)
        pe = sum((human.count(c) / len(scored)) * (auto.count(c) / len(scored)) for c in ("a", "b", "tie"))
        out["kappa"] = (po - pe) / (1.0 - pe) if pe < 1.0 else math.nan
    return out
