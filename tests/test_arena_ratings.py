"""Arena ratings against hand-computed values on small vote tables."""

import math

import pytest

from topocl.arena.ratings import (
    Vote,
    bootstrap_bt,
    bt_fit,
    bt_fit_length,
    leaderboard,
    online_elo,
    proxy_agreement,
    top_robustness,
)


def votes(session, a, b, outcomes):
    return [Vote(session, a, b, o) for o in outcomes]


def test_bt_two_models_is_the_win_rate_logit():
    # A: 3 wins, 1 loss, 1 tie, 1 both-bad -> p = (3 + 2 * 0.5) / 6 = 2/3 -> R_A - R_B = 400 log10(2) = 120.41
    vs = votes("s1", "A", "B", ["a", "a", "b", "tie"]) + votes("s2", "B", "A", ["b", "both_bad"])
    r = bt_fit(vs)
    assert r["A"] - r["B"] == pytest.approx(400 * math.log10(2), abs=1e-6)
    assert r["A"] == pytest.approx(1000 + 200 * math.log10(2), abs=1e-6)  # centred: mean 1000
    assert bt_fit(vs, anchor="B")["B"] == pytest.approx(1000.0)


def test_bt_on_a_chain_fits_every_edge_and_a_balanced_cycle_is_flat():
    # A beats B 2 of 3, B beats C 2 of 3, A and C never meet: a tree, so each edge is fitted exactly
    vs = votes("s1", "A", "B", ["a", "a", "b"]) + votes("s2", "B", "C", ["a", "a", "b"])
    r = bt_fit(vs)
    d = 400 * math.log10(2)
    assert (r["A"], r["B"], r["C"]) == pytest.approx((1000 + d, 1000, 1000 - d), abs=1e-6)
    cycle = [Vote("s", "A", "B", "a"), Vote("s", "B", "C", "a"), Vote("s", "C", "A", "a")]
    assert bt_fit(cycle) == pytest.approx({"A": 1000, "B": 1000, "C": 1000})


def test_bt_penalty_keeps_an_undefeated_model_finite():
    vs = votes("s", "A", "B", ["a"] * 5)
    r = bt_fit(vs, reg=1e-2)
    assert math.isfinite(r["A"]) and r["A"] > r["B"] + 400
    assert bt_fit([], ["X"]) == {"X": 1000.0}


def test_online_elo_by_hand():
    r = online_elo([Vote("s", "A", "B", "a"), Vote("s", "B", "A", "a")])
    e = 1 / (1 + 10 ** (4 / 400))  # B (998) against A (1002)
    assert r["B"] == pytest.approx(998 + 4 * (1 - e)) and r["A"] == pytest.approx(1002 - 4 * (1 - e))
    assert r["A"] + r["B"] == pytest.approx(2000)


def test_bootstrap_resamples_sessions_not_votes():
    # one session only: every resample is that session; instead of a zero-width interval there is none
    vs = votes("only", "A", "B", ["a", "a", "b", "tie"])
    ci = bootstrap_bt(vs, rounds=20, reg=0.0)
    assert all(math.isnan(x) for m in "AB" for x in ci[m])
    two = vs + votes("second", "A", "B", ["a"])
    assert all(not math.isnan(x) for x in bootstrap_bt(two, rounds=20)["A"])
    # many sessions: the interval covers the estimate and has width
    many = [v for s in range(12) for v in votes(f"s{s}", "A", "B", ["a", "b", "a"] if s % 3 else ["b", "b"])]
    ci = bootstrap_bt(many, rounds=100)
    fit = bt_fit(many, reg=1e-2)
    assert ci["A"][0] < fit["A"] < ci["A"][1]


def test_leaderboard_tallies_and_ci_rank():
    vs = [v for s in range(10) for v in votes(f"s{s}", "strong", "weak", ["a", "a", "a", "tie"])]
    vs += votes("x", "weak", "mid", ["both_bad"])
    rows = leaderboard(vs, rounds=50)
    by = {r.model: r for r in rows}
    assert rows[0].model == "strong" and by["strong"].rank == 1
    assert (by["strong"].wins, by["strong"].ties, by["strong"].losses, by["strong"].votes) == (30, 10, 0, 40)
    assert (by["weak"].both_bad, by["weak"].ties, by["weak"].losses) == (1, 11, 30)
    assert by["weak"].rank >= 2 and by["strong"].ci_low > by["weak"].ci_high
    assert (by["strong"].sessions, by["weak"].sessions, by["mid"].sessions) == (10, 11, 1)
    assert math.isnan(by["mid"].ci_low) and math.isnan(by["mid"].ci_high)  # one session: no interval


def test_proxy_agreement_rate_and_kappa():
    vs = [Vote("s", "A", "B", "a", 1.0, 0.0), Vote("s", "A", "B", "b", 1.0, 0.0), Vote("s", "A", "B", "a", 0.5, 0.0),
          Vote("s", "A", "B", "tie", 0.5, 0.5), Vote("s", "A", "B", "b", 0.2, 0.2), Vote("s", "A", "B", "a")]
    ag = proxy_agreement(vs)
    assert ag["rate"] == pytest.approx(2 / 3) and ag["n"] == 3 and ag["n_scored"] == 5
    # human a,b,a,tie,b vs proxy a,a,a,tie,tie: po = 3/5, pe = (2/5)(3/5) + (2/5)(0) + (1/5)(2/5) = 8/25
    assert ag["kappa"] == pytest.approx((3 / 5 - 8 / 25) / (1 - 8 / 25))
    assert math.isnan(proxy_agreement([])["rate"])


def test_vote_validation():
    with pytest.raises(ValueError):
        Vote("s", "A", "B", "left")
    with pytest.raises(ValueError):
        Vote("s", "A", "A", "a")


def test_length_covariate_by_hand():
    # equal models; the longer reply wins 4 of 5 votes, and each model is the longer one half the time:
    # plain BT sees a draw, the length coefficient is logit(0.8) = ln 4 per standard deviation of z (z = +-1)
    vs = []
    for s in range(10):
        long_a = s % 2 == 0
        for k in range(5):
            wins_long = k < 4
            outcome = "a" if wins_long == long_a else "b"
            vs.append(Vote(f"s{s}", "X", "Y", outcome, len_a=300 if long_a else 100, len_b=100 if long_a else 300))
    plain = bt_fit(vs, reg=1e-6)
    lc, gamma = bt_fit_length(vs, reg=1e-6)
    assert plain["X"] == pytest.approx(1000, abs=1e-6) and lc["X"] == pytest.approx(1000, abs=1e-6)
    assert gamma == pytest.approx(math.log(4), rel=1e-4)
    # equal lengths: gamma 0 and the rating gap is the win-rate logit, 400 log10(4)
    eq = [Vote("s", "X", "Y", "a" if k < 4 else "b", len_a=50, len_b=50) for k in range(5)]
    lc, gamma = bt_fit_length(eq, reg=1e-8)
    assert gamma == 0.0 and lc["X"] - lc["Y"] == pytest.approx(400 * math.log10(4), rel=1e-4)


def test_top_rank_robustness_by_hand():
    # A beats B three times and loses once: dropping two of A's wins leaves 1-1, a draw at the top
    vs = votes("s", "A", "B", ["a", "a", "a", "b"])
    assert top_robustness(vs) == 2
    assert top_robustness(vs + votes("t", "A", "B", ["tie"])) == 2  # wins go before ties
    assert top_robustness(votes("s", "A", "B", ["a", "b"])) == 0  # no strict leader
    assert top_robustness(votes("s", "A", "B", ["a"] * 5), max_drop=3) is None
    assert top_robustness([]) is None
