"""The experiment protocol (docs/protocol.md): matched-learning frontier on hand-made curves, paired
per-replicate H2 verdicts at matched LA, the verdict rule's simulated false-positive rate, and a report over a
learning-rate grid of replicated runs."""

import json
import math

import pytest

from topocl.analysis.evidence import evidence, simulate_null
from topocl.analysis.frontier import arm_of, curve, frontiers, interp, knob, matched_delta, matched_gap, overlap

# ----------------------------------------------------------------------------- frontier, pure


def test_interp_overlap_and_matched_gap_on_hand_made_curves():
    a = curve([(0.8, 0.20), (0.6, 0.10), (1.0, 0.40), (math.nan, 0.3)])  # sorted by LA, NaN dropped
    b = curve([(0.7, 0.30), (0.9, 0.50), (0.9, 0.50)])  # equal LA averaged
    assert a == [(0.6, 0.10), (0.8, 0.20), (1.0, 0.40)] and b == [(0.7, 0.30), (0.9, 0.50)]
    assert interp(a, 0.7) == pytest.approx(0.15) and interp(a, 0.9) == pytest.approx(0.30)
    assert interp(a, 0.59) is None and interp(a, 1.01) is None  # never extrapolated
    assert overlap(a, b) == (0.7, 0.9)
    g = matched_gap(a, b)
    # ΔF(LA) = −0.15 − 0.5 (LA − 0.7) on [0.7, 0.8], then −0.2 on [0.8, 0.9]; 21 grid points
    assert g["range"] == (0.7, 0.9) and len(g["grid"]) == 21
    assert g["delta"][0] == pytest.approx(-0.15) and g["delta"][-1] == pytest.approx(-0.2)
    assert g["mean"] == pytest.approx(-3.925 / 21)


def test_no_overlap_and_one_point_overlap():
    lo, hi = [(0.5, 0.1), (0.6, 0.2)], [(0.7, 0.3), (0.9, 0.5)]
    g = matched_gap(lo, hi)
    assert g["range"] is None and math.isnan(g["mean"]) and g["delta"] == []
    touch = matched_gap([(0.5, 0.1), (0.7, 0.2)], [(0.7, 0.3), (0.9, 0.5)])
    assert touch["range"] == (0.7, 0.7) and touch["grid"] == [0.7] and touch["mean"] == pytest.approx(-0.1)
    single = matched_gap([(0.8, 0.1)], [(0.7, 0.3), (0.9, 0.5)])  # one-point arm inside the baseline's range
    assert single["range"] == (0.8, 0.8) and single["mean"] == pytest.approx(-0.3)


def test_arm_recognition_and_grid_point_from_config():
    assert arm_of("dense-vanilla-lr3e-4") == "dense-vanilla" and arm_of("dense-vanilla-lr0.001") == "dense-vanilla"
    assert arm_of("dense-ewc-lam100") == "dense-ewc" and arm_of("split-acft") == "split-acft"
    assert arm_of("lr3e-4") == "lr3e-4"  # no stem: an arm of its own
    assert knob({"train": {"lr": 0.0003}, "strategies": ["vanilla"]}) == "lr=0.0003"
    assert knob({"train": {"lr": 0.001}, "strategies": ["ewc"], "ewc": {"lam": 100.0}}) == "lr=0.001, λ=100"


# ----------------------------------------------------------------------------- from rows: a replicated grid


def matrix(la: float, f: float) -> list[list[float]]:
    """A 3-task retain matrix with learning accuracy `la` and Chaudhry forgetting `f` (exactly)."""
    return [[0.1, 0.1, 0.1], [la, 0.1, 0.1], [la - f, la, 0.1], [la - f, la - f, la]]


def grid_rows(arm: str, points: list[tuple[float, float, float]], reps: int, noise: float = 0.0) -> tuple:
    """Rows of runs `{arm}-lr{lr}` (one per grid point (lr, LA, F)), `reps` replicates x 2 orders each; replicate
    r shifts F by noise * (r − mid) in both orders. Returns (rows, replicates, configs)."""
    rows, replicates, configs = [], {}, {}
    for lr, la, f in points:
        run = f"{arm}-lr{lr:g}"
        configs[run] = {"train": {"lr": lr}, "strategies": ["vanilla"]}
        for r in range(reps):
            for order in (0, 1):
                R = matrix(la, f + noise * (r - (reps - 1) / 2))
                rows += [{"run": run, "seed": r, "order": order, "after_task": i - 1, "step": 10 * i, "eval_task": j,
                          "kind": "retain", "metric": "acc", "value": v} for i, row in enumerate(R)
                         for j, v in enumerate(row)]
                replicates[(run, r, order)] = r
    return rows, replicates, configs


def test_matched_gap_grid_ends_exactly_on_the_overlap_when_rounding_overshoots():
    """lo + (hi - lo) rounds above hi for some floats (0.00987654 .. 0.02962962); the grid's last point must be
    hi itself, inside both curves, so every grid point has a ΔF (the study report crashed on None - float)."""
    lo, hi = 0.009876540000000001, 0.02962962
    assert lo + (hi - lo) * 20 / 20 > hi  # the float trap this guards
    a, b = [(lo, 0.1), (0.5, 0.3)], [(0.0, 0.2), (hi, 0.4)]
    g = matched_gap(a, b)
    assert g["range"] == (lo, hi) and g["grid"][-1] == hi and all(x <= hi for x in g["grid"])
    assert len(g["delta"]) == 21 and all(d is not None for d in g["delta"])


