"""The report only reads artifacts and is deterministic: a golden report.md from a fixed fixture.

The fixture is written by tests/fixtures/report/make_fixture.py. After an intended change to the report,
regenerate the golden file and review its diff:
    .venv/bin/topocl report tests/fixtures/report/{dense-vanilla,sparse-acft,dense-joint} --baseline dense-vanilla \
        --out /tmp/golden && cp /tmp/golden/report.md tests/fixtures/report/golden_report.md
"""

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from topocl.cli import main
from topocl.report import fmt, write_report

FIX = Path(__file__).parent / "fixtures" / "report"
RUNS = [FIX / "dense-vanilla", FIX / "sparse-acft", FIX / "dense-joint"]
PNGS = ("accuracy_matrix.png", "forgetting_curves.png", "seen_accuracy.png", "retention_by_delay.png",
        "base_acc.png", "base_bpb.png", "frontier.png")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return write_report(RUNS, out, baseline="dense-vanilla"), out


def test_golden_report(rendered):
    path, out = rendered
    assert path.read_text() == (FIX / "golden_report.md").read_text()
    for png in PNGS:
        assert f"]({png})" in path.read_text()
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
        img = plt.imread(out / png)
        assert img.shape[0] > 300 and img.shape[1] > 500 and img[..., :3].std() > 0.05, png  # not blank


def test_report_numbers_are_the_worked_example(rendered):
    """dense-vanilla's first stream is the research note's worked example 2 (an intra-task collapse row in it
    must be ignored), and dense-joint holds its a*; summary.json keeps per-stream values in (seed, order) order."""
    _, out = rendered
    s = json.loads((out / "summary.json").read_text())
    r = s["dense-vanilla"]["retain"]["acc"]
    expect = {"acc": 0.65, "bwt_gem": -0.18333, "fwt_gem": 0.08333, "forgetting_chaudhry": 0.2,
              "forgetting_avalanche": 0.18333, "forgetting_mammoth": 0.21667, "bwt_all_pairs": -0.15,
              "learning_acc": 0.7875, "avg_incremental_acc": 0.7125, "intransigence": 0.0425}
    for name, value in expect.items():
        assert r[name]["values"][0] == pytest.approx(value, abs=1e-4), name
        assert r[name]["ci_low"] <= r[name]["mean"] <= r[name]["ci_high"] and r[name]["n"] == 4
    assert s["sparse-acft"]["retain"]["acc"]["crossover"] == 1
    assert s["dense-vanilla"]["update"]["acc"]["acc"]["values"][0] == pytest.approx((0.20 + 0.25) / 2)
    assert s["sparse-acft"]["n"] == {"streams": 4, "finished": 4, "tasks": 4, "units": 4,
                                     "unit": "4 streams (2 continual seeds × 2 orders) of ONE pretrained model"}
    assert s["sparse-acft"]["retain"]["acc"]["crossover_ci"] == [1, 1]


