"""`topocl params CONFIG [k=v ...]`: parameters per role (with the pathway each belongs to: slow, fast, or shared by
both at model level — a role policy must place the shared ones), and the parameter-matched dense control.

The dense control of a sparse config keeps layers, heads and widths and sizes the MLP (d_ff) so the
total parameter count is within ±2% (DESIGN.md, route B).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from topocl.config import ModelConfig, PretrainConfig, load_config
from topocl.model import GPT, SHARED_ROLES


def count(cfg: ModelConfig) -> int:
    """Total parameters of GPT(cfg), built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return GPT(cfg).num_params()


def match_dense(cfg: ModelConfig, tolerance: float = 0.02) -> ModelConfig:
    """A dense, MLP-FFN config with the same layers/heads/widths and total parameters within `tolerance`."""
    target = count(cfg)
    base = dataclasses.replace(cfg, attention="dense", ffn="mlp")
    # SwiGLU has 3 * d_model * d_ff parameters per layer, so the count is linear in d_ff
    per_ff = 3 * cfg.d_model * cfg.n_layer
    fixed = count(dataclasses.replace(base, d_ff=8)) - per_ff * 8
    d_ff = max(8, round((target - fixed) / per_ff / 8) * 8)
    dense = dataclasses.replace(base, d_ff=d_ff)
    got = count(dense)
    if abs(got - target) > tolerance * target:
        raise ValueError(f"cannot match {target:,} parameters within {tolerance:.0%} by d_ff (best {got:,})")
    return dense


def table(cfg: ModelConfig) -> str:
    with torch.device("meta"):
        m = GPT(cfg)
    total = m.num_params()
    slow, fast = m.pathway_roles()
    lines = [f"{cfg.attention} / {cfg.ffn}: {total:,} parameters"]
    lines += [f"  {role:<22} {n:>12,}  {n / total:6.1%}  {pathway(role, slow, fast)}".rstrip()
              for role, n in m.params_by_role().items()]
    return "\n".join(lines)


def pathway(role: str, slow: set[str], fast: set[str]) -> str:
    """slow | fast | shared (a model-level tensor both pathways use) | "" (a model without pathways)."""
    if role in slow:
        return "slow"
    if role in fast:
        return "fast"
    return "shared" if (slow or fast) and role in SHARED_ROLES else ""


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="topocl params", description=__doc__)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--vocab", type=int, default=0, help="vocabulary size when model.vocab_size is 0 (default: "
                    "data.vocab_size)")
    args = ap.parse_args(argv)
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    model = cfg.model
    if model.vocab_size == 0:
        model = dataclasses.replace(model, vocab_size=args.vocab or cfg.data.vocab_size)
    print(table(model))
    if model.attention != "dense" or model.ffn != "mlp":
        dense = match_dense(model)
        print(f"\nmatched dense control: model.attention=dense model.ffn=mlp model.d_ff={dense.d_ff} "
              f"({count(dense):,} parameters, {count(dense) / count(model) - 1:+.2%})")
    return 0
