"""Activation sparsity per module and role, before and after a stream (dense and sparse models alike).

Every nn.Linear whose weight has a role is hooked; its *input* is the activation measured (the input of
`o_proj` is a head group's / branch mix's attention output, the input of `down` the MLP's hidden units, the
input of q/k/v the normed residual stream). On the first `rows` packed sequences of the stream's task texts:

    frac_near_zero   share of entries with |x| <= rel · RMS(x) of that module's activations
    effective_rank   exp(entropy of the normalised singular values) of the [N tokens, d] activation matrix
                     (Roy & Vetterli 2007); N capped at `max_tokens`

Rows (seed{S}-order{O}/analysis/sparsity.jsonl): {"ckpt": 0 | T, "module", "role", "measure", "value"};
module is the Linear's name, plus one row per role averaging its modules (module = "role:<role>").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from topocl.analysis.load import Stream
from topocl.continual import task_rows


def near_zero_fraction(x: Tensor, rel: float = 0.1) -> float:
    """Share of entries of x with |x| <= rel · RMS(x) (RMS over all of x; 1.0 for an all-zero x)."""
    x = x.float()
    rms = x.square().mean().sqrt()
    return float((x.abs() <= rel * rms).float().mean())


def effective_rank(x: Tensor) -> float:
    """exp(H(σ / Σσ)) of x [N, d]: 1 for a rank-one matrix, min(N, d) for equal singular values."""
    s = torch.linalg.svdvals(x.float())
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


@torch.no_grad()
def activation_stats(model: nn.Module, ids: Tensor, rel: float = 0.1, max_tokens: int = 1024) -> list[dict]:
    """Rows {"module", "role", "measure", "value"} for the inputs of every role-carrying Linear on ids [B, T]."""
    base = getattr(model, "module", model)
    roles = base.param_roles()
    acts: dict[str, Tensor] = {}
    hooks = []
    for name, m in base.named_modules():
        if isinstance(m, nn.Linear) and f"{name}.weight" in roles:
            def hook(mod, inp, out, name=name):
                acts[name] = inp[0].detach().reshape(-1, inp[0].shape[-1])[:max_tokens].float().cpu()  # [N, d]
            hooks.append(m.register_forward_hook(hook))
    try:
        model.eval()
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    rows, by_role = [], {}
    for name, x in acts.items():
        role = roles[f"{name}.weight"]
        for measure, v in (("frac_near_zero", near_zero_fraction(x, rel)), ("effective_rank", effective_rank(x))):
            rows.append({"module": name, "role": role, "measure": measure, "value": v})
            by_role.setdefault((role, measure), []).append(v)
    rows += [{"module": f"role:{r}", "role": r, "measure": m, "value": sum(v) / len(v)}
             for (r, m), v in sorted(by_role.items())]
    return rows


def run_sparsity(st: Stream, rows: int = 8, rel: float = 0.1) -> list[dict]:
    """Activation stats at checkpoint 0 (before the stream) and T (after it), on the first `rows` sequences."""
    data = torch.cat([task_rows(t, st.tok, st.seq_len) for t in st.tasks])[:rows]  # [rows, T + 1]
    ids = data[:, :-1].to(st.device)
    out = []
    for k in (0, len(st.tasks)):
        st.load_weights(k)
        out += [{"ckpt": k, **r} for r in activation_stats(st.model, ids, rel)]
    return out
