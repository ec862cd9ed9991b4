"""`topocl pretrain CONFIG [k=v ...]`: pretrain a model from scratch and write a run directory.

    RUN/ config.yaml  meta.json  metrics.jsonl  tokenizer.json  checkpoints/  samples.txt  summary.json

Runs unchanged under `torchrun --nproc_per_node=N -m topocl pretrain ...` (DDP). `resume=true`
continues from the newest intact checkpoint on the same loss curve (a damaged one is skipped, saying so);
a run killed after its last checkpoint only finishes its summary, and a finished run is left as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

import topocl
from topocl.attention import dsa
from topocl.checkpoint import (
    CheckpointError,
    NonFiniteCheckpoint,
    latest_checkpoint,
    load_checkpoint,
    load_latest,
    read_state,
    save_checkpoint,
    write_json_atomic,
)
from topocl.config import ConfigError, PretrainConfig, from_dict, load_config, save_config, to_dict
from topocl.data import BatchSampler, prepare_data
from topocl.jsonl import append_jsonl, rewrite_jsonl
from topocl.model import GPT
from topocl.optim import build_optimizer
from topocl.tokenizer import Tokenizer
from topocl.train import (
    NonFiniteLoss,
    autocast_for,
    evaluate_loss,
    init_distributed,
    is_main,
    resolve_device,
    train_steps,
)


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_meta(cfg: PretrainConfig, model: GPT, device: torch.device, world: int, data_stats: dict) -> dict:
    import numpy
    import tokenizers

    return {
        "topocl": topocl.__version__,
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "tokenizers": tokenizers.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "world_size": world,
        "seed": cfg.seed,
        "params_total": model.num_params(),
        "params_non_embedding": model.num_params(non_embedding=True),
        "params_by_role": model.params_by_role(),
        "data": data_stats,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def finished(cfg: PretrainConfig, out: Path) -> bool:
    """The run in `out` has its summary (written last) for cfg.train.steps steps: nothing left to do."""
    ck = latest_checkpoint(out / "checkpoints")
    try:
        summary = json.loads((out / "summary.json").read_text())
        done = read_state(ck).get("next_step", -1) if ck else -1
    except (OSError, ValueError):
        return False
    has_val = cfg.data.val_fraction > 0
    return done == cfg.train.steps and summary.get("steps", done) == done and ("val_loss" in summary or not has_val)


def _check_resume_config(cfg: PretrainConfig, out: Path) -> None:
    saved = from_dict(PretrainConfig, yaml.safe_load((out / "config.yaml").read_text()), str(out / "config.yaml"))
    for section in ("model", "data"):
        a, b = to_dict(getattr(saved, section)), to_dict(getattr(cfg, section))
        if section == "model":
            b["vocab_size"] = a["vocab_size"] if b["vocab_size"] == 0 else b["vocab_size"]
        diff = sorted(k for k in a if a[k] != b[k])
        if diff:
            raise ConfigError(f"resume=true but {section}.{diff[0]} differs from {out / 'config.yaml'} "
                              f"(differing: {', '.join(diff)}); resume with the run's own settings")


def load_run(run_dir: str | Path, device: torch.device | str = "cpu",
             checkpoint: str | Path | None = None) -> tuple[GPT, Tokenizer, PretrainConfig]:
    """Model (from the newest or the given checkpoint), tokenizer and config of a pretraining run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = from_dict(PretrainConfig, yaml.safe_load((run_dir / "config.yaml").read_text()),
                    str(run_dir / "config.yaml"))
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    model = GPT(cfg.model)
    ck = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir / "checkpoints")
    if ck is None:
        raise CheckpointError(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    load_checkpoint(ck, model, restore_rng=False)
    return model.to(device).eval(), tok, cfg


def write_samples(model: GPT, tok: Tokenizer, prompts: list[str], path: Path, device: torch.device,
                  max_new_tokens: int = 48) -> list[str]:
    model.eval()
    outs = []
    for p in prompts:
        idx = torch.tensor([[tok.bos_id, *tok.encode(p)]], device=device)
        gen = model.generate(idx, max_new_tokens, stop_id=tok.bos_id)[0, 1:].tolist()
        outs.append(tok.decode(gen))
    path.write_text("".join(f"--- prompt: {p!r}\n{o}\n\n" for p, o in zip(prompts, outs)))
    return outs


def pretrain(cfg: PretrainConfig) -> Path:
    """Train per `cfg`; returns the run directory."""
    rank, world = init_distributed()
    device = resolve_device(cfg.device)
    out = Path(cfg.out_dir)
    ckpt_dir = out / "checkpoints"
    tr = cfg.train
    if tr.batch_size % (world * tr.grad_accum):
        raise ConfigError(f"train.batch_size={tr.batch_size} must be divisible by world_size*grad_accum="
                          f"{world * tr.grad_accum}")
    ck = latest_checkpoint(ckpt_dir)
    if cfg.resume and ck is None:
        raise CheckpointError(f"resume=true but {ckpt_dir} holds no complete checkpoint")
    if not cfg.resume and ck is not None:
        raise ConfigError(f"{out} already holds checkpoints; pass resume=true to continue it or choose "
                          "another out_dir= (nothing was overwritten)")
    if cfg.resume:
        _check_resume_config(cfg, out)
        if finished(cfg, out):
            if is_main():
                print(f"{out} is a finished run ({tr.steps} steps, summary.json): nothing to do", file=sys.stderr)
            return out

    tok_path = out / "tokenizer.json" if cfg.resume else (Path(cfg.data.tokenizer) if cfg.data.tokenizer else None)
    data = prepare_data(cfg.data, cfg.seed, tokenizer=Tokenizer.load(tok_path) if tok_path else None)
    tok = data.tokenizer
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tok.vocab_size
    if cfg.model.vocab_size < tok.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} < tokenizer vocab {tok.vocab_size}")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} > model.max_seq_len={cfg.model.max_seq_len}")

    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model).to(device)
    opt = build_optimizer(model, tr)
    start = 0
    if cfg.resume:
        ck, state = load_latest(ckpt_dir, model, opt)
        start = state["next_step"]
        if start > tr.steps:
            raise ConfigError(f"resume=true with train.steps={tr.steps}, but {ck} is already at step {start}")
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        tok.save(out / "tokenizer.json")
        if not cfg.resume:
            write_json_atomic(out / "meta.json", run_meta(cfg, model, device, world, data.stats))
        rewrite_jsonl(out / "metrics.jsonl", lambda r: r.get("step", -1) < start)  # drops a torn last line too
    train_model = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        frozen_warmup = cfg.model.dsa.warmup_trains == "indexer" and start < cfg.model.dsa.warmup_steps
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=cfg.model.attention == "dsa" and frozen_warmup)
    if tr.compile:
        train_model = torch.compile(train_model)
    phase = dsa.schedule(model, start, opt)  # DSA's two-stage recipe (None without DSA layers); after DDP wraps
    recall: dict[str, list[float]] = {}  # DSA: indexer recall per stage

    sampler = BatchSampler(len(data.train), tr.batch_size, cfg.seed, rank, world)
    token_bytes = tok.token_bytes()
    bar = tqdm(total=tr.steps, initial=start, desc="pretrain", unit="step", disable=not is_main(),
               dynamic_ncols=True, file=sys.stderr)
    tokens_seen = start * tr.batch_size * cfg.data.seq_len
    last: dict = {}
    with bar:  # closed on a non-finite stop too, so the message gets a line of its own
        for r in train_steps(train_model, opt, lambda s: data.train[sampler.indices(s)], range(start, tr.steps),
                             cfg=tr, device=device, dtype=cfg.dtype):
            tokens_seen += r.tokens
            done = r.step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{r.loss:.3f}", tok_s=f"{r.tokens_per_s:,.0f}", refresh=False)
            if phase is not None:
                recall.setdefault(phase, []).append(r.aux.get("stat.dsa_recall", math.nan))
            if is_main() and (done % tr.log_every == 0 or done == tr.steps):
                append_jsonl(out / "metrics.jsonl", [{
                    "step": r.step, "train_loss": r.loss, "lm_loss": r.lm_loss, "lr": r.lr,
                    "grad_norm": r.grad_norm, "tokens_per_s": r.tokens_per_s, "tokens": tokens_seen,
                    **{k: v for k, v in r.aux.items()}, **({"dsa_phase": phase} if phase else {})}])
            if done % tr.eval_every == 0 or done == tr.steps:
                if is_main():
                    last = evaluate_loss(model, data.val, token_bytes, batch_size=tr.batch_size,
                                         max_batches=tr.eval_batches, device=device, dtype=cfg.dtype)
                    if last:
                        append_jsonl(out / "metrics.jsonl", [{"step": r.step, "tokens": tokens_seen, **last}])
                        bar.write(f"step {done}: val loss {last['val_loss']:.4f}  "
                                  f"bits/byte {last.get('val_bpb', 0):.4f}")
            if done % tr.ckpt_every == 0 or done == tr.steps:
                if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):  # every rank stops together
                    raise NonFiniteCheckpoint(f"the weights hold NaN/inf after step {r.step}: checkpoint {done} was "
                                              "not written, LATEST keeps the last good one (lower train.lr)")
                if is_main():
                    save_checkpoint(ckpt_dir, done, model, opt, {"next_step": done, "tokens": tokens_seen},
                                    keep=tr.keep_checkpoints)
                if dist.is_initialized():
                    dist.barrier()
            phase = dsa.schedule(model, done, opt) if phase is not None else None  # the next step's stage
    if recall:  # mean indexer recall over each stage's last 20 steps (of this process)
        last = {**last, "dsa_recall": {p: sum(v[-20:]) / len(v[-20:]) for p, v in recall.items()}}
    if is_main():
        if start == tr.steps:  # killed after the last checkpoint, before summary.json: the final evaluation again
            last = evaluate_loss(model, data.val, token_bytes, batch_size=tr.batch_size, max_batches=tr.eval_batches,
                                 device=device, dtype=cfg.dtype)
        finish(cfg, model, tok, data, out, device, last, tokens_seen)
    return out


