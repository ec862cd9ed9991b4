"""Probe evaluation: candidate ranking by total log-likelihood, greedy exact match, answer NLL.

One batched teacher-forced forward per chunk of (probe, candidate) sequences [bos] + prompt + candidate:
    correct  the answer's total log-likelihood is strictly the highest among the candidates
    em       greedy decoding after the prompt reproduces the answer's tokens; exact without generating,
             because greedy decoding emits the answer iff every answer token is the argmax given the prompt
             and the answer tokens before it
    nll      -log p(answer | prompt), nats summed over the answer's tokens
Works for our GPT and any Hugging Face causal LM (both return `.logits`), with our Tokenizer or a
Hugging Face tokenizer (see `as_tokenizer`). No sampling anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from topocl.tasks.base import Probe


@dataclass
class ProbeScore:
    id: str
    kind: str
    correct: bool  # candidate ranking by total log-likelihood
    em: bool  # greedy exact match of the answer
    nll: float  # -log p(answer | prompt), nats, summed over answer tokens
    answer_logprob: float
    best: str  # the highest-scoring candidate


class _HFTokenizer:
    """Adapter: a Hugging Face tokenizer with our encode/bos_id interface."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.bos_id = tok.bos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)


def as_tokenizer(tok):
    return tok if hasattr(tok, "bos_id") else _HFTokenizer(tok)


@torch.no_grad()
def score_probes(model: nn.Module, tokenizer, probes: list[Probe], *, batch_size: int = 128,
                 device: torch.device | str | None = None) -> list[ProbeScore]:
    tok = as_tokenizer(tokenizer)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prefix = [tok.bos_id] if tok.bos_id is not None else []
    seqs: list[tuple[list[int], int]] = []  # (ids, number of candidate tokens at the end)
    owner: list[tuple[int, int]] = []  # (probe index, candidate index)
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    max_len = getattr(cfg, "max_seq_len", None) or getattr(cfg, "max_position_embeddings", None) or 10**9
    for i, p in enumerate(probes):
        prompt = prefix + tok.encode(p.prompt)
        for j, c in enumerate(p.candidates):
            cand = tok.encode(c)
            if not cand:
                raise ValueError(f"probe {p.id or p.prompt!r}: candidate {c!r} encodes to no tokens")
            seqs.append(((prompt + cand)[-max_len:], len(cand)))  # keep the end if longer than the context
            owner.append((i, j))
    was_training = model.training
    model.eval()
    order = sorted(range(len(seqs)), key=lambda k: len(seqs[k][0]))  # similar lengths together: less padding
    out_lp = [0.0] * len(seqs)
    out_gr = [False] * len(seqs)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(seqs[k][0]) for k in chunk)
        idx = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, k in enumerate(chunk):
            idx[r, :len(seqs[k][0])] = torch.tensor(seqs[k][0])  # right-padded; causal: padding is never seen
        logits = model(idx.to(device)).logits.float()  # [b, W, V]
        lp = torch.log_softmax(logits, dim=-1)
        for r, k in enumerate(chunk):
            ids, n = seqs[k]
            pos = torch.arange(len(ids) - n - 1, len(ids) - 1, device=device)  # positions predicting the candidate
            tgt = torch.tensor(ids[-n:], device=device)
            out_lp[k] = float(lp[r, pos, tgt].sum())
            out_gr[k] = bool((logits[r, pos].argmax(-1) == tgt).all())
    logps, greedy = out_lp, out_gr
    if was_training:
        model.train()
    per_probe: dict[int, list[tuple[float, bool]]] = {}
    for (i, _), lpv, g in zip(owner, logps, greedy):
        per_probe.setdefault(i, []).append((lpv, g))
    scores = []
    for i, p in enumerate(probes):
        vals = per_probe[i]
        a = p.candidates.index(p.answer)
        a_lp, a_greedy = vals[a]
        others = [v for j, (v, _) in enumerate(vals) if j != a]
        best = max(range(len(vals)), key=lambda j: vals[j][0])
        scores.append(ProbeScore(id=p.id, kind=p.kind, correct=all(a_lp > o for o in others), em=a_greedy,
                                 nll=-a_lp, answer_logprob=a_lp, best=p.candidates[best]))
    return scores


def probe_accuracy(scores: list[ProbeScore], key: Callable[[ProbeScore], str] = lambda s: s.kind
                   ) -> dict[str, dict[str, float]]:
    """Group -> {acc, em, nll, n}; groups by probe kind unless `key` says otherwise."""
    groups: dict[str, list[ProbeScore]] = {}
    for s in scores:
        groups.setdefault(key(s), []).append(s)
    return {g: {"acc": sum(s.correct for s in ss) / len(ss), "em": sum(s.em for s in ss) / len(ss),
                "nll": sum(s.nll for s in ss) / len(ss), "n": len(ss)} for g, ss in sorted(groups.items())}


