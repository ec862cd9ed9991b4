"""Corpora -> documents -> tokens -> packed rows -> deterministic batches.

    docs = load_corpus("stories.jsonl")                      # or topocl.world.synthetic_corpus(n, seed)
    train_docs, val_docs = split_documents(docs, 0.05, seed)  # by document: none straddles the split
    rows = pack_documents(tok.encode_batch(train_docs), seq_len=128, bos_id=tok.bos_id)  # [N, 129]
    batch = rows[BatchSampler(len(rows), 32, seed).indices(step)]                        # [32, 129]
    # x, y = batch[:, :-1], batch[:, 1:]

Local corpora (`load_corpus`), one file or a directory of them (recursive, sorted by path, hidden files and
folders skipped; with format=auto only .txt/.text/.jsonl/.parquet files are read, others are ignored):
- plain text (.txt, .text): documents are separated by blank (whitespace-only) lines; trailing whitespace
  of each line is dropped, line breaks inside a document are kept as "\\n". A blank line is always a
  document boundary, so where a corpus also uses blank lines between paragraphs of one story (the
  TinyStories train sample does), each paragraph becomes its own document.
- JSONL (.jsonl): one JSON object per line with a string field `text_field`; blank lines are skipped.
- parquet (.parquet): a string column `text_field`.
Documents that are empty or whitespace-only are dropped. Malformed input raises CorpusError naming the
file and the line (JSONL, text encoding) or row (parquet).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from topocl.config import DataConfig
from topocl.jsonl import iter_jsonl
from topocl.tokenizer import Tokenizer

SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".parquet": "parquet"}
FORMATS = ("auto", "text", "jsonl", "parquet")


class CorpusError(ValueError):
    """Malformed or empty corpus input; the message names the file (and line)."""


def _decode(path: Path, data: bytes, line_offset: int = 0) -> str:
    """UTF-8 (a leading byte-order mark is dropped); a bad byte is reported with its line."""
    try:
        return data.decode("utf-8-sig" if line_offset == 0 else "utf-8")
    except UnicodeDecodeError as e:
        line = line_offset + data[:e.start].count(b"\n") + 1
        raise CorpusError(f"{path}:{line}: not valid UTF-8 (byte {data[e.start]:#04x})") from None


def _read_text(path: Path) -> list[str]:
    text = _decode(path, path.read_bytes()).replace("\r\n", "\n").replace("\r", "\n")
    docs, cur = [], []
    for line in text.split("\n"):
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
    for n, obj in iter_jsonl(path, torn=False, error=CorpusError):
        if text_field not in obj:
            raise CorpusError(f"{path}:{n}: missing field '{text_field}' (fields: {', '.join(obj) or 'none'})")
        if not isinstance(obj[text_field], str):
            raise CorpusError(f"{path}:{n}: field '{text_field}' must be a string, "
                              f"got {type(obj[text_field]).__name__}")
        docs.append(obj[text_field])
    return docs


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        columns = pq.read_schema(path).names
        if text_field not in columns:
            raise CorpusError(f"{path}: no column '{text_field}' (columns: {', '.join(columns)})")
        values = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    except CorpusError:
        raise
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise CorpusError(f"{path}: not a readable parquet file ({e})") from None
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise CorpusError(f"{path}: row {i} (0-based): column '{text_field}' must be a string, "
                              f"got {type(v).__name__}")
    return values


def _corpus_files(path: Path, fmt: str) -> list[Path]:
    if not path.is_dir():
        return [path]
    files = [p for p in path.rglob("*")
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    if fmt == "auto":
        files = [p for p in files if p.suffix.lower() in SUFFIXES]
    if not files:
        raise CorpusError(f"{path}: no corpus files (looked for {', '.join(SUFFIXES)})")
    return sorted(files)


def load_corpus(path: str | Path, fmt: str = "auto", text_field: str = "text", max_docs: int = 0) -> list[str]:
    """Documents of a corpus file or directory, in file order (see the module docstring for formats).
    fmt: auto (by suffix) | text | jsonl | parquet; max_docs: keep the first max_docs documents (0 = all)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise CorpusError(f"unknown corpus format '{fmt}' (data.format must be one of {', '.join(FORMATS)})")
    if max_docs < 0:
        raise CorpusError(f"max_docs={max_docs} must be >= 0 (0 = all documents)")
    if not path.exists():
        raise CorpusError(f"corpus not found: {path}")
    docs: list[str] = []
    for f in _corpus_files(path, fmt):
        kind = fmt if fmt != "auto" else SUFFIXES.get(f.suffix.lower())
        if kind == "text":
            new = _read_text(f)
        elif kind == "jsonl":
            new = _read_jsonl(f, text_field)
        elif kind == "parquet":
            new = _read_parquet(f, text_field)
        else:
            raise CorpusError(f"{f}: unknown suffix '{f.suffix}' (known: {', '.join(SUFFIXES)}); "
                              "set data.format to text, jsonl or parquet")
        docs += [d for d in new if d.strip()]
        if max_docs and len(docs) >= max_docs:
            break
    if not docs:
        raise CorpusError(f"{path}: the corpus holds no documents")
    return docs[:max_docs] if max_docs else docs


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic split by document: round(val_fraction * n) random documents (at least one when
    val_fraction > 0) go to validation; both parts keep the corpus order."""
    if not 0 <= val_fraction < 1:
        raise CorpusError(f"val_fraction={val_fraction} must be in [0, 1)")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(docs))) if val_fraction > 0 else 0
    if n_val >= len(docs):
        raise CorpusError(f"val_fraction={val_fraction} leaves no training documents ({len(docs)} documents)")
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [docs[i] for i in train], [docs[i] for i in val]


def pack_documents(token_lists: list[list[int]], seq_len: int, bos_id: int) -> torch.Tensor:
    """Each document becomes [bos] + tokens; documents are concatenated in order into one stream and cut
    into rows of seq_len + 1 tokens with stride seq_len (row i = stream[i*T : i*T + T + 1]; consecutive
    rows share one token), so every token after the first is a target (row[1:]) exactly once. The tail
    that does not fill a row is dropped. A row may span several documents: attention is not reset at a
    BOS, the model learns to treat BOS as "a new document starts". -> LongTensor [N, T+1]."""
    if seq_len < 1:
        raise CorpusError(f"seq_len={seq_len} must be >= 1")
    n_tok = sum(len(t) for t in token_lists) + len(token_lists)
    stream = np.fromiter(itertools.chain.from_iterable(itertools.chain((bos_id,), t) for t in token_lists),
                         dtype=np.int64, count=n_tok)  # [n_tok]
    n = (n_tok - 1) // seq_len
    if n <= 0:
        raise CorpusError(f"{n_tok} tokens ({len(token_lists)} documents) cannot fill one row of {seq_len + 1} "
                          "tokens; use more text or a shorter data.seq_len")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None]  # [N, T+1]
    return torch.from_numpy(stream[idx])


class BatchSampler:
    """Rows of a batch as a pure function of (seed, step): global sample i = step * B + j lives in epoch
    e = i // N at position i % N of that epoch's permutation, randperm(N) seeded by (seed, e). Rank r of W
    takes j in [r*B/W, (r+1)*B/W), so W ranks together see exactly the single-process batch, every row is
    drawn exactly once per epoch, and resuming at step s needs only s."""

    def __init__(self, n_rows: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if n_rows <= 0:
            raise ValueError(f"BatchSampler needs at least one row (n_rows={n_rows})")
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
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
        """LongTensor [batch_size // world_size]: this rank's row indices for `step` (>= 0)."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        b = self.batch // self.world
        i = step * self.batch + self.rank * b + torch.arange(b)  # [b] global sample numbers
        epochs, pos = i // self.n, i % self.n
        out = torch.empty(b, dtype=torch.long)
        for e in epochs.unique().tolist():
            m = epochs == e
            out[m] = self._perm(e)[pos[m]]
        return out


@dataclass
class PreparedData:
    train: torch.Tensor  # [N_train, T+1]
    val: torch.Tensor  # [N_val, T+1]; [0, T+1] when val_fraction == 0
    tokenizer: Tokenizer
    stats: dict = field(default_factory=dict)


def _pack_split(tok: Tokenizer, docs: list[str], seq_len: int, name: str) -> tuple[torch.Tensor, dict]:
    toks = tok.encode_batch(docs)
    try:
        rows = pack_documents(toks, seq_len, tok.bos_id)
    except CorpusError as e:
        hint = " or a larger data.val_fraction" if name == "val" else ""
        raise CorpusError(f"{name} split: {e}{hint}") from None
    n_text = sum(len(t) for t in toks)
    n_bytes = sum(len(d.encode()) for d in docs)
    n_tok = n_text + len(docs)  # + one BOS per document
    return rows, {"docs": len(docs), "tokens": n_tok, "text_tokens": n_text, "bytes": n_bytes, "rows": len(rows),
                  "targets": rows.shape[0] * seq_len, "dropped_tokens": n_tok - 1 - rows.shape[0] * seq_len,
                  "bytes_per_token": n_bytes / max(n_text, 1)}


def prepare_data(cfg: DataConfig, seed: int, tokenizer: Tokenizer | None = None) -> PreparedData:
    """Load (or generate) documents, split by document, train the tokenizer on the training documents
    only (unless `tokenizer` or cfg.tokenizer gives one), encode and pack both splits.

    stats: corpus, docs, vocab_size, tokenizer (trained | given | path), seq_len, and per split
    {docs, tokens (incl. one BOS per doc), text_tokens, bytes (UTF-8), rows, targets, dropped_tokens (tail),
    bytes_per_token (bytes / text_tokens)}."""
    if cfg.corpus == "synthetic":
        from topocl.world import synthetic_corpus

        docs = synthetic_corpus(cfg.synthetic_docs, seed)
    else:
        docs = load_corpus(cfg.corpus, cfg.format, cfg.text_field, cfg.max_docs)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, seed)
    if tokenizer is not None:
        tok, source = tokenizer, "given"
    elif cfg.tokenizer:
        tok, source = Tokenizer.load(cfg.tokenizer), cfg.tokenizer
    else:
        tok, source = Tokenizer.train(train_docs, cfg.vocab_size), "trained"
    stats: dict = {"corpus": cfg.corpus, "docs": len(docs), "vocab_size": tok.vocab_size, "tokenizer": source,
                   "seq_len": cfg.seq_len}
    train, stats["train"] = _pack_split(tok, train_docs, cfg.seq_len, "train")
    if val_docs:
        val, stats["val"] = _pack_split(tok, val_docs, cfg.seq_len, "val")
    else:
        val = torch.empty(0, cfg.seq_len + 1, dtype=torch.long)
        stats["val"] = {"docs": 0, "tokens": 0, "text_tokens": 0, "bytes": 0, "rows": 0, "targets": 0,
                        "dropped_tokens": 0, "bytes_per_token": 0.0}
    return PreparedData(train, val, tok, stats)
