"""Re-open one finished (seed, order) stream of a continual run for post-hoc analysis: its resolved config,
tasks in training order, tokenizer, model and task-boundary checkpoints.

Checkpoint numbering is the runner's: checkpoint k holds the weights before task k (after task k - 1);
k = 0 is the initial model (saved with analysis.keep_task_checkpoints=true, else rebuilt from `init`),
k = T the end of the stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from topocl.checkpoint import complete_checkpoints, read_weights
from topocl.config import from_dict
from topocl.continual import ContinualConfig, load_init
from topocl.evaluate import score_probes
from topocl.lora import apply_lora
from topocl.tasks import Task
from topocl.tasks.streams import build_stream
from topocl.train import autocast_for, resolve_device


@dataclass
class Stream:
    cfg: ContinualConfig
    seed: int
    order: int
    dir: Path  # RUN/seed{S}-order{O}
    tasks: list[Task]  # training order
    tok: object
    model: nn.Module  # weights: whatever was loaded last (see load_weights)
    device: torch.device
    checkpoints: dict[int, Path]  # k (weights before task k) -> checkpoint directory
    initial: dict[str, Tensor]  # the weights before task 0
    seq_len: int  # the pretraining sequence length (task texts are packed to it)

    def weights(self, k: int) -> dict[str, Tensor]:
        """State dict at checkpoint k (0 = initial), on the model's device."""
        if k == 0 and 0 not in self.checkpoints:
            return self.initial
        if k not in self.checkpoints:
            raise FileNotFoundError(f"{self.dir}: no checkpoint before task {k} (have {sorted(self.checkpoints)}); "
                                    "rerun the stream with analysis.keep_task_checkpoints=true")
        return {n: v.to(self.device) for n, v in read_weights(self.checkpoints[k] / "model.safetensors").items()}

    def load_weights(self, k: int) -> None:
        self.model.load_state_dict(self.weights(k))


def boundary_checkpoints(ckpt_dir: Path) -> dict[int, Path]:
    """next_task -> complete checkpoint directory."""
    out = {}
    for p in complete_checkpoints(ckpt_dir):
        out[int(json.loads((p / "state.json").read_text())["next_task"])] = p
    return out


def open_stream(run_dir: str | Path, seed: int, order: int, device: str = "auto") -> Stream:
    run_dir = Path(run_dir)
    cfg = from_dict(ContinualConfig, yaml.safe_load((run_dir / "config.yaml").read_text()),
                    str(run_dir / "config.yaml"))
    dev = resolve_device(device if device != "auto" else cfg.device)
    model, tok, pcfg = load_init(cfg, dev)  # split_dense=true: the partitioned model the run trained
    if cfg.adapter == "lora":
        model = apply_lora(model, cfg.lora)
    tasks = build_stream(cfg.stream, cfg.stream_options, order)  # the runner's training order and its labels
    d = run_dir / f"seed{seed}-order{order}"
    initial = {n: v.clone() for n, v in model.state_dict().items()}
    model.eval()
    return Stream(cfg, seed, order, d, tasks, tok, model, dev, boundary_checkpoints(d / "checkpoints"), initial,
                  pcfg.data.seq_len)


def probe_type(tags: dict) -> str:
    """fact | rule (campaign tags) | untyped."""
    return tags.get("type", "untyped")


@torch.no_grad()
def score_by_group(st: Stream) -> dict[tuple[int, str, str], float]:
    """(task position, probe kind, probe type) -> candidate accuracy of the model as it is now."""
    probes = [p for t in st.tasks for p in t.probes]
    owner = [j for j, t in enumerate(st.tasks) for _ in t.probes]
    with autocast_for(st.device, st.cfg.dtype):
        scores = score_probes(st.model, st.tok, probes, device=st.device, exact_match=False)
    groups: dict[tuple[int, str, str], list[bool]] = {}
    for j, p, s in zip(owner, probes, scores):
        groups.setdefault((j, p.kind, probe_type(p.tags)), []).append(s.correct)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}
