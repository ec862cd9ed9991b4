"""Analysis instruments: known answers for every measure, and one tiny `topocl analyze` end to end."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from topocl.analysis.artifacts import read_jsonl, run_artifacts
from topocl.analysis.crossover import ceiling, crossover_analysis
from topocl.analysis.evidence import combine, diff_stats, evidence, h1_values, h3_values, verdict
from topocl.analysis.graft import graft, graft_groups, role_names
from topocl.analysis.routing import fact_positions, jaccard
from topocl.analysis.sparsity import effective_rank, near_zero_fraction
from topocl.analysis.telemetry import AnalysisConfig, Telemetry, count_sketch, fisher_drift, relative_drift
from topocl.cli import main
from topocl.model import GPT
from topocl.results import stats

ROOT = Path(__file__).parents[1]


# ----------------------------------------------------------------------------- telemetry


class TwoRoles(nn.Module):
    """One fast-role and one slow-role parameter, for gradients set by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.fast = nn.Parameter(torch.tensor([1.0, 0.0]))
        self.slow = nn.Parameter(torch.tensor([2.0, 0.0]))

    def param_roles(self) -> dict[str, str]:
        return {"fast": "attn.sparse_heads", "slow": "attn.dense_heads"}

    def pathway_roles(self) -> tuple[set[str], set[str]]:
        return {"attn.dense_heads"}, {"attn.sparse_heads"}


def _task(tel: Telemetry, model: TwoRoles, j: int, g_fast: list[float], g_slow: list[float], move: list[float]):
    opt = torch.optim.SGD([{"params": [model.fast], "names": ["fast"]}, {"params": [model.slow], "names": ["slow"]}],
                          lr=0.0)
    tel.start_task(model, opt, j)
    for _ in range(2):  # two identical steps: the mean gradient is the gradient
        model.fast.grad, model.slow.grad = torch.tensor(g_fast), torch.tensor(g_slow)
        opt.step()
    with torch.no_grad():
        model.fast.add_(torch.tensor(move))
    return tel.end_task(model, step=2 * (j + 1))


@pytest.mark.parametrize("sketch_dim", [0, 64])
def test_telemetry_cosine_and_drift_known_answers(tmp_path, sketch_dim):
    model = TwoRoles()
    tel = Telemetry(model, AnalysisConfig(telemetry=True, sketch_dim=sketch_dim), tmp_path)
    _task(tel, model, 0, [1.0, 0.0], [3.0, 4.0], [0.0, 1.0])
    rows = _task(tel, model, 1, [0.0, 1.0], [3.0, 4.0], [0.0, 0.0])  # fast: orthogonal, slow: identical
    get = {(r["group"], r["measure"], r["ref_task"]): r["value"] for r in rows}
    assert get[("attn.dense_heads", "grad_cos", 0)] == pytest.approx(1.0, abs=1e-6)
    assert get[("pathway.slow", "grad_cos", 0)] == pytest.approx(1.0, abs=1e-6)
    if sketch_dim == 0:
        assert get[("attn.sparse_heads", "grad_cos", 0)] == pytest.approx(0.0, abs=1e-7)
    else:  # two coordinates in 64 buckets: orthogonal unless they collide
        assert abs(get[("attn.sparse_heads", "grad_cos", 0)]) in (0.0, pytest.approx(1.0))
    # fast moved by [0, 1] in task 0 from [1, 0]: stream drift 1, task-1 drift 0; slow never moved
    assert get[("attn.sparse_heads", "drift_stream", -1)] == pytest.approx(1.0)
    assert get[("attn.sparse_heads", "drift_task", -1)] == 0.0 and get[("attn.dense_heads", "drift_stream", -1)] == 0
    assert get[("attn.dense_heads", "grad_energy", -1)] == pytest.approx((9 + 16) / 2)
    # Fisher of task 0 (g² = [1, 0]) weights only the first coordinate, which never moved
    assert get[("attn.sparse_heads", "fisher_drift_stream", -1)] == 0.0
    on_disk = read_jsonl(tmp_path / "telemetry.jsonl")
    assert len(on_disk) == len(rows) + sum(1 for r in on_disk if r["after_task"] == 0)
    # resume at task 1: rows of task 1 dropped, the sketches and stream start come back
    again = Telemetry(model, AnalysisConfig(telemetry=True, sketch_dim=sketch_dim), tmp_path, start=1)
    assert {r["after_task"] for r in read_jsonl(tmp_path / "telemetry.jsonl")} == {0} and 0 in again.sketches
    assert torch.equal(again.stream_start["fast"], torch.tensor([1.0, 0.0]))


