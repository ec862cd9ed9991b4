"""Qwen2 family (Qwen2, Qwen2.5): q/k/v biases (no o bias), per-layer sliding window (layer_types)."""

from transformers.models.qwen2 import modeling_qwen2 as hf

from topocl.surgery.arch import ARCHS, ArchSpec

ARCHS.register("qwen2")(ArchSpec(name="qwen2", model_types=("qwen2",), attention_classes=("Qwen2Attention",),
                                 rope=hf.apply_rotary_pos_emb, eager=hf.eager_attention_forward,
                                 attn_kwargs=lambda attn: {"sliding_window": attn.sliding_window}))
