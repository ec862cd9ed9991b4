"""flex_attention fast paths (torch.nn.attention.flex_attention block masks) for the sparse branches.

    window(q, k, v, w, scale)                 NSA sliding window: key s visible to query t iff 0 <= t - s < w
    selected(q, k, v, sel, sel_block, scale)  NSA selected blocks: causal keys of the blocks in sel[b, h // G, t]
    masked(q, k, v, keep, scale)              any per-(head, query, key) bool mask, e.g. split's top-k keys

q [B, H, T, D]; k, v [B, Hk, T, D] (GQA: query head h reads KV head h // G); returns [B, H, T, D]. They compute
exactly what `ops.attend` computes with the same mask (tests: forward on CPU; backward on CPU through flex's
math fallback, and on CUDA against the compiled kernel). `impl: auto` resolves to flex on CUDA and to the kind's
block / gather path elsewhere: on CPU, torch 2.13's flex_attention runs forward only (no backward), unfused.

On CUDA the call goes through `torch.compile(flex_attention)` (the fused Triton kernel; without compile flex is
a slow dense fallback). Block masks of the data-dependent masks (selected blocks, top-k) are rebuilt every
forward from the bool mask (create_block_mask evaluates it at [B, H, T, S]); only the window's is cached.
Rows with no visible key return 0, as in the reference.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - torch without flex attention
    flex_attention = None

IMPLS = ("mask", "block", "gather", "flex", "auto")


def flex_available() -> bool:
    return flex_attention is not None


def resolve_impl(impl: str, device: torch.device, other: str = "block") -> str:
    """`auto` -> flex on CUDA (when this torch has it), else `other` (the kind's faster CPU path for the size);
    other names unchanged."""
    if impl != "auto":
        return impl
    return "flex" if device.type == "cuda" and flex_available() else other


@functools.cache
def _compiled():
    return torch.compile(flex_attention, dynamic=False)


def _run(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, scale: float) -> Tensor:
    if flex_attention is None:
        raise RuntimeError("impl=flex needs torch.nn.attention.flex_attention (torch >= 2.5)")
    fn = _compiled() if q.device.type == "cuda" else flex_attention
    gqa = q.shape[1] != k.shape[1]
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


@functools.lru_cache(maxsize=16)
def _window_mask(t: int, w: int, device: torch.device) -> BlockMask:
    def mask_mod(b, h, qi, ki):
        return (ki <= qi) & (qi - ki < w)

    return create_block_mask(mask_mod, None, None, t, t, device=device)


def window(q: Tensor, k: Tensor, v: Tensor, w: int, scale: float) -> Tensor:
    """Sliding-window causal attention over the w most recent keys (the query's own included)."""
    return _run(q, k, v, _window_mask(q.shape[2], w, q.device), scale)


def selected(q: Tensor, k: Tensor, v: Tensor, sel: Tensor, sel_block: int, scale: float) -> Tensor:
    """Causal attention restricted to the selected blocks. sel bool [B, Hk, T, M] (M = ceil(T / sel_block))."""
    b, h, t, _ = q.shape
    g = h // k.shape[1]

    def mask_mod(bi, hi, qi, ki):
        return (ki <= qi) & sel[bi, hi // g, qi, ki // sel_block]

    bm = create_block_mask(mask_mod, b, h, t, t, device=q.device)
    return _run(q, k, v, bm, scale)


def masked(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, scale: float) -> Tensor:
    """Attention over the keys where keep [B, H, T, S] is True (keep may broadcast over B or H with size 1)."""
    b, h, t, _ = q.shape
    bk, hk = keep.shape[0], keep.shape[1]

    def mask_mod(bi, hi, qi, ki):
        return keep[bi if bk > 1 else 0, hi if hk > 1 else 0, qi, ki]

    bm = create_block_mask(mask_mod, b if bk > 1 else None, h if hk > 1 else None, t, k.shape[2], device=q.device)
    return _run(q, k, v, bm, scale)
