"""Byte-level BPE: exact round trips, exact byte counts, save/load, determinism, probe convention."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from topocl.tokenizer import Tokenizer

TEXTS = ["Fire feels hot. Ice feels cold.", "A dog barks at the cat!", "Lily saw the sea, and it was blue.",
         "Numbers 12345 and spaces   here.\nNew line.", "The cat sat. The cat ran. The dog sat."] * 5
STRINGS = [
    "Fire feels hot.", " leading space", "trailing space ", "", " ", "\n", "\n\n\n", "   runs   of    spaces",
    "tabs\tand\n\nlines  ", "windows\r\nline\rends", "emoji 🙂 and 中文 and ñ", "家族 👩‍👩‍👧 flags 🇫🇷🇯🇵",
    "combining e\u0301 vs é", "العربية עברית", "zero\u200bwidth and nbsp\u00a0here", "nul \x00 bell \x07 del \x7f",
    "astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀", "the literal <|bos|> and <|pad|> are text", "ＦＵＬＬＷＩＤＴＨ", "a" * 500,
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, 300)


@pytest.mark.parametrize("s", STRINGS)
def test_round_trip_and_exact_byte_counts(tok, s):
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert int(tok.token_bytes()[ids].sum()) == len(s.encode())
    assert tok.bos_id not in ids and tok.pad_id not in ids  # text never yields a special token


def test_token_bytes_per_token(tok):
    tb = tok.token_bytes()
    assert tb.shape == (tok.vocab_size,) and tb.dtype.is_floating_point is False
    assert tb[tok.bos_id] == 0 and tb[tok.pad_id] == 0 and int((tb == 0).sum()) == 2
    assert int((tb == 1).sum()) == 256  # the byte alphabet
    checked = 0
    for i in range(tok.vocab_size):
        text = tok.decode([i])
        if i not in (tok.bos_id, tok.pad_id) and "\ufffd" not in text:  # tokens that are whole characters
            assert len(text.encode()) == tb[i], (i, text)
            checked += 1
    assert checked > 100
    assert tb.max() > 3  # merges were learned, e.g. " feels"


def test_specials_ids_and_vocab_bound(tok):
    assert (tok.bos_id, tok.pad_id) == (0, 1) and tok.BOS == "<|bos|>"
    assert 258 < tok.vocab_size <= 300
    assert Tokenizer.train(["ab"], 1000).vocab_size < 1000  # an upper bound: a tiny corpus runs out of merges
    with pytest.raises(ValueError, match="258"):
        Tokenizer.train(TEXTS, 100)


def test_decode_skips_specials(tok):
    ids = tok.encode("one") + [tok.bos_id] + tok.encode(" two") + [tok.pad_id]
    assert tok.decode(ids) == "one two"


def test_probe_convention_leading_space_belongs_to_the_answer(tok):
    assert tok.encode("Fire feels") + tok.encode(" hot") == tok.encode("Fire feels hot")
    assert tok.encode("hot") != tok.encode(" hot")  # no prefix space is added
    assert tok.decode(tok.encode(" hot")[:1]).startswith(" ")


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(STRINGS) == [tok.encode(s) for s in STRINGS]
    assert tok.encode_batch([]) == []


def test_save_load_equal(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("old contents")  # save overwrites atomically
    tok.save(path)
    again = Tokenizer.load(path)
    assert again.to_str() == tok.to_str()
    assert [again.encode(s) for s in STRINGS] == [tok.encode(s) for s in STRINGS]
    assert again.decode(again.encode(STRINGS[10])) == STRINGS[10]
    assert again.token_bytes().tolist() == tok.token_bytes().tolist()
    assert (again.bos_id, again.pad_id, again.vocab_size) == (tok.bos_id, tok.pad_id, tok.vocab_size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]  # no temp file left behind


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.load(tmp_path / "bad.json")
    word = HFTokenizer(models.WordLevel({"<|bos|>": 0, "☃": 1}, unk_token="<|bos|>"))
    word.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    word.save(str(tmp_path / "word.json"))
    with pytest.raises(ValueError, match="not byte-level"):
        Tokenizer.load(tmp_path / "word.json")
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="ByteLevel"):
        Tokenizer(word)
    with pytest.raises(ValueError, match="no <\\|bos\\|>"):
        Tokenizer(HFTokenizer(models.BPE()))


def test_training_is_deterministic_across_processes(tok):
    """Every DDP rank trains its own tokenizer, so training must not depend on the process (hash seeds,
    thread scheduling). The corpus is full of count ties, where an unstable merge order would show."""
    code = ("import hashlib, json, sys; from topocl.tokenizer import Tokenizer; "
            "tok = Tokenizer.train(json.load(sys.stdin), 300); "
            "sys.stdout.write(hashlib.sha256(tok.to_str().encode()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "123", "RAYON_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(TEXTS), capture_output=True, text=True,
                         check=True, env=env).stdout
    assert out == hashlib.sha256(tok.to_str().encode()).hexdigest()
    assert Tokenizer.train(TEXTS, 300).to_str() == tok.to_str()
