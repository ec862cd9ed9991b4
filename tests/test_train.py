"""The one training loop, the role-grouped optimizer and atomic checkpoints."""

import math

import pytest
import torch

from topocl.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from topocl.config import RolePolicy, TrainConfig
from topocl.model import GPT
from topocl.optim import build_optimizer, lr_factor, optimizer_state_bytes
from topocl.train import NonFiniteLoss, train_steps

CPU = torch.device("cpu")


def make(tiny_cfg, **train_kw):
    torch.manual_seed(0)
    model = GPT(tiny_cfg)
    cfg = TrainConfig(steps=8, batch_size=4, lr=1e-2, warmup_steps=2, **train_kw)
    return model, build_optimizer(model, cfg), cfg


def batches(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 64, (4, 17), generator=g)


def run(model, opt, cfg, steps, **kw):
    return [r.loss for r in train_steps(model, opt, batches, steps, cfg=cfg, device=CPU, **kw)]


def test_loss_decreases_and_is_deterministic(tiny_cfg):
    m1, o1, cfg = make(tiny_cfg)
    fixed = lambda s: batches(0)  # noqa: E731  (memorise one batch)
    l1 = [r.loss for r in train_steps(m1, o1, fixed, range(8), cfg=cfg, device=CPU)]
    m2, o2, _ = make(tiny_cfg)
    l2 = [r.loss for r in train_steps(m2, o2, fixed, range(8), cfg=cfg, device=CPU)]
    assert l1 == l2  # bitwise on CPU
    assert l1[-1] < l1[0] - 0.5


def test_grad_accumulation_matches_full_batch(tiny_cfg):
    m1, o1, cfg1 = make(tiny_cfg)
    m2, o2, cfg2 = make(tiny_cfg, grad_accum=2)
    a, b = run(m1, o1, cfg1, range(3)), run(m2, o2, cfg2, range(3))
    assert a == pytest.approx(b, rel=1e-5)


def test_one_param_group_per_role_and_frozen_roles_have_no_state(tiny_cfg):
    m, opt, cfg = make(tiny_cfg, roles={"attn": RolePolicy(lr_scale=0.0), "mlp": RolePolicy(lr_scale=0.5)})
    roles = {g["role"] for g in opt.param_groups}
    assert roles == {"embed", "head", "norm.attn", "norm.ffn", "norm.final", "mlp"}  # attn.* frozen by the prefix
    assert {g["role"]: g["lr_scale"] for g in opt.param_groups}["mlp"] == 0.5
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if ".attn." in n}
    run(m, opt, cfg, range(3))
    for n, p in m.named_parameters():
        if ".attn." in n:
            assert not p.requires_grad and torch.equal(p, frozen[n]) and p not in opt.state
    assert optimizer_state_bytes(opt) > 0
    with pytest.raises(ValueError, match="roles this model does not have"):
        build_optimizer(m, TrainConfig(roles={"attn.cmp": RolePolicy()}))


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, cfg) == pytest.approx(0.1) and lr_factor(500, cfg) == pytest.approx(0.1)


def test_resume_equivalence_after_simulated_kill(tiny_cfg, tmp_path):
    m, o, cfg = make(tiny_cfg)
    straight = run(m, o, cfg, range(8))
    m, o, cfg = make(tiny_cfg)
    first = run(m, o, cfg, range(5))
    save_checkpoint(tmp_path, 5, m, o, {"next_step": 5})
    del m, o  # the "kill"
    m2, o2, cfg = make(tiny_cfg)
    torch.manual_seed(123)  # RNG is restored from the checkpoint
    state = load_checkpoint(latest_checkpoint(tmp_path), m2, o2)
    rest = run(m2, o2, cfg, range(state["next_step"], 8))
    assert first + rest == straight  # exactly the same curve


def test_checkpoint_crash_during_save_keeps_previous(tiny_cfg, tmp_path, monkeypatch):
    m, o, cfg = make(tiny_cfg)
    run(m, o, cfg, range(2))
    save_checkpoint(tmp_path, 2, m, o, {"next_step": 2})
    good = {k: v.clone() for k, v in m.state_dict().items()}
    run(m, o, cfg, range(2, 4))

    import topocl.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ck, "write_json_atomic", boom)  # dies after the tensors, before state.json
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 4, m, o, {"next_step": 4})
    monkeypatch.undo()
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_00000002"
    m2, o2, _ = make(tiny_cfg)
    assert load_checkpoint(latest, m2, o2)["next_step"] == 2
    assert all(torch.equal(v, good[k]) for k, v in m2.state_dict().items())


def test_keep_only_newest_checkpoints(tiny_cfg, tmp_path):
    m, o, _ = make(tiny_cfg)
    for s in (1, 2, 3):
        save_checkpoint(tmp_path, s, m, o, {"next_step": s}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]


def test_non_finite_loss_stops_before_the_step(tiny_cfg):
    m, o, cfg = make(tiny_cfg)
    before = None

    def poison(model, out, mb):
        return out.loss * (math.nan if poison.step >= 2 else 0.0)

    poison.step = 0
    with pytest.raises(NonFiniteLoss, match="step 2"):
        for r in train_steps(m, o, batches, range(5), cfg=cfg, device=CPU, extra_loss=poison):
            poison.step = r.step + 1
            before = {k: v.clone() for k, v in m.state_dict().items()}
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # bad step never applied


def test_evaluate_loss_on_no_rows_reports_nothing(tiny_cfg):
    from topocl.train import evaluate_loss

    m, _, _ = make(tiny_cfg)
    assert evaluate_loss(m, torch.zeros(0, 17, dtype=torch.long), None, batch_size=4, max_batches=2, device=CPU) == {}


def test_checkpoint_of_tied_weights_stores_them_once_and_loads_tied(tmp_path):
    """HF models tie lm_head to the embeddings: safetensors refuses shared tensors, so the checkpoint keeps one
    copy and the alias, and loading restores both (still one tensor)."""
    from safetensors.torch import load_file

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(7, 3)
            self.head = torch.nn.Linear(3, 7, bias=False)
            self.head.weight = self.embed.weight

    torch.manual_seed(0)
    a, b = Tied(), Tied()
    ck = save_checkpoint(tmp_path, 1, a, None, {})
    assert set(load_file(ck / "model.safetensors")) == {"embed.weight"}
    load_checkpoint(ck, b)
    assert torch.equal(b.head.weight, a.embed.weight) and b.head.weight is b.embed.weight
