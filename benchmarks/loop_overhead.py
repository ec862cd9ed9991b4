"""Overhead of `train_steps` against a minimal hand-written PyTorch loop on the same model, same process.

    python benchmarks/loop_overhead.py [--steps 30] [--d-model 128] [--seq 128] [--batch 16]

Both loops do the same work (AdamW, clip, LR set, forward/backward); the ratio is printed. Target: <= 1.05.
Runs are interleaved (A, B, A, B, ...) so drifting machine load hits both alike; the median per-step time is used.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from topocl.config import ModelConfig, TrainConfig
from topocl.model import GPT
from topocl.optim import build_optimizer
from topocl.train import train_steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    cfg = ModelConfig(vocab_size=2048, d_model=args.d_model, max_seq_len=args.seq)
    tcfg = TrainConfig(steps=10**6, batch_size=args.batch, lr=1e-3, warmup_steps=0)
    data = torch.randint(0, 2048, (args.batch * 8, args.seq + 1))
    batches = lambda s: data[(s % 8) * args.batch:(s % 8 + 1) * args.batch]  # noqa: E731
    dev = torch.device("cpu")

    def ours() -> list[float]:
        torch.manual_seed(0)
        m = GPT(cfg)
        opt = build_optimizer(m, tcfg)
        return [r.dt for r in train_steps(m, opt, batches, range(args.steps), cfg=tcfg, device=dev)]

    def plain() -> list[float]:
        torch.manual_seed(0)
        m = GPT(cfg)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        times = []
        for s in range(args.steps):
            t0 = time.perf_counter()
            rows = batches(s)
            loss = m(rows[:, :-1], rows[:, 1:]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.detach().item()
            times.append(time.perf_counter() - t0)
        return times

    a, b = [], []
    for _ in range(args.rounds):
        a += ours()[3:]  # drop warm-up steps
        b += plain()[3:]
    ta, tb = statistics.median(a), statistics.median(b)
    tok = args.batch * args.seq
    print(f"train_steps: {tok / ta:,.0f} tokens/s   plain loop: {tok / tb:,.0f} tokens/s   "
          f"overhead ratio (ours/plain step time): {ta / tb:.3f}")


if __name__ == "__main__":
    main()
