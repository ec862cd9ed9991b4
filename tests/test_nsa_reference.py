"""Optional behavioural comparison of `nsa` with lucidrains' `native-sparse-attention-pytorch` (PyPI, runs on CPU).
Skipped unless that package is installed; it is not a project dependency:

    pip install native-sparse-attention-pytorch==0.2.3

The two differ by design (research note §2.3: it shares one K/V projection between branches, adds a learned
memory slot to the compressed branch, makes compressed blocks visible only strictly after they end, ranks
blocks by averaged logits and always adds the query's own block). So only what should agree is compared,
with the weights copied across, RoPE switched off on both sides and the branch gates forced:
- the sliding window: its `sliding_window_size = w` sees w + 1 tokens (t − s ≤ w), i.e. our window w + 1;
- the fine (selected) branch with every block selected equals causal attention in both;
- the compressed keys: its window w (left-padded by l − d) holds the tokens of our block w − (l/d − 1),
  which pins our block convention against an independent implementation.
"""

import pytest
import torch
from torch import nn

from topocl.attention.nsa import NSAttention
from topocl.config import ModelConfig, NSAConfig

nsa_pt = pytest.importorskip("native_sparse_attention_pytorch")

L, D_STRIDE, SEL, HEADS, KV, DH, T = 4, 2, 4, 4, 2, 8, 16


class FixedGates(nn.Module):
    def __init__(self, gates: tuple[float, float, float]) -> None:
        super().__init__()
        self.gates = gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # -> [B, H, T, 3]
        return torch.tensor(self.gates, dtype=x.dtype).expand(x.shape[0], HEADS, x.shape[1], 3)


def pair(window_ours: int, n_sel: int, gates: tuple[float, float, float], branch: str, impl: str = "mask"):
    torch.manual_seed(0)
    c = ModelConfig(vocab_size=8, d_model=HEADS * DH, n_head=HEADS, n_kv_head=KV, max_seq_len=T, attention="nsa",
                    nsa=NSAConfig(cmp_block=L, cmp_stride=D_STRIDE, sel_block=SEL, n_sel=n_sel, window=window_ours,
                                  impl=impl))
    ours = NSAttention(c).double()
    ours.force_gates = gates
    theirs = nsa_pt.SparseAttention(dim=HEADS * DH, dim_head=DH, heads=HEADS, kv_heads=KV,
                                    sliding_window_size=window_ours - 1, compress_block_size=L,
                                    compress_block_sliding_stride=D_STRIDE, selection_block_size=SEL,
                                    num_selected_blocks=n_sel, causal=True, norm=False).double()
    theirs.to_strategy_combine = FixedGates(gates)
    theirs.rotary_emb.rotate_queries_with_cached_keys = lambda q, k: (q, k)  # no RoPE on either side
    kv = getattr(ours, branch)
    with torch.no_grad():
        theirs.to_qkv.weight.copy_(torch.cat([ours.q_proj.weight, kv.k_proj.weight, kv.v_proj.weight]))
        theirs.combine_heads.weight.copy_(ours.o_proj.weight)
    return ours, theirs


def no_rope(t: int):
    return torch.ones(t, DH // 2, dtype=torch.float64), torch.zeros(t, DH // 2, dtype=torch.float64)


@pytest.mark.parametrize("impl", ["mask", "block", "gather"])
def test_sliding_window_branch_matches(impl):
    ours, theirs = pair(window_ours=4, n_sel=3, gates=(0.0, 0.0, 1.0), branch="win", impl=impl)  # 4 of 16 keys
    x = torch.randn(2, T, HEADS * DH, dtype=torch.float64)
    assert (ours(x, *no_rope(T))[0] - theirs(x)).abs().max().item() < 1e-12


@pytest.mark.parametrize("impl", ["mask", "block", "gather"])
def test_fine_branch_with_every_block_selected_matches(impl):
    ours, theirs = pair(window_ours=4, n_sel=T // SEL, gates=(0.0, 1.0, 0.0), branch="slc", impl=impl)
    x = torch.randn(2, T, HEADS * DH, dtype=torch.float64)
    assert (ours(x, *no_rope(T))[0] - theirs(x)).abs().max().item() < 1e-12


def test_compressed_keys_match_with_the_block_offset():
    ours, theirs = pair(window_ours=4, n_sel=3, gates=(1.0, 0.0, 0.0), branch="cmp")
    with torch.no_grad():
        for a, b in ((ours.cmp_phi_k.mlp[0], theirs.k_compress[1]), (ours.cmp_phi_k.mlp[2], theirs.k_compress[3])):
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)
        theirs.k_intrablock_positions.zero_()  # ours starts at zero too
    captured = []
    theirs.k_compress.register_forward_hook(lambda mod, inp, out: captured.append(out))
    x = torch.randn(2, T, HEADS * DH, dtype=torch.float64)
    theirs(x)
    k_raw, _ = ours.cmp(x)  # [B, Hk, T, D]
    mine = ours.cmp_phi_k(k_raw, D_STRIDE)  # [B, Hk, N, D], block i = tokens i·d .. i·d + l − 1
    offset = L // D_STRIDE - 1
    assert mine.shape[2] == captured[0].shape[2] - offset
    assert (mine - captured[0][:, :, offset:]).abs().max().item() < 1e-12
