"""The one training loop. Pretraining and every continual strategy call `train_steps`.

    for r in train_steps(model, opt, batches, range(start, stop), cfg=train_cfg, device=dev):
        ...  # log r.loss, evaluate, checkpoint between steps

`batches(step)` returns this rank's [B_local, T+1] token rows for `step`, so the data position is the
step. A strategy changes what is trained through `batches` (e.g. replay mixing), adds a loss through
`extra_loss(model, out, micro_batch)`, and acts after a step on the yielded result (EMA anchoring).
The loop does: LR schedule per role group, micro-batches (grad accumulation), bf16 autocast on CUDA,
DDP no_sync, non-finite loss / gradient-norm stop (before the optimizer step, so weights stay good), grad
clipping.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from topocl.config import TrainConfig
from topocl.optim import lr_factor, set_lr


class NonFiniteLoss(RuntimeError):
    """The loss or its gradient norm became NaN/inf; the step was not applied."""


@dataclass
class StepResult:
    step: int  # the step just completed (0-based)
    loss: float  # total loss (LM + aux), mean over the global batch
    lm_loss: float  # next-token cross entropy, nats/token
    lr: float
    grad_norm: float
    tokens: int  # tokens in this step's global batch
    dt: float  # seconds for this step
    aux: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.dt, 1e-9)


# ----------------------------------------------------------------------------- devices / ranks


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device(f"cuda:{local}")
        return torch.device("cpu")
    return torch.device(name)


def autocast_for(device: torch.device, dtype: str = "auto"):
    """bf16 autocast on CUDA (auto), fp32 elsewhere."""
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def init_distributed() -> tuple[int, int]:
    """(rank, world_size); initialises the process group under torchrun (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_mean(values: Tensor) -> Tensor:
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


# ----------------------------------------------------------------------------- the loop


def train_steps(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: Callable[[int], Tensor],
    steps: Iterable[int],
    *,
    cfg: TrainConfig,
    device: torch.device,
    dtype: str = "auto",
    extra_loss: Callable[[nn.Module, object, Tensor], Tensor] | None = None,
    lr_fn: Callable[[int], float] | None = None,
) -> Iterator[StepResult]:
    """Run the given optimizer steps, yielding a StepResult after each. `model` may be DDP-wrapped.
    `lr_fn(step)` overrides the warm-up + cosine factor (continual tasks use their own schedule)."""
    model.train()
    params = [p for g in opt.param_groups for p in g["params"]]
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    for step in steps:
        t0 = time.perf_counter()
        lr = set_lr(opt, cfg.lr, (lr_fn or (lambda s: lr_factor(s, cfg)))(step))
        rows = batches(step).to(device, non_blocking=True)  # [B_local, T+1]
        micro = rows.chunk(cfg.grad_accum)  # grad_accum x [B_local / grad_accum, T+1]
        sums = torch.zeros(2, device=device)  # total loss, lm loss (means over micro-batches)
        aux_sums: dict[str, float] = {}
        for i, mb in enumerate(micro):
            x, y = mb[:, :-1], mb[:, 1:]  # [b, T], [b, T]
            sync = (not ddp) or i == len(micro) - 1
            with (nullcontext() if sync else model.no_sync()), autocast_for(device, dtype):
                out = model(x, y)
                loss = out.loss
                if extra_loss is not None:
                    loss = loss + extra_loss(model, out, mb)
            (loss / len(micro)).backward()
            sums += torch.stack([loss.detach().float(), out.lm_loss.detach().float()]) / len(micro)
            for k, v in out.aux.items():
                aux_sums[k] = aux_sums.get(k, 0.0) + float(v.detach()) / len(micro)
        sums = all_mean(sums)
        total, lm = float(sums[0]), float(sums[1])
        if not math.isfinite(total):
            opt.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"loss is {total} at step {step}: stopping before the optimizer step; "
                                "the last good checkpoint is kept (lower train.lr or check the data)")
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if not math.isfinite(float(gnorm)):  # a finite loss can still overflow its gradient (e.g. train.lr=1e6)
            opt.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"gradient norm is {float(gnorm)} at step {step} (loss {total:.4g}): stopping before "
                                "the optimizer step; the last good checkpoint is kept (lower train.lr or check the "
                                "data)")
        opt.step()
        opt.zero_grad(set_to_none=True)
        n_tokens = rows[:, 1:].numel() * (dist.get_world_size() if dist.is_initialized() else 1)
        yield StepResult(step=step, loss=total, lm_loss=lm, lr=lr, grad_norm=float(gnorm), tokens=n_tokens,
                         dt=time.perf_counter() - t0, aux=aux_sums)


@torch.no_grad()
def evaluate_loss(model: nn.Module, rows: Tensor, token_bytes: Tensor | None, *, batch_size: int,
                  max_batches: int, device: torch.device, dtype: str = "auto") -> dict[str, float]:
    """Held-out next-token loss over the first `max_batches * batch_size` rows (deterministic), and exact
    bits per byte: sum of target NLL / ln 2 / sum of target bytes. Returns nats/token and bits/byte."""
    rows = rows[: max_batches * batch_size] if max_batches > 0 else rows
    if len(rows) == 0:
        return {}  # no held-out data (val_fraction=0): report nothing rather than a fake 0
    was_training = model.training
    model.eval()
    nll_sum, n_tok, n_bytes = 0.0, 0, 0
    for i in range(0, len(rows), batch_size):
        mb = rows[i:i + batch_size].to(device)
        x, y = mb[:, :-1], mb[:, 1:]
        with autocast_for(device, dtype):
            logits = model(x).logits  # [b, T, V]
        nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        nll_sum += float(nll)
        n_tok += y.numel()
        if token_bytes is not None:
            n_bytes += int(token_bytes.to(y.device)[y].sum())
    if was_training:
        model.train()
    out = {"val_loss": nll_sum / max(n_tok, 1)}
    if token_bytes is not None and n_bytes:
        out["val_bpb"] = nll_sum / math.log(2) / n_bytes
    return out
