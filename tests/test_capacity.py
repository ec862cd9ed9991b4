"""Capacity study: the stream (disjoint facts, unseen probes, prefix-consistent), the estimator on a hand-made
surface, grid cells from R, law fits, active-set overlap, parameter-matched presets."""

import math
from pathlib import Path

import pytest
import torch

from topocl.analysis.overlap import jaccard_matrix, overlap_stats, weighted_jaccard
from topocl.capacity import cells_from_matrix, load_study, task_steps
from topocl.capacity_report import capacity, capacity_monotone, diff_ci, fit_laws, fit_rho
from topocl.config import ConfigError, PretrainConfig, load_config
from topocl.params import count
from topocl.tasks.capacity import FRAMES, TEMPLATES
from topocl.tasks.streams import build_stream

PRESETS = sorted((Path(__file__).parents[1] / "configs" / "capacity").glob("*.yaml"))


def stream(**kw):
    return build_stream("capacity", {"n_tasks": 5, "facts_per_task": 6, **kw})


def test_facts_are_disjoint_and_texts_state_only_their_own_task():
    tasks = stream()
    facts = [tuple(f) for t in tasks for f in t.meta["facts"]]
    subjects, values = [s for s, _ in facts], [v for _, v in facts]
    assert len(facts) == 30 and len(set(subjects)) == 30 and len(set(values)) == 30
    assert not {s.lower() for s in subjects} & set(values)
    for j, t in enumerate(tasks):
        own = {w for f in t.meta["facts"] for w in f}
        foreign = {w for k, u in enumerate(tasks) if k != j for f in u.meta["facts"] for w in f}
        text = " ".join(t.texts)
        assert all(w in text for w in own)
        assert not any(w in text.replace(".", " ").replace(",", " ").split() for w in foreign)
        for s, v in t.meta["facts"]:  # every statement of s binds it to its own value
            assert text.count(f"of {s} is {v}") + text.count(f"{s} has a secret word: {v}") + \
                text.count(f"{s}, the secret word is {v}") + text.count(f"word, {v}") > 0


def test_probes_are_unseen_paraphrases_that_never_appear_in_training():
    tasks = stream()
    corpus = " ".join(x for t in tasks for x in t.texts)
    frame_openings = [f.split("{")[0].strip() for f in FRAMES]
    assert all(o not in corpus for o in frame_openings)
    assert not any(f.split("{")[0].strip() in tmpl for f in FRAMES for tmpl in TEMPLATES)
    for j, t in enumerate(tasks):
        values = {f" {v}" for _, v in t.meta["facts"]}
        assert len(t.probes) == len(FRAMES) * 6
        for p in t.probes:
            assert p.prompt not in corpus and (p.prompt + p.answer) not in corpus
            assert p.kind == "retain" and p.tags["paraphrase"] == "unseen" and p.introduced_at == j
            assert len(p.candidates) == 4 and p.answer in p.candidates and set(p.candidates) <= values
            assert p.tags["subject"] in p.prompt


def test_stream_is_deterministic_and_prefix_consistent():
    a, b = stream(), stream()
    assert [(t.texts, [p.prompt for p in t.probes]) for t in a] == [(t.texts, [p.prompt for p in t.probes]) for t in b]
    short = build_stream("capacity", {"n_tasks": 2, "facts_per_task": 6})
    for s, long in zip(short, a):
        assert s.texts == long.texts and s.meta == long.meta
        assert [(p.prompt, p.answer, p.candidates) for p in s.probes] == \
            [(p.prompt, p.answer, p.candidates) for p in long.probes]
    warm = build_stream("capacity", {"n_tasks": 2, "facts_per_task": 6, "warmup_tasks": 1})
    assert [t.name for t in warm] == ["warmup0", "task0", "task1"] and warm[0].meta == a[0].meta
    other = stream(seed=1)
    assert other[0].meta["facts"] != a[0].meta["facts"]
    with pytest.raises(ValueError, match="candidates"):
        build_stream("capacity", {"facts_per_task": 3, "candidates": 4})


def test_capacity_estimator_on_a_hand_made_surface():
    s = {(1, 4): 0.9, (2, 4): 0.8, (4, 4): 0.4, (8, 4): 0.51,
         (1, 8): 0.7, (2, 8): 0.55, (4, 8): 0.2,
         (1, 16): 0.6, (2, 16): 0.3, (4, 16): 0.1}
    # passing at θ = 0.5: loads 4, 8, 8, 32 (8x4 = 0.51), 16 (2x8), 16 (1x16) -> largest 32;
    # "stays above": load 16 has 4x4 = 0.4 < 0.5, so the largest L with every cell n·d <= L passing is 8
    assert capacity(s, 0.5) == 32
    assert capacity_monotone(s, 0.5) == 8
    assert capacity(s, 0.9) == 4 and capacity_monotone(s, 0.9) == 4
    assert capacity(s, 0.95) == 0 and capacity_monotone(s, 0.95) == 0
    assert capacity(s, 0.0) == 64 and capacity_monotone(s, 0.0) == 64


