"""The attention contract, parametrized over kinds (float64, tiny shapes): exact causality, full budget
equals dense, gradcheck with the selection held fixed, one role per parameter, fast-pathway switch."""

import pytest
import torch

from topocl.attention.ops import causal_mask, topk_mask
from topocl.attention.split import SplitAttention, row_budget
from topocl.config import ModelConfig, SplitConfig
from topocl.model import GPT
from topocl.registry import ATTENTION

KINDS = ["dense", "split"]


def cfg(kind: str, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=40, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=40, attention=kind,
                       **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_exact_causality_float64(kind):
    torch.manual_seed(0)
    m = GPT(cfg(kind, split=SplitConfig(topk=3))).double()
    x = torch.randint(0, 40, (2, 30))
    for t in (1, 9, 23):
        x2 = x.clone()
        x2[:, t:] = torch.randint(0, 40, (2, 30 - t))
        a, b = m(x).logits, m(x2).logits
        assert (a[:, :t] - b[:, :t]).abs().max().item() <= 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_every_parameter_has_one_role(kind):
    roles = GPT(cfg(kind)).param_roles()
    attn = {r for r in roles.values() if r.startswith("attn.")}
    expected = {"dense": {"attn.q", "attn.k", "attn.v", "attn.o"},
                "split": {"attn.dense_heads", "attn.sparse_heads"}}[kind]
    assert attn == expected


def dense_from_split(s: SplitAttention, c: ModelConfig):
    """A dense attention whose heads are group A's then group B's, with the same weights."""
    d = ATTENTION.get("dense")(c)
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(d, name).weight.copy_(torch.cat([getattr(s.dense, name).weight, getattr(s.sparse, name).weight]))
        d.o_proj.weight.copy_(torch.cat([s.dense.o_proj.weight, s.sparse.o_proj.weight], dim=1))
    return d


def test_split_full_budget_equals_dense_with_same_weights():
    torch.manual_seed(0)
    c = cfg("split", split=SplitConfig(topk=64))
    s = SplitAttention(c).double()
    d = dense_from_split(s, c).double()
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    cos, sin = GPT(cfg("dense")).rope_cos[:17].double(), GPT(cfg("dense")).rope_sin[:17].double()
    ys, aux = s(x, cos, sin)
    yd, _ = d(x, cos, sin)
    assert torch.allclose(ys, yd, atol=1e-12) and aux["stat.split_key_frac"].item() == 1.0


def test_split_is_really_sparse_and_fast_pathway_switch():
    torch.manual_seed(0)
    s = SplitAttention(cfg("split", split=SplitConfig(topk=2))).double()
    x = torch.randn(1, 20, 32, dtype=torch.float64)
    cos, sin = GPT(cfg("dense")).rope_cos[:20].double(), GPT(cfg("dense")).rope_sin[:20].double()
    y_on, aux = s(x, cos, sin)
    assert aux["stat.split_key_frac"].item() < 0.25
    s.set_fast_pathway(False)
    y_off, _ = s(x, cos, sin)
    qa, ka, va = s.dense.qkv(x, cos, sin)
    from topocl.attention.ops import sdpa_causal

    assert torch.allclose(y_off, s.dense.out(sdpa_causal(qa, ka, va)), atol=1e-12)  # only group A remains
    assert not torch.allclose(y_on, y_off)


def test_split_gradcheck_with_selection_fixed():
    torch.manual_seed(0)
    s = SplitAttention(cfg("split", split=SplitConfig(topk=3))).double()
    cos, sin = GPT(cfg("dense")).rope_cos[:6].double(), GPT(cfg("dense")).rope_sin[:6].double()
    x = torch.randn(1, 6, 32, dtype=torch.float64, requires_grad=True)
    # with distinct scores the top-k set is locally constant, so the function is smooth around x
    assert torch.autograd.gradcheck(lambda inp: s(inp, cos, sin)[0], (x,), eps=1e-6, atol=1e-6)


def test_topk_mask_semantics():
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.5, 0.1, 9.0, 9.0], [1.0, 2.0, 3.0, 4.0]])
    vis = causal_mask(3, 4)  # rows see 2, 3 and 4 keys
    keep = topk_mask(scores, 2, vis)
    assert keep.tolist() == [[True, True, False, False], [True, False, True, False], [False, False, True, True]]
    per_row = topk_mask(scores, torch.tensor([[1], [3], [1]]), vis)
    assert per_row.sum(-1).tolist() == [1, 3, 1] and not (per_row & ~vis).any()  # never the future
    assert row_budget(5, 0, 0.5).flatten().tolist() == [1, 1, 2, 2, 2]
    assert row_budget(5, 3, 0.5).flatten().tolist() == [1, 2, 3, 3, 3]


def test_split_group_errors():
    with pytest.raises(ValueError, match="sparse_kv_groups"):
        SplitAttention(cfg("split", split=SplitConfig(sparse_kv_groups=2)))


def test_matched_dense_control_within_two_percent():
    from topocl.params import count, match_dense

    c = cfg("split")
    d = match_dense(c)
    assert d.attention == "dense" and abs(count(d) / count(c) - 1) <= 0.02
    wide = ModelConfig(vocab_size=40, n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=200)
    assert abs(count(match_dense(wide)) / count(wide) - 1) <= 0.02
