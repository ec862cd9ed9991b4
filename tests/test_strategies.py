"""Each CL mechanism checked, not just run: EWC closed form, reservoir uniformity, replay mixing,
LoRA moves only adapters, dream changes only slow roles."""

import pytest
import torch
from torch import nn

from topocl import model as model_mod
from topocl.config import ModelConfig, TrainConfig
from topocl.lora import LoRAConfig, apply_lora, lora_policy, merge_lora
from topocl.model import GPT
from topocl.optim import build_optimizer
from topocl.registry import ATTENTION
from topocl.strategies.base import StrategyContext
from topocl.strategies.dream import Dream, DreamConfig
from topocl.strategies.ewc import EWC, EWCConfig, estimate_fisher, normalise_per_role
from topocl.strategies.replay import Replay, ReplayConfig, Reservoir
from topocl.train import train_steps

CPU = torch.device("cpu")


def ctx(**kw) -> StrategyContext:
    return StrategyContext(device=CPU, seed=0, seq_len=16, batch_size=8, **kw)


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(3, dtype=torch.float64))

    def param_roles(self) -> dict[str, str]:
        return {"w": "a", "b": "b"}


def test_ewc_penalty_gradient_equals_closed_form():
    torch.manual_seed(0)
    m = Linear()
    s = EWC(EWCConfig(lam=7.0), ctx())
    s.fisher = {"w": torch.rand(3, 4, dtype=torch.float64), "b": torch.rand(3, dtype=torch.float64)}
    s.anchor = {"w": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    s.penalty(m).backward()
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad, 7.0 * s.fisher[n] * (p.detach() - s.anchor[n]), atol=1e-12, rtol=0)
    f = normalise_per_role({"w": torch.rand(3, 4) * 5, "b": torch.rand(3) * 0.1}, m.param_roles())
    assert f["w"].mean().item() == pytest.approx(1.0) and f["b"].mean().item() == pytest.approx(1.0)


def tiny(attention: str = "dense") -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=50, n_layer=1, d_model=16, n_head=2, n_kv_head=1, max_seq_len=16,
                           attention=attention))


def test_empirical_fisher_is_mean_of_per_sequence_squared_gradients():
    m = tiny()
    rows = torch.randint(0, 50, (3, 9))
    params = {n: p for n, p in m.named_parameters() if n == "lm_head.weight"}
    f = estimate_fisher(m, rows, params, "empirical", batch=8, seed=0)["lm_head.weight"]
    manual = torch.zeros_like(f)
    for r in rows:
        m.zero_grad()
        m(r[None, :-1], r[None, 1:]).lm_loss.backward()
        manual += m.lm_head.weight.grad ** 2 / 3
    assert torch.allclose(f, manual, atol=1e-10)
    fb = estimate_fisher(m, rows, params, "batched", batch=3, seed=0)["lm_head.weight"]
    m.zero_grad()
    m(rows[:, :-1], rows[:, 1:]).lm_loss.backward()
    assert torch.allclose(fb, m.lm_head.weight.grad ** 2, atol=1e-10)
    with pytest.raises(ValueError, match="empirical"):
        estimate_fisher(m, rows, params, "exact", batch=3, seed=0)


def test_online_ewc_accumulates_with_decay():
    m = tiny()
    s = EWC(EWCConfig(gamma=0.5, fisher_samples=2, normalise=False, roles=["head"]), ctx())
    rows = torch.randint(0, 50, (4, 9))
    s.after_task(m, rows, 0)
    f1 = s.fisher["lm_head.weight"].clone()
    assert set(s.fisher) == {"lm_head.weight"}
    s.after_task(m, rows, 0)  # same task index -> same sample -> same F
    assert torch.allclose(s.fisher["lm_head.weight"], 1.5 * f1)
    assert s.penalty(m).item() == 0.0  # at the anchor
    state = s.state_dict()
    s2 = EWC(s.cfg, ctx())
    s2.load_state_dict(state)
    assert all(torch.equal(s2.fisher[n], s.fisher[n]) for n in s.fisher)


def test_reservoir_is_uniform():
    n, cap, trials = 20, 5, 4000
    counts = torch.zeros(n)
    for t in range(trials):
        r = Reservoir(cap, seed=t)
        for i in range(n):
            r.add(torch.tensor([i]))
        counts[r.items.flatten()] += 1
    freq = counts / trials
    sigma = (0.25 * 0.75 / trials) ** 0.5
    assert (freq - cap / n).abs().max() < 5 * sigma  # a first-M or last-M buffer would be off by 0.75


