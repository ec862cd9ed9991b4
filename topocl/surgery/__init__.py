"""Surgery on pretrained Hugging Face causal LMs (route A): head split, top-k group B, asymmetric freeze.

    from topocl.surgery import HeadSplitConfig, apply_head_split, merge_back, save
    report = apply_head_split(hf_model, HeadSplitConfig(topk=0.1))   # in place
    print(report.summary())
    save(hf_model, "out/model", tokenizer)                            # standard HF checkpoint (merged)

Architectures register themselves in topocl.surgery.arch.ARCHS (one small file each: llama, qwen2, mistral).
"""

from topocl.surgery import llama, mistral, qwen2  # noqa: F401  (register the architectures)
from topocl.surgery.arch import ARCHS, ArchSpec, spec_for
from topocl.surgery.head_split import (
    HeadSplitAttention,
    HeadSplitConfig,
    HeadSplitLinear,
    SurgeryReport,
    apply_head_split,
    merge_back,
    merged_state_dict,
    save,
)
from topocl.surgery.hf import CausalLM, HFTokenizer, add_lora, load_hf, param_roles, params_by_role

__all__ = ["ARCHS", "ArchSpec", "CausalLM", "HFTokenizer", "HeadSplitAttention", "HeadSplitConfig", "HeadSplitLinear",
           "SurgeryReport", "add_lora", "apply_head_split", "load_hf", "merge_back", "merged_state_dict",
           "param_roles", "params_by_role", "save", "spec_for"]
