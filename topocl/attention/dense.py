"""Dense causal GQA attention (the control). Every attention kind follows the same contract:

    __init__(cfg: ModelConfig, layer: int)
    forward(x [B, T, C], cos, sin [T, D/2]) -> (y [B, T, C], aux: dict[str, Tensor])
        aux keys "loss.<name>" are added to the training loss; "stat.<name>" are logged (detached)
    param_role(name) -> role of the module-local parameter `name` (e.g. "q_proj.weight" -> "attn.q")

Shape legend: B batch, T positions, C d_model, H query heads, Hk KV heads, D head dim.
"""

from __future__ import annotations

from torch import Tensor, nn

from topocl.attention.ops import apply_rope, sdpa_causal
from topocl.config import ModelConfig
from topocl.registry import ATTENTION


@ATTENTION.register("dense")
class DenseAttention(nn.Module):
    ROLES = {"q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v", "o_proj": "attn.o"}

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        if cfg.n_head % cfg.n_kv_head:
            raise ValueError(f"n_head={cfg.n_head} must be a multiple of n_kv_head={cfg.n_kv_head}")
        self.h, self.hk, self.d = cfg.n_head, cfg.n_kv_head, cfg.hd
        self.q_proj = nn.Linear(cfg.d_model, self.h * self.d, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.hk * self.d, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.hk * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, cfg.d_model, bias=False)

    def param_role(self, name: str) -> str:
        return self.ROLES[name.split(".")[0]]

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.d).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(b, t, self.hk, self.d).transpose(1, 2)  # [B, Hk, T, D]
        v = self.v_proj(x).view(b, t, self.hk, self.d).transpose(1, 2)  # [B, Hk, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = sdpa_causal(q, k, v)  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(b, t, self.h * self.d)  # [B, T, H*D]
        return self.o_proj(y), {}


