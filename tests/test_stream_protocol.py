"""Issue 13 items 1, 3, 9: labels follow the trained task order, candidates are length-balanced, and the headline
probes carry no shortcut (seen paraphrases, two-valued relations, re-taught rules are reported apart).

Every oracle here is written from the tasks' meta (what each task states), independently of the generators'
labelling code."""

import json
from collections import Counter

import pytest
import torch

from topocl.config import ModelConfig
from topocl.continual import Evaluator
from topocl.evaluate import score_probes
from topocl.model import GPT
from topocl.results import matrices, validate_row
from topocl.tasks.base import order_permutation, probe_groups
from topocl.tasks.campaign import RULES
from topocl.tasks.streams import build_stream, token_count_spread
from topocl.tokenizer import Tokenizer
from topocl.world import RELATIONS, base_probes, synthetic_corpus

WORLDS = [{"n_worlds": 10, "global_overwrites": 2}, {"n_worlds": 12, "shared_attributes": 2, "global_overwrites": 4,
                                                      "vocab_reuse": 0.7, "seed": 3, "unseen_probes": 1}]
CAMPAIGNS = [{"sessions": 8, "changes": 3}, {"sessions": 6, "facts_per_session": 1, "changes": 4, "seed": 2}]


def worlds_statements(tasks):
    """(training position, scope, subject, relation, value) of every rule the tasks state."""
    out = []
    for k, t in enumerate(tasks):
        out += [(k, t.name, s, r, v) for s, r, v, _ in t.meta["rules"]]
        if t.meta["overwrite"]:
            s, r, v, _ = t.meta["overwrite"]
            out.append((k, "*", s, r, v))
    return out


def worlds_expected_kind(tasks, k, p):
    """update iff a task trained after position k gives the probe's attribute another value in a scope that
    covers the probe's scope (a global rule covers every world; a world rule breaks an earlier global rule)."""
    for m, scope, s, r, v in worlds_statements(tasks):
        covers = scope == p.tags["world"] or scope == "*" or p.tags["world"] == "*"
        if m > k and covers and (s, r) == (p.tags["subject"], p.tags["relation"]) and f" {v}" != p.answer:
            return "update"
    return "retain"


def campaign_places(tasks):
    """(training position, item, place) for every place a session states: its own facts' places and its move."""
    by_gen = {t.meta["generated"]: t for t in tasks}
    out = []
    for k, t in enumerate(tasks):
        out += [(k, f"{f['e']} {f['i']}", f["p"]) for f in t.meta["facts"]]
        if t.meta["move"]:
            ps, pf, new = t.meta["move"]
            f = by_gen[ps].meta["facts"][pf]
            out.append((k, f"{f['e']} {f['i']}", new))
    return out


@pytest.mark.parametrize("opts", WORLDS)
def test_worlds_labels_follow_the_training_order(opts):
    gen = build_stream("worlds", opts)
    flipped = 0
    for order in (0, 1, 2, 3, 7, list(reversed(range(len(gen))))):
        tasks = build_stream("worlds", opts, order)
        perm = order if isinstance(order, list) else order_permutation(len(gen), order)
        assert [t.name for t in tasks] == [gen[i].name for i in perm]  # the same tasks, in the trained order
        assert [t.texts for t in tasks] == [gen[i].texts for i in perm]
        for k, t in enumerate(tasks):
            for p in t.probes:
                assert p.introduced_at == k and p.kind == worlds_expected_kind(tasks, k, p), (order, k, p.id)
        kinds = {p.id: p.kind for t in tasks for p in t.probes}
        flipped += sum(kinds[p.id] != p.kind for t in gen for p in t.probes)
    assert flipped > 0  # the orders do change labels: generation-order labels would be wrong for them


@pytest.mark.parametrize("opts", CAMPAIGNS)
def test_campaign_labels_follow_the_training_order(opts):
    gen = build_stream("campaign", opts)
    for order in (0, 1, 2, 3, 5, 8):
        tasks = build_stream("campaign", opts, order)
        places = campaign_places(tasks)
        for k, t in enumerate(tasks):
            assert t.meta["generated"] == int(t.name.split("-")[1]) - 1
            for p in t.probes:
                assert p.introduced_at == k and p.tags["session"] == str(t.meta["generated"])
                if p.tags.get("ask") == "place":
                    moved = any(m > k and item == p.tags["item"] and f" {place}" != p.answer
                                for m, item, place in places)
                    assert p.kind == ("update" if moved else "retain"), (order, k, p.id)
                else:
                    assert p.kind == "retain"
    # every item's last stated place is retain, each earlier one update (one place per statement)
    assert sum(p.kind == "update" for t in gen for p in t.probes) == 2 * len([t for t in gen if t.meta["move"]])


