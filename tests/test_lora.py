"""LoRA by role through PEFT: unchanged logits at injection, roles, only adapters move through the one
training loop, merge back to a plain GPT with the same function."""

import pytest
import torch

from topocl.config import ConfigError, ModelConfig, TrainConfig
from topocl.lora import LoRAConfig, apply_lora, has_lora, lora_policy, merge_lora, target_modules
from topocl.model import GPT
from topocl.optim import build_optimizer
from topocl.train import train_steps

CPU = torch.device("cpu")
CFG = ModelConfig(vocab_size=50, n_layer=2, d_model=16, n_head=4, n_kv_head=2, max_seq_len=16)


def tiny(attention: str = "dense") -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**CFG.__dict__, "attention": attention}))


def test_targets_are_chosen_by_role():
    m = tiny()
    assert target_modules(m, ["attn.q", "attn.v"]) == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj",
                                                       "blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]
    assert len(target_modules(m, ["attn"])) == 8  # a dotted prefix covers attn.q/k/v/o
    split = tiny("split")
    roles = split.param_roles()
    names = target_modules(split, ["attn.sparse_heads"])
    assert names and all(roles[f"{n}.weight"] == "attn.sparse_heads" for n in names)
    with pytest.raises(ConfigError, match=r"match no linear layer.*attn\.q"):
        apply_lora(tiny(), LoRAConfig(roles=["attn.cmp"]))
    with pytest.raises(ConfigError, match="lora.r"):
        apply_lora(tiny(), LoRAConfig(r=0))


def test_only_lora_moves_under_the_training_loop_and_merge_gives_back_a_plain_gpt():
    m = tiny()
    keys = list(m.state_dict())
    x = torch.randint(0, 50, (2, 12))
    before = m(x).logits.detach()
    m = apply_lora(m, LoRAConfig(r=2, roles=["attn.q", "attn.v"]))
    assert torch.equal(m(x).logits, before)  # B = 0 at init: the function is unchanged bitwise
    roles = m.param_roles()
    assert {r for n, r in roles.items() if "lora_" in n} == {"lora"}
    assert roles["blocks.0.attn.q_proj.base_layer.weight"] == "attn.q"  # the wrapped base weight keeps its role
    assert all(p.requires_grad == ("lora_" in n) for n, p in m.named_parameters())
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-2, warmup_steps=0, roles=lora_policy(m))
    opt = build_optimizer(m, cfg)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for n, p in m.named_parameters() if "lora_" in n}
    base = {n: p.detach().clone() for n, p in m.named_parameters() if "lora_" not in n}
    rows = torch.randint(0, 50, (2, 13))
    results = list(train_steps(m, opt, lambda s: rows, range(3), cfg=cfg, device=CPU))
    assert results[-1].lm_loss < results[0].lm_loss
    for n, p in m.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n
    assert all(p.abs().sum() > 0 for n, p in m.named_parameters() if "lora_B" in n)
    adapted = m(x).logits.detach()
    assert not torch.allclose(adapted, before)
    plain = merge_lora(m)
    assert list(plain.state_dict()) == keys and not any("lora" in r for r in plain.param_roles().values())
    fresh = tiny()
    fresh.load_state_dict(plain.state_dict())
    assert torch.allclose(fresh(x).logits, adapted, atol=1e-5)


def test_has_lora_tracks_injection_and_merge():
    m = tiny()
    assert not has_lora(m)
    m = apply_lora(m, LoRAConfig(roles=["mlp"]))
    assert has_lora(m)
    assert not has_lora(merge_lora(m))
