"""The common-sense world: fact table, seeded corpus, base probes."""

from collections import Counter

import pytest

from topocl.tasks.base import Probe
from topocl.world import FACTS, RELATIONS, UNSEEN_FRAMES, base_probes, probe_prompt, statement, synthetic_corpus


def test_fact_table_is_consistent():
    keys = [(s, r) for s, r, _ in FACTS]
    assert len(keys) == len(set(keys)) and 60 <= len(FACTS) <= 120  # one value per attribute
    for s, r, v in FACTS:
        assert v in RELATIONS[r].values and len(RELATIONS[r].values) >= 2  # closed sets with wrong candidates
        assert RELATIONS[r].canonical.count("{v}") == 1  # a probe prompt is the statement cut before the value
        assert statement(s, r, v).startswith(probe_prompt(s, r) + f" {v}")
    assert set(RELATIONS) == {r for _, r, _ in FACTS}


def test_corpus_is_deterministic_and_states_every_fact():
    a, b = synthetic_corpus(50, seed=1), synthetic_corpus(50, seed=1)
    assert a == b and a != synthetic_corpus(50, seed=2)
    docs = synthetic_corpus(2000, seed=0)
    text = " ".join(docs)
    for s, r, v in FACTS:  # every fact appears in its canonical form somewhere
        assert statement(s, r, v)[:-1] in text, (s, r, v)
    sents = [d.count(".") + d.count("!") for d in docs]
    assert 3 <= min(sents) and max(sents) <= 12
    # many surface forms: every training template of every relation is used
    for r, rel in RELATIONS.items():
        s, v = next((s, v) for s, r2, v in FACTS if r2 == r)
        for t in rel.templates:
            head = t.split("{")[0] if not t.startswith("{") else t.split("}")[1].split("{")[0]
            assert head.strip() in text, (r, t)
    # frequent facts: each of the 75 is told in >= 40 of 2000 stories (expected 2000 * 3 / 75 = 80)
    lower = [d.lower() for d in docs]
    assert min(sum(s in d and f" {v}" in d for d in lower) for s, _, v in FACTS) >= 40


def test_base_probes_answer_among_candidates_and_unseen_frames_never_trained():
    probes = base_probes()
    assert len(probes) == 2 * len(FACTS) and len({p.id for p in probes}) == len(probes)
    text = " ".join(synthetic_corpus(3000, seed=0))
    for p in probes:
        r = p.tags["relation"]
        assert p.kind == "base" and p.introduced_at == -1 and p.answer in p.candidates
        assert p.candidates == [f" {v}" for v in RELATIONS[r].values] and p.answer.startswith(" ")
        if p.tags["paraphrase"] == "seen":
            assert p.prompt == probe_prompt(p.tags["subject"], r) and p.prompt + p.answer in text
        else:
            assert p.prompt not in text and p.prompt.split(" that ")[0] not in text  # frame never in training
    assert Counter(p.tags["paraphrase"] for p in probes) == {"seen": len(FACTS), "unseen": len(FACTS)}
    assert {p.prompt.split(" that ")[0] for p in probes if p.tags["paraphrase"] == "unseen"} == {
        f.split(" that ")[0] for f in UNSEEN_FRAMES}
    assert probes[0].prompt == "Fire feels" and probes[0].answer == " hot"


def test_probe_rejects_bad_answer_and_kind():
    with pytest.raises(ValueError, match="not among candidates"):
        Probe("x", " a", [" b"])
    with pytest.raises(ValueError, match="kind 'old'"):
        Probe("x", " a", [" a"], kind="old")
