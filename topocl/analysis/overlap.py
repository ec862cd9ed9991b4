"""Overlap of FFN active sets between tasks: the quantity the compression–writability hypothesis says drives
interference (a write for one task moves the units another task also uses).

The FFN hidden units of a layer are the inputs of its `down` projection(s) (kwta / dual: every pathway's units
side by side; moe: the shared experts' units and the routed experts' units, a routed expert's units zeroed for
tokens not routed to it). A unit is *active* for a token when |h| > rel · RMS(h), the near-zero criterion of
topocl/analysis/sparsity.py (so a dense model has a measured active set too; a k-WTA model's losers are 0).

Measured at the *answer site* of every probe — the last prompt position, where the fact is read out — with
per-layer rows averaged over layers:

    active_frac        mean share of active units per answer site
    jaccard_within     mean Jaccard |A∩B| / |A∪B| over pairs of answer sites of the same task
    jaccard_between    the same over pairs from different tasks (what interference acts through)
    usage_overlap      weighted Jaccard Σ min(u_i, u_j) / Σ max(u_i, u_j) of per-task unit-usage frequencies u,
                       mean over task pairs
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from topocl.tasks import Task


def jaccard_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise Jaccard of bool rows a [N, H] and b [M, H] -> [N, M] (two empty sets: 0)."""
    a, b = a.float(), b.float()
    inter = a @ b.T  # [N, M]
    union = a.sum(1, keepdim=True) + b.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))


def weighted_jaccard(u: Tensor, v: Tensor) -> float:
    """Σ min(u, v) / Σ max(u, v) of non-negative vectors (0 when both are zero)."""
    top = torch.maximum(u, v).sum()
    return float(torch.minimum(u, v).sum() / top) if top > 0 else 0.0


@torch.no_grad()
def answer_site_hidden(model: nn.Module, tok, prompts: list[str], device, batch_size: int = 64) -> list[Tensor]:
    """Per layer, the FFN hidden units [N prompts, H] at each prompt's last position."""
    base = getattr(model, "module", model)
    layers: list[list[Tensor]] = [[] for _ in base.blocks]
    prefix = [tok.bos_id] if tok.bos_id is not None else []
    max_len = base.cfg.max_seq_len
    for start in range(0, len(prompts), batch_size):
        seqs = [(prefix + tok.encode(p))[-max_len:] for p in prompts[start:start + batch_size]]  # keep the end
        last = torch.tensor([len(s) - 1 for s in seqs])
        idx = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)  # [B, W] right-padded (causal)
        for r, s in enumerate(seqs):
            idx[r, :len(s)] = torch.tensor(s)
        caught: dict[tuple[int, str], Tensor] = {}
        hooks = []
        for i, block in enumerate(base.blocks):
            for name, m in block.ffn.named_modules():
                if name.endswith("down") or name == "router":
                    def hook(mod, inp, out, key=(i, name), store=caught):
                        store[key] = (out if key[1] == "router" else inp[0]).detach().float()  # [B, W, H]
                    hooks.append(m.register_forward_hook(hook))
        # moe: the reference path (every chosen expert on every token, same outputs) keeps the hooks' [B, W, H]
        # layout; dispatch hands each expert only its own tokens
        impls = {b: b.ffn.impl for b in base.blocks if getattr(b.ffn, "impl", None) == "dispatch"}
        try:
            base.eval()
            for b in impls:
                b.ffn.impl = "dense"
            base(idx.to(device))
        finally:
            for b, impl in impls.items():
                b.ffn.impl = impl
            for h in hooks:
                h.remove()
        caught = {k: v[torch.arange(len(seqs)), last].cpu() for k, v in caught.items()}  # [B, H] at the last token
        for i, block in enumerate(base.blocks):
            layers[i].append(_layer_units(block.ffn, i, caught, len(seqs)))
    return [torch.cat(chunks) for chunks in layers]


def _layer_units(ffn: nn.Module, i: int, caught: dict, n: int) -> Tensor:
    """[n, H] hidden units of one FFN; moe: routed experts zeroed where not chosen (and absent experts = 0)."""
    names = [name for name, _ in ffn.named_modules() if name.endswith("down")]
    if not hasattr(ffn, "experts"):
        return torch.cat([caught[(i, name)] for name in names], dim=1)
    chosen = torch.zeros(n, len(ffn.experts), dtype=torch.bool)
    chosen.scatter_(1, caught[(i, "router")].topk(ffn.topk, dim=-1).indices, True)  # [n, E]
    parts = []
    for name in names:
        width = ffn.get_submodule(name).in_features
        h = caught.get((i, name), torch.zeros(n, width))
        if name.startswith("experts."):
            h = h * chosen[:, int(name.split(".")[1])].unsqueeze(1)
        parts.append(h)
    return torch.cat(parts, dim=1)


def overlap_stats(hidden: list[Tensor], owner: list[int], rel: float = 0.1) -> dict[str, float]:
    """The module docstring's measures from per-layer hidden [N, H] and each row's task, averaged over layers."""
    owner_t = torch.tensor(owner)
    tasks = sorted(set(owner))
    acc: dict[str, list[float]] = {"active_frac": [], "jaccard_within": [], "jaccard_between": [],
                                   "usage_overlap": []}
    for h in hidden:
        active = h.abs() > rel * h.square().mean().sqrt()  # [N, H]
        acc["active_frac"].append(float(active.float().mean()))
        jac = jaccard_matrix(active, active)  # [N, N]
        same = owner_t[:, None] == owner_t[None, :]
        off_diag = ~torch.eye(len(owner), dtype=torch.bool)
        within = jac[same & off_diag]
        between = jac[~same]
        acc["jaccard_within"].append(float(within.mean()) if within.numel() else float("nan"))
        acc["jaccard_between"].append(float(between.mean()) if between.numel() else float("nan"))
        usage = [active[owner_t == t].float().mean(0) for t in tasks]
        pairs = [weighted_jaccard(usage[a], usage[b]) for a in range(len(tasks)) for b in range(a + 1, len(tasks))]
        acc["usage_overlap"].append(sum(pairs) / len(pairs) if pairs else float("nan"))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def task_overlap(model: nn.Module, tok, tasks: list[Task], device, rel: float = 0.1) -> dict[str, float]:
    """overlap_stats at the answer sites of every probe of `tasks`."""
    prompts = [p.prompt for t in tasks for p in t.probes]
    owner = [j for j, t in enumerate(tasks) for _ in t.probes]
    return overlap_stats(answer_site_hidden(model, tok, prompts, device), owner, rel)
