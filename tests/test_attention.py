"""The attention contract, parametrized over kinds (float64, tiny shapes): exact causality, full budget equals
dense with the same weights, gradcheck with the selection held fixed, one role per parameter, fast-pathway
switch; then the per-kind promises (NSA block convention, gate isolation; DSA indexer, KL and gradient
isolation; the shared top-k op), the tiny presets' sparsity and the parameter-matched dense control."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from topocl.attention import dsa as dsa_mod
from topocl.attention import nsa as nsa_mod
from topocl.attention import split as split_mod
from topocl.attention.ops import apply_rope, causal_mask, sdpa_causal, topk_mask
from topocl.attention.split import SplitAttention, row_budget
from topocl.config import DSAConfig, ModelConfig, NSAConfig, PretrainConfig, SplitConfig, load_config
from topocl.model import GPT
from topocl.params import count, match_dense
from topocl.registry import ATTENTION

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "pretrain"
KINDS = ["dense", "split", "split_block", "nsa", "nsa_block", "nsa_gather", "dsa", "dsa_block", "dsa_gather"]
# plain = impl=mask (the reference); *_block / *_gather = the fast paths
MODELS = KINDS + ["moe"]  # "moe" = dense attention + moe FFN
SMALL = {"split": SplitConfig(topk=3, impl="mask"),
         "nsa": NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, n_sel=3, window=4, impl="mask"),
         "dsa": DSAConfig(topk=4, index_heads=2, index_dim=8, index_rope_dim=4, shared_heads=2, impl="mask")}
ROLES = {"dense": {"attn.q", "attn.k", "attn.v", "attn.o", "mlp"},
         "split": {"attn.dense_heads", "attn.sparse_heads", "mlp"},
         "nsa": {"attn.cmp", "attn.slc", "attn.win", "attn.q", "attn.o", "mlp"},  # gate rows live in their branch
         "dsa": {"attn.indexer", "attn.shared_heads", "attn.routed_heads", "mlp"},  # o_proj split by head group
         "moe": {"attn.q", "attn.k", "attn.v", "attn.o", "ffn.shared_expert", "ffn.routed_expert", "ffn.router"}}
for _k in KINDS:
    ROLES.setdefault(_k, ROLES[_k.split("_")[0]])


def cfg(kind: str, **kw) -> ModelConfig:
    if kind == "moe":
        kw.setdefault("ffn", "moe")
        kind = "dense"
    if kind in SMALL and kind not in kw:
        kw[kind] = SMALL[kind]
    if "_" in kind:
        kind, impl = kind.split("_")
        kw[kind] = dataclasses.replace(kw.pop(kind, SMALL[kind]), impl=impl)
    return ModelConfig(vocab_size=40, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=40, attention=kind,
                       **kw)


def rope(t: int):
    m = GPT(cfg("dense"))
    return m.rope_cos[:t].double(), m.rope_sin[:t].double()


def module(kind: str, **kw):
    torch.manual_seed(0)
    c = cfg(kind, **kw)
    return ATTENTION.get(c.attention)(c).double()


# ----------------------------------------------------------------------------- contract, every kind


@pytest.mark.parametrize("kind", MODELS)
def test_exact_causality_float64(kind):
    torch.manual_seed(0)
    m = GPT(cfg(kind)).double()
    x = torch.randint(0, 40, (2, 30))
    for t in (1, 9, 23):
        x2 = x.clone()
        x2[:, t:] = (x[:, t:] + torch.randint(1, 40, (2, 30 - t))) % 40  # every future token changes
        a, b = m(x).logits, m(x2).logits
        assert (a[:, :t] - b[:, :t]).abs().max().item() <= 1e-12
        assert (a[:, t:] - b[:, t:]).abs().max().item() > 1e-6  # the perturbation is seen afterwards


@pytest.mark.parametrize("kind", MODELS)
def test_prefix_forward_equals_the_full_forward(kind):
    """Logits at t from x[:, :t+1] alone equal the full-length pass (parallel vs token-by-token, as in
    lucidrains' test_inference): the selection may not depend on the sequence length (DSA's ReLU index
    scores tie exactly, and torch.topk's tie order changed the picks with T)."""
    torch.manual_seed(0)
    m = GPT(cfg(kind)).double()
    x = torch.randint(0, 40, (2, 33))
    full = m(x).logits
    for t in range(1, 33):
        assert (m(x[:, :t]).logits - full[:, :t]).abs().max().item() <= 1e-12, t


@pytest.mark.parametrize("kind", MODELS)
def test_every_parameter_has_exactly_one_role(kind):
    m = GPT(cfg(kind))
    roles = m.param_roles()
    assert set(roles) == {n for n, _ in m.named_parameters()}
    assert set(roles.values()) - {"embed", "head", "norm.attn", "norm.ffn", "norm.final"} == ROLES[kind]
    assert sum(m.params_by_role().values()) == m.num_params()


def dense_twin(kind: str, m, c: ModelConfig, branch: str = "slc"):
    """A `dense` attention with the same weights as sparse module `m` at full budget."""
    d = ATTENTION.get("dense")(c).double()
    w = {}
    if kind == "dense":
        return m
    if kind == "split":
        for name in ("q_proj", "k_proj", "v_proj"):
            w[name] = torch.cat([getattr(m.dense, name).weight, getattr(m.sparse, name).weight])
        w["o_proj"] = torch.cat([m.dense.o_proj.weight, m.sparse.o_proj.weight], dim=1)
    elif kind == "dsa":
        for name in ("q_proj", "k_proj", "v_proj"):
            w[name] = torch.cat([getattr(m.shared, name).weight, getattr(m.routed, name).weight])
        w["o_proj"] = torch.cat([m.shared.o_proj.weight, m.routed.o_proj.weight], dim=1)
    elif kind == "nsa":
        kv = getattr(m, branch)
        w = {"q_proj": m.q_proj.weight, "k_proj": kv.k_proj.weight, "v_proj": kv.v_proj.weight,
             "o_proj": m.o_proj.weight}
    with torch.no_grad():
        for name, value in w.items():
            getattr(d, name).weight.copy_(value)
    return d


FULL = {"dense": {}, "split": {"split": SplitConfig(topk=64)},
        "nsa": {"nsa": NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, n_sel=4, window=16)},
        "dsa": {"dsa": DSAConfig(topk=64, index_heads=2, index_dim=8, index_rope_dim=4, shared_heads=2)}}