def test_cells_from_a_hand_made_matrix():
    nan = math.nan
    R = [[0.25, 0.25, 0.25],  # init
         [1.0, 0.25, 0.25],  # after task 0
         [0.75, 1.0, 0.25],  # after task 1
         [0.5, 0.75, 0.75]]  # after task 2
    cells = {c["n"]: c for c in cells_from_matrix(R, [1, 2, 3], c=0.25)}
    assert cells[1]["final"] == 1.0 and cells[1]["retained"] == 1.0
    assert cells[2]["final"] == pytest.approx(0.875) and cells[2]["learned"] == 1.0
    assert cells[2]["retained"] == pytest.approx((0.875 - 0.25) / 0.75)
    assert cells[3]["final"] == pytest.approx(2 / 3) and cells[3]["learned"] == pytest.approx(2.75 / 3)
    assert cells_from_matrix([[0.25, 0.25], [1.0, nan]], [1, 2], 0.25)[0]["n"] == 1  # unfinished n = 2 skipped
    # one warm-up task in front: the same cells read one row and one column further
    Rw = [[0.25] + r for r in [[0.25, 0.25, 0.25]] + R]
    Rw[1][0] = 1.0
    assert cells_from_matrix(Rw, [1, 2, 3], 0.25, warmup=1) == cells_from_matrix(R, [1, 2, 3], 0.25)


def test_law_fits_recover_a_known_product_law():
    truth = {(n, d): 0.9 / (1 + (n * d / 20) ** 2) for n in (1, 2, 4, 8) for d in (2, 4, 8)}
    fits = {f["law"]: f for f in fit_laws(truth)}
    p = fits["product"]["params"]
    assert p["A"] == pytest.approx(0.9, rel=1e-3) and p["K"] == pytest.approx(20, rel=1e-3)
    assert p["b"] == pytest.approx(2, rel=1e-3) and fits["product"]["rmse"] < 1e-5
    assert fits["constant"]["rmse"] > 0.1 and fits["product"]["aic"] < fits["tasks_only"]["aic"]
    assert "separable" not in {f["law"] for f in fit_laws({(1, 1): 1.0, (1, 2): 0.5, (2, 2): 0.2, (2, 1): 0.4})}
    rho = {f["law"].split(":")[0]: f for f in fit_rho([(1.0, 10.0), (0.5, 20.0), (0.25, 40.0)])}
    assert rho["power"]["params"]["a"] == pytest.approx(10) and rho["power"]["params"]["b"] == pytest.approx(-1)


def test_diff_ci_is_centered_on_the_difference_of_means():
    d, lo, hi = diff_ci([8.0, 8.0, 16.0], [32.0, 32.0, 32.0])
    assert d == pytest.approx(32 - 32 / 3) and lo <= d <= hi and lo >= 16


def test_jaccard_and_overlap_stats_hand_computed():
    a = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    assert torch.allclose(jaccard_matrix(a, a), torch.tensor([[1.0, 1 / 3], [1 / 3, 1.0]]))
    assert weighted_jaccard(torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.5])) == pytest.approx(1 / 1.5)
    # two tasks, two answer sites each; one layer with units clearly on (1) or off (0)
    h = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    st = overlap_stats([h], [0, 0, 1, 1])
    assert st["active_frac"] == 0.5
    assert st["jaccard_within"] == pytest.approx((1.0 + 1 / 3) / 2)  # task 0 pair: 1; task 1 pair: 1/3
    assert st["jaccard_between"] == pytest.approx((1 / 3 + 0 + 1 / 3 + 0) / 4)
    # usage u0 = [1, 1, 0, 0], u1 = [0, .5, 1, .5]: Σmin = .5, Σmax = 1 + 1 + 1 + .5
    assert st["usage_overlap"] == pytest.approx(0.5 / 3.5)


