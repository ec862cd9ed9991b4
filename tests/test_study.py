"""`topocl study`: expansion and seed pairing, strict keys and missing presets, sharding, budget stop, committed
artifacts, resume on a fresh machine (nothing re-run), re-pretraining a missing checkpoint, status and report;
the `analyze:` key (grafting after the analysed runs, committed per stream, H3 in FINDINGS.md)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import topocl.study_exec as study_exec
import topocl.sweep_exec as sweep_exec
from topocl.analysis.artifacts import run_artifacts
from topocl.cli import main
from topocl.config import ConfigError
from topocl.study import (
    RECORD,
    Estimator,
    committed_dir,
    expand,
    load_study,
    parse_budget,
    parse_shard,
    records,
    shard_units,
    status_line,
)
from topocl.study_exec import run_study
from topocl.study_report import write_findings

ROOT = Path(__file__).parents[1]
PRE = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.n_kv_head=1", "model.max_seq_len=32",
       "data.synthetic_docs=200", "data.vocab_size=280", "data.seq_len=32", "train.batch_size=4", "train.steps=2",
       "train.warmup_steps=1", "train.eval_every=2", "train.eval_batches=1", "samples=0", "probe=false"]
CL = ["stream_options.n_worlds=2", "train.steps=2", "train.batch_size=4", "train.warmup_steps=1", "base_rows=4",
      "eval_base=false"]


def write_study(tmp: Path, **top) -> Path:
    """tmp/studies/toy/study.yaml: the two-run toy study (one tiny pretraining run, one 2-world continual run)."""
    doc = {"question": "Toy question?", "design": "Two runs.", "scratch": str(tmp / "scratch"), "seeds": [0],
           "pretrain_overrides": PRE, "continual_overrides": CL,
           "topologies": {"dense": {"config": str(ROOT / "configs/pretrain/tiny-dense.yaml")}},
           "arms": {"dense-vanilla": {"config": str(ROOT / "configs/continual/tiny-dense-vanilla.yaml"),
                                      "topology": "dense"}},
           "baseline": "dense-vanilla", **top}
    path = tmp / "studies" / "toy" / "study.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def big_study(tmp: Path) -> Path:
    return write_study(tmp, seeds=[0, 3], orders=[0, 1], topologies={
        "dense": {"config": str(ROOT / "configs/pretrain/tiny-dense.yaml")},
        "split": {"config": str(ROOT / "configs/pretrain/tiny-split.yaml")}}, arms={
        "dense-vanilla": {"config": str(ROOT / "configs/continual/tiny-dense-vanilla.yaml"), "topology": "dense",
                          "lr": [1e-3, 3e-3]},
        "split-acft": {"config": str(ROOT / "configs/continual/tiny-split-acft.yaml"), "topology": "split"}},
        baseline="dense-vanilla-lr0.001")


def test_expansion_names_units_and_seed_pairing(tmp_path):
    path = big_study(tmp_path)
    cfg = load_study(path)
    runs = expand(cfg, path)
    assert cfg.name == "toy" and runs == expand(cfg, path)  # the folder's name; deterministic
    want = []
    for s in (0, 3):
        want += [f"pre-dense-s{s}"] + [f"dense-vanilla-lr{lr}-s{s}-o{o}" for lr in ("0.001", "0.003") for o in (0, 1)]
        want += [f"pre-split-s{s}"] + [f"split-acft-s{s}-o{o}" for o in (0, 1)]
    assert [r["name"] for r in runs] == want
    assert [r["unit"] for r in runs] == [0] * 5 + [1] * 3 + [2] * 5 + [3] * 3
    scratch = tmp_path / "scratch"
    for r in runs:
        if r["kind"] == "continual":  # continual seed s on pretraining seed s, from that run's checkpoint
            pre = next(p for p in runs if p["name"] == r["needs"])
            assert pre["seed"] == r["seed"] and pre["unit"] == r["unit"] and pre["topology"] == r["topology"]
            assert f"seeds=[{r['seed']}]" in r["overrides"] and f"init={scratch / r['needs']}" in r["overrides"]
            assert f"run={r['label']}" in r["overrides"] and r["overrides"][-1] == f"out_dir={scratch / r['name']}"
    r = next(r for r in runs if r["name"] == "dense-vanilla-lr0.003-s3-o1")
    assert r["label"] == "dense-vanilla-lr0.003" and {"train.lr=0.003", "orders=[1]"} <= set(r["overrides"])
    assert "train.lr=0.003" not in next(r for r in runs if r["name"] == "split-acft-s3-o1")["overrides"]
    pre = next(r for r in runs if r["name"] == "pre-split-s3")
    assert pre["overrides"][-2:] == ["seed=3", f"out_dir={scratch / 'pre-split-s3'}"]


def test_strict_keys_and_missing_presets(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown key 'arms.dense-vanilla.lrr'"):
        load_study(write_study(tmp_path, arms={"dense-vanilla": {"config": "x.yaml", "topology": "dense", "lrr": [1]}}))
    with pytest.raises(ConfigError, match="arms.a.topology='sparse' is not one of the study's topologies"):
        load_study(write_study(tmp_path, arms={"a": {"config": "x.yaml", "topology": "sparse"}}))
    for analyze, msg in (({"arms": ["dense-vanilla"], "stage": ["graft"]}, "unknown key 'analyze.stage'"),
                         ({"arms": ["dense-vanila"]}, "analyze.arms: 'dense-vanila' is not one of the study's arms"),
                         ({"arms": ["dense-vanilla"], "lr": [1e-3]}, "analyze.lr: 0.001 is not a grid point"),
                         ({"arms": ["dense-vanilla"], "stages": ["grafting"]}, "analyze.stages=.'grafting'.: one"),
                         ({"arms": ["dense-vanilla"], "graft_modes": ["undo"]}, "analyze.graft_modes=.'undo'.")):
        with pytest.raises(ConfigError, match=msg):
            load_study(write_study(tmp_path, analyze=analyze))
    path = write_study(tmp_path, baseline="dense-ewc")
    with pytest.raises(ConfigError, match="baseline='dense-ewc' is not a run name of this study"):
        expand(load_study(path), path)
    path = write_study(tmp_path, arms={  # an arm whose preset another branch has not delivered yet
        "dense-vanilla": {"config": str(ROOT / "configs/continual/tiny-dense-vanilla.yaml"), "topology": "dense"},
        "dsa-later": {"config": "../../configs/continual/tiny-no-such-arm.yaml", "topology": "dense"}})
    capsys.readouterr()
    assert main(["study", str(path), "--dry-run"]) == 1
    out, err = capsys.readouterr()
    assert "dsa-later-s0-o0" in out and "MISSING PRESET" in out and "0/3 runs done" in out
    assert "missing preset: " in err and "tiny-no-such-arm.yaml (needed by dsa-later)" in err
    cfg = load_study(path)
    with pytest.raises(ConfigError, match="missing presets .*tiny-no-such-arm.yaml"):
        run_study(cfg, path, expand(cfg, path))


def test_shards_are_disjoint_covering_and_deterministic(tmp_path):
    path = big_study(tmp_path)
    runs = expand(load_study(path), path, check=False)
    units = {r["unit"] for r in runs}
    for n in (1, 2, 3, 5):
        shards = [shard_units(runs, i, n) for i in range(n)]
        assert set().union(*shards) == units and sum(map(len, shards)) == len(units)  # covering, disjoint
        assert shards == [shard_units(runs, i, n) for i in range(n)]
    assert shard_units(runs, 0, 2) == {0, 3} and shard_units(runs, 1, 2) == {1, 2}  # 8 runs each
    assert parse_shard("1/2") == (1, 2)
    for bad in ("2/2", "1", "-1/2"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)
    assert parse_budget("1h30m") == 5400 and parse_budget("90s") == 90 and parse_budget("2.5m") == 150
    with pytest.raises(ConfigError, match="--budget"):
        parse_budget("10 minutes")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy study run twice: within a budget its measured continual estimate does not fit (so only the
    pretraining runs), then without a budget (the continual run, on the committed pretraining)."""
    tmp = tmp_path_factory.mktemp("study")
    path = write_study(tmp, estimate={"pretrain": {"wall_s": 1, "cpu_s": 1},
                                      "continual": {"wall_s": 1e6, "cpu_s": 1e6}, "source": "test"})
    cfg = load_study(path)
    first = run_study(cfg, path, expand(cfg, path), budget_s=parse_budget("10m"))
    first["committed"] = sorted(p.name for p in (path.parent / "runs").iterdir())
    first["scratch"] = sorted(p.name for p in (tmp / "scratch").iterdir())
    findings_first = write_findings(path).read_text()
    second = run_study(cfg, path, expand(cfg, path))
    return {"path": path, "tmp": tmp, "first": first, "second": second, "findings_first": findings_first}


