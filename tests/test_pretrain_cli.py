"""End-to-end `topocl pretrain`: run directory, resume after a kill, refusal to overwrite, NaN stop, DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from topocl.cli import main

ROOT = Path(__file__).parents[1]
TINY = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.n_kv_head=1", "model.max_seq_len=32",
        "data.synthetic_docs=400", "data.vocab_size=300", "data.seq_len=32", "train.batch_size=8",
        "train.warmup_steps=2", "train.log_every=1", "train.eval_every=5", "train.eval_batches=2", "samples=1"]


def pretrain(out: Path, *extra: str) -> int:
    return main(["pretrain", str(ROOT / "configs/pretrain/tiny-dense.yaml"), *TINY, f"out_dir={out}", *extra])


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def test_run_directory_contents(tmp_path, capsys):
    assert pretrain(tmp_path / "run", "train.steps=6") == 0
    out = tmp_path / "run"
    for f in ("config.yaml", "meta.json", "metrics.jsonl", "tokenizer.json", "samples.txt", "summary.json",
              "probes.json", "checkpoints/LATEST"):
        assert (out / f).exists(), f
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 1337 and sum(meta["params_by_role"].values()) == meta["params_total"]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["train"]["steps"] == 6 and cfg["model"]["vocab_size"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"train_loss", "lr", "tokens_per_s"} <= set(rows[0]) and any("val_bpb" in r for r in rows)
    assert "run directory" in capsys.readouterr().out
    # a second run into the same directory is refused, nothing overwritten
    assert pretrain(out, "train.steps=6") == 1
    assert "resume=true" in capsys.readouterr().err


def test_resume_after_kill_continues_the_same_curve(tmp_path):
    assert pretrain(tmp_path / "a", "train.steps=10", "train.ckpt_every=4") == 0
    straight = losses(tmp_path / "a")
    assert pretrain(tmp_path / "b", "train.steps=10", "train.ckpt_every=4") == 0
    b = tmp_path / "b"
    # simulate a kill after step 8: drop the final checkpoint and the log rows written after it
    import shutil

    shutil.rmtree(b / "checkpoints" / "step_00000010")
    (b / "checkpoints" / "LATEST").write_text("step_00000008")
    assert pretrain(b, "train.steps=10", "train.ckpt_every=4", "resume=true") == 0
    assert losses(b) == straight  # exactly, on CPU


def test_resume_without_checkpoint_and_config_errors(tmp_path, capsys):
    assert pretrain(tmp_path / "none", "resume=true") == 1
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main(["pretrain", str(ROOT / "configs/pretrain/tiny-dense.yaml"), "train.stepz=3"]) == 1
    assert "unknown key 'train.stepz'" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    import torch

    from topocl import model as model_mod

    real = model_mod.GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None):
        out = real(self, idx, targets)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] > 5:
                out.loss = out.loss * torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(model_mod.GPT, "forward", poisoned)
    assert pretrain(tmp_path / "r", "train.steps=10", "train.ckpt_every=4") == 1
    assert "stopping before the optimizer step" in capsys.readouterr().err
    assert (tmp_path / "r/checkpoints/LATEST").read_text() == "step_00000004"


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    common = [str(ROOT / "configs/pretrain/tiny-dense.yaml"), *TINY, "train.steps=4", "train.eval_every=100",
              "probe=false", "samples=0"]
    subprocess.run([sys.executable, "-m", "topocl", "pretrain", *common, f"out_dir={tmp_path / 'one'}"],
                   check=True, env=env, capture_output=True, timeout=300)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "topocl", "pretrain", *common, f"out_dir={tmp_path / 'two'}"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys()
    assert all(abs(one[k] - two[k]) < 1e-4 for k in one), (one, two)
    assert json.loads((tmp_path / "two/meta.json").read_text())["world_size"] == 2
