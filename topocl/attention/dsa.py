"""`dsa`: DeepSeek Sparse Attention (V3.2) in a GQA model: a lightning indexer picks the top-k tokens per
query, shared by all routed heads; `shared_heads` query heads (whole KV groups) stay dense.

    I[t,s] = Σ_h w[t,h] · H_I^-½ · d_I^-½ · ReLU(q_I[t,h] · k_I[s])            (Eq. 1, DeepSeek's scales)
    keep   = TopK_s(I[t,:] + causal) ∧ causal                                   (causal mask re-applied after
                                                                                  the scatter: no future leak)
    y      = W_o^shared · [shared heads: causal softmax] + W_o^routed · [routed heads: softmax over keep]

The output projection is split by head group (`shared.o_proj`, `routed.o_proj`; one o_proj over the
concatenated heads is the same map), so every parameter serves one pathway: roles `attn.shared_heads`
(slow), `attn.routed_heads` and `attn.indexer` (fast). Older checkpoints' single `o_proj.weight` loads
into the two halves.

Indexer: q_I from x, k_I = LayerNorm(W_k x) (one key per token), w = W_w x; NeoX RoPE on the first
`index_rope_dim` dims of q_I and k_I; no Hadamard/FP8 (orthonormal, so the maths is unchanged). It reads
detached inputs and learns only from the KL to the detached attention distribution of the routed heads,
summed over heads and L1-normalised (Eq. 3 with `kl_support=dense`; Eq. 4 with `sparse`, where, as in
Megatron, each head is renormalised inside the selected set before summing). `phase=warmup` keeps the
attention dense while the indexer learns by the dense KL (DeepSeek's dense warm-up), `phase=sparse` switches
top-k on. The two-stage recipe is `warmup_steps: N` (`schedule()`, called by the pretraining loop before
each step): N warm-up steps, then `phase`; `warmup_trains: indexer` trains only the indexer during them
(DeepSeek-V3.2 retrofitting a trained dense model), `all` trains everything (the from-scratch recipe,
research note §4). Without a warm-up the indexer never learns about keys it did not select (Eq. 4).

Paths (`dsa.impl`): `mask` (reference) = masked softmax over [B, Hr, T, S], KL and stats on [B, T, S];
`block` = per block of 128 queries only the keys it can see, the routed heads through the fused SDPA kernel
on the kept-key mask, KL and stats from one no-grad score block; `gather` (sparse phase with the Eq. 4 KL
only) = per chunk of queries the routed heads attend over their gathered top-k keys and the KL is taken on
those keys, so nothing O(T²) is kept for backward (the indexer scores and the recall stat still touch every
causal key, without gradient); `auto` = gather from T = 2048 in the sparse phase, else block. Same outputs,
gradients and stats as `mask` (tests).

Stats: `dsa_key_frac` = kept / causal (query, key) pairs; `dsa_recall` = share of the attention's own
top-k keys (routed heads' probabilities summed over heads) that the indexer's top-k contains (in warm-up
too, where the indexer's picks are not used yet); `dsa_kl` = the KL before `kl_coeff`.

Shape legend: B batch, T queries, S keys (= T), C d_model, Hs/Hr shared/routed query heads, D head dim,
HI indexer heads, DI indexer dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from topocl.attention import ops
from topocl.attention.ops import (
    apply_rope,
    attend,
    causal_mask,
    repeat_kv,
    rope_cache,
    sdpa_causal,
    sdpa_masked,
    topk_mask,
)
from topocl.config import ModelConfig
from topocl.registry import ATTENTION

IMPLS = ("mask", "block", "gather", "auto")


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c = cfg.dsa
        if c.index_rope_dim % 2 or c.index_rope_dim > c.index_dim:
            raise ValueError(f"dsa.index_rope_dim={c.index_rope_dim} must be even and <= index_dim={c.index_dim}")
        self.h, self.d, self.rd = c.index_heads, c.index_dim, c.index_rope_dim
        self.q = nn.Linear(cfg.d_model, self.h * self.d, bias=False)
        self.k = nn.Linear(cfg.d_model, self.d, bias=False)
        self.k_norm = nn.LayerNorm(self.d)
        self.w = nn.Linear(cfg.d_model, self.h, bias=False)
        cos, sin = rope_cache(cfg.max_seq_len, max(self.rd, 2), cfg.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rope(self, x: Tensor) -> Tensor:
        if self.rd == 0:
            return x
        t = x.shape[-2]
        pe = apply_rope(x[..., : self.rd], self.cos[:t], self.sin[:t])  # RoPE part first ([pe ; nope])
        return torch.cat([pe, x[..., self.rd:]], dim=-1)

    def parts(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """From detached x [B, T, C]: q_I [B, HI, T, DI] and k_I [B, S, DI] (RoPE on the first dims), and the
        head weights w [B, T, HI] with DeepSeek's H_I^-½·d_I^-½ folded in."""
        b, t, _ = x.shape
        q = self._rope(self.q(x).view(b, t, self.h, self.d).transpose(1, 2))  # [B, HI, T, DI]
        k = self._rope(self.k_norm(self.k(x)))  # [B, S, DI]
        return q, k, self.w(x) * (self.h ** -0.5 * self.d ** -0.5)

    @staticmethod
    def scores(q: Tensor, k: Tensor, w: Tensor) -> Tensor:
        """I = Σ_h w[t,h] ReLU(q[t,h]·k[s]). k [B, S, DI] -> I [B, T, S]; k gathered per query [B, T, J, DI]
        -> I [B, T, J] at those keys only."""
        if k.dim() == 3:
            dots = torch.relu(q @ k[:, None].transpose(-1, -2))  # [B, HI, T, S]
            return torch.einsum("bhts,bth->bts", dots, w)
        dots = torch.relu(torch.einsum("bhtd,btjd->bhtj", q, k))  # [B, HI, T, J]
        return torch.einsum("bhtj,bth->btj", dots, w)

    def forward(self, x: Tensor) -> Tensor:
        """Index scores I [B, T, S] (before any mask) from detached x [B, T, C]."""
        return self.scores(*self.parts(x))


