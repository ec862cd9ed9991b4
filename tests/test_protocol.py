"""The experiment protocol (issue 13): no evaluation leakage, an isolated slow pathway, the 2x2 confound control,
limited replay, parameter-matched central arms. Each test runs the real presets at tiny size."""

import dataclasses
from pathlib import Path

import pytest
import torch

import topocl.continual as continual_mod
from topocl.cli import main
from topocl.config import ConfigError, ModelConfig, PretrainConfig, RolePolicy, TrainConfig, load_config
from topocl.continual import ContinualConfig, LeakageError, StreamRun, check_disjoint
from topocl.model import GPT, SHARED_ROLES
from topocl.optim import policy_for
from topocl.params import count
from topocl.results import load_cost
from topocl.strategies.base import StrategyContext
from topocl.strategies.replay import Replay, ReplayConfig

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs"
TINY = ["model.n_layer=2", "model.d_model=32", "model.n_head=4", "model.n_kv_head=2", "model.max_seq_len=64",
        "data.synthetic_docs=400", "data.vocab_size=400", "data.seq_len=64", "train.batch_size=8",
        "train.eval_every=1000", "samples=0", "probe=false"]
STREAM = ["stream_options.n_worlds=3", "stream_options.texts_per_task=8", "stream_options.global_overwrites=1",
          "train.steps=3", "train.batch_size=4", "base_rows=8", "device=cpu"]


@pytest.fixture(scope="module")
def inits(tmp_path_factory) -> dict[str, Path]:
    """Tiny pretrained runs of every topology the presets start from (a few steps: weights only need to exist)."""
    out = {}
    for kind, steps in (("dense", 20), ("nsa", 2), ("dsa", 2)):
        run = tmp_path_factory.mktemp("pre") / kind
        extra = ["model.nsa.cmp_block=4", "model.nsa.cmp_stride=2"] if kind == "nsa" else []
        assert main(["pretrain", str(CONFIGS / f"pretrain/tiny-{kind}.yaml"), *TINY, *extra, f"train.steps={steps}",
                     f"out_dir={run}"]) == 0
        out[kind] = run
    return out


def arm_config(preset: str, init: Path, out: Path, *extra: str) -> ContinualConfig:
    return load_config(ContinualConfig, CONFIGS / "continual" / f"{preset}.yaml",
                       [f"init={init}", f"out_dir={out}", *STREAM, *extra])


def run_arm(cfg: ContinualConfig, monkeypatch=None, trained: list | None = None) -> StreamRun:
    """One (seed 0, order 0) stream of `cfg`; with `trained`, every batch the loop trains on is recorded."""
    if trained is not None:
        real = continual_mod.train_steps

        def recording(model, opt, batches, steps, **kw):
            def wrapped(step):
                b = batches(step)
                trained.append(b.clone())
                return b
            return real(model, opt, wrapped, steps, **kw)

        monkeypatch.setattr(continual_mod, "train_steps", recording)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = StreamRun(cfg, 0, 0, out)
    run.run(out / "results.jsonl")
    return run


def docs_of(rows: torch.Tensor, bos: int) -> set[tuple[int, ...]]:
    """Documents wholly inside rows (token runs between two BOS tokens)."""
    out = set()
    for r in rows.tolist():
        cuts = [i for i, t in enumerate(r) if t == bos]
        out |= {tuple(r[a + 1:b]) for a, b in zip(cuts, cuts[1:]) if b > a + 1}
    return out


# ----------------------------------------------------------------------------- item 2: leakage


ARMS = [("tiny-dense-vanilla", "dense", []), ("tiny-dense-ewc", "dense", []), ("tiny-dense-joint", "dense", []),
        ("tiny-dense-replay", "dense", ["replay.base_ratio=0.5"]),
        ("tiny-dense-sota", "dense", ["replay.base_ratio=0.5"]),
        ("tiny-dense-lora", "dense", []), ("tiny-dense-acft", "dense", []),
        ("tiny-split-dream", "dense", ["split_dense=true", "dream.every=1", "dream.length=16"])]


