"""Task streams: determinism, real contradictions, update labelling, delays, jsonl errors, learnability."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

import topocl
from topocl.config import ConfigError, ModelConfig, TrainConfig
from topocl.data import BatchSampler, pack_documents
from topocl.evaluate import score_probes
from topocl.model import GPT
from topocl.optim import build_optimizer
from topocl.tasks.base import PROBE_KINDS, Probe
from topocl.tasks.jsonl import StreamError
from topocl.tasks.streams import build_stream, cli, time_probes
from topocl.tokenizer import Tokenizer
from topocl.train import train_steps
from topocl.world import FACTS, synthetic_corpus

BASE = {(s, r): v for s, r, v in FACTS}


def test_worlds_deterministic_and_contradict_the_base_facts():
    a = build_stream("worlds", {"n_worlds": 8, "seed": 3})
    assert [t.texts for t in a] == [t.texts for t in build_stream("worlds", {"n_worlds": 8, "seed": 3})]
    assert [t.texts for t in a] != [t.texts for t in build_stream("worlds", {"n_worlds": 8, "seed": 4})]
    assert len({t.name for t in a}) == 8
    for j, t in enumerate(a):
        assert len(t.probes) >= 10 and all(p.introduced_at == j and p.answer in p.candidates for p in t.probes)
        for s, r, v, b in t.meta["rules"]:
            assert b == BASE[(s, r)] and v != b  # each rule contradicts the base fact it names
            assert any(f"{t.name}" in x and f" {v}" in x for x in t.texts)
        assert {p.tags["paraphrase"] for p in t.probes} == {"seen", "unseen"}


def test_worlds_controls_shared_attributes_vocab_and_global_overwrites():
    ts = build_stream("worlds", {"n_worlds": 12, "shared_attributes": 2, "vocab_reuse": 0.5, "global_overwrites": 3})
    shared = [tuple(x[:2]) for x in ts[0].meta["rules"][:2]]
    for prev, t in zip(ts, ts[1:]):
        assert [tuple(x[:2]) for x in t.meta["rules"][:2]] == shared
        assert all(a[2] != b[2] for a, b in zip(prev.meta["rules"][:2], t.meta["rules"][:2]))  # worlds disagree
    invented = [x for t in ts for x in t.meta["rules"] if x[3] is None]
    assert invented and all(x[0].startswith("a ") for x in invented)
    # world-scoped rules never overwrite each other: without global rules every probe is `retain`
    quiet = build_stream("worlds", {"n_worlds": 12, "shared_attributes": 2})
    assert {p.kind for t in quiet for p in t.probes} == {"retain"}
    overwrites = [(k, t.meta["overwrite"]) for k, t in enumerate(ts) if t.meta["overwrite"]]
    assert len(overwrites) == 3
    # oracle from the rules in meta: (task, scope, subject, relation, value) statements, in stream order
    said = [(k, t.name, s, r, v) for k, t in enumerate(ts) for s, r, v, _ in t.meta["rules"]]
    said += [(k, "*", s, r, v) for k, (s, r, v, _j) in overwrites]
    for k, (s, r, v, j) in overwrites:
        assert any(x[0] == s and x[1] == r and x[2] != v for x in ts[j].meta["rules"])
        assert any("everywhere" in x or "every world" in x or "all the worlds" in x for x in ts[k].texts)
        earlier = [p for p in ts[j].probes if (p.tags["subject"], p.tags["relation"]) == (s, r)]
        assert len(earlier) == 5 and all(p.kind == "update" for p in earlier)  # overwriting is not forgetting
    for k, t in enumerate(ts):
        for p in t.probes:
            w, s, r, v = p.tags["world"], p.tags["subject"], p.tags["relation"], p.answer.strip()
            contradicted = any(m > k and (s2, r2) == (s, r) and v2 != v and (w2 == w or "*" in (w, w2))
                               for m, w2, s2, r2, v2 in said)
            assert p.kind == ("update" if contradicted else "retain"), p


def test_campaign_sessions_delays_and_moves():
    ts = build_stream("campaign", {"sessions": 6, "changes": 2, "seed": 1})
    assert len(ts) == 6 and sum(p.tags.get("type") == "rule" for t in ts for p in t.probes) == 6  # 3 rules x 2 forms
    assert all(p.tags["paraphrase"] in ("seen", "unseen") for t in ts for p in t.probes)
    for s, t in enumerate(ts):
        assert all(p.introduced_at == s for p in t.probes)
    for rule in ("magic is paid for with memories.", "spoken in rhyme.", "strongest at dawn."):
        told = [s for s, t in enumerate(ts) if any(rule in x for x in t.texts)]  # one session teaches each rule
        assert len(told) == 1 and all(rule in x for x in ts[told[0]].texts)
    moves = [p for t in ts for p in t.probes if "moved_from" in p.tags]
    assert len(moves) == 4 and all(int(p.tags["moved_from"]) < p.introduced_at for p in moves)
    assert sum(p.kind == "update" for t in ts for p in t.probes) == 4  # the two moved items' old places
    for t in ts:
        for p in t.probes:
            assert p.answer in p.candidates and p.tags["session"] == str(p.introduced_at)
            # a place probe is `update` iff the same item is later said to be kept somewhere else
            if p.tags.get("ask") == "place":
                later = [q for u in ts[p.introduced_at + 1:] for q in u.probes
                         if q.tags.get("item") == p.tags["item"] and q.tags.get("ask") == "place"]
                assert (p.kind == "update") == any(q.answer != p.answer for q in later)
    # an item moved twice: both earlier places are updates, the last one is kept
    many = build_stream("campaign", {"sessions": 3, "facts_per_session": 1, "changes": 2, "seed": 0})
    place = [p for t in many for p in t.probes if p.tags.get("ask") == "place" and p.tags["paraphrase"] == "seen"
             and p.tags["item"] == many[0].meta["facts"][0]["e"] + " " + many[0].meta["facts"][0]["i"]]
    assert [(p.kind, p.introduced_at) for p in place] == [("update", 0), ("update", 1), ("retain", 2)]
    assert len({p.answer for p in place}) == 3


def test_unknown_option_is_a_config_error():
    with pytest.raises(ConfigError, match="n_worlds"):
        build_stream("worlds", {"n_world": 3})
    with pytest.raises(KeyError, match="worlds"):
        build_stream("nope", {})


def test_jsonl_stream_and_its_errors(tmp_path):
    p = tmp_path / "s.jsonl"
    task = {"name": "t0", "texts": ["In Zorbia, fire feels cold."],
            "probes": [{"prompt": "In Zorbia, fire feels", "answer": " cold", "candidates": [" hot", " cold"]}]}
    p.write_text(json.dumps(task) + "\n")
    (t,) = build_stream("jsonl", {"path": str(p)})
    assert t.probes[0].kind == "retain" and t.probes[0].introduced_at == 0
    bad = {**task, "probes": [{**task["probes"][0], "answer": " warm"}]}
    p.write_text(json.dumps(task) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(StreamError, match=r"s.jsonl:2: probes\[0\]: field 'answer'"):
        build_stream("jsonl", {"path": str(p)})
    p.write_text(json.dumps({**task, "texts": "one string"}) + "\n")
    with pytest.raises(StreamError, match=r"s.jsonl:1: field 'texts'"):
        build_stream("jsonl", {"path": str(p)})
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a.jsonl").write_text(json.dumps({"text": "x y"}) + "\n" + json.dumps(task["probes"][0]) + "\n")
    (d / "b.jsonl").write_text(json.dumps({"text": "z"}) + "\n{broken\n")
    with pytest.raises(StreamError, match=r"b.jsonl:2: invalid JSON"):
        build_stream("jsonl", {"path": str(d)})
    (d / "b.jsonl").write_text(json.dumps({"text": "z"}) + "\n\n" + json.dumps({**task["probes"][0], "kind": "old"}))
    with pytest.raises(StreamError, match=r"b.jsonl:3: field 'kind' must be one of"):
        build_stream("jsonl", {"path": str(d)})
    (d / "b.jsonl").write_text(json.dumps({"answer": " a", "candidates": [" a"]}) + "\n")
    with pytest.raises(StreamError, match=r"b.jsonl:1: missing field 'prompt'"):
        build_stream("jsonl", {"path": str(d)})
    (d / "b.jsonl").write_text(json.dumps({"text": "z"}) + "\n")
    a, b = build_stream("jsonl", {"path": str(d)})
    assert (a.name, a.texts, b.name, b.probes) == ("a", ["x y"], "b", []) and a.probes[0].introduced_at == 0


def test_schema_documents_what_the_validator_checks():
    schema = json.loads((Path(topocl.__file__).parent / "schemas" / "stream.schema.json").read_text())
    probe = schema["$defs"]["probe"]
    assert schema["required"] == ["name", "texts", "probes"] and set(schema["properties"]) == set(schema["required"])
    assert probe["required"] == ["prompt", "answer", "candidates"]
    assert tuple(probe["properties"]["kind"]["enum"]) == PROBE_KINDS
    assert set(probe["properties"]) == {f.name for f in dataclasses.fields(Probe)} - {"introduced_at"}


def test_stream_show_cli(capsys):
    assert cli(["show", "worlds", "n_worlds=3", "global_overwrites=1"]) == 0
    out = capsys.readouterr().out
    # 3 worlds x 5 rules and 1 global rule, each 1 seen + 4 unseen probes; the overwritten rule's 5 are updates
    assert "3 tasks, 72 texts" in out and "80 probes (retain 75, update 5)" in out and "In " in out
    assert "report groups: headline 64, seen 16; headline retain probes per task: 16..24" in out
    assert cli(["show", "campaign", "sessions=2", "--time", "--tokens"]) == 0
    out = capsys.readouterr().out  # 2 sessions x 6 facts x 4 questions x 2 forms + 2 rules x 2 forms + 1 move x 2
    assert re.search(r"scored all 102 probes \(2 tasks\) with the tiny CPU model in [\d.]+ s", out)
    # the 'when' (nights) and rule probes: 12 x 2 + 2 x 2
    assert "probes whose candidates differ in token count (tiny demo tokenizer): 28 of 102 (27.5%)" in out
    assert cli(["show", "worlds", "n_worlds=4", "--order", "2"]) == 0
    assert "reteach=False, order 2\n4 tasks" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="sessions"):
        cli(["show", "campaign", "session=2"])


def test_all_probes_of_the_default_50_world_stream_score_in_under_60_s():
    """1250 probes (5 per rule since the unseen paraphrases became the headline); 30 s for the 500 before."""
    tasks = build_stream("worlds", {})
    assert len(tasks) == 50 and all(len(t.probes) == 25 for t in tasks)
    secs, n = time_probes(tasks)
    assert n == sum(len(t.probes) for t in tasks) == 1250 and secs < 60


def test_a_model_trained_on_one_world_knows_it_and_not_an_unseen_one():
    """Trained on world 0's texts only: world 0's probes (both paraphrases) well above chance, the five unseen
    worlds' probes about attributes world 0 never mentions near chance (chance = mean 1/len(candidates))."""
    tasks = build_stream("worlds", {"n_worlds": 6, "rules_per_world": 10, "texts_per_task": 48, "seed": 6,
                                    "unseen_probes": 1})
    seen, unseen = tasks[0], tasks[1:]
    tok = Tokenizer.train([x for t in tasks for x in t.texts] + synthetic_corpus(200, 0), 600)
    rows = pack_documents(tok.encode_batch(seen.texts), 64, tok.bos_id)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=64))
    cfg = TrainConfig(steps=150, batch_size=16, lr=3e-3, warmup_steps=10)
    sampler = BatchSampler(len(rows), 16, seed=0)
    opt = build_optimizer(model, cfg)
    list(train_steps(model, opt, lambda s: rows[sampler.indices(s)], range(cfg.steps), cfg=cfg,
                     device=torch.device("cpu")))

    def accuracy(probes):
        return (sum(s.correct for s in score_probes(model, tok, probes)) / len(probes),
                sum(1 / len(p.candidates) for p in probes) / len(probes))

    known = {(s, r) for s, r, _v, _b in seen.meta["rules"]}
    other = [p for t in unseen for p in t.probes if (p.tags["subject"], p.tags["relation"]) not in known]
    assert len(seen.probes) == 20 and len(other) >= 60
    acc_seen, chance_seen = accuracy(seen.probes)
    acc_other, chance_other = accuracy(other)
    assert acc_seen >= 0.7 and acc_seen > chance_seen + 0.5, (acc_seen, chance_seen)
    # measured 0.75 (chance 0.18) vs 0.22 (0.18); 1.00 (0.24) before the stream stopped sampling two-valued
    # relations and ranking turned per-token
    assert acc_other < chance_other + 0.2, (acc_other, chance_other)
