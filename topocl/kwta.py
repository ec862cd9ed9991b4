"""Activation-sparsity control for the FFN: k-winners-take-all over the SwiGLU hidden units.

    h = silu(gate(x)) * up(x)                       [.., H] hidden units
    k = ⌈ρ·H⌉;  keep the k units of largest |h| per token, zero the others;  y = down(h ⊙ mask)

`kwta` (single regime): one SwiGLU of H = d_ff hidden units at active fraction ρ = `kwta.rho`; its parameters
are the plain MLP's (same names, role `mlp`), so every ρ has exactly the parameters of the dense control and
ρ = 1 computes the plain MLP bit for bit.

`dual` (two systems side by side, parameter-matched): a slow pathway of H_s units at ρ_s = `kwta.slow_rho`
(default 1: dense, compressing) plus a fast pathway of H_f units at ρ = `kwta.rho` (sparse, fast-writing),
H_s + H_f = d_ff (H_f = round(fast_frac·d_ff)), so it also has the dense control's parameter count.
y = slow(x) + fast(x). Roles `ffn.slow_units` (slow) and `ffn.fast_units` (fast); `set_fast_pathway(False)`
drops the fast pathway (dream consolidation's student pass).

Gradient (`kwta.grad`): `masked` (default) — the mask is a constant of the forward pass, so losing units get no
gradient and their gate/up rows are untouched by a token that did not select them (the writability half of the
hypothesis); `straight_through` — the forward pass is sparse but the backward pass is the dense one
(d loss/d h as if no unit were masked).
Ties in |h| are broken by `torch.topk`, so a token always has exactly k selected units.

Shape legend: B batch, T positions, C d_model, H hidden units.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from topocl.config import ModelConfig
from topocl.registry import FFN

GRADS = ("masked", "straight_through")


def active_units(rho: float, hidden: int) -> int:
    """k = ⌈ρ·H⌉ (at least 1); the 1e-9 keeps float products like 0.1·320 = 32.000000000000004 at 32."""
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"kwta rho={rho} must be in (0, 1]")
    return max(1, min(hidden, math.ceil(rho * hidden - 1e-9)))


def winners(h: Tensor, k: int) -> Tensor:
    """Bool mask [.., H] of the k units of largest |h| along the last dim."""
    idx = h.detach().abs().topk(k, dim=-1).indices  # [.., k]
    return torch.zeros_like(h, dtype=torch.bool).scatter_(-1, idx, True)


def kwta(h: Tensor, k: int, grad: str = "masked") -> Tensor:
    """h with all but its top-k |h| units zeroed (along the last dim); gradient per `grad`."""
    if k >= h.shape[-1]:
        return h
    sparse = h * winners(h, k)
    if grad == "straight_through":
        return h + (sparse - h).detach()
    return sparse


class SparseSwiGLU(nn.Module):
    """down(kWTA_k(silu(gate(x)) * up(x))) with H hidden units and k = ⌈ρ·H⌉ winners per token."""

    def __init__(self, d_model: int, hidden: int, rho: float, grad: str) -> None:
        super().__init__()
        if grad not in GRADS:
            raise ValueError(f"kwta grad={grad!r}: use {' | '.join(GRADS)}")
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.k, self.grad = active_units(rho, hidden), grad

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(y [B, T, C], fraction of hidden units that are nonzero)."""
        h = kwta(F.silu(self.gate(x)) * self.up(x), self.k, self.grad)  # [B, T, H]
        return self.down(h), (h != 0).float().mean().detach()


@FFN.register("kwta")
class KWTA(SparseSwiGLU):
    """Single-regime FFN: the SwiGLU MLP (same parameter names) with k-WTA at active fraction ρ = kwta.rho."""

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__(cfg.d_model, cfg.ff, cfg.kwta.rho, cfg.kwta.grad)

    def param_role(self, name: str) -> str:
        return "mlp"

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:  # type: ignore[override]
        y, active = super().forward(x)
        return y, {"stat.ffn_active": active}


def dual_sizes(ff: int, fast_frac: float) -> tuple[int, int]:
    """(slow, fast) hidden units of the dual FFN: fast = round(fast_frac·ff), both >= 1, sum = ff."""
    fast = round(fast_frac * ff)
    if not 1 <= fast <= ff - 1:
        raise ValueError(f"kwta.fast_frac={fast_frac} leaves {fast} of d_ff={ff} units in the fast pathway; "
                         "both pathways need at least one unit")
    return ff - fast, fast


@FFN.register("dual")
class DualFFN(nn.Module):
    """Two-system FFN: slow SwiGLU (ρ_s = kwta.slow_rho) + fast SwiGLU (ρ = kwta.rho), units summing to d_ff."""

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        c = cfg.kwta
        h_slow, h_fast = dual_sizes(cfg.ff, c.fast_frac)
        self.slow = SparseSwiGLU(cfg.d_model, h_slow, c.slow_rho, c.grad)
        self.fast = SparseSwiGLU(cfg.d_model, h_fast, c.rho, c.grad)
        self.fast_on = True

    def param_role(self, name: str) -> str:
        return {"slow": "ffn.slow_units", "fast": "ffn.fast_units"}[name.split(".")[0]]

    def set_fast_pathway(self, enabled: bool) -> None:
        self.fast_on = enabled

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        y, slow_active = self.slow(x)
        aux = {"stat.ffn_slow_active": slow_active}
        if self.fast_on:
            f, fast_active = self.fast(x)
            y = y + f
            aux["stat.ffn_fast_active"] = fast_active
        return y, aux