@pytest.mark.parametrize("ffn", ["mlp", "kwta", "dual", "moe"])
def test_answer_site_hidden_takes_each_prompts_last_token(ffn):
    """Per layer [N, H] at every prompt's own last position (prompts of unequal length); moe's token dispatch
    (experts see only their own tokens) is measured through its reference path, so chosen experts' units are
    the same as when each prompt runs alone."""
    from topocl.analysis.overlap import answer_site_hidden
    from topocl.config import ModelConfig
    from topocl.model import GPT
    from topocl.tokenizer import Tokenizer
    from topocl.world import synthetic_corpus

    tok = Tokenizer.train(synthetic_corpus(50, 0), 300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=32, n_head=2, n_kv_head=1, max_seq_len=64,
                            ffn=ffn))
    prompts = ["In Zorbia, fire feels", "A visitor to the old kingdom of Zorbia soon learns that water tastes"]
    both = answer_site_hidden(model, tok, prompts, "cpu")
    alone = [answer_site_hidden(model, tok, [p], "cpu") for p in prompts]
    assert len(both) == 2 and all(h.shape[0] == 2 for h in both)
    for layer in range(2):
        for r in range(2):
            assert torch.allclose(both[layer][r], alone[r][layer][0], atol=1e-5)
    if ffn == "moe":
        assert all(b.ffn.impl == "dispatch" for b in model.blocks)  # restored


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_presets_are_parameter_matched_over_the_grid(path):
    cfg = load_study(path)
    assert len(cfg.seeds) >= 3 and cfg.estimate
    counts = {}
    for name, arm in cfg.models.items():
        pcfg = load_config(PretrainConfig, cfg.pretrain, [*cfg.pretrain_overrides, *arm.overrides])
        pcfg.model.vocab_size = pcfg.model.vocab_size or pcfg.data.vocab_size
        counts[name] = count(pcfg.model)
    ref = counts[next(n for n, a in cfg.models.items() if a.system == "single" and a.rho == 1.0)]
    assert {n: abs(c / ref - 1) <= 0.02 for n, c in counts.items()} == {n: True for n in counts}, counts
    rhos = sorted(a.rho for a in cfg.models.values() if a.system == "single")
    assert rhos == [0.05, 0.1, 0.25, 0.5, 1.0]
    assert any(a.system == "two" for a in cfg.models.values())
    assert task_steps(cfg, cfg.depths[-1]) >= task_steps(cfg, cfg.depths[0])


def test_capacity_cli_end_to_end_is_resumable(tmp_path, monkeypatch):
    """A micro study: cells, matrices, activations, cost and report are written; a second launch retrains nothing
    and duplicates no row."""
    import json

    from topocl.capacity import cli

    root = Path(__file__).parents[1] / "configs"
    cfg = tmp_path / "micro.yaml"
    cfg.write_text(f"""
pretrain: {root / 'pretrain' / 'tiny-dense.yaml'}
pretrain_overrides: [model.n_layer=1, model.d_model=32, model.n_head=2, model.n_kv_head=2, model.max_seq_len=48,
                     data.seq_len=48, data.synthetic_docs=150, data.vocab_size=300, train.steps=2,
                     train.batch_size=4, train.warmup_steps=1, train.eval_every=2, train.eval_batches=1,
                     train.ckpt_every=2, samples=0, probe=false]
continual: {root / 'continual' / 'tiny-base.yaml'}
continual_overrides: [eval_base=false, train.batch_size=4]
models:
  dual: {{overrides: [model.ffn=dual, model.kwta.rho=0.25], system: two}}
seeds: [0]
n_tasks: [1, 2]
depths: [4]
stream_options: {{mentions: 2, candidates: 2, warmup_tasks: 1}}
steps_per_fact: 0.25
min_steps: 1
device: cpu
""")
    study = tmp_path / "study"
    monkeypatch.chdir(tmp_path)
    args = [str(cfg), f"out_dir={tmp_path / 'runs'}", f"study_dir={study}"]
    assert cli(args) == 0
    cells = [json.loads(x) for x in (study / "cells.jsonl").read_text().splitlines()]
    assert sorted((c["model"], c["n"], c["d"], c["load"]) for c in cells) == [("dual", 1, 4, 4), ("dual", 2, 4, 8)]
    assert all(c["retained"] == pytest.approx((c["final"] - 0.5) / 0.5) for c in cells)
    acts = [json.loads(x) for x in (study / "activations.jsonl").read_text().splitlines()]
    assert {(a["model"], a["stage"]) for a in acts} == {("dual", "pre"), ("dual", "post")}
    assert all(0 < a["active_frac"] <= 1 for a in acts)
    stages = json.loads((study / "cost.json").read_text())["stages"]
    assert len(stages) == 2 and all(s["wall_s"] > 0 for s in stages)
    report = (study / "report" / "report.md").read_text()
    assert "| dual | two |" in report and (study / "report" / "heatmaps.png").is_file()
    before = {p.name: p.read_text() for p in (study / "cells.jsonl", study / "cost.json", study / "matrices.jsonl")}
    assert cli(args) == 0  # everything done: nothing retrained, rows replaced not appended
    assert {p: (study / p).read_text() for p in before} == before
    with pytest.raises(ConfigError, match="steps_per_fact"):  # another design in the same study directory
        cli([*args, "steps_per_fact=9"])