@pytest.mark.parametrize("preset,kind,extra", ARMS, ids=[a[0] for a in ARMS])
def test_no_row_or_document_scored_for_base_ability_is_ever_trained_on(inits, tmp_path, monkeypatch, preset, kind,
                                                                       extra):
    trained: list[torch.Tensor] = []
    run = run_arm(arm_config(preset, inits[kind], tmp_path / "r", *extra), monkeypatch, trained)
    held_out = run.base_val
    assert held_out is not None and len(held_out) == 8
    sources = {"trained batches": torch.cat(trained), **{f"task {j}": r for j, r in enumerate(run.rows)}}
    for s in run.strategies:  # replay buffer and base pool, dreams, EWC has none
        sources.update({f"{s.name} {k}": v for k, v in s.sources().items()})
    if "dream" in preset:
        assert "dream dreams" in sources
    held = {tuple(r) for r in held_out.tolist()}
    held_docs = docs_of(held_out, run.tok.bos_id)
    assert held_docs
    for name, rows in sources.items():
        assert not held & {tuple(r) for r in rows.tolist()}, name
        assert not held_docs & docs_of(rows, run.tok.bos_id), name
    task_texts = {t for task in run.tasks for t in task.texts}
    assert not {run.tok.decode(list(d)).strip() for d in held_docs} & task_texts
    if "base_ratio=0.5" in extra:  # base mixing did train on pretraining text: the training split's
        pool = {tuple(r) for r in run.base_pool.tolist()}
        assert any(tuple(r) in pool for r in torch.cat(trained).tolist())


def test_check_disjoint_names_the_leak():
    ev = torch.arange(12).view(3, 4)
    check_disjoint({"held-out": ev}, {"task 0": ev + 100, "other length": ev[:, :2]})
    with pytest.raises(LeakageError, match="1 of 3 rows of held-out are also training rows of replay buffer"):
        check_disjoint({"held-out": ev}, {"task 0": ev + 100, "replay buffer": torch.cat([ev[1:2], ev + 50])})


# ----------------------------------------------------------------------------- item 4: slow pathway isolated


ACFT = [("tiny-split-acft", "dense", ["split_dense=true"]), ("tiny-dense-acft", "dense", []),
        ("tiny-nsa-acft", "nsa", []), ("tiny-dsa-acft", "dsa", [])]


@pytest.mark.parametrize("preset,kind,extra", ACFT, ids=[a[0] for a in ACFT])
def test_acft_presets_leave_every_frozen_tensor_bitwise_unchanged(inits, tmp_path, preset, kind, extra):
    cfg = arm_config(preset, inits[kind], tmp_path / "r", *extra)
    run = run_arm(cfg)
    model = run.model
    roles = model.param_roles()
    slow, fast = model.pathway_roles()
    assert slow and fast
    frozen = {r for r in set(roles.values()) if policy_for(r, cfg.train).lr_scale == 0}
    # the slow pathway and what feeds it at model level are frozen; the shared roles are placed by name
    assert slow | {"norm.attn", "embed"} <= frozen
    assert set(SHARED_ROLES) <= set(roles.values()) and set(SHARED_ROLES) <= set(cfg.train.roles)
    assert fast.isdisjoint(frozen)
    moved = 0
    for name, p in model.named_parameters():
        same = torch.equal(p.detach().cpu(), run.init_state[name].cpu())
        if roles[name] in frozen:
            assert same, f"{name} ({roles[name]}) is frozen but moved"
        moved += not same
    assert moved  # the fast pathway did train


def test_shared_model_level_tensors_have_their_own_roles(tiny_cfg):
    roles = GPT(tiny_cfg).param_roles()
    assert roles["blocks.0.attn_norm.weight"] == "norm.attn"
    assert roles["blocks.0.ffn_norm.weight"] == "norm.ffn" and roles["norm.weight"] == "norm.final"
    cfg = TrainConfig(roles={"norm": RolePolicy(lr_scale=0.0)})
    assert policy_for("norm.attn", cfg).lr_scale == 0  # a policy on "norm" still covers every norm


def test_params_lists_which_pathway_each_role_belongs_to(capsys):
    assert main(["params", str(CONFIGS / "pretrain/tiny-split.yaml")]) == 0
    lines = {ln.split()[0]: ln.split()[-1] for ln in capsys.readouterr().out.splitlines()[1:] if ln.startswith("  ")}
    assert lines["attn.dense_heads"] == "slow" and lines["attn.sparse_heads"] == "fast"
    assert all(lines[r] == "shared" for r in SHARED_ROLES)


# ----------------------------------------------------------------------------- item 7: the 2x2


