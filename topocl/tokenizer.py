"""Byte-level BPE trained with Hugging Face `tokenizers`, saved as tokenizer.json in the run directory.

Conventions: `encode` adds no special tokens and no prefix space, so a probe is scored as
encode(prompt) + encode(" answer"): the answer's leading space belongs to the answer. Documents are
separated by the BOS token <|bos|> (id 0) when packed.
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


class Tokenizer:
    BOS = BOS

    def __init__(self, tk: HFTokenizer) -> None:
        self.tk = tk
        bos = tk.token_to_id(BOS)
        if bos is None:
            raise ValueError(f"tokenizer has no {BOS} token")
        self.bos_id: int = bos
        self.vocab_size: int = tk.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Deterministic byte-level BPE on `texts` (all 256 bytes are in the initial alphabet)."""
        tk = HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, PAD], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tk.train_from_iterator(texts, trainer=trainer)
        return cls(tk)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        self.tk.save(str(tmp))
        os.replace(tmp, path)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=True)

    def token_bytes(self) -> torch.Tensor:
        """LongTensor [vocab]: UTF-8 bytes of each token (0 for specials). Byte-level tokens map one
        character of the ByteLevel alphabet to one byte, so the byte count is the string length."""
        out = torch.zeros(self.vocab_size, dtype=torch.long)
        specials = {BOS, PAD}
        for tok, i in self.tk.get_vocab().items():
            out[i] = 0 if tok in specials else len(tok)
        return out