def test_replay_mixes_the_exact_ratio_and_resumes_identically():
    s = Replay(ReplayConfig(buffer_size=8, ratio=0.25), ctx())
    old = torch.full((20, 17), 7)
    s.after_task(None, old, 0)
    batch = torch.zeros(16, 17, dtype=torch.long)
    s.before_task(None, batch, 1)
    mixed = s.mix(batch, step=3)
    assert mixed.shape == batch.shape and int((mixed[:, 0] == 7).sum()) == 4
    s2 = Replay(s.cfg, ctx())
    s2.load_state_dict(s.state_dict())
    s2.before_task(None, batch, 1)
    assert torch.equal(s2.mix(batch, 3), mixed)
    with pytest.raises(ValueError, match="base-corpus rows"):
        Replay(ReplayConfig(base_ratio=0.1), ctx())
    base = Replay(ReplayConfig(ratio=0.0, base_ratio=0.5), ctx(base_rows=torch.full((4, 17), 9)))
    assert int((base.mix(batch, 0)[:, 0] == 9).sum()) == 8


def test_lora_moves_only_adapters_and_merges_back():
    m = tiny()
    x = torch.randint(0, 50, (2, 12))
    before = m(x).logits.detach()
    m = apply_lora(m, LoRAConfig(r=2, roles=["attn.q", "attn.v"]))
    assert torch.allclose(m(x).logits, before)  # B = 0 at init
    assert {r for n, r in m.param_roles().items() if "lora_" in n} == {"lora"}
    base = {n: p.detach().clone() for n, p in m.named_parameters() if "lora_" not in n}
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-2, warmup_steps=0, roles=lora_policy(m))
    opt = build_optimizer(m, cfg)
    rows = torch.randint(0, 50, (2, 13))
    list(train_steps(m, opt, lambda s: rows, range(3), cfg=cfg, device=CPU))
    for n, p in m.named_parameters():
        if "lora_" in n:
            continue
        assert torch.equal(p, base[n]), n
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in m.named_parameters() if "lora_B" in n)
    adapted = m(x).logits.detach()
    assert not torch.allclose(adapted, before)
    plain = merge_lora(m)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    assert torch.allclose(plain(x).logits, adapted, atol=1e-5)
    with pytest.raises(ValueError, match="match no linear layer"):
        apply_lora(tiny(), LoRAConfig(roles=["attn.cmp"]))


class ToyTwoPath(nn.Module):
    """A two-pathway attention for tests: slow = dense heads, fast = a second dense path."""

    def __init__(self, cfg, layer=0):
        super().__init__()
        self.slow = ATTENTION.get("dense")(cfg, layer)
        self.fast = ATTENTION.get("dense")(cfg, layer)
        self.fast_on = True

    def set_fast_pathway(self, enabled: bool) -> None:
        self.fast_on = enabled

    def param_role(self, name: str) -> str:
        return "attn.dense_heads" if name.startswith("slow") else "attn.sparse_heads"

    def forward(self, x, cos, sin):
        y, _ = self.slow(x, cos, sin)
        if self.fast_on:
            y = y + self.fast(x, cos, sin)[0]
        return y, {}


def test_dream_changes_only_slow_roles_and_reduces_kl(monkeypatch):
    if "toy2" not in ATTENTION:
        ATTENTION.register("toy2")(ToyTwoPath)
    monkeypatch.setitem(model_mod.SLOW_ROLES, "toy2", ("attn.dense_heads",))
    monkeypatch.setitem(model_mod.FAST_ROLES, "toy2", ("attn.sparse_heads",))
    m = tiny("toy2")
    roles = m.param_roles()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    s = Dream(DreamConfig(every=1, n_traj=8, length=12, steps=15, lr=3e-3), ctx(bos_id=0))
    s.before_task(m, None, 0)
    s.after_task(m, None, 0)
    assert s.stats()["dream_kl_last"] < s.stats()["dream_kl_first"]
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]) == (roles[n] != "attn.dense_heads"), n
    with pytest.raises(ValueError, match="fast pathway"):
        Dream(DreamConfig(), ctx()).before_task(tiny(), None, 0)
