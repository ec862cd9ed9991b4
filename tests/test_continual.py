"""The continual runner end to end on a tiny pretrained model: tidy rows, resume equivalence, arms."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from topocl.cli import main
from topocl.results import KEYS, load_rows, matrices

ROOT = Path(__file__).parents[1]
TINY = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.n_kv_head=1", "model.max_seq_len=64",
        "data.synthetic_docs=400", "data.vocab_size=400", "data.seq_len=64", "train.batch_size=8",
        "train.steps=30", "train.eval_every=1000", "samples=0"]
STREAM = ["stream_options.n_worlds=3", "stream_options.texts_per_task=8", "stream_options.global_overwrites=1",
          "train.steps=3", "train.batch_size=4", "base_rows=8"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "run"
    assert main(["pretrain", str(ROOT / "configs/pretrain/tiny-dense.yaml"), *TINY, f"out_dir={out}"]) == 0
    return out


def continual(pretrained: Path, out: Path, *extra: str, config: str = "tiny-dense-vanilla.yaml") -> int:
    return main(["continual", str(ROOT / "configs/continual" / config), f"init={pretrained}", f"out_dir={out}",
                 *STREAM, *extra])


def test_rows_are_tidy_and_cover_the_matrix(pretrained, tmp_path):
    assert continual(pretrained, tmp_path / "c", "seeds=[0,1]") == 0
    lines = (tmp_path / "c" / "results.jsonl").read_text().splitlines()
    assert all(set(json.loads(line)) == set(KEYS) for line in lines)
    rows = load_rows(tmp_path / "c")
    mats = matrices(rows)
    assert set(mats) == {("dense-vanilla", 0, 0), ("dense-vanilla", 1, 0)}
    assert all(len(R) == 4 and len(R[0]) == 3 for R in mats.values())  # row -1 + 3 tasks, 3 tasks
    assert {r["kind"] for r in rows} == {"retain", "update", "base"}
    assert {r["metric"] for r in rows if r["kind"] == "base"} == {"acc", "acc_sum", "em", "nll", "bpb", "acc@seen",
                                                                  "acc@all"}
    cost = json.loads((tmp_path / "c" / "cost.json").read_text())
    assert cost["trainable_params"] > 0 and len(cost["runs"]) == 2 and cost["tokens"] == 3 * 3 * 4 * 64  # mean per run
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["seeds"] == [0, 1] and meta["torch"] == torch.__version__ and meta["git_sha"] and meta["started"]
    # the same directory again without resume is refused, nothing overwritten
    assert continual(pretrained, tmp_path / "c") == 1


def test_resume_mid_stream_gives_the_same_rows(pretrained, tmp_path):
    extra = ["strategies=[ewc,replay]", "eval_every=2", "analysis.keep_task_checkpoints=true"]
    assert continual(pretrained, tmp_path / "a", *extra) == 0
    straight = (tmp_path / "a" / "results.jsonl").read_text()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    b = tmp_path / "b"
    # simulate a kill during task 2: checkpoint after task 1, rows up to a mid-task evaluation of task 2
    ck = b / "seed0-order0" / "checkpoints"
    shutil.rmtree(ck / "step_00000003")
    (ck / "LATEST").write_text("step_00000002")
    kept = (ck / "step_00000002" / "state.json").stat().st_mtime_ns
    rows = straight.splitlines()
    cut = next(i for i, r in enumerate(rows) if json.loads(r)["after_task"] == 2)
    (b / "results.jsonl").write_text("\n".join(rows[:cut - 3]) + "\n")
    assert continual(pretrained, b, *extra, "resume=true") == 0
    assert (b / "results.jsonl").read_text() == straight  # same rows, same steps
    assert (ck / "step_00000002" / "state.json").stat().st_mtime_ns == kept  # tasks 0-1 were not trained again


@pytest.mark.parametrize("arm", ["tiny-dense-lora.yaml", "tiny-dense-joint.yaml", "tiny-dense-ewc.yaml",
                                 "tiny-dense-replay.yaml"])
def test_arms_run(pretrained, tmp_path, arm):
    assert continual(pretrained, tmp_path / "x", config=arm) == 0
    rows = load_rows(tmp_path / "x")
    assert len(matrices(rows)) == 1


def test_lora_with_single_task_reference_resets_to_a_fresh_adapter(pretrained, tmp_path):
    assert continual(pretrained, tmp_path / "s", "reference=single", config="tiny-dense-lora.yaml") == 0
    assert len(matrices(load_rows(tmp_path / "s"))) == 1


def test_lora_arm_trains_only_adapters(pretrained, tmp_path):
    assert continual(pretrained, tmp_path / "l", config="tiny-dense-lora.yaml") == 0
    cost = json.loads((tmp_path / "l" / "cost.json").read_text())
    assert set(k for k, v in cost["runs"][0]["trainable_by_role"].items() if v) == {"lora"}


def test_bad_init_is_a_clear_error(tmp_path, capsys):
    assert continual(tmp_path / "missing", tmp_path / "z") == 1
    assert "not a run directory" in capsys.readouterr().err


def test_campaign_rows_split_headline_probes_into_facts_and_rules(pretrained, tmp_path):
    """acc:fact / acc:rule score the headline (unseen-frame) probes of one type; a rule's session is the only
    task with acc:rule rows, and the two types partition the headline probes (their accuracies, weighted by
    probe counts, give the headline acc)."""
    from topocl.tasks.streams import build_stream

    opts = ["stream=campaign", "stream_options={sessions: 3, facts_per_session: 2, texts_per_task: 4, changes: 0, "
            "rules: 1}", "train.steps=2", "train.batch_size=4", "base_rows=8"]
    assert main(["continual", str(ROOT / "configs/continual/tiny-dense-vanilla.yaml"), f"init={pretrained}",
                 f"out_dir={tmp_path / 'c'}", *opts]) == 0
    rows = [r for r in load_rows(tmp_path / "c") if r["after_task"] == 2]
    by = {(r["eval_task"], r["metric"]): r["value"] for r in rows if r["kind"] == "retain"}
    rule_tasks = {t for t, m in by if m == "acc:rule"}
    assert len(rule_tasks) == 1 and all((t, "acc:fact") in by for t in range(3))
    tasks = build_stream("campaign", {"sessions": 3, "facts_per_session": 2, "texts_per_task": 4, "changes": 0,
                                      "rules": 1})
    for t, task in enumerate(tasks):
        head = [p for p in task.probes if p.kind == "retain" and p.tags.get("paraphrase") != "seen"]
        n = {k: sum(p.tags["type"] == k for p in head) for k in ("fact", "rule")}
        assert (n["rule"] > 0) == (t in rule_tasks)
        mixed = sum(by.get((t, f"acc:{k}"), 0.0) * n[k] for k in n) / sum(n.values())
        assert abs(mixed - by[(t, "acc")]) < 1e-9
    from topocl.report import write_report

    md = write_report([tmp_path / "c"], tmp_path / "report").read_text()
    assert "## By probe type" in md and "| dense-vanilla | rule | 1.0 |" in md
    assert (tmp_path / "report" / "retention_by_delay_rule.png").stat().st_size > 10_000
