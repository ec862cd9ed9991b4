"""Per-role telemetry during a continual run (opt-in: `analysis.telemetry=true`; off = not constructed).

While task j trains, an optimizer step pre-hook adds each trainable parameter's (clipped) gradient and its
square to running sums. At the end of task j, for every role, every pathway (slow / fast, DESIGN.md table)
and `all`, rows go to seed{S}-order{O}/telemetry.jsonl:

    {"after_task": j, "step", "group", "measure", "ref_task", "value"}   (ref_task -1 unless grad_cos)

    grad_cos          cos(ḡ_j, ḡ_i) for every earlier task i (ref_task = i): ḡ = the task's mean training
                      gradient, kept per role as an exact vector (sketch_dim 0) or a count sketch of sketch_dim
                      entries (unbiased inner products, std ≈ 1/√dim); pathways sum the roles' dot products.
                      H1's statistic (evidence.h1_values) is |cos| of pathway.slow minus pathway.fast
    grad_energy       mean over steps and parameters of g² (the mean empirical-Fisher diagonal)
    drift_stream      ||θ − θ_stream_start|| / ||θ_stream_start||
    drift_task        ||θ − θ_task_start|| / ||θ_task_start||
    fisher_drift_*    the same weighted by F_old, the empirical Fisher (mean g² over training steps, TRACE's
                      estimator) summed over the earlier tasks 0..j-1: sqrt(Σ F Δ² / Σ F θ0²); from task 1 on

A frozen role (lr_scale 0) has no gradient: no grad_* rows, drift 0. State needed across tasks (stream-start
weights, F_old, sketches) is saved to telemetry_state.safetensors at each task end, so resume continues.
Memory when on: 5 × the trainable parameters (sums, snapshots, F_old) plus the sketches.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from topocl.analysis.artifacts import append_jsonl, read_jsonl, write_jsonl


@dataclass
class AnalysisConfig:
    telemetry: bool = False  # per-role gradient cosine / drift rows -> seed{S}-order{O}/telemetry.jsonl
    sketch_dim: int = 4096  # per-role gradient sketch size; 0 = exact mean gradients (tasks x params memory)
    keep_task_checkpoints: bool = False  # keep every task-boundary checkpoint (+ the initial one) for grafting


# ----------------------------------------------------------------------------- pure measures


def cosine(a: Tensor, b: Tensor) -> float:
    """cos(a, b) of two flat vectors [n]; NaN if either is zero."""
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else math.nan


def count_sketch(v: Tensor, dim: int, seed: int) -> Tensor:
    """[n] -> [dim]: entry i goes to bucket h(i) with sign s(i), both drawn from `seed` (the same seed gives
    the same map, so sketches of one role from different tasks are comparable). E[<S a, S b>] = <a, b>."""
    g = torch.Generator().manual_seed(seed)
    bucket = torch.randint(0, dim, (v.numel(),), generator=g)  # [n]
    sign = torch.randint(0, 2, (v.numel(),), generator=g).float() * 2 - 1  # [n]
    return torch.zeros(dim).index_add_(0, bucket, sign * v.detach().float().cpu())


def relative_drift(theta: Tensor, theta0: Tensor) -> float:
    """||θ − θ0|| / ||θ0|| of flat vectors (NaN when θ0 = 0)."""
    n0 = float(theta0.norm())
    return float((theta - theta0).norm()) / n0 if n0 > 0 else math.nan


def fisher_drift(theta: Tensor, theta0: Tensor, fisher: Tensor) -> float:
    """sqrt(Σ F (θ − θ0)² / Σ F θ0²): relative drift in the Fisher metric (= relative_drift for constant F)."""
    den = float((fisher * theta0.square()).sum())
    return math.sqrt(float((fisher * (theta - theta0).square()).sum()) / den) if den > 0 else math.nan


def flat(tensors: dict[str, Tensor], names: list[str]) -> Tensor:
    """Concatenation of the named tensors, flattened, fp32: [Σ numel]."""
    return torch.cat([tensors[n].detach().float().reshape(-1) for n in names]) if names else torch.zeros(0)


def role_seed(role: str) -> int:
    return zlib.crc32(role.encode())


# ----------------------------------------------------------------------------- the recorder


class Telemetry:
    """Opt-in recorder used by the continual runner: `start_task` before a task's steps, `end_task` after."""

    def __init__(self, model: nn.Module, cfg: AnalysisConfig, out_dir: Path, start: int = 0) -> None:
        self.cfg, self.dir = cfg, Path(out_dir)
        self.path, self.state_path = self.dir / "telemetry.jsonl", self.dir / "telemetry_state.safetensors"
        base = getattr(model, "module", model)
        roles = base.param_roles()
        self.by_role: dict[str, list[str]] = {}
        for name, role in sorted(roles.items()):
            self.by_role.setdefault(role, []).append(name)
        slow, fast = base.pathway_roles()
        self.groups: dict[str, list[str]] = {r: [r] for r in self.by_role}
        self.groups.update({"pathway.slow": sorted(slow & set(self.by_role)),
                            "pathway.fast": sorted(fast & set(self.by_role)), "all": sorted(self.by_role)})
        self.groups = {g: rs for g, rs in self.groups.items() if rs}
        self.sketches: dict[int, dict[str, Tensor]] = {}  # task -> role -> sketch [dim] (or exact [n])
        self.fisher_old: dict[str, Tensor] = {}
        if start == 0:
            self.stream_start = {n: p.detach().clone() for n, p in base.named_parameters()}
            write_jsonl(self.path, [])
            self.state_path.unlink(missing_ok=True)
        else:
            self._load(start)
        self._hook = None

    # ------------------------------------------------------------------ state

    def _save(self) -> None:
        tensors = {f"start::{n}": v.cpu().contiguous() for n, v in self.stream_start.items()}
        tensors.update({f"fisher::{n}": v.cpu().contiguous() for n, v in self.fisher_old.items()})
        tensors.update({f"sketch::{j}::{r}": v.contiguous() for j, s in self.sketches.items() for r, v in s.items()})
        tmp = self.state_path.with_name(f".{self.state_path.name}.tmp")
        save_file(tensors, tmp)
        os.replace(tmp, self.state_path)

    def _load(self, start: int) -> None:
        if not self.state_path.is_file():
            raise FileNotFoundError(f"{self.state_path} is missing: cannot resume telemetry at task {start} "
                                    "(rerun from the start, or resume with analysis.telemetry=false)")
        state = load_file(self.state_path)
        self.stream_start = {k.split("::", 1)[1]: v for k, v in state.items() if k.startswith("start::")}
        self.fisher_old = {k.split("::", 1)[1]: v for k, v in state.items() if k.startswith("fisher::")}
        for k, v in state.items():
            if k.startswith("sketch::"):
                _, j, r = k.split("::", 2)
                if int(j) < start:
                    self.sketches.setdefault(int(j), {})[r] = v
        rows = read_jsonl(self.path) if self.path.is_file() else []
        write_jsonl(self.path, [r for r in rows if r["after_task"] < start])

    # ------------------------------------------------------------------ hooks

    def start_task(self, model: nn.Module, opt: torch.optim.Optimizer, task: int) -> None:
        base = getattr(model, "module", model)
        self.task, self.steps = task, 0
        self.task_start = {n: p.detach().clone() for n, p in base.named_parameters()}
        self.grad_sum: dict[str, Tensor] = {}
        self.sq_sum: dict[str, Tensor] = {}
        self._hook = opt.register_step_pre_hook(self._on_step)

    @torch.no_grad()
    def _on_step(self, opt: torch.optim.Optimizer, args, kwargs) -> None:
        self.steps += 1
        for g in opt.param_groups:
            for n, p in zip(g["names"], g["params"]):
                if p.grad is None:
                    continue
                gr = p.grad.detach().float()
                if n in self.grad_sum:
                    self.grad_sum[n].add_(gr)
                    self.sq_sum[n].add_(gr.square())
                else:
                    self.grad_sum[n], self.sq_sum[n] = gr.clone(), gr.square()

    @torch.no_grad()
    def end_task(self, model: nn.Module, step: int) -> list[dict]:
        """Rows for the task just trained (also appended to telemetry.jsonl); saves the state."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        base = getattr(model, "module", model)
        theta = {n: p.detach() for n, p in base.named_parameters()}
        j, n_steps = self.task, max(self.steps, 1)
        fisher_j = {n: s / n_steps for n, s in self.sq_sum.items()}
        sketch = {}
        for role, names in self.by_role.items():
            if names and all(n in self.grad_sum for n in names):
                mean = flat(self.grad_sum, names) / n_steps
                sketch[role] = (mean.cpu() if self.cfg.sketch_dim <= 0
                                else count_sketch(mean, self.cfg.sketch_dim, role_seed(role)))
        rows = []

        def row(group: str, measure: str, value: float, ref: int = -1) -> None:
            rows.append({"after_task": j, "step": step, "group": group, "measure": measure, "ref_task": ref,
                         "value": float(value)})

        for group, rs in self.groups.items():
            names = [n for r in rs for n in self.by_role[r]]
            th, th0, tht = flat(theta, names), flat(self.stream_start, names), flat(self.task_start, names)
            row(group, "drift_stream", relative_drift(th, th0))
            row(group, "drift_task", relative_drift(th, tht))
            if self.fisher_old:
                f = torch.cat([self.fisher_old[n].float().reshape(-1) if n in self.fisher_old
                               else torch.zeros(theta[n].numel(), device=th.device) for n in names])
                row(group, "fisher_drift_stream", fisher_drift(th, th0, f.to(th.device)))
                row(group, "fisher_drift_task", fisher_drift(th, tht, f.to(th.device)))
            got = [n for n in names if n in self.sq_sum]
            if got:
                row(group, "grad_energy", sum(float(self.sq_sum[n].sum()) for n in got)
                    / (n_steps * sum(theta[n].numel() for n in got)))
            live = [r for r in rs if r in sketch]
            for i, old in sorted(self.sketches.items()):
                both = [r for r in live if r in old]
                if both:
                    dot = sum(float(sketch[r] @ old[r]) for r in both)
                    na = math.sqrt(sum(float(sketch[r].square().sum()) for r in both))
                    nb = math.sqrt(sum(float(old[r].square().sum()) for r in both))
                    row(group, "grad_cos", dot / (na * nb) if na > 0 and nb > 0 else math.nan, i)
        self.sketches[j] = sketch
        for n, f in fisher_j.items():
            self.fisher_old[n] = self.fisher_old[n] + f if n in self.fisher_old else f
        append_jsonl(self.path, rows)
        self._save()
        return rows
