"""The attention contract, parametrized over kinds (float64, tiny shapes): exact causality, full budget
equals dense, gradcheck with the selection held fixed, one role per parameter, fast-pathway switch."""

import pytest
import torch

from topocl.attention import dsa as dsa_mod
from topocl.attention import nsa as nsa_mod
from topocl.attention.ops import causal_mask, sdpa_causal, topk_mask
from topocl.attention.split import SplitAttention, row_budget
from topocl.config import DSAConfig, ModelConfig, NSAConfig, SplitConfig
from topocl.model import GPT
from topocl.registry import ATTENTION

KINDS = ["dense", "split", "nsa", "dsa"]
SMALL = {"split": SplitConfig(topk=3), "nsa": NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, n_sel=3, window=4),
         "dsa": DSAConfig(topk=4, index_heads=2, index_dim=8, index_rope_dim=4, shared_heads=2)}


def cfg(kind: str, **kw) -> ModelConfig:
    if kind in SMALL and kind not in kw:
        kw[kind] = SMALL[kind]
    return ModelConfig(vocab_size=40, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=40, attention=kind,
                       **kw)


def rope(t: int):
    m = GPT(cfg("dense"))
    return m.rope_cos[:t].double(), m.rope_sin[:t].double()


@pytest.mark.parametrize("kind", KINDS)
def test_exact_causality_float64(kind):
    torch.manual_seed(0)
    m = GPT(cfg(kind)).double()
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
                "split": {"attn.dense_heads", "attn.sparse_heads"},
                "nsa": {"attn.cmp", "attn.slc", "attn.win", "attn.gate", "attn.q", "attn.o"},
                "dsa": {"attn.indexer", "attn.shared_heads", "attn.routed_heads", "attn.o"}}[kind]
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


# ----------------------------------------------------------------------------- NSA


def test_nsa_block_convention_by_hand():
    assert nsa_mod.n_cmp_blocks(8, 4, 2) == 3  # blocks [0-3], [2-5], [4-7]
    assert nsa_mod.cmp_visible(8, 4, 2).int().tolist() == [[0, 0, 0]] * 3 + [[1, 0, 0]] * 2 + [[1, 1, 0]] * 2 + [
        [1, 1, 1]]
    assert nsa_mod.overlap_matrix(8, 4, 2, 4).tolist() == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    p = torch.tensor([[0.1, 0.5, 0.2, 0.0]]).expand(8, 4)  # same scores for every query, T = 8, l' = 2
    sel = nsa_mod.select_blocks(p, sel_block=2, n_sel=3, n_init=1, n_local=1)
    assert sel[3].tolist() == [True, True, False, False]  # own block 1 + initial block 0; nothing else exists
    assert sel[4].tolist() == [True, True, True, False]  # forced 0 and own 2, then the best free one (1)
    assert sel[7].tolist() == [True, True, False, True]  # forced 0 and 3, best of {1: 0.5, 2: 0.2} is 1
    sel2 = nsa_mod.select_blocks(p, sel_block=2, n_sel=3, n_init=1, n_local=2)
    assert sel2[7].tolist() == [True, False, True, True]  # two local blocks (2, 3) forced


def nsa_module(**kw):
    torch.manual_seed(0)
    c = cfg("nsa", nsa=NSAConfig(**{"cmp_block": 4, "cmp_stride": 2, "sel_block": 4, "n_sel": 3, "window": 4, **kw}))
    m = nsa_mod.NSAttention(c).double()
    return m


