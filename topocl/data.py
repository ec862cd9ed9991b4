"""Corpora -> documents -> tokens -> packed rows -> deterministic batches.

    docs = load_corpus("stories.jsonl")                      # or topocl.world.synthetic_corpus(n, seed)
    train_docs, val_docs = split_documents(docs, 0.05, seed)  # by document: none straddles the split
    rows = pack_documents(tok.encode_batch(train_docs), seq_len=128, bos_id=tok.bos_id)  # [N, 129]
    batch = rows[BatchSampler(len(rows), 32, seed).indices(step)]                        # [32, 129]

Local corpora: plain text (documents separated by blank lines; for the TinyStories train sample, where a
blank line can also separate paragraphs of one story, each paragraph becomes a document), JSONL with a
text field, parquet with a text column, or a directory of such files (sorted). Malformed input raises
CorpusError naming the file and line.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from topocl.config import DataConfig
from topocl.tokenizer import Tokenizer

SUFFIXES = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl",
            ".parquet": "parquet"}


class CorpusError(ValueError):
    """Malformed or empty corpus input; the message names the file (and line)."""


def _read_text(path: Path) -> list[str]:
    docs, cur = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            cur.append(line.rstrip())
        elif cur:
            docs.append("\n".join(cur))
            cur = []
    if cur:
        docs.append("\n".join(cur))
    return docs


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise CorpusError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            if text_field not in obj:
                raise CorpusError(f"{path}:{n}: missing field '{text_field}' (fields: {', '.join(obj)})")
            if not isinstance(obj[text_field], str):
                raise CorpusError(f"{path}:{n}: field '{text_field}' must be a string, "
                                  f"got {type(obj[text_field]).__name__}")
            docs.append(obj[text_field])
    return docs


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise CorpusError(f"{path}: not a readable parquet file ({e})") from None
    if text_field not in table.column_names:
        raise CorpusError(f"{path}: no column '{text_field}' (columns: {', '.join(table.column_names)})")
    values = table.column(text_field).to_pylist()
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise CorpusError(f"{path}: row {i}: column '{text_field}' must be a string, got {type(v).__name__}")
    return values


def load_corpus(path: str | Path, fmt: str = "auto", text_field: str = "text", max_docs: int = 0) -> list[str]:
    """Documents of a corpus file or directory; empty documents are dropped."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"corpus not found: {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise CorpusError(f"{path}: no corpus files ({', '.join(sorted(SUFFIXES))})")
    docs: list[str] = []
    for f in files:
        kind = fmt if fmt != "auto" else SUFFIXES.get(f.suffix)
        if kind == "text":
            docs += _read_text(f)
        elif kind == "jsonl":
            docs += _read_jsonl(f, text_field)
        elif kind == "parquet":
            docs += _read_parquet(f, text_field)
        else:
            raise CorpusError(f"{f}: unknown format (suffix '{f.suffix}'); set data.format to text, jsonl or parquet")
        if max_docs and len(docs) >= max_docs:
            break
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CorpusError(f"{path}: the corpus holds no documents")
    return docs[:max_docs] if max_docs else docs


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic split by document; at least one validation document when val_fraction > 0."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(docs))) if val_fraction > 0 else 0
    if n_val >= len(docs):
        raise CorpusError(f"val_fraction={val_fraction} leaves no training documents ({len(docs)} documents)")
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [docs[i] for i in train], [docs[i] for i in val]


def pack_documents(token_lists: list[list[int]], seq_len: int, bos_id: int) -> torch.Tensor:
    """Each document becomes [bos] + tokens; documents are concatenated in order and cut into rows of
    seq_len + 1 tokens with stride seq_len (row i = stream[i*T : i*T + T + 1]), so every token after the
    first is a target exactly once. The tail that does not fill a row is dropped. -> LongTensor [N, T+1]."""
    stream = torch.tensor([t for toks in token_lists for t in (bos_id, *toks)], dtype=torch.long)
    n = (len(stream) - 1) // seq_len
    if n <= 0:
        raise CorpusError(f"{len(stream)} tokens cannot fill one row of {seq_len + 1} tokens; "
                          "use more text or a shorter data.seq_len")
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None]  # [N, T+1]
    return stream[idx]


class BatchSampler:
    """Rows of a batch as a pure function of (seed, step): global sample i = step * B + j lives in epoch
    i // N at position i % N of that epoch's permutation. Rank r of W takes j in [r*B/W, (r+1)*B/W), so
    W ranks together see exactly the single-process batch, and resuming needs only the step."""

    def __init__(self, n_rows: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if n_rows <= 0:
            raise ValueError("BatchSampler needs at least one row")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} is not divisible by world_size={world_size}")
        self.n, self.batch, self.seed, self.rank, self.world = n_rows, batch_size, seed, rank, world_size
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        b = self.batch // self.world
        i = step * self.batch + self.rank * b + torch.arange(b)  # global sample numbers
        epochs = i // self.n
        return torch.stack([self._perm(int(e))[int(p)] for e, p in zip(epochs, i % self.n)])


@dataclass
class PreparedData:
    train: torch.Tensor  # [N_train, T+1]
    val: torch.Tensor  # [N_val, T+1]
    tokenizer: Tokenizer
    stats: dict = field(default_factory=dict)


def prepare_data(cfg: DataConfig, seed: int, tokenizer: Tokenizer | None = None) -> PreparedData:
    """Load (or generate) documents, split by document, train or reuse the tokenizer, encode and pack."""
    if cfg.corpus == "synthetic":
        from topocl.world import synthetic_corpus

        docs = synthetic_corpus(cfg.synthetic_docs, seed)
    else:
        docs = load_corpus(cfg.corpus, cfg.format, cfg.text_field, cfg.max_docs)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, seed)
    tok = tokenizer or (Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else Tokenizer.train(train_docs, cfg.vocab_size))
    stats: dict = {"corpus": cfg.corpus, "docs": len(docs), "vocab_size": tok.vocab_size}
    out = {}
    for name, part in (("train", train_docs), ("val", val_docs)):
        toks = tok.encode_batch(part)
        out[name] = pack_documents(toks, cfg.seq_len, tok.bos_id)
        n_tok = sum(len(t) + 1 for t in toks)
        n_bytes = sum(len(d.encode()) for d in part)
        stats[name] = {"docs": len(part), "tokens": n_tok, "bytes": n_bytes, "rows": len(out[name]),
                       "dropped_tokens": n_tok - 1 - len(out[name]) * cfg.seq_len,
                       "bytes_per_token": n_bytes / max(n_tok, 1)}
    return PreparedData(out["train"], out["val"], tok, stats)
