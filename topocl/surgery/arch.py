"""Architecture registry for head-split surgery: one small file per Hugging Face family.

An `ArchSpec` says how to recognise a family (`config.model_type`, the attention class names) and hands
over the family's own pieces, so the split attention reproduces the original exactly:

    rope(q, k, cos, sin) -> (q, k)       the family's apply_rotary_pos_emb
    eager(module, q, k, v, mask, ...)    the family's eager attention (used when config asks for "eager")
    attn_kwargs(attn) -> dict            extra keyword arguments the family passes to its attention
                                         interface (e.g. sliding_window for Mistral / Qwen2)

To add a family: a file like `llama.py` that registers an ArchSpec, and an import in `__init__.py`.
Families must have q_proj/k_proj/v_proj/o_proj nn.Linear projections, heads laid out as [H, D] rows,
query head h served by KV head h // (H / Hk), and the attention signature
forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from topocl.registry import Registry

ARCHS = Registry("surgery architecture")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _no_kwargs(attn: nn.Module) -> dict:
    return {}


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]  # config.model_type values of the family
    attention_classes: tuple[str, ...]  # class names of the attention modules that are split
    rope: Callable
    eager: Callable
    attn_kwargs: Callable[[nn.Module], dict] = field(default=_no_kwargs)


def supported() -> str:
    return ", ".join(f"{n} (model_type {'/'.join(ARCHS.get(n).model_types)})" for n in ARCHS.names())


def spec_for(model: nn.Module) -> ArchSpec:
    """The ArchSpec of a Hugging Face causal LM, from its config.model_type; a clear error otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for name in ARCHS.names():
        spec = ARCHS.get(name)
        if model_type in spec.model_types:
            return spec
    raise ValueError(f"head-split surgery does not support {type(model).__name__} (model_type={model_type!r}); "
                     f"supported architectures: {supported()}. Add one with a small file in topocl/surgery/ "
                     "(see topocl/surgery/llama.py)")
