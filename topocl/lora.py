"""LoRA as an adapter axis, targeted by role, through PEFT.

    model = apply_lora(gpt, LoRAConfig(r=8, roles=["attn.q", "attn.v"]))   # in place
    policy = lora_policy(model)   # train.roles: every base role frozen (lr_scale 0), role "lora" trains
    gpt = merge_lora(model)       # fold the adapters back: a plain GPT again

PEFT injects `lora_A`/`lora_B` next to each targeted nn.Linear (kept as `base_layer`); GPT.param_roles()
gives the injected weights the role "lora" and the wrapped base weights keep their own role, so the
role-grouped optimizer and every role policy work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from topocl.config import ConfigError, RolePolicy
from topocl.strategies.ewc import role_matches


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    roles: list[str] = field(default_factory=lambda: ["attn.q", "attn.k", "attn.v", "attn.o", "mlp"])


def target_modules(model: nn.Module, roles: list[str]) -> list[str]:
    """Names of the nn.Linear modules whose weight has one of `roles` (exact, or a dotted prefix such as
    "attn", as in train.roles)."""
    param_roles = model.param_roles()
    linear = {n: param_roles[f"{n}.weight"] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = [n for n, role in linear.items() if role_matches(role, roles)]
    if not names:
        raise ConfigError(f"lora.roles={roles} match no linear layer; "
                         f"roles with linear layers: {sorted(set(linear.values()))}")
    return names


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Inject LoRA adapters (B = 0, so outputs are unchanged) on the linear layers of `cfg.roles`, in place;
    every other parameter gets requires_grad False."""
    if cfg.r < 1 or cfg.alpha <= 0 or not 0 <= cfg.dropout < 1:
        raise ConfigError(f"lora.r={cfg.r} must be >= 1, lora.alpha={cfg.alpha} > 0, lora.dropout={cfg.dropout} "
                          "in [0, 1)")
    targets = target_modules(model, cfg.roles)
    pcfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets)
    model = inject_adapter_in_model(pcfg, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def has_lora(model: nn.Module) -> bool:
    """Whether adapters are injected (the model is then still a GPT, with `base_layer`/`lora_*` names)."""
    return any(isinstance(m, LoraLayer) for m in model.modules())


def lora_policy(model: nn.Module) -> dict[str, RolePolicy]:
    """Role policies that train only the adapters."""
    return {r: RolePolicy(lr_scale=1.0 if r == "lora" else 0.0) for r in set(model.param_roles().values())}


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight and put the plain nn.Linear back (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    return model