def test_budget_stops_cleanly_between_runs(toy):
    first, root = toy["first"], toy["path"].parent
    assert first["budget_stop"] and first["status"] == {"pre-dense-s0": "done", "dense-vanilla-s0-o0": "not started"}
    assert first["committed"] == first["scratch"] == ["pre-dense-s0"]  # the continual run never started
    assert (root / "runs/pre-dense-s0/run.json").is_file()
    assert "1/2 runs done (pretraining 1/1, continual 0/1)" in toy["findings_first"]
    assert "No continual run is finished yet" in toy["findings_first"]


def test_finished_runs_are_committed_without_checkpoints(toy):
    second, root = toy["second"], toy["path"].parent
    assert second["status"] == {"pre-dense-s0": "done", "dense-vanilla-s0-o0": "done"} and not second["budget_stop"]
    pre, cont = root / "runs/pre-dense-s0", root / "runs/dense-vanilla-s0-o0"
    assert {f.name for f in pre.iterdir()} >= {"config.yaml", "summary.json", "meta.json", "run.json"}
    assert {f.name for f in cont.iterdir()} >= {"config.yaml", "results.jsonl", "cost.json", "meta.json", "run.json"}
    assert not list(root.rglob("*.safetensors")) and not list(root.rglob("checkpoints"))
    rec = json.loads((cont / "run.json").read_text())
    assert rec["seed"] == 0 and rec["label"] == "dense-vanilla" and rec["cpu_s"] > 0
    scratch = toy["tmp"] / "scratch/dense-vanilla-s0-o0"
    assert (cont / "results.jsonl").read_bytes() == (scratch / "results.jsonl").read_bytes()
    rows = [json.loads(x) for x in (cont / "results.jsonl").read_text().splitlines()]
    assert {(r["run"], r["seed"], r["order"]) for r in rows} == {("dense-vanilla", 0, 0)}


