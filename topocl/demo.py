"""`topocl demo` (what `make demo` runs): the embedded default, end to end on CPU.

Pretrains the tiny dense model on the synthetic common-sense corpus and prints the run directory.
A finished stage is reused when the demo runs again (delete runs/demo to start over).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from topocl.checkpoint import latest_checkpoint
from topocl.config import PretrainConfig, load_config
from topocl.pretrain import pretrain

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def pretrained(preset: str, out: Path, overrides: list[str]) -> Path:
    """Pretrain `preset` into `out` unless a finished run is already there."""
    cfg = load_config(PretrainConfig, CONFIGS / "pretrain" / f"{preset}.yaml", [f"out_dir={out}", *overrides])
    ck = latest_checkpoint(out / "checkpoints")
    if ck is not None and (out / "summary.json").is_file():
        print(f"reusing finished pretraining run {out}")
        return out
    cfg.resume = ck is not None
    return pretrain(cfg)


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="topocl demo", description=__doc__)
    ap.add_argument("--out", default="runs/demo", help="demo directory (default runs/demo)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    run = pretrained("tiny-dense", out / "pretrain-dense", [])
    summary = json.loads((run / "summary.json").read_text())
    acc = summary.get("base_probes", {}).get("base", {}).get("acc", float("nan"))
    print(f"\ntiny dense model: val {summary['val_bpb']:.3f} bits/byte, base-probe accuracy {acc:.1%}, "
          f"{summary['tokens_seen']:,} tokens seen")
    print(f"run directory: {run}")
    return 0
