"""An HF model prepared for one continual arm, and its held-out rows: the library part of `topocl surgery` that
the continual runner uses (`surgery=PATH surgery_arm=ARM`), so that no library module imports a CLI module.

    scfg = load_model_config(path)                       # a surgery YAML without its `continual:` section
    model, tok, report = build_arm(scfg, arm, device)   # arm: surgery | full | lora
    base_val = heldout_rows(scfg, tok)                   # [N, T+1] rows for bits/byte (Evaluator's base_val)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from topocl.config import TrainConfig, load_config
from topocl.data import load_corpus, pack_documents
from topocl.surgery.head_split import HeadSplitConfig, SurgeryReport, apply_head_split
from topocl.surgery.hf import CausalLM, HFTokenizer, add_lora, load_hf

ARMS = ("surgery", "full", "lora")


@dataclass
class SurgeryModelConfig:
    """A surgery config (configs/surgery/*.yaml) without its `continual:` section (topocl.surgery.cli's
    SurgeryRunConfig adds it): what builds an arm's model and its held-out rows."""

    out_dir: str = "runs/surgery"
    model: str = ""  # local HF model directory, or package:NAME (a GGUF shipped in an installed package)
    gguf_file: str = ""  # GGUF file inside the directory ("" = config.json, or the only .gguf there)
    dtype: str = "float32"  # weights: float32 | bfloat16 (GGUF is dequantised to this)
    attn_implementation: str = "sdpa"  # eager | sdpa (group A uses it; group B is always masked softmax)
    device: str = "auto"
    seed: int = 0
    surgery: HeadSplitConfig = field(default_factory=HeadSplitConfig)
    lora_roles: list[str] = field(default_factory=lambda: ["attn.q", "attn.k", "attn.v", "attn.o", "mlp"])  # lora arm
    eval_text: str = ""  # held-out text file/dir for perplexity ("" = none)
    eval_docs: int = 64  # documents of eval_text used
    eval_seq_len: int = 256
    eval_batch_size: int = 8
    train_text: str = ""  # text for the short sanity fine-tune ("" = none)
    train_docs: int = 512
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=0, batch_size=8, lr=1e-4, warmup_steps=2,
                                                                   weight_decay=0.0, log_every=5))
    save: bool = True  # write out_dir/model (merged HF checkpoint + tokenizer)
    arms: list[str] = field(default_factory=list)  # continual stream on each arm: surgery | full | lora ([] = none)
    arm_overrides: dict[str, list[str]] = field(default_factory=dict)  # per arm, e.g. {lora: ["train.lr=1e-3"]}


def build_arm(cfg: SurgeryModelConfig, arm: str, device: torch.device | str = "cpu"
              ) -> tuple[CausalLM, HFTokenizer, SurgeryReport | None]:
    """The pretrained model of cfg.model prepared for one arm (see prepare_arm), and its tokenizer."""
    if arm not in ARMS:
        raise ValueError(f"arm={arm!r}: use one of {', '.join(ARMS)}")
    hf, tok = load_hf(cfg.model, cfg.gguf_file, cfg.dtype, cfg.attn_implementation, device)
    model, report = prepare_arm(hf, cfg, arm)
    return model, HFTokenizer(tok), report


def prepare_arm(hf: nn.Module, cfg: SurgeryModelConfig, arm: str) -> tuple[CausalLM, SurgeryReport | None]:
    """surgery: head split per cfg.surgery (group B or its LoRA adapters train); full: every parameter trains;
    lora: PEFT adapters on cfg.lora_roles (r/alpha/dropout from cfg.surgery.lora_*), the rest frozen."""
    if arm not in ARMS:
        raise ValueError(f"arm={arm!r}: use one of {', '.join(ARMS)}")
    report = None
    if arm == "surgery":
        report = apply_head_split(hf, cfg.surgery)
    elif arm == "full":
        for p in hf.parameters():
            p.requires_grad_(True)
    else:
        s = cfg.surgery
        add_lora(hf, cfg.lora_roles, s.lora_r, s.lora_alpha, s.lora_dropout)
    return CausalLM(hf), report


def heldout_rows(cfg: SurgeryModelConfig, tok: HFTokenizer, text: str | None = None, docs: int | None = None) -> Tensor:
    """[N, T+1] token rows of the first `docs` documents of `text` (default: eval_text / eval_docs)."""
    path = text if text is not None else cfg.eval_text
    texts = load_corpus(path, max_docs=docs if docs is not None else cfg.eval_docs)
    return pack_documents(tok.encode_batch(texts), cfg.eval_seq_len, tok.bos_id)


def load_model_config(path: str | Path, overrides: list[str] | None = None) -> SurgeryModelConfig:
    """The model part of a surgery config; its `continual:` section (the stream `topocl surgery` runs on each
    arm) is left to topocl.surgery.cli. Every other key is checked as usual."""
    return load_config(SurgeryModelConfig, path, overrides, ignore=("continual",))
