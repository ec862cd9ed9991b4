"""Metric definitions against the research note's two worked examples (continual_learning.md §3.4, §3.5)."""

import json
import math

import pytest

from topocl import metrics as M
from topocl.results import ResultsError, load_rows, matrices, summarize

NAN = math.nan
# §3.5: synthetic, chosen so that the definitions disagree. Row 0 = initialisation b.
EX2 = [[0.10, 0.10, 0.10, 0.10],
       [0.80, 0.10, 0.10, 0.10],
       [0.60, 0.70, 0.20, 0.15],
       [0.85, 0.50, 0.90, 0.25],
       [0.70, 0.75, 0.40, 0.75]]
JOINT2 = [[NAN] * 4, [0.82, NAN, NAN, NAN], [NAN, 0.78, NAN, NAN], [NAN, NAN, 0.92, NAN], [NAN, NAN, NAN, 0.80]]

# §3.4: TRACE appendix Table 8 (LLaMA-2-7B-Chat, SeqFT); lower triangle only (upper unused by these metrics).
TRACE = [[0.500], [0.456, 0.735], [0.448, 0.670, 0.523], [0.453, 0.658, 0.459, 0.580],
         [0.435, 0.000, 0.433, 0.459, 0.764], [0.442, 0.595, 0.446, 0.509, 0.636, 0.383],
         [0.436, 0.577, 0.442, 0.508, 0.450, 0.247, 0.582],
         [0.454, 0.609, 0.457, 0.512, 0.637, 0.272, 0.548, 0.408]]
EX1 = [[0.0] * 8] + [row + [0.0] * (8 - len(row)) for row in TRACE]


def test_worked_example_2():
    assert M.acc(EX2) == pytest.approx(0.65)
    assert M.bwt_gem(EX2) == pytest.approx(-0.18333, abs=1e-4)
    assert M.fwt_gem(EX2) == pytest.approx(0.08333, abs=1e-4)
    assert M.forgetting_chaudhry(EX2) == pytest.approx(0.2)
    assert M.forgetting_chaudhry_per_task(EX2) == pytest.approx([0.15, -0.05, 0.50])
    assert M.forgetting_avalanche(EX2) == pytest.approx(0.18333, abs=1e-4)
    assert M.forgetting_mammoth(EX2) == pytest.approx(0.21667, abs=1e-4)
    assert M.bwt_all_pairs(EX2) == pytest.approx(-0.15)
    assert M.learning_acc(EX2) == pytest.approx(0.7875)
    assert M.avg_incremental_acc(EX2) == pytest.approx(0.7125)
    assert M.intransigence(EX2, JOINT2) == pytest.approx([0.02, 0.08, 0.02, 0.05])


def test_worked_example_1_trace():
    assert M.acc(EX1) == pytest.approx(0.4871, abs=1e-4)
    assert M.bwt_gem(EX1) == pytest.approx(-0.0826, abs=1e-4)
    assert M.forgetting_chaudhry(EX1) == pytest.approx(0.0826, abs=1e-4)
    assert M.forgetting_chaudhry_per_task(EX1) == pytest.approx([0.046, 0.126, 0.066, 0.068, 0.127, 0.111, 0.034],
                                                                abs=1e-3)
    assert M.forgetting_avalanche(EX1) == pytest.approx(0.0826, abs=1e-4)
    assert M.forgetting_mammoth(EX1) == pytest.approx(0.0826, abs=1e-4)
    assert M.learning_acc(EX1) == pytest.approx(0.5594, abs=1e-4)
    assert M.avg_incremental_acc(EX1) == pytest.approx(0.5063, abs=1e-4)
    assert M.bwt_all_pairs(EX1) == pytest.approx(-0.1156, abs=1e-4)
    assert M.forgetting_trajectory(EX1) == pytest.approx([0.044, 0.059, 0.063, 0.253, 0.095, 0.138, 0.083], abs=1e-3)


@pytest.mark.parametrize("R", [EX1, EX2])
def test_identity_acc_equals_la_plus_scaled_bwt(R):
    t = len(R) - 1
    assert M.acc(R) == pytest.approx(M.learning_acc(R) + (t - 1) / t * M.bwt_gem(R))


def test_retention_crossover_bootstrap_and_shape_errors():
    assert M.retention_by_delay(EX2) == pytest.approx({0: 0.7875, 1: (0.6 + 0.5 + 0.4) / 3, 2: (0.85 + 0.75) / 2,
                                                       3: 0.7})
    assert M.crossover([0.1, 0.5, 0.3, 0.6, 0.7], [0.2, 0.4, 0.4, 0.5, 0.5]) == 3
    assert M.crossover([0.1, 0.2], [0.3, 0.3]) is None and M.crossover([0.5, 0.6], [0.1, 0.1]) == 0
    mean, lo, hi = M.bootstrap_ci([0.1, 0.2, 0.3, 0.4])
    assert mean == pytest.approx(0.25) and 0.1 <= lo < mean < hi <= 0.4
    assert M.bootstrap_ci([0.3]) == (0.3, 0.3, 0.3)
    with pytest.raises(ValueError, match="T \\+ 1 rows"):
        M.acc([[0.1, 0.2], [0.3]])


def rows_for(R, run="a", seed=0, kind="retain"):
    return [{"run": run, "seed": seed, "order": 0, "after_task": i - 1, "step": 10 * i, "eval_task": j, "kind": kind,
             "metric": "acc", "value": v} for i, row in enumerate(R) for j, v in enumerate(row)]


def test_rows_round_trip_into_matrices_and_summary(tmp_path):
    rows = rows_for(EX2) + rows_for(EX2, seed=1)
    # an intra-task evaluation (after task 0, later step) must not replace the boundary row
    rows.append({"run": "a", "seed": 0, "order": 0, "after_task": 0, "step": 15, "eval_task": 0, "kind": "retain",
                 "metric": "acc", "value": 0.0})
    p = tmp_path / "results.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_rows(p)
    assert matrices(loaded)[("a", 0, 0)] == EX2
    s = summarize(loaded)["a"]["retain"]["acc"]
    assert s["acc"]["mean"] == pytest.approx(0.65) and s["acc"]["n"] == 2
    assert s["forgetting_chaudhry"]["ci_low"] == pytest.approx(0.2)


def test_bad_rows_name_file_line_and_field(tmp_path):
    p = tmp_path / "r.jsonl"
    good = rows_for(EX2)[0]
    p.write_text(json.dumps(good) + "\n" + json.dumps({**good, "value": "high"}) + "\n")
    with pytest.raises(ResultsError, match=r"r.jsonl:2: field 'value'"):
        load_rows(p)
    p.write_text(json.dumps({**good, "extra": 1}) + "\n")
    with pytest.raises(ResultsError, match="unexpected \\['extra'\\]"):
        load_rows(p)
