"""The leaderboard's data from vote rows (pure; the web page and `topocl arena ratings` show it).

    rows          leaderboard() per model, plus `rating_lc`: the length-controlled rating (bt_fit_length)
    length_coef   gamma of the length covariate: odds factor exp(gamma) per standard deviation of relative length
    robustness    votes to drop until the leader is no longer strictly first (top_robustness; None = no leader)
    beyond        the same leaderboard from only the votes on turns past a model's context window (turn > K for
                  the smaller positive context_turns of the pair): only there can weight-level memory matter
    agreement     proxy_agreement (human votes vs the automatic proxy)
    catches       catch-pair consistency (see topocl.arena.service.catch_stats), when given
"""

from __future__ import annotations

import math
from dataclasses import asdict

from topocl.arena.ratings import Vote, bt_fit_length, leaderboard, proxy_agreement, top_robustness


def window_of(vote: Vote, windows: dict[str, int]) -> int:
    """The context window that matters for this vote: the smaller positive context_turns of its two models
    (0 = both see the whole story)."""
    ks = [k for k in (windows.get(vote.model_a, 0), windows.get(vote.model_b, 0)) if k > 0]
    return min(ks, default=0)


def beyond_window(votes: list[Vote], windows: dict[str, int]) -> list[Vote]:
    return [v for v in votes if (k := window_of(v, windows)) > 0 and v.turn > k]


def _rows(votes: list[Vote], models: list[str], rounds: int) -> list[dict]:
    lc, _ = bt_fit_length(votes, models) if votes else ({}, 0.0)
    return [{**asdict(r), "rating_lc": lc.get(r.model, math.nan)} for r in leaderboard(votes, models, rounds=rounds)]


def board_data(votes: list[Vote], models: list[str], *, rounds: int = 200, windows: dict[str, int] | None = None,
               catches: dict | None = None) -> dict:
    windows = windows or {}
    far = beyond_window(votes, windows)
    out = {"votes": len(votes), "sessions": len({v.session for v in votes}), "rows": _rows(votes, models, rounds),
           "length_coef": bt_fit_length(votes, models)[1] if votes else math.nan,
           "robustness": top_robustness(votes, models), "agreement": proxy_agreement(votes),
           "windows": {m: k for m, k in windows.items() if k > 0}}
    if out["windows"]:
        out["beyond"] = {"votes": len(far), "sessions": len({v.session for v in far}),
                         "rows": _rows(far, models, rounds)}
    if catches is not None:
        out["catches"] = catches
    return out


def json_clean(x):
    """NaN -> None, recursively (JSON has no NaN)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: json_clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_clean(v) for v in x]
    return x
