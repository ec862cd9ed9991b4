"""`nsa`: Native Sparse Attention (arXiv 2502.11089) with independent K/V per branch, as in the paper.

    o_t = Σ_{c ∈ {cmp, slc, win}} g_t^c · Attn(q_t, K_t^c, V_t^c)                         (Eq. 5)
    cmp: K̃_i = φ_K(k_{i·d : i·d+l} + pe_K), block i visible to t iff i·d + l − 1 ≤ t    (Eq. 7)
    slc: p_cmp = softmax(q_t·K̃ᵀ) summed over the GQA group (Eq. 8, 10), mapped onto selection blocks by
         overlap (Eq. 9): p_slc[j] = Σ_i p_cmp[i] · |[i·d, i·d+l) ∩ [j·l', (j+1)·l')| / l; the n_init first
         blocks and the n_local most recent ones (the query's own block included) are forced, the rest of
         the n blocks go to the top scores; token-level causal attention inside them (Eq. 11–12)
    win: the w most recent tokens, 0 ≤ t − s < w
    g   = sigmoid(W_g x), one gate per head and branch; init bias (−2, −2, +2) = window-dominated start

Parameters and roles: `q_proj` (attn.q) and `o_proj` (attn.o) serve all three branches and keep roles of their
own (one query and one output map in the paper; splitting them would change the model); everything else belongs
to one branch: `cmp.*` + `cmp_phi_{k,v}.*` (attn.cmp: the compressed branch's own K/V projections, gate row, φ
and intra-block PE), `slc.*` (attn.slc) and `win.*` (attn.win): independent K/V per branch (paper §3.3.3) and
each branch's gate row g^c (the gate Linear(C, 3·H) split by branch, the same map; older checkpoints' `gate.*`
load into the three), so freezing a branch is clean. `reset_extra_parameters` (called after GPT's generic
N(0, 0.02) init) sets the gates (weight 0, bias per `gate_init`), zeroes the intra-block PE and He-initialises φ
so compressed keys keep the scale of the raw keys (with N(0, 0.02) the 2-layer φ shrinks them ~14x at l·D = 256
and block scores start near-uniform).

Queries see no compressed block before the first block ends: that branch then returns 0 (fla convention).
The compressed branch uses un-rotated q/k (the simplest RoPE policy, research note §4); selected and
window branches use RoPE. The block selection is computed without gradient (paper-faithful).
Paths (`nsa.impl`): `mask` (reference) = masked softmax over [B, H, T, S] per branch; `block` = per block of
128 queries only the keys it can see (selected: the prefix, window: the last w + 128) through the fused SDPA
kernel on bool masks, nothing [B, H, T, S] kept for backward; `gather` = the selected
blocks gathered per query ([B, Hk, Tc, n·l', D] per checkpointed chunk of Tc queries) and the window
unfolded ([B, Hk, T, D, w]), so no branch builds a [T, T] tensor (the compressed branch is [T, N] in both).
All give the same outputs and gradients (tests); flex-attention / Triton kernels would slot in beside
`gather`. `auto` = flex on CUDA, on CPU block below T = 4096 and gather from there (at T=4096 `gather` is ~4x
faster than `mask` with ~4x less memory; at T ≤ 1024, where n·l' is a large share of T, block is fastest:
benchmarks/attention.py).

Shape legend: B batch, T queries, S keys, N compression blocks, M selection blocks, C d_model,
H query heads, Hk KV heads, G = H / Hk, D head dim, L = cmp_block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from topocl.attention import flex
from topocl.attention.ops import (
    apply_rope,
    attend,
    attend_gathered,
    attention_probs,
    causal_mask,
    repeat_kv,
    sdpa_masked,
    topk_mask,
)
from topocl.config import ModelConfig
from topocl.registry import ATTENTION

BRANCHES = ("cmp", "slc", "win")


def n_cmp_blocks(t: int, block: int, stride: int) -> int:
    return 0 if t < block else (t - block) // stride + 1


def cmp_visible(t: int, block: int, stride: int, device=None) -> Tensor:
    """bool [T, N]: compression block i (tokens i·d .. i·d+l−1) is visible to query t iff i·d + l − 1 ≤ t."""
    ends = torch.arange(n_cmp_blocks(t, block, stride), device=device) * stride + block - 1  # [N]
    return ends[None, :] <= torch.arange(t, device=device)[:, None]


def overlap_matrix(t: int, block: int, stride: int, sel_block: int, device=None) -> Tensor:
    """float [N, M]: tokens shared by compression block i and selection block j, divided by l (Eq. 9)."""
    n, m = n_cmp_blocks(t, block, stride), -(-t // sel_block)
    cs = torch.arange(n, device=device)[:, None] * stride  # [N, 1] first token of cmp block i
    ss = torch.arange(m, device=device)[None, :] * sel_block  # [1, M] first token of sel block j
    lo, hi = torch.maximum(cs, ss), torch.minimum(cs + block, ss + sel_block)
    return (hi - lo).clamp(min=0).float() / block


def select_blocks(p_sel: Tensor, sel_block: int, n_sel: int, n_init: int, n_local: int) -> Tensor:
    """bool [..., T, M]: selected blocks per query from selection scores p_sel [..., T, M].
    Block j is a candidate for query t iff j·l' ≤ t; blocks 0..n_init−1 and the n_local blocks ending at the
    query's own block are forced; the rest of the n_sel budget goes to the highest scores."""
    t, m = p_sel.shape[-2], p_sel.shape[-1]
    pos = torch.arange(t, device=p_sel.device)[:, None]  # [T, 1]
    blk = torch.arange(m, device=p_sel.device)[None, :]  # [1, M]
    cand = blk * sel_block <= pos  # [T, M]
    own = pos // sel_block  # the block holding the query
    forced = cand & ((blk < n_init) | ((own - blk >= 0) & (own - blk < n_local)))
    score = p_sel.masked_fill(forced, float("inf"))  # forced blocks outrank every score
    return topk_mask(score, n_sel, cand)


