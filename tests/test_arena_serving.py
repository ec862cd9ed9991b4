"""Arena model serving with tiny real models: an untrained TopoCL GPT saved as a run directory and an
untrained Hugging Face LlamaForCausalLM built from a config, both loaded through a models YAML."""

import re

import pytest

pytest.importorskip("fastapi")
import yaml  # noqa: E402
from arena_util import CSRF, tiny_hf_dir, tiny_topocl_run  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from topocl.arena.app import ArenaSettings, create_app  # noqa: E402
from topocl.arena.pool import ModelPool  # noqa: E402
from topocl.arena.proxies import campaign_world, rule_violations  # noqa: E402
from topocl.arena.serving import clean_reply, load_specs  # noqa: E402
from topocl.tasks.base import Probe  # noqa: E402


@pytest.fixture(scope="module")
def models_yaml(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny_topocl_run(root / "gpt")
    tiny_hf_dir(root / "llama")
    (root / "models.yaml").write_text(yaml.safe_dump({"models": [
        {"name": "tiny-gpt", "kind": "topocl", "path": "gpt", "max_new_tokens": 8, "temperature": 0.8},
        {"name": "tiny-llama", "kind": "hf", "path": "llama", "max_new_tokens": 8, "temperature": 0.7, "top_p": 0.9},
    ]}))
    return root / "models.yaml"


def test_specs_resolve_paths_and_reject_bad_files(models_yaml, tmp_path):
    specs = load_specs(models_yaml)
    assert [s.kind for s in specs] == ["topocl", "hf"] and specs[0].path == str(models_yaml.parent / "gpt")
    bad = tmp_path / "bad.yaml"
    for body, msg in [({"models": [{"name": "x", "kind": "onnx", "path": "p"}]}, "kind"),
                      ({"models": [{"name": "x", "kind": "scripted"}]}, "two models"),
                      ({"models": [{"name": "x", "kind": "scripted"}, {"name": "x", "kind": "scripted"}]}, "unique"),
                      ({"models": [{"name": "x", "kind": "hf"}, {"name": "y", "kind": "scripted"}]}, "path"),
                      ({"other": 1}, "models")]:
        bad.write_text(yaml.safe_dump(body))
        with pytest.raises(ValueError, match=msg):
            load_specs(bad)


def test_both_kinds_generate_reproducibly_and_score_probes(models_yaml):
    pool = ModelPool(load_specs(models_yaml))
    prompt = "You are the game master.\n\nPlayer: I look around.\nGM:"
    ra, rb = pool.pair("tiny-gpt", "tiny-llama", (prompt, prompt), seed=3)
    assert ra.text and rb.text and ra.ms > 0 and rb.ms > 0 and ra.step == rb.step == 0
    again = pool.pair("tiny-gpt", "tiny-llama", (prompt, prompt), seed=3)
    assert (again[0].text, again[1].text) == (ra.text, rb.text)  # seeded sampling
    world = campaign_world(0)
    probes = [Probe(**p) for p in world["events"][0]["probes"]]
    for name in pool.names:
        got = pool.backends[name].score(probes[:3])
        assert len(got) == 3 and all(isinstance(x, bool) for x in got)


def test_a_session_with_tiny_models_end_to_end(models_yaml, tmp_path):
    app = create_app(ArenaSettings(db_url=f"sqlite:///{tmp_path / 'a.db'}", specs=load_specs(models_yaml)))
    c = TestClient(app)
    csrf = CSRF.search(c.get("/").text).group(1)
    sid = c.post("/sessions", data={"csrf": csrf, "world": "campaign:2"}, follow_redirects=False
                 ).headers["location"].rsplit("/", 1)[-1]
    for idx in range(2):
        assert c.post(f"/s/{sid}/turns", data={"csrf": csrf, "text": "I ask about the sword."},
                      follow_redirects=False).status_code == 303
        page = c.get(f"/s/{sid}").text
        assert "tiny-gpt" not in page and "tiny-llama" not in page
        assert c.post(f"/s/{sid}/turns/{idx}/vote", data={"csrf": csrf, "outcome": "a"},
                      follow_redirects=False).status_code == 303
    c.post(f"/s/{sid}/finish", data={"csrf": csrf})
    board = c.get("/api/ratings").json()
    assert board["votes"] == 2 and {r["model"] for r in board["rows"]} == {"tiny-gpt", "tiny-llama"}
    assert board["agreement"]["n_scored"] == 2  # every vote carries proxy scores of both replies


def test_reply_cleaning_and_rule_checks():
    assert clean_reply(" The door opens.\nPlayer: I enter") == "The door opens."
    assert clean_reply("   ") == "(no reply)"
    rules = campaign_world(0)["rules"]
    assert rule_violations("Here magic is paid for with gold, as always.", rules) == 1
    assert rule_violations("Magic is paid for with memories; spells are spoken in rhyme.", rules) == 0
    assert rule_violations("She grows strongest at noon and every spell must be spoken in silence.", rules) == 2
    assert re.search("dawn", " ".join(r["answer"] for r in rules))


def test_campaign_notes_say_what_their_probes_ask():
    """Each fact's probes ask a sentence the GM said (premise or note), word for word, e.g. the note has
    "The frost bow belongs to Anna." for the probe "The frost bow belongs to" -> " Anna"."""
    for seed in range(3):
        world = campaign_world(seed, sessions=7, every=2)
        assert len(world["events"]) == 7 and world["events"][0]["text"] == ""
        for e in world["events"]:
            told = world["premise"] if e["turn"] == 0 else e["text"]
            assert len(e["probes"]) == 8  # 2 facts x owner, giver, when, place
            for p in e["probes"]:
                assert f"{p['prompt']}{p['answer']}" in told and p["answer"] in p["candidates"]
            others = [x for x in world["events"] if x is not e and x["turn"] > 0]
            assert all(f"{p['prompt']}{p['answer']}" not in x["text"] for x in others for p in e["probes"])