def test_campaign_orders_never_move_an_item_before_it_exists():
    opts = {"sessions": 12, "changes": 6, "seed": 1}
    gen = build_stream("campaign", opts)
    needs = {g: t.meta["after"] for g, t in enumerate(gen)}
    assert sum(map(len, needs.values())) == 6
    unconstrained_invalid = 0
    for order in range(1, 21):
        raw = order_permutation(len(gen), order)
        pos = {g: k for k, g in enumerate(raw)}
        unconstrained_invalid += any(pos[d] > pos[g] for g, ds in needs.items() for d in ds)
        tasks = build_stream("campaign", opts, order)  # seeded orders are constrained to valid ones
        pos = {t.meta["generated"]: k for k, t in enumerate(tasks)}
        assert all(pos[d] < pos[g] for g, ds in needs.items() for d in ds)
    assert unconstrained_invalid > 5  # the plain seeded permutations would often move an item before it exists
    g, (d,) = next((g, ds) for g, ds in needs.items() if ds)
    bad = [g] + [i for i in range(len(gen)) if i != g]
    with pytest.raises(ValueError, match=rf"trains task {g} \(session-{g + 1}\) at position 0, before task {d}"):
        build_stream("campaign", opts, bad)
    with pytest.raises(ValueError, match="not a permutation"):
        build_stream("campaign", opts, [0, 0, 1])


def test_jsonl_stream_permutes_only_when_no_label_can_become_false(tmp_path):
    task = lambda n, kind: {"name": n, "texts": [f"text {n}"],  # noqa: E731
                            "probes": [{"prompt": f"p{n}", "answer": " a", "candidates": [" a", " b"], "kind": kind}]}
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(task(n, "retain")) + "\n" for n in "abcd"))
    tasks = build_stream("jsonl", {"path": str(path)}, 1)
    assert [t.name for t in tasks] == ["abcd"[i] for i in order_permutation(4, 1)]
    assert [t.probes[0].introduced_at for t in tasks] == [0, 1, 2, 3]
    path.write_text("".join(json.dumps(task(n, "update" if n == "a" else "retain")) + "\n" for n in "abcd"))
    assert build_stream("jsonl", {"path": str(path)}, 0)[0].probes[0].kind == "update"
    with pytest.raises(ValueError, match="only order 0 is allowed"):
        build_stream("jsonl", {"path": str(path)}, 1)


def test_default_worlds_headline_has_no_shortcut():
    """Default 50-world stream: no two-valued relation, no (subject, relation, value) stated twice, >= 20 headline
    (unseen, no shortcut) retain probes per world, unseen prompts and frames never in training, seen prompts are."""
    tasks = build_stream("worlds", {})
    said = Counter((s, r, v) for t in tasks for s, r, v, _ in t.meta["rules"])
    assert len(said) == 250 and max(said.values()) == 1
    assert all(len(RELATIONS[r].values) > 2 for s, r, v in said)
    text = " ".join(x for t in tasks for x in t.texts)
    verbatim = 0
    for t in tasks:
        own = " ".join(t.texts)
        assert sum(p.kind == "retain" and not probe_groups(p) for p in t.probes) == 20
        for p in t.probes:
            clause = p.prompt.split(": ")[-1].split(" that ")[-1].split(", ")[-1]
            if p.tags["paraphrase"] == "seen":  # the training scope "In W, " and the canonical clause
                assert probe_groups(p) == ["seen"] and p.prompt.startswith(f"In {t.name}, ")
                verbatim += p.prompt + p.answer in own
            else:
                frame = p.prompt[: len(p.prompt) - len(clause)]
                assert not probe_groups(p) and p.prompt not in text and frame.strip() not in text, p.prompt
            assert clause.lower() + p.answer in own.lower()  # the clause itself is what the world taught
    assert verbatim == 160  # of the 250 seen probes, 160 are the start of a training sentence verbatim
    for order in (1, 2):  # also in other orders (no default world is overwritten)
        assert all(sum(p.kind == "retain" and not probe_groups(p) for p in t.probes) == 20
                   for t in build_stream("worlds", {}, order))


