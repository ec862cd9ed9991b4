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


def rows_for(R, run="a", seed=0, kind="retain", order=0):
    return [{"run": run, "seed": seed, "order": order, "after_task": i - 1, "step": 10 * i, "eval_task": j,
             "kind": kind, "metric": "acc", "value": v} for i, row in enumerate(R) for j, v in enumerate(row)]


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


def test_single_task_and_missing_entries():
    R1 = [[0.1], [0.9]]
    assert M.acc(R1) == M.learning_acc(R1) == M.avg_incremental_acc(R1) == pytest.approx(0.9)
    for fn in (M.bwt_gem, M.bwt_all_pairs, M.fwt_gem, M.forgetting_chaudhry, M.forgetting_avalanche,
               M.forgetting_mammoth):
        assert math.isnan(fn(R1)), fn.__name__
    assert M.retention_by_delay(R1) == {0: pytest.approx(0.9)}
    # a task without probes of a kind is a NaN column: its terms are skipped, the rest is the textbook value
    R = [row[:3] + [NAN] for row in EX2]
    sub = [row[:3] for row in EX2[:4]]  # the same stream had it stopped after task 3
    assert M.learning_acc(R) == pytest.approx(M.learning_acc(sub))
    assert M.acc(R) == pytest.approx((0.70 + 0.75 + 0.40) / 3)
    assert M.bwt_gem(R) == pytest.approx(((0.70 - 0.80) + (0.75 - 0.70) + (0.40 - 0.90)) / 3)
    assert M.forgetting_mammoth(R) == pytest.approx((0.15 + 0.0 + 0.50) / 3)
    assert math.isnan(M.acc([[NAN, NAN], [NAN, NAN], [NAN, NAN]]))
    with pytest.raises(ValueError, match="outside"):
        M.forgetting_chaudhry(EX2, k=5)
    with pytest.raises(ValueError, match="outside"):
        M.avg_acc_after(EX2, 0)


def random_matrix(rng, t):
    return [[round(rng.random(), 3) for _ in range(t)] for _ in range(t + 1)]


def test_definitions_relate_as_the_note_says_on_random_matrices():
    import random

    rng = random.Random(1)
    for t in (2, 3, 7, 20):
        R = random_matrix(rng, t)
        assert M.acc(R) == pytest.approx(M.learning_acc(R) + (t - 1) / t * M.bwt_gem(R))
        assert M.forgetting_avalanche(R) == pytest.approx(-M.bwt_gem(R))
        assert M.forgetting_mammoth(R) >= M.forgetting_chaudhry(R) - 1e-12 and M.forgetting_mammoth(R) >= 0
        assert M.retention_by_delay(R)[0] == pytest.approx(M.learning_acc(R))
        assert M.avg_acc_curve(R)[-1] == pytest.approx(M.acc(R))
        assert M.forgetting_trajectory(R)[-1] == pytest.approx(M.forgetting_chaudhry(R))


def test_base_ability_crossover_edges_and_bootstrap_determinism():
    assert M.base_ability([0.9, 0.8, 0.6]) == pytest.approx({"initial": 0.9, "final": 0.6, "change": -0.3})
    with pytest.raises(ValueError):
        M.base_ability([])
    assert M.crossover([0.5, NAN, 0.6], [0.4, 0.4, 0.4]) == 2  # a missing point breaks "stays above"
    assert M.crossover([0.5, 0.5], [0.5, 0.4]) == 1  # ties are not above
    with pytest.raises(ValueError, match="same length"):
        M.crossover([0.1], [0.1, 0.2])
    vals = [0.61, 0.55, 0.72, 0.58, 0.66]
    assert M.bootstrap_ci(vals) == M.bootstrap_ci(vals)  # fixed seed: reports are reproducible
    assert M.bootstrap_ci([0.4, 0.4, 0.4]) == pytest.approx((0.4, 0.4, 0.4))
    assert M.bootstrap_ci([0.2, NAN, 0.4])[0] == pytest.approx(0.3)
    assert all(math.isnan(x) for x in M.bootstrap_ci([NAN]))
    wide, narrow = M.bootstrap_ci([0.0, 1.0, 0.0, 1.0]), M.bootstrap_ci([0.49, 0.51, 0.49, 0.51])
    assert wide[2] - wide[1] > 10 * (narrow[2] - narrow[1])


def row(**kw):
    base = {"run": "a", "seed": 0, "order": 0, "after_task": 0, "step": 10, "eval_task": 0, "kind": "retain",
            "metric": "acc", "value": 0.5}
    return {**base, **kw}


