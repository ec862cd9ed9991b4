"""Each CL mechanism checked, not just run: EWC penalty gradient = closed form, Fisher estimators against
their closed forms, online decay, reservoir uniformity (chi-square, and a biased reservoir fails it),
exact replay mixing, dream changes only slow roles and lowers the KL, state round trips."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from topocl import model as model_mod
from topocl.config import ConfigError, DSAConfig, ModelConfig, MoEConfig, NSAConfig
from topocl.lora import LoRAConfig, apply_lora
from topocl.model import GPT
from topocl.registry import ATTENTION, STRATEGIES
from topocl.strategies.base import StrategyContext
from topocl.strategies.dream import Dream, DreamConfig
from topocl.strategies.ewc import EWC, EWCConfig, estimate_fisher, normalise_per_role
from topocl.strategies.replay import Replay, ReplayConfig, Reservoir

CPU = torch.device("cpu")
V = 6  # vocabulary of the toy linear models


def ctx(**kw) -> StrategyContext:
    kw.setdefault("stream_rows", 100)
    return StrategyContext(device=CPU, seed=kw.pop("seed", 0), seq_len=16, batch_size=8, **kw)


# ----------------------------------------------------------------------------- EWC


class LinearLM(nn.Module):
    """logits = W one_hot(x) + b: linear in its parameters, with the GPT role interface."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(V, V, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(V, dtype=torch.float64))

    def param_roles(self) -> dict[str, str]:
        return {"w": "attn.q", "b": "head"}

    def forward(self, idx):
        return SimpleNamespace(logits=F.one_hot(idx, V).double() @ self.w.T + self.b)  # [B, T, V]


def test_ewc_penalty_gradient_equals_closed_form_on_a_linear_model():
    torch.manual_seed(0)
    m = LinearLM()
    s = EWC(EWCConfig(lam=7.0, fisher_samples=16), ctx())
    s.after_task(m, torch.randint(0, V, (40, 9)), 0)
    for role_params in (["w"], ["b"]):  # per-role normalisation: each role's mean F is 1
        assert torch.cat([s.fisher[n].flatten() for n in role_params]).mean().item() == pytest.approx(1.0)
    assert s.penalty(m).item() == 0.0  # at the anchor θ*
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    pen = s.penalty(m)
    pen.backward()
    for n, p in m.named_parameters():  # ∇ (λ/2) Σ F (θ − θ*)² = λ F (θ − θ*)
        assert torch.allclose(p.grad, 7.0 * s.fisher[n] * (p.detach() - s.anchor[n]), atol=1e-12, rtol=0)
    closed = sum(0.5 * 7.0 * (s.fisher[n] * (p.detach() - s.anchor[n]) ** 2).sum() for n, p in m.named_parameters())
    assert pen.item() == pytest.approx(closed.item(), rel=1e-12)
    s.loss(m, SimpleNamespace(lm_loss=torch.tensor(2.0)), None)
    assert s.stats() == pytest.approx({"ewc_penalty": pen.item(), "ewc_ratio": pen.item() / 2.0})


def test_ewc_skips_frozen_roles_and_selects_roles_by_prefix():
    torch.manual_seed(0)
    m = LinearLM()
    m.b.requires_grad_(False)  # a frozen role (lr_scale 0)
    s = EWC(EWCConfig(fisher_samples=4), ctx())
    s.after_task(m, torch.randint(0, V, (8, 5)), 0)
    assert set(s.fisher) == {"w"}
    s.penalty(m).backward()
    assert m.b.grad is None
    m.b.requires_grad_(True)
    assert set(EWC(EWCConfig(roles=["attn"]), ctx()).params(m)) == {"w"}
    with pytest.raises(ConfigError, match="roles this model does not have"):
        EWC(EWCConfig(roles=["attn.cmp"]), ctx()).params(m)
    m.w.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameter"):
        EWC(EWCConfig(roles=["attn.q"]), ctx()).params(m)
    with pytest.raises(ConfigError, match="ewc.fisher"):
        EWC(EWCConfig(fisher="exact"), ctx())


