"""MoE FFN: roles, routing, balance loss, fast-pathway switch, causality through the model."""

import pytest
import torch

from topocl.config import ModelConfig, MoEConfig
from topocl.model import GPT
from topocl.moe import MoE, balance_loss


def cfg(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=40, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=40, ffn="moe",
                       moe=MoEConfig(**kw))


def test_balance_loss_is_minimal_for_uniform_routing():
    e = 4
    uniform = balance_loss(torch.full((8, e), 1 / e), torch.eye(e, dtype=torch.bool).repeat(2, 1))
    assert uniform.item() == pytest.approx(1.0)
    skewed_p = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1)
    skewed_c = torch.zeros(8, e, dtype=torch.bool)
    skewed_c[:, 0] = True
    assert balance_loss(skewed_p, skewed_c).item() == pytest.approx(4 * 0.7)


def test_roles_routing_and_fast_pathway():
    torch.manual_seed(0)
    m = GPT(cfg(n_shared=1, n_routed=4, topk=2))
    roles = set(m.param_roles().values())
    assert {"ffn.shared_expert", "ffn.routed_expert", "ffn.router"} <= roles and "mlp" not in roles
    x = torch.randint(0, 40, (2, 16))
    out = m(x, x)
    assert "loss.moe_balance" in out.aux and out.loss > out.lm_loss
    moe = m.blocks[0].ffn
    h = torch.randn(2, 5, 32)
    moe.set_fast_pathway(False)
    only_shared = moe(h)[0]
    assert torch.allclose(only_shared, moe.shared[0](h))
    moe.set_fast_pathway(True)
    assert not torch.allclose(moe(h)[0], only_shared)


def test_topk_equal_to_all_experts_is_the_probability_weighted_mixture():
    torch.manual_seed(0)
    moe = MoE(cfg(n_shared=0, n_routed=3, topk=3)).double()
    h = torch.randn(1, 4, 32, dtype=torch.float64)
    p = torch.softmax(moe.router(h), -1)
    expect = sum(p[..., e:e + 1] * moe.experts[e](h) for e in range(3))
    assert torch.allclose(moe(h)[0], expect, atol=1e-12)


def test_moe_model_is_causal():
    torch.manual_seed(0)
    m = GPT(cfg()).double()
    x = torch.randint(0, 40, (1, 20))
    x2 = x.clone()
    x2[:, 12:] = (x2[:, 12:] + 1) % 40
    assert (m(x).logits[:, :12] - m(x2).logits[:, :12]).abs().max().item() <= 1e-12
    with pytest.raises(ValueError, match="topk"):
        MoE(cfg(topk=5))


def test_balance_loss_for_consistent_routing_is_at_least_one_and_one_only_when_uniform():
    """When every token has the same router probabilities p and routes to its top-k, the loss is
    E · mean of the top-k p ≥ E · mean(p) = 1, with equality only for uniform p."""
    torch.manual_seed(0)
    e, k = 6, 2
    for _ in range(20):
        p = torch.softmax(torch.randn(e) * 2, -1).expand(5, e)
        chosen = torch.zeros(5, e, dtype=torch.bool).scatter_(-1, p.topk(k, -1).indices, True)
        assert balance_loss(p, chosen).item() >= 1.0 + 1e-3
        assert balance_loss(p, chosen).item() == pytest.approx(e * p[0].topk(k).values.mean().item())
    p = torch.full((5, e), 1 / e)
    assert balance_loss(p, torch.zeros(5, e, dtype=torch.bool).scatter_(-1, p.topk(k, -1).indices, True)).item() == (
        pytest.approx(1.0))


def test_balance_loss_alone_evens_out_a_collapsed_router():
    torch.manual_seed(0)
    moe = MoE(cfg(n_shared=1, n_routed=4, topk=1, balance_coeff=1.0))
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.01)
        moe.router.weight[0] += 0.5  # expert 0 wins for most tokens
    h = torch.randn(512, 32) + 0.3  # positive mean: router row 0 scores highest for almost every token
    before = moe(h[None])[1]["stat.moe_max_load"].item()
    opt = torch.optim.Adam(moe.router.parameters(), lr=0.02)
    for _ in range(100):
        opt.zero_grad()
        moe(h[None])[1]["loss.moe_balance"].backward()
        opt.step()
    aux = moe(h[None])[1]
    assert before > 0.9 and aux["stat.moe_max_load"].item() < 0.35  # uniform top-1 of 4 = 0.25
    assert aux["stat.moe_balance"].item() < 1.05


@pytest.mark.parametrize("n_routed,topk,tokens", [(4, 2, 16), (6, 3, 7), (5, 1, 3)])  # (5, 1, 3): idle experts
def test_dispatch_equals_the_dense_compute_reference_forward_and_backward(n_routed, topk, tokens):
    """Each expert on its own tokens (index_select / index_add) = every expert on every token, weighted."""
    outs = []
    for impl in ("dense", "dispatch"):
        torch.manual_seed(0)
        moe = MoE(cfg(n_shared=1, n_routed=n_routed, topk=topk, impl=impl)).double()
        h = torch.randn(2, tokens, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1),
                        requires_grad=True)
        y, aux = moe(h)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().add(aux["loss.moe_balance"]).backward()
        # an expert no token chose gets no gradient (None in dispatch, None or exact zeros in dense)
        outs.append((y, h.grad, {n: p.grad if p.grad is not None else torch.zeros_like(p)
                                 for n, p in moe.named_parameters()}))
    (y0, g0, p0), (y1, g1, p1) = outs
    assert (y0 - y1).abs().max().item() < 1e-12 and (g0 - g1).abs().max().item() < 1e-12
    assert all((p0[n] - p1[n]).abs().max().item() < 1e-12 for n in p0)
    with pytest.raises(ValueError, match="impl"):
        MoE(cfg(impl="fast"))
