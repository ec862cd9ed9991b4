"""`split`: the head-split surgery topology, trained from scratch.

Group A heads attend densely (the slow pathway, role `attn.dense_heads`); group B heads keep only the
top-k of their own causal scores per query (the fast pathway, role `attn.sparse_heads`). Groups are
whole KV groups with their query heads (GQA-aware), and each group has its own q/k/v/o parameters, so
freezing group A leaves it no gradient and no optimizer state.

    y = o_A(softmax_causal(q_A k_Aᵀ/√D) v_A) + o_B(softmax(mask_topk(q_B k_Bᵀ/√D)) v_B)

Budget per query t (group B): `topk` keys if topk > 0, else max(1, round(topk_frac · (t + 1))), never more
than the t + 1 causal keys. Selection uses `topocl.attention.ops.topk_mask` on detached scores (the op
head-split surgery reuses on Hugging Face models); the reference path (`impl: mask`) is the full masked
softmax; `block` (the CPU default of `auto`) takes blocks of 128 queries over only the keys they can see, scores
and selects there and runs the fused SDPA kernel on the kept keys (same outputs and gradients, tests).

At full budget (topk_frac >= 1 with topk 0) group B is dense too, computed by SDPA: the model is then a dense
model whose heads are partitioned into the two groups. `split_from_dense` builds exactly that from a dense
model (same weights, same function), so a role policy on the head groups (ACFT) applies to a dense model: the
2 x 2 control {group B dense, group B top-k} x {vanilla, ACFT} keeps one head partition in all four cells.

Shape legend: B batch, T positions, C d_model, Ha/Hb query heads of group A/B, Ka/Kb their KV heads, D head dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from topocl.attention import flex
from topocl.attention.ops import (
    apply_rope,
    attend,
    attention_probs,
    causal_mask,
    repeat_kv,
    sdpa_causal,
    sdpa_masked,
    topk_mask,
)
from topocl.config import ModelConfig
from topocl.registry import ATTENTION


def split_groups(n_kv_head: int, sparse_kv_groups: int) -> tuple[int, int]:
    """(dense KV groups, sparse KV groups); -1 = half (rounded down, at least 1)."""
    kb = max(1, n_kv_head // 2) if sparse_kv_groups < 0 else sparse_kv_groups
    if not 1 <= kb < n_kv_head:
        raise ValueError(f"split.sparse_kv_groups={sparse_kv_groups} must leave both groups non-empty "
                         f"(1..{n_kv_head - 1} of n_kv_head={n_kv_head})")
    return n_kv_head - kb, kb


def full_budget(topk: int, frac: float) -> bool:
    """Group B keeps every causal key at every length."""
    return topk == 0 and frac >= 1.0


def row_budget(t: int, topk: int, frac: float, device: torch.device | None = None) -> Tensor:
    """Keys kept per query row, LongTensor [T, 1]."""
    prefix = torch.arange(1, t + 1, device=device)[:, None]  # causal keys of row t: t + 1
    k = torch.full_like(prefix, topk) if topk > 0 else (frac * prefix).round().long().clamp(min=1)
    return torch.minimum(k, prefix)


def sparse_block(q: Tensor, k: Tensor, v: Tensor, budget: Tensor, scale: float,
                 block: int = 128) -> tuple[Tensor, Tensor]:
    """Group B per block of queries [t0, t1) over only the keys [0, t1) it can see: no-grad scores, the same
    `topk_mask`, then the fused SDPA kernel on the kept keys (no [B, Hb, T, S] probabilities kept for backward).
    Equals the mask path. q/k/v [B, Hb, T, D], budget [T, 1] -> (y [B, Hb, T, D], keep bool [B, Hb, T, T])."""
    b, h, t, _ = q.shape
    ys, keep = [], torch.zeros(b, h, t, t, dtype=torch.bool, device=q.device)
    for t0 in range(0, t, block):
        t1 = min(t, t0 + block)
        vis = causal_mask(t1 - t0, t1, device=q.device)  # [Tc, S1]: key s visible to query t0+i iff s <= t0+i
        with torch.no_grad():
            kc = topk_mask(q[:, :, t0:t1] @ k[:, :, :t1].transpose(-1, -2), budget[t0:t1], vis)  # [B, Hb, Tc, S1]
        keep[:, :, t0:t1, :t1] = kc
        ys.append(sdpa_masked(q[:, :, t0:t1], k[:, :, :t1], v[:, :, :t1], kc, scale))
    return torch.cat(ys, dim=2), keep


class _Group(nn.Module):
    def __init__(self, d_model: int, n_q: int, n_kv: int, d: int) -> None:
        super().__init__()
        self.hq, self.hk, self.d = n_q, n_kv, d
        self.q_proj = nn.Linear(d_model, n_q * d, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv * d, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv * d, bias=False)
        self.o_proj = nn.Linear(n_q * d, d_model, bias=False)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.hq, self.d).transpose(1, 2)  # [B, Hq, T, D]
        k = self.k_proj(x).view(b, t, self.hk, self.d).transpose(1, 2)  # [B, Hk, T, D]
        v = self.v_proj(x).view(b, t, self.hk, self.d).transpose(1, 2)  # [B, Hk, T, D]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, y: Tensor) -> Tensor:
        b, _, t, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.hq * self.d))  # [B, T, C]


@ATTENTION.register("split")
class SplitAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        if cfg.n_head % cfg.n_kv_head:
            raise ValueError(f"n_head={cfg.n_head} must be a multiple of n_kv_head={cfg.n_kv_head}")
        g = cfg.n_head // cfg.n_kv_head
        ka, kb = split_groups(cfg.n_kv_head, cfg.split.sparse_kv_groups)
        self.dense = _Group(cfg.d_model, ka * g, ka, cfg.hd)  # group A
        self.sparse = _Group(cfg.d_model, kb * g, kb, cfg.hd)  # group B
        self.topk, self.frac = cfg.split.topk, cfg.split.topk_frac
        if cfg.split.impl not in ("mask", "block", "flex", "auto"):
            raise ValueError(f"split.impl={cfg.split.impl!r}: use mask (reference) | block | flex | auto (flex on "
                             "CUDA, else block)")
        self.impl = cfg.split.impl
        self.block = 128  # queries per block of the block path
        self.fast_on = True
        self.capture: list[dict] | None = None  # a list = record selections (topocl/analysis/routing.py)

    def param_role(self, name: str) -> str:
        return "attn.dense_heads" if name.startswith("dense.") else "attn.sparse_heads"

    def set_fast_pathway(self, enabled: bool) -> None:
        self.fast_on = enabled

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        t = x.shape[1]
        qa, ka, va = self.dense.qkv(x, cos, sin)
        y = self.dense.out(sdpa_causal(qa, ka, va))
        qb, kb, vb = self.sparse.qkv(x, cos, sin)
        if full_budget(self.topk, self.frac) and self.capture is None:  # group B is dense: SDPA, no [T, T] mask
            if self.fast_on:
                y = y + self.sparse.out(sdpa_causal(qb, kb, vb))
            return y, {"stat.split_key_frac": x.new_ones(())}
        g = qb.shape[1] // kb.shape[1]
        kb, vb = repeat_kv(kb, g), repeat_kv(vb, g)  # [B, Hb, T, D]
        scale = 1.0 / math.sqrt(qb.shape[-1])
        budget = row_budget(t, self.topk, self.frac, x.device)  # [T, 1]
        impl = flex.resolve_impl(self.impl, x.device)
        if impl == "block":
            yb, keep = sparse_block(qb, kb, vb, budget, scale, self.block)
        else:
            visible = causal_mask(t, device=x.device)  # [T, T]
            with torch.no_grad():
                scores = qb @ kb.transpose(-1, -2)  # [B, Hb, T, T], selection only (no gradient through indices)
                keep = topk_mask(scores, budget, visible)
            attn = flex.masked if impl == "flex" else attend
            yb = attn(qb, kb, vb, keep, scale)  # [B, Hb, T, D]
        if self.fast_on:
            y = y + self.sparse.out(yb)
        if self.capture is not None:  # opt-in: the sparse heads' kept keys [B, Hb, T, S] and probabilities
            self.capture.append({"select": keep.cpu(), "probs": attention_probs(qb, kb, keep, scale).detach().cpu()})
        frac = keep.float().sum() / (keep.shape[0] * keep.shape[1] * t * (t + 1) / 2)  # kept / causal pairs
        return y, {"stat.split_key_frac": frac.detach()}