@pytest.mark.parametrize("bad, message", [
    (row(kind="base"), "eval_task' must be -1 for kind base"),
    (row(eval_task=-1), "eval_task' must be -1 for kind base"),
    (row(kind="forget"), "field 'kind'"),
    (row(seed=True), "field 'seed' must be int"),
    (row(step=1.5), "field 'step' must be int"),
    (row(after_task=-2), "after_task must be >= -1"),
    (row(run=""), "field 'run' is empty"),
    ([1, 2], "expected a JSON object"),
])
def test_row_validation(tmp_path, bad, message):
    p = tmp_path / "results.jsonl"
    p.write_text(json.dumps(row(step=0)) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(ResultsError, match=f"results.jsonl:3: .*{message}"):
        load_rows(p)


def test_duplicates_bad_json_and_missing_file(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_text(json.dumps(row()) + "\n" + json.dumps(row(value=0.7)) + "\n")
    with pytest.raises(ResultsError, match=r"results.jsonl:2: duplicate of .*results.jsonl:1"):
        load_rows(p)
    p.write_text(json.dumps(row()) + "\n{oops\n")
    with pytest.raises(ResultsError, match=r"results.jsonl:2: invalid JSON"):
        load_rows(p)
    with pytest.raises(ResultsError, match="no results file"):
        load_rows(tmp_path / "nope")


def test_cost_schema(tmp_path):
    from topocl.results import load_cost

    entry = {"trainable_params": 100, "optimizer_state_bytes": 800, "peak_memory_bytes": 2**20, "step_time_s": 0.02,
             "tokens": 1000, "wall_s": 3.0, "device": "cpu"}
    p = tmp_path / "cost.json"
    p.write_text(json.dumps(entry))
    assert load_cost(p)["tokens"] == 1000 and load_cost(p)["device"] == "cpu"
    runs = [{"seed": 0, "order": 0, **entry, "trainable_by_role": {"mlp": 100}},
            {"seed": 1, "order": 0, **entry, "wall_s": 5.0, "device": "cuda:0"}]
    p.write_text(json.dumps({"runs": runs, "wall_s": 4.0, "seed": 0.5, "tokens": 1000.0}))
    c = load_cost(p)
    assert c["wall_s"] == pytest.approx(4.0) and c["device"] == "cpu, cuda:0" and len(c["entries"]) == 2
    for bad, message in [({**entry, "gpu": 1}, r"unexpected \['gpu'\]"), ({**entry, "tokens": -1}, "'tokens'"),
                         ({k: v for k, v in entry.items() if k != "wall_s"}, r"missing \['wall_s'\]"),
                         ({**entry, "device": 0}, "'device'"), ({"runs": [entry]}, r"runs\[0\].*missing \['order'"),
                         ({"runs": runs, "note": "x"}, "unexpected top-level field 'note'")]:
        p.write_text(json.dumps(bad))
        with pytest.raises(ResultsError, match=message):
            load_cost(p)


def test_summary_of_update_base_joint_crossover_and_unfinished(tmp_path):
    rows = rows_for(EX2) + rows_for(EX2, order=1)
    # update probes on task 0 only (other columns absent); graded on the old answer
    rows += [{**r, "eval_task": 0, "kind": "update"} for r in rows_for([[0.1], [0.9], [0.8], [0.3], [0.2]])]
    rows += [row(after_task=i - 1, step=10 * i, eval_task=-1, kind="base", metric="bpb", value=v)
             for i, v in enumerate([0.3, 0.4, 0.5, 0.5, 0.6])]
    # joint reference: order 0 only, two seeds whose diagonals average to a*
    for seed, shift in ((1, 0.01), (2, -0.01)):  # seeds the run does not have: mean over them
        J = [[v + shift if i == j + 1 else 0.1 for j, v in enumerate(r)] for i, r in enumerate(JOINT2)]
        rows += rows_for([[0.1] * 4] + J[1:], run="joint", seed=seed)
    worse = [[v - 0.1 * (i > 1) for v in r] for i, r in enumerate(EX2)]
    rows += rows_for(worse, run="base") + rows_for(EX2[:3], run="a", seed=5)  # seed 5 killed after task 1
    s = summarize(rows, joint_run="joint", baseline_run="base")
    a = s["a"]
    assert a["n"] == {"streams": 3, "finished": 2, "tasks": 4, "units": 2,
                      "unit": "2 streams (1 continual seed × 2 orders) of ONE pretrained model"}
    assert a["retain"]["acc"]["acc"]["values"] == pytest.approx([0.65, 0.65])
    assert a["retain"]["acc"]["intransigence"]["values"][0] == pytest.approx(0.0425)  # a* = mean of the seeds
    assert len(a["retain"]["acc"]["intransigence"]["values"]) == 1  # no joint reference for order 1
    assert a["retain"]["acc"]["crossover"] == 1  # A_1 ties the baseline, A_2.. are 0.1 above
    u = a["update"]["acc"]
    assert u["learning_acc"]["mean"] == pytest.approx(0.9) and u["acc"]["mean"] == pytest.approx(0.2)
    assert u["forgetting_avalanche"]["mean"] == pytest.approx(0.7)
    b = a["base"]["bpb"]["base_ability"]
    assert b["curve"] == pytest.approx([0.3, 0.4, 0.5, 0.5, 0.6]) and b["change"]["mean"] == pytest.approx(0.3)
    assert "intransigence" not in s["joint"]["retain"]["acc"] and "crossover" not in s["base"]["retain"]["acc"]


# ----------------------------------------------------------------------------- units of replication, t-intervals


def test_student_t_quantiles_and_interval_hand_computed():
    for df, q in ((1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (9, 2.2621572), (30, 2.0422725)):
        assert M.t_quantile(0.975, df) == pytest.approx(q, abs=1e-6)
    assert M.t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-9) and M.t_cdf(-2.015048, 5) == pytest.approx(0.05)
    mean, lo, hi = M.t_interval([1.0, 2.0, 3.0, 4.0, NAN])  # s = 1.2910, half-width = 3.1824 * s / 2
    assert mean == 2.5 and hi - mean == pytest.approx(3.182446 * math.sqrt(5 / 3) / 2, abs=1e-5)
    assert lo == pytest.approx(5 - hi)
    assert M.t_interval([0.3])[0] == 0.3 and math.isnan(M.t_interval([0.3])[1])  # one unit: no interval
    with pytest.raises(ValueError, match="0 < p < 1"):
        M.t_quantile(1.0, 3)


def test_summary_ci_is_over_replicates_with_nested_streams_averaged_first():
    """Three pretraining seeds (replicates), each continued with two orders: the unit is the replicate, the
    per-replicate value is the mean of its two streams, and n = 3 (not 6)."""
    rows, reps = [], {}
    for rep in range(3):
        for order in range(2):
            R = [[v + 0.05 * rep - 0.02 * order if i > 0 else v for v in r] for i, r in enumerate(EX2)]
            rows += rows_for(R, seed=rep, order=order)
            reps[("a", rep, order)] = rep
    s = summarize(rows, replicates=reps)["a"]
    acc = s["retain"]["acc"]["acc"]
    assert acc["n"] == 3 and acc["units"] == [0, 1, 2]
    assert acc["values"] == pytest.approx([0.64, 0.69, 0.74])  # (0.65 + 0.63) / 2 + 0.05 rep
    assert (acc["ci_low"], acc["ci_high"]) == pytest.approx(M.t_interval([0.64, 0.69, 0.74])[1:])
    assert s["n"]["units"] == 3
    assert s["n"]["unit"] == "3 pretraining seeds (replicates; the 2 streams of each averaged first)"
    # without replicate information every stream is a unit, and the label says it is ONE pretrained model
    flat = summarize(rows)["a"]
    assert flat["retain"]["acc"]["acc"]["n"] == 6 and "of ONE pretrained model" in flat["n"]["unit"]


def test_crossover_interval_bootstraps_units():
    base = {u: [0.5, 0.5, 0.5] for u in range(5)}
    above = {u: [0.4, 0.6, 0.6] for u in range(5)}  # every unit crosses after task 1: a zero-width interval
    assert M.crossover_interval(above, base) == (1, 1)
    mixed = {0: [0.4, 0.6, 0.6], 1: [0.4, 0.6, 0.6], 2: [0.4, 0.4, 0.4], 3: [0.6, 0.6, 0.6], 4: [0.6, 0.6, 0.6]}
    lo, hi = M.crossover_interval(mixed, base)
    assert lo == 0 and hi is None  # some resamples cross at 0, some never
    assert M.crossover_interval({0: [0.6, 0.6, 0.6]}, base) is None  # one unit: no interval
    assert M.crossover_interval(mixed, base) == M.crossover_interval(mixed, base)  # fixed seed