def test_drift_and_sketch_pure_functions():
    assert relative_drift(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 5.0])) == pytest.approx(math.sqrt(10) / 5)
    assert fisher_drift(torch.tensor([2.0, 9.0]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == 1.0
    v = torch.randn(1000)
    assert torch.equal(count_sketch(v, 32, 7), count_sketch(v, 32, 7))
    assert float(count_sketch(v, 32, 7).sum()) != 0.0


# ----------------------------------------------------------------------------- grafting / routing / sparsity


def test_graft_restores_exactly_the_stored_weights(tiny_cfg):
    tiny_cfg.attention = "split"
    final, source = GPT(tiny_cfg), GPT(tiny_cfg)
    before = {n: p.detach().clone() for n, p in final.named_parameters()}
    src = {n: p.detach().clone() for n, p in source.named_parameters()}
    groups = graft_groups(final, ["attn"])
    assert groups == {"slow": ["attn.dense_heads"], "fast": ["attn.sparse_heads"], "embed": ["embed"],
                      "head": ["head"], "mlp": ["mlp"], "norm.attn": ["norm.attn"], "norm.ffn": ["norm.ffn"],
                      "norm.final": ["norm.final"], "attn": ["attn"]}
    covered = {n for g, roles in groups.items() if g != "attn" for n in role_names(final, roles)}
    assert covered == set(before)  # every parameter is in a group: MLP, embeddings, head and norms too
    names = role_names(final, groups["fast"])
    assert names and all(".attn.sparse." in n for n in names)
    graft(final, src, names)
    for n, p in final.named_parameters():
        assert torch.equal(p, src[n] if n in names else before[n]), n  # bitwise
    assert role_names(final, ["attn"]) == sorted(n for n in before if ".attn." in n)  # a prefix covers sub-roles


def test_jaccard_on_hand_made_sets():
    a = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    b = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    assert jaccard(a, b).tolist() == pytest.approx([1 / 3, 1.0, 1.0])


def test_fact_positions_map_characters_to_tokens():
    class Chars:
        def encode(self, s):
            return [ord(c) for c in s]

        def decode(self, ids):
            return "".join(map(chr, ids))

    assert fact_positions(Chars(), "In Nobika, a", "Nobika", offset=1) == [4, 5, 6, 7, 8, 9]
    assert fact_positions(Chars(), "In Nobika", "Zorbia", offset=1) == []


def test_sparsity_measures():
    assert near_zero_fraction(torch.tensor([0.0, 0.0, 1.0, -1.0]), rel=0.1) == 0.5
    assert effective_rank(torch.outer(torch.arange(1.0, 5.0), torch.ones(3))) == pytest.approx(1.0, abs=1e-4)
    assert effective_rank(torch.eye(4)) == pytest.approx(4.0)


# ----------------------------------------------------------------------------- crossover / evidence


def test_crossover_on_hand_made_curves():
    c = crossover_analysis([0.1, 0.5, 0.6, 0.7], [0.3, 0.4, 0.65, 0.5], joint=[0.8, 0.9, math.nan, 0.85])
    assert c["crossover"] == 3 and c["tasks_above"] == 2 and c["ceiling"] == 0.9
    assert c["final_gap"] == pytest.approx(0.2) and c["final_vs_ceiling"] == pytest.approx(-0.2)
    assert crossover_analysis([0.1, 0.2], [0.3, 0.1])["crossover"] == 1
    assert crossover_analysis([0.1, 0.2], [0.3, 0.4])["crossover"] is None and math.isnan(ceiling([]))


def test_verdict_rule_on_hand_made_numbers():
    s = lambda lo, hi, n=5: {"mean": (lo + hi) / 2, "ci_low": lo, "ci_high": hi, "n": n}  # noqa: E731
    assert verdict(s(0.1, 0.3)) == "supported" and verdict(s(-0.3, -0.1)) == "not supported"
    assert verdict(s(-0.1, 0.3)) == "inconclusive" and verdict(s(0.1, 0.3, n=1)) == "inconclusive"
    assert verdict(s(-0.3, -0.1), direction=-1) == "supported" and verdict(s(-0.04, 0.1), 1, -0.05) == "supported"
    assert verdict(None) == "inconclusive" and verdict(stats([])) == "inconclusive"
    # fewer than 5 independent units: never a verdict, however narrow the CI (the old rule said supported at n = 2)
    assert verdict(s(0.1, 0.3, n=4)) == "inconclusive" and verdict(s(-0.3, -0.1, n=4)) == "inconclusive"
    assert verdict(stats([0.10, 0.12])) == "inconclusive"
    assert combine(["supported", "supported"]) == "supported"
    assert combine(["supported", "inconclusive"]) == "inconclusive"
    assert combine(["inconclusive", "not supported"]) == "not supported"
    paired = diff_stats({0: 0.5, 1: 0.7}, {0: 0.2, 1: 0.3, 2: 0.9})
    assert paired["paired"] and paired["values"] == pytest.approx([0.3, 0.4]) and paired["mean"] == pytest.approx(0.35)
    assert paired["units"] == [0, 1]  # replicate 2 has no partner: left out, never an unpaired test
    assert diff_stats({0: 0.5}, {1: 0.2})["n"] == 0


def _cos_rows(seed, slow, fast):
    """grad_cos rows of 3 tasks (pairs (1,0), (2,0), (2,1)) with the given |cos| per pathway, signs mixed."""
    return [{"seed": seed, "order": 0, "after_task": j, "group": g, "measure": "grad_cos", "ref_task": i,
             "value": v * (-1) ** (i + j)} for j, i in ((1, 0), (2, 0), (2, 1))
            for g, v in (("pathway.slow", slow), ("pathway.fast", fast))]


def test_h1_is_the_gradient_cosine_per_pathway_and_frozen_is_not_applicable():
    tel = [r for s in range(5) for r in _cos_rows(s, 0.1 + 0.01 * s, 0.5)]
    tel += [{"seed": 0, "order": 0, "after_task": 0, "group": g, "measure": "grad_energy", "ref_task": -1,
             "value": 1e6 if g == "pathway.slow" else 1.0} for g in ("pathway.slow", "pathway.fast")]
    vals, frozen = h1_values(tel)
    assert vals == {(s, 0): pytest.approx(0.01 * s - 0.4) for s in range(5)} and frozen == []  # |cos| slow − fast
    ev = evidence([], {"arm": {"telemetry": tel}}, replicates={("arm", s, 0): s for s in range(5)})
    h1 = ev["H1"]["runs"]["arm"]
    assert h1["verdict"] == "supported" and h1["stats"]["mean |cos|_slow − |cos|_fast, predicted < 0"]["n"] == 5
    # the slow pathway frozen by the role policy: it has drift rows but no gradient -> not applicable
    frozen_rows = [r for r in tel if r["group"] == "pathway.fast"] + [
        {"seed": s, "order": 0, "after_task": 0, "group": "pathway.slow", "measure": "drift_task", "ref_task": -1,
         "value": 0.0} for s in range(5)]
    assert h1_values(frozen_rows) == ({}, ["slow"])
    ev = evidence([], {"arm": {"telemetry": frozen_rows}})
    assert ev["H1"]["runs"]["arm"]["verdict"] == "not applicable" and "frozen" in ev["H1"]["runs"]["arm"]["note"]


def _graft(seed, group, typ, drop, moved=True):
    return {"seed": seed, "order": 0, "group": group, "mode": "remove", "task": 1, "eval_task": 1,
            "kind": "retain", "type": typ, "value": 0.9 - drop, "final": 0.9, "moved": moved}


def test_h3_statistics_every_group_and_frozen_pathway_not_applicable():
    graft_rows = [r for s in range(5) for r in (
        _graft(s, "fast", "fact", 0.5), _graft(s, "slow", "fact", 0.1), _graft(s, "fast", "rule", 0.0),
        _graft(s, "slow", "rule", 0.2 + 0.02 * s), _graft(s, "mlp", "fact", 0.3), _graft(s, "mlp", "rule", 0.1))]
    facts, rules, groups, frozen = h3_values(graft_rows)
    assert facts == {(s, 0): pytest.approx(0.4) for s in range(5)} and frozen == []
    assert rules == {(s, 0): pytest.approx(0.2 + 0.02 * s) for s in range(5)}
    assert groups["mlp"] == {(s, 0): pytest.approx(0.2) for s in range(5)}
    reps = {("arm", s, 0): s for s in range(5)}
    ev = evidence([], {"arm": {"graft": graft_rows}}, replicates=reps)["H3"]["runs"]["arm"]
    assert ev["verdict"] == "supported" and "own-task drop d(mlp) (descriptive)" in ev["stats"]
    # the slow pathway frozen: grafting it restores identical weights (moved false), its drop of 0 would make
    # "facts live in the fast pathway" true by construction -> not applicable
    frozen_rows = [{**r, "moved": False, "value": r["final"]} if r["group"] == "slow" else r for r in graft_rows]
    assert h3_values(frozen_rows)[3] == ["slow"] and h3_values(frozen_rows)[0] == {}
    ev = evidence([], {"arm": {"graft": frozen_rows}}, replicates=reps)["H3"]["runs"]["arm"]
    assert ev["verdict"] == "not applicable" and "positive by construction" in ev["note"]


# ----------------------------------------------------------------------------- end to end


def test_analyze_end_to_end_on_a_tiny_continual_run(tmp_path):
    pre = tmp_path / "pre"
    assert main(["pretrain", str(ROOT / "configs/pretrain/tiny-split.yaml"), "model.n_layer=1", "model.d_model=32",
                 "model.n_head=2", "model.n_kv_head=2", "model.max_seq_len=64", "data.synthetic_docs=200",
                 "data.vocab_size=300", "data.seq_len=64", "train.batch_size=4", "train.steps=2",
                 "train.eval_every=1000", "samples=0", "probe=false", "seed=7", f"out_dir={pre}"]) == 0
    run = tmp_path / "c"
    assert main(["continual", str(ROOT / "configs/continual/tiny-split-vanilla.yaml"), f"init={pre}",
                 f"out_dir={run}", "stream_options.n_worlds=2", "stream_options.texts_per_task=4",
                 "stream_options.rules_per_world=2", "stream_options.global_overwrites=0", "train.steps=2",
                 "train.batch_size=2", "eval_base=false", "analysis.telemetry=true",
                 "analysis.keep_task_checkpoints=true", "analysis.sketch_dim=0"]) == 0
    stream = run / "seed0-order0"
    assert sorted(p.name for p in (stream / "checkpoints").glob("step_*")) == [f"step_0000000{k}" for k in range(3)]
    assert main(["analyze", str(run), "--max-probes", "2"]) == 0
    art = run_artifacts(run)
    assert all(art[k] for k in ("telemetry", "graft", "routing", "sparsity"))
    assert {r["group"] for r in art["graft"]} == {"slow", "fast", "embed", "head", "mlp", "norm.attn",
                                                      "norm.ffn", "norm.final"}
    assert all(r["moved"] for r in art["graft"] if r["mode"] == "remove")  # vanilla: every group trains
    assert json.loads((run / "meta.json").read_text())["replicate"] == 7  # the init run's pretraining seed
    assert {r["measure"] for r in art["routing"]} >= {"jaccard_last", "jaccard_all", "fact_mass", "fact_selected"}
    assert all(0.0 <= r["value"] <= 1.0 for r in art["routing"] if r["measure"].startswith("jaccard"))
    assert {r["ckpt"] for r in art["sparsity"]} == {0, 2}
    md = (run / "analysis" / "analysis.md").read_text()
    assert "## H1/H2/H3 evidence" in md and "grafting" in md and "routing stability" in md
    ev = json.loads((run / "analysis" / "analysis.json").read_text())["evidence"]
    assert ev["H1"]["runs"]["split-vanilla"]["verdict"] == "inconclusive"  # one stream: no CI
    # the comparison report reads the same artifacts
    assert main(["report", str(run), "--out", str(tmp_path / "r")]) == 0
    assert "H1/H2/H3 evidence" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize("kind", ["nsa", "dsa", "split"])
def test_capture_records_selections_for_every_sparse_kind(tiny_cfg, kind):
    from topocl.analysis.routing import compare, fact_measures, record, selection_unit
    from topocl.tasks import Probe

    class Chars:
        bos_id = 0

        def encode(self, s):
            return [ord(c) % 60 + 1 for c in s]

        def decode(self, ids):
            return "".join(chr(i + 64) for i in ids)

    tiny_cfg.attention = kind
    tiny_cfg.nsa.cmp_block, tiny_cfg.nsa.cmp_stride, tiny_cfg.nsa.sel_block, tiny_cfg.nsa.window = 4, 2, 4, 4
    tiny_cfg.nsa.n_sel = 3
    tiny_cfg.dsa.topk, tiny_cfg.dsa.index_dim, tiny_cfg.dsa.index_rope_dim = 4, 8, 4
    model = GPT(tiny_cfg)
    probes = [Probe("In Zorbia, water flows", " up", [" up", " down"], tags={"world": "Zorbia"}),
              Probe("In Ka, fire", " cold", [" cold", " hot"], tags={"world": "Ka"})]
    recs = record(model, Chars(), probes, torch.device("cpu"), selection_unit(model))
    assert len(recs) == 2 and len(recs[0]) == tiny_cfg.n_layer
    assert all(m.capture is None for m in model.modules() if hasattr(m, "capture"))  # switched off again
    assert all(v == 1.0 for (_, m), v in compare(recs, recs).items() if m.startswith("jaccard"))
    assert all(v == 0.0 for (_, m), v in compare(recs, recs).items() if m.startswith("gate_drift"))
    assert any(m.startswith("gate_drift") for _, m in compare(recs, recs)) == (kind == "nsa")
    assert all(0.0 <= v <= 1.0 + 1e-6 for v in fact_measures(recs).values())
