"""Resume across world sizes: a checkpoint written under DDP (2 gloo processes on CPU) resumes in 1 process and
vice versa, on the same loss curve (the global batch of a step does not depend on the world size)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.n_kv_head=1", "model.max_seq_len=32",
        "data.synthetic_docs=300", "data.vocab_size=280", "data.seq_len=32", "train.batch_size=8",
        "train.warmup_steps=1", "train.log_every=1", "train.eval_every=100", "train.steps=6", "train.ckpt_every=2",
        "train.keep_checkpoints=3", "probe=false", "samples=0"]


def launch(out: Path, world: int, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    pre = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
                              if world > 1 else [])
    r = subprocess.run([*pre, "-m", "topocl", "pretrain", str(ROOT / "configs/pretrain/tiny-dense.yaml"), *TINY,
                        f"out_dir={out}", *extra], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def cut_back(run: Path, step: int) -> None:
    """Simulate a kill right after the checkpoint of `step`."""
    for ck in (run / "checkpoints").glob("step_*"):
        if int(ck.name.split("_")[1]) > step:
            shutil.rmtree(ck)
    (run / "checkpoints/LATEST").write_text(f"step_{step:08d}")


def close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)


@pytest.mark.slow
def test_resume_across_world_sizes(tmp_path):
    launch(tmp_path / "two", 2)  # reference curve, DDP throughout
    ref = losses(tmp_path / "two")
    shutil.copytree(tmp_path / "two", tmp_path / "mixed")
    cut_back(tmp_path / "mixed", 2)  # written at world size 2 ...
    launch(tmp_path / "mixed", 1, "resume=true")  # ... resumed at world size 1 (writes steps 4 and 6 at world 1)
    assert close(losses(tmp_path / "mixed"), ref), (losses(tmp_path / "mixed"), ref)
    cut_back(tmp_path / "mixed", 4)  # written at world size 1 ...
    launch(tmp_path / "mixed", 2, "resume=true")  # ... resumed at world size 2
    assert close(losses(tmp_path / "mixed"), ref), (losses(tmp_path / "mixed"), ref)
    assert json.loads((tmp_path / "mixed/summary.json").read_text())["tokens_seen"] == 6 * 8 * 32
