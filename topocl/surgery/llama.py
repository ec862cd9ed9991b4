"""Llama family (Llama 2/3, SmolLM2, ...): optional q/k/v/o biases (attention_bias), no sliding window."""

from transformers.models.llama import modeling_llama as hf

from topocl.surgery.arch import ARCHS, ArchSpec

ARCHS.register("llama")(ArchSpec(name="llama", model_types=("llama",), attention_classes=("LlamaAttention",),
                                 rope=hf.apply_rotary_pos_emb, eager=hf.eager_attention_forward))