def test_full_budget_split_equals_dense_and_partitions_its_heads():
    from topocl.model import split_from_dense

    torch.manual_seed(0)
    c = ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=32)
    dense = GPT(c).double()
    split = split_from_dense(dense)
    x = torch.randint(0, 64, (2, 32))
    assert (dense(x).logits - split(x).logits).abs().max().item() <= 1e-12
    assert split.cfg.attention == "split" and split.num_params() == dense.num_params()
    by_role = split.params_by_role()
    attn = sum(v for k, v in dense.params_by_role().items() if k.startswith("attn."))
    assert by_role["attn.dense_heads"] == by_role["attn.sparse_heads"] == attn // 2  # 1 of 2 KV groups each
    # the same group B at its pretrained budget is a different function; the partition is the split presets'
    split.blocks[0].attn.frac = 0.1
    assert (dense(x).logits - split(x).logits).abs().max().item() > 1e-6
    with pytest.raises(ValueError, match="dense-attention"):
        split_from_dense(split)


def test_the_2x2_presets_share_one_partition_and_one_policy():
    load = lambda n: load_config(ContinualConfig, CONFIGS / "continual" / f"{n}.yaml")  # noqa: E731
    dense_acft, split_acft = load("tiny-dense-acft"), load("tiny-split-acft")
    assert dense_acft.split_dense and dense_acft.train.roles == split_acft.train.roles
    assert load("tiny-full-acft").train.roles == split_acft.train.roles
    part = lambda n: load_config(PretrainConfig, CONFIGS / "pretrain" / f"{n}.yaml").model  # noqa: E731
    split, full, dense = part("tiny-split"), part("tiny-split-full"), part("tiny-dense")
    assert split.split.sparse_kv_groups == full.split.sparse_kv_groups == dense.n_kv_head // 2
    assert full.split.topk == 0 and full.split.topk_frac == 1.0 and split.split.topk_frac < 1
    for n in ("tiny-dense-vanilla", "tiny-split-vanilla", "tiny-full-vanilla"):
        assert not load(n).train.roles and load(n).strategies == ["vanilla"]


def test_split_dense_run_starts_from_the_dense_function(inits, tmp_path):
    a = run_arm(arm_config("tiny-dense-vanilla", inits["dense"], tmp_path / "a"))
    b = run_arm(arm_config("tiny-dense-vanilla", inits["dense"], tmp_path / "b", "split_dense=true"))
    assert b.model.cfg.attention == "split" and "attn.sparse_heads" in b.model.param_roles().values()
    rows = lambda r: [x for x in continual_mod.json.loads("[" + ",".join(  # noqa: E731
        (r.dir.parent / "results.jsonl").read_text().splitlines()) + "]") if x["after_task"] == -1]
    for x, y in zip(rows(a), rows(b), strict=True):
        assert x["metric"] == y["metric"] and x["value"] == pytest.approx(y["value"], abs=1e-5)


# ----------------------------------------------------------------------------- item 11: baselines


def ctx(**kw) -> StrategyContext:
    return StrategyContext(device=torch.device("cpu"), seed=0, seq_len=8, batch_size=8, **kw)


def test_replay_memory_is_at_most_ten_percent_of_the_stream_by_default():
    s = Replay(ReplayConfig(), ctx(stream_rows=205))
    assert s.capacity == 20
    for j in range(5):
        s.after_task(None, torch.full((41, 9), j), j)
    assert len(s.buffer) == 20 and s.buffer.seen == 205
    assert Replay(ReplayConfig(buffer_size=12), ctx(stream_rows=205)).capacity == 12
    with pytest.raises(ConfigError, match="exceeds the memory budget"):
        Replay(ReplayConfig(buffer_size=21), ctx(stream_rows=205))
    with pytest.raises(ConfigError, match="replay.memory"):
        Replay(ReplayConfig(memory=1.5), ctx(stream_rows=205))


@pytest.mark.parametrize("preset", ["tiny-dense-replay", "tiny-dense-sota"])
def test_replay_presets_keep_within_the_budget_on_the_real_stream(inits, tmp_path, preset):
    run = run_arm(arm_config(preset, inits["dense"], tmp_path / "r"))
    total = sum(len(r) for r in run.rows)
    (replay,) = [s for s in run.strategies if s.name == "replay"]
    assert 1 <= len(replay.buffer) <= replay.capacity <= 0.1 * total


