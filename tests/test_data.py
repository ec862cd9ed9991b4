"""Tokenizer, corpus loaders, packing, splitting and the deterministic batch sampler."""

import json
from pathlib import Path

import pytest
import torch

from topocl.config import DataConfig
from topocl.data import BatchSampler, CorpusError, load_corpus, pack_documents, prepare_data, split_documents
from topocl.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TEXTS = ["Fire feels hot. Ice feels cold.", "A dog barks at the cat!", "Lily saw the sea, and it was blue.",
         "Numbers 12345 and spaces   here.\nNew line."] * 5


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, 300)


@pytest.mark.parametrize("s", ["Fire feels hot.", " leading space", "emoji 🙂 and 中文 and ñ", "tabs\tand\n\nlines  ",
                               ""])
def test_tokenizer_round_trip_and_exact_byte_counts(tok, s):
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert int(tok.token_bytes()[ids].sum()) == len(s.encode())


def test_tokenizer_save_load_equal_and_deterministic(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.encode(TEXTS[2]) == tok.encode(TEXTS[2]) and again.bos_id == tok.bos_id == 0
    assert Tokenizer.train(TEXTS, 300).encode(TEXTS[3]) == tok.encode(TEXTS[3])
    assert tok.encode("Fire feels") + tok.encode(" hot") == tok.encode("Fire feels hot")  # probe convention
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing.json")


def test_packing_boundaries():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    rows = pack_documents(docs, seq_len=4, bos_id=0)
    stream = [0, 5, 6, 7, 0, 8, 9, 0, 10, 11, 12, 13, 0, 14]  # 14 tokens -> (14 - 1) // 4 = 3 rows
    assert rows.tolist() == [stream[0:5], stream[4:9], stream[8:13]]
    assert all(rows[i, -1] == rows[i + 1, 0] for i in range(len(rows) - 1))  # overlap of exactly one token
    targets = torch.cat([r[1:] for r in rows]).tolist()
    assert targets == stream[1:13]  # every token a target once; only the tail is dropped
    with pytest.raises(CorpusError, match="seq_len"):
        pack_documents([[1]], seq_len=8, bos_id=0)


def test_split_by_document_is_disjoint_and_deterministic():
    docs = [f"doc {i}" for i in range(100)]
    tr, va = split_documents(docs, 0.1, seed=3)
    assert len(va) == 10 and set(tr).isdisjoint(va) and sorted(tr + va) == sorted(docs)
    assert split_documents(docs, 0.1, seed=3) == (tr, va) and split_documents(docs, 0.1, seed=4) != (tr, va)
    assert len(split_documents(docs[:3], 0.01, seed=0)[1]) == 1


def test_sampler_is_a_function_of_step_covers_each_epoch_and_splits_across_ranks():
    s = BatchSampler(10, 4, seed=1)
    first = torch.cat([s.indices(k) for k in range(5)])  # 20 samples = 2 epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    assert torch.equal(BatchSampler(10, 4, seed=1).indices(3), s.indices(3))
    r0, r1 = BatchSampler(10, 4, 1, rank=0, world_size=2), BatchSampler(10, 4, 1, rank=1, world_size=2)
    assert torch.cat([r0.indices(7), r1.indices(7)]).tolist() == s.indices(7).tolist()
    with pytest.raises(ValueError, match="divisible"):
        BatchSampler(10, 5, 1, rank=0, world_size=2)


def test_corpus_loaders(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "fourth"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["fifth", "sixth"]}), tmp_path / "c.parquet")
    assert load_corpus(tmp_path / "a.txt") == ["first doc\nstill first", "second doc"]
    assert load_corpus(tmp_path) == ["first doc\nstill first", "second doc", "third", "fourth", "fifth", "sixth"]
    assert load_corpus(tmp_path, max_docs=3) == ["first doc\nstill first", "second doc", "third"]


@pytest.mark.parametrize("line,msg", [("{not json", "invalid JSON"), ("[1, 2]", "expected a JSON object"),
                                      ('{"txt": "x"}', "missing field 'text'"), ('{"text": 3}', "must be a string")])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n" + line + "\n")
    with pytest.raises(CorpusError) as e:
        load_corpus(p)
    assert f"{p}:2" in str(e.value) and msg in str(e.value)


def test_other_bad_corpora(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(tmp_path / "nope.txt")
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(CorpusError, match="no documents"):
        load_corpus(tmp_path / "e.txt")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(CorpusError, match="columns: body"):
        load_corpus(tmp_path / "p.parquet")


def test_prepare_synthetic_and_bits_per_byte_accounting():
    data = prepare_data(DataConfig(synthetic_docs=300, vocab_size=512, seq_len=32), seed=0)
    assert data.train.shape[1] == 33 and len(data.val) > 0
    st = data.stats["train"]
    assert st["tokens"] - 1 - st["dropped_tokens"] == st["rows"] * 32
    assert 2.0 < st["bytes_per_token"] < 8.0


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared TinyStories samples not present")
def test_tinystories_sample_loads_and_packs():
    docs = load_corpus(SHARED / "tinystories_valid_sample.txt", max_docs=200)
    assert len(docs) == 200 and all(d.strip() for d in docs)
    tok = Tokenizer.train(docs, 1000)
    rows = pack_documents(tok.encode_batch(docs), 128, tok.bos_id)
    assert rows.shape[1] == 129 and int((rows == tok.bos_id).sum()) >= 150