def _gathered_chunk(q: Tensor, kb: Tensor, vb: Tensor, blk: Tensor, valid: Tensor, t0: int, sel_block: int,
                    scale: float) -> Tensor:
    """Queries t0 .. t0+Tc−1 against their selected blocks. q [B, H, Tc, D], kb/vb [B, Hk, M, L'*D] (keys in
    blocks), blk/valid [B, Hk, Tc, n] -> [B, H, Tc, D]."""
    b, hk, tc, n = blk.shape
    d, m = q.shape[-1], kb.shape[2]
    # row numbers in kb flattened to [B*Hk*M, L'*D]; index_select copies whole blocks (row-wise backward)
    flat = (blk + torch.arange(b * hk, device=blk.device).view(b, hk, 1, 1) * m).reshape(-1)  # [B*Hk*Tc*n]
    kg = kb.reshape(b * hk * m, -1).index_select(0, flat).view(b, hk, tc, n * sel_block, d)  # [B, Hk, Tc, n*L', D]
    vg = vb.reshape(b * hk * m, -1).index_select(0, flat).view(b, hk, tc, n * sel_block, d)
    pos = (blk[..., None] * sel_block + torch.arange(sel_block, device=q.device)).flatten(-2)  # [B, Hk, Tc, n*L']
    mask = valid.repeat_interleave(sel_block, dim=-1) & (pos <= torch.arange(t0, t0 + tc, device=q.device)[:, None])
    o = attend_gathered(q.reshape(b, hk, -1, tc, d), kg, vg, mask[:, :, None], scale)  # [B, Hk, G, Tc, D]
    return o.reshape(b, -1, tc, d)


def selected_gather(q: Tensor, k: Tensor, v: Tensor, sel: Tensor, sel_block: int, n_sel: int, scale: float,
                    chunk: int = 512) -> tuple[Tensor, Tensor, Tensor]:
    """Selected branch by gathering the chosen blocks (the fast path; equals the mask path).
    q [B, H, T, D], k/v [B, Hk, T, D], sel bool [B, Hk, T, M] -> (o [B, H, T, D], block index [B, Hk, T, n],
    valid [B, Hk, T, n]). Queries go in chunks of `chunk`; when T > chunk each chunk is checkpointed (its
    gathered K/V are recomputed in backward), so memory is O(chunk·n·l'·D), never O(T²)."""
    b, hk, t, m = sel.shape
    d, n = q.shape[-1], min(n_sel, m)
    pick = sel.to(q.dtype).topk(n, dim=-1)  # the selected blocks first (value 1), filler (value 0) masked below
    blk, valid = pick.indices, pick.values > 0  # [B, Hk, T, n]
    kb = F.pad(k, (0, 0, 0, m * sel_block - t)).reshape(b, hk, m, sel_block * d)  # [B, Hk, M, L'*D]
    vb = F.pad(v, (0, 0, 0, m * sel_block - t)).reshape(b, hk, m, sel_block * d)
    recompute = t > chunk and torch.is_grad_enabled()
    outs = []
    for t0 in range(0, t, chunk):
        args = (q[:, :, t0:t0 + chunk], kb, vb, blk[:, :, t0:t0 + chunk], valid[:, :, t0:t0 + chunk], t0, sel_block,
                scale)
        outs.append(checkpoint(_gathered_chunk, *args, use_reentrant=False) if recompute else _gathered_chunk(*args))
    return torch.cat(outs, dim=2), blk, valid