def test_nsa_full_budget_branches_equal_causal_attention():
    t = 12
    x = torch.randn(2, t, 32, dtype=torch.float64)
    cos, sin = rope(t)
    m = nsa_module(n_sel=3, window=t)  # 3 blocks of 4 = all 12 tokens; window covers everything
    q = nsa_mod.apply_rope(m.q_proj(x).view(2, t, 4, 8).transpose(1, 2), cos, sin)

    def dense_with(kv):
        k, v = kv(x)
        y = sdpa_causal(q, nsa_mod.apply_rope(k, cos, sin), v)
        return m.o_proj(y.transpose(1, 2).reshape(2, t, 32))

    m.force_gates = (0.0, 1.0, 0.0)
    assert torch.allclose(m(x, cos, sin)[0], dense_with(m.slc), atol=1e-12)
    m.force_gates = (0.0, 0.0, 1.0)
    assert torch.allclose(m(x, cos, sin)[0], dense_with(m.win), atol=1e-12)
    w1 = nsa_module(window=1)
    w1.force_gates = (0.0, 0.0, 1.0)
    v = w1.win(x)[1]  # [B, Hk, T, D]: with w = 1 each query attends to itself only
    expect = w1.o_proj(v.repeat_interleave(2, dim=1).transpose(1, 2).reshape(2, t, 32))
    assert torch.allclose(w1(x, cos, sin)[0], expect, atol=1e-12)


def test_nsa_compressed_branch_with_unit_blocks_is_causal_attention():
    t = 10
    m = nsa_module(cmp_block=1, cmp_stride=1, sel_block=1, n_sel=3, window=2, phi="mean")
    m.force_gates = (1.0, 0.0, 0.0)
    with torch.no_grad():
        m.cmp_phi_k.pe.zero_()
        m.cmp_phi_v.pe.zero_()
    x = torch.randn(1, t, 32, dtype=torch.float64)
    cos, sin = rope(t)
    q = m.q_proj(x).view(1, t, 4, 8).transpose(1, 2)  # un-rotated
    k, v = m.cmp(x)
    expect = m.o_proj(sdpa_causal(q, k, v).transpose(1, 2).reshape(1, t, 32))
    assert torch.allclose(m(x, cos, sin)[0], expect, atol=1e-12)


def test_nsa_window_gates_give_zero_grads_to_cmp_and_slc():
    m = nsa_module()
    m.force_gates = (0.0, 0.0, 1.0)
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    m(x, *rope(16))[0].pow(2).sum().backward()
    for name, p in m.named_parameters():
        if name.startswith(("cmp", "slc")):
            assert p.grad is None or p.grad.abs().max().item() == 0.0, name
    assert m.win.k_proj.weight.grad.abs().max() > 0


