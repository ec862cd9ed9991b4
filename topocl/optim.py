"""Optimizer = AdamW with one param group per role, so policies (LR scale, weight decay, freezing, EMA
anchoring) are set per role in config (`train.roles.<role>.lr_scale=0`). The LR schedule is linear
warm-up then cosine decay to `min_lr_ratio * lr`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from topocl.config import RolePolicy, TrainConfig


def policy_for(role: str, cfg: TrainConfig) -> RolePolicy:
    """The policy of `role`: an exact match in cfg.roles, else the longest dotted prefix ("attn"
    covers "attn.cmp"), else the default (lr_scale 1)."""
    parts = role.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in cfg.roles:
            return cfg.roles[key]
    return RolePolicy()


def role_params(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Role -> [(name, param)], from `model.param_roles()` (which asserts one role per parameter)."""
    base = getattr(model, "module", model)  # unwrap DDP
    params = dict(base.named_parameters())
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, role in base.param_roles().items():
        groups.setdefault(role, []).append((name, params[name]))
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, one param group per trainable role. lr_scale 0 freezes a role: requires_grad False and the
    role is left out of the optimizer, so it has no state and weight decay cannot move it."""
    unknown = set(cfg.roles) - {r for role in role_params(model) for r in _prefixes(role)}
    if unknown:
        known = ", ".join(sorted(role_params(model)))
        raise ValueError(f"train.roles names roles this model does not have: {sorted(unknown)}; roles: {known}")
    groups = []
    for role, named in sorted(role_params(model).items()):
        pol = policy_for(role, cfg)
        trainable = pol.lr_scale > 0
        for _, p in named:
            p.requires_grad_(trainable)
        if not trainable:
            continue
        # norms (norm.attn / norm.ffn / norm.final) get no weight decay unless their policy sets one
        wd = pol.weight_decay if pol.weight_decay >= 0 else (0.0 if role.split(".")[0] == "norm" else cfg.weight_decay)
        groups.append({
            "params": [p for _, p in named],
            "names": [n for n, _ in named],
            "role": role,
            "lr_scale": pol.lr_scale,
            "anchor": pol.anchor,
            "lr": cfg.lr * pol.lr_scale,
            "weight_decay": wd,
        })
    if not groups:
        raise ValueError("every role is frozen (lr_scale 0): nothing to train")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def _prefixes(role: str) -> list[str]:
    parts = role.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts) + 1)]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base LR at `step` (0-based): linear warm-up, then cosine to min_lr_ratio."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    for g in opt.param_groups:
        g["lr"] = base_lr * factor * g.get("lr_scale", 1.0)
    return base_lr * factor


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v))
