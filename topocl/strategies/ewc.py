"""Online EWC (Schwarz et al. 2018) with a named Fisher estimator, normalised per role.

    penalty = (λ / 2) Σ_i F̃_i (θ_i − θ*_i)²,    F̃ ← γ F̃ + F_task,    θ* = parameters at the end of the last task

Fisher estimators (diagonal), over `fisher_samples` sequences of the task just learned:
    empirical  per-sequence gradients of the gold next-token NLL, squared, averaged (default)
    sampled    the same with targets sampled from the model at every position (true Fisher, MC one sample)
    batched    the square of the minibatch-mean gradient (Avalanche / TiC-LM style; shrinks F by ~batch size)
The gradient is that of the per-token mean NLL of a sequence. Each task's F is divided by its mean over
each role before accumulation, so λ means the same across roles and models (research note §4.1); the
penalty and the penalty / task-loss ratio are logged. Only trainable parameters (requires_grad at the end
of the task, i.e. roles with lr_scale > 0 or LoRA adapters) are estimated and anchored; `roles` narrows
that further (a role or a dotted prefix of roles, as in train.roles).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from topocl.config import ConfigError
from topocl.registry import STRATEGIES
from topocl.strategies.base import Strategy, StrategyContext

ESTIMATORS = ("empirical", "sampled", "batched")


@dataclass
class EWCConfig:
    lam: float = 100.0  # λ
    gamma: float = 1.0  # online decay of the accumulated Fisher
    fisher: str = "empirical"  # empirical | sampled | batched
    fisher_samples: int = 32  # sequences of the task used to estimate F
    fisher_batch: int = 8  # minibatch size of the `batched` estimator
    roles: list[str] = field(default_factory=list)  # roles (or role prefixes) penalised; [] = every trainable role
    normalise: bool = True  # divide each task's F by its per-role mean


def role_matches(role: str, selected: list[str]) -> bool:
    """`role` is selected by an exact name or a dotted prefix ("attn" covers "attn.cmp")."""
    parts = role.split(".")
    return any(".".join(parts[:n]) in selected for n in range(1, len(parts) + 1))


def _nll(model: nn.Module, rows: Tensor, estimator: str, gen: torch.Generator) -> Tensor:
    x, y = rows[:, :-1], rows[:, 1:]  # [b, T], [b, T]
    logits = model(x).logits  # [b, T, V]
    if estimator == "sampled":
        with torch.no_grad():
            probs = torch.softmax(logits.float(), -1).flatten(0, 1)  # [b*T, V]
            y = torch.multinomial(probs.cpu(), 1, generator=gen).view_as(y).to(x.device)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def estimate_fisher(model: nn.Module, rows: Tensor, params: dict[str, nn.Parameter], estimator: str,
                    batch: int, seed: int) -> dict[str, Tensor]:
    """Diagonal Fisher of `params` on `rows` [N, T+1] with the named estimator (model left in its mode)."""
    if estimator not in ESTIMATORS:
        raise ConfigError(f"ewc.fisher={estimator!r}: use one of {', '.join(ESTIMATORS)}")
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    groups = rows.split(batch) if estimator == "batched" else rows.split(1)
    was_training = model.training
    model.eval()
    try:
        for g in groups:
            grads = torch.autograd.grad(_nll(model, g, estimator, gen), list(params.values()), allow_unused=True)
            for n, gr in zip(params, grads):
                if gr is not None:
                    fisher[n] += gr.detach() ** 2 / len(groups)
    finally:
        model.train(was_training)
    return fisher


def normalise_per_role(fisher: dict[str, Tensor], roles: dict[str, str]) -> dict[str, Tensor]:
    """Divide F by its mean over each role's parameters (roles whose F is all zero are left at zero)."""
    out = {}
    for role in sorted({roles[n] for n in fisher}):
        names = [n for n in fisher if roles[n] == role]
        mean = torch.cat([fisher[n].flatten() for n in names]).mean()
        for n in names:
            out[n] = fisher[n] / mean if mean > 0 else fisher[n]
    return out