class _Heads(nn.Module):
    def __init__(self, d_model: int, n_q: int, n_kv: int, d: int) -> None:
        super().__init__()
        self.hq, self.hk, self.d = n_q, n_kv, d
        self.q_proj = nn.Linear(d_model, n_q * d, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv * d, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv * d, bias=False)
        self.o_proj = nn.Linear(n_q * d, d_model, bias=False)  # this group's columns of the output projection

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.hq, self.d).transpose(1, 2)  # [B, Hq, T, D]
        k = self.k_proj(x).view(b, t, self.hk, self.d).transpose(1, 2)  # [B, Hk, T, D]
        v = self.v_proj(x).view(b, t, self.hk, self.d).transpose(1, 2)  # [B, Hk, T, D]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, y: Tensor) -> Tensor:
        b, _, t, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.hq * self.d))  # [B, Hq, T, D] -> [B, T, C]


def _split_legacy_o_proj(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints from before the split held one `o_proj.weight` [C, H*D] over [shared ; routed] heads: load
    its columns into `shared.o_proj` and `routed.o_proj` (o_proj(cat(y_s, y_r)) = W_s y_s + W_r y_r)."""
    w = state_dict.pop(prefix + "o_proj.weight", None)
    if w is None:
        return
    hs = module.shared.hq * module.shared.d if module.shared is not None else 0
    if module.shared is not None:
        state_dict[prefix + "shared.o_proj.weight"] = w[:, :hs]
    state_dict[prefix + "routed.o_proj.weight"] = w[:, hs:]


def indexer_kl(scores: Tensor, index: Tensor, support: Tensor) -> Tensor:
    """KL(p ‖ softmax(I)) summed over keys, averaged over query rows.
    scores [B, H, T, S] detached attention logits; index [B, T, S]; support bool [B|1, T, S] (causal or top-k).
    p = L1-normalise(Σ_h softmax_support(scores_h))."""
    probs = torch.softmax(scores.masked_fill(~support[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    p = probs.sum(1)  # [B, T, S]
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    logq = torch.log_softmax(index.masked_fill(~support, float("-inf")), dim=-1)
    kl = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - logq), torch.zeros_like(p))
    return kl.sum(-1).mean()


def gather_tokens(x: Tensor, pick: Tensor) -> Tensor:
    """x [B, Hk, S, D] at the keys pick [B, T, J] (shared by the heads) -> [B, Hk, T, J, D], laid out as the
    attention consumes it. Whole rows are copied with index_select (its backward is a row-wise index_add,
    far faster than an element-wise gather)."""
    b, hk, s, d = x.shape
    t, j = pick.shape[1:]
    base = torch.arange(b * hk, device=pick.device).view(b, hk, 1, 1) * s  # first row of each (batch, KV head)
    flat = (pick[:, None] + base).reshape(-1)  # [B*Hk*T*J] row numbers in x flattened to [B*Hk*S, D]
    return x.reshape(b * hk * s, d).index_select(0, flat).view(b, hk, t, j, d)


def attend_tokens(q: Tensor, k: Tensor, v: Tensor, pick: Tensor, valid: Tensor, scale: float) -> Tensor:
    """Routed heads over their gathered keys.
    q [B, Hr, T, D], k/v [B, Hk, S, D], pick/valid [B, T, J] -> [B, Hr, T, D]."""
    b, hk, _, d = k.shape
    t = q.shape[2]
    o = ops.attend_gathered(q.reshape(b, hk, -1, t, d), gather_tokens(k, pick), gather_tokens(v, pick),
                            valid[:, None, None], scale)  # [B, Hk, G, T, D]
    return o.reshape(b, -1, t, d)


@ATTENTION.register("dsa")
class DSAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        c = cfg.dsa
        g = cfg.n_head // cfg.n_kv_head
        if cfg.n_head % cfg.n_kv_head or c.shared_heads % g or not 0 <= c.shared_heads < cfg.n_head:
            raise ValueError(f"dsa.shared_heads={c.shared_heads} must be a multiple of the GQA group size {g} "
                             f"and leave routed heads (n_head={cfg.n_head})")
        if c.phase not in ("warmup", "sparse") or c.kl_support not in ("dense", "sparse"):
            raise ValueError(f"dsa.phase must be warmup|sparse and dsa.kl_support dense|sparse, got "
                             f"{c.phase!r}, {c.kl_support!r}")
        if c.impl not in IMPLS or (c.impl == "gather" and c.kl_support != "sparse"):
            raise ValueError(f"dsa.impl={c.impl!r}: use mask (reference) | block | gather (needs kl_support=sparse: "
                             f"a dense KL needs every key anyway; warm-up steps run the block path) | auto")
        if c.topk < 1:
            raise ValueError(f"dsa.topk={c.topk} must be >= 1")
        if c.warmup_steps < 0 or c.warmup_trains not in ("indexer", "all"):
            raise ValueError(f"dsa.warmup_steps={c.warmup_steps} must be >= 0 and dsa.warmup_trains indexer|all, "
                             f"got {c.warmup_trains!r}")
        if c.warmup_steps and c.warmup_trains == "indexer" and c.kl_coeff <= 0:
            raise ValueError("dsa.warmup_trains=indexer trains the indexer by the KL alone: dsa.kl_coeff must be > 0")
        ks = c.shared_heads // g
        self.shared = _Heads(cfg.d_model, c.shared_heads, ks, cfg.hd) if c.shared_heads else None
        self.routed = _Heads(cfg.d_model, cfg.n_head - c.shared_heads, cfg.n_kv_head - ks, cfg.hd)
        self.indexer = Indexer(cfg)
        self.c = c
        self.topk, self.phase, self.support, self.coeff, self.impl = c.topk, c.phase, c.kl_support, c.kl_coeff, c.impl
        self.fast_on = True
        self.gather_chunk = 512  # queries per checkpointed chunk of the gather path
        self.block = 128  # queries per block of the block path
        self.capture: list[dict] | None = None  # a list = record selections (topocl/analysis/routing.py)
        self.register_load_state_dict_pre_hook(_split_legacy_o_proj)

    def param_role(self, name: str) -> str:
        first = name.split(".")[0]
        return {"shared": "attn.shared_heads", "routed": "attn.routed_heads", "indexer": "attn.indexer"}[first]

    def set_fast_pathway(self, enabled: bool) -> None:
        self.fast_on = enabled

    def select(self, index: Tensor, visible: Tensor) -> Tensor:
        """bool [B, T, S]: the top-k causal keys of each query by index score (all causal keys in warm-up)."""
        if self.phase == "warmup":
            return visible.expand(index.shape[0], -1, -1)
        return topk_mask(index.detach(), self.topk, visible)

    def resolve_impl(self, t: int) -> str:
        """The path this forward takes: gather only in the sparse phase (its KL is Eq. 4 on the picked keys);
        auto = gather from T = 2048 on (where the block path's O(T²) index scores with gradient cost more than
        gathering), else block."""
        sparse_kl = self.phase == "sparse" and self.support == "sparse"
        if self.impl == "auto":
            return "gather" if sparse_kl and t >= 2048 else "block"
        return "block" if self.impl == "gather" and not sparse_kl else self.impl

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        b, t, _ = x.shape
        q, k, v = self.routed.qkv(x, cos, sin)  # q [B, Hr, T, D], k/v [B, Hk, S, D]
        # the indexer reads detached x: the LM loss never reaches it
        route = {"mask": self._routed_mask, "block": self._routed_block, "gather": self._routed_gather}
        y_r, kl, frac, recall = route[self.resolve_impl(t)](x.detach(), q, k, v)  # y_r [B, Hr, T, D]
        if self.capture is not None:  # opt-in: the kept tokens [B, T, S] and the routed heads' probabilities
            with torch.no_grad():
                keep = self.select(self.indexer(x.detach()), causal_mask(t, device=x.device)[None])
                g = q.shape[1] // k.shape[1]
                probs = ops.attention_probs(q, repeat_kv(k, g), keep[:, None], 1.0 / math.sqrt(q.shape[-1]))
                self.capture.append({"select": keep.cpu(), "probs": probs.cpu()})
        y = self.routed.out(y_r) if self.fast_on else x.new_zeros(x.shape)
        if self.shared is not None:
            y = y + self.shared.out(sdpa_causal(*self.shared.qkv(x, cos, sin)))  # shared heads' own o_proj
        aux = {"loss.dsa_kl": self.coeff * kl, "stat.dsa_kl": kl.detach(), "stat.dsa_key_frac": frac.float(),
               "stat.dsa_recall": recall.float()}
        return y, aux

    def _routed_mask(self, xd: Tensor, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Reference path: masked softmax over [B, Hr, T, S]; the KL and stats on full [B, T, S] tensors."""
        b, t = q.shape[0], q.shape[2]
        visible = causal_mask(t, device=q.device)[None]  # [1, T, S]
        index = self.indexer(xd)  # [B, T, S]
        keep = self.select(index, visible)  # [B, T, S]
        k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // k.shape[1])  # [B, Hr, S, D]
        scale = 1.0 / math.sqrt(q.shape[-1])
        y_r = attend(q, k, v, keep[:, None], scale)  # [B, Hr, T, D]
        scores = (q @ k.transpose(-1, -2)).detach() * scale  # [B, Hr, T, S] teacher logits (detached)
        kl = indexer_kl(scores, index, keep if self.support == "sparse" else visible.expand(b, -1, -1))
        with torch.no_grad():
            p = torch.softmax(scores.masked_fill(~visible[:, None], float("-inf")), -1).sum(1)  # [B, T, S]
            own = topk_mask(p, self.topk, visible)  # the attention's own top-k
            picks = keep if self.phase == "sparse" else topk_mask(index, self.topk, visible)  # the indexer's top-k
            recall = (own & picks).sum() / own.sum()
            frac = keep.sum() / visible.expand_as(keep).sum()
        return y_r, kl, frac, recall

    def _routed_block(self, xd: Tensor, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Block path: per block of queries [t0, t1) only the keys [0, t1) it can see; the routed heads through
        the fused SDPA kernel on the kept-key mask (no [B, Hr, T, S] probabilities kept for backward), the index
        scores with gradient, the KL teacher and the recall stat from one no-grad score block. Same outputs,
        gradients and stats as `_routed_mask` (tests)."""
        b, hr, t, d = q.shape
        g, scale = hr // k.shape[1], 1.0 / math.sqrt(d)
        k, v = repeat_kv(k, g), repeat_kv(v, g)  # [B, Hr, S, D]
        iq, ik, iw = self.indexer.parts(xd)
        ys, kl_sum, kept, hits, own_total = [], q.new_zeros(()), 0, 0, 0
        for t0 in range(0, t, self.block):
            t1 = min(t, t0 + self.block)
            vis = causal_mask(t1 - t0, t1, device=q.device)[None]  # [1, Tc, S1]: s visible to row t0+i iff s <= t0+i
            qc, kc, vc = q[:, :, t0:t1], k[:, :, :t1], v[:, :, :t1]
            index = self.indexer.scores(iq[:, :, t0:t1], ik[:, :t1], iw[:, t0:t1])  # [B, Tc, S1]
            keep = self.select(index, vis)  # [B, Tc, S1]
            ys.append(sdpa_masked(qc, kc, vc, keep[:, None], scale))  # [B, Hr, Tc, D]
            support = keep if self.support == "sparse" else vis.expand_as(keep)
            with torch.no_grad():
                s = (qc @ kc.transpose(-1, -2)) * scale  # [B, Hr, Tc, S1] teacher logits
                p_vis = torch.softmax(s.masked_fill(~vis[:, None], float("-inf")), -1).sum(1)  # [B, Tc, S1]
                if self.support == "sparse" and self.phase == "sparse":
                    p = torch.softmax(s.masked_fill(~keep[:, None], float("-inf")), -1).sum(1)  # rows keep >= 1 key
                else:
                    p = p_vis  # in warm-up the kept set is every visible key
                p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
                own = topk_mask(p_vis, self.topk, vis)  # the attention's own top-k
                picks = keep if self.phase == "sparse" else topk_mask(index.detach(), self.topk, vis)
                hits, own_total, kept = hits + (own & picks).sum(), own_total + own.sum(), kept + keep.sum()
            logq = torch.log_softmax(index.masked_fill(~support, float("-inf")), dim=-1)
            kl_sum = kl_sum + torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - logq), 0.0).sum()
        frac = kept / (b * t * (t + 1) / 2)
        return torch.cat(ys, dim=2), kl_sum / (b * t), torch.as_tensor(frac), hits / own_total

    def _routed_gather(self, xd: Tensor, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Fast path (sparse phase, Eq. 4 KL): per chunk of queries, index scores and top-k without gradient
        (the same `topk_mask`), the routed heads over their gathered k keys (checkpointed when T > chunk), the
        KL on the gathered keys (index recomputed there with gradient). No [T, T] tensor is kept for backward;
        the recall stat still scores every key of a chunk, without gradient."""
        b, hr, t, d = q.shape
        g, scale, n = hr // k.shape[1], 1.0 / math.sqrt(d), min(self.topk, t)
        iq, ik, iw = self.indexer.parts(xd)
        recompute = t > self.gather_chunk and torch.is_grad_enabled()
        ys, kl_sum, kept, hits, own_total = [], q.new_zeros(()), 0, 0, 0
        for t0 in range(0, t, self.gather_chunk):
            rows = torch.arange(t0, min(t, t0 + self.gather_chunk), device=q.device)
            tc, qc = len(rows), q[:, :, t0:t0 + self.gather_chunk]  # [B, Hr, Tc, D]
            vis = rows[:, None] >= torch.arange(t, device=q.device)  # [Tc, S]
            with torch.no_grad():
                keep = topk_mask(self.indexer.scores(iq[:, :, t0:t0 + tc], ik, iw[:, t0:t0 + tc]), self.topk, vis)
                pick = keep.to(torch.uint8).topk(n, dim=-1).indices  # [B, Tc, n] the kept keys first
                valid = keep.gather(-1, pick)  # [B, Tc, n] (short rows keep fewer than n)
                s_sel = torch.einsum("bkgtd,bktjd->bkgtj", qc.reshape(b, -1, g, tc, d), gather_tokens(k, pick)) * scale
                p = torch.softmax(s_sel.masked_fill(~valid[:, None, None], float("-inf")), -1).sum((1, 2))
                p = p / p.sum(-1, keepdim=True)  # [B, Tc, n] teacher on the selected set (Eq. 4, Megatron)
                full = (qc @ repeat_kv(k, g).transpose(-1, -2)) * scale  # [B, Hr, Tc, S] for the recall stat
                own = topk_mask(torch.softmax(full.masked_fill(~vis, float("-inf")), -1).sum(1), self.topk, vis)
                hits, own_total, kept = hits + (own & keep).sum(), own_total + own.sum(), kept + keep.sum()
            args = (qc, k, v, pick, valid, scale)
            ys.append(checkpoint(attend_tokens, *args, use_reentrant=False) if recompute else attend_tokens(*args))
            ik_sel = gather_tokens(ik[:, None], pick)[:, 0]  # [B, Tc, n, DI]
            logq = torch.log_softmax(self.indexer.scores(iq[:, :, t0:t0 + tc], ik_sel, iw[:, t0:t0 + tc])
                                     .masked_fill(~valid, float("-inf")), -1)  # [B, Tc, n]
            kl_sum = kl_sum + torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - logq), 0.0).sum()
        frac = kept / (b * t * (t + 1) / 2)
        return torch.cat(ys, dim=2), kl_sum / (b * t), torch.as_tensor(frac), hits / own_total


def schedule(model: nn.Module, step: int, opt: torch.optim.Optimizer | None = None) -> str | None:
    """DSA's two-stage recipe at pretraining step `step` (0-based): the first `dsa.warmup_steps` steps run phase
    warmup (dense attention, the indexer learns by the dense KL, Eq. 3), the rest the configured phase (top-k,
    Eq. 4). With `warmup_trains: indexer` only the indexer trains during warm-up (DeepSeek-V3.2): every other
    parameter of the optimizer gets requires_grad False (no gradient, no AdamW update or decay) until the
    sparse stage. Returns the phase, or None when the model has no DSA layer. Call it before every step."""
    layers = [m for m in model.modules() if isinstance(m, DSAttention)]
    if not layers:
        return None
    c = layers[0].c
    phase = "warmup" if step < c.warmup_steps else c.phase
    for m in layers:
        m.phase = phase
    if c.warmup_steps > 0 and c.warmup_trains == "indexer" and opt is not None:
        in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
        roles = model.param_roles()
        for name, p in model.named_parameters():
            if id(p) in in_opt:
                p.requires_grad_(phase != "warmup" or roles[name] == "attn.indexer")
    return phase