def test_fisher_estimators_match_their_closed_forms():
    """Bias-only LM, one target per row: the gradient of the NLL is p − e_y, so
    empirical = mean (p − e_y)², batched = (p − mean e_y)², sampled → E_{y~p} (p − e_y)² = p (1 − p)."""
    torch.manual_seed(0)
    m = LinearLM()
    with torch.no_grad():
        m.w.zero_()
    p = torch.softmax(m.b.detach(), -1)
    rows = torch.randint(0, V, (12, 2))
    onehot = F.one_hot(rows[:, 1], V).double()
    params = {"b": m.b}
    emp = estimate_fisher(m, rows, params, "empirical", batch=1, seed=0)["b"]
    assert torch.allclose(emp, ((p - onehot) ** 2).mean(0), atol=1e-12)
    bat = estimate_fisher(m, rows, params, "batched", batch=4, seed=0)["b"]
    per_batch = [(p - onehot[i:i + 4].mean(0)) ** 2 for i in range(0, 12, 4)]
    assert torch.allclose(bat, torch.stack(per_batch).mean(0), atol=1e-12)
    n = 1500
    samp = estimate_fisher(m, torch.zeros(n, 2, dtype=torch.long), params, "sampled", batch=1, seed=1)["b"]
    var = p * (1 - p) ** 4 + (1 - p) * p ** 4 - (p * (1 - p)) ** 2  # Var of (p_k − 1[y=k])²
    assert ((samp - p * (1 - p)).abs() < 5 * (var / n).sqrt()).all()
    assert ((samp - emp).abs() > 10 * (var / n).sqrt()).any()  # it is not the empirical Fisher
    again = [estimate_fisher(m, torch.zeros(20, 2, dtype=torch.long), params, "sampled", batch=1, seed=1)["b"]
             for _ in range(2)]
    assert torch.equal(*again)  # seeded


def tiny(attention: str = "dense", **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=50, n_layer=1, d_model=16, n_head=4, n_kv_head=2, max_seq_len=16,
                           attention=attention, **kw))


def test_empirical_fisher_is_mean_of_per_sequence_squared_gradients_on_gpt():
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


def test_online_ewc_decays_and_accumulates():
    m = tiny()
    s = EWC(EWCConfig(gamma=0.5, fisher_samples=2, normalise=False, roles=["head"]), ctx())
    rows = [torch.randint(0, 50, (4, 9)) for _ in range(2)]
    s.after_task(m, rows[0], 0)
    f1 = s.fisher["lm_head.weight"].clone()
    assert set(s.fisher) == {"lm_head.weight"}
    with torch.no_grad():
        m.lm_head.weight.add_(0.1)  # "training" on task 1 moves θ; the anchor follows at its end
    fresh = EWC(s.cfg, ctx())
    fresh.after_task(m, rows[1], 1)
    f2 = fresh.fisher["lm_head.weight"]
    s.after_task(m, rows[1], 1)
    assert torch.allclose(s.fisher["lm_head.weight"], 0.5 * f1 + f2, atol=0, rtol=1e-6)  # F̃ = γ F̃ + F
    assert torch.equal(s.anchor["lm_head.weight"], m.lm_head.weight)  # single anchor = last task's end
    f = normalise_per_role({"a": torch.rand(3, 4) * 5, "b": torch.rand(3) * 0.1, "z": torch.zeros(2)},
                           {"a": "x", "b": "y", "z": "w"})
    assert f["a"].mean().item() == pytest.approx(1.0) and f["b"].mean().item() == pytest.approx(1.0)
    assert torch.equal(f["z"], torch.zeros(2))


# ----------------------------------------------------------------------------- replay


class OffByOne(Reservoir):
    """A classic bug: r ~ U{0..n-1} instead of U{0..n}, so the n-th row enters with probability M/n, not
    M/(n+1): late rows are over-represented."""

    def add(self, row):
        if self.items is None:
            self.items = torch.zeros(self.capacity, *row.shape, dtype=row.dtype)
        if self.seen < self.capacity:
            self.items[self.seen] = row
        else:
            r = int(torch.randint(0, self.seen, (1,), generator=self.gen))
            if r < self.capacity:
                self.items[r] = row
        self.seen += 1


def inclusion_pvalue(cls: type, n: int = 20, cap: int = 5, trials: int = 3000) -> float:
    """Chi-square test that every item of a stream of n is kept with probability cap / n. Each trial keeps
    exactly cap items, so Cov(counts) = trials p(1-p) n/(n-1) (I - 11ᵀ/n) and the statistic below is χ²(n-1)."""
    counts = torch.zeros(n, dtype=torch.float64)
    for t in range(trials):
        r = cls(cap, seed=t)
        for i in range(n):
            r.add(torch.tensor([i]))
        counts[r.items.flatten()] += 1
    p = cap / n
    stat = ((counts - trials * p) ** 2).sum() * (n - 1) / (n * trials * p * (1 - p))
    return float(torch.special.gammaincc(torch.tensor((n - 1) / 2.0, dtype=torch.float64), stat / 2))