def test_status_and_report_count_what_is_finished(toy, capsys):
    path = toy["path"]
    cfg = load_study(path)
    runs = expand(cfg, path, check=False)
    done = records(path, runs)
    line = status_line(cfg, runs, done, Estimator(cfg, done))
    assert line.startswith("study toy: 2/2 runs done (pretraining 1/1, continual 1/1), CPU time ")
    assert "est. remaining 0.0 min CPU" in line
    assert main(["study", "status", str(path.parent)]) == 0
    assert "2/2 runs done" in capsys.readouterr().out
    assert main(["study", "report", str(path.parent)]) == 0
    text = (path.parent / "FINDINGS.md").read_text()
    assert "Toy question?" in text and "n = 1 independent replicates" in text and "Not finished (0): none." in text
    assert "| pretraining dense | 0 | 1/1 |" in text and "| dense-vanilla | 0 | 1/1 |" in text
    assert "## Cost" in text and "## Comparison" in text
    assert "over the finished continual runs (1)" in text and "| dense-vanilla |" in text
    assert (path.parent / "report/report.md").is_file() and "](report/accuracy_matrix.png)" in text


@pytest.fixture(scope="module")
def analysed(toy):
    """A toy study whose dense-vanilla arm runs at learning rates 0.001 and 0.003, with `analyze:` covering only
    0.001 (graft, mode remove), on the toy study's pretraining (pretrain_from): two continual runs, one analysis."""
    tmp = toy["tmp"]
    arm = {"config": str(ROOT / "configs/continual/tiny-dense-vanilla.yaml"), "topology": "dense", "lr": [1e-3, 3e-3]}
    doc = {**yaml.safe_load(toy["path"].read_text()), "pretrain_from": "../toy", "scratch": str(tmp / "scratch-h3"),
           "arms": {"dense-vanilla": arm}, "baseline": "dense-vanilla-lr0.001", "estimate": {},
           "analyze": {"arms": ["dense-vanilla"], "lr": [1e-3], "graft_modes": ["remove"]}}
    path = tmp / "studies/h3/study.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(doc))
    cfg = load_study(path)
    out = run_study(cfg, path, expand(cfg, path))
    return {"path": path, "tmp": tmp, "out": out, "findings": write_findings(path).read_text()}


