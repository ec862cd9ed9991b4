"""`topocl sweep`: grid expansion, strict keys, parallel local execution, failures, skip on re-launch, report."""

import itertools
import json
import shutil
from pathlib import Path

import pytest
import yaml

from topocl.cli import main
from topocl.config import ConfigError
from topocl.sweep import expand, load_manifest, load_sweep, write_manifest

ROOT = Path(__file__).parents[1]
TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.n_kv_head=1", "model.max_seq_len=32",
        "data.synthetic_docs=200", "data.vocab_size=280", "data.seq_len=32", "train.batch_size=4", "train.steps=2",
        "train.warmup_steps=1", "train.eval_every=2", "train.eval_batches=1", "samples=0", "probe=false"]


def sweep_file(tmp: Path, arms: dict, **top) -> Path:
    doc = {"name": "t", "out_dir": str(tmp / "out"), "seeds": [0], "overrides": TINY,
           "executor": {"workers": 2, "threads": 1}, "arms": arms, **top}
    path = tmp / "s.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_expansion_is_the_cartesian_product_with_stable_names(tmp_path):
    path = ROOT / "configs/sweeps/tiny-arms.yaml"
    cfg, every = load_sweep(path, ["seeds=[0,2]", "orders=[0,3]", f"out_dir={tmp_path}", "all.train.steps=5"])
    cfg.sizes = {"a": ["model.d_model=64"], "b": []}
    runs = expand(cfg, path, every)
    pre, cont = ["dense", "split"], ["dense-vanilla", "dense-acft", "split-vanilla", "split-acft", "dense-sota",
                                     "dense-ewc", "dense-replay", "dense-lora"]
    want = [f"{a}-{z}-s{s}" for a, z, s in itertools.product(pre, "ab", [0, 2])]
    want += [f"{a}-{z}-s{s}-o{o}" for a, z, s, o in itertools.product(cont, "ab", [0, 2], [0, 3])]
    assert [r["name"] for r in runs] == want and len(set(want)) == len(want)
    assert runs == expand(cfg, path, every)  # deterministic
    r = next(r for r in runs if r["name"] == "split-acft-a-s2-o3")
    assert r["kind"] == "continual" and r["needs"] == "split-a-s2"
    assert "model.d_model=64" not in r["overrides"]  # a size's overrides are for pretraining
    assert r["overrides"][-6:] == ["train.steps=5", f"out_dir={tmp_path}/runs/split-acft-a-s2-o3",
                                   "seeds=[2]", "orders=[3]", "run=split-acft-a", f"init={tmp_path}/runs/split-a-s2"]
    p = next(r for r in runs if r["name"] == "dense-b-s2")
    assert "model.d_model=64" in next(r for r in runs if r["name"] == "dense-a-s2")["overrides"]
    assert p["kind"] == "pretrain" and p["overrides"][-2:] == [f"out_dir={tmp_path}/runs/dense-b-s2", "seed=2"]


def test_unknown_keys_are_strict_errors(tmp_path):
    path = ROOT / "configs/sweeps/tiny-arms.yaml"
    with pytest.raises(ConfigError, match="unknown key 'executor.wrokers'"):
        load_sweep(path, ["executor.wrokers=2"])
    cfg, every = load_sweep(path, ["all.train.stepz=3"])
    with pytest.raises(ConfigError, match="unknown key 'train.stepz'"):
        expand(cfg, path, every)
    bad = sweep_file(tmp_path, {"x": {"config": str(ROOT / "configs/pretrain/tiny-dense.yaml"), "seedz": [1]}})
    with pytest.raises(ConfigError, match="unknown key 'arms.x.seedz'"):
        load_sweep(bad)


