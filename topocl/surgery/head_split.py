"""Head-split surgery on a pretrained Hugging Face causal LM (route A).

Every selected attention layer's heads are split into group A (dense; frozen, like the MLPs) and group B
(whole KV groups with their query heads; keeps only the top-k of its own causal scores per query; trains,
or stays frozen under LoRA adapters). The PEFT way: the attention module is replaced in place by a
`HeadSplitAttention` that keeps the original as `base_layer`, whose q/k/v/o projections become
`HeadSplitLinear`s with physically separate group-A (`.a`) and group-B (`.b`) parameters, so a frozen
group A has no gradient and no optimizer state (weight decay and momentum cannot move it):

    model.layers.3.self_attn                        HeadSplitAttention
    model.layers.3.self_attn.base_layer             the original LlamaAttention / Qwen2Attention / ...
    model.layers.3.self_attn.base_layer.q_proj.a    rows of group-A heads (q/k/v: output rows, bias rows too)
    model.layers.3.self_attn.base_layer.o_proj.b    columns of group-B heads (o: input columns; the o bias is in .a)

    y = o_A(attn_A) + o_B(attn_B)
    attn_A = the family's own attention (eager / sdpa, with its mask, sliding window, ...) on group-A heads
    attn_B = softmax(q_B k_Bᵀ · scale, masked to topk_mask(scores, budget, visible)) v_B

`topk_mask` is topocl.attention.ops's, shared with the `split` attention kind. Budget per query: topk keys
(an int >= 1), or round(topk · n) keys for a fraction 0 < topk < 1, where n = the keys visible to that query
(causal, sliding window, padding), at least 1 — the `split` kind's row budget when n = t + 1. With
topk >= T the split model computes the original's logits. `merge_back` restores the original modules
bitwise; `save` writes a standard checkpoint (merged, LoRA folded in) that loads without TopoCL.

Shape legend: B batch, T query positions, S key positions, C hidden size, Ha/Hb query heads of group A/B,
Ka/Kb their KV heads, G = query heads per KV head, D head dim.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from topocl.attention.ops import attend, repeat_kv, topk_mask
from topocl.surgery.arch import PROJECTIONS, ArchSpec, spec_for
from topocl.surgery.hf import add_lora, drop_gguf_marker, param_roles, params_by_role


@dataclass
class HeadSplitConfig:
    layers: list[int] = field(default_factory=list)  # decoder layers to split ([] = all; negative = from the end)
    kv_groups: list[int] = field(default_factory=list)  # group-B KV groups ([] = the last half, at least 1)
    topk: int | float = 0.1  # group-B keys per query: a count (>= 1) or a fraction (0 < topk < 1) of visible keys
    train_mlp: bool = False
    train_embeddings: bool = False
    train_lm_head: bool = False  # tied to the embeddings in some models: then train_embeddings must match
    train_norms: bool = False
    lora: bool = False  # LoRA adapters on group B's q/k/v/o (group B itself frozen) instead of training group B
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0


def resolve_topk(topk: int | float) -> int | float:
    """An int count (>= 1) or a float fraction in (0, 1); anything else is an error naming the key."""
    if isinstance(topk, bool) or not isinstance(topk, int | float):
        raise ValueError(f"topk={topk!r}: give a count of keys (>= 1) or a fraction in (0, 1)")
    if 0 < topk < 1:
        return float(topk)
    if topk >= 1 and float(topk).is_integer():
        return int(topk)
    raise ValueError(f"topk={topk!r}: give a count of keys (an integer >= 1) or a fraction in (0, 1)")


@dataclass
class SurgeryReport:
    arch: str
    layers: list[int]  # split decoder layers
    n_layers: int
    q_heads: int
    kv_heads: int
    kv_groups: list[int]  # group-B KV groups (every split layer)
    heads_b: list[int]  # group-B query heads
    topk: int | float
    lora: bool
    params: dict[str, int]  # role -> scalars
    trainable: dict[str, int]  # role -> trainable scalars

    def summary(self) -> str:
        g = self.q_heads // self.kv_heads
        lines = [f"{self.arch}: {self.n_layers} layers, {self.q_heads} query heads, {self.kv_heads} KV heads (G={g})",
                 f"split layers: {_ranges(self.layers)} ({len(self.layers)} of {self.n_layers})",
                 f"group B: KV groups {self.kv_groups}, query heads {self.heads_b}; group A: the other "
                 f"{self.q_heads - len(self.heads_b)} query heads",
                 f"group B keeps top-{self.topk} {'keys' if isinstance(self.topk, int) else 'of visible keys'}"
                 f"{'; LoRA on group B' if self.lora else ''}",
                 f"{'role':<20} {'params':>14} {'trainable':>14}"]
        for role, n in self.params.items():
            lines.append(f"{role:<20} {n:>14,} {self.trainable.get(role, 0):>14,}")
        lines.append(f"{'total':<20} {sum(self.params.values()):>14,} {sum(self.trainable.values()):>14,}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _ranges(xs: list[int]) -> str:
    return f"{xs[0]}..{xs[-1]}" if xs and xs == list(range(xs[0], xs[-1] + 1)) and len(xs) > 2 else str(xs)


# ----------------------------------------------------------------------------- modules


class HeadSplitLinear(nn.Module):
    """One projection split by heads into group A (`a`) and group B (`b`), each its own nn.Linear. dim 0
    (q/k/v): output rows; dim 1 (o): input columns, the bias stays in `a`. forward(x) equals the original."""

    def __init__(self, lin: nn.Linear, index_b: Tensor, dim: int) -> None:
        super().__init__()
        w, bias, n = lin.weight.detach(), lin.bias, lin.weight.shape[dim]
        in_b = torch.zeros(n, dtype=torch.bool)
        in_b[index_b] = True
        idx_a, idx_b = (~in_b).nonzero().squeeze(1), in_b.nonzero().squeeze(1)
        self.dim, self.out_features, self.in_features = dim, lin.out_features, lin.in_features
        self.register_buffer("index_a", idx_a.to(w.device), persistent=False)
        self.register_buffer("index_b", idx_b.to(w.device), persistent=False)
        self.register_buffer("inverse", torch.argsort(torch.cat([idx_a, idx_b])).to(w.device), persistent=False)
        dev, dt = w.device, w.dtype
        if dim == 0:
            self.a = nn.utils.skip_init(nn.Linear, lin.in_features, len(idx_a), bias=bias is not None,
                                        device=dev, dtype=dt)
            self.b = nn.utils.skip_init(nn.Linear, lin.in_features, len(idx_b), bias=bias is not None,
                                        device=dev, dtype=dt)
            parts = ((self.a, w[idx_a], None if bias is None else bias[idx_a]),
                     (self.b, w[idx_b], None if bias is None else bias[idx_b]))
        else:
            self.a = nn.utils.skip_init(nn.Linear, len(idx_a), lin.out_features, bias=bias is not None,
                                        device=dev, dtype=dt)
            self.b = nn.utils.skip_init(nn.Linear, len(idx_b), lin.out_features, bias=False, device=dev, dtype=dt)
            parts = ((self.a, w[:, idx_a], bias), (self.b, w[:, idx_b], None))
        with torch.no_grad():
            for mod, wp, bp in parts:
                mod.weight.copy_(wp)
                if bp is not None:
                    mod.bias.copy_(bp.detach())

    def forward(self, x: Tensor) -> Tensor:
        if self.dim == 0:
            return torch.cat([self.a(x), self.b(x)], dim=-1)[..., self.inverse]  # [..., out] original order
        return self.a(x[..., self.index_a]) + self.b(x[..., self.index_b])

    def merged(self) -> tuple[Tensor, Tensor | None]:
        """(weight, bias) in the original layout, LoRA deltas on `b` folded in (the modules are not changed)."""
        wa, wb = self.a.weight.detach(), _weight_with_lora(self.b)
        w = wa.new_empty(self.out_features, self.in_features)
        if self.dim == 0:
            w[self.index_a], w[self.index_b] = wa, wb
            bias = None
            if self.a.bias is not None:
                bias = wa.new_empty(self.out_features)
                bias[self.index_a], bias[self.index_b] = self.a.bias.detach(), _base(self.b).bias.detach()
        else:
            w[:, self.index_a], w[:, self.index_b] = wa, wb
            bias = None if self.a.bias is None else self.a.bias.detach().clone()
        return w, bias


def _base(m: nn.Module) -> nn.Linear:
    return m.get_base_layer() if hasattr(m, "get_base_layer") else m


def _weight_with_lora(m: nn.Module) -> Tensor:
    w = _base(m).weight.detach()
    if hasattr(m, "lora_A") and not getattr(m, "merged", False):
        for name in m.active_adapters:
            if name in m.lora_A:
                w = w + m.get_delta_weight(name).detach().to(w.dtype)
    return w


def visible_keys(mask: Tensor | None, t: int, s: int, device: torch.device) -> Tensor:
    """Bool [B|1, 1, T, S]: keys each query may see, from the mask the model hands its attention. None means
    SDPA's is_causal (upper-left causal) for T > 1 and every cached key for one query; additive float masks
    are 0 where visible."""
    if mask is None:
        if t == 1:
            return torch.ones(1, 1, 1, s, dtype=torch.bool, device=device)
        return (torch.arange(t, device=device)[:, None] >= torch.arange(s, device=device)[None, :])[None, None]
    if not torch.is_tensor(mask) or mask.dim() != 4:
        raise ValueError(f"head-split group B needs a 4-D attention mask, got {type(mask).__name__}: "
                         "load the model with attn_implementation='eager' or 'sdpa'")
    visible = mask if mask.dtype == torch.bool else mask == 0
    return visible[..., -s:]  # [B, 1, T, S]


class HeadSplitAttention(nn.Module):
    """Replaces one attention module; the original is `base_layer` (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, spec: ArchSpec, kv_groups: list[int], topk: int | float) -> None:
        super().__init__()
        cfg = base_layer.config
        h, hk, d = cfg.num_attention_heads, cfg.num_key_value_heads, base_layer.head_dim
        g = h // hk
        for name, n_out in (("q_proj", h * d), ("k_proj", hk * d), ("v_proj", hk * d)):
            lin = getattr(base_layer, name, None)
            if not isinstance(lin, nn.Linear) or lin.out_features != n_out:
                raise ValueError(f"{type(base_layer).__name__}.{name} is not an nn.Linear with {n_out} outputs")
        heads_b = [j * g + i for j in kv_groups for i in range(g)]  # query head h is served by KV head h // G
        rows_q = torch.tensor([hh * d + x for hh in heads_b for x in range(d)])
        rows_kv = torch.tensor([j * d + x for j in kv_groups for x in range(d)])
        for name, rows, dim in (("q_proj", rows_q, 0), ("k_proj", rows_kv, 0), ("v_proj", rows_kv, 0),
                                ("o_proj", rows_q, 1)):
            setattr(base_layer, name, HeadSplitLinear(getattr(base_layer, name), rows, dim))
        self.base_layer = base_layer
        self.spec = spec
        self.kv_a, self.kv_b, self.groups, self.head_dim = hk - len(kv_groups), len(kv_groups), g, d
        self.topk = topk
        self.fast_on = True
        self.key_frac: Tensor | None = None  # fraction of visible keys group B kept in the last forward

    def set_fast_pathway(self, enabled: bool) -> None:
        self.fast_on = enabled

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None,
                attention_mask: Tensor | None = None, past_key_values=None, **kwargs) -> tuple[Tensor, None]:
        base = self.base_layer
        b, t, _ = hidden_states.shape

        def heads(lin: nn.Module) -> Tensor:
            return lin(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)  # [B, h, T, D]

        qa, ka, va = heads(base.q_proj.a), heads(base.k_proj.a), heads(base.v_proj.a)
        qb, kb, vb = heads(base.q_proj.b), heads(base.k_proj.b), heads(base.v_proj.b)
        cos, sin = position_embeddings
        qa, ka = self.spec.rope(qa, ka, cos, sin)
        qb, kb = self.spec.rope(qb, kb, cos, sin)
        if past_key_values is not None:  # the cache holds [A; B] KV heads of this layer
            k, v = past_key_values.update(torch.cat([ka, kb], 1), torch.cat([va, vb], 1), base.layer_idx)
            ka, kb = k.split([self.kv_a, self.kv_b], dim=1)  # [B, Ka, S, D], [B, Kb, S, D]
            va, vb = v.split([self.kv_a, self.kv_b], dim=1)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(base.config._attn_implementation, self.spec.eager)
        ya, _ = interface(base, qa, ka, va, attention_mask, dropout=base.attention_dropout if self.training else 0.0,
                          scaling=base.scaling, **self.spec.attn_kwargs(base), **kwargs)  # [B, T, Ha, D]
        out = base.o_proj.a(ya.reshape(b, t, -1))  # [B, T, C]
        if self.fast_on:
            yb = self.sparse(qb, kb, vb, attention_mask)  # [B, Hb, T, D]
            out = out + base.o_proj.b(yb.transpose(1, 2).reshape(b, t, -1))
        return out, None

    def sparse(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Group B: each query keeps the top-k of its own visible scores. q [B, Hb, T, D], k/v [B, Kb, S, D]."""
        t, s = q.shape[2], k.shape[2]
        visible = visible_keys(mask, t, s, q.device)  # [B|1, 1, T, S]
        k, v = repeat_kv(k, self.groups), repeat_kv(v, self.groups)  # [B, Hb, S, D]
        with torch.no_grad():  # selection only: no gradient through the indices
            scores = q @ k.transpose(-1, -2)  # [B, Hb, T, S]
            n_vis = visible.sum(-1, keepdim=True)  # [B|1, 1, T, 1]
            budget = self.topk if isinstance(self.topk, int) else (self.topk * n_vis).round().long().clamp(min=1)
            keep = topk_mask(scores, budget, visible)  # [B, Hb, T, S]
            self.key_frac = keep.sum(-1).float().mean() / n_vis.float().mean().clamp(min=1)
        return attend(q, k, v, keep, self.base_layer.scaling)


# ----------------------------------------------------------------------------- surgery


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def apply_head_split(model: nn.Module, cfg: HeadSplitConfig) -> SurgeryReport:
    """Split the heads of the selected attention layers of a Hugging Face causal LM in place and set
    requires_grad by the config (group B trains, or only its LoRA adapters; group A and unsplit attention
    are frozen; MLP/embeddings/lm_head/norms as configured)."""
    spec = spec_for(model)
    topk = resolve_topk(cfg.topk)
    if any(isinstance(m, HeadSplitAttention) for m in model.modules()):
        raise ValueError("the model is already head-split; merge_back(model) first")
    conf = model.config
    if conf._attn_implementation not in ("eager", "sdpa"):
        raise ValueError(f"attn_implementation={conf._attn_implementation!r}: head split supports eager and sdpa "
                         "(group B needs the 4-D mask those build; flash/flex hand over padding only)")
    if getattr(conf, "attention_dropout", 0.0):
        raise ValueError(f"attention_dropout={conf.attention_dropout}: group-B attention has no dropout; set it to 0")
    attns = [(n, m) for n, m in model.named_modules() if type(m).__name__ in spec.attention_classes]
    n_layers = conf.num_hidden_layers
    bad = [i for i in cfg.layers if not -n_layers <= i < n_layers]
    if bad:
        raise ValueError(f"layers={cfg.layers}: {bad} match no decoder layer; the model has {n_layers} "
                         f"(0..{n_layers - 1}, or negative from the end)")
    layers = sorted({i % n_layers for i in cfg.layers}) if cfg.layers else list(range(n_layers))
    chosen = [(n, m) for n, m in attns if m.layer_idx in layers]
    if not chosen:
        raise ValueError(f"head-split matched no attention module: no {'/'.join(spec.attention_classes)} with "
                         f"layer_idx in {layers} in {type(model).__name__}")
    hk, h = conf.num_key_value_heads, conf.num_attention_heads
    if hk < 2:
        raise ValueError(f"{type(model).__name__} has {hk} KV head(s): a head split needs at least 2 KV groups")
    kv = sorted(set(cfg.kv_groups)) if cfg.kv_groups else list(range(hk - max(1, hk // 2), hk))
    if not kv or not all(0 <= j < hk for j in kv) or len(kv) == hk:
        raise ValueError(f"kv_groups={cfg.kv_groups}: group B must be 1..{hk - 1} distinct KV groups in 0..{hk - 1} "
                         "(group A keeps the rest)")
    tied = bool(getattr(conf, "tie_word_embeddings", False)) and model.get_output_embeddings() is not None
    if tied and cfg.train_embeddings != cfg.train_lm_head:
        raise ValueError("lm_head is tied to the embeddings in this model: train_embeddings and train_lm_head must "
                         f"agree (got {cfg.train_embeddings} and {cfg.train_lm_head})")
    model._topocl_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model._topocl_head_split = dataclasses.asdict(cfg)
    for name, attn in chosen:
        parent, child = _parent(model, name)
        setattr(parent, child, HeadSplitAttention(attn, spec, kv, topk))
    if cfg.lora:
        add_lora(model, ["attn.sparse_heads"], cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    trains = {"attn.sparse_heads": not cfg.lora, "lora": True, "mlp": cfg.train_mlp, "embed": cfg.train_embeddings,
              "head": cfg.train_lm_head, "norm": cfg.train_norms}
    params = dict(model.named_parameters())
    for name, role in param_roles(model).items():
        params[name].requires_grad_(trains.get(role, False))
    g = h // hk
    return SurgeryReport(arch=spec.name, layers=[m.layer_idx for _, m in chosen], n_layers=n_layers, q_heads=h,
                         kv_heads=hk, kv_groups=kv, heads_b=[j * g + i for j in kv for i in range(g)], topk=topk,
                         lora=cfg.lora, params=params_by_role(model), trainable=params_by_role(model, trainable=True))


def merge_back(model: nn.Module) -> nn.Module:
    """Put every original attention module back with its q/k/v/o as plain nn.Linear (LoRA deltas folded into
    group B), restoring requires_grad as it was before the surgery. Bitwise the original when nothing trained."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, HeadSplitAttention):
            continue
        base = m.base_layer
        for proj in PROJECTIONS:
            split: HeadSplitLinear = getattr(base, proj)
            w, bias = split.merged()
            lin = nn.utils.skip_init(nn.Linear, split.in_features, split.out_features, bias=bias is not None,
                                     device=w.device, dtype=w.dtype)
            lin.weight = nn.Parameter(w)
            if bias is not None:
                lin.bias = nn.Parameter(bias)
            setattr(base, proj, lin)
        parent, child = _parent(model, name)
        setattr(parent, child, base)
    flags = getattr(model, "_topocl_requires_grad", None)
    if flags is not None:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, True))
        del model._topocl_requires_grad
    model.__dict__.pop("_topocl_head_split", None)
    return model


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of the merged (original-layout) model, computed without changing `model`."""
    splits = {n: m for n, m in model.named_modules() if isinstance(m, HeadSplitAttention)}
    sd: dict[str, Tensor] = {}
    for name, m in splits.items():
        for proj in PROJECTIONS:
            w, bias = getattr(m.base_layer, proj).merged()
            sd[f"{name}.{proj}.weight"] = w
            if bias is not None:
                sd[f"{name}.{proj}.bias"] = bias
    for key, value in model.state_dict().items():
        owner = next((n for n in splits if key.startswith(n + ".")), None)
        if owner is None:
            if "lora_" in key:
                raise ValueError(f"{key}: LoRA adapters outside group B cannot be saved as a plain checkpoint")
            sd[key] = value
            continue
        rest = key[len(owner) + 1:].removeprefix("base_layer.")
        if rest.split(".")[0] not in PROJECTIONS:
            sd[f"{owner}.{rest}"] = value
    return sd


def save(model: nn.Module, path: str | Path, tokenizer=None) -> Path:
    """Write a standard Hugging Face checkpoint directory of the merged model (AutoModelForCausalLM loads it
    without TopoCL; a GGUF origin is dropped: the weights are plain safetensors now). A plain HF model runs
    group B densely: the top-k mask is TopoCL's runtime. The split config goes to topocl_head_split.json, so
    apply_head_split(model, HeadSplitConfig(**json.load(...))) restores the sparse model."""
    path = Path(path)
    drop_gguf_marker(model)
    model.save_pretrained(path, state_dict=merged_state_dict(model))
    split_cfg = model.__dict__.get("_topocl_head_split")
    if split_cfg is not None:
        (path / "topocl_head_split.json").write_text(json.dumps(split_cfg, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