for _k in KINDS:
    FULL.setdefault(_k, FULL[_k.split("_")[0]])


@pytest.mark.parametrize("kind", KINDS)
def test_full_budget_equals_dense_with_same_weights(kind):
    t = 15
    m = module(kind, **FULL[kind])
    c = cfg(kind, **FULL[kind])
    x = torch.randn(2, t, 32, dtype=torch.float64)
    cos, sin = rope(t)
    nsa = kind.startswith("nsa")
    branches = [("slc", (0.0, 1.0, 0.0)), ("win", (0.0, 0.0, 1.0))] if nsa else [("slc", None)]
    for branch, gates in branches:
        if gates is not None:
            m.force_gates = gates  # n·l' >= T selects every block; w >= T covers every key
        y, aux = m(x, cos, sin)
        assert (y - dense_twin(c.attention, m, c, branch)(x, cos, sin)[0]).abs().max().item() <= 1e-12
        frac = [v.item() for k, v in aux.items() if k.endswith("key_frac")]
        assert frac == ([] if kind == "dense" else [1.0])
    if kind.startswith("dsa"):
        assert aux["stat.dsa_recall"].item() == 1.0


def fix_selection(kind: str, m, t: int, monkeypatch) -> None:
    """Hold the sparse selection fixed (random but causal), so the layer is a smooth function of x."""
    g = torch.Generator().manual_seed(1)
    if kind.startswith("split"):
        keep = topk_mask(torch.rand(1, 2, t, t, generator=g), 3, causal_mask(t))
        monkeypatch.setattr(split_mod, "topk_mask", lambda *a, **k: keep)
    elif kind.startswith("nsa"):
        sel = nsa_mod.select_blocks(torch.rand(1, 2, t, -(-t // 4), generator=g, dtype=torch.float64), 4, 2, 1, 1)
        monkeypatch.setattr(m, "select", lambda *a, **k: sel)
    elif kind in ("dsa", "dsa_block"):  # one block (t <= 128)
        keep = topk_mask(torch.rand(1, t, t, generator=g), 3, causal_mask(t))
        monkeypatch.setattr(m, "select", lambda index, visible: keep)
    elif kind == "dsa_gather":  # one chunk: the index top-k (and the recall stat's) come from topk_mask
        keep = topk_mask(torch.rand(1, t, t, generator=g), 3, causal_mask(t))
        monkeypatch.setattr(dsa_mod, "topk_mask", lambda *a, **k: keep)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_with_selection_held_fixed(kind, monkeypatch):
    t = 9
    m = module(kind)
    fix_selection(kind, m, t, monkeypatch)
    cos, sin = rope(t)
    x = torch.randn(1, t, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: m(inp, cos, sin)[0], (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["split", "nsa", "dsa", "moe"])
def test_fast_pathway_switch_changes_the_output(kind):
    torch.manual_seed(0)
    m = GPT(cfg(kind)).eval()
    x = torch.randint(0, 40, (1, 20))
    on = m(x).logits
    with m.fast_pathway(False):
        off = m(x).logits
    assert not torch.allclose(on, off) and torch.equal(m(x).logits, on)
    slow, fast = m.pathway_roles()
    assert slow and fast and not slow & fast and (slow | fast) <= ROLES[kind]


# ----------------------------------------------------------------------------- the shared top-k op


def test_topk_mask_semantics():
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.5, 0.1, 9.0, 9.0], [1.0, 2.0, 3.0, 4.0]])
    vis = causal_mask(3, 4)  # rows see 2, 3 and 4 keys
    keep = topk_mask(scores, 2, vis)
    assert keep.tolist() == [[True, True, False, False], [True, False, True, False], [False, False, True, True]]
    per_row = topk_mask(scores, torch.tensor([[1], [3], [1]]), vis)
    assert per_row.tolist() == [[True, False, False, False], [True, True, True, False], [False, False, False, True]]
    assert topk_mask(scores, 10, vis).tolist() == vis.tolist()  # budget >= S keeps every visible key
    assert row_budget(5, 0, 0.5).flatten().tolist() == [1, 1, 2, 2, 2]
    assert row_budget(5, 3, 0.5).flatten().tolist() == [1, 2, 3, 3, 3]


def test_topk_mask_matches_a_sorting_reference():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 11, 11, generator=g)
    vis = causal_mask(11)
    budgets = [4, torch.randint(0, 6, (11, 1), generator=g), torch.randint(1, 13, (2, 3, 11, 1), generator=g)]
    for k in budgets:
        keep = topk_mask(scores, k, vis)
        kk = torch.as_tensor(k).expand(2, 3, 11, 1)
        for idx in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(11)).tolist():
            b, h, t = idx
            order = [int(s) for s in scores[b, h, t, : t + 1].argsort(descending=True)]
            expect = set(order[: int(kk[b, h, t, 0])])
            assert {int(s) for s in keep[b, h, t].nonzero().flatten()} == expect


