"""Nothing lost, every failure explained (issue 14): kills after the last checkpoint, torn logs, NaN stops, damaged
checkpoints, nonsensical config values, EWC resume."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from topocl.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    NonFiniteCheckpoint,
    latest_checkpoint,
    load_checkpoint,
    load_latest,
    read_weights,
    save_checkpoint,
)
from topocl.cli import main
from topocl.config import ConfigError, PretrainConfig, TrainConfig, load_config
from topocl.jsonl import TornLineWarning
from topocl.model import GPT
from topocl.optim import build_optimizer
from topocl.train import NonFiniteLoss, train_steps

ROOT = Path(__file__).parents[1]
PRESET = str(ROOT / "configs/pretrain/tiny-dense.yaml")
TINY = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.n_kv_head=1", "model.max_seq_len=32",
        "data.synthetic_docs=400", "data.vocab_size=300", "data.seq_len=32", "train.batch_size=8",
        "train.warmup_steps=2", "train.log_every=1", "train.eval_every=5", "train.eval_batches=2", "samples=1"]


def pretrain(out: Path, *extra: str) -> int:
    return main(["pretrain", PRESET, *TINY, f"out_dir={out}", *extra])


def strict_rows(path: Path) -> list[dict]:
    def refuse(c):
        raise ValueError(f"{path}: bare {c}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def train_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in strict_rows(out / "metrics.jsonl") if "train_loss" in r}


# ----------------------------------------------------------------------------- 1. kill after the last checkpoint


def test_kill_after_last_checkpoint_finishes_the_summary_and_a_finished_run_stays_finished(tmp_path, monkeypatch,
                                                                                            capsys):
    import topocl.evaluate
    from topocl import demo

    out = tmp_path / "pre"

    def killed(*a, **k):
        raise KeyboardInterrupt  # the kill point: probe scoring, after the last checkpoint, before summary.json

    monkeypatch.setattr(topocl.evaluate, "score_probes", killed)
    with pytest.raises(KeyboardInterrupt):
        pretrain(out, "train.steps=6")
    monkeypatch.undo()
    assert latest_checkpoint(out / "checkpoints").name == "step_00000006" and not (out / "summary.json").exists()
    final_val = [r for r in strict_rows(out / "metrics.jsonl") if "val_loss" in r][-1]
    # `topocl demo` resumes such a directory: the summary is finished, with the final evaluation
    run = demo.pretrained("tiny-dense", out, [*TINY, "train.steps=6"])
    s = json.loads((run / "summary.json").read_text())
    assert s["val_loss"] == final_val["val_loss"] and s["val_bpb"] == final_val["val_bpb"]
    assert "base_probes" in s and s["steps"] == 6
    assert train_losses(out).keys() == set(range(6))  # nothing trained twice
    # resume=true on the finished run leaves it alone
    before = (out / "summary.json").read_bytes(), (out / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert pretrain(out, "train.steps=6", "resume=true") == 0
    cap = capsys.readouterr()
    assert "finished run" in cap.err and f"val loss {s['val_loss']:.4f}" in cap.out
    assert ((out / "summary.json").read_bytes(), (out / "summary.json").stat().st_mtime_ns) == before


# ----------------------------------------------------------------------------- 2 + 4. torn log, damaged checkpoint


def test_resume_drops_a_torn_metrics_line_and_skips_a_damaged_checkpoint(tmp_path):
    a, run = tmp_path / "a", ["train.steps=10", "train.ckpt_every=4", "train.keep_checkpoints=3", "probe=false",
                              "samples=0"]
    assert pretrain(a, *run) == 0
    rows = (a / "metrics.jsonl").read_text().splitlines()
    b = tmp_path / "b"
    shutil.copytree(a, b)
    # a kill during step 10's append, with its checkpoint not yet written; then bit rot in step 8's weights
    shutil.rmtree(b / "checkpoints" / "step_00000010")
    (b / "checkpoints" / "LATEST").write_text("step_00000008")
    (b / "metrics.jsonl").write_text("\n".join(rows[:-1]) + "\n" + rows[-1][:30])
    weights = b / "checkpoints" / "step_00000008" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = bytes(4096)
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning) as caught:
        assert pretrain(b, *run, "resume=true") == 0
    said = {type(w.message): str(w.message) for w in caught}
    assert "step_00000004 because" in said[CheckpointWarning]
    assert "step_00000008/model.safetensors: SHA-256 differs" in said[CheckpointWarning]
    assert f"metrics.jsonl:{len(rows)}: dropped a torn last line" in said[TornLineWarning]
    timeless = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert timeless(strict_rows(b / "metrics.jsonl")) == timeless(strict_rows(a / "metrics.jsonl"))  # from step 4


def _saved(tiny_cfg, tmp_path, steps=(2, 4)):
    torch.manual_seed(0)
    model = GPT(tiny_cfg)
    opt = build_optimizer(model, TrainConfig(lr=1e-2))
    for s in steps:
        save_checkpoint(tmp_path, s, model, opt, {"next_step": s})
    return model, opt


@pytest.mark.parametrize("damage", ["truncate", "zero-64k", "state-json"])
def test_damaged_checkpoint_is_refused_naming_the_file_and_the_fix(tiny_cfg, tmp_path, damage):
    tiny_cfg.vocab_size = 512  # model.safetensors > 64 KiB
    model, opt = _saved(tiny_cfg, tmp_path)
    ck = tmp_path / "step_00000004"
    if damage == "truncate":
        f = ck / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        match = r"model.safetensors: \d+ bytes, the manifest says \d+"
    elif damage == "zero-64k":
        f = ck / "model.safetensors"
        data = bytearray(f.read_bytes())
        assert len(data) > 3 * 65536
        data[65536:131072] = bytes(65536)
        f.write_bytes(bytes(data))
        match = r"model.safetensors: SHA-256 differs"
    else:
        f = ck / "state.json"
        f.write_text(f.read_text()[:-20] + ", oops")
        match = r"state.json: not valid JSON"
    fresh = GPT(tiny_cfg)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match=match + r".*delete .*step_00000004 to resume from the previous"):
        load_checkpoint(ck, fresh)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())  # nothing loaded
    with pytest.warns(CheckpointWarning, match="resuming from the previous intact checkpoint .*step_00000002"):
        path, state = load_latest(tmp_path, fresh)
    assert path.name == "step_00000002" and state["next_step"] == 2
    shutil.rmtree(tmp_path / "step_00000002")
    with pytest.raises(CheckpointError, match="no intact checkpoint under"):
        load_latest(tmp_path, fresh)


def test_read_weights_of_a_garbled_file_names_it(tiny_cfg, tmp_path):
    _saved(tiny_cfg, tmp_path, steps=(1,))
    f = tmp_path / "step_00000001" / "model.safetensors"
    f.write_bytes(b"\x00" * 16)
    state = json.loads((f.parent / "state.json").read_text())
    del state["files"]  # a checkpoint from before the manifest: no checksums, the reader still names the file
    (f.parent / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"model.safetensors: unreadable"):
        load_checkpoint(f.parent, GPT(tiny_cfg))
    with pytest.raises(Exception):  # noqa: B017  (the raw reader: safetensors' own error)
        read_weights(f)


# ----------------------------------------------------------------------------- 3. non-finite


def test_huge_lr_stops_on_the_gradient_norm_and_keeps_latest_on_a_finite_checkpoint(tmp_path, capsys):
    out = tmp_path / "lr"
    assert pretrain(out, "train.steps=6", "train.ckpt_every=1", "train.lr=1e6", "probe=false", "samples=0") == 1
    err = capsys.readouterr().err
    line = next(ln for ln in err.split("\n") if "stopped" in ln)
    assert line.startswith("topocl pretrain: stopped: gradient norm is nan at step 1")  # its own line, no bar
    latest = latest_checkpoint(out / "checkpoints")
    assert latest.name == "step_00000001"
    for ck in (out / "checkpoints").glob("step_*"):
        assert all(torch.isfinite(v).all() for v in read_weights(ck / "model.safetensors").values()), ck
    strict_rows(out / "metrics.jsonl")


def test_weights_gone_non_finite_are_not_checkpointed(tmp_path, monkeypatch, capsys):
    import topocl.pretrain as P

    real = P.train_steps

    def blow_up(model, *a, **k):  # e.g. weight decay times a huge lr: finite gradients, infinite weights
        for r in real(model, *a, **k):
            if r.step == 3:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("inf"))
            yield r

    monkeypatch.setattr(P, "train_steps", blow_up)
    out = tmp_path / "r"
    assert pretrain(out, "train.steps=6", "train.ckpt_every=2", "probe=false", "samples=0") == 1
    assert "topocl pretrain: stopped: the weights hold NaN/inf after step 3" in capsys.readouterr().err
    assert (out / "checkpoints" / "LATEST").read_text() == "step_00000002"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["LATEST", "step_00000002"]


def test_gradient_overflow_with_finite_loss_is_not_applied(tiny_cfg):
    torch.manual_seed(0)
    model = GPT(tiny_cfg)
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=1)
    opt = build_optimizer(model, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    next(model.parameters()).register_hook(lambda g: g * float("inf"))  # loss stays finite, its gradient does not
    rows = torch.randint(0, tiny_cfg.vocab_size, (4, 17), generator=torch.Generator().manual_seed(0))
    with pytest.raises(NonFiniteLoss, match=r"gradient norm is (nan|inf) at step 0 \(loss \d"):
        next(train_steps(model, opt, lambda s: rows, range(3), cfg=cfg, device=torch.device("cpu")))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_a_non_finite_checkpoint_is_never_written(tiny_cfg, tmp_path):
    model, opt = _saved(tiny_cfg, tmp_path, steps=(1,))
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(NonFiniteCheckpoint, match=r"holds NaN/inf.*LATEST still points to step_00000001"):
        save_checkpoint(tmp_path, 2, model, opt, {"next_step": 2})
    assert (tmp_path / "LATEST").read_text() == "step_00000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step_00000001"]


def test_metrics_jsonl_stays_strict_json_with_non_finite_values(tmp_path, monkeypatch):
    from topocl import model as model_mod

    real = model_mod.GPT.forward

    def with_nan_aux(self, idx, targets=None):
        out = real(self, idx, targets)
        out.aux = {**out.aux, "probe_ratio": torch.tensor(float("nan"))}
        return out

    monkeypatch.setattr(model_mod.GPT, "forward", with_nan_aux)
    assert pretrain(tmp_path / "r", "train.steps=2", "probe=false", "samples=0") == 0
    rows = strict_rows(tmp_path / "r" / "metrics.jsonl")
    assert [r["probe_ratio"] for r in rows if "train_loss" in r] == [None, None]


# ----------------------------------------------------------------------------- 5. config values


@pytest.mark.parametrize("override,key", [("train.steps=-5", "train.steps"), ("train.lr=-1e-3", "train.lr"),
                                          ("train.batch_size=0", "train.batch_size"),
                                          ("data.val_fraction=1.5", "data.val_fraction"),
                                          ("train.roles.attn.lr_scale=-1", "train.roles.attn.lr_scale"),
                                          ("train.lr=nan", "train.lr")])
def test_nonsensical_values_are_config_errors_naming_the_key(override, key, capsys):
    with pytest.raises(ConfigError, match=rf"^{key}="):
        load_config(PretrainConfig, PRESET, [override])
    assert main(["pretrain", PRESET, override]) == 1
    assert f"error: {key}=" in capsys.readouterr().err


# ----------------------------------------------------------------------------- continual: NaN, EWC resume, torn rows

CL_TINY = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.n_kv_head=1", "model.max_seq_len=64",
           "data.synthetic_docs=400", "data.vocab_size=400", "data.seq_len=64", "train.batch_size=8",
           "train.steps=30", "train.eval_every=1000", "samples=0", "probe=false"]
STREAM = ["stream_options.n_worlds=3", "stream_options.texts_per_task=8", "stream_options.global_overwrites=1",
          "train.steps=3", "train.batch_size=4", "base_rows=8"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "run"
    assert main(["pretrain", PRESET, *CL_TINY, f"out_dir={out}"]) == 0
    return out


def continual(pretrained: Path, out: Path, *extra: str, config: str = "tiny-dense-vanilla.yaml") -> int:
    return main(["continual", str(ROOT / "configs/continual" / config), f"init={pretrained}", f"out_dir={out}",
                 *STREAM, *extra])


def test_continual_non_finite_stop_is_one_clear_line(pretrained, tmp_path, capsys, monkeypatch):
    from topocl import model as model_mod

    real, calls = model_mod.GPT.forward, [0]

    def poisoned(self, idx, targets=None):
        out = real(self, idx, targets)
        if targets is not None and self.training:
            calls[0] += 1
            if calls[0] == 5:  # task 1, its second step
                out.loss = out.loss * torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(model_mod.GPT, "forward", poisoned)
    assert continual(pretrained, tmp_path / "c", "train.log_every=1") == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.split("\n") if "stopped" in ln]
    assert len(lines) == 1 and lines[0].startswith("topocl continual: stopped: loss is nan at step 1")
    assert "Traceback" not in err
    strict_rows(tmp_path / "c" / "seed0-order0" / "metrics.jsonl")
    strict_rows(tmp_path / "c" / "results.jsonl")


def test_ewc_resume_logs_bitwise_the_uninterrupted_run_and_torn_results_are_dropped(pretrained, tmp_path):
    extra = ["train.log_every=1", "analysis.keep_task_checkpoints=true"]
    a = tmp_path / "a"
    assert continual(pretrained, a, *extra, config="tiny-dense-ewc.yaml") == 0
    straight = {f: (a / f).read_text() for f in ("results.jsonl", "seed0-order0/metrics.jsonl")}
    assert '"ewc_penalty"' in straight["seed0-order0/metrics.jsonl"]
    b = tmp_path / "b"
    shutil.copytree(a, b)
    # a kill in task 2 (after the checkpoint of task 1), in the middle of appending an evaluation row
    ck = b / "seed0-order0" / "checkpoints"
    shutil.rmtree(ck / "step_00000003")
    (ck / "LATEST").write_text("step_00000002")
    rows = straight["results.jsonl"].splitlines()
    cut = next(i for i, r in enumerate(rows) if json.loads(r)["after_task"] == 2)
    (b / "results.jsonl").write_text("\n".join(rows[:cut]) + "\n" + rows[cut][:25])
    with pytest.warns(TornLineWarning, match=rf"results.jsonl:{cut + 1}: dropped a torn last line"):
        assert continual(pretrained, b, *extra, "resume=true", config="tiny-dense-ewc.yaml") == 0
    for f, text in straight.items():  # the EWC penalty (F̃ restored in the same order) to the last bit
        got, want = (b / f).read_text().splitlines(), text.splitlines()
        if f.endswith("metrics.jsonl"):
            got, want = ([{k: v for k, v in json.loads(r).items() if k != "tokens_per_s"} for r in x]
                         for x in (got, want))
        assert got == want, f