def test_h2_verdict_at_matched_learning_with_replicates():
    """The sparse arm learns less at each lr; at one lr it forgets 0.2 less, at matched LA only 0.1 less: the
    frontier compares F at the same LA."""
    base, rb, _ = grid_rows("dense", [(1e-3, 0.90, 0.43), (3e-4, 0.70, 0.23)], reps=5, noise=0.01)
    arm, ra, _ = grid_rows("sparse", [(1e-3, 0.80, 0.23), (3e-4, 0.60, 0.03)], reps=5, noise=0.01)
    rows, reps = base + arm, {**rb, **ra}
    fr = frontiers(rows, reps)
    assert set(fr) == {"dense", "sparse"} and [p["run"] for p in fr["dense"]] == ["dense-lr0.0003", "dense-lr0.001"]
    assert fr["dense"][0]["LA"]["mean"] == pytest.approx(0.7) and fr["dense"][0]["F"]["n"] == 5
    md = matched_delta(fr["sparse"], fr["dense"])
    assert md["pooled"]["range"] == pytest.approx((0.7, 0.8))
    # sparse F(LA) = 0.03 + (LA − 0.6), dense F(LA) = 0.23 + (LA − 0.7): ΔF = −0.1 on the whole range
    assert md["pooled"]["mean"] == pytest.approx(-0.1) and md["stats"]["n"] == 5
    ev = evidence(rows, {}, baseline="dense-lr0.001", replicates=reps)["H2"]["runs"]
    assert ev["sparse"]["verdict"] == "supported" and "matched LA range [0.700, 0.800]" in ev["sparse"]["note"]
    # the same runs without replicate information: 10 streams of ONE model each -> units are streams, labelled
    flat = evidence(rows, {}, baseline="dense-lr0.001")["H2"]["runs"]["sparse"]
    assert "ONE pretrained model" in flat["unit"]
    # four replicates are not enough for any verdict
    few = {k: v for k, v in reps.items() if k[1] < 4}
    rows4 = [r for r in rows if r["seed"] < 4]
    assert evidence(rows4, {}, baseline="dense-lr0.001", replicates=few)["H2"]["runs"]["sparse"]["verdict"] == (
        "inconclusive")


def test_h2_without_overlap_is_inconclusive_never_extrapolated():
    base, rb, _ = grid_rows("dense", [(1e-3, 0.95, 0.30)], reps=5, noise=0.01)
    arm, ra, _ = grid_rows("split", [(1e-3, 0.60, 0.02)], reps=5, noise=0.01)
    ev = evidence(base + arm, {}, baseline="dense-lr0.001", replicates={**rb, **ra})["H2"]["runs"]["split"]
    assert ev["verdict"] == "inconclusive" and "no overlap" in ev["note"]
    raw = ev["stats"]["ΔF Chaudhry as run (descriptive)"]  # shown, but carries no verdict
    assert raw["mean"] == pytest.approx(-0.28) and raw["n"] == 5


# ----------------------------------------------------------------------------- the rule under the null


def test_null_false_supported_rate_at_most_5_percent_at_n5_and_the_rule_has_power():
    """Arm and baseline drawn from the same process (the project's own metric, pairing and verdict functions):
    'supported' must be rare at n = 5; and with a real effect of −0.15 in F it must be common (the rule is not
    simply silent)."""
    assert simulate_null(5, sims=600, seed=1) <= 0.05
    assert simulate_null(5, sims=150, seed=2, effect=-0.15) >= 0.8
    assert simulate_null(4, sims=150, seed=2, effect=-0.15) == 0.0  # n < 5: never a verdict


# ----------------------------------------------------------------------------- the report


def test_report_draws_the_frontier_and_says_its_unit(tmp_path, monkeypatch):
    from topocl import plots
    from topocl.report import write_report

    monkeypatch.setattr(plots, "render_all", lambda *a: [])  # the other figures: tests/test_report.py
    base, rb, cb = grid_rows("dense", [(1e-3, 0.90, 0.43), (3e-4, 0.70, 0.23)], reps=5, noise=0.01)
    arm, ra, ca = grid_rows("sparse", [(1e-3, 0.80, 0.23), (3e-4, 0.60, 0.03)], reps=5, noise=0.01)
    rows, reps, configs = base + arm, {**rb, **ra}, {**cb, **ca}
    dirs = []
    for (run, seed, _order), rep in sorted(reps.items()):  # one directory per (run, replicate), like a sweep
        d = tmp_path / "runs" / f"{run}-s{seed}"
        if d not in dirs:
            d.mkdir(parents=True)
            (d / "config.yaml").write_text(json.dumps(configs[run]))
            (d / "meta.json").write_text(json.dumps({"replicate": rep}))
            (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows
                                                     if r["run"] == run and r["seed"] == seed))
            dirs.append(d)
    out = tmp_path / "report"
    md = write_report(dirs, out, baseline="dense-lr0.001").read_text()
    assert "## Stability–plasticity frontier" in md and "![Stability–plasticity frontier](frontier.png)" in md
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| sparse | [0.700, 0.800] | -0.100 |" in md
    assert "5 pretraining seeds (replicates; the 2 streams of each averaged first)" in md
    assert "| lr=0.0003 |" in md
    ev = json.loads((out / "evidence.json").read_text())
    assert ev["H2"]["runs"]["sparse"]["verdict"] == "supported"