def test_topk_mask_ties_go_to_the_most_recent_keys_whatever_the_length():
    scores = torch.tensor([[2.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]]).expand(8, 8)
    for s in range(4, 9):  # the same rows seen with more (future, invisible) keys
        keep = topk_mask(scores[:, :s], 3, causal_mask(8)[:, :s])
        assert keep[3].nonzero().flatten().tolist() == [0, 2, 3]  # 2.0, 1.0, then the later of the tied zeros
        if s > 5:
            assert keep[5].nonzero().flatten().tolist() == [0, 3, 5]
    ones = torch.ones(1, 5, dtype=torch.bool)
    assert topk_mask(torch.zeros(1, 5), torch.tensor([[2]]), ones).tolist() == [[False, False, False, True, True]]
    assert not topk_mask(torch.zeros(1, 5), torch.tensor([[0]]), ones).any()


# ----------------------------------------------------------------------------- split


def test_split_is_really_sparse_and_the_switch_leaves_group_a():
    s = module("split", split=SplitConfig(topk=2))
    x = torch.randn(1, 20, 32, dtype=torch.float64)
    cos, sin = rope(20)
    y_on, aux = s(x, cos, sin)
    assert aux["stat.split_key_frac"].item() == pytest.approx((1 + 2 * 19) / (20 * 21 / 2))
    s.set_fast_pathway(False)
    y_off, _ = s(x, cos, sin)
    qa, ka, va = s.dense.qkv(x, cos, sin)
    assert torch.allclose(y_off, s.dense.out(sdpa_causal(qa, ka, va)), atol=1e-12)  # only group A remains
    assert not torch.allclose(y_on, y_off)


def test_split_group_errors():
    with pytest.raises(ValueError, match="sparse_kv_groups"):
        SplitAttention(cfg("split", split=SplitConfig(sparse_kv_groups=2)))


# ----------------------------------------------------------------------------- NSA


def test_nsa_block_convention_by_hand():
    # l = 4, d = 2, T = 8: compression blocks [0-3], [2-5], [4-7]; block i visible to t iff 2i + 3 <= t
    assert nsa_mod.n_cmp_blocks(8, 4, 2) == 3
    assert nsa_mod.cmp_visible(8, 4, 2).int().tolist() == [[0, 0, 0]] * 3 + [[1, 0, 0]] * 2 + [[1, 1, 0]] * 2 + [
        [1, 1, 1]]
    # l' = 4: selection blocks [0-3], [4-7]; weights = shared tokens / l
    assert nsa_mod.overlap_matrix(8, 4, 2, 4).tolist() == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    # l = 4, d = 2, l' = 8, T = 16: block 3 = [6-9] straddles selection blocks 0 and 1
    ov = nsa_mod.overlap_matrix(16, 4, 2, 8)
    assert ov.tolist() == [[1, 0], [1, 0], [1, 0], [0.5, 0.5], [0, 1], [0, 1], [0, 1]]
    p = torch.tensor([[0.1, 0.5, 0.2, 0.0]]).expand(8, 4)  # same scores for every query, T = 8, l' = 2
    sel = nsa_mod.select_blocks(p, sel_block=2, n_sel=3, n_init=1, n_local=1)
    assert sel[3].tolist() == [True, True, False, False]  # own block 1 + initial block 0; nothing else exists
    assert sel[4].tolist() == [True, True, True, False]  # forced 0 and own 2, then the best free one (1)
    assert sel[7].tolist() == [True, True, False, True]  # forced 0 and 3, best of {1: 0.5, 2: 0.2} is 1
    sel2 = nsa_mod.select_blocks(p, sel_block=2, n_sel=3, n_init=1, n_local=2)
    assert sel2[7].tolist() == [True, False, True, True]  # two local blocks (2, 3) forced


def test_nsa_hand_computed_selection_through_the_module():
    """T = 16, l = d = 2 (compressed block i = tokens 2i, 2i+1), l' = 4 (selection block j = tokens 4j..4j+3),
    n = 3 with 1 initial + 1 local block forced, so query 15 (own block 3) has one free pick: block 1 or 2.
    One KV head serves query heads 0 (looks along dim 0) and 1 (dim 1); compressed keys are set by hand."""
    c = ModelConfig(vocab_size=40, n_layer=1, d_model=8, n_head=2, n_kv_head=1, head_dim=4, max_seq_len=16,
                    attention="nsa", nsa=NSAConfig(cmp_block=2, cmp_stride=2, sel_block=4, n_sel=3, n_init=1,
                                                   n_local=1, window=2, phi="mean"))
    m = nsa_mod.NSAttention(c).double()
    q = torch.zeros(1, 2, 16, 4, dtype=torch.float64)
    q[:, 0, :, 0], q[:, 1, :, 1] = 1.0, 1.0
    kc = torch.zeros(1, 1, 8, 4, dtype=torch.float64)  # 8 compressed blocks
    kc[0, 0, 2, 0] = 20.0  # head 0: ~all mass on compressed block 2 (tokens 4-5, selection block 1)
    sel = m.select(q, kc, 16)[0, 0]  # [T, M = 4]; head 1 is uniform (1/8 per block, 1/4 per selection block)
    assert sel[15].tolist() == [True, True, False, True]  # block 1: 1 + 1/4 > block 2: 1/4
    assert sel[9].tolist() == [True, True, True, False]  # own block 2 forced; only 0-2 exist
    assert sel[7].tolist() == [True, True, False, False] and sel[3].tolist() == [True, False, False, False]
    # head 0 splits its mass between compressed blocks 2 (-> selection block 1) and 6 (-> block 3, forced);
    # head 1 puts all of its mass on compressed block 4 (-> block 2): the group sum prefers block 2 (1 > 1/2)
    kc[0, 0, 6, 0], kc[0, 0, 4, 1] = 20.0, 20.0
    assert m.select(q, kc, 16)[0, 0, 15].tolist() == [True, False, True, True]


