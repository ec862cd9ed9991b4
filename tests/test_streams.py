"""Task streams: determinism, real contradictions, update labelling, delays, jsonl errors, learnability."""

import json

import pytest
import torch

from topocl.config import ConfigError, ModelConfig, TrainConfig
from topocl.data import BatchSampler, pack_documents
from topocl.evaluate import score_probes
from topocl.model import GPT
from topocl.optim import build_optimizer
from topocl.tasks.jsonl import StreamError
from topocl.tasks.streams import build_stream, cli
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
    ts = build_stream("worlds", {"n_worlds": 6, "shared_attributes": 2, "vocab_reuse": 0.5, "global_overwrites": 2})
    shared = [tuple(x[:2]) for x in ts[0].meta["rules"][:2]]
    for t in ts:
        assert [tuple(x[:2]) for x in t.meta["rules"][:2]] == shared
    invented = [x for t in ts for x in t.meta["rules"] if x[3] is None]
    assert invented and all(x[0].startswith("a ") for x in invented)
    updates = [p for t in ts for p in t.probes if p.kind == "update"]
    overwrites = [t.meta["overwrite"] for t in ts if t.meta["overwrite"]]
    assert len(overwrites) == 2 and len(updates) == 4  # canonical + unseen probe of each overwritten rule
    for s, r, _v, j in overwrites:
        assert any(p.tags["subject"] == s and p.tags["relation"] == r and p.introduced_at == j for p in updates)


def test_campaign_sessions_delays_and_moves():
    ts = build_stream("campaign", {"sessions": 6, "changes": 2, "seed": 1})
    assert len(ts) == 6 and sum(p.tags.get("type") == "rule" for p in ts[0].probes) == 3
    for s, t in enumerate(ts):
        assert all(p.introduced_at == s for p in t.probes)
        for rule in ("magic is paid for with memories.", "spoken in rhyme.", "strongest at dawn."):
            assert any(rule in x for x in t.texts)  # the stable world rules hold in every session
    assert sum(p.kind == "update" for t in ts for p in t.probes) == 4
    moves = [p for t in ts for p in t.probes if "moved_from" in p.tags]
    assert len(moves) == 2 and all(int(p.tags["moved_from"]) < p.introduced_at for p in moves)


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


def test_stream_show_cli(capsys):
    assert cli(["show", "worlds", "n_worlds=3"]) == 0
    assert "3 tasks" in capsys.readouterr().out


def test_a_model_trained_on_one_world_knows_it_and_not_an_unseen_one():
    tasks = build_stream("worlds", {"n_worlds": 2, "rules_per_world": 4, "texts_per_task": 48, "seed": 5})
    seen, unseen = tasks
    tok = Tokenizer.train(seen.texts + unseen.texts + synthetic_corpus(200, 0), 600)
    rows = pack_documents(tok.encode_batch(seen.texts), 64, tok.bos_id)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=64))
    cfg = TrainConfig(steps=150, batch_size=16, lr=3e-3, warmup_steps=10)
    sampler = BatchSampler(len(rows), 16, seed=0)
    opt = build_optimizer(model, cfg)
    list(train_steps(model, opt, lambda s: rows[sampler.indices(s)], range(cfg.steps), cfg=cfg,
                     device=torch.device("cpu")))

    def accuracy(task):
        probes = [p for p in task.probes if p.tags["paraphrase"] == "seen"]
        return sum(s.correct for s in score_probes(model, tok, probes)) / len(probes), \
            sum(1 / len(p.candidates) for p in probes) / len(probes)

    acc_seen, chance_seen = accuracy(seen)
    acc_unseen, chance_unseen = accuracy(unseen)
    assert acc_seen >= 0.99 > chance_seen + 0.3
    assert acc_unseen <= chance_unseen + 0.35
