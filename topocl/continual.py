"""`topocl continual CONFIG [k=v ...]`: train a pretrained model on a stream of tasks and measure forgetting.

For every (seed, order): evaluate all probes before continual training (after_task = -1), then train
on each task in turn with the one loop (`train_steps`) and evaluate every task's probes (and the base
probes and held-out base bits/byte) after it, appending tidy rows to results.jsonl:

    {"run", "seed", "order", "after_task", "step", "eval_task", "kind", "metric", "value"}

eval_task is the probe's task position in this run's training order (-1 for base knowledge); the stream
labels retain / update for that order (topocl.tasks.streams.build_stream). Metric `acc` (and acc_sum, em,
nll) is the headline: probes in no shortcut group; `acc@seen`, `acc@binary`, `acc@retaught` and `acc@all`
score those groups and every probe (topocl.tasks.base.probe_groups); `acc:TYPE` scores the headline probes
of one content type where a stream tags them (tags["type"]: campaign `fact` / `rule`). The
three axes compose: `adapter` (none | lora), `strategies` (vanilla, ewc, replay, dream; e.g.
[ewc, replay]) and the ACFT role policy `train.roles` (lr_scale, weight_decay, anchor). Reference
runs: `reference=joint` (for task j, train the initial model on tasks 0..j together) and
`reference=single` (for task j, train the initial model on task j alone).

    RUN/ config.yaml  meta.json  results.jsonl  cost.json  seed{S}-order{O}/{metrics.jsonl, checkpoints/}

meta.json `replicate` is the pretraining seed of the init model: streams of one pretrained model are nested
inside one replicate (reports average them before taking CIs over replicates; docs/protocol.md).

No leakage: the held-out base rows scored for bits/byte come from the pretraining run's validation split (a
surgery arm: the first eval_docs documents of eval_text); replay's base mixing draws from the pretraining
*training* split (a surgery arm: train_text, else eval_text's documents after eval_docs). Every training
source (task rows, the base mixing pool, every strategy's memory: replay buffer, dreams) is checked against
every held-out evaluation row when the run starts and after every task (`check_disjoint`); a shared row stops
the run with an error naming both. `split_dense=true` loads a dense-attention model as a split model at full
budget (same function, heads partitioned into the split presets' groups) so head-group role policies apply.

Opt-in analysis (`analysis.*`, topocl/analysis): telemetry=true adds seed{S}-order{O}/telemetry.jsonl
(per-role gradient cosine between tasks, drift); keep_task_checkpoints=true keeps the checkpoint before
every task (step_{j} = before task j, 0 = the initial weights) for `topocl analyze` (grafting, routing).

A killed run resumes at the last finished task with resume=true and produces the same rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from topocl.analysis.telemetry import AnalysisConfig, Telemetry
from topocl.checkpoint import NonFiniteCheckpoint, load_latest, load_tensors, save_checkpoint, write_json_atomic
from topocl.config import ConfigError, TrainConfig, load_config, save_config
from topocl.data import BatchSampler, pack_documents
from topocl.evaluate import score_probes
from topocl.jsonl import append_jsonl, rewrite_jsonl
from topocl.lora import LoRAConfig, apply_lora, has_lora, lora_policy
from topocl.optim import build_optimizer, optimizer_state_bytes, role_params
from topocl.pretrain import load_run
from topocl.registry import STRATEGIES
from topocl.strategies import DreamConfig, EWCConfig, ReplayConfig
from topocl.strategies.base import StrategyContext
from topocl.tasks import Probe, Task
from topocl.tasks.base import probe_groups
from topocl.tasks.streams import build_stream
from topocl.train import NonFiniteLoss, autocast_for, evaluate_loss, resolve_device, train_steps


@dataclass
class ContinualConfig:
    out_dir: str = "runs/continual"
    run: str = ""  # name written in results rows; "" = the out_dir's name
    init: str = ""  # pretrained run directory (topocl pretrain's out_dir)
    surgery: str = ""  # or: a surgery config (configs/surgery/*.yaml); the stream starts from its HF model
    surgery_arm: str = "surgery"  # with surgery=: surgery (head split) | full (every weight trains) | lora (PEFT)
    resume: bool = False
    seeds: list[int] = field(default_factory=lambda: [0])
    orders: list[int] = field(default_factory=lambda: [0])  # 0 = the stream's order; k > 0 = permutation seeded by k
    device: str = "auto"
    dtype: str = "auto"
    stream: str = "worlds"  # registry name: worlds | campaign | jsonl
    stream_options: dict[str, Any] = field(default_factory=dict)  # checked against the stream's own config
    strategies: list[str] = field(default_factory=lambda: ["vanilla"])
    adapter: str = "none"  # none | lora
    reference: str = "none"  # none | joint | single
    eval_every: int = 0  # also evaluate every N steps inside a task (0 = only at task ends)
    eval_base: bool = True  # base probes + held-out base-corpus bits/byte at each evaluation
    base_rows: int = 64  # held-out base rows for bits/byte (never trained on: replay mixes training-split rows)
    split_dense: bool = False  # load a dense model as a full-budget split model (attn.dense/sparse_heads roles)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=40, batch_size=16, lr=1e-3,
                                                                   warmup_steps=5, ckpt_every=10**9))
    ewc: EWCConfig = field(default_factory=EWCConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    dream: DreamConfig = field(default_factory=DreamConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)  # opt-in instruments (topocl/analysis)


# ----------------------------------------------------------------------------- helpers


def task_rows(task: Task, tok, seq_len: int) -> Tensor:
    return pack_documents(tok.encode_batch(task.texts), seq_len, tok.bos_id)


class LeakageError(ValueError):
    """A held-out evaluation row is also a training row."""


def row_keys(rows: Tensor) -> set[bytes]:
    """Exact identity of each token row (for set intersection)."""
    rows = rows.detach().to("cpu", torch.int64).contiguous()
    return {r.numpy().tobytes() for r in rows}


def check_disjoint(evals: dict[str, Tensor | None], sources: dict[str, Tensor | None]) -> None:
    """Raise LeakageError if any row of an evaluation set equals a row of a training source (same length rows;
    rows of other lengths cannot be the same sequence)."""
    for ename, ev in evals.items():
        if ev is None or not len(ev):
            continue
        keys = row_keys(ev)
        for sname, src in sources.items():
            if src is None or not len(src) or src.shape[-1] != ev.shape[-1]:
                continue
            shared = keys & row_keys(src)
            if shared:
                raise LeakageError(f"evaluation leakage: {len(shared)} of {len(ev)} rows of {ename} are also "
                                   f"training rows of {sname}")


def load_init(cfg: ContinualConfig, device: torch.device):
    """(model, tokenizer, pretraining config) of init=, as a full-budget split model when split_dense=true."""
    model, tok, pcfg = load_run(cfg.init, device)
    if cfg.split_dense:
        from topocl.model import split_from_dense

        model = split_from_dense(model)
    return model, tok, pcfg


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _append(path: Path, rows: list[dict]) -> None:
    append_jsonl(path, rows)  # strict JSON: NaN/inf as null


def _keep_rows(path: Path, keep) -> None:
    rewrite_jsonl(path, keep)  # on resume; a torn last line (a kill during an append) is dropped with a warning


class Evaluator:
    """All probes of all tasks (+ base probes and held-out bits/byte) -> tidy result rows."""

    def __init__(self, tasks: list[Task], base_probes: list[Probe], base_val: Tensor | None, tok, device, dtype):
        self.tok, self.device, self.dtype = tok, device, dtype
        self.probes = [p for t in tasks for p in t.probes]
        self.owner = [j for j, t in enumerate(tasks) for _ in t.probes]  # task position of each probe
        self.probes += base_probes
        self.owner += [-1] * len(base_probes)
        self.base_val = base_val

    @torch.no_grad()
    def __call__(self, model: nn.Module, ident: dict, after_task: int, step: int) -> list[dict]:
        model.eval()
        with autocast_for(self.device, self.dtype):
            scores = score_probes(model, self.tok, self.probes, device=self.device)
        groups: dict[tuple[int, str, str], list] = {}  # (task, kind, "" = headline | @group) -> scores
        for owner, p, s in zip(self.owner, self.probes, scores):
            shortcut = probe_groups(p)
            for g in [f"@{g}" for g in shortcut] or [""]:
                groups.setdefault((owner, s.kind, g), []).append(s)
            groups.setdefault((owner, s.kind, "@all"), []).append(s)
            if not shortcut and "type" in p.tags:  # headline probes by content type, e.g. campaign fact / rule
                groups.setdefault((owner, s.kind, f":{p.tags['type']}"), []).append(s)
        rows = []
        for (owner, kind, g), ss in sorted(groups.items()):
            metrics = [("acc", [s.correct for s in ss])]
            if not g:
                metrics += [("acc_sum", [s.correct_sum for s in ss]), ("em", [s.em for s in ss]),
                            ("nll", [s.nll for s in ss])]
            for metric, vals in metrics:
                rows.append({**ident, "after_task": after_task, "step": step, "eval_task": owner, "kind": kind,
                             "metric": metric + g, "value": float(sum(vals) / len(vals))})
        if self.base_val is not None:
            ev = evaluate_loss(model, self.base_val, self.tok.token_bytes(), batch_size=32, max_batches=0,
                               device=self.device, dtype=self.dtype)
            rows.append({**ident, "after_task": after_task, "step": step, "eval_task": -1, "kind": "base",
                         "metric": "bpb", "value": ev["val_bpb"]})
        model.train()
        return rows


# ----------------------------------------------------------------------------- one (seed, order)


class StreamRun:
    """One seed x order of one arm: owns its model, strategies, checkpoints and result rows."""

    def __init__(self, cfg: ContinualConfig, seed: int, order: int, out: Path):
        self.cfg, self.seed, self.order = cfg, seed, order
        self.dir = out / f"seed{seed}-order{order}"
        self.ident = {"run": cfg.run or out.name, "seed": seed, "order": order}
        self.device = resolve_device(cfg.device)
        torch.manual_seed(seed)  # a surgery arm's LoRA init draws here
        self.model, self.tok, self.seq_len, base_probes, base_val, self.base_pool = self._load()
        torch.manual_seed(seed)
        self.tasks = build_stream(cfg.stream, cfg.stream_options, order)  # training order, labelled for it
        self.rows = [task_rows(t, self.tok, self.seq_len) for t in self.tasks]
        self.evaluate = Evaluator(self.tasks, base_probes, base_val, self.tok, self.device, cfg.dtype)
        self.base_val = base_val
        self.check_leakage()
        self.init_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model = self._adapt(self.model)
        self.strategies = self._strategies()
        self.step = 0
        self.cost = {"step_times": [], "tokens": 0, "opt_bytes": 0}
        self.telemetry: Telemetry | None = None

    def _load(self) -> tuple[nn.Module, Any, int, list[Probe], Tensor | None, Tensor | None]:
        """(model, tokenizer, seq_len, base probes, held-out base rows, base mixing pool) of init= or of surgery=
        (its arm). The pool (training text only) is loaded when eval_base or replay.base_ratio > 0 asks for it."""
        from topocl.world import base_probes

        cfg = self.cfg
        pool_needed = "replay" in cfg.strategies and cfg.replay.base_ratio > 0
        if cfg.surgery:  # a pretrained HF model: base ability = common-sense probes + held-out eval_text bits/byte
            from topocl.surgery.arms import build_arm, heldout_rows, load_model_config

            scfg = load_model_config(cfg.surgery)
            model, tok, _ = build_arm(scfg, cfg.surgery_arm, self.device)
            pool = None
            if pool_needed and scfg.train_text:
                pool = heldout_rows(scfg, tok, scfg.train_text, scfg.train_docs)
            elif pool_needed and scfg.eval_text:  # eval_text's documents after the scored ones
                from topocl.data import load_corpus, pack_documents

                docs = load_corpus(scfg.eval_text)[scfg.eval_docs:]
                pool = pack_documents(tok.encode_batch(docs), scfg.eval_seq_len, tok.bos_id) if docs else None
            if not cfg.eval_base:
                return model, tok, scfg.eval_seq_len, [], None, pool
            val = heldout_rows(scfg, tok)[: cfg.base_rows] if scfg.eval_text else None
            return model, tok, scfg.eval_seq_len, base_probes(), val, pool
        model, tok, pcfg = load_init(cfg, self.device)
        if not (cfg.eval_base or pool_needed):
            return model, tok, pcfg.data.seq_len, [], None, None
        from topocl.data import prepare_data

        data = prepare_data(pcfg.data, pcfg.seed, tokenizer=tok)  # same split as pretraining
        pool = data.train if pool_needed else None  # the pretraining *training* split, never data.val
        if not cfg.eval_base:
            return model, tok, pcfg.data.seq_len, [], None, pool
        probes = base_probes() if pcfg.data.corpus == "synthetic" else []
        return model, tok, pcfg.data.seq_len, probes, data.val[: cfg.base_rows], pool

    def training_sources(self) -> dict[str, Tensor | None]:
        """Every token row this run trains on or may train on: task rows, the base mixing pool, strategy memory."""
        out: dict[str, Tensor | None] = {f"task {j}": r for j, r in enumerate(self.rows)}
        out["base mixing pool"] = self.base_pool
        for s in getattr(self, "strategies", []):
            out.update({f"{s.name} {k}": v for k, v in s.sources().items()})
        return out

    def check_leakage(self) -> None:
        check_disjoint({"the held-out base rows": self.base_val}, self.training_sources())

    def _adapt(self, model: nn.Module) -> nn.Module:
        if self.cfg.adapter == "lora":
            return apply_lora(model, self.cfg.lora)
        if self.cfg.adapter != "none":
            raise ConfigError(f"adapter={self.cfg.adapter!r}: use none | lora")
        return model

    def _strategies(self) -> list:
        ctx = StrategyContext(device=self.device, seed=self.seed, seq_len=self.seq_len,
                              batch_size=self.cfg.train.batch_size, base_rows=self.base_pool,
                              stream_rows=sum(len(r) for r in self.rows),
                              bos_id=self.tok.bos_id, train=self.cfg.train)
        return [STRATEGIES.get(n)(getattr(self.cfg, n, None), ctx) for n in self.cfg.strategies]

    # ------------------------------------------------------------------ checkpoints

    def save(self, next_task: int) -> None:
        tensors, meta = {}, {}
        for s in self.strategies:
            st = s.state_dict()
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{s.name}.{k}"] = v
                else:
                    meta[f"{s.name}.{k}"] = v
        save_checkpoint(self.dir / "checkpoints", next_task, self.model, None,
                        {"next_task": next_task, "runner_step": self.step, "strategies": meta, "cost": self.cost},
                        keep=0 if self.cfg.analysis.keep_task_checkpoints else 1, tensors=tensors)

    def restore(self) -> int:
        found = load_latest(self.dir / "checkpoints", self.model)  # a damaged checkpoint: the previous intact one
        if found is None:
            return 0
        ck, state = found
        tensors = load_tensors(ck)
        for s in self.strategies:
            pre = f"{s.name}."
            st = {k[len(pre):]: v for k, v in {**state["strategies"], **tensors}.items() if k.startswith(pre)}
            s.load_state_dict(st)
        self.step, self.cost = state["runner_step"], state["cost"]  # (state["step"] is the checkpoint's number)
        return state["next_task"]

    # ------------------------------------------------------------------ training

    def train_task(self, rows: Tensor, j: int, steps: int, bar: tqdm, results: Path) -> None:
        cfg = self.cfg
        roles = cfg.train.roles
        if cfg.adapter == "lora":
            roles = {**lora_policy(self.model), **roles}
        elif cfg.surgery:  # what the arm froze stays frozen (lr_scale 0: no optimizer state)
            roles = {**self.model.role_policy(), **roles}
        tr = dataclasses.replace(cfg.train, steps=steps, roles=roles)
        for s in self.strategies:
            s.before_task(self.model, rows, j)
        opt = build_optimizer(self.model, tr)
        anchors = {n: p.detach().clone() for g in opt.param_groups if g["anchor"] > 0
                   for n, p in zip(g["names"], g["params"])}
        anchor_rate = {n: g["anchor"] for g in opt.param_groups for n in g["names"]}
        sampler = BatchSampler(len(rows), tr.batch_size, seed=self.seed * 1000 + j)
        if self.telemetry is not None:
            self.telemetry.start_task(self.model, opt, j)

        def batches(step: int) -> Tensor:
            batch = rows[sampler.indices(step)]
            for s in self.strategies:
                batch = s.mix(batch, step)
            return batch

        def extra_loss(model, out, mb):
            terms = [t for s in self.strategies if (t := s.loss(model, out, mb)) is not None]
            return sum(terms[1:], terms[0]) if terms else out.loss.new_zeros(())

        params = dict(self.model.named_parameters())
        log = self.dir / "metrics.jsonl"
        for r in train_steps(self.model, opt, batches, range(tr.steps), cfg=tr, device=self.device,
                             dtype=cfg.dtype, extra_loss=extra_loss):
            with torch.no_grad():  # ACFT EMA anchoring of slow roles toward their task-start values
                for n, p0 in anchors.items():
                    params[n].lerp_(p0, anchor_rate[n])
            for s in self.strategies:
                s.after_step(self.model, r.step)
            self.step += 1
            self.cost["step_times"].append(r.dt)
            self.cost["tokens"] += r.tokens
            bar.update(1)
            bar.set_postfix(task=j, loss=f"{r.loss:.3f}", tok_s=f"{r.tokens_per_s:,.0f}", refresh=False)
            if (r.step + 1) % tr.log_every == 0:
                stats = {k: v for s in self.strategies for k, v in s.stats().items()}
                _append(log, [{"task": j, "step": self.step, "loss": r.loss, "lm_loss": r.lm_loss, "lr": r.lr,
                               "grad_norm": r.grad_norm, "tokens_per_s": r.tokens_per_s, **r.aux, **stats}])
            if cfg.eval_every and (r.step + 1) % cfg.eval_every == 0 and r.step + 1 < tr.steps:
                # inside task j: the last finished task is j - 1; the larger step tells it apart
                _append(results, self.evaluate(self.model, self.ident, j - 1, self.step))
        self.cost["opt_bytes"] = max(self.cost["opt_bytes"], optimizer_state_bytes(opt))
        self.cost.setdefault("epochs", []).append(tr.steps * tr.batch_size / len(rows))  # passes over the task rows
        for s in self.strategies:
            s.after_task(self.model, rows, j)
        if self.telemetry is not None:  # after the strategies: drift at the task boundary
            self.telemetry.end_task(self.model, self.step)
        self.check_leakage()  # the strategies' memory as it will be trained on

    def reset_to_init(self) -> None:
        if has_lora(self.model) and not self.cfg.surgery:  # a fresh adapter on the initial weights
            self.model = self._adapt(load_init(self.cfg, self.device)[0])
        else:
            self.model.load_state_dict(self.init_state)

    def run(self, results: Path) -> dict:
        cfg = self.cfg
        self.dir.mkdir(parents=True, exist_ok=True)
        start = self.restore() if cfg.resume else 0
        mine = lambda r: r["seed"] == self.seed and r["order"] == self.order  # noqa: E731
        done_step = self.step  # rows after the last finished task's evaluation belong to the killed task
        _keep_rows(results, lambda r: not (mine(r) and (start == 0 or r["step"] > done_step
                                                         or r["after_task"] >= start)))
        _keep_rows(self.dir / "metrics.jsonl", lambda r: r["task"] < start)
        if cfg.analysis.telemetry:
            self.telemetry = Telemetry(self.model, cfg.analysis, self.dir, start)
        if start == 0:
            _append(results, self.evaluate(self.model, self.ident, -1, 0))
            if cfg.analysis.keep_task_checkpoints:
                self.save(0)  # the weights before task 0, for grafting
        t0 = time.perf_counter()
        joint = cfg.reference == "joint"
        steps = [cfg.train.steps * (j + 1 if joint else 1) for j in range(len(self.tasks))]  # joint: same steps/task
        bar = tqdm(total=sum(steps), initial=sum(steps[:start]), desc=f"{self.ident['run']} s{self.seed} "
                   f"o{self.order}", unit="step", dynamic_ncols=True, file=sys.stderr)
        with bar:  # closed on a non-finite stop too, so the message gets a line of its own
            for j in range(start, len(self.tasks)):
                if cfg.reference in ("joint", "single"):
                    self.reset_to_init()
                rows = torch.cat(self.rows[: j + 1]) if joint else self.rows[j]
                self.train_task(rows, j, steps[j], bar, results)
                _append(results, self.evaluate(self.model, self.ident, j, self.step))
                self.save(j + 1)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        times, epochs = self.cost["step_times"], self.cost.get("epochs", [])
        return {"epochs_per_row": sum(epochs) / max(len(epochs), 1), "trainable_params": trainable,
                "trainable_by_role": {r: sum(p.numel() for _, p in ps if p.requires_grad)
                                      for r, ps in role_params(self.model).items()},
                "optimizer_state_bytes": self.cost["opt_bytes"], "peak_memory_bytes": peak_memory_bytes(self.device),
                "step_time_s": sum(times) / max(len(times), 1), "tokens": self.cost["tokens"],
                "wall_s": time.perf_counter() - t0, "device": str(self.device)}


def run_continual(cfg: ContinualConfig) -> Path:
    if not cfg.init and not cfg.surgery:
        raise ConfigError("init= must name a pretrained run directory (topocl pretrain's out_dir), or surgery= a "
                          "surgery config (configs/surgery/*.yaml)")
    if cfg.init and cfg.surgery:
        raise ConfigError("give init= (a TopoCL pretrained run) or surgery= (an HF model's surgery config), not both")
    if cfg.surgery and cfg.adapter != "none":
        raise ConfigError("with surgery= the arm chooses the adapter: surgery_arm=lora, not adapter=lora")
    if cfg.surgery and cfg.surgery_arm not in ("surgery", "full", "lora"):
        raise ConfigError(f"surgery_arm={cfg.surgery_arm!r}: use surgery | full | lora")
    if cfg.reference not in ("none", "joint", "single"):
        raise ConfigError(f"reference={cfg.reference!r}: use none | joint | single")
    for n in cfg.strategies:
        STRATEGIES.get(n)
    out = Path(cfg.out_dir)
    results = out / "results.jsonl"
    if results.exists() and not cfg.resume:
        raise ConfigError(f"{out} already holds results; pass resume=true to continue it or choose another "
                          "out_dir= (nothing was overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    write_meta(cfg, out)
    costs = []
    for seed in cfg.seeds:
        for order in cfg.orders:
            costs.append({"seed": seed, "order": order, **StreamRun(cfg, seed, order, out).run(results)})
    write_json_atomic(out / "cost.json", {"runs": costs, **{k: _mean(costs, k) for k in costs[0]
                                                            if isinstance(costs[0][k], int | float)}})
    return out


def write_meta(cfg: ContinualConfig, out: Path) -> None:
    """out/meta.json: versions, git sha, device, seeds/orders and where the model came from. A resumed run keeps
    the first start time and records when it was resumed."""
    import platform

    import transformers

    import topocl
    from topocl.pretrain import git_sha

    device = resolve_device(cfg.device)
    path = out / "meta.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    meta = {"topocl": topocl.__version__, "git_sha": git_sha(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "platform": platform.platform(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "seeds": cfg.seeds, "orders": cfg.orders, "init": cfg.init or f"{cfg.surgery} ({cfg.surgery_arm})",
            "replicate": init_replicate(cfg), "started": old.get("started", now)}
    if old:
        meta["resumed"] = now
    write_json_atomic(path, meta)


def init_replicate(cfg: ContinualConfig) -> int | None:
    """The unit of replication of this run's streams: the pretraining seed of the init run (its config.yaml
    `seed`); None for a surgery arm (one fixed HF model). docs/protocol.md."""
    path = Path(cfg.init) / "config.yaml"
    if not cfg.init or not path.is_file():  # a missing init fails with its own message when it is loaded
        return None
    import yaml

    seed = (yaml.safe_load(path.read_text()) or {}).get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def _mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows]
    return sum(vals) / len(vals) if vals else math.nan


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="topocl continual", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        out = run_continual(load_config(ContinualConfig, args.config, args.overrides))
    except (NonFiniteLoss, NonFiniteCheckpoint) as e:
        print(f"topocl continual: stopped: {e}", file=sys.stderr)
        return 1
    cost = json.loads((out / "cost.json").read_text())
    print(f"epochs per row: {cost['epochs_per_row']:.1f} (train.steps x train.batch_size / the task's rows, mean "
          "over tasks)")
    print(f"run directory: {out}  (results: {out / 'results.jsonl'})")
    return 0