@pytest.mark.parametrize("preset", ["tiny-base", "ts-base"])
def test_preset_streams_have_20_headline_retain_probes_per_task_in_every_order(preset):
    """The shipped continual presets (global rules overwrite some worlds) keep >= 20 headline retain probes in every
    world, in the first orders a study runs."""
    import yaml

    from topocl.demo import CONFIGS

    cfg = yaml.safe_load((CONFIGS / "continual" / f"{preset}.yaml").read_text())
    for order in (0, 1, 2, 3):
        tasks = build_stream(cfg["stream"], cfg["stream_options"], order)
        counts = [sum(p.kind == "retain" and not probe_groups(p) for p in t.probes) for t in tasks]
        assert min(counts) >= 20, (preset, order, counts)


def test_binary_and_retaught_tags_match_a_recount():
    opts = {"n_worlds": 12, "shared_attributes": 2, "global_overwrites": 4, "binary_relations": True,
            "reteach": True, "seed": 5}
    tasks = build_stream("worlds", opts)
    said = Counter((s, r, v) for _, _, s, r, v in worlds_statements(tasks))
    groups = Counter()
    for t in tasks:
        for p in t.probes:
            s, r, v = p.tags["subject"], p.tags["relation"], p.answer.strip()
            assert p.tags["binary"] == ("yes" if len(RELATIONS[r].values) == 2 else "no")
            assert p.tags["retaught"] == ("yes" if said[(s, r, v)] > 1 else "no")
            groups.update(probe_groups(p) or ["headline"])
    assert all(groups[g] > 0 for g in ("headline", "seen", "binary", "retaught")), groups
    # without reteach, independently sampled rules never repeat a value (shared attributes may: they are tagged)
    plain = build_stream("worlds", {**opts, "reteach": False, "shared_attributes": 0, "global_overwrites": 0})
    assert max(Counter((s, r, v) for t in plain for s, r, v, _ in t.meta["rules"]).values()) == 1
    with pytest.raises(ValueError, match="reteach=true"):
        build_stream("worlds", {"n_worlds": 70})  # 350 rules > the 318 distinct non-binary rules


def test_campaign_rules_are_taught_once_and_no_fact_is_restated():
    for opts in ({}, {"sessions": 8, "changes": 3, "seed": 4, "rules": 6}):
        tasks = build_stream("campaign", opts)
        n_rules = opts.get("rules", 3)
        for r, (prompt, ans, _) in enumerate(RULES[:n_rules]):
            rule = f"{prompt} {ans}."
            told = [k for k, t in enumerate(tasks) if any(rule in x for x in t.texts)]
            assert len(told) == 1 and tasks[told[0]].meta["rule"] == r  # one session teaches it, its probes say so
            probes = [p for t in tasks for p in t.probes if p.id.startswith(f"campaign/rule/{r}")]
            assert len(probes) == 2 and {p.introduced_at for p in probes} == {told[0]}
        assert sum("In this realm" in x for t in tasks for x in t.texts) == n_rules * len(tasks[0].texts)
        for k, t in enumerate(tasks):
            assert sum(p.kind == "retain" and not probe_groups(p) for p in t.probes) >= 20
            for f in t.meta["facts"]:
                item = f"the {f['e']} {f['i']}"
                assert all(any(f" {line} " in f" {x} " for x in t.texts)  # every fact line is told
                           for line in (f"The {f['e']} {f['i']} belongs to {f['o']}.",
                                        f"The {f['e']} {f['i']} was given on the {f['n']} night."))
                for u in tasks[:k] + tasks[k + 1:]:  # other sessions mention the item only to move it
                    for x in u.texts:
                        for sent in x.split(". "):
                            if item in sent.lower():
                                assert "moved" in sent or "kept near" in sent, sent
                                assert f["o"] not in sent and f["g"] not in sent and f["n"] not in sent
    for order in (1, 2, 3):  # >= 6 facts x 4 unseen questions - 2 moved places, in any order
        assert min(sum(p.kind == "retain" and not probe_groups(p) for p in t.probes)
                   for t in build_stream("campaign", {}, order)) >= 22


def test_generated_candidates_are_length_balanced():
    """Every worlds and campaign probe's candidates have one word count; the token-count spread is measured."""
    for name, opts in (("worlds", {}), ("worlds", {"n_worlds": 10, "global_overwrites": 2}), ("campaign", {})):
        for t in build_stream(name, opts):
            for p in t.probes:
                assert len({len(c.split()) for c in p.candidates}) == 1, p

    class Chars:  # one token per character
        def encode(self, s):
            return list(s)

    class Fixed:
        def __init__(self):
            self.tasks = [type("T", (), {"probes": [type("P", (), {"prompt": "x", "candidates": c})()
                                                    for c in ([" ab", " cd"], [" a", " bcd"], [" q"])]})()]

    assert token_count_spread(Fixed().tasks, Chars()) == (1, 3)


