"""Routing stability: does a sparse model still route an old task's probes the way it did when it learned it?

For the probes of task j (at most `max_probes` per task), the fast pathway's selections are recorded at
every task-boundary checkpoint through the attention modules' opt-in capture (`module.capture = []`; None =
off, the default): split = each sparse head's kept keys, dsa = the indexer's kept tokens (shared by the
routed heads), nsa = each KV group's selected blocks (+ the branch gates). Rows per (task j, checkpoint k,
layer), averaged over the task's probes (seed{S}-order{O}/analysis/routing.jsonl):

    {"probe_task": j, "ckpt": k, "ref_ckpt": j + 1 (or -1), "layer", "measure", "value"}

    jaccard_last    |A∩B| / |A∪B| of the selected sets at the answer-predicting position (the prompt's last
                    token), checkpoint k vs j + 1 (just after learning task j), mean over heads / KV groups
    jaccard_all     the same averaged over every prompt position
    gate_drift_{cmp,slc,win}   nsa: mean |g_k − g_{j+1}| of the sigmoid gates over heads and positions
    fact_mass       attention probability (fast pathway heads, answer position) on the tokens that name the
                    probed fact (tags item | world | subject in the prompt), mean over heads; every k
    fact_selected   share of those tokens (nsa: their blocks) in the selected set at the answer position

Shape legend: B probes, L prompt length (+ BOS), S keys, M selection blocks, Hs selection sets per layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from topocl.analysis.load import Stream
from topocl.tasks import Probe

FACT_TAGS = ("item", "world", "subject")


def jaccard(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Jaccard of bool sets on the last dim: a, b [..., S] -> [...] float; 1 where both are empty."""
    inter = (a & b).sum(-1).float()
    union = (a | b).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@contextmanager
def capture(model: nn.Module) -> Iterator[list[list[dict]]]:
    """Switch on every attention module's capture inside the block; yields one record list per module."""
    mods = [m for m in model.modules() if hasattr(m, "capture")]
    for m in mods:
        m.capture = []
    try:
        yield [m.capture for m in mods]
    finally:
        for m in mods:
            m.capture = None


def fact_span(probe: Probe) -> str:
    """The prompt text naming the probed fact: the first of tags item / world / subject found in the prompt."""
    for k in FACT_TAGS:
        v = probe.tags.get(k, "")
        if v and v in probe.prompt:
            return v
    return ""


def fact_positions(tok, prompt: str, span: str, offset: int) -> list[int]:
    """Sequence positions of the prompt's tokens overlapping the first occurrence of `span` (offset = tokens
    before the prompt, e.g. 1 for BOS). Token character ranges come from decoding growing prefixes."""
    if not span or span not in prompt:
        return []
    lo, hi = prompt.index(span), prompt.index(span) + len(span)
    ids = tok.encode(prompt)
    ends = [len(tok.decode(ids[: i + 1])) for i in range(len(ids))]
    starts = [0, *ends[:-1]]
    return [offset + i for i, (s, e) in enumerate(zip(starts, ends)) if s < hi and e > lo]


