"""Probe evaluation (candidate ranking by mean log-likelihood per token, greedy exact match, answer NLL) and
held-out perplexity / bits per byte.

Probes: one batched teacher-forced forward per chunk of sequences [bos] + prompt + candidate, right-padded (the
model is causal, so padding after a sequence never changes its logits); a probe's one-token candidates share the
sequence [bos] + prompt, whose last logits score them all:
    correct      the answer's mean log-likelihood per candidate token is strictly the highest among the
                 candidates (ties are wrong). Per-token means do not favour candidates with fewer tokens, as
                 summed scores do (a 3-token answer pays three log-probabilities, a 1-token one only one).
    correct_sum  the same ranking by total (summed) log-likelihood, kept as a second reported metric (acc_sum)
    em       greedy decoding after the prompt reproduces the answer's tokens; exact without generating,
             because greedy decoding emits the answer iff every answer token is the argmax given the prompt
             and the answer tokens before it
    nll      -log p(answer | prompt), nats summed over the answer's tokens
Works for our GPT and any Hugging Face causal LM (both return `.logits`), with our Tokenizer or a Hugging
Face tokenizer (wrapped by `as_tokenizer`). A candidate's tokens are the tokens of prompt + candidate after
the prompt's own tokens (so a tokenizer that merges across the boundary is handled), or the candidate
encoded alone when the joint encoding does not start with the prompt's. No sampling anywhere.

Shapes: B sequences in a chunk, W = longest sequence in the chunk, S candidate-token sites in it, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from topocl.tasks.base import Probe


@dataclass
class ProbeScore:
    id: str
    kind: str
    correct: bool  # candidate ranking by mean log-likelihood per token
    em: bool  # greedy exact match of the answer (False when scored with exact_match=False)
    nll: float  # -log p(answer | prompt), nats, summed over answer tokens
    answer_logprob: float  # summed over the answer's tokens
    best: str  # the highest-scoring candidate (per-token mean)
    margin: float = 0.0  # answer's mean log-likelihood per token minus the best other candidate's (> 0 iff correct)
    n_answer_tokens: int = 0
    correct_sum: bool = False  # candidate ranking by summed log-likelihood (length-biased; reported as acc_sum)
    margin_sum: float = 0.0  # the same margin on summed log-likelihoods (> 0 iff correct_sum)


def _byte_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2 style): one printable character per byte value."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class HFTokenizer:
    """Adapter: a Hugging Face tokenizer with our interface (encode without specials, bos_id, token_bytes).

    bos_id is the tokenizer's BOS token, else its EOS token (GPT-2 style models start documents with it),
    else None (sequences then start with the prompt's first token)."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.bos_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_bytes(self) -> Tensor:
        """LongTensor [vocab]: bytes each token stands for (0 for special tokens). Byte-level vocabularies
        count one byte per character of the byte alphabet; others (SentencePiece) count the UTF-8 bytes of
        the piece with '▁' as a space, and a byte-fallback piece <0xNN> as one byte."""
        alphabet = _byte_alphabet()
        vocab = self.tok.get_vocab()
        special = set(self.tok.all_special_ids)
        byte_level = all(c in alphabet for t, i in vocab.items() if i not in special for c in t)
        out = torch.zeros(max(self.vocab_size, max(vocab.values()) + 1), dtype=torch.long)
        for t, i in vocab.items():
            if i in special:
                continue
            if byte_level:
                out[i] = len(t)
            elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                out[i] = 1
            else:
                out[i] = len(t.replace("▁", " ").encode("utf-8"))
        return out


def as_tokenizer(tok):
    """Our Tokenizer (has bos_id) as is; a Hugging Face tokenizer wrapped in HFTokenizer."""
    return tok if hasattr(tok, "bos_id") else HFTokenizer(tok)


def _encode_probes(tok, probes: list[Probe], max_len: int) -> tuple[list[list[int]], list[tuple]]:
    """Sequences to run, and per (probe, candidate) in order: (probe index, sequence index, position whose logits
    predict the candidate's first token, candidate tokens). A probe's one-token candidates share one sequence,
    its prompt (the model is causal: the logits after the prompt do not depend on what follows it); a longer
    candidate gets the sequence prompt + candidate (its end kept if longer than the context)."""
    prefix = [tok.bos_id] if tok.bos_id is not None else []
    seqs: list[list[int]] = []
    cands: list[tuple] = []
    for i, p in enumerate(probes):
        head = prefix + tok.encode(p.prompt)
        shared = -1
        for c in p.candidates:
            joint = tok.encode(p.prompt + c)
            n = len(head) - len(prefix)
            cand = joint[n:] if joint[:n] == head[len(prefix):] else tok.encode(c)
            if not cand or len(cand) >= max_len:
                raise ValueError(f"probe {p.id or p.prompt!r}: candidate {c!r} encodes to {len(cand)} tokens "
                                 f"(need 1 .. {max_len - 1}, the model's context minus one)")
            if len(cand) == 1 and 1 <= len(head) < max_len:
                if shared < 0:
                    shared = len(seqs)
                    seqs.append(head)
                cands.append((i, shared, len(head) - 1, cand))
            else:
                ids = (head + cand)[-max_len:]
                seqs.append(ids)
                cands.append((i, len(seqs) - 1, len(ids) - len(cand) - 1, cand))
    return seqs, cands


SHARED_PREFIX_MIN = 64  # tokens: below this a chunk's common prefix is not worth a cached forward


def _cached_prefix(model: nn.Module, seqs: list[list[int]], first_site: int) -> int:
    """Tokens of the chunk's common prefix to run once through a Hugging Face model's KV cache (0 = run the
    chunk whole): the longest common prefix of its sequences, cut so every candidate site (the first at
    `first_site`) lies after it; 0 for a single sequence, a short prefix, or a model without a KV cache
    (TopoCL's own GPT)."""
    if len(seqs) < 2 or not callable(getattr(model, "prepare_inputs_for_generation", None)):
        return 0
    n = min(min(len(q) for q in seqs), first_site)
    for i in range(n):
        t = seqs[0][i]
        if any(q[i] != t for q in seqs[1:]):
            n = i
            break
    return n if n >= SHARED_PREFIX_MIN else 0


@torch.no_grad()
def score_probes(model: nn.Module, tokenizer, probes: list[Probe], *, batch_size: int = 64,
                 device: torch.device | str | None = None, exact_match: bool = True,
                 share_prefix: bool = True) -> list[ProbeScore]:
    """Score every probe: the sequences of many probes go through one padded forward per chunk of
    `batch_size` sequences (sorted by length, so chunks carry little padding); log-probabilities are taken
    only at the candidate-token sites (S of them in a chunk). On a Hugging Face model a chunk whose sequences
    share a long prefix (the arena's probes all follow the story so far) runs that prefix once and the
    suffixes on copies of its KV cache (`share_prefix`; the same numbers as the whole forward up to float
    rounding, tests/test_evaluate.py)."""
    tok = as_tokenizer(tokenizer)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    max_len = getattr(cfg, "max_seq_len", None) or getattr(cfg, "max_position_embeddings", None) or 10**9
    seqs, cands = _encode_probes(tok, probes, max_len)
    by_seq: list[list[int]] = [[] for _ in seqs]
    for k, (_, q, _, _) in enumerate(cands):
        by_seq[q].append(k)
    was_training = model.training
    model.eval()
    order = sorted(range(len(seqs)), key=lambda q: len(seqs[q]))  # similar lengths together: less padding
    logp = torch.zeros(len(cands), dtype=torch.float64)
    greedy = torch.ones(len(cands), dtype=torch.bool)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(seqs[q]) for q in chunk)
        idx = torch.zeros(len(chunk), width, dtype=torch.long)  # [B, W] right-padded with token 0
        sites: list[tuple[int, int, int, int]] = []  # (row, position, target token, candidate)
        for r, q in enumerate(chunk):
            idx[r, :len(seqs[q])] = torch.tensor(seqs[q])
            for k in by_seq[q]:
                t0, toks = cands[k][2], cands[k][3]
                sites += [(r, t0 + j, t, k) for j, t in enumerate(toks)]
        row, pos, tgt, cand = torch.tensor(sites).T  # [S] each
        lead = _cached_prefix(model, [seqs[q] for q in chunk], int(pos.min())) if share_prefix else 0
        if lead:  # the chunk's common prefix once, its suffixes on a copy of its KV cache per row
            cache = model(idx[:1, :lead].to(device), use_cache=True).past_key_values
            cache.batch_repeat_interleave(len(chunk))
            logits = model(idx[:, lead:].to(device), past_key_values=cache, use_cache=True).logits  # [B, W-lead, V]
            pos = pos - lead
        else:
            logits = model(idx.to(device)).logits  # [B, W, V]: position t predicts idx[:, t+1]
        at = logits[row.to(device), pos.to(device)].float()  # [S, V]
        tgt = tgt.to(device)
        site_lp = at.gather(-1, tgt[:, None]).squeeze(-1) - torch.logsumexp(at, dim=-1)  # [S]
        logp.index_add_(0, cand, site_lp.double().cpu())
        if exact_match:
            greedy[cand[(at.argmax(-1) != tgt).cpu()]] = False
    if was_training:
        model.train()
    per_probe: list[list[int]] = [[] for _ in probes]
    for k, (i, _, _, _) in enumerate(cands):
        per_probe[i].append(k)
    scores = []
    for i, p in enumerate(probes):
        ks = per_probe[i]
        total = [float(logp[k]) for k in ks]
        mean = [v / len(cands[k][3]) for v, k in zip(total, ks)]  # per candidate token
        a = p.candidates.index(p.answer)
        margin, margin_sum = _margin(mean, a), _margin(total, a)
        best = max(range(len(mean)), key=lambda j: mean[j])
        scores.append(ProbeScore(id=p.id, kind=p.kind, correct=margin > 0, em=exact_match and bool(greedy[ks[a]]),
                                 nll=-total[a], answer_logprob=total[a], best=p.candidates[best], margin=margin,
                                 n_answer_tokens=len(cands[ks[a]][3]), correct_sum=margin_sum > 0,
                                 margin_sum=margin_sum))
    return scores


