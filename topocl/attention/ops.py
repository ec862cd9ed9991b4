"""Shared attention ops: RoPE, GQA expansion, causal masks, top-k masking, reference softmax attention.

Shape legend
    B  batch            T  query positions       S  key positions (S = T here, causal)
    H  query heads      Hk key/value heads       G  = H // Hk, query heads per KV group
    D  head dim
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def rope_cache(seq_len: int, dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin of shape [seq_len, dim // 2] (NeoX / half-split layout)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))  # [D/2]
    t = torch.arange(seq_len, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)  # [T, D/2]
    return freqs.cos().float(), freqs.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the last dim of x [..., T, D] by (cos, sin) [T, D/2], half-split (non-interleaved) layout."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """[B, Hk, S, D] -> [B, Hk*G, S, D]: each KV head serves G consecutive query heads."""
    if groups == 1:
        return x
    b, hk, s, d = x.shape
    return x[:, :, None].expand(b, hk, groups, s, d).reshape(b, hk * groups, s, d)


def causal_mask(t: int, s: int | None = None, device: torch.device | None = None) -> Tensor:
    """Bool [T, S], True where key s is visible to query t (s <= t + S - T)."""
    s = t if s is None else s
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)


def topk_mask(scores: Tensor, k: int | Tensor, visible: Tensor) -> Tensor:
    """Keep the top-k visible keys of each query row.

    scores [..., T, S] (any real scores), visible bool broadcastable to [..., T, S], k an int or an
    int tensor broadcastable to [..., T, 1] (per-row budgets). Returns bool [..., T, S]: True at the
    kept keys, always a subset of `visible` (rows with fewer than k visible keys keep them all; the
    causal mask is re-applied after the scatter, so padding picks never leak the future).
    Ties at the k-th score go to the most recent keys, so the kept set depends only on the row's visible
    scores: not on S, on later positions or on the device's topk order (ReLU index scores tie often;
    with torch.topk's order a query's picks changed with the sequence length).
    This is the op the `split` kind and head-split surgery share.
    """
    s = scores.shape[-1]
    if isinstance(k, int) and k >= s:  # full budget: every visible key, no sort needed
        return torch.broadcast_to(visible, scores.shape).clone()
    kmax = int(k if isinstance(k, int) else k.max())
    kmax = max(1, min(kmax, s))
    kk = torch.as_tensor(k, device=scores.device).clamp(max=kmax)
    masked = scores.masked_fill(~visible, float("-inf"))
    top = masked.topk(kmax, dim=-1).values  # [..., T, kmax], descending
    kth = top.gather(-1, (kk - 1).clamp(min=0).expand(*top.shape[:-1], 1))  # [..., T, 1] the k-th score
    above = masked > kth  # strictly better than the k-th: always kept (fewer than k of them)
    tie = (masked == kth) & visible  # [..., T, S] candidates for the places left
    left = kk - above.sum(-1, keepdim=True)  # [..., T, 1]
    if bool((tie.sum(-1, keepdim=True) > left).any()):  # more tied keys than places in some row
        rank = tie.flip(-1).cumsum(-1).flip(-1)  # 1 = the most recent tied key, 2 = the next, ...
        tie = tie & (rank <= left)
    return (above | tie) & visible & (kk > 0)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None) -> Tensor:
    """Reference masked softmax attention. q [B,H,T,D], k/v [B,H,S,D], mask bool broadcastable to
    [B,H,T,S] (True = visible). Rows with no visible key return 0 (not NaN)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-1, -2)) * scale  # [B, H, T, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    acc = torch.promote_types(scores.dtype, torch.float32)  # softmax in fp32 (fp64 stays fp64)
    probs = torch.softmax(scores.to(acc), dim=-1).nan_to_num(0.0).to(q.dtype)  # all-masked rows -> 0
    return probs @ v  # [B, H, T, D]


def attention_probs(q: Tensor, k: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Masked softmax probabilities (what `attend` weights V with), fp32. q [B,H,T,D], k [B,H,S,D], mask bool
    broadcastable to [B,H,T,S] -> [B,H,T,S]; rows with no visible key are 0. Used by the opt-in routing
    capture (topocl/analysis/routing.py), never in a training forward."""
    scores = ((q @ k.transpose(-1, -2)) * scale).float().masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def attend_gathered(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Softmax attention where every query row has its own gathered keys (the gather fast paths).
    q [B, Hk, G, T, D] (query heads grouped by KV head), k/v [B, Hk, T, J, D] (J keys per row), mask bool
    broadcastable to [B, Hk, G, T, J] (True = visible) -> [B, Hk, G, T, D]. Rows with no visible key return 0."""
    scores = torch.einsum("bkgtd,bktjd->bkgtj", q, k) * scale  # [B, Hk, G, T, J]
    acc = torch.promote_types(scores.dtype, torch.float32)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")).to(acc), -1).nan_to_num(0.0).to(v.dtype)
    return torch.einsum("bkgtj,bktjd->bkgtd", probs, v)


def sdpa_masked(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """The fused kernel on a bool mask: what `attend` computes, without keeping [B, H, T, S] probabilities for
    backward. q [B, H, T, D], k/v [B, H, S, D], mask bool broadcastable to [B, H, T, S] (True = visible); every
    row needs a visible key (a fully masked row is NaN here, 0 in `attend`)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def sdpa_causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Dense causal attention with GQA. q [B,H,T,D], k/v [B,Hk,T,D] -> [B,H,T,D]."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
