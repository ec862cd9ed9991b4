"""Mistral family: no biases, one sliding window for every layer (config.sliding_window, None = off)."""

from transformers.models.mistral import modeling_mistral as hf

from topocl.surgery.arch import ARCHS, ArchSpec

ARCHS.register("mistral")(ArchSpec(
    name="mistral", model_types=("mistral",), attention_classes=("MistralAttention",),
    rope=hf.apply_rotary_pos_emb, eager=hf.eager_attention_forward,
    attn_kwargs=lambda attn: {"sliding_window": getattr(attn.config, "sliding_window", None)}))
