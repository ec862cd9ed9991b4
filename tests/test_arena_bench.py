"""benchmarks/arena_learner.py on the tiny random Llama (--tiny --rounds 1): the JSON has every game master of
the smollm2 preset with positive timings, the context-only model is its own baseline, and the per-session
state sizes hold what the arms imply by construction."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("arena_learner_bench", ROOT / "benchmarks" / "arena_learner.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_arena_benchmark_writes_every_arm(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "arena.json"
    bench.main(["--tiny", "--rounds", "1", "--turns", "6", "--allow-busy", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["tiny"] and res["machine"]["cpus"] >= 1 and res["machine"]["threads"] >= 1
    assert {"load1", "load5"} <= res["machine"]["load_before"].keys() and res["commit"]
    rows = {r["arm"]: r for r in res["rows"]}
    assert sorted(rows) == ["full", "lora", "none", "surgery"] and res["rows"][0]["arm"] == "none"
    assert all(r["reply_ms"] > 0 for r in rows.values())
    assert rows["none"]["reply_ratio"] == 1.0  # the baseline's time over itself, in every round
    assert rows["none"]["round_s"] is None and rows["none"]["trainable_params"] == 0
    assert rows["none"]["state_mem"] == 0 and rows["none"]["state_disk"] == 0
    for arm in ("surgery", "lora", "full"):
        r = rows[arm]
        assert r["round_s"] > 0 and r["step_ratio"] > 0
        assert r["step_s"] == pytest.approx(r["round_s"] / r["learn_steps"])
        # fp32 weights + AdamW's two moments (+ a scalar step per tensor); torch.save adds its own headers
        assert r["state_mem"] >= 12 * r["trainable_params"] > 0 and r["state_disk"] > r["state_mem"]
        assert r["rss_peak"] is None or r["rss_peak"] >= 0
    # full trains every weight, a strict superset of the surgery arm's group-B weights; LoRA adds r (in + out)
    # per adapted matrix, r = 8 below half of every tiny matrix's smaller side (>= 32), so fewer than full trains
    assert rows["full"]["trainable_params"] > rows["surgery"]["trainable_params"]
    assert rows["full"]["trainable_params"] > rows["lora"]["trainable_params"]
    assert rows["full"]["state_mem"] > rows["surgery"]["state_mem"]
    assert rows["full"]["state_mem"] > rows["lora"]["state_mem"]
    table = capsys.readouterr().out
    assert "tiny random Llama" in table and all(f"| {r['name']} |" in table for r in res["rows"])
