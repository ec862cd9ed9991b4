"""A readable decoder-only GPT: token embedding -> N x [RMSNorm -> attention -> RMSNorm -> FFN] -> RMSNorm
-> lm_head. RoPE positions, grouped-query attention, SwiGLU MLP, untied embedding and head.

The attention and FFN kinds come from registries (`cfg.attention`, `cfg.ffn`), so a sparse topology
is a config change. Every parameter has exactly one role (`param_roles()`); optimizer policies are
keyed by role.

Shape legend: B batch, T positions, C d_model, V vocab.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import topocl.attention  # noqa: F401  (registers the attention kinds)
import topocl.kwta  # noqa: F401  (registers the kwta and dual FFNs)
import topocl.moe  # noqa: F401  (registers the moe FFN)
from topocl.attention.ops import rope_cache
from topocl.attention.split import split_groups
from topocl.config import ModelConfig, SplitConfig
from topocl.registry import ATTENTION, FFN

ROLES_FIXED = ("embed", "head", "norm.attn", "norm.ffn", "norm.final")

# Model-level tensors read by both pathways, each with its own role so a role policy can place it (the ACFT presets
# state where each goes): `norm.attn` (the RMSNorm in front of attention, read by every head group), `norm.ffn` and
# the FFN (`mlp`, which reads the sum of both groups' outputs), `embed`, `norm.final` and `head`. A policy that
# freezes "the slow pathway" must also freeze what feeds it (`norm.attn`, `embed`), or the slow heads' inputs move.
SHARED_ROLES = ("embed", "norm.attn", "norm.ffn", "mlp", "norm.final", "head")

# The proposals' asymmetry: which roles form the slow ("compressed"/shared) pathway and which the fast
# ("selected"/sparse) one, per attention / FFN kind (DESIGN.md table). Dense kinds have neither.
SLOW_ROLES = {"nsa": ("attn.cmp",), "dsa": ("attn.shared_heads",), "split": ("attn.dense_heads",),
              "moe": ("ffn.shared_expert",), "dual": ("ffn.slow_units",)}
FAST_ROLES = {"nsa": ("attn.slc",), "dsa": ("attn.routed_heads", "attn.indexer"), "split": ("attn.sparse_heads",),
              "moe": ("ffn.routed_expert", "ffn.router"), "dual": ("ffn.fast_units",)}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


@FFN.register("mlp")
class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.ff, bias=False)
        self.down = nn.Linear(cfg.ff, cfg.d_model, bias=False)

    def param_role(self, name: str) -> str:
        return "mlp"

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.down(F.silu(self.gate(x)) * self.up(x)), {}


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = ATTENTION.get(cfg.attention)(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FFN.get(cfg.ffn)(cfg, layer)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        a, aux_a = self.attn(self.attn_norm(x), cos, sin)
        x = x + a
        f, aux_f = self.ffn(self.ffn_norm(x))
        return x + f, {**aux_a, **aux_f}


@dataclass
class ModelOutput:
    logits: Tensor  # [B, T, V] float32
    loss: Tensor | None = None  # lm_loss + every aux "loss.*" term
    lm_loss: Tensor | None = None  # mean next-token cross entropy (nats/token)
    aux: dict[str, Tensor] = field(default_factory=dict)  # "loss.*" summed, "stat.*" averaged over layers


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it is taken from the tokenizer in pretraining)")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_cache(cfg.max_seq_len, cfg.hd, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # [T_max, D/2]
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std) for matrices, residual-output projections scaled by 1/sqrt(2 * n_layer)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norms (ones), biases / gate biases keep their module's own init
            scale = (2 * self.cfg.n_layer) ** -0.5 if name.endswith(("o_proj.weight", "down.weight")) else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)
        for m in self.modules():
            if m is not self and hasattr(m, "reset_extra_parameters"):
                m.reset_extra_parameters()  # module-specific init (e.g. NSA gate biases)

    # ------------------------------------------------------------------ roles

    def param_roles(self) -> dict[str, str]:
        """Full parameter name -> role. Asserts every parameter has exactly one non-empty role."""
        roles: dict[str, str] = {}
        for name, _ in self.named_parameters():
            parts = name.split(".")
            if parts[0] == "tok_emb":
                role = "embed"
            elif parts[0] == "lm_head":
                role = "head"
            elif parts[0] == "norm":
                role = "norm.final"
            elif parts[0] == "blocks" and parts[2] in ("attn_norm", "ffn_norm"):
                role = "norm.attn" if parts[2] == "attn_norm" else "norm.ffn"  # read by both head groups / the FFN
            elif "lora_A" in parts or "lora_B" in parts:
                role = "lora"  # adapter weights injected by topocl.lora (the wrapped base weight keeps its role)
            elif parts[0] == "blocks" and parts[2] in ("attn", "ffn"):
                module = getattr(self.blocks[int(parts[1])], parts[2])
                role = module.param_role(".".join(parts[3:]))
            else:
                raise AssertionError(f"parameter {name} has no role")
            assert role, f"parameter {name} has an empty role"
            roles[name] = role
        n_params = sum(1 for _ in self.parameters())
        assert len(roles) == n_params, f"{n_params - len(roles)} parameters have no role"
        return roles

    def params_by_role(self) -> dict[str, int]:
        """Role -> number of scalar parameters."""
        counts: dict[str, int] = {}
        params = dict(self.named_parameters())
        for name, role in self.param_roles().items():
            counts[role] = counts.get(role, 0) + params[name].numel()
        return dict(sorted(counts.items()))

    def pathway_roles(self) -> tuple[set[str], set[str]]:
        """(slow roles, fast roles) of this model's attention and FFN kinds."""
        kinds = (self.cfg.attention, self.cfg.ffn)
        return ({r for k in kinds for r in SLOW_ROLES.get(k, ())}, {r for k in kinds for r in FAST_ROLES.get(k, ())})

    @contextmanager
    def fast_pathway(self, enabled: bool):
        """Switch the fast pathway off (enabled=False) inside the block, in every module that has one
        (modules implement `set_fast_pathway(enabled)`); raises if no module has a fast pathway."""
        mods = [m for m in self.modules() if hasattr(m, "set_fast_pathway")]
        if not mods:
            raise ValueError(f"model with attention={self.cfg.attention}, ffn={self.cfg.ffn} has no fast pathway")
        for m in mods:
            m.set_fast_pathway(enabled)
        try:
            yield self
        finally:
            for m in mods:
                m.set_fast_pathway(True)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if non_embedding else n

    # ------------------------------------------------------------------ forward

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> ModelOutput:
        """idx [B, T] token ids; targets [B, T] (-1 = ignored) -> ModelOutput."""
        b, t = idx.shape
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]  # [T, D/2]
        x = self.tok_emb(idx)  # [B, T, C]
        aux_sum: dict[str, Tensor] = {}
        for block in self.blocks:
            x, aux = block(x, cos, sin)
            for k, v in aux.items():
                aux_sum[k] = aux_sum[k] + v if k in aux_sum else v
        x = self.norm(x)
        logits = self.lm_head(x).float()  # [B, T, V]
        aux_out = {k: (v if k.startswith("loss.") else v.detach() / len(self.blocks)) for k, v in aux_sum.items()}
        out = ModelOutput(logits=logits, aux=aux_out)
        if targets is not None:
            lm = F.cross_entropy(logits.view(b * t, -1), targets.reshape(b * t), ignore_index=-1)
            out.lm_loss = lm
            out.loss = lm + sum((v for k, v in aux_out.items() if k.startswith("loss.")), torch.zeros_like(lm))
        return out

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 0.0,
                 stop_id: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Greedy (temperature 0) or sampled continuation of idx [B, T]; returns [B, T + new]."""
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.cfg.max_seq_len:]
            logits = self(ctx).logits[:, -1]  # [B, V]
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
            if stop_id is not None and bool((nxt == stop_id).all()):
                break
        return idx


def split_from_dense(model: nn.Module, sparse_kv_groups: int = -1) -> nn.Module:
    """A split GPT at full budget with the weights of dense-attention GPT `model`: KV groups 0..Ka-1 (with their
    query heads) form group A, the rest group B; q/k/v rows and o columns are copied, so its outputs equal
    `model`'s (up to float summation order: o = o_A + o_B). Roles: attn.dense_heads / attn.sparse_heads."""
    cfg = model.cfg
    if cfg.attention != "dense":
        raise ValueError(f"split_from_dense needs a dense-attention model, got attention={cfg.attention!r}")
    ka, _ = split_groups(cfg.n_kv_head, sparse_kv_groups)
    g, d = cfg.n_head // cfg.n_kv_head, cfg.hd
    split_cfg = dataclasses.replace(cfg, attention="split", split=SplitConfig(
        sparse_kv_groups=cfg.n_kv_head - ka, topk=0, topk_frac=1.0))
    dev = next(model.parameters()).device
    with torch.device("meta"):
        out = GPT(split_cfg)
    state = {}
    qa, kva = ka * g * d, ka * d  # rows of group A in q_proj / k_proj, v_proj
    for name, w in model.state_dict().items():
        pre, _, rest = name.partition(".attn.")
        if not rest:
            state[name] = w
            continue
        proj = rest.split(".")[0]  # q_proj | k_proj | v_proj | o_proj
        if proj == "o_proj":  # [C, H*D]: columns of group A's heads, then group B's
            a, b = w[:, :qa], w[:, qa:]
        else:  # [H*D, C] or [Hk*D, C]: rows
            cut = qa if proj == "q_proj" else kva
            a, b = w[:cut], w[cut:]
        state[f"{pre}.attn.dense.{rest}"] = a.clone()
        state[f"{pre}.attn.sparse.{rest}"] = b.clone()
    out.load_state_dict(state, assign=True)
    cos, sin = rope_cache(cfg.max_seq_len, cfg.hd, cfg.rope_base)
    out.rope_cos, out.rope_sin = cos, sin  # non-persistent buffers are not in the state dict
    return out.to(dev).train(model.training)