def test_analysed_runs_commit_graft_rows_for_every_role_group(analysed):
    from topocl.config import from_dict
    from topocl.continual import ContinualConfig, load_init

    root, scratch = analysed["path"].parent / "runs", analysed["tmp"] / "scratch-h3"
    assert set(analysed["out"]["status"].values()) == {"done"}
    yes, no = "dense-vanilla-lr0.001-s0-o0", "dense-vanilla-lr0.003-s0-o0"
    graft = run_artifacts(root / yes)["graft"]  # read from the committed folder alone
    cfg = from_dict(ContinualConfig, yaml.safe_load((root / yes / "config.yaml").read_text()))
    assert cfg.analysis.keep_task_checkpoints
    model = load_init(cfg, torch.device("cpu"))[0]
    roles = set(model.param_roles().values())
    assert {x for r in graft for x in r["roles"].split(",")} == roles  # every role group grafted
    tasks = {r["eval_task"] for r in graft}
    for g in {r["group"] for r in graft}:  # every group: every task's pre-task weights, mode remove only
        assert {(r["task"], r["mode"]) for r in graft if r["group"] == g} == {(j, "remove") for j in tasks}
    rel = "seed0-order0/analysis/graft.jsonl"
    assert (root / yes / rel).read_bytes() == (scratch / yes / rel).read_bytes()
    rec = json.loads((root / yes / "run.json").read_text())
    assert rec["analysis"]["stages"] == ["graft"] and rec["analysis"]["graft_modes"] == ["remove"]
    assert rec["cpu_s"] > rec["analysis"]["cpu_s"] > 0  # the analysis is counted in the run's cost
    assert not (scratch / yes / "seed0-order0/checkpoints").exists()  # task checkpoints deleted after commit
    assert "analysis.keep_task_checkpoints=true" in rec["overrides"]
    other = json.loads((root / no / "run.json").read_text())  # the arm's grid point that `analyze:` leaves out
    assert not list((root / no).rglob("analysis")) and "analysis" not in other
    assert not any("keep_task_checkpoints" in o for o in other["overrides"])


def test_report_has_the_h3_section_of_the_analysed_runs(analysed):
    text = analysed["findings"]
    h3 = text.split("\n## H3 evidence\n", 1)[1].split("\n## ", 1)[0]
    assert "arms dense-vanilla at learning rate 0.001 (results runs `dense-vanilla-lr0.001`)" in h3
    assert "1/1 analysed runs are finished with their analysis" in h3 and "graft modes remove" in h3
    assert "### H3: " in h3 and "| run | statistic | mean [95% t-CI] | n | unit | verdict | note |" in h3
    assert "| dense-vanilla-lr0.001 | fact: d(fast) − d(slow), predicted > 0 |" in h3
    assert "own-task drop d(mlp) (descriptive)" in h3 and "inconclusive" in h3  # one replicate (n < 5)
    assert "dense-vanilla-lr0.003" not in h3


def test_analysis_missing_is_reported_and_run_again(analysed, monkeypatch, capsys):
    path, root = analysed["path"], analysed["path"].parent / "runs/dense-vanilla-lr0.001-s0-o0"
    rec = json.loads((root / "run.json").read_text())
    (root / "run.json").write_text(json.dumps({k: v for k, v in rec.items() if k != "analysis"}))  # an old run
    try:
        assert main(["study", "status", str(path.parent)]) == 0
        out = capsys.readouterr().out
        assert "3/3 runs done" in out and "analysis missing: 1 committed run(s)" in out
        text = write_findings(path).read_text()
        assert "Analysis missing (1): `dense-vanilla-lr0.001-s0-o0`" in text and "0/1 analysed runs" in text
        ran = []
        monkeypatch.setattr(study_exec, "execute", lambda run, env=None, echo=False: ran.append(run["name"]) or
                            {"status": "failed", "returncode": 1, "log": ""})
        shutil.rmtree(analysed["tmp"] / "scratch-h3/dense-vanilla-lr0.001-s0-o0")
        cfg = load_study(path)
        out = run_study(cfg, path, expand(cfg, path))
        assert ran == ["dense-vanilla-lr0.001-s0-o0"] and out["status"]["dense-vanilla-lr0.001-s0-o0"] == "failed"
    finally:
        (root / "run.json").write_text(json.dumps(rec))
    monkeypatch.undo()
    # a scratch run started without its task checkpoints can never be analysed: started again from nothing
    old = analysed["tmp"] / "old"
    old.mkdir()
    (old / "config.yaml").write_text(yaml.safe_dump({"analysis": {"keep_task_checkpoints": False}}))
    monkeypatch.setattr(sweep_exec, "execute_run", lambda run, env=None, echo=False: {"status": "failed"})
    assert study_exec.execute({"analyze": {"stages": ["graft"]}, "out_dir": str(old)})["status"] == "failed"
    assert not old.exists()