def nsa_selection_by_loop(q_raw, kc, cfg_nsa: NSAConfig, hk: int, t: int) -> torch.Tensor:
    """Eq. 8-11 written out per query with explicit token ranges (independent of the vectorised code)."""
    c, (b, h, _, d) = cfg_nsa, q_raw.shape
    g, n, m = h // hk, kc.shape[2], -(-t // c.sel_block)
    out = torch.zeros(b, hk, t, m, dtype=torch.bool)
    for bi in range(b):
        for kv in range(hk):
            for tq in range(t):
                vis = [i for i in range(n) if i * c.cmp_stride + c.cmp_block - 1 <= tq]
                psum = [0.0] * n
                for hh in range(kv * g, (kv + 1) * g):
                    if vis:
                        logits = torch.stack([q_raw[bi, hh, tq] @ kc[bi, kv, i] / math.sqrt(d) for i in vis])
                        for i, pi in zip(vis, torch.softmax(logits, 0).tolist(), strict=True):
                            psum[i] += pi
                cand = [j for j in range(m) if j * c.sel_block <= tq]
                score = {}
                for j in cand:
                    sel_tokens = set(range(j * c.sel_block, (j + 1) * c.sel_block))
                    score[j] = sum(psum[i] * len(sel_tokens & set(range(i * c.cmp_stride, i * c.cmp_stride
                                                                          + c.cmp_block))) / c.cmp_block
                                   for i in range(n))
                own = tq // c.sel_block
                forced = [j for j in cand if j < c.n_init or own - c.n_local < j <= own]
                free = sorted((j for j in cand if j not in forced), key=lambda j: -score[j])
                for j in forced + free[: max(0, c.n_sel - len(forced))]:
                    out[bi, kv, tq, j] = True
    return out


@pytest.mark.parametrize("sizes", [dict(cmp_block=4, cmp_stride=2, sel_block=4, n_sel=3),
                                   dict(cmp_block=4, cmp_stride=2, sel_block=8, n_sel=2, n_local=1),
                                   dict(cmp_block=3, cmp_stride=1, sel_block=4, n_sel=4)])
def test_nsa_selection_matches_the_per_query_loop(sizes):
    t = 23
    m = module("nsa", nsa=NSAConfig(window=4, **sizes))
    x = torch.randn(2, t, 32, dtype=torch.float64)
    q_raw = m.q_proj(x).view(2, t, 4, 8).transpose(1, 2)
    kc = m.cmp_phi_k(m.cmp(x)[0], m.c.cmp_stride)
    assert torch.equal(m.select(q_raw, kc, t), nsa_selection_by_loop(q_raw, kc, m.c, 2, t))


@pytest.mark.parametrize("sizes", [dict(cmp_block=4, cmp_stride=2, sel_block=4, n_sel=3, window=4),
                                   dict(cmp_block=4, cmp_stride=2, sel_block=8, n_sel=2, n_local=1, window=5),
                                   dict(cmp_block=3, cmp_stride=1, sel_block=4, n_sel=4, n_init=0, n_local=0,
                                        window=30)])
