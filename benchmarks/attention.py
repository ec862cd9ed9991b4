"""Attention forward+backward time and memory per kind, as ratios to dense SDPA, in one run.

    python benchmarks/attention.py [--seq 256 1024 4096] [--kinds split nsa nsa:gather dsa dsa:gather] [--batch 1]
                                   [--repeats 3] [--device cpu]

One layer at d_model 256, 8 query heads, 2 KV heads (head dim 32); sparse sizes scale with T as in the
research note (NSA l=16, d=8, l'=32, n=8, w=128; DSA k=T/8, 4 indexer heads of 64 dims; split: 1 of 2 KV
groups keeps its top 10%). Every kind runs its reference mask path, except `nsa:gather` / `dsa:gather` (the
fast paths: selected blocks / top-k tokens gathered per query in checkpointed chunks, NSA's window unfolded;
nothing O(T²) saved for backward).

Each (kind, T) runs in its own process, so memory figures do not leak between rows; the time is the fastest
of `--repeats` calls after one warm-up (the least disturbed by other load on a shared machine). Memory columns:
`saved` = bytes of the distinct storages autograd saves for backward (what the [B, H, T, T] mask path
costs; checkpointed chunks count only their inputs); `peak` = CUDA allocator peak on GPU, on CPU the rise
of the process's peak resident set during the timed calls (includes the allocator's slack).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from topocl.attention.ops import rope_cache
from topocl.config import DSAConfig, ModelConfig, NSAConfig, SplitConfig
from topocl.registry import ATTENTION


def config(kind: str, t: int) -> ModelConfig:
    kind, _, impl = kind.partition(":")
    return ModelConfig(vocab_size=8, d_model=256, n_head=8, n_kv_head=2, max_seq_len=t, attention=kind,
                       nsa=NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32, n_sel=8, window=128,
                                     impl=impl or "mask"),
                       dsa=DSAConfig(topk=max(32, t // 8), index_heads=4, index_dim=64, index_rope_dim=32,
                                     impl=impl or "mask"),
                       split=SplitConfig(topk_frac=0.1))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(kind: str, t: int, batch: int, repeats: int, device: torch.device) -> dict[str, float]:
    """{ms: fastest fwd+bwd time, saved: bytes saved for backward, peak: peak bytes} of one layer."""
    torch.manual_seed(0)
    cfg = config(kind, t)
    layer = ATTENTION.get(cfg.attention)(cfg).to(device)
    cos, sin = (c.to(device) for c in rope_cache(t, cfg.hd))
    x = torch.randn(batch, t, cfg.d_model, device=device, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(tensor):  # distinct storages, so views and expanded tensors count once, at their real size
        st = tensor.untyped_storage()
        saved[st.data_ptr()] = st.nbytes()
        return tensor

    times = []
    base = rss_bytes()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for i in range(repeats + 1):
        saved.clear()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t_: t_):
            y, aux = layer(x, cos, sin)
            loss = y.square().mean() + sum((v for k, v in aux.items() if k.startswith("loss.")), 0.0)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call warms up
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # ru_maxrss is in KiB on Linux
    return {"ms": 1000 * min(times), "saved": sum(saved.values()), "peak": max(peak, 0)}


def in_subprocess(kind: str, t: int, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--one", kind, str(t), "--batch", str(args.batch), "--repeats",
           str(args.repeats), "--device", args.device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--kinds", nargs="+", default=["split", "nsa", "nsa:gather", "dsa", "dsa:gather"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--one", nargs=2, metavar=("KIND", "T"), help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.batch, args.repeats, torch.device(args.device))))
        return
    print(f"device {args.device}, batch {args.batch}, fwd+bwd of one attention layer (fastest of {args.repeats}), "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'T':>6} {'kind':>10} {'ms':>9} {'x dense':>8} {'saved MiB':>10} {'x dense':>8} {'peak MiB':>9} "
          f"{'x dense':>8}")
    for t in args.seq:
        base = in_subprocess("dense", t, args)
        for kind in ["dense", *args.kinds]:
            r = base if kind == "dense" else in_subprocess(kind, t, args)
            print(f"{t:>6} {kind:>10} {r['ms']:>9.1f} {r['ms'] / base['ms']:>8.2f} {r['saved'] / 2**20:>10.1f} "
                  f"{r['saved'] / base['saved']:>8.2f} {r['peak'] / 2**20:>9.1f} "
                  f"{r['peak'] / max(base['peak'], 1):>8.2f}", flush=True)


if __name__ == "__main__":
    main()
