"""Dream consolidation: every K tasks, the model dreams trajectories, and the full model's predictions
are distilled into the slow roles only, with the fast pathway switched off in the student pass.

    teacher = frozen copy of the model (fast pathway on);  student = the model with fast pathway off
    loss    = τ² KL(teacher_τ ‖ student_τ) over next-token distributions on the dreamed tokens (τ = distil_temperature)
    update  = a fresh AdamW (no weight decay) on the slow roles (model.pathway_roles()[0]) at a low LR;
              every other parameter and buffer is bitwise untouched, and requires_grad flags are restored

Dreams are sampled from the current model (fast pathway on) starting at BOS, seeded by (seed, task).
The model is checked at the first hook that sees it (`before_task`): it must have slow-role parameters,
modules with `set_fast_pathway`, and no LoRA adapter (dream trains base weights).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from topocl.config import ConfigError
from topocl.registry import STRATEGIES
from topocl.strategies.base import Strategy, StrategyContext


@dataclass
class DreamConfig:
    every: int = 2  # consolidate after every K-th task (0 = never)
    n_traj: int = 16  # dreamed trajectories
    length: int = 64  # tokens per trajectory (after BOS)
    temperature: float = 1.0  # sampling temperature of the dreams
    steps: int = 10  # distillation steps
    batch_size: int = 8
    lr: float = 3e-4
    distil_temperature: float = 1.0  # τ of the distillation softmax (loss scaled by τ²)


def check_model(model: nn.Module, cfg: DreamConfig) -> set[str]:
    """The slow roles dream will train; a clear error when the model cannot dream."""
    if not hasattr(model, "pathway_roles"):
        raise ValueError(f"dream needs a GPT-like model with pathway_roles(), got {type(model).__name__}")
    roles = set(model.param_roles().values())
    slow = model.pathway_roles()[0] & roles
    if not slow:
        raise ValueError("dream needs a model with slow roles and a fast pathway (nsa, dsa with shared_heads > 0, "
                         f"split or moe); this model's roles: {', '.join(sorted(roles))}")
    if not any(hasattr(m, "set_fast_pathway") for m in model.modules()):
        raise ValueError("dream needs a fast pathway to switch off (no module implements set_fast_pathway)")
    if "lora" in roles:
        raise ValueError("dream trains the slow roles' base weights: it cannot be combined with adapter=lora")
    max_len = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    if max_len is not None and cfg.length + 1 > max_len:
        raise ConfigError(f"dream.length={cfg.length} (+1 BOS) exceeds model.max_seq_len={max_len}")
    return slow


def dream(model: nn.Module, cfg: DreamConfig, bos_id: int, seed: int, device: torch.device) -> Tensor:
    """Sampled trajectories [n_traj, 1 + length] starting at BOS."""
    g = torch.Generator(device=device).manual_seed(seed)
    start = torch.full((cfg.n_traj, 1), bos_id, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        return model.generate(start, cfg.length, temperature=cfg.temperature, generator=g)
    finally:
        model.train(was_training)


def _kl(student: nn.Module, teacher: nn.Module, x: Tensor, tau: float) -> Tensor:
    """τ² · mean over the b*T positions of KL(teacher_τ ‖ student_τ), the student's fast pathway off."""
    with torch.no_grad():
        p_t = torch.log_softmax(teacher(x).logits.float() / tau, -1)  # [b, T, V]
    with student.fast_pathway(False):
        p_s = torch.log_softmax(student(x).logits.float() / tau, -1)  # [b, T, V]
    return tau ** 2 * F.kl_div(p_s.flatten(0, 1), p_t.flatten(0, 1), log_target=True, reduction="batchmean")


@torch.no_grad()
def dream_kl(student: nn.Module, teacher: nn.Module, dreams: Tensor, cfg: DreamConfig) -> float:
    """The distillation loss over all dreams (position-weighted mean)."""
    parts = [(_kl(student, teacher, x, cfg.distil_temperature), len(x)) for x in dreams.split(cfg.batch_size)]
    return float(sum(v * n for v, n in parts) / len(dreams))


def distil_slow(model: nn.Module, dreams: Tensor, cfg: DreamConfig) -> dict[str, float]:
    """Distil the full model into its slow roles with the fast pathway off. Returns the KL on all dreams
    before and after, and the number of slow parameters trained."""
    slow = check_model(model, cfg)
    roles = model.param_roles()
    teacher = copy.deepcopy(model).eval()
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    slow_params = [p for n, p in model.named_parameters() if roles[n] in slow]
    for n, p in model.named_parameters():
        p.requires_grad_(roles[n] in slow)
    opt = torch.optim.AdamW(slow_params, lr=cfg.lr, weight_decay=0.0)
    try:
        before = dream_kl(model, teacher, dreams, cfg)
        for step in range(cfg.steps):
            i = (step * cfg.batch_size) % len(dreams)
            _kl(model, teacher, dreams[i:i + cfg.batch_size], cfg.distil_temperature).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        after = dream_kl(model, teacher, dreams, cfg)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
    return {"dream_kl_before": before, "dream_kl_after": after,
            "dream_slow_params": float(sum(p.numel() for p in slow_params))}


@STRATEGIES.register("dream")
class Dream(Strategy):
    name = "dream"

    def __init__(self, cfg: DreamConfig, ctx: StrategyContext) -> None:
        super().__init__(cfg, ctx)
        self._stats: dict[str, float] = {}
        self.last: Tensor | None = None  # the latest dreams (what it last trained on)
        for key in ("n_traj", "length", "steps", "batch_size"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"dream.{key}={getattr(cfg, key)} must be >= 1")
        if cfg.lr <= 0 or cfg.distil_temperature <= 0:
            raise ConfigError(f"dream.lr={cfg.lr} and dream.distil_temperature={cfg.distil_temperature} must be > 0")

    def before_task(self, model: nn.Module, task_rows: Tensor, task_index: int) -> None:
        check_model(model, self.cfg)

    def after_task(self, model: nn.Module, task_rows: Tensor, task_index: int) -> None:
        if self.cfg.every <= 0 or (task_index + 1) % self.cfg.every:
            return
        dreams = dream(model, self.cfg, self.ctx.bos_id, self.ctx.seed * 31 + task_index, self.ctx.device)
        self._stats = {**distil_slow(model, dreams, self.cfg), "dream_task": float(task_index)}
        self.last = dreams.cpu()

    def sources(self) -> dict[str, Tensor]:
        return {} if self.last is None else {"dreams": self.last}

    def stats(self) -> dict[str, float]:
        return dict(self._stats)

    def state_dict(self) -> dict:
        return {"stats": dict(self._stats)}  # dreams are re-drawn from (seed, task): no other memory

    def load_state_dict(self, state: dict) -> None:
        self._stats = dict(state.get("stats", {}))