@pytest.mark.parametrize("chunk", [512, 8])  # 8: three checkpointed query chunks
def test_nsa_gather_path_matches_the_mask_path_forward_and_backward(sizes, chunk):
    t = 23
    ref = module("nsa", nsa=NSAConfig(**sizes))
    fast = module("nsa_gather", nsa=NSAConfig(**sizes))
    fast.load_state_dict(ref.state_dict())
    fast.gather_chunk = chunk
    x = torch.randn(2, t, 32, dtype=torch.float64)
    cos, sin = rope(t)
    outs = []
    for m in (ref, fast):
        xi = x.clone().requires_grad_(True)
        y, aux = m(xi, cos, sin)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outs.append((y, aux, xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    (y0, a0, gx0, gp0), (y1, a1, gx1, gp1) = outs
    assert (y0 - y1).abs().max().item() < 1e-12 and (gx0 - gx1).abs().max().item() < 1e-12
    assert all((gp0[n] - gp1[n]).abs().max().item() < 1e-12 for n in gp0)
    assert {k: v.item() for k, v in a0.items()} == pytest.approx({k: v.item() for k, v in a1.items()}, abs=1e-6)


def run_both(ref, fast, t: int, kl: bool = False) -> list:
    """Forward + backward of two modules with the same weights on the same input: [(y, aux, dx, {param: grad})]."""
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, t, 32, dtype=torch.float64)
    cos, sin = rope(t)
    outs = []
    for m in (ref, fast):
        xi = x.clone().requires_grad_(True)
        y, aux = m(xi, cos, sin)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()
        (loss + (aux["loss.dsa_kl"] if kl else 0.0)).backward()
        outs.append((y, {k: v.item() for k, v in aux.items()}, xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    return outs


def assert_same(outs) -> None:
    (y0, a0, gx0, gp0), (y1, a1, gx1, gp1) = outs
    assert (y0 - y1).abs().max().item() < 1e-12 and (gx0 - gx1).abs().max().item() < 1e-12
    assert gp0.keys() == gp1.keys()
    for n in gp0:
        assert (gp0[n] is None) == (gp1[n] is None), n
        assert gp0[n] is None or (gp0[n] - gp1[n]).abs().max().item() < 1e-12, n
    assert a0 == pytest.approx(a1, abs=1e-12)


BLOCK_CASES = [  # (kind, config, query block): blocks of 5 / 7 queries = several blocks over T = 23
    ("split", SplitConfig(topk=3), 5), ("split", SplitConfig(topk=0, topk_frac=0.3), 7),
    ("split", SplitConfig(topk=64), 23),
    ("nsa", NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, n_sel=3, window=4), 7),
    ("nsa", NSAConfig(cmp_block=4, cmp_stride=2, sel_block=8, n_sel=2, n_local=1, window=9), 5),
    ("nsa", NSAConfig(cmp_block=3, cmp_stride=1, sel_block=4, n_sel=4, n_init=0, n_local=1, window=1), 6),
    ("nsa", NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, n_sel=3, window=40), 64),
    *[("dsa", DSAConfig(topk=5, index_heads=2, index_dim=8, index_rope_dim=4, shared_heads=sh, phase=ph,
                        kl_support=sup), blk)
      for sh in (0, 2) for ph, sup in (("sparse", "sparse"), ("sparse", "dense"), ("warmup", "sparse"))
      for blk in (7, 64)]]


@pytest.mark.parametrize("kind,conf,block", BLOCK_CASES)
def test_block_path_matches_the_mask_path_forward_and_backward(kind, conf, block):
    """The block path (query blocks x the keys they can see, fused SDPA on bool masks) = the reference."""
    t = 23
    ref = module(kind, **{kind: dataclasses.replace(conf, impl="mask")})
    fast = module(kind, **{kind: dataclasses.replace(conf, impl="block")})
    fast.block = block
    if kind == "nsa":  # gates that depend on x, so the gate projections get gradients too
        with torch.no_grad():
            for kv in (ref.cmp, ref.slc, ref.win):
                kv.gate.weight.normal_(0, 0.3)
    assert_same(run_both(ref, fast, t, kl=kind == "dsa"))


def test_auto_picks_the_block_path_and_gather_for_long_sparse_dsa():
    m = module("dsa", dsa=dataclasses.replace(SMALL["dsa"], impl="auto"))
    assert m.resolve_impl(1024) == "block" and m.resolve_impl(4096) == "gather"
    m.phase = "warmup"  # dense attention needs every key: never gather
    assert m.resolve_impl(4096) == "block"
    g = module("dsa", dsa=dataclasses.replace(SMALL["dsa"], impl="gather"))
    assert g.resolve_impl(16) == "gather"
    g.phase = "warmup"
    assert g.resolve_impl(16) == "block"


PATHWAYS = {  # kind -> {pathway: how to silence every other pathway}; shared roles serve all of them
    "nsa": {"cmp": (0, 1, 2), "slc": (1, 0, 2), "win": (2, 0, 1)},  # (own branch, silenced branches)
    "dsa": {"shared": None, "routed": None},
}


@pytest.mark.parametrize("kind", ["nsa", "dsa"])
def test_each_parameter_serves_one_pathway_or_has_a_shared_role(kind):
    """Gradient of the output through one pathway alone: the roles it reaches. Roles reached by two pathways must
    be the declared shared ones (NSA: attn.q, attn.o feed every branch and cannot be split; DSA: none, since
    o_proj is split by head group). Before the split, DSA's attn.o and NSA's attn.gate were reached by all."""
    shared = {"nsa": {"attn.q", "attn.o"}, "dsa": set()}[kind]
    t = 16
    x = torch.randn(2, t, 32, dtype=torch.float64)
    reached = {}
    for pathway in PATHWAYS[kind]:
        m = module(kind, **({"dsa": dataclasses.replace(SMALL["dsa"], kl_coeff=0.0)} if kind == "dsa" else {}))
        if kind == "nsa":
            with torch.no_grad():
                for i, kv in enumerate((m.cmp, m.slc, m.win)):
                    kv.gate.weight.normal_(0, 0.3)
                    if i != PATHWAYS["nsa"][pathway][0]:
                        kv.gate.bias.fill_(-1e4)  # sigmoid = 0 exactly: the branch is silent, gradient 0
            y = m(x, *rope(t))[0]
        else:
            m.set_fast_pathway(pathway == "routed")
            if pathway == "routed":  # silence the shared heads (their output, not a weight of theirs)
                m.shared.out = lambda y: y.new_zeros(y.shape[0], y.shape[2], 32)
            y = m(x, *rope(t))[0]
        y.pow(2).sum().backward()
        reached[pathway] = {m.param_role(n) for n, p in m.named_parameters()
                            if p.grad is not None and p.grad.abs().max() > 0}
    names = list(reached)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert reached[a] & reached[b] == shared, (a, b)
    assert all(reached[p] - shared for p in names)  # every pathway has roles of its own


def test_legacy_checkpoints_load_into_the_split_projections():
    """A state dict from before the split (DSA: one o_proj over [shared ; routed] heads; NSA: one gate Linear
    with (branch, head) rows) loads into the per-pathway tensors and computes the old maps."""
    t = 12
    x = torch.randn(2, t, 32, dtype=torch.float64)
    cos, sin = rope(t)
    d = module("dsa")
    sd = d.state_dict()
    w_o = torch.cat([sd.pop("shared.o_proj.weight"), sd.pop("routed.o_proj.weight")], dim=1)  # [C, H*D]
    old = module("dsa")
    old.load_state_dict({**sd, "o_proj.weight": w_o})
    y_s = sdpa_causal(*old.shared.qkv(x, cos, sin))
    q, k, v = old.routed.qkv(x, cos, sin)
    y_r, *_ = old._routed_mask(x, q, k, v)
    expect = torch.cat([y_s, y_r], 1).transpose(1, 2).reshape(2, t, -1) @ w_o.T  # the pre-split o_proj
    assert (old(x, cos, sin)[0] - expect).abs().max().item() < 1e-12
    n = module("nsa")
    sd = n.state_dict()
    with torch.no_grad():
        w_g, b_g = torch.randn(12, 32, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    for br in ("cmp", "slc", "win"):
        sd.pop(f"{br}.gate.weight"), sd.pop(f"{br}.gate.bias")
    n.load_state_dict({**sd, "gate.weight": w_g, "gate.bias": b_g})
    gates = torch.sigmoid(x @ w_g.T + b_g).view(2, t, 3, 4)  # the pre-split gate: (branch, head) rows
    n(x, cos, sin)
    assert torch.equal(n.slc.gate.weight, w_g[4:8]) and torch.equal(n.win.gate.bias, b_g[8:])
    got = torch.sigmoid(torch.stack([kv.gate(x) for kv in (n.cmp, n.slc, n.win)], 2))
    assert (got - gates).abs().max().item() < 1e-15


def test_nsa_compressed_branch_with_unit_blocks_is_causal_attention():
    t = 10
    m = module("nsa", nsa=NSAConfig(cmp_block=1, cmp_stride=1, sel_block=1, n_sel=3, window=2, phi="mean"))
    m.force_gates = (1.0, 0.0, 0.0)  # PE starts at zero
    x = torch.randn(1, t, 32, dtype=torch.float64)
    cos, sin = rope(t)
    q = m.q_proj(x).view(1, t, 4, 8).transpose(1, 2)  # un-rotated
    k, v = m.cmp(x)
    expect = m.o_proj(sdpa_causal(q, k, v).transpose(1, 2).reshape(1, t, 32))
    assert torch.allclose(m(x, cos, sin)[0], expect, atol=1e-12)


def test_nsa_window_of_one_returns_the_own_value():
    t = 12
    m = module("nsa", nsa=NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, n_sel=3, window=1))
    m.force_gates = (0.0, 0.0, 1.0)
    x = torch.randn(2, t, 32, dtype=torch.float64)
    v = m.win(x)[1]  # [B, Hk, T, D]: with w = 1 each query attends to itself only
    expect = m.o_proj(v.repeat_interleave(2, dim=1).transpose(1, 2).reshape(2, t, 32))
    assert torch.allclose(m(x, *rope(t))[0], expect, atol=1e-12)


def test_nsa_window_gates_give_zero_grads_to_cmp_and_slc():
    m = module("nsa")
    m.force_gates = (0.0, 0.0, 1.0)
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    m(x, *rope(16))[0].pow(2).sum().backward()
    roles = {n: m.param_role(n) for n, _ in m.named_parameters()}
    for name, p in m.named_parameters():
        if roles[name] in ("attn.cmp", "attn.slc"):
            assert p.grad is None or p.grad.abs().max().item() == 0.0, name
        elif ".gate." not in f".{name}":  # forced gates bypass the gate projections
            assert p.grad is not None and p.grad.abs().max().item() > 0, name


def test_nsa_init_gates_favour_the_window_and_phi_keeps_the_key_scale():
    torch.manual_seed(0)
    m = GPT(cfg("nsa", nsa=NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, n_sel=3, window=4)))
    out = m(torch.randint(0, 40, (2, 24)))
    g = 1 / (1 + math.exp(-2.0))
    assert out.aux["stat.nsa_gate_win"].item() == pytest.approx(g) and out.aux["stat.nsa_gate_cmp"].item() == (
        pytest.approx(1 - g))
    attn = m.blocks[0].attn
    assert attn.cmp_phi_k.pe.abs().max().item() == 0.0
    k = torch.randn(4, 2, 64, 8)
    ratio = attn.cmp_phi_k(k, 2).std() / k.std()
    assert 0.4 < ratio.item() < 2.5  # He-initialised φ roughly preserves the key scale