def _margin(vals: list[float], a: int) -> float:
    """vals[a] minus the best other value (inf when there is no other candidate)."""
    others = [v for j, v in enumerate(vals) if j != a]
    return vals[a] - max(others) if others else math.inf


def probe_accuracy(scores: list[ProbeScore], key: Callable[[ProbeScore], str] = lambda s: s.kind
                   ) -> dict[str, dict[str, float]]:
    """Group -> {acc, acc_sum, em, nll, n}; groups by probe kind unless `key` says otherwise."""
    groups: dict[str, list[ProbeScore]] = {}
    for s in scores:
        groups.setdefault(key(s), []).append(s)
    return {g: {"acc": sum(s.correct for s in ss) / len(ss), "acc_sum": sum(s.correct_sum for s in ss) / len(ss),
                "em": sum(s.em for s in ss) / len(ss),
                "nll": sum(s.nll for s in ss) / len(ss), "n": len(ss)} for g, ss in sorted(groups.items())}


def perplexity(model: nn.Module, rows: Tensor, token_bytes: Tensor | None = None, *, batch_size: int = 32,
               device: torch.device | str | None = None, dtype: str = "auto") -> dict[str, float]:
    """Held-out next-token loss over packed rows [N, T+1] (every token after a row's first is a target), by
    the training loop's `evaluate_loss`: nll (nats/token), ppl = exp(nll), tokens, and with token_bytes
    (bytes per token id) bits per byte = total NLL / ln 2 / total target bytes. Any model with `.logits`."""
    from topocl.train import evaluate_loss

    if rows.ndim != 2 or rows.shape[1] < 2 or len(rows) == 0:
        raise ValueError(f"perplexity needs rows [N >= 1, T+1 >= 2], got shape {tuple(rows.shape)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    ev = evaluate_loss(model, rows, token_bytes, batch_size=batch_size, max_batches=0, device=device, dtype=dtype)
    out = {"nll": ev["val_loss"], "ppl": math.exp(ev["val_loss"]), "tokens": float(rows[:, 1:].numel())}
    if "val_bpb" in ev:
        out["bpb"] = ev["val_bpb"]
    return out
