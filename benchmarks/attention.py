"""Attention forward+backward time and peak memory per kind, as ratios to dense SDPA, in one process.

    python benchmarks/attention.py [--seq 256 1024 4096] [--kinds split nsa nsa:gather dsa] [--batch 1]
                                   [--repeats 3] [--device cpu]

One layer at d_model 256, 8 query heads, 2 KV heads (head dim 32); sparse sizes scale with T as in the
research note (NSA l=16, d=8, l'=32, n=8, w=128; DSA k=T/8; split top 10%). Peak memory: CUDA allocator peak
on GPU; on CPU, the bytes of the distinct storages saved for backward (autograd saved-tensor hooks), which is what the
[B, H, T, T] mask path costs. Every kind runs its reference mask path, except `nsa:gather` (NSA's gather
fast path: selected blocks gathered, window unfolded, no [T, T] tensor).
"""

from __future__ import annotations

import argparse
import statistics
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
                       dsa=DSAConfig(topk=max(32, t // 8), index_heads=4, index_dim=64, index_rope_dim=32),
                       split=SplitConfig(topk_frac=0.1))


def measure(kind: str, t: int, batch: int, repeats: int, device: torch.device) -> tuple[float, int]:
    torch.manual_seed(0)
    cfg = config(kind, t)
    layer = ATTENTION.get(cfg.attention)(cfg).to(device)
    cos, sin = (c.to(device) for c in rope_cache(t, cfg.hd))
    x = torch.randn(batch, t, cfg.d_model, device=device, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(tensor):  # unique storages, so views and expanded tensors count once, at their real size
        st = tensor.untyped_storage()
        saved[st.data_ptr()] = st.nbytes()
        return tensor

    times = []
    for i in range(repeats + 1):
        saved.clear()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t_: t_):
            y, aux = layer(x, cos, sin)
            loss = y.square().mean() + sum((v for k, v in aux.items() if k.startswith("loss.")), 0.0)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call warms up
            times.append(time.perf_counter() - t0)
    mem = torch.cuda.max_memory_allocated() if device.type == "cuda" else sum(saved.values())
    return statistics.median(times), mem


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--kinds", nargs="+", default=["split", "nsa", "nsa:gather", "dsa"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    print(f"device {dev}, batch {args.batch}, fwd+bwd of one attention layer (median of {args.repeats})")
    print(f"{'T':>6} {'kind':>10} {'ms':>9} {'x dense':>8} {'MiB':>9} {'x dense':>8}")
    for t in args.seq:
        base_t, base_m = measure("dense", t, args.batch, args.repeats, dev)
        for kind in ["dense", *args.kinds]:
            ms, mem = (base_t, base_m) if kind == "dense" else measure(kind, t, args.batch, args.repeats, dev)
            print(f"{t:>6} {kind:>10} {1000 * ms:>9.1f} {ms / base_t:>8.2f} {mem / 2**20:>9.1f} {mem / base_m:>8.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