# ----------------------------------------------------------------------------- DSA


def test_dsa_index_scores_match_the_explicit_loop():
    torch.manual_seed(0)
    c = cfg("dsa", dsa=DSAConfig(topk=4, index_heads=3, index_dim=8, index_rope_dim=4))
    ind = dsa_mod.Indexer(c).double()
    x = torch.randn(1, 5, 32, dtype=torch.float64)
    got = ind(x)
    q = ind.q(x).view(1, 5, 3, 8)
    k = ind.k_norm(ind.k(x))
    w = ind.w(x)
    cos, sin = ind.cos.double(), ind.sin.double()
    for t in range(5):
        for s in range(5):  # NeoX RoPE on the first 4 index dims ([pe ; nope]) of q_I and k_I
            ks = torch.cat([apply_rope(k[0, s, :4], cos[s], sin[s]), k[0, s, 4:]])
            ref = 0.0
            for h in range(3):
                qh = torch.cat([apply_rope(q[0, t, h, :4], cos[t], sin[t]), q[0, t, h, 4:]])
                ref += w[0, t, h] * 3 ** -0.5 * 8 ** -0.5 * torch.relu(qh @ ks)
            assert abs(got[0, t, s].item() - ref.item()) < 1e-12


@pytest.mark.parametrize("impl", ["mask", "block", "gather"])
@pytest.mark.parametrize("shared_heads", [0, 2])  # 0 = pure V3.2 DSA (every head routed)
def test_dsa_gradient_isolation(shared_heads, impl):
    torch.manual_seed(0)
    m = GPT(cfg("dsa", dsa=DSAConfig(topk=4, index_heads=2, index_dim=8, index_rope_dim=4,
                                     shared_heads=shared_heads, impl=impl))).double()
    x = torch.randint(0, 40, (2, 24))
    x2 = x.clone()
    x2[:, 12:] = (x[:, 12:] + 1) % 40
    assert (m(x).logits[:, :12] - m(x2).logits[:, :12]).abs().max().item() <= 1e-12  # causal for either split
    out = m(x, x)
    out.lm_loss.backward(retain_graph=True)
    roles = m.param_roles()
    for n, p in m.named_parameters():
        if roles[n] == "attn.indexer":
            assert p.grad is None, n
        else:
            assert p.grad is not None, n
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


