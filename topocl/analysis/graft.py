"""Grafting: a causal test of where a task's knowledge lives.

After a stream, put one role group's weights from a task-boundary checkpoint into the final model and
re-score every probe:

    remove   group G from checkpoint j (before task j): task j's updates to G are undone. A drop on task j's
             probes (final − grafted > 0) says task j's knowledge was written into G.
    recover  group G from checkpoint j + 1 (right after task j): G as it was when task j was just learned. A
             gain on task j's probes (grafted − final > 0) says task j's knowledge in G was overwritten later.

Groups cover every parameter: `slow` and `fast` (the model's pathway roles, DESIGN.md table) when it has
them, and every other role on its own (MLP, embeddings, head, norms, ...; a dense model: every role); plus any
extra roles asked for (a prefix such as `attn` covers its sub-roles).
Rows (seed{S}-order{O}/analysis/graft.jsonl), one per (group, mode, task j, eval task, kind, type):

    {"group", "roles", "mode", "task", "source_ckpt", "eval_task", "kind", "type", "metric": "acc",
     "value" (grafted), "final" (the ungrafted final model),
     "moved" (whether the grafted weights differ from the final ones: false for a frozen group, whose graft
              changes nothing, so its "drop" of 0 is not evidence of anything)}
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from topocl.analysis.artifacts import GRAFT_MODES
from topocl.analysis.load import Stream, score_by_group

MODES = GRAFT_MODES


def role_names(model: nn.Module, roles: list[str]) -> list[str]:
    """Parameter names whose role is one of `roles` or under one of them as a dotted prefix."""
    base = getattr(model, "module", model)
    return sorted(n for n, r in base.param_roles().items() if any(r == x or r.startswith(x + ".") for x in roles))


@torch.no_grad()
def graft(model: nn.Module, source: dict[str, Tensor], names: list[str]) -> None:
    """Copy source[n] into parameter n for every name, in place (bitwise: copy_, no arithmetic)."""
    params = dict(getattr(model, "module", model).named_parameters())
    missing = [n for n in names if n not in source or n not in params]
    if missing:
        raise KeyError(f"graft: {missing[:5]} not in both the source weights and the model")
    for n in names:
        params[n].copy_(source[n])


def graft_groups(model: nn.Module, extra: list[str] | None = None) -> dict[str, list[str]]:
    """Group name -> roles: slow / fast pathways if the model has them, then every other role on its own (so
    every parameter is in a group); plus `extra`."""
    base = getattr(model, "module", model)
    slow, fast = base.pathway_roles()
    roles = set(base.param_roles().values())
    groups = {k: sorted(v & roles) for k, v in (("slow", slow), ("fast", fast)) if v & roles}
    groups.update({r: [r] for r in sorted(roles - slow - fast)})
    for r in extra or []:
        groups[r] = [r]
    return groups


def run_graft(st: Stream, groups: dict[str, list[str]] | None = None, tasks: list[int] | None = None,
              modes: tuple[str, ...] = MODES) -> list[dict]:
    """Every (group, mode, task) graft into the final model of `st`; the model ends with its final weights."""
    n = len(st.tasks)
    final = {k: v.clone() for k, v in st.weights(n).items()}
    st.model.load_state_dict(final)
    base_scores = score_by_group(st)
    groups = groups or graft_groups(st.model)
    rows = []
    for g, roles in groups.items():
        names = role_names(st.model, roles)
        if not names:
            raise ValueError(f"graft group {g!r}: no parameters with roles {roles}")
        for mode in modes:
            if mode not in MODES:
                raise ValueError(f"graft mode {mode!r}: use {' | '.join(MODES)}")
            for j in tasks if tasks is not None else range(n):
                k = j if mode == "remove" else j + 1
                source = st.weights(k)
                moved = any(not torch.equal(source[n].to(final[n].device), final[n]) for n in names)
                graft(st.model, source, names)
                for (e, kind, typ), acc in score_by_group(st).items():
                    rows.append({"group": g, "roles": ",".join(roles), "mode": mode, "task": j, "source_ckpt": k,
                                 "eval_task": e, "kind": kind, "type": typ, "metric": "acc", "value": acc,
                                 "final": base_scores[(e, kind, typ)], "moved": moved})
                graft(st.model, final, names)
    return rows