def test_report_and_metrics_cli(tmp_path, capsys):
    assert main(["report", *map(str, RUNS), "--baseline", "dense-vanilla", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "dense-vanilla" in out and "report:" in out and (tmp_path / "r" / "report.md").is_file()
    assert main(["metrics", *map(str, RUNS), "--baseline", "dense-vanilla"]) == 0

    def no_nan(c):
        raise AssertionError(f"non-JSON constant {c}")

    m = json.loads(capsys.readouterr().out, parse_constant=no_nan)
    block = m["dense-vanilla"]["retain"]["acc"]
    assert {"acc", "learning_acc", "avg_incremental_acc", "bwt_gem", "fwt_gem", "forgetting_chaudhry",
            "forgetting_avalanche", "forgetting_mammoth", "intransigence", "retention_by_delay"} <= set(block)
    assert m["sparse-acft"]["retain"]["acc"]["crossover"] == 1
    assert set(m["dense-vanilla"]["base"]) == {"acc", "bpb"} and "base_ability" in m["dense-vanilla"]["base"]["bpb"]
    assert m["dense-vanilla"]["cost"]["trainable_params"] == 958592 and len(m["dense-vanilla"]["cost"]["entries"]) == 4
    assert block["acc"]["mean"] == pytest.approx(0.655)


def test_errors_name_the_problem(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 1
    assert "is not a run directory" in capsys.readouterr().err
    assert main(["report", str(RUNS[0]), "--baseline", "dense-vanila", "--out", str(tmp_path / "r")]) == 1
    assert "'dense-vanila' is not among the runs" in capsys.readouterr().err
    assert main(["report", str(RUNS[0]), str(RUNS[0]), "--out", str(tmp_path / "r")]) == 1
    assert "duplicate of" in capsys.readouterr().err


def test_report_says_the_unit_of_every_ci(rendered):
    """The fixture's runs each continue ONE pretrained model (no replicate in meta.json): every CI says so, and
    H2 has no verdict (one replicate; and the two runs' LA ranges do not overlap, so nothing is matched)."""
    path, out = rendered
    md = path.read_text()
    assert md.count("4 streams (2 continual seeds × 2 orders) of ONE pretrained model") >= 2
    assert "95% Student-t CI" in md and "percentile-bootstrap CI, 2000" not in md
    ev = json.loads((out / "evidence.json").read_text())
    assert ev["H2"]["runs"]["sparse-acft"]["verdict"] == "inconclusive"
    assert "no overlap" in ev["H2"]["runs"]["sparse-acft"]["note"]


def test_fmt_and_no_torch():
    assert fmt({"mean": -0.0001, "ci_low": -0.0002, "ci_high": 0.3, "n": 2}) == "0.000 [0.000, 0.300]"
    assert fmt({"mean": 0.5, "ci_low": 0.5, "ci_high": 0.5, "n": 1}) == "0.500" and fmt(None) == "–"
    code = "import sys, topocl.report, topocl.results, topocl.metrics, topocl.plots; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "reports must not import torch"


def test_type_block_is_the_worked_example():
    """One rule taught by task 1 of 3 (the other columns NaN), two replicates, by hand:
    seed 0: the rule column reads 0, 0, 1, .5 (rows after task -1..2): LA 1, final .5, F 1 - .5 = .5, d1 .5;
    seed 1: 0, 0, .5, .5: LA .5, final .5, F 0, d1 .5. Means: LA .75, ACC .5, F .25; delay 2 has no cell."""
    from topocl.report import _by_type
    from topocl.results import type_block

    nan = float("nan")

    def R(col):
        return [[nan, v, nan] for v in col]

    mats = {(0, 0): R([0.0, 0.0, 1.0, 0.5]), (1, 0): R([0.0, 0.0, 0.5, 0.5])}
    b = type_block(mats, {(0, 0): 0, (1, 0): 1})
    assert b["learning_acc"]["mean"] == pytest.approx(0.75) and b["learning_acc"]["n"] == 2
    assert b["acc"]["mean"] == pytest.approx(0.5) and b["forgetting_chaudhry"]["mean"] == pytest.approx(0.25)
    assert sorted(b["retention_by_delay"]) == [0, 1] and b["retention_by_delay"][1]["mean"] == pytest.approx(0.5)
    assert b["tasks"] == 1.0
    md = "\n".join(_by_type({"arm": {"by_type": {"rule": b}}}, [], {}, None, []))
    assert "| arm | rule | 1.0 | 0.750 [" in md and "recall at delay 1" in md


def test_type_delta_f_at_matched_la_is_the_worked_example():
    """Two tasks, a rule taught by task 0 only (task 1's rule column is NaN). Baseline grid: (LA, final) =
    (.4, .2), (.8, .4), so F = .5 LA; the arm: (.4, .3), (.8, .6), F = .25 LA. On the matched range [.4, .8]
    ΔF = mean of -.25 LA = -.25 x .6 = -.15."""
    from topocl.report import _by_type
    from topocl.results import summarize

    rows = []
    grid = (("base-lr0.1", .4, .2), ("base-lr0.2", .8, .4), ("arm-lr0.1", .4, .3), ("arm-lr0.2", .8, .6))
    for run, la, final in grid:
        for after, v in ((-1, 0.0), (0, la), (1, final)):
            key = {"run": run, "seed": 0, "order": 0, "after_task": after, "step": after + 1, "kind": "retain"}
            rows += [{**key, "eval_task": 0, "metric": m, "value": v} for m in ("acc", "acc:rule")]
            rows.append({**key, "eval_task": 1, "metric": "acc", "value": 0.5})
    md = "\n".join(_by_type(summarize(rows), rows, {}, "base-lr0.1", []))
    assert "| arm | rule | [0.400, 0.800] | -0.150 | 1 |" in md


def test_probe_type_metric_names_round_trip():
    from topocl.results import probe_type, type_metric

    assert type_metric("fact") == "acc:fact" and probe_type(type_metric("rule")) == "rule"
    assert probe_type("acc") is None and probe_type("acc_sum") is None and probe_type("acc@all") is None
