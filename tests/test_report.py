"""The report only reads artifacts and is deterministic: a golden report.md from a fixed fixture."""

from pathlib import Path

from topocl.cli import main
from topocl.report import write_report

FIX = Path(__file__).parent / "fixtures" / "report"
RUNS = [FIX / "dense-vanilla", FIX / "sparse-acft"]


def test_golden_report(tmp_path):
    path = write_report(RUNS, tmp_path, baseline="dense-vanilla")
    assert path.read_text() == (FIX / "golden_report.md").read_text()
    for png in ("accuracy_matrix.png", "forgetting_curves.png", "retention_by_delay.png", "base_acc.png",
                "base_bpb.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png


def test_report_and_metrics_cli(tmp_path, capsys):
    assert main(["report", *map(str, RUNS), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "dense-vanilla" in out and "report:" in out and (tmp_path / "r" / "report.md").is_file()
    assert main(["metrics", str(RUNS[0])]) == 0
    import json

    m = json.loads(capsys.readouterr().out)
    assert {"acc", "bwt_gem", "forgetting_chaudhry", "forgetting_mammoth", "fwt_gem"} <= set(
        m["dense-vanilla"]["retain"]["acc"])
