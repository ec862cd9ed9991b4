"""Corpus loaders, document split, packing, the deterministic batch sampler and prepare_data."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from topocl.config import DataConfig
from topocl.data import BatchSampler, CorpusError, load_corpus, pack_documents, prepare_data, split_documents
from topocl.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ----------------------------------------------------------------------------- packing


def _stream(docs: list[list[int]], bos: int) -> list[int]:
    return [t for d in docs for t in (bos, *d)]


def test_packing_golden():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    rows = pack_documents(docs, seq_len=4, bos_id=0)
    stream = [0, 5, 6, 7, 0, 8, 9, 0, 10, 11, 12, 13, 0, 14]  # 14 tokens -> (14 - 1) // 4 = 3 rows
    assert rows.dtype == torch.long and rows.tolist() == [stream[0:5], stream[4:9], stream[8:13]]
    with pytest.raises(CorpusError, match="seq_len"):
        pack_documents([[1]], seq_len=8, bos_id=0)
    with pytest.raises(CorpusError, match="seq_len"):
        pack_documents([], seq_len=1, bos_id=0)


@pytest.mark.parametrize("seq_len", [1, 3, 16])
def test_packing_invariants_on_random_documents(seq_len):
    g = torch.Generator().manual_seed(seq_len)
    bos = 0
    docs = [torch.randint(1, 50, (int(n),), generator=g).tolist() for n in torch.randint(0, 12, (40,), generator=g)]
    stream = _stream(docs, bos)
    rows = pack_documents(docs, seq_len, bos)
    n = (len(stream) - 1) // seq_len
    assert rows.shape == (n, seq_len + 1)
    assert torch.equal(rows[:-1, -1], rows[1:, 0])  # consecutive rows overlap by exactly one token
    rebuilt = torch.cat([rows[0], rows[1:, 1:].flatten()]).tolist()
    assert rebuilt == stream[: n * seq_len + 1]  # concatenating the rows reproduces the stream
    targets = rows[:, 1:].flatten().tolist()
    assert targets == stream[1: n * seq_len + 1]  # every token a target once; only the tail (< seq_len) is lost
    assert len(stream) - 1 - len(targets) < seq_len
    starts, pos = [], 0
    for d in docs:  # each document's first position holds BOS, and its tokens follow in order
        starts.append(pos)
        pos += len(d) + 1
    assert [i for i, t in enumerate(stream) if t == bos] == starts
    assert [i for i, t in enumerate(rebuilt) if t == bos] == [s for s in starts if s < len(rebuilt)]


# ----------------------------------------------------------------------------- split


def test_split_by_document_is_disjoint_and_deterministic():
    docs = [f"doc {i}" for i in range(100)]
    tr, va = split_documents(docs, 0.1, seed=3)
    assert len(va) == 10 and set(tr).isdisjoint(va) and sorted(tr + va) == sorted(docs)
    assert tr == [d for d in docs if d in set(tr)]  # corpus order is kept
    assert split_documents(docs, 0.1, seed=3) == (tr, va) and split_documents(docs, 0.1, seed=4) != (tr, va)
    assert len(split_documents(docs[:3], 0.01, seed=0)[1]) == 1  # at least one validation document
    assert split_documents(docs, 0.0, seed=0) == (docs, [])
    for bad in (-0.1, 1.0):
        with pytest.raises(CorpusError, match="val_fraction"):
            split_documents(docs, bad, seed=0)
    with pytest.raises(CorpusError, match="no training documents"):
        split_documents(docs[:1], 0.5, seed=0)


# ----------------------------------------------------------------------------- sampler


def test_sampler_covers_each_epoch_once_and_is_a_function_of_step():
    s = BatchSampler(10, 4, seed=1)
    first = torch.cat([s.indices(k) for k in range(5)])  # 20 samples = 2 epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    assert first[:10].tolist() != first[10:].tolist()  # a fresh permutation each epoch
    assert torch.equal(BatchSampler(10, 4, seed=1).indices(3), s.indices(3))  # resume needs only the step
    assert not torch.equal(torch.cat([BatchSampler(10, 4, seed=2).indices(k) for k in range(5)]), first)
    big = BatchSampler(3, 7, seed=0)  # a batch larger than the data spans several epochs
    flat = torch.cat([big.indices(k) for k in range(3)]).tolist()  # 21 samples = 7 epochs
    assert all(sorted(flat[e * 3:(e + 1) * 3]) == [0, 1, 2] for e in range(7))


def test_sampler_ranks_together_see_the_single_process_batch():
    one = BatchSampler(37, 8, seed=5)
    for w in (2, 4):
        ranks = [BatchSampler(37, 8, 5, rank=r, world_size=w) for r in range(w)]
        for step in (0, 4, 11):
            parts = [r.indices(step) for r in ranks]
            assert all(len(p) == 8 // w for p in parts)
            assert torch.cat(parts).tolist() == one.indices(step).tolist()


def test_sampler_errors():
    with pytest.raises(ValueError, match="divisible"):
        BatchSampler(10, 5, 1, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        BatchSampler(10, 4, 1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="at least one row"):
        BatchSampler(0, 4, 1)
    with pytest.raises(ValueError, match="step"):
        BatchSampler(10, 4, 1).indices(-1)


# ----------------------------------------------------------------------------- loaders


def _write_parquet(path: Path, **cols) -> None:
    pq.write_table(pa.table(cols), path)


def test_corpus_loaders(tmp_path):
    (tmp_path / "a.txt").write_text("first doc  \nstill first\n\n \n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third", "id": 1}) + "\n\n"
                                      + json.dumps({"text": "fourth 🙂"}) + "\n" + json.dumps({"text": "  "}) + "\n")
    _write_parquet(tmp_path / "c.parquet", text=["fifth", "sixth"], n=[1, 2])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.txt").write_text("seventh")
    (tmp_path / "README.md").write_text("not a document")  # unknown suffixes are ignored in a directory
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    assert load_corpus(tmp_path / "a.txt") == ["first doc\nstill first", "second doc"]
    assert load_corpus(tmp_path / "b.jsonl") == ["third", "fourth 🙂"]  # whitespace-only documents dropped
    assert load_corpus(tmp_path / "c.parquet") == ["fifth", "sixth"]
    everything = ["first doc\nstill first", "second doc", "third", "fourth 🙂", "fifth", "sixth", "seventh"]
    assert load_corpus(tmp_path) == everything
    assert load_corpus(tmp_path, max_docs=3) == everything[:3]
    assert load_corpus(tmp_path, max_docs=4) == everything[:4]


def test_text_encodings_and_explicit_format(tmp_path):
    (tmp_path / "crlf.txt").write_bytes("\ufeffone\r\ntwo\r\n\r\nthree\rfour\n".encode())
    assert load_corpus(tmp_path / "crlf.txt") == ["one\ntwo", "three\nfour"]  # BOM dropped, line ends unified
    (tmp_path / "bom.jsonl").write_bytes("\ufeff".encode() + b'{"text": "x"}\n')
    assert load_corpus(tmp_path / "bom.jsonl") == ["x"]
    (tmp_path / "stories.dat").write_text('{"body": "y"}\n')
    assert load_corpus(tmp_path / "stories.dat", fmt="jsonl", text_field="body") == ["y"]
    with pytest.raises(CorpusError, match="unknown suffix '.dat'"):
        load_corpus(tmp_path / "stories.dat")
    with pytest.raises(CorpusError, match="data.format"):
        load_corpus(tmp_path / "stories.dat", fmt="csv")
    (tmp_path / "latin1.txt").write_bytes(b"ok\nstill ok\ncaf\xe9\n")
    with pytest.raises(CorpusError, match=r"latin1.txt:3: not valid UTF-8"):
        load_corpus(tmp_path / "latin1.txt")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=r"latin1.jsonl:2: not valid UTF-8"):
        load_corpus(tmp_path / "latin1.jsonl")


@pytest.mark.parametrize("line,msg", [("{not json", "invalid JSON"), ("[1, 2]", "expected a JSON object, got list"),
                                      ('{"txt": "x"}', "missing field 'text' \\(fields: txt\\)"),
                                      ('{"text": 3}', "must be a string, got int"),
                                      ('{"text": null}', "must be a string, got NoneType")])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n\n" + line + "\n" + json.dumps({"text": "ok"}) + "\n")
    with pytest.raises(CorpusError, match=msg) as e:
        load_corpus(p)
    assert str(e.value).startswith(f"{p}:3: ")


def test_other_bad_corpora(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(tmp_path / "nope.txt")
    (tmp_path / "e.txt").write_text("\n \n\t\n")
    with pytest.raises(CorpusError, match="e.txt: the corpus holds no documents"):
        load_corpus(tmp_path / "e.txt")
    _write_parquet(tmp_path / "p.parquet", body=["x"], id=[1])
    with pytest.raises(CorpusError, match="p.parquet: no column 'text' \\(columns: body, id\\)"):
        load_corpus(tmp_path / "p.parquet")
    _write_parquet(tmp_path / "q.parquet", text=["x", None])
    with pytest.raises(CorpusError, match="q.parquet: row 1 .*got NoneType"):
        load_corpus(tmp_path / "q.parquet")
    (tmp_path / "r.parquet").write_text("not parquet")
    with pytest.raises(CorpusError, match="r.parquet: not a readable parquet file"):
        load_corpus(tmp_path / "r.parquet")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("x")
    with pytest.raises(CorpusError, match="no corpus files"):
        load_corpus(tmp_path / "empty")


# ----------------------------------------------------------------------------- prepare_data


def test_prepare_local_corpus_trains_tokenizer_on_train_docs_only(tmp_path):
    docs = [f"Story {i}: the {'red' if i % 2 else 'blue'} ball rolls {'down' if i % 3 else 'up'} the hill."
            for i in range(60)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(corpus=str(tmp_path / "c.jsonl"), vocab_size=300, seq_len=16, val_fraction=0.1)
    data = prepare_data(cfg, seed=7)
    train_docs, val_docs = split_documents(docs, 0.1, seed=7)
    assert data.tokenizer.to_str() == Tokenizer.train(train_docs, 300).to_str()
    tok = data.tokenizer
    for name, rows, part in (("train", data.train, train_docs), ("val", data.val, val_docs)):
        st = data.stats[name]
        stream = [t for d in tok.encode_batch(part) for t in (tok.bos_id, *d)]
        assert rows.shape == (st["rows"], 17) and rows[0].tolist() == stream[:17]
        assert st["tokens"] == len(stream) == st["text_tokens"] + st["docs"] and st["docs"] == len(part)
        assert st["targets"] + st["dropped_tokens"] == st["tokens"] - 1 and 0 <= st["dropped_tokens"] < 16
        assert st["bytes"] == sum(len(d.encode()) for d in part)
        assert st["bytes_per_token"] == pytest.approx(st["bytes"] / st["text_tokens"])
    assert data.stats["tokenizer"] == "trained" and data.stats["docs"] == 60
    again = prepare_data(cfg, seed=7, tokenizer=tok)
    assert again.tokenizer is tok and torch.equal(again.train, data.train) and again.stats["tokenizer"] == "given"
    tok.save(tmp_path / "tokenizer.json")
    from_file = prepare_data(DataConfig(**{**cfg.__dict__, "tokenizer": str(tmp_path / "tokenizer.json")}), seed=7)
    assert torch.equal(from_file.val, data.val)
    no_val = prepare_data(DataConfig(**{**cfg.__dict__, "val_fraction": 0.0}), seed=7)
    assert no_val.val.shape == (0, 17) and no_val.stats["val"]["docs"] == 0
    with pytest.raises(CorpusError, match="val split: .*val_fraction"):
        prepare_data(DataConfig(**{**cfg.__dict__, "val_fraction": 0.01, "seq_len": 64}), seed=7)


def test_prepare_synthetic():
    data = prepare_data(DataConfig(synthetic_docs=300, vocab_size=512, seq_len=32), seed=0)
    assert data.train.shape[1] == 33 and len(data.val) > 0 and data.stats["val"]["docs"] == 15
    assert int((data.train == data.tokenizer.bos_id).sum()) > 0
    assert 2.0 < data.stats["train"]["bytes_per_token"] < 8.0


# ----------------------------------------------------------------------------- real data fixture


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared TinyStories samples not present")
def test_tinystories_samples_load_and_pack():
    valid = load_corpus(SHARED / "tinystories_valid_sample.txt")
    train = load_corpus(SHARED / "tinystories_train_sample.txt", max_docs=500)
    assert len(train) == 500 and all(d.strip() and "\n\n" not in d for d in valid + train)
    assert len(valid) == 4302  # the README's "~4,300 stories" (sha256-pinned file)
    tok = Tokenizer.train(train, 1000)
    ids = tok.encode_batch(valid[:200])
    assert [tok.decode(i) for i in ids] == valid[:200]
    n_bytes = sum(len(d.encode()) for d in valid[:200])
    assert int(tok.token_bytes()[[t for i in ids for t in i]].sum()) == n_bytes
    rows = pack_documents(ids, 128, tok.bos_id)
    assert rows.shape[1] == 129 and int((rows == tok.bos_id).sum()) >= 150
    assert 3.0 < n_bytes / sum(map(len, ids)) < 5.0  # bytes per token of a 1k BPE on English prose
