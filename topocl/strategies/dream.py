"""Dream consolidation: every K tasks, the model dreams trajectories, and the full model's predictions
are distilled into the slow roles only, with the fast pathway switched off in the student pass.

    teacher = frozen copy of the model (fast pathway on);  student = the model with fast pathway off
    loss    = KL(teacher ‖ student) over next-token distributions on the dreamed tokens
    update  = AdamW on the slow roles (model.pathway_roles()[0]) at a low LR; everything else is untouched
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from topocl.registry import STRATEGIES
from topocl.strategies.base import Strategy, StrategyContext


@dataclass
class DreamConfig:
    every: int = 2  # consolidate after every K-th task
    n_traj: int = 16  # dreamed trajectories
    length: int = 64  # tokens per trajectory (after BOS)
    temperature: float = 1.0  # sampling temperature of the dreams
    steps: int = 10  # distillation steps
    batch_size: int = 8
    lr: float = 3e-4


def dream(model: nn.Module, cfg: DreamConfig, bos_id: int, seed: int, device: torch.device) -> Tensor:
    """Sampled trajectories [n_traj, 1 + length] starting at BOS."""
    g = torch.Generator(device=device).manual_seed(seed)
    start = torch.full((cfg.n_traj, 1), bos_id, dtype=torch.long, device=device)
    model.eval()
    out = model.generate(start, cfg.length, temperature=cfg.temperature, generator=g)
    model.train()
    return out


def distil_slow(model: nn.Module, dreams: Tensor, cfg: DreamConfig) -> list[float]:
    """Distil the full model into its slow roles with the fast pathway off; returns the KL per step."""
    slow, _ = model.pathway_roles()
    roles = model.param_roles()
    teacher = copy.deepcopy(model).eval()
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    slow_params = [p for n, p in model.named_parameters() if roles[n] in slow]
    for n, p in model.named_parameters():
        p.requires_grad_(roles[n] in slow)
    opt = torch.optim.AdamW(slow_params, lr=cfg.lr, weight_decay=0.0)
    kls = []
    try:
        for step in range(cfg.steps):
            i = (step * cfg.batch_size) % len(dreams)
            x = dreams[i:i + cfg.batch_size]
            with torch.no_grad():
                p_t = torch.log_softmax(teacher(x).logits.float(), -1)
            with model.fast_pathway(False):
                p_s = torch.log_softmax(model(x).logits.float(), -1)
            kl = F.kl_div(p_s.flatten(0, 1), p_t.flatten(0, 1), log_target=True, reduction="batchmean")
            kl.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            kls.append(float(kl.detach()))
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
    return kls


@STRATEGIES.register("dream")
class Dream(Strategy):
    name = "dream"

    def __init__(self, cfg: DreamConfig, ctx: StrategyContext) -> None:
        super().__init__(cfg, ctx)
        self._stats: dict[str, float] = {}

    def before_task(self, model: nn.Module, task_rows: Tensor, task_index: int) -> None:
        if not hasattr(model, "pathway_roles") or not model.pathway_roles()[0]:
            raise ValueError("dream needs a model with slow roles and a fast pathway (nsa, dsa, split or moe), "
                             "without a LoRA adapter")

    def after_task(self, model: nn.Module, task_rows: Tensor, task_index: int) -> None:
        if self.cfg.every <= 0 or (task_index + 1) % self.cfg.every:
            return
        dreams = dream(model, self.cfg, self.ctx.bos_id, self.ctx.seed * 31 + task_index, self.ctx.device)
        kls = distil_slow(model, dreams, self.cfg)
        self._stats = {"dream_kl_first": kls[0], "dream_kl_last": kls[-1]}

    def stats(self) -> dict[str, float]:
        return dict(self._stats)
