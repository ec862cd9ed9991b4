"""`topocl demo --quick`: the demo pipeline end to end (pretrain two models, six arms: the 2x2 of topology and role
policy, dense-sota, dense-lora; one report)."""

import pytest

from topocl.cli import main


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    report = (tmp_path / "report" / "report.md").read_text()
    for run in ("dense-vanilla", "dense-acft", "split-vanilla", "split-acft", "dense-sota", "dense-lora"):
        assert f"| {run} |" in report and run in out
    assert (tmp_path / "report" / "accuracy_matrix.png").is_file() and "report:" in out
    assert "H1/H2/H3 evidence" in report and "analysing split-acft: graft, routing, sparsity" in out
    analysis = (tmp_path / "analysis" / "analysis.md").read_text()
    assert "split-acft" in analysis and "dense-vanilla" in analysis
    assert (tmp_path / "split-acft" / "seed0-order0" / "telemetry.jsonl").is_file()
    # a second run reuses every finished stage
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    again = capsys.readouterr().out
    assert again.count("reusing finished") == 8 and "analysing" not in again