def finish(cfg: PretrainConfig, model: GPT, tok: Tokenizer, data, out: Path, device: torch.device,
           last: dict, tokens_seen: int) -> dict:
    """Greedy samples, base-probe accuracy (synthetic corpus), summary.json."""
    summary = {"steps": cfg.train.steps, "tokens_seen": tokens_seen, **last}
    if cfg.data.corpus == "synthetic" and cfg.probe:
        from topocl.evaluate import probe_accuracy, score_probes
        from topocl.world import base_probes

        probes = base_probes()
        t0 = time.perf_counter()
        with autocast_for(device, cfg.dtype):
            scores = score_probes(model, tok, probes, device=device)
        acc = probe_accuracy(scores)
        summary["base_probes"] = acc
        summary["probe_time_s"] = time.perf_counter() - t0
        write_json_atomic(out / "probes.json", [dataclasses.asdict(s) for s in scores])
        prompts = [p.prompt for p in probes[:: max(1, len(probes) // max(cfg.samples, 1))]][: cfg.samples]
    else:
        prompts = ["Once upon a time", "One day, a little", "The dog", "She said"][: cfg.samples]
    if cfg.samples > 0:
        write_samples(model, tok, prompts, out / "samples.txt", device)
    write_json_atomic(out / "summary.json", summary)
    return summary


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="topocl pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config, e.g. configs/pretrain/tiny-dense.yaml")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=100 out_dir=runs/x")
    args = ap.parse_args(argv)
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    main_rank = True
    try:
        out = pretrain(cfg)
        main_rank = is_main()
    except (NonFiniteLoss, NonFiniteCheckpoint) as e:
        print(f"topocl pretrain: stopped: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if main_rank:
        summary = json.loads((out / "summary.json").read_text())
        bp = summary.get("base_probes", {}).get("base", {})
        extra = f", base-probe acc {bp['acc']:.1%}" if "acc" in bp else ""
        val = (f"val loss {summary['val_loss']:.4f}, {summary['val_bpb']:.4f} bits/byte"
               if "val_bpb" in summary else "no held-out data")
        print(f"run directory: {out}  ({val}{extra})")
    return 0
