"""MoE FFN forward+backward time as median per-round ratios to the matched dense SwiGLU FFN, in one process.

    python benchmarks/moe.py [--d-model 128 256] [--tokens 4096] [--rounds 7] [--allow-busy] [--json out.json]

Variants (1 shared + top-2 of 4 routed experts of width d_ff / 3, `configs/pretrain/tiny-moe.yaml`'s layout):
`moe` = the dispatch path (each routed expert on its own tokens: index_select, per-expert matmuls, index_add),
`moe:dense` = the reference that runs every expert on every token; `mlp` = the dense FFN with the same active
FLOPs (d_ff), `mlp:params` = the dense FFN with the MoE layer's parameter count. Timing and the idle check as
in benchmarks/attention.py (benchmarks/timing.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from timing import git_commit, interleaved, machine_load, require_idle  # noqa: E402

import topocl.model  # noqa: E402,F401  (registers the mlp FFN)
from topocl.config import ModelConfig, MoEConfig  # noqa: E402
from topocl.registry import FFN  # noqa: E402


def layer(variant: str, d_model: int) -> torch.nn.Module:
    moe_cfg = ModelConfig(vocab_size=8, d_model=d_model, ffn="moe", moe=MoEConfig(n_shared=1, n_routed=4, topk=2))
    if variant.startswith("moe"):
        impl = "dense" if variant == "moe:dense" else "dispatch"
        cfg = ModelConfig(vocab_size=8, d_model=d_model, ffn="moe",
                          moe=MoEConfig(n_shared=1, n_routed=4, topk=2, impl=impl))
        return FFN.get("moe")(cfg)
    d_ff = moe_cfg.ff
    if variant == "mlp:params":
        n = sum(p.numel() for p in FFN.get("moe")(moe_cfg).parameters())
        d_ff = round(n / (3 * d_model))
    return FFN.get("mlp")(ModelConfig(vocab_size=8, d_model=d_model, d_ff=d_ff))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per call (batch x length)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json")
    ap.add_argument("--max-load", type=float, default=0.25)
    ap.add_argument("--allow-busy", "--force", action="store_true")
    args = ap.parse_args()
    before = require_idle(args.max_load, args.allow_busy)
    commit = git_commit()  # of the code measured (HEAD may move while this runs)
    rows = []
    for d in args.d_model:
        fns, params = {}, {}
        for variant in ("mlp", "moe", "moe:dense", "mlp:params"):
            torch.manual_seed(0)
            mod = layer(variant, d)
            params[variant] = sum(p.numel() for p in mod.parameters())
            x = torch.randn(1, args.tokens, d, requires_grad=True)

            def step(mod=mod, x=x) -> None:
                y, aux = mod(x)
                (y.square().mean() + sum((v for k, v in aux.items() if k.startswith("loss.")), 0.0)).backward()

            fns[variant] = step
        rows += [{"d_model": d, "variant": k, "params": params[k], **r}
                 for k, r in interleaved(fns, "mlp", args.rounds).items()]
    after = machine_load()
    busy = "" if before["idle"] else "  BUSY MACHINE (--allow-busy): ratios only"
    print(f"commit {commit}, {args.tokens} tokens, torch threads {torch.get_num_threads()}, {args.rounds} "
          f"interleaved rounds; 1-min load {before['load1']:.2f} before, {after['load1']:.2f} after{busy}")
    print(f"{'d':>5} {'variant':>11} {'params':>9} {'ms':>8} {'x mlp':>7} {'(min-max)':>13}")
    for r in rows:
        print(f"{r['d_model']:>5} {r['variant']:>11} {r['params']:>9,} {r['ms']:>8.1f} {r['ratio']:>7.2f} "
              f"{'(' + format(r['ratio_min'], '.2f') + '-' + format(r['ratio_max'], '.2f') + ')':>13}")
    if args.json:
        Path(args.json).write_text(json.dumps({"commit": commit, "tokens": args.tokens, "rounds": args.rounds,
                                               "load_before": before, "load_after": after, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
