"""Training throughput, MFU and sparse/dense ratios per attention kind, in one run (JSON + a markdown table).

    python benchmarks/throughput.py [--device cuda] [--peak-tflops 989] [--compile] [--out DIR]
                                    [--kinds dense split nsa dsa] [--attn-seq 1024 2048 4096 8192 16384]

Three sections:
1. `presets`: full training steps (forward, backward, AdamW) of each kind's GPU preset
   (configs/pretrain/ts-<kind>-20m.yaml, random tokens): step time, tokens/s and MFU =
   (6·N + 6·L·H·D·T) · tokens/s / peak, with N the non-embedding parameters and the attention counted as dense
   causal attention (6·L·H·D·T per token: QKᵀ and PV, forward + backward, half of the T×T square) for every
   kind, so MFU compares kinds on the same nominal work. Peak: --peak-tflops, else looked up for known GPUs
   (bf16 dense tensor-core peak), else MFU is left empty.
2. `ratio`: the same steps at T = --ratio-seq (default 1024): sparse / dense step time.
3. `attention`: one attention layer's forward + backward time per kind and implementation vs dense SDPA for each
   T in --attn-seq (the layer shapes of benchmarks/attention.py; out-of-memory cells are reported as such).

On CPU the defaults shrink everything so the whole script runs in about a minute (2-layer d_model 192 models,
T 128 / 256, attention T 256 512 1024; flex rows are skipped: no flex backward on CPU). Times are the fastest of
--repeats after --warmup calls, in one process (run it on an otherwise idle device).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from attention import config as attn_config  # noqa: E402  (benchmarks/attention.py: the layer shapes)

from topocl.attention.ops import rope_cache  # noqa: E402
from topocl.config import PretrainConfig, load_config  # noqa: E402
from topocl.model import GPT  # noqa: E402
from topocl.optim import build_optimizer  # noqa: E402
from topocl.registry import ATTENTION  # noqa: E402
from topocl.train import autocast_for  # noqa: E402

PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
               "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.0, "RTX 3090": 71.0}
CPU_SMALL = ["model.n_layer=2", "model.d_model=192", "model.n_head=6", "model.n_kv_head=2", "data.vocab_size=512"]


def peak_tflops(device: torch.device, given: float) -> float | None:
    if given > 0:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def preset_model(kind: str, seq: int, device: torch.device, small: bool) -> tuple[GPT, PretrainConfig]:
    cfg = load_config(PretrainConfig, ROOT / f"configs/pretrain/ts-{kind}-20m.yaml",
                      [*(CPU_SMALL if small else []), f"data.seq_len={seq}", f"model.max_seq_len={seq}"])
    cfg.model.vocab_size = cfg.data.vocab_size
    if kind == "dsa":  # keep k = T / 8 at every T
        cfg.model.dsa.topk = max(16, seq // 8)
    torch.manual_seed(0)
    return GPT(cfg.model).to(device), cfg


def time_steps(kind: str, seq: int, batch: int, args, device: torch.device) -> dict:
    """Fastest full training step of kind's preset at T = seq (random tokens)."""
    model, cfg = preset_model(kind, seq, device, args.small)
    opt = build_optimizer(model, cfg.train)
    step = model if not args.compile else torch.compile(model)
    idx = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), device=device)  # [B, T+1]
    times = []
    for i in range(args.warmup + args.repeats):
        sync(device)
        t0 = time.perf_counter()
        with autocast_for(device, "auto"):
            out = step(idx[:, :-1], idx[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    c = cfg.model
    n = model.num_params(non_embedding=True)
    flops_per_token = 6 * n + 6 * c.n_layer * c.n_head * c.hd * seq
    s = min(times)
    return {"kind": kind, "seq": seq, "batch": batch, "params": model.num_params(), "params_non_embedding": n,
            "step_ms": 1000 * s, "tokens_per_s": batch * seq / s, "flops_per_token": flops_per_token,
            "achieved_tflops": flops_per_token * batch * seq / s / 1e12}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_attention(kind: str, t: int, batch: int, args, device: torch.device) -> dict:
    """Fastest forward + backward of one attention layer (benchmarks/attention.py shapes); 'oom' if it does not fit."""
    name, _, impl = kind.partition(":")
    cfg = attn_config(name if impl == "flex" else kind, t)
    if impl == "flex":
        getattr(cfg, name).impl = "flex"
    try:
        torch.manual_seed(0)
        layer = ATTENTION.get(cfg.attention)(cfg).to(device)
        cos, sin = (c.to(device) for c in rope_cache(t, cfg.hd))
        x = torch.randn(batch, t, cfg.d_model, device=device, requires_grad=True)
        times = []
        for i in range(args.warmup + args.repeats):
            sync(device)
            t0 = time.perf_counter()
            with autocast_for(device, "auto"):
                y, aux = layer(x, cos, sin)
                loss = y.float().square().mean() + sum((v for k, v in aux.items() if k.startswith("loss.")), 0.0)
            loss.backward()
            sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        return {"kind": kind, "seq": t, "ms": 1000 * min(times)}
    except torch.OutOfMemoryError:
        return {"kind": kind, "seq": t, "ms": None, "error": "oom"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def markdown(res: dict) -> str:
    peak = res["peak_tflops"]
    md = [f"# Throughput ({res['device_name']}, torch {res['torch']}, compile={res['compile']})", "",
          f"## Training step at each preset's T (peak {peak or '–'} TFLOP/s)", "",
          "| kind | T | batch | params | step ms | tokens/s | achieved TFLOP/s | MFU |",
          "|---|---|---|---|---|---|---|---|"]
    for r in res["presets"]:
        mfu = f"{r['achieved_tflops'] / peak:.1%}" if peak else "–"
        md.append(f"| {r['kind']} | {r['seq']} | {r['batch']} | {r['params']:,} | {r['step_ms']:.1f} | "
                  f"{r['tokens_per_s']:,.0f} | {r['achieved_tflops']:.3f} | {mfu} |")
    dense = next((r for r in res["ratio"] if r["kind"] == "dense"), None)
    md += ["", f"## Sparse / dense training step time at T={res['ratio_seq']}", "", "| kind | step ms | / dense |",
           "|---|---|---|"]
    md += [f"| {r['kind']} | {r['step_ms']:.1f} | {r['step_ms'] / dense['step_ms']:.2f} |" if dense else
           f"| {r['kind']} | {r['step_ms']:.1f} | – |" for r in res["ratio"]]
    seqs = sorted({r["seq"] for r in res["attention"]})
    kinds = list(dict.fromkeys(r["kind"] for r in res["attention"]))
    cell = {(r["kind"], r["seq"]): r for r in res["attention"]}
    md += ["", "## One attention layer, forward + backward: ms (× dense SDPA)", "",
           "| kind | " + " | ".join(f"T={t}" for t in seqs) + " |", "|---" * (len(seqs) + 1) + "|"]
    for k in kinds:
        row = []
        for t in seqs:
            r, d = cell.get((k, t)), cell.get(("dense", t))
            if not r or r["ms"] is None:
                row.append(r.get("error", "–") if r else "–")
            else:
                row.append(f"{r['ms']:.1f}" + (f" ({r['ms'] / d['ms']:.2f}×)" if d and d["ms"] else ""))
        md.append(f"| {k} | " + " | ".join(row) + " |")
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kinds", nargs="+", default=["dense", "split", "nsa", "dsa"])
    ap.add_argument("--attn-kinds", nargs="+", help="default: dense split nsa nsa:gather dsa dsa:gather "
                                                     "(+ split:flex nsa:flex on CUDA)")
    ap.add_argument("--batch", type=int, help="sequences per step (default 16 on GPU, 2 on CPU)")
    ap.add_argument("--seq", type=int, help="T of section 1 (default: the presets' 512 on GPU, 128 on CPU)")
    ap.add_argument("--ratio-seq", type=int, help="T of section 2 (default 1024 on GPU, 256 on CPU)")
    ap.add_argument("--attn-seq", type=int, nargs="+", help="default 1024..16384 on GPU, 256 512 1024 on CPU")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="peak of the device (bf16 dense on GPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", type=Path, help="default runs/bench/throughput-<device>")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.small = not gpu
    batch = args.batch or (16 if gpu else 2)
    seq = args.seq or (512 if gpu else 128)
    ratio_seq = args.ratio_seq or (1024 if gpu else 256)
    attn_seq = args.attn_seq or ([1024, 2048, 4096, 8192, 16384] if gpu else [256, 512, 1024])
    attn_kinds = args.attn_kinds or (["dense", "split", "nsa", "nsa:gather", "dsa", "dsa:gather"]
                                     + (["split:flex", "nsa:flex"] if gpu else []))
    t0 = time.perf_counter()
    res = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if gpu else platform.processor()
           or "cpu", "torch": torch.__version__, "compile": args.compile, "peak_tflops": peak_tflops(device,
                                                                                                   args.peak_tflops),
           "ratio_seq": ratio_seq, "presets": [], "ratio": [], "attention": []}
    for kind in args.kinds:
        res["presets"].append(time_steps(kind, seq, batch, args, device))
        res["ratio"].append(time_steps(kind, ratio_seq, max(1, batch * seq // ratio_seq), args, device))
        print(f"{kind}: {res['presets'][-1]['tokens_per_s']:,.0f} tokens/s at T={seq}, "
              f"{res['ratio'][-1]['step_ms']:.1f} ms/step at T={ratio_seq}", file=sys.stderr)
    for t in attn_seq:
        for kind in attn_kinds:
            res["attention"].append(time_attention(kind, t, 1, args, device))
    res["wall_s"] = time.perf_counter() - t0
    out = args.out or ROOT / "runs/bench" / f"throughput-{device.type}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(res, indent=1))
    (out / "throughput.md").write_text(markdown(res))
    print(markdown(res))
    print(f"written: {out / 'throughput.json'}, {out / 'throughput.md'} ({res['wall_s']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