def test_reservoir_is_uniform_and_the_test_catches_a_biased_one():
    assert inclusion_pvalue(Reservoir) > 1e-3
    assert inclusion_pvalue(OffByOne) < 1e-6


def test_replay_buffer_holds_past_tasks_only():
    s = Replay(ReplayConfig(buffer_size=8, ratio=0.5), ctx())
    batch = torch.zeros(4, 5, dtype=torch.long)
    assert torch.equal(s.mix(batch, 0), batch)  # nothing to replay during the first task
    for j, n in enumerate([6, 30]):
        s.after_task(None, torch.full((n, 5), j + 1), j)
    assert len(s.buffer) == 8 and s.buffer.seen == 36
    assert set(s.buffer.items[:, 0].tolist()) <= {1, 2}


def test_replay_mixes_the_exact_ratio_deterministically_and_resumes_identically():
    s = Replay(ReplayConfig(buffer_size=8, ratio=0.25), ctx())
    s.after_task(None, torch.arange(20)[:, None].expand(20, 17) + 100, 0)
    batch = torch.zeros(16, 17, dtype=torch.long)
    s.before_task(None, batch, 1)
    mixed = s.mix(batch, step=3)
    assert mixed.shape == batch.shape and int((mixed[:, 0] >= 100).sum()) == 4
    assert torch.equal(s.mix(batch, 3), mixed) and not torch.equal(s.mix(batch, 4), mixed)
    state = s.state_dict()
    s2 = Replay(s.cfg, ctx())
    s2.load_state_dict(state)
    s2.before_task(None, batch, 1)
    assert torch.equal(s2.mix(batch, 3), mixed)
    with pytest.raises(ConfigError, match="base-corpus training rows"):
        Replay(ReplayConfig(base_ratio=0.1), ctx())
    with pytest.raises(ConfigError, match="replay.ratio"):
        Replay(ReplayConfig(ratio=0.8, base_ratio=0.4), ctx(base_rows=batch))
    base = Replay(ReplayConfig(ratio=0.0, base_ratio=0.5), ctx(base_rows=torch.full((4, 17), 9)))
    assert int((base.mix(batch, 0)[:, 0] == 9).sum()) == 8  # base mixing from the first task on
    both = Replay(ReplayConfig(ratio=0.5, base_ratio=0.5), ctx(base_rows=torch.full((4, 17), 9)))
    both.after_task(None, torch.full((4, 17), 7), 0)
    out = both.mix(torch.zeros(3, 17, dtype=torch.long), 0)  # round(1.5) + round(1.5) > 3 rows
    assert len(out) == 3 and int((out[:, 0] == 7).sum()) == 2 and int((out[:, 0] == 9).sum()) == 1


# ----------------------------------------------------------------------------- dream


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


@pytest.fixture
def toy2(monkeypatch):
    if "toy2" not in ATTENTION:
        ATTENTION.register("toy2")(ToyTwoPath)
    monkeypatch.setitem(model_mod.SLOW_ROLES, "toy2", ("attn.dense_heads",))
    monkeypatch.setitem(model_mod.FAST_ROLES, "toy2", ("attn.sparse_heads",))
    return tiny("toy2")


def snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*m.named_parameters(), *m.named_buffers()]}


def test_dream_changes_only_slow_roles_and_reduces_the_kl(toy2):
    m = toy2
    m.lm_head.weight.requires_grad_(False)  # a frozen role stays frozen afterwards
    roles = m.param_roles()
    before = snapshot(m)
    s = Dream(DreamConfig(every=2, n_traj=8, length=12, steps=15, lr=3e-3), ctx(bos_id=0))
    s.before_task(m, None, 0)
    s.after_task(m, None, 0)  # task 0: not a K-th task
    assert all(torch.equal(t, before[n]) for n, t in snapshot(m).items()) and s.stats() == {}
    s.after_task(m, None, 1)
    st = s.stats()
    assert st["dream_kl_after"] < 0.5 * st["dream_kl_before"] and st["dream_task"] == 1.0
    for n, t in snapshot(m).items():
        assert torch.equal(t, before[n]) == (roles.get(n) != "attn.dense_heads"), n
    assert not m.lm_head.weight.requires_grad and m.blocks[0].attn.fast.q_proj.weight.requires_grad
    assert m.training and m.blocks[0].attn.fast_on