def window_band(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float) -> Tensor:
    """Sliding-window branch over the w most recent keys by unfolding K/V (the fast path; equals the mask path).
    q [B, H, T, D], k/v [B, Hk, T, D] -> [B, H, T, D]. Memory O(T·w·D)."""
    b, hk, t, d = k.shape
    g, w = q.shape[1] // hk, min(window, t)
    kw = F.pad(k, (0, 0, w - 1, 0)).unfold(2, w, 1)  # [B, Hk, T, D, w]: keys t-w+1 .. t
    vw = F.pad(v, (0, 0, w - 1, 0)).unfold(2, w, 1)  # [B, Hk, T, D, w]
    pos = torch.arange(t, device=q.device)[:, None] - (w - 1) + torch.arange(w, device=q.device)  # [T, w]
    o = attend_gathered(q.view(b, hk, g, t, d), kw.transpose(-1, -2), vw.transpose(-1, -2), pos >= 0, scale)
    return o.reshape(b, hk * g, t, d)  # [B, H, T, D]


def branches_block(q: Tensor, ks: Tensor, vs: Tensor, kw: Tensor, vw: Tensor, sel: Tensor, sel_block: int,
                   window: int, scale: float, block: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """Selected and window branches per block of queries [t0, t1), each over only the keys it can see (selected:
    [0, t1), window: [t0 − w + 1, t1)), through the fused SDPA kernel on bool masks: no [B, H, T, S] tensor is
    built or kept for backward. Equals the mask path. q [B, H, T, D], ks/vs/kw/vw [B, Hk, T, D] (GQA: query
    head h reads KV head h // G), sel bool [B, Hk, T, M] -> (o_slc, o_win [B, H, T, D], fine tokens seen:
    |selected ∪ window| summed over rows and KV groups)."""
    b, h, t, _ = q.shape
    hk = ks.shape[1]
    g = h // hk
    ks, vs, kw, vw = (repeat_kv(z, g) for z in (ks, vs, kw, vw))  # [B, H, T, D]
    o_slc, o_win, seen = [], [], 0
    for t0 in range(0, t, block):
        t1 = min(t, t0 + block)
        vis = causal_mask(t1 - t0, t1, device=q.device)  # [Tc, S1]: key s visible to query t0+i iff s <= t0+i
        tok = sel[:, :, t0:t1].repeat_interleave(sel_block, dim=-1)[..., :t1] & vis  # [B, Hk, Tc, S1]
        tok_h = tok[:, :, None].expand(b, hk, g, t1 - t0, t1).reshape(b, h, t1 - t0, t1)  # [B, H, Tc, S1]
        o_slc.append(sdpa_masked(q[:, :, t0:t1], ks[:, :, :t1], vs[:, :, :t1], tok_h, scale))
        w0 = max(0, t0 - window + 1)  # first key any query of the block can see in its window
        band = vis[:, w0:] & ~causal_mask(t1 - t0, t1, device=q.device).tril(t0 - window)[:, w0:]  # 0 <= t-s < w
        o_win.append(sdpa_masked(q[:, :, t0:t1], kw[:, :, w0:t1], vw[:, :, w0:t1], band, scale))
        with torch.no_grad():
            seen = seen + (tok[..., w0:] | band).sum() + tok[..., :w0].sum()
    return torch.cat(o_slc, dim=2), torch.cat(o_win, dim=2), seen


def fine_tokens_seen(blk: Tensor, valid: Tensor, sel_block: int, window: int) -> Tensor:
    """Per query and KV group, |selected tokens ∪ window| from block indices [B, Hk, T, n] (no [T, T] mask)."""
    t = blk.shape[2]
    pos = torch.arange(t, device=blk.device)[:, None]  # [T, 1]
    lo, hi = blk * sel_block, blk * sel_block + sel_block - 1  # [B, Hk, T, n] first / last token of each block
    in_sel = (torch.minimum(hi, pos) - lo + 1).clamp(min=0) * valid  # causal tokens of each selected block
    in_both = (torch.minimum(hi, pos) - torch.maximum(lo, pos - window + 1) + 1).clamp(min=0) * valid
    return in_sel.sum(-1) + (pos[:, 0] + 1).clamp(max=window) - in_both.sum(-1)  # [B, Hk, T]


class _KV(nn.Module):
    """One branch's own K/V projections and its gate row g^c = sigmoid(W_g^c x) (one gate per query head)."""

    def __init__(self, d_model: int, n_kv: int, d: int, n_q: int) -> None:
        super().__init__()
        self.hk, self.d = n_kv, d
        self.k_proj = nn.Linear(d_model, n_kv * d, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv * d, bias=False)
        self.gate = nn.Linear(d_model, n_q)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, t, _ = x.shape
        k = self.k_proj(x).view(b, t, self.hk, self.d).transpose(1, 2)  # [B, Hk, T, D]
        v = self.v_proj(x).view(b, t, self.hk, self.d).transpose(1, 2)  # [B, Hk, T, D]
        return k, v


class Compressor(nn.Module):
    """φ: a block of l keys (+ intra-block position embedding) -> one key. mlp: l·D -> l·D -> D (ReLU),
    shared by the KV heads; mean: mean pooling (no weights but the PE)."""

    def __init__(self, block: int, d: int, phi: str) -> None:
        super().__init__()
        self.block, self.phi = block, phi
        self.pe = nn.Parameter(torch.zeros(block, d))
        if phi == "mlp":
            self.mlp = nn.Sequential(nn.Linear(block * d, block * d), nn.ReLU(), nn.Linear(block * d, d))
        elif phi != "mean":
            raise ValueError(f"nsa.phi={phi!r}: use mlp | mean")

    def reset_parameters(self) -> None:
        """PE 0; mlp: He init (ReLU layer std sqrt(2/fan_in), output std sqrt(1/fan_in)), zero biases."""
        nn.init.zeros_(self.pe)
        if self.phi == "mlp":
            for lin, gain in ((self.mlp[0], 2.0), (self.mlp[2], 1.0)):
                nn.init.normal_(lin.weight, std=(gain / lin.in_features) ** 0.5)
                nn.init.zeros_(lin.bias)

    def forward(self, k: Tensor, stride: int) -> Tensor:
        """k [B, Hk, T, D] -> compressed [B, Hk, N, D]."""
        blocks = k.unfold(2, self.block, stride).transpose(-1, -2)  # [B, Hk, N, L, D]
        blocks = blocks + self.pe  # intra-block position
        if self.phi == "mean":
            return blocks.mean(-2)
        return self.mlp(blocks.flatten(-2))  # [B, Hk, N, D]


def _split_legacy_gate(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints from before the split held one `gate` Linear(C, 3·H) in (branch, head) row order: load its
    rows into `cmp.gate`, `slc.gate`, `win.gate` (the same map, one row block per branch)."""
    for name in ("weight", "bias"):
        w = state_dict.pop(f"{prefix}gate.{name}", None)
        if w is not None:
            for branch, rows in zip(BRANCHES, w.chunk(3)):
                state_dict[f"{prefix}{branch}.gate.{name}"] = rows


@ATTENTION.register("nsa")
class NSAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        c = cfg.nsa
        if cfg.n_head % cfg.n_kv_head:
            raise ValueError(f"n_head={cfg.n_head} must be a multiple of n_kv_head={cfg.n_kv_head}")
        if min(c.cmp_block, c.cmp_stride, c.sel_block, c.window) < 1:
            raise ValueError(f"nsa sizes must be >= 1, got cmp_block={c.cmp_block}, cmp_stride={c.cmp_stride}, "
                             f"sel_block={c.sel_block}, window={c.window}")
        if c.impl not in flex.IMPLS:
            raise ValueError(f"nsa.impl={c.impl!r}: use mask (reference) | block | gather | flex | auto")
        if c.n_sel < max(1, c.n_init + c.n_local):
            raise ValueError(f"nsa.n_sel={c.n_sel} must be >= 1 and cover the {c.n_init + c.n_local} forced blocks")
        self.c, self.h, self.hk, self.d = c, cfg.n_head, cfg.n_kv_head, cfg.hd
        self.q_proj = nn.Linear(cfg.d_model, self.h * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, cfg.d_model, bias=False)
        self.cmp = _KV(cfg.d_model, self.hk, self.d, self.h)
        self.cmp_phi_k = Compressor(c.cmp_block, self.d, c.phi)
        self.cmp_phi_v = Compressor(c.cmp_block, self.d, c.phi)
        self.slc = _KV(cfg.d_model, self.hk, self.d, self.h)
        self.win = _KV(cfg.d_model, self.hk, self.d, self.h)
        self.fast_on = True
        self.force_gates: tuple[float, float, float] | None = None  # tests: inject (g_cmp, g_slc, g_win)
        self.gather_chunk = 512  # queries per checkpointed chunk of the gather path
        self.block = 128  # queries per block of the block path
        self.capture: list[dict] | None = None  # a list = record selections (topocl/analysis/routing.py)
        self.register_load_state_dict_pre_hook(_split_legacy_gate)

    def reset_extra_parameters(self) -> None:
        bias = (-2.0, -2.0, 2.0) if self.c.gate_init == "window" else (0.0, 0.0, 0.0)
        for kv, b in zip((self.cmp, self.slc, self.win), bias):
            nn.init.zeros_(kv.gate.weight)
            nn.init.constant_(kv.gate.bias, b)
        self.cmp_phi_k.reset_parameters()
        self.cmp_phi_v.reset_parameters()

    def param_role(self, name: str) -> str:
        first = name.split(".")[0]
        if first.startswith("cmp"):
            return "attn.cmp"
        return {"slc": "attn.slc", "win": "attn.win", "q_proj": "attn.q", "o_proj": "attn.o"}[first]

    def set_fast_pathway(self, enabled: bool) -> None:
        self.fast_on = enabled

    @torch.no_grad()
    def select(self, q_raw: Tensor, kc: Tensor | None, t: int) -> Tensor:
        """bool [B, Hk, T, M]: selection blocks per query and KV group (Eq. 8-11), without gradient.
        q_raw [B, H, T, D] un-rotated queries, kc [B, Hk, N, D] compressed keys (None when N = 0)."""
        c, b = self.c, q_raw.shape[0]
        m = -(-t // c.sel_block)
        if kc is None:  # no complete compression block yet: only the forced blocks
            p_sel = torch.zeros(b, self.hk, t, m, device=q_raw.device)
        else:
            n, g = kc.shape[2], self.h // self.hk
            s = (q_raw @ repeat_kv(kc, g).transpose(-1, -2)) / math.sqrt(self.d)  # [B, H, T, N]
            vis_c = cmp_visible(t, c.cmp_block, c.cmp_stride, q_raw.device)  # [T, N]
            p = torch.softmax(s.masked_fill(~vis_c, float("-inf")), -1).nan_to_num(0.0)  # Eq. 8
            p = p.view(b, self.hk, g, t, n).sum(2)  # [B, Hk, T, N] summed over the GQA group (Eq. 10)
            ov = overlap_matrix(t, c.cmp_block, c.cmp_stride, c.sel_block, q_raw.device).to(p.dtype)  # [N, M]
            p_sel = p @ ov  # [B, Hk, T, M] overlap-weighted onto selection blocks (Eq. 9)
        return select_blocks(p_sel, c.sel_block, c.n_sel, c.n_init, c.n_local)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        b, t, _ = x.shape
        c, g = self.c, self.h // self.hk
        scale = 1.0 / math.sqrt(self.d)
        q_raw = self.q_proj(x).view(b, t, self.h, self.d).transpose(1, 2)  # [B, H, T, D]
        q = apply_rope(q_raw, cos, sin)

        # compressed branch (un-rotated q and k)
        k_c, v_c = self.cmp(x)  # [B, Hk, T, D]
        if n_cmp_blocks(t, c.cmp_block, c.cmp_stride) > 0:
            kc = self.cmp_phi_k(k_c, c.cmp_stride)  # [B, Hk, N, D]
            vc = repeat_kv(self.cmp_phi_v(v_c, c.cmp_stride), g)  # [B, H, N, D]
            vis_c = cmp_visible(t, c.cmp_block, c.cmp_stride, x.device)  # [T, N]
            o_cmp = attend(q_raw, repeat_kv(kc, g), vc, vis_c, scale)  # [B, H, T, D]; rows with no block -> 0
        else:
            kc, o_cmp = None, torch.zeros_like(q)
        sel = self.select(q_raw, kc, t)  # [B, Hk, T, M]
        k_s, v_s = self.slc(x)  # selected branch
        k_s = apply_rope(k_s, cos, sin)
        k_w, v_w = self.win(x)  # sliding window
        k_w = apply_rope(k_w, cos, sin)
        impl = flex.resolve_impl(c.impl, x.device, "gather" if t >= 4096 else "block")
        if impl == "block":
            o_slc, o_win, seen = branches_block(q, k_s, v_s, k_w, v_w, sel, c.sel_block, c.window, scale, self.block)
        elif impl == "gather":
            o_slc, blk, valid = selected_gather(q, k_s, v_s, sel, c.sel_block, c.n_sel, scale, self.gather_chunk)
            o_win = window_band(q, k_w, v_w, c.window, scale)
            with torch.no_grad():
                seen = fine_tokens_seen(blk, valid, c.sel_block, c.window).sum()
        elif impl == "flex":  # flex_attention block masks (topocl/attention/flex.py)
            o_slc = flex.selected(q, k_s, v_s, sel, c.sel_block, scale)  # [B, H, T, D]
            o_win = flex.window(q, k_w, v_w, c.window, scale)
            with torch.no_grad():
                causal = causal_mask(t, device=x.device)  # [T, S]
                tok = sel.repeat_interleave(c.sel_block, dim=-1)[..., :t] & causal  # [B, Hk, T, S]
                seen = (tok | (causal & ~causal.tril(-c.window))).sum()
        else:  # reference: masked softmax over [B, H, T, S]
            causal = causal_mask(t, device=x.device)  # [T, S]
            tok = sel.repeat_interleave(c.sel_block, dim=-1)[..., :t] & causal  # [B, Hk, T, S]
            o_slc = attend(q, repeat_kv(k_s, g), repeat_kv(v_s, g), repeat_kv(tok, g), scale)  # [B, H, T, D]
            band = causal & ~causal_mask(t, device=x.device).tril(-c.window)  # 0 <= t - s < w
            o_win = attend(q, repeat_kv(k_w, g), repeat_kv(v_w, g), band, scale)
            seen = (tok | band).sum()

        if self.force_gates is not None:
            gates = torch.tensor(self.force_gates, dtype=x.dtype, device=x.device).view(1, 3, 1, 1, 1)
        else:
            w = torch.cat([self.cmp.gate.weight, self.slc.gate.weight, self.win.gate.weight])  # [3*H, C] one matmul
            bias = torch.cat([self.cmp.gate.bias, self.slc.gate.bias, self.win.gate.bias])
            gates = torch.sigmoid(F.linear(x, w, bias)).view(b, t, 3, self.h)  # [B, T, 3, H]
            gates = gates.permute(0, 2, 3, 1)[..., None]  # [B, 3, H, T, 1]
        if not self.fast_on:
            gates = gates * torch.tensor([1.0, 0.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1, 1)
        y = gates[:, 0] * o_cmp + gates[:, 1] * o_slc + gates[:, 2] * o_win  # [B, H, T, D]
        if self.capture is not None:  # opt-in: selected blocks [B, Hk, T, M], gates [B, 3, H, T], slc probs
            with torch.no_grad():
                tok = sel.repeat_interleave(c.sel_block, dim=-1)[..., :t] & causal_mask(t, device=x.device)
                probs = attention_probs(q, repeat_kv(k_s, g), repeat_kv(tok, g), scale)  # [B, H, T, S]
                self.capture.append({"select": sel.cpu(), "probs": probs.cpu(),
                                     "gates": gates.float().expand(b, 3, self.h, t, 1)[..., 0].cpu()})
        y = y.transpose(1, 2).reshape(b, t, self.h * self.d)  # [B, T, H*D]
        with torch.no_grad():  # fine tokens (selected ∪ window) per KV group / causal keys, summed over rows
            aux = {"stat.nsa_key_frac": seen / (t * (t + 1) // 2 * b * self.hk)}
            gm = gates.float().expand(b, 3, self.h, t, 1).mean(dim=(0, 2, 3, 4))
            aux.update({f"stat.nsa_gate_{name}": gm[i] for i, name in enumerate(BRANCHES)})
        return self.o_proj(y), aux