def test_evaluator_headline_rows_hold_only_probes_without_shortcuts():
    tasks = build_stream("worlds", {"n_worlds": 3, "rules_per_world": 3, "unseen_probes": 2, "binary_relations": True,
                                    "reteach": True, "shared_attributes": 1, "seed": 2, "texts_per_task": 4})
    tok = Tokenizer.train([x for t in tasks for x in t.texts] + synthetic_corpus(100, 0), 400)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, d_model=32, n_head=2, n_kv_head=1, max_seq_len=64))
    base = base_probes()[:12]
    ev = Evaluator(tasks, base, None, tok, torch.device("cpu"), "float32")
    rows = ev(model, {"run": "r", "seed": 0, "order": 0}, 0, 5)
    for i, r in enumerate(rows):
        validate_row(r, f"row {i}")
    value = {(r["eval_task"], r["kind"], r["metric"]): r["value"] for r in rows}
    owned = [(j, p) for j, t in enumerate(tasks) for p in t.probes] + [(-1, p) for p in base]
    scores = dict(zip([p.id for _, p in owned], score_probes(model, tok, [p for _, p in owned])))
    seen_groups = set()
    for j, kind in {(j, p.kind) for j, p in owned}:
        mine = [p for i, p in owned if (i, p.kind) == (j, kind)]
        want = {"": [p for p in mine if not probe_groups(p)], "@all": mine}
        for g in ("seen", "binary", "retaught"):
            want[f"@{g}"] = [p for p in mine if g in probe_groups(p)]
        for g, ps in want.items():
            if not ps:
                assert (j, kind, f"acc{g}") not in value
                continue
            seen_groups.add(g)
            assert value[(j, kind, f"acc{g}")] == pytest.approx(sum(scores[p.id].correct for p in ps) / len(ps))
        if want[""]:
            assert value[(j, kind, "acc_sum")] == pytest.approx(
                sum(scores[p.id].correct_sum for p in want[""]) / len(want[""]))
    assert seen_groups == {"", "@all", "@seen", "@binary", "@retaught"}
    # the report's readers (matrices of metric acc) see the headline only
    (R,) = matrices(rows, "retain", "acc").values()
    assert [x if x == x else None for x in R[1]] == [value.get((j, "retain", "acc")) for j in range(3)]


def test_the_runner_evaluates_the_labels_of_the_order_it_trains(monkeypatch, tmp_path):
    """continual.StreamRun at order 1: its tasks, and the probes its Evaluator scores, carry the labels of the
    order it trains (the oracle above), not the generation order's."""
    from topocl import continual

    tok = Tokenizer.train(synthetic_corpus(100, 0), 300)

    def tiny(self):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, d_model=32, n_head=2, n_kv_head=1, max_seq_len=64)
        return GPT(cfg), tok, 64, [], None, None

    monkeypatch.setattr(continual.StreamRun, "_load", tiny)
    opts = {"n_worlds": 10, "global_overwrites": 2, "texts_per_task": 2}
    cfg = continual.ContinualConfig(init="unused", stream_options=opts, orders=[1])
    run = continual.StreamRun(cfg, 0, 1, tmp_path)
    gen = build_stream("worlds", opts)
    assert [t.name for t in run.tasks] == [gen[i].name for i in order_permutation(10, 1)]
    owner = dict(zip([id(p) for p in run.evaluate.probes], run.evaluate.owner))
    for k, t in enumerate(run.tasks):
        for p in t.probes:
            assert owner[id(p)] == k and p.kind == worlds_expected_kind(run.tasks, k, p)


def test_global_overwrites_take_one_own_rule_from_distinct_worlds():
    """So a world loses at most one rule (4 headline probes) to overwrites: 6 rules keep >= 20 headline probes."""
    ts = build_stream("worlds", {"n_worlds": 10, "global_overwrites": 4, "rules_per_world": 6, "shared_attributes": 1})
    shared = {tuple(ts[0].meta["rules"][0][:2])}
    targets = [t.meta["overwrite"] for t in ts if t.meta["overwrite"]]
    assert len(targets) == 4 and len({j for *_, j in targets}) == 4
    assert all((s, r) not in shared for s, r, _, _ in targets)
    headline = [sum(p.kind == "retain" and not probe_groups(p) for p in t.probes) for t in ts]
    assert min(headline) == 16  # 5 own rules x 4, one of them overwritten (the shared one is retaught)
    assert min(sum(p.kind == "retain" and not probe_groups(p) for p in t.probes)
               for t in build_stream("worlds", {"n_worlds": 10, "global_overwrites": 2, "rules_per_world": 6})) == 20