NSA_TINY = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, n_sel=2, n_init=1, n_local=1, window=4)


@pytest.mark.parametrize("kind", [dict(attention="split"), dict(attention="nsa", nsa=NSA_TINY),
                                  dict(attention="dsa", dsa=DSAConfig(topk=4, shared_heads=2)),
                                  dict(ffn="moe", moe=MoEConfig(n_routed=2, topk=1))])
def test_dream_on_every_sparse_kind_moves_only_its_slow_roles(kind):
    m = tiny(**kind)
    roles, (slow, fast) = m.param_roles(), m.pathway_roles()
    with torch.no_grad():  # a fast pathway that matters, so that the student (fast off) differs from the teacher
        for n, p in m.named_parameters():
            p.mul_(8.0 if roles[n] in fast and p.dim() > 1 else 1.0)  # matrices: NSA's slc gate bias -2 stays
    before = snapshot(m)
    s = Dream(DreamConfig(every=1, n_traj=4, length=10, steps=6, batch_size=4, lr=3e-3), ctx(bos_id=1))
    s.before_task(m, None, 0)
    s.after_task(m, None, 0)
    moved = {n for n, t in snapshot(m).items() if not torch.equal(t, before[n])}
    assert moved and {roles[n] for n in moved} == slow, kind
    assert s.stats()["dream_kl_after"] < s.stats()["dream_kl_before"], s.stats()


def test_dream_refuses_models_it_cannot_consolidate(toy2):
    with pytest.raises(ValueError, match="slow roles"):
        Dream(DreamConfig(), ctx()).before_task(tiny(), None, 0)
    with pytest.raises(ValueError, match="slow roles"):
        Dream(DreamConfig(), ctx()).before_task(tiny("dsa", dsa=DSAConfig(topk=4)), None, 0)  # no shared heads
    with pytest.raises(ValueError, match="lora"):
        Dream(DreamConfig(length=8), ctx()).before_task(apply_lora(tiny("split"), LoRAConfig(roles=["mlp"])), None, 0)
    with pytest.raises(ConfigError, match="dream.length"):
        Dream(DreamConfig(length=16), ctx()).before_task(toy2, None, 0)
    with pytest.raises(ConfigError, match="dream.steps"):
        Dream(DreamConfig(steps=0), ctx())


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("name", ["vanilla", "ewc", "replay", "dream"])
def test_state_round_trip_gives_identical_continuation(name, toy2):
    cfgs = {"ewc": EWCConfig(fisher_samples=3), "replay": ReplayConfig(buffer_size=4, ratio=0.5),
            "dream": DreamConfig(every=1, n_traj=4, length=8, steps=3, batch_size=2), "vanilla": None}
    rows = [torch.randint(0, 50, (6, 9), generator=torch.Generator().manual_seed(j)) for j in range(2)]
    a = STRATEGIES.get(name)(cfgs[name], ctx(seed=3))
    a.before_task(toy2, rows[0], 0)
    a.after_task(toy2, rows[0], 0)
    state = a.state_dict()
    meta = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    assert json.loads(json.dumps(meta)) == meta  # what is not a tensor is JSON
    b = STRATEGIES.get(name)(cfgs[name], ctx(seed=3))
    b.load_state_dict({k: (v.clone() if torch.is_tensor(v) else json.loads(json.dumps(v))) for k, v in state.items()})
    ma, mb = toy2, copy.deepcopy(toy2)
    outs = []
    for s, m in ((a, ma), (b, mb)):
        s.before_task(m, rows[1], 1)
        batch = s.mix(rows[1][:4], 5)
        out = m(batch[:, :-1], batch[:, 1:])
        extra = s.loss(m, out, batch)
        s.after_task(m, rows[1], 1)
        outs.append((batch, None if extra is None else extra.detach(), snapshot(m), s.state_dict(), s.stats()))
    (ba, ea, pa, sa, ta), (bb, eb, pb, sb, tb) = outs
    assert torch.equal(ba, bb) and (ea is None) == (eb is None) and (ea is None or torch.equal(ea, eb))
    assert all(torch.equal(pa[n], pb[n]) for n in pa) and ta == tb
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k] for k in sa)
