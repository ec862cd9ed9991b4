"""Attention forward+backward time per kind, as median per-round ratios to dense SDPA, all kinds in one process.

    python benchmarks/attention.py [--seq 256 1024] [--kinds split nsa dsa split:mask nsa:mask dsa:mask]
                                   [--batch 2] [--rounds 5] [--device cpu] [--json out.json] [--allow-busy]

One layer at d_model 256, 8 query heads, 4 KV heads (head dim 32); sparse sizes scale with T as in the
research note (NSA l=16, d=8, l'=32, n=8, w=128; DSA k=max(32, T/8), 4 indexer heads of 64 dims, no shared
heads; split: 2 of 4 KV groups keep their top 10%). `kind` runs the kind's default path (`impl: auto`: the
block path on CPU, i.e. query blocks x the keys they can see through the fused SDPA kernel; gather for long
sparse sequences); `kind:mask` the reference masked softmax over [B, H, T, S]; `kind:gather` / `kind:block`
force that path.

Every (kind, T) layer is built in this one process; each round times every kind once, in an order rotated per
round, and the ratio to dense is taken per round, then the median over rounds (so load that comes and goes hits
the kinds of a round alike). The 1-minute load average is recorded before and after; on a busy machine (load
above --max-load per CPU) the script refuses to print figures unless --allow-busy. `saved` = bytes of the
distinct storages autograd keeps for backward (one extra call, outside the timing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from timing import git_commit, interleaved, machine_load, require_idle  # noqa: E402

from topocl.attention.ops import rope_cache  # noqa: E402
from topocl.config import DSAConfig, ModelConfig, NSAConfig, SplitConfig  # noqa: E402
from topocl.registry import ATTENTION  # noqa: E402


def config(kind: str, t: int) -> ModelConfig:
    kind, _, impl = kind.partition(":")
    impl = impl or "auto"
    return ModelConfig(vocab_size=8, d_model=256, n_head=8, n_kv_head=4, max_seq_len=t, attention=kind,
                       nsa=NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32, n_sel=8, window=128, impl=impl),
                       dsa=DSAConfig(topk=max(32, t // 8), index_heads=4, index_dim=64, index_rope_dim=32, impl=impl),
                       split=SplitConfig(topk_frac=0.1, impl=impl))


def step_fn(kind: str, t: int, batch: int, device: torch.device):
    """fwd+bwd closure of one freshly initialised layer, and the bytes its autograd graph saves."""
    torch.manual_seed(0)
    cfg = config(kind, t)
    layer = ATTENTION.get(cfg.attention)(cfg).to(device)
    cos, sin = (c.to(device) for c in rope_cache(t, cfg.hd))
    x = torch.randn(batch, t, cfg.d_model, device=device, requires_grad=True)

    def step() -> None:
        y, aux = layer(x, cos, sin)
        loss = y.square().mean() + sum((v for k, v in aux.items() if k.startswith("loss.")), 0.0)
        loss.backward()

    saved: dict[int, int] = {}

    def pack(tensor):  # distinct storages, so views and expanded tensors count once, at their real size
        st = tensor.untyped_storage()
        saved[st.data_ptr()] = st.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t_: t_):
        y, aux = layer(x, cos, sin)
    del y, aux
    return step, sum(saved.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--kinds", nargs="+", default=["split", "nsa", "dsa", "split:mask", "nsa:mask", "dsa:mask"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="also write the figures (with load, commit, settings) to this file")
    ap.add_argument("--max-load", type=float, default=0.25, help="idle = 1-min load <= this per CPU")
    ap.add_argument("--allow-busy", "--force", action="store_true", help="print figures from a busy machine")
    args = ap.parse_args()
    device = torch.device(args.device)
    before = require_idle(args.max_load, args.allow_busy)
    commit = git_commit()  # of the code measured (HEAD may move while this runs)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for t in args.seq:
        fns, saved = {}, {}
        for kind in ["dense", *args.kinds]:
            fns[kind], saved[kind] = step_fn(kind, t, args.batch, device)
        res = interleaved(fns, "dense", args.rounds, sync)
        rows += [{"T": t, "kind": k, **r, "saved": saved[k], "saved_ratio": saved[k] / saved["dense"]}
                 for k, r in res.items()]
    after = machine_load()
    busy = "" if before["idle"] else "  BUSY MACHINE (--allow-busy): ratios only"
    print(f"commit {commit}, device {args.device}, batch {args.batch}, torch threads "
          f"{torch.get_num_threads()}, {args.rounds} interleaved rounds; 1-min load {before['load1']:.2f} before, "
          f"{after['load1']:.2f} after, {before['cpus']:.0f} CPUs{busy}")
    print(f"{'T':>6} {'kind':>11} {'ms':>9} {'x dense':>8} {'(min-max)':>13} {'saved MiB':>10} {'x dense':>8}")
    for r in rows:
        print(f"{r['T']:>6} {r['kind']:>11} {r['ms']:>9.1f} {r['ratio']:>8.2f} "
              f"{'(' + format(r['ratio_min'], '.2f') + '-' + format(r['ratio_max'], '.2f') + ')':>13} "
              f"{r['saved'] / 2**20:>10.1f} {r['saved_ratio']:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"commit": commit, "device": args.device, "batch": args.batch,
                                               "threads": torch.get_num_threads(), "rounds": args.rounds,
                                               "load_before": before, "load_after": after, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
