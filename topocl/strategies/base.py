"""The strategy contract. A continual-learning method is one small file implementing some of these hooks.

A strategy sees only the current task's token rows and its own memory (never the stream). The runner
composes several (e.g. ewc + replay): batches come from the first strategy that mixes data, losses are
summed, hooks run in order. All hooks are optional.

    s = STRATEGIES.get("ewc")(cfg.ewc, ctx)
    s.before_task(model, task_rows)                   # task_rows: LongTensor [N, T+1] of the current task
    rows = s.mix(task_batch, step)                    # may replace part of the batch (replay)
    loss = s.loss(model, out, batch)                  # extra loss term (EWC penalty) or None
    s.after_step(model, step)                         # e.g. statistics
    s.after_task(model, task_rows, task_index)        # Fisher, buffer update, dream consolidation
    s.stats() -> dict[str, float]                     # logged into metrics.jsonl (e.g. ewc penalty/loss ratio)
    s.sources() -> dict[str, Tensor]                  # token rows it may train on (checked against held-out rows)
    s.state_dict() / s.load_state_dict(d)             # tensors + JSON-able values, for resume
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class StrategyContext:
    """What the runner gives a strategy at construction (its own world, not the stream)."""

    device: torch.device
    seed: int
    seq_len: int
    batch_size: int
    base_rows: Tensor | None = None  # pretraining-corpus TRAINING rows [N, T+1] (replay's base mixing; never the
    # held-out rows the runner scores)
    stream_rows: int = 0  # token rows in the whole stream (the size a memory budget is a fraction of); 0 = unknown
    bos_id: int = 0
    train: object = None  # topocl.config.TrainConfig of the continual run (lr, grad_clip, ...)
    extra: dict = field(default_factory=dict)


class Strategy:
    name = "base"

    def __init__(self, cfg: object, ctx: StrategyContext) -> None:
        self.cfg, self.ctx = cfg, ctx

    def before_task(self, model: nn.Module, task_rows: Tensor, task_index: int) -> None:
        pass

    def mix(self, batch: Tensor, step: int) -> Tensor:
        return batch

    def loss(self, model: nn.Module, out: object, batch: Tensor) -> Tensor | None:
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        pass

    def after_task(self, model: nn.Module, task_rows: Tensor, task_index: int) -> None:
        pass

    def stats(self) -> dict[str, float]:
        return {}

    def sources(self) -> dict[str, Tensor]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