def test_every_example_sweep_expands_and_dry_run_prints_it(capsys):
    for path in sorted((ROOT / "configs/sweeps").glob("*.yaml")):
        cfg, every = load_sweep(path)
        assert expand(cfg, path, every)
    assert main(["sweep", str(ROOT / "configs/sweeps/tiny-arms.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "20 runs" in out and "split-acft-s1-o0" in out and "[after split-s1]" in out


@pytest.mark.slow
def test_parallel_local_runs_failure_isolation_and_skip_on_relaunch(tmp_path, capsys):
    cfg = str(ROOT / "configs/pretrain/tiny-dense.yaml")
    path = sweep_file(tmp_path, {
        "ok": {"config": cfg, "seeds": [0, 1], "overrides": TINY},
        "bad": {"config": cfg, "overrides": [*TINY, "train.grad_accum=3"]},  # valid keys, fails at run time
        "cl": {"config": str(ROOT / "configs/continual/tiny-dense-vanilla.yaml"), "init_arm": "bad"}}, overrides=[])
    assert main(["sweep", str(path)]) == 1
    out = tmp_path / "out"
    man = load_manifest(out)
    status = {r["name"]: r for r in man["runs"]}
    assert {n: r["status"] for n, r in status.items()} == {"ok-s0": "done", "ok-s1": "done", "bad-s0": "failed",
                                                          "cl-s0-o0": "skipped"}
    assert man["counts"] == {"done": 2, "failed": 1, "skipped": 1, "pending": 0}
    assert "divisible" in Path(status["bad-s0"]["log"]).read_text()  # the log says why
    assert status["ok-s0"]["slot"] != status["ok-s1"]["slot"] or status["bad-s0"]["slot"] != status["ok-s0"]["slot"]
    assert (out / "runs/ok-s0/DONE.json").is_file() and not (out / "runs/bad-s0/DONE.json").exists()
    printed = capsys.readouterr().out
    assert "failed: bad-s0" in printed and "sweep.log" in printed
    # re-launch: done runs are skipped (their logs untouched), the failed one runs again
    before = (out / "runs/ok-s0/sweep.log").read_text()
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert "ok-s0                            done" in capsys.readouterr().out
    assert main(["sweep", str(path)]) == 1
    assert (out / "runs/ok-s0/sweep.log").read_text() == before
    assert (out / "runs/bad-s0/sweep.log").read_text().count("# ") == 2
    # the report over the sweep: pretraining table and status
    assert main(["report", str(out)]) == 0
    md = (out / "report/report.md").read_text()
    assert "## Pretraining runs" in md and "| ok | – | 2/2 |" in md and "bad-s0 | failed" in md


def test_submitit_debug_executor_runs_a_sweep(tmp_path):
    pytest.importorskip("submitit")
    path = sweep_file(tmp_path, {"ok": {"config": str(ROOT / "configs/pretrain/tiny-dense.yaml")}},
                      executor={"kind": "submitit-debug", "threads": 1})
    assert main(["sweep", str(path)]) == 0
    man = load_manifest(tmp_path / "out")
    assert [r["status"] for r in man["runs"]] == ["done"] and man["runs"][0]["job_id"]
    assert json.loads((tmp_path / "out/runs/ok-s0/summary.json").read_text())["val_bpb"] > 0


def test_report_over_a_sweep_pools_seeds_of_an_arm(tmp_path):
    """Continual runs of one arm in separate directories (one per seed) pool into one row, costs included."""
    fixture = ROOT / "tests/fixtures/report/sparse-acft"
    rows = [json.loads(x) for x in (fixture / "results.jsonl").read_text().splitlines() if x.strip()]
    seeds = sorted({r["seed"] for r in rows})
    runs = []
    for s in seeds:  # split the fixture's seeds into per-seed run directories, as a sweep writes them
        d = tmp_path / "sw/runs" / f"acft-s{s}"
        d.mkdir(parents=True)
        (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["seed"] == s))
        shutil.copy(fixture / "config.yaml", d / "config.yaml")
        shutil.copy(fixture / "cost.json", d / "cost.json")
        runs.append({"name": f"acft-s{s}", "arm": "acft", "kind": "continual", "size": "", "seed": s, "order": 0,
                     "out_dir": str(d), "overrides": [], "status": "done"})
    cfg, _ = load_sweep(ROOT / "configs/sweeps/tiny-arms.yaml", [f"out_dir={tmp_path / 'sw'}"])
    write_manifest(tmp_path / "sw", cfg, ROOT / "configs/sweeps/tiny-arms.yaml", runs)
    assert main(["report", str(tmp_path / "sw")]) == 0
    summary = json.loads((tmp_path / "sw/report/summary.json").read_text())
    run = rows[0]["run"]
    assert list(summary) == [run] and summary[run]["n"]["finished"] == len({(r["seed"], r["order"]) for r in rows})
    md = (tmp_path / "sw/report/report.md").read_text()
    assert "## Cost" in md and "## Sweep status" in md and md.index("## Sweep status") < md.index("## Figures")