def test_fresh_machine_continues_from_committed_artifacts(toy, monkeypatch):
    path, tmp = toy["path"], toy["tmp"]
    results = (path.parent / "runs/dense-vanilla-s0-o0/results.jsonl").read_bytes()
    shutil.rmtree(tmp / "scratch")  # a new machine: the repository only
    monkeypatch.setattr(sweep_exec, "execute_run", lambda *a, **k: pytest.fail("nothing should run"))
    cfg = load_study(path)
    out = run_study(cfg, path, expand(cfg, path))
    assert set(out["status"].values()) == {"done"} and not (tmp / "scratch").exists()
    monkeypatch.undo()
    # a continual run still missing needs the pretraining checkpoint: pretrained again, checked, then run
    pre_rec = (path.parent / "runs/pre-dense-s0/run.json").read_text()
    shutil.rmtree(path.parent / "runs/dense-vanilla-s0-o0")
    out = run_study(cfg, path, expand(cfg, path))
    assert out["status"] == {"pre-dense-s0": "done", "dense-vanilla-s0-o0": "done"} and not out["blocked"]
    assert (tmp / "scratch/pre-dense-s0/checkpoints/LATEST").is_file()
    assert (path.parent / "runs/pre-dense-s0/run.json").read_text() == pre_rec  # the committed record stays
    assert (path.parent / "runs/dense-vanilla-s0-o0/results.jsonl").read_bytes() == results  # deterministic
    # a re-pretraining that does not match the committed summary blocks the replicate's missing runs
    summary = path.parent / "runs/pre-dense-s0/summary.json"
    s = json.loads(summary.read_text())
    summary.write_text(json.dumps({**s, "val_loss": s["val_loss"] * 1.5}))
    shutil.rmtree(path.parent / "runs/dense-vanilla-s0-o0")
    shutil.rmtree(tmp / "scratch/dense-vanilla-s0-o0")
    monkeypatch.setattr(sweep_exec, "execute_run", lambda *a, **k: pytest.fail("nothing should run"))
    out = run_study(cfg, path, expand(cfg, path))
    summary.write_text(json.dumps(s))  # the shared pretraining as it was (other studies build on it)
    why = out["blocked"]["dense-vanilla-s0-o0"]
    assert "re-pretrained pre-dense-s0 differs from the committed run: val_loss" in why
    assert not (path.parent / "runs/dense-vanilla-s0-o0").exists()


def test_pretrain_from_shares_the_other_studys_pretraining(tmp_path):
    first = write_study(tmp_path)
    second = tmp_path / "studies" / "second" / "study.yaml"
    second.parent.mkdir()
    doc = yaml.safe_load(first.read_text())
    second.write_text(yaml.safe_dump({**doc, "pretrain_from": "../toy", "scratch": str(tmp_path / "scratch2")}))
    cfg = load_study(second)
    runs = expand(cfg, second)
    pre, cont = runs
    assert pre["out_dir"] == str(tmp_path / "scratch/pre-dense-s0")
    assert cont["out_dir"] == str(tmp_path / "scratch2/dense-vanilla-s0-o0")
    assert f"init={tmp_path / 'scratch/pre-dense-s0'}" in cont["overrides"]
    assert committed_dir(second, pre) == first.parent / "runs/pre-dense-s0"  # committed where it came from
    assert committed_dir(second, cont) == second.parent / "runs/dense-vanilla-s0-o0"
    second.write_text(yaml.safe_dump({**doc, "pretrain_from": "../toy", "seeds": [7]}))
    with pytest.raises(ConfigError, match="pre-dense-s7 is not a pretraining run of that study"):
        expand(load_study(second), second)
    second.write_text(yaml.safe_dump({**doc, "pretrain_from": "../toy", "topologies": {"dense": {
        "config": str(ROOT / "configs/pretrain/tiny-dense.yaml"), "overrides": ["model.d_ff=96"]}}}))
    with pytest.raises(ConfigError, match="same preset and overrides"):
        expand(load_study(second), second)



def test_committed_run_artifacts_are_not_gitignored():
    """A finished run's artifacts must reach the repository: an ignore rule such as `runs/` (meant for the
    root scratch folder) once matched studies/<name>/runs/ too, so no run of any study was ever committed."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    cfg = load_study(root / "studies" / "window-breaking-tiny" / "study.yaml")
    run = expand(cfg, root / "studies" / "window-breaking-tiny" / "study.yaml")[0]
    paths = [committed_dir(root / "studies" / "window-breaking-tiny", run) / name
             for name in (RECORD, "summary.json", "seed0-order0/results.jsonl", "analysis/graft.jsonl")]
    rel = [str(p.relative_to(root)) for p in paths]
    out = subprocess.run(["git", "check-ignore", "--no-index", *rel], cwd=root, capture_output=True, text=True)
    assert out.returncode == 1 and not out.stdout.strip(), f"ignored by git: {out.stdout}"
    scratch = subprocess.run(["git", "check-ignore", "--no-index", "runs/studies/x/pre-dense-s0/model.safetensors"],
                             cwd=root, capture_output=True, text=True)
    assert scratch.returncode == 0  # the scratch folder (checkpoints) stays out
