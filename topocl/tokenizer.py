"""Byte-level BPE trained with Hugging Face `tokenizers`, saved as tokenizer.json in the run directory.

    tok = Tokenizer.train(train_docs, vocab_size=2048)   # deterministic: same texts -> same tokenizer.json
    tok.save(run_dir / "tokenizer.json"); tok = Tokenizer.load(run_dir / "tokenizer.json")
    ids = tok.encode("Fire feels hot.")                   # no special tokens added
    bpb = nll_sum / math.log(2) / tok.token_bytes()[targets].sum()   # exact bits per byte

Conventions:
- Special tokens `<|bos|>` (id 0, separates documents when packed) and `<|pad|>` (id 1). `encode` never adds
  them, and never produces them either: the literal text "<|bos|>" in a document is encoded as ordinary
  bytes, so no text can forge a document break. `decode` skips them.
- No normalizer and no prefix space (`add_prefix_space=False`): a leading space belongs to the token that
  follows it, as in GPT-2. So encode("Fire feels") + encode(" hot") == encode("Fire feels hot"), and a probe
  is scored as encode(prompt) + encode(" answer"): the answer carries its own leading space.
- Byte level: all 256 bytes are in the initial alphabet, so any Unicode string round-trips exactly
  (decode(encode(s)) == s) and every token stands for a whole number of bytes, which `token_bytes` counts.
- `vocab_size` is an upper bound: a small corpus may run out of merges before reaching it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS = "<|bos|>"
PAD = "<|pad|>"
SPECIALS = (BOS, PAD)  # ids 0 and 1 in a trained tokenizer
_BYTE_ALPHABET = frozenset(pre_tokenizers.ByteLevel.alphabet())  # the 256 printable stand-ins for bytes


class Tokenizer:
    BOS = BOS
    PAD = PAD

    def __init__(self, tk: HFTokenizer, source: str = "<memory>") -> None:
        """Wrap a byte-level BPE `tokenizers.Tokenizer`; anything else is rejected (`source` names it)."""
        bos = tk.token_to_id(BOS)
        if bos is None:
            raise ValueError(f"{source}: tokenizer has no {BOS} token (train one with Tokenizer.train)")
        if tk.normalizer is not None:
            raise ValueError(f"{source}: tokenizer has a normalizer; round trips would not be exact")
        pre = tk.pre_tokenizer
        if not isinstance(pre, pre_tokenizers.ByteLevel) or pre.add_prefix_space:
            raise ValueError(f"{source}: expected a ByteLevel pre-tokenizer without prefix space, got {pre!r}")
        vocab = tk.get_vocab()
        bad = [t for t in vocab if t not in SPECIALS and not set(t) <= _BYTE_ALPHABET]
        if bad:
            raise ValueError(f"{source}: {len(bad)} tokens are not byte-level (e.g. {bad[0]!r}); "
                             "token byte counts would be wrong")
        tk.encode_special_tokens = True  # "<|bos|>" inside a text is plain text, never a document break
        self.tk = tk
        self.bos_id: int = bos
        self.pad_id: int | None = tk.token_to_id(PAD)
        self.vocab_size: int = tk.get_vocab_size()
        self._token_bytes: torch.Tensor | None = None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Deterministic byte-level BPE on `texts` (same texts in the same order -> same tokenizer.json,
        in any process; checked by tests/test_tokenizer.py)."""
        floor = len(SPECIALS) + len(_BYTE_ALPHABET)
        if vocab_size < floor:
            raise ValueError(f"vocab_size={vocab_size} is below {floor} (256 bytes + {len(SPECIALS)} specials)")
        tk = HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tk.train_from_iterator(texts, trainer=trainer)
        return cls(tk)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tk = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None
        return cls(tk, source=str(path))

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json atomically (temp file in the same directory, then os.replace)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.tk.save(str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def to_str(self) -> str:
        """The tokenizer.json text (two tokenizers are the same iff these are equal)."""
        return self.tk.to_str()

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Same ids as [encode(t) for t in texts], computed in parallel in Rust (no offsets)."""
        return [e.ids for e in self.tk.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=True)

    def token_bytes(self) -> torch.Tensor:
        """LongTensor [vocab_size]: UTF-8 bytes each token decodes to (0 for specials), so
        sum(token_bytes()[encode(s)]) == len(s.encode()). Each character of a byte-level token stands for
        exactly one byte (checked in __init__), so the count is the token string's length."""
        if self._token_bytes is None:
            out = torch.zeros(self.vocab_size, dtype=torch.long)
            for tok, i in self.tk.get_vocab().items():
                out[i] = 0 if tok in SPECIALS else len(tok)
            self._token_bytes = out
        return self._token_bytes.clone()
