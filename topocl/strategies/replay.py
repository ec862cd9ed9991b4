"""Experience replay: a reservoir buffer (Vitter's Algorithm R) over past tasks' sequences.

Memory budget: the buffer holds at most M = floor(memory * stream rows) rows (default memory 0.1: 10% of the
whole stream's token rows, the usual limited-memory setting; the runner tells the strategy the stream's size,
never its rows), or buffer_size rows when buffer_size > 0 (an absolute budget, which must not exceed the memory
fraction when the stream's size is known).

The buffer is filled at the end of each task (`after_task`), not while training, so it only ever holds
*past* tasks' rows and is independent of the batch schedule: the task's rows enter in a seeded random
order; the n-th row seen (0-based) takes slot n while n < M, else replaces slot r ~ U{0..n} when r < M,
so every row seen so far is in the buffer with probability M / (n + 1).
During a task, `mix` keeps the first B - k - kb rows of each batch and appends k = round(ratio * B)
buffer rows and kb = round(base_ratio * B) pretraining-corpus rows (REMIX-style), drawn uniformly with
replacement by a generator seeded from (seed, task, step): the same step gives the same batch on resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from topocl.config import ConfigError
from topocl.registry import STRATEGIES
from topocl.strategies.base import Strategy, StrategyContext


@dataclass
class ReplayConfig:
    memory: float = 0.1  # buffer capacity as a fraction of the stream's token rows (0 < memory <= 1)
    buffer_size: int = 0  # M, rows; 0 = floor(memory * stream rows); > 0 must stay within that budget
    ratio: float = 0.25  # fraction of each batch drawn from the buffer
    base_ratio: float = 0.0  # fraction of each batch drawn from the pretraining corpus


def capacity(cfg: ReplayConfig, stream_rows: int) -> int:
    """Buffer rows allowed by the memory budget (stream_rows 0 = unknown: buffer_size must be given)."""
    if not 0 < cfg.memory <= 1:
        raise ConfigError(f"replay.memory={cfg.memory} must be in (0, 1] (a fraction of the stream's rows)")
    if cfg.buffer_size < 0:
        raise ConfigError(f"replay.buffer_size={cfg.buffer_size} must be >= 0 (0 = replay.memory x stream rows)")
    budget = int(cfg.memory * stream_rows)
    if stream_rows and cfg.buffer_size > budget:
        raise ConfigError(f"replay.buffer_size={cfg.buffer_size} exceeds the memory budget: replay.memory="
                          f"{cfg.memory} of the stream's {stream_rows} rows = {budget} rows")
    m = cfg.buffer_size or budget
    if m < 1:
        raise ConfigError(f"replay buffer of {m} rows: give replay.buffer_size or a larger replay.memory "
                          f"(stream rows: {stream_rows or 'unknown'})")
    return m


class Reservoir:
    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity, self.seen = capacity, 0
        self.items: Tensor | None = None
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, row: Tensor) -> None:
        if self.items is None:
            self.items = torch.zeros(self.capacity, *row.shape, dtype=row.dtype)
        if self.seen < self.capacity:
            self.items[self.seen] = row
        else:
            r = int(torch.randint(0, self.seen + 1, (1,), generator=self.gen))
            if r < self.capacity:
                self.items[r] = row
        self.seen += 1

    def __len__(self) -> int:
        return min(self.seen, self.capacity)


@STRATEGIES.register("replay")
class Replay(Strategy):
    name = "replay"

    def __init__(self, cfg: ReplayConfig, ctx: StrategyContext) -> None:
        super().__init__(cfg, ctx)
        if cfg.ratio < 0 or cfg.base_ratio < 0 or cfg.ratio + cfg.base_ratio > 1:
            raise ConfigError(f"replay.ratio={cfg.ratio} and replay.base_ratio={cfg.base_ratio} must be >= 0 "
                              "with a sum <= 1")
        if cfg.base_ratio > 0 and ctx.base_rows is None:
            raise ConfigError("replay.base_ratio > 0 needs base-corpus training rows (an init= run, or a surgery "
                              "config with train_text or more eval_text documents than eval_docs)")
        self.capacity = capacity(cfg, ctx.stream_rows)
        self.buffer = Reservoir(self.capacity, ctx.seed)
        self.task = 0

    def before_task(self, model, task_rows: Tensor, task_index: int) -> None:
        self.task = task_index

    def mix(self, batch: Tensor, step: int) -> Tensor:
        b = len(batch)
        k = round(self.cfg.ratio * b) if len(self.buffer) else 0
        kb = min(round(self.cfg.base_ratio * b), b - k)  # both rounded up (e.g. 0.5 + 0.5 of 3 rows)
        if k + kb == 0:
            return batch
        g = torch.Generator().manual_seed((self.ctx.seed * 1_000_003 + self.task) * 1_000_003 + step)
        parts = [batch[: b - k - kb]]
        if k:
            parts.append(self.buffer.items[torch.randint(0, len(self.buffer), (k,), generator=g)].to(batch.device))
        if kb:
            base = self.ctx.base_rows
            parts.append(base[torch.randint(0, len(base), (kb,), generator=g)].to(batch.device))
        return torch.cat(parts)

    def after_task(self, model, task_rows: Tensor, task_index: int) -> None:
        order = torch.randperm(len(task_rows), generator=self.buffer.gen)
        for i in order.tolist():
            self.buffer.add(task_rows[i].cpu())

    def stats(self) -> dict[str, float]:
        return {"replay_buffer": float(len(self.buffer))}

    def sources(self) -> dict[str, Tensor]:
        out = {} if self.buffer.items is None else {"buffer": self.buffer.items[: len(self.buffer)]}
        if self.cfg.base_ratio > 0 and self.ctx.base_rows is not None:
            out["base mixing pool"] = self.ctx.base_rows
        return out

    def state_dict(self) -> dict:
        out = {"seen": self.buffer.seen, "gen": self.buffer.gen.get_state()}
        if self.buffer.items is not None:
            out["items"] = self.buffer.items
        return out

    def load_state_dict(self, state: dict) -> None:
        self.buffer.seen = int(state["seen"])
        self.buffer.gen.set_state(state["gen"])
        self.buffer.items = state.get("items")