@STRATEGIES.register("ewc")
class EWC(Strategy):
    name = "ewc"

    def __init__(self, cfg: EWCConfig, ctx: StrategyContext) -> None:
        super().__init__(cfg, ctx)
        if cfg.fisher not in ESTIMATORS:
            raise ConfigError(f"ewc.fisher={cfg.fisher!r}: use one of {', '.join(ESTIMATORS)}")
        for key in ("lam", "gamma"):
            if getattr(cfg, key) < 0:
                raise ConfigError(f"ewc.{key}={getattr(cfg, key)} must be >= 0")
        for key in ("fisher_samples", "fisher_batch"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"ewc.{key}={getattr(cfg, key)} must be >= 1")
        self.fisher: dict[str, Tensor] = {}  # F̃, per parameter name
        self.anchor: dict[str, Tensor] = {}  # θ*
        self._stats: dict[str, float] = {}

    def params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters EWC estimates and anchors: trainable, and in `roles` when given."""
        roles = model.param_roles()
        unknown = [r for r in self.cfg.roles if not any(role_matches(x, [r]) for x in roles.values())]
        if unknown:
            raise ConfigError(f"ewc.roles names roles this model does not have: {unknown}; "
                              f"roles: {', '.join(sorted(set(roles.values())))}")
        out = {n: p for n, p in model.named_parameters()
               if p.requires_grad and (not self.cfg.roles or role_matches(roles[n], self.cfg.roles))}
        if not out:
            raise ConfigError(f"ewc.roles={self.cfg.roles or 'all'} selects no trainable parameter "
                              "(every selected role is frozen)")
        return out

    def penalty(self, model: nn.Module) -> Tensor | None:
        """(λ/2) Σ F̃ (θ − θ*)², or None before the first task has ended."""
        if not self.fisher:
            return None
        params = dict(model.named_parameters())
        terms = [(self.fisher[n] * (params[n] - self.anchor[n]) ** 2).sum() for n in self.fisher]
        return 0.5 * self.cfg.lam * torch.stack(terms).sum()

    def loss(self, model: nn.Module, out: object, batch: Tensor) -> Tensor | None:
        pen = self.penalty(model)
        if pen is not None:
            p, task = float(pen.detach()), float(out.lm_loss.detach())
            self._stats = {"ewc_penalty": p, "ewc_ratio": p / max(task, 1e-12)}
        return pen

    def after_task(self, model: nn.Module, task_rows: Tensor, task_index: int) -> None:
        params = self.params(model)
        g = torch.Generator().manual_seed(self.ctx.seed * 7919 + task_index)
        pick = torch.randperm(len(task_rows), generator=g)[: self.cfg.fisher_samples]
        rows = task_rows[pick].to(self.ctx.device)
        f = estimate_fisher(model, rows, params, self.cfg.fisher, self.cfg.fisher_batch, self.ctx.seed + task_index)
        if self.cfg.normalise:
            f = normalise_per_role(f, model.param_roles())
        old = self.fisher  # parameters no longer trainable keep their decayed F and their old anchor
        fisher = {**{n: self.cfg.gamma * v for n, v in old.items()},
                  **{n: self.cfg.gamma * old[n] + f[n] if n in old else f[n] for n in f}}
        self.fisher = _sorted(fisher)
        self.anchor = _sorted({**self.anchor, **{n: p.detach().clone() for n, p in params.items()}})

    def stats(self) -> dict[str, float]:
        return dict(self._stats)

    def state_dict(self) -> dict:
        return {**{f"fisher.{n}": v for n, v in self.fisher.items()},
                **{f"anchor.{n}": v for n, v in self.anchor.items()}}

    def load_state_dict(self, state: dict) -> None:
        dev = self.ctx.device
        self.fisher = _sorted({k[len("fisher."):]: v.to(dev) for k, v in state.items() if k.startswith("fisher.")})
        self.anchor = _sorted({k[len("anchor."):]: v.to(dev) for k, v in state.items() if k.startswith("anchor.")})


def _sorted(d: dict[str, Tensor]) -> dict[str, Tensor]:
    """One canonical order (by name) for F̃ and θ*: the penalty sums its terms in this order, so a resumed run
    (whose tensors come back from the checkpoint sorted by name) logs bitwise what an uninterrupted one logs."""
    return {k: d[k] for k in sorted(d)}