def test_dsa_sparse_kl_renormalises_each_head_inside_the_selection():
    torch.manual_seed(0)
    scores = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    index = torch.randn(1, 6, 6, dtype=torch.float64)
    keep = topk_mask(index, 2, causal_mask(6))  # [1, T, S]
    kl = dsa_mod.indexer_kl(scores, index, keep)
    total = 0.0
    for t in range(6):
        s = keep[0, t].nonzero().flatten()
        p = sum(torch.softmax(scores[0, h, t, s], 0) for h in range(2)) / 2
        q = torch.softmax(index[0, t, s], 0)
        total += (p * (p.log() - q.log())).sum().item()
    assert kl.item() == pytest.approx(total / 6, abs=1e-12)


def test_dsa_phases():
    x = torch.randn(1, 30, 32, dtype=torch.float64)
    cos, sin = rope(30)
    sparse = module("dsa")
    aux = sparse(x, cos, sin)[1]
    assert aux["stat.dsa_key_frac"].item() == pytest.approx((10 + 4 * 26) / (30 * 31 / 2))  # top-4 of t+1 keys
    warm = module("dsa", dsa=DSAConfig(topk=4, index_heads=2, index_dim=8, index_rope_dim=4, shared_heads=2,
                                       phase="warmup"))
    warm.load_state_dict(sparse.state_dict())
    y_warm, aux_w = warm(x, cos, sin)
    assert aux_w["stat.dsa_key_frac"].item() == 1.0
    assert aux_w["stat.dsa_recall"].item() == pytest.approx(aux["stat.dsa_recall"].item())  # same indexer picks
    assert torch.allclose(y_warm, dense_twin("dsa", warm, cfg("dsa"))(x, cos, sin)[0], atol=1e-12)  # dense
    with pytest.raises(ValueError, match="phase"):
        module("dsa", dsa=DSAConfig(phase="later"))