# dense control of every sparse / MoE pretraining preset (a split model has exactly its dense model's count)
CONTROLS = {"tiny-nsa": "tiny-nsa-dense", "tiny-dsa": "tiny-dsa-dense", "tiny-moe": "tiny-moe-dense",
            "tiny-split": "tiny-dense", "tiny-split-full": "tiny-dense",
            "ts-nsa-20m": "ts-nsa-20m-dense", "ts-dsa-20m": "ts-dsa-20m-dense", "ts-split-20m": "ts-dense-20m",
            "ts-nsa-100m": "ts-nsa-100m-dense", "ts-dsa-100m": "ts-dsa-100m-dense", "ts-split-100m": "ts-dense-100m"}


def _model(name: str) -> ModelConfig:
    cfg = load_config(PretrainConfig, CONFIGS / "pretrain" / f"{name}.yaml")
    return dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or cfg.data.vocab_size)


def test_every_sparse_preset_has_a_parameter_matched_dense_control():
    sparse = {p.stem for p in (CONFIGS / "pretrain").glob("*.yaml")
              if (m := _model(p.stem)).attention != "dense" or m.ffn != "mlp"}
    assert sparse == set(CONTROLS)
    for name, control in CONTROLS.items():
        m, d = _model(name), _model(control)
        assert d.attention == "dense" and d.ffn == "mlp"
        assert (d.n_layer, d.d_model, d.n_head, d.n_kv_head) == (m.n_layer, m.d_model, m.n_head, m.n_kv_head)
        assert abs(count(d) / count(m) - 1) <= 0.02, (name, count(m), control, count(d))


@pytest.mark.parametrize("size", ["tiny", "ts"])
def test_the_seeds_central_arms_exist_at_both_sizes(size):
    suffix = "" if size == "tiny" else "-20m"
    for kind in ("nsa", "dsa"):
        pre = load_config(PretrainConfig, CONFIGS / "pretrain" / f"{size}-{kind}{suffix}.yaml")
        for arm in ("naive", "acft"):
            cfg = load_config(ContinualConfig, CONFIGS / "continual" / f"{size}-{kind}-{arm}.yaml")
            assert cfg.init == pre.out_dir and cfg.run == f"{kind}-{arm}"
            assert bool(cfg.train.roles) == (arm == "acft")
    sota = load_config(ContinualConfig, CONFIGS / "continual" / f"{size}-dense-sota.yaml")
    assert sota.strategies == ["ewc", "replay"] and sota.replay.memory <= 0.1 and sota.replay.buffer_size == 0


def test_ewc_lambda_is_selected_on_a_validation_stream_not_the_test_stream():
    from topocl.sweep import load_sweep

    test_stream = load_config(ContinualConfig, CONFIGS / "continual" / "tiny-base.yaml").stream_options["seed"]
    sweep, _ = load_sweep(CONFIGS / "sweeps" / "tiny-ewc-lambda.yaml")
    grid = {}
    for name, arm in sweep.arms.items():
        if arm.init_arm:
            opts = dict(o.split("=", 1) for o in arm.overrides)
            assert int(opts["stream_options.seed"]) != test_stream, name
            grid[name] = float(opts["ewc.lam"])
    chosen = load_config(ContinualConfig, CONFIGS / "continual" / "tiny-dense-ewc.yaml").ewc.lam
    assert len(grid) >= 3 and chosen in grid.values()
    assert load_config(ContinualConfig, CONFIGS / "continual" / "tiny-dense-sota.yaml").ewc.lam == chosen


# ----------------------------------------------------------------------------- item 10: regime


def test_run_summary_states_epochs_per_row(inits, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["continual", str(CONFIGS / "continual/tiny-dense-vanilla.yaml"), f"init={inits['dense']}",
                 f"out_dir={out}", *STREAM]) == 0
    cost = continual_mod.json.loads((out / "cost.json").read_text())
    run = StreamRun(arm_config("tiny-dense-vanilla", inits["dense"], tmp_path / "x"), 0, 0, tmp_path / "x")
    expected = sum(3 * 4 / len(r) for r in run.rows) / len(run.rows)
    assert cost["epochs_per_row"] == pytest.approx(expected)
    assert load_cost(out / "cost.json")["entries"][0]["epochs_per_row"] == pytest.approx(expected)  # reports read it
    assert f"epochs per row: {expected:.1f}" in capsys.readouterr().out