@torch.no_grad()
def record(model: nn.Module, tok, probes: list[Probe], device: torch.device, unit: int = 1) -> list[list[dict]]:
    """Per probe, per attention layer: {"select" bool [Hs, L, X], "probs" [H, S] at the last position,
    "gates" [3, H, L] or None, "fact" positions (in units of X: tokens, or nsa blocks of `unit` tokens),
    "fact_tokens" positions}. Empty lists when the model has no capturing attention."""
    prefix = [tok.bos_id] if tok.bos_id is not None else []
    seqs = [prefix + tok.encode(p.prompt) for p in probes]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)  # right padding: causal, so positions < len are unaffected
    model.eval()
    with capture(model) as caps:
        model(ids.to(device))
    out = []
    for i, (p, s) in enumerate(zip(probes, seqs)):
        n = len(s)
        toks = fact_positions(tok, p.prompt, fact_span(p), len(prefix))
        layers = []
        for cap in caps:
            if not cap:
                continue
            rec = cap[0]
            sel = rec["select"][i]
            sel = sel[None] if sel.dim() == 2 else sel  # dsa: one set shared by the heads -> [1, T, S]
            layers.append({"select": sel[:, :n], "probs": rec["probs"][i, :, n - 1, :n],
                           "gates": rec["gates"][i, :, :, :n] if "gates" in rec else None,
                           "fact_tokens": toks, "fact": sorted({t // unit for t in toks})})
        out.append(layers)
    return out


def compare(ref: list[list[dict]], cur: list[list[dict]]) -> dict[tuple[int, str], float]:
    """(layer, measure) -> mean over probes of the jaccard / gate-drift measures between two recordings."""
    acc: dict[tuple[int, str], list[float]] = {}
    for pr, pc in zip(ref, cur):
        for layer, (a, b) in enumerate(zip(pr, pc)):
            jac = jaccard(a["select"], b["select"])  # [Hs, L]
            acc.setdefault((layer, "jaccard_last"), []).append(float(jac[:, -1].mean()))
            acc.setdefault((layer, "jaccard_all"), []).append(float(jac.mean()))
            if a["gates"] is not None:
                drift = (a["gates"] - b["gates"]).abs().mean(dim=(1, 2))  # [3]
                for name, v in zip(("cmp", "slc", "win"), drift.tolist()):
                    acc.setdefault((layer, f"gate_drift_{name}"), []).append(v)
    return {k: sum(v) / len(v) for k, v in acc.items()}


def fact_measures(cur: list[list[dict]]) -> dict[tuple[int, str], float]:
    """(layer, measure) -> mean over probes (with a located fact) of fact_mass and fact_selected."""
    acc: dict[tuple[int, str], list[float]] = {}
    for probe in cur:
        for layer, r in enumerate(probe):
            if not r["fact_tokens"]:
                continue
            acc.setdefault((layer, "fact_mass"), []).append(float(r["probs"][:, r["fact_tokens"]].sum(-1).mean()))
            last = r["select"][:, -1]  # [Hs, X]
            acc.setdefault((layer, "fact_selected"), []).append(float(last[:, r["fact"]].float().mean()))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def selection_unit(model: nn.Module) -> int:
    """Tokens per selected unit: nsa selects blocks of sel_block tokens, split / dsa single tokens."""
    cfg = getattr(getattr(model, "module", model), "cfg", None)
    return cfg.nsa.sel_block if cfg is not None and cfg.attention == "nsa" else 1


def run_routing(st: Stream, max_probes: int = 8) -> list[dict]:
    """Routing rows over every task-boundary checkpoint (needs analysis.keep_task_checkpoints=true)."""
    n = len(st.tasks)
    if not any(hasattr(m, "capture") for m in st.model.modules()):
        return []  # dense attention: nothing is selected
    probes = [[p for p in t.probes if p.kind == "retain"][:max_probes] for t in st.tasks]
    unit = selection_unit(st.model)
    refs: dict[int, list[list[dict]]] = {}  # task j -> its probes recorded at checkpoint j + 1
    rows = []
    for k in range(n + 1):
        st.load_weights(k)
        for j in range(n):
            if not probes[j]:
                continue
            cur = record(st.model, st.tok, probes[j], st.device, unit)
            for (layer, m), v in fact_measures(cur).items():
                rows.append({"probe_task": j, "ckpt": k, "ref_ckpt": -1, "layer": layer, "measure": m, "value": v})
            if k == j + 1:
                refs[j] = cur
            elif k > j + 1:
                for (layer, m), v in compare(refs[j], cur).items():
                    rows.append({"probe_task": j, "ckpt": k, "ref_ckpt": j + 1, "layer": layer, "measure": m,
                                 "value": v})
    st.load_weights(n)
    return rows