def test_nsa_and_dsa_gradcheck_with_selection_held_fixed(monkeypatch):
    t = 9
    cos, sin = rope(t)
    m = nsa_module(n_sel=2, n_local=1)
    x = torch.randn(1, t, 32, dtype=torch.float64, requires_grad=True)
    fixed = nsa_mod.select_blocks(torch.rand(1, 2, t, 3, dtype=torch.float64), 4, 2, 1, 1)
    monkeypatch.setattr(nsa_mod, "select_blocks", lambda *a, **k: fixed)
    assert torch.autograd.gradcheck(lambda inp: m(inp, cos, sin)[0], (x,), eps=1e-6, atol=1e-6)
    torch.manual_seed(0)
    d = dsa_mod.DSAttention(cfg("dsa")).double()
    keep = topk_mask(torch.rand(1, t, t, dtype=torch.float64), 3, causal_mask(t))
    monkeypatch.setattr(d, "select", lambda index, visible: keep)
    assert torch.autograd.gradcheck(lambda inp: d(inp, cos, sin)[0], (x,), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- DSA


def test_dsa_index_scores_match_the_explicit_loop():
    torch.manual_seed(0)
    c = cfg("dsa", dsa=DSAConfig(topk=4, index_heads=3, index_dim=8, index_rope_dim=0))
    ind = dsa_mod.Indexer(c).double()
    x = torch.randn(1, 5, 32, dtype=torch.float64)
    got = ind(x)
    q = ind.q(x).view(1, 5, 3, 8)
    k = ind.k_norm(ind.k(x))
    w = ind.w(x)
    for t in range(5):
        for s in range(5):
            ref = sum(w[0, t, h] * 3 ** -0.5 * 8 ** -0.5 * torch.relu(q[0, t, h] @ k[0, s]) for h in range(3))
            assert abs(got[0, t, s].item() - ref.item()) < 1e-12


def test_dsa_full_budget_equals_dense_with_same_weights():
    torch.manual_seed(0)
    c = cfg("dsa", dsa=DSAConfig(topk=64, index_heads=2, index_dim=8, index_rope_dim=4, shared_heads=2))
    d = dsa_mod.DSAttention(c).double()
    ref = ATTENTION.get("dense")(c).double()
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(ref, name).weight.copy_(torch.cat([getattr(d.shared, name).weight, getattr(d.routed, name).weight]))
        ref.o_proj.weight.copy_(d.o_proj.weight)
    x = torch.randn(2, 15, 32, dtype=torch.float64)
    cos, sin = rope(15)
    y, aux = d(x, cos, sin)
    assert torch.allclose(y, ref(x, cos, sin)[0], atol=1e-12)
    assert aux["stat.dsa_key_frac"].item() == 1.0 and aux["stat.dsa_recall"].item() == 1.0


def test_dsa_gradient_isolation():
    torch.manual_seed(0)
    m = GPT(cfg("dsa")).double()
    x = torch.randint(0, 40, (2, 24))
    out = m(x, x)
    out.lm_loss.backward(retain_graph=True)
    roles = m.param_roles()
    for n, p in m.named_parameters():
        if roles[n] == "attn.indexer":
            assert p.grad is None, n
    m.zero_grad(set_to_none=True)
    out.aux["loss.dsa_kl"].backward()
    got = {roles[n] for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    assert got == {"attn.indexer"}
    assert all(p.grad is None for n, p in m.named_parameters() if roles[n] != "attn.indexer")


def test_dsa_kl_and_its_gradient_match_the_closed_form():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    index = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    vis = causal_mask(5)[None].expand(2, -1, -1)
    kl = dsa_mod.indexer_kl(scores, index, vis)
    p = torch.softmax(scores.masked_fill(~vis[:, None], float("-inf")), -1).sum(1)
    p = p / p.sum(-1, keepdim=True)
    logq = torch.log_softmax(index.detach().masked_fill(~vis, float("-inf")), -1)
    manual = torch.where(vis, p * (p.clamp_min(1e-300).log() - logq), torch.zeros_like(p)).sum(-1).mean()
    assert abs(kl.item() - manual.item()) < 1e-12
    kl.backward()
    grad = (torch.softmax(index.detach().masked_fill(~vis, float("-inf")), -1) - p) / 10  # rows = 2 * 5
    assert torch.allclose(index.grad, grad.masked_fill(~vis, 0.0), atol=1e-12)


def test_dsa_sparse_phase_is_sparse_and_warmup_is_dense():
    x = torch.randn(1, 30, 32)
    cos, sin = GPT(cfg("dense")).rope_cos[:30], GPT(cfg("dense")).rope_sin[:30]
    sparse = dsa_mod.DSAttention(cfg("dsa"))
    assert sparse(x, cos, sin)[1]["stat.dsa_key_frac"].item() < 0.4
    warm_cfg = DSAConfig(topk=4, index_heads=2, index_dim=8, index_rope_dim=4, phase="warmup")
    warm = dsa_mod.DSAttention(cfg("dsa", dsa=warm_cfg))
    assert warm(x, cos, sin)[1]["stat.dsa_key_frac"].item() == 1.0


@pytest.mark.parametrize("kind", ["split", "nsa", "dsa"])
def test_fast_pathway_switch_changes_the_output(kind):
    torch.manual_seed(0)
    m = GPT(cfg(kind)).eval()
    x = torch.randint(0, 40, (1, 20))
    on = m(x).logits
    with m.fast_pathway(False):
        off = m(x).logits
    assert not torch.allclose(on, off) and torch.equal(m(x).logits, on)
    slow, fast = m.pathway_roles()
    assert slow and fast and not slow & fast