@pytest.mark.parametrize("shared_heads", [0, 2])
@pytest.mark.parametrize("chunk", [512, 7])  # 7: four checkpointed query chunks
def test_dsa_gather_path_matches_the_mask_path_forward_and_backward(shared_heads, chunk):
    t = 23
    dc = DSAConfig(topk=5, index_heads=2, index_dim=8, index_rope_dim=4, shared_heads=shared_heads, impl="mask")
    ref = module("dsa", dsa=dc)
    fast = module("dsa_gather", dsa=dc)
    fast.load_state_dict(ref.state_dict())
    fast.gather_chunk = chunk
    x = torch.randn(2, t, 32, dtype=torch.float64)
    cos, sin = rope(t)
    outs = []
    for m in (ref, fast):
        xi = x.clone().requires_grad_(True)
        y, aux = m(xi, cos, sin)
        ((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + aux["loss.dsa_kl"]).backward()
        outs.append((y, aux, xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    (y0, a0, gx0, gp0), (y1, a1, gx1, gp1) = outs
    assert (y0 - y1).abs().max().item() < 1e-12 and (gx0 - gx1).abs().max().item() < 1e-12
    assert all((gp0[n] - gp1[n]).abs().max().item() < 1e-12 for n in gp0)  # indexer grads (from the KL) too
    assert {k: v.item() for k, v in a0.items()} == pytest.approx({k: v.item() for k, v in a1.items()}, abs=1e-9)
    assert 0 < a1["stat.dsa_recall"].item() < 1 and a1["stat.dsa_kl"].item() > 0
    with pytest.raises(ValueError, match="gather"):
        module("dsa_gather", dsa=dataclasses.replace(dc, kl_support="dense"))


# ----------------------------------------------------------------------------- presets and the matched control


PRESETS = {"split": 0.15, "nsa": 0.55, "dsa": 0.30, "moe": None}


@pytest.mark.parametrize("kind", PRESETS)
def test_tiny_presets_are_really_sparse_at_their_length(kind):
    c = load_config(PretrainConfig, PRESET_DIR / f"tiny-{kind}.yaml").model
    c.vocab_size, c.n_layer = 64, 1
    torch.manual_seed(0)
    out = GPT(c)(torch.randint(0, 64, (2, c.max_seq_len)))
    fracs = {k: v.item() for k, v in out.aux.items() if k.endswith("key_frac")}
    if PRESETS[kind] is None:
        assert not fracs and "stat.moe_balance" in out.aux
    else:
        assert len(fracs) == 1 and 0 < next(iter(fracs.values())) < PRESETS[kind], fracs


@pytest.mark.parametrize("kind", ["split", "nsa", "dsa", "moe"])
def test_matched_dense_control_within_two_percent(kind):
    c = load_config(PretrainConfig, PRESET_DIR / f"tiny-{kind}.yaml").model
    c.vocab_size = 2048
    d = match_dense(c)
    assert (d.attention, d.ffn) == ("dense", "mlp")
    assert (d.n_layer, d.n_head, d.n_kv_head, d.d_model) == (c.n_layer, c.n_head, c.n_kv_head, c.d_model)
    assert abs(count(d) / count(c) - 1) <= 0.02
    assert count(d) == GPT(d).num_params()  # the meta-device count is the real one


def test_matched_dense_control_errors_and_cli(capsys):
    from topocl.params import cli

    wide = ModelConfig(vocab_size=40, n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=200)
    assert abs(count(match_dense(wide)) / count(wide) - 1) <= 0.02
    with pytest.raises(ValueError, match="cannot match"):
        match_dense(cfg("nsa"), tolerance=1e-9)
    assert cli([str(PRESET_DIR / "tiny-nsa.yaml")]) == 0
    text = capsys.readouterr().out
    c = load_config(PretrainConfig, str(PRESET_DIR / "tiny-nsa.yaml")).model
    c.vocab_size = 2048
    assert f"model.d_ff={match_dense(c).d_ff} " in text
    assert all(role in text for role in ROLES["nsa"])


# ----------------------------------------------------------------------------- DSA two-stage recipe


def test_dsa_schedule_warms_up_the_indexer_alone_then_trains_everything_sparse():
    """Steps < warmup_steps: phase warmup (dense attention) and, with warmup_trains=indexer, only attn.indexer
    moves (no gradient, no AdamW update or decay elsewhere); from warmup_steps on: top-k and every role trains."""
    from topocl.config import TrainConfig
    from topocl.optim import build_optimizer
    from topocl.train import train_steps

    torch.manual_seed(0)
    dc = dataclasses.replace(SMALL["dsa"], warmup_steps=2, warmup_trains="indexer", impl="auto")
    m = GPT(cfg("dsa", dsa=dc))
    tc = TrainConfig(steps=4, batch_size=2, lr=1e-2, warmup_steps=0)
    opt = build_optimizer(m, tc)
    roles = m.param_roles()
    rows = torch.randint(0, 40, (2, 25))
    snaps, phases, fracs = [], [], []
    phase = dsa_mod.schedule(m, 0, opt)
    for r in train_steps(m, opt, lambda s: rows, range(4), cfg=tc, device=torch.device("cpu")):
        phases.append(phase)
        fracs.append(r.aux["stat.dsa_key_frac"])
        snaps.append({n: p.detach().clone() for n, p in m.named_parameters()})
        phase = dsa_mod.schedule(m, r.step + 1, opt)
    assert phases == ["warmup", "warmup", "sparse", "sparse"]
    assert fracs[0] == fracs[1] == 1.0 and fracs[2] < 1.0  # dense attention in warm-up, top-k after
    start = dict(m.named_parameters())
    moved = [{n for n in roles if not torch.equal(a[n], b[n])} for a, b in zip(snaps, snaps[1:])]
    indexer = {n for n, role in roles.items() if role == "attn.indexer"}
    assert moved[0] == indexer  # warm-up step 2: the indexer alone
    assert moved[2] == set(roles)  # sparse stage: everything
    assert all(p.requires_grad for p in start.values())
    with pytest.raises(ValueError, match="warmup_trains"):
        module("dsa", dsa=dataclasses.replace(dc, warmup_trains="rest"))
    with pytest.raises(ValueError, match="kl_coeff"):
        module("dsa", dsa=dataclasses.replace(dc, kl_coeff=0.0))


def test_pretrain_logs_the_dsa_stage_and_the_recall_per_stage(tmp_path):
    from topocl.cli import main

    out = tmp_path / "run"
    tiny = ["model.n_layer=1", "model.d_model=32", "model.n_head=4", "model.n_kv_head=2", "model.max_seq_len=32",
            "data.synthetic_docs=200", "data.vocab_size=300", "data.seq_len=32", "train.batch_size=4",
            "train.warmup_steps=1", "train.log_every=1", "train.eval_every=10", "train.eval_batches=1", "samples=0",
            "probe=false", "train.steps=5", "model.dsa.warmup_steps=3", "model.dsa.topk=4", f"out_dir={out}"]
    assert main(["pretrain", str(PRESET_DIR / "tiny-dsa.yaml"), *tiny]) == 0
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train_loss" in r]
    assert [r["dsa_phase"] for r in steps] == ["warmup"] * 3 + ["sparse"] * 2
    assert all(r["stat.dsa_key_frac"] == 1.0 for r in steps[:3]) and all(r["stat.dsa_key_frac"] < 1 for r in steps[3:])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["dsa_recall"]) == {"warmup", "sparse"}
    for phase in ("warmup", "sparse"):
        vals = [r["stat.dsa_recall"] for r in steps if r["dsa_phase"] == phase]
        assert summary["dsa_recall"][phase] == pytest.approx(sum(vals) / len(vals))


@pytest.mark.parametrize("preset", ["tiny-dsa", "ts-dsa-20m", "ts-dsa-100m"])
def test_dsa_presets_run_the_two_stage_recipe(preset):
    c = load_config(PretrainConfig, str(PRESET_DIR / f"{preset}.yaml"))
    d = c.model.dsa
    assert d.phase == "sparse" and 0 < d.warmup_steps <= c.train.steps // 10 and d.warmup_trains == "all"
