"""`moe` FFN: DeepSeekMoE-style shared expert(s) + top-k routed experts, with a load-balancing loss.

    y = Σ_shared E_s(x) + Σ_{e ∈ TopK(router(x))} g_e(x) · E_e(x),   g = softmax(router(x)) renormalised over the top-k
    loss.moe_balance = coeff · n_routed · Σ_e f_e · P_e      (Switch/DeepSeek: f_e = fraction of tokens routed to e,
                                                              P_e = mean router probability of e; minimum 1·coeff
                                                              when routing is uniform)

Roles: `ffn.shared_expert` (slow pathway), `ffn.routed_expert` and `ffn.router` (fast pathway).
Paths (`moe.impl`): `dispatch` sorts the (token, expert) pairs by expert, gathers each expert's tokens with one
index_select, runs every expert on its own contiguous rows and scatters the weighted outputs back with one
index_add (routed FLOPs = topk/n_routed of `dense`); `dense` (the reference) runs every expert on every token
and weights by the routing weights, 0 off the top-k. Same outputs and gradients (tests).

Shape legend: B batch, T positions, C d_model, E routed experts, F expert hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from topocl.config import ModelConfig
from topocl.registry import FFN


class Expert(nn.Module):
    """SwiGLU expert."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def balance_loss(probs: Tensor, chosen: Tensor) -> Tensor:
    """n_routed · Σ_e f_e P_e. probs [N, E] router softmax, chosen bool [N, E] top-k membership."""
    e = probs.shape[-1]
    k = chosen.sum(-1).float().mean()
    f = chosen.float().mean(0) / k  # fraction of routed slots per expert (sums to 1)
    p = probs.mean(0)  # mean router probability per expert (sums to 1)
    return e * (f * p).sum()


@FFN.register("moe")
class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        c = cfg.moe
        if not 1 <= c.topk <= c.n_routed:
            raise ValueError(f"moe.topk={c.topk} must be in 1..n_routed={c.n_routed}")
        d_exp = c.d_expert or max(8, cfg.ff // (c.n_shared + c.topk))  # active FLOPs ≈ the dense MLP's
        self.shared = nn.ModuleList([Expert(cfg.d_model, d_exp) for _ in range(c.n_shared)])
        self.experts = nn.ModuleList([Expert(cfg.d_model, d_exp) for _ in range(c.n_routed)])
        self.router = nn.Linear(cfg.d_model, c.n_routed, bias=False)
        self.topk, self.coeff = c.topk, c.balance_coeff
        if c.impl not in ("dispatch", "dense"):
            raise ValueError(f"moe.impl={c.impl!r}: use dispatch | dense (reference)")
        self.impl = c.impl
        self.fast_on = True

    def param_role(self, name: str) -> str:
        first = name.split(".")[0]
        return {"shared": "ffn.shared_expert", "experts": "ffn.routed_expert", "router": "ffn.router"}[first]

    def set_fast_pathway(self, enabled: bool) -> None:
        self.fast_on = enabled

    def _dispatch(self, x: Tensor, idx: Tensor, w: Tensor) -> Tensor:
        """Routed experts on their own tokens only. x [B, T, C], idx/w [B, T, K] chosen experts and their
        renormalised weights -> [B, T, C]."""
        xf = x.reshape(-1, x.shape[-1])  # [N, C]
        expert = idx.reshape(-1)  # [N*K] expert of each (token, slot) pair
        order = expert.argsort(stable=True)  # pairs grouped by expert
        token = order // self.topk  # [N*K] the token of each sorted pair
        counts = torch.bincount(expert, minlength=len(self.experts)).tolist()
        rows = xf.index_select(0, token)  # [N*K, C] each expert's tokens, contiguous
        outs = [e(part) for e, part in zip(self.experts, rows.split(counts)) if len(part)]
        ys = torch.cat(outs) * w.reshape(-1)[order, None]  # [N*K, C] weighted outputs
        return ys.new_zeros(xf.shape).index_add_(0, token, ys).view(x.shape)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        y = sum((s(x) for s in self.shared), torch.zeros_like(x))
        probs = torch.softmax(self.router(x).float(), dim=-1)  # [B, T, E]
        top = probs.topk(self.topk, dim=-1)
        chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top.indices, True)  # [B, T, E]
        weights = torch.where(chosen, probs, torch.zeros_like(probs))
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)  # renormalised over the top-k
        if self.fast_on and self.impl == "dense":
            for e, expert in enumerate(self.experts):
                w = weights[..., e:e + 1]  # [B, T, 1]
                if bool(chosen[..., e].any()):
                    y = y + w * expert(x)
        elif self.fast_on:
            y = y + self._dispatch(x, top.indices, weights.gather(-1, top.indices))
        bal = balance_loss(probs.flatten(0, 1), chosen.flatten(0, 1))
        load = chosen.float().flatten(0, 1).mean(0)
        return y, {"loss.moe_balance": self.coeff * bal, "stat.moe_balance": bal.detach(),
                   "stat.moe_max_load": load.max().detach()}
