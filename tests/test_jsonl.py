"""The one JSONL module: torn last line of an appended file dropped with a warning, every other bad line an error
naming file:line, strict JSON out; and every JSONL reader of the package goes through it."""

import json
import math

import pytest

from topocl.analysis.artifacts import read_jsonl as read_artifact
from topocl.data import CorpusError, load_corpus
from topocl.jsonl import JsonlError, TornLineWarning, append_jsonl, read_jsonl, rewrite_jsonl
from topocl.results import ResultsError, load_rows
from topocl.tasks.jsonl import StreamError, read_task_dir, read_tasks_file


def strict(text: str) -> list:
    def refuse(c):
        raise ValueError(f"bare {c} in JSON")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def test_torn_last_line_is_dropped_with_a_warning_naming_the_file(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "lo')  # a kill in the middle of an append
    with pytest.warns(TornLineWarning, match=r"metrics.jsonl:3: dropped a torn last line"):
        assert read_jsonl(p) == [{"step": 0}, {"step": 1}]
    with pytest.warns(TornLineWarning):
        rewrite_jsonl(p)  # resume: the file itself loses the torn line
    assert p.read_text() == '{"step": 0}\n{"step": 1}\n'
    append_jsonl(p, [{"step": 2}])
    assert read_jsonl(p) == [{"step": 0}, {"step": 1}, {"step": 2}]


def test_torn_utf8_and_unterminated_but_complete_last_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes('{"x": "é"}\n{"x": "é'.encode()[:-1])  # cut inside a two-byte character
    with pytest.warns(TornLineWarning, match="not valid UTF-8"):
        assert read_jsonl(p) == [{"x": "é"}]
    p.write_text('{"x": 1}\n{"x": 2}')  # the newline was lost but the row is whole: kept, and rewrite ends it
    assert read_jsonl(p) == [{"x": 1}, {"x": 2}]
    rewrite_jsonl(p)
    assert p.read_text() == '{"x": 1}\n{"x": 2}\n'


def test_a_bad_line_elsewhere_is_an_error_with_file_and_line(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_text('{"a": 1}\n{"a": 2, "b\n{"a": 3}\n')
    with pytest.raises(JsonlError, match=r"results.jsonl:2: invalid JSON"):
        read_jsonl(p)
    p.write_text('{"a": 1}\n{"a": 2, "b\n')  # the bad line ends with a newline: not a torn append
    with pytest.raises(JsonlError, match=r"results.jsonl:2: invalid JSON"):
        read_jsonl(p)
    p.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n{"a": 3}\n')
    with pytest.raises(JsonlError, match=r"results.jsonl:2: not valid UTF-8 \(byte 0xff"):
        read_jsonl(p)
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(JsonlError, match=r"results.jsonl:2: expected a JSON object, got list"):
        read_jsonl(p)
    p.write_text('{"a": 1}\n{"a"')  # an input file (torn=False): the last line is an error too
    with pytest.raises(JsonlError, match=r"results.jsonl:2: invalid JSON"):
        read_jsonl(p, torn=False)


def test_written_json_is_strict(tmp_path):
    p = tmp_path / "m.jsonl"
    append_jsonl(p, [{"loss": math.nan, "aux": {"x": math.inf}, "v": [1.5, -math.inf]}])
    assert strict(p.read_text()) == [{"loss": None, "aux": {"x": None}, "v": [1.5, None]}]
    assert read_artifact(p)[0]["loss"] != read_artifact(p)[0]["loss"]  # artifacts read null back as NaN


ROW = {"run": "r", "seed": 0, "order": 0, "after_task": -1, "step": 0, "eval_task": 0, "kind": "retain",
       "metric": "acc", "value": 0.5}


def test_results_reader_uses_the_rule(tmp_path):
    p = tmp_path / "results.jsonl"
    append_jsonl(p, [ROW, {**ROW, "eval_task": 1, "value": math.nan}])
    with open(p, "a") as f:
        f.write(json.dumps({**ROW, "eval_task": 2})[:40])
    with pytest.warns(TornLineWarning, match="results.jsonl:3"):
        rows = load_rows(p)
    assert len(rows) == 2 and math.isnan(rows[1]["value"])  # null (strict JSON) reads back as NaN
    p.write_text(json.dumps(ROW) + "\n" + json.dumps(ROW)[:40] + "\n" + json.dumps({**ROW, "eval_task": 1}) + "\n")
    with pytest.raises(ResultsError, match=r"results.jsonl:2: invalid JSON"):
        load_rows(p)


def test_input_files_name_file_and_line_for_bad_utf8(tmp_path):
    good = {"name": "t", "texts": ["a"], "probes": []}
    p = tmp_path / "stream.jsonl"
    p.write_bytes(json.dumps(good).encode() + b'\n{"name": "t\xe9", "texts": ["a"], "probes": []}\n')
    with pytest.raises(StreamError, match=r"stream.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        read_tasks_file(p)
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xc3"}\n')
    with pytest.raises(StreamError, match=r"a.jsonl:2: not valid UTF-8"):
        read_task_dir(d)
    (d / "a.jsonl").write_text('{"text": "ok"}\n{"text": "cut')  # a stream file is input: no torn-line leniency
    with pytest.raises(StreamError, match=r"a.jsonl:2: invalid JSON"):
        read_task_dir(d)
    c = tmp_path / "corpus.jsonl"
    c.write_text('{"text": "one"}\n{"text": "tw')
    with pytest.raises(CorpusError, match=r"corpus.jsonl:2: invalid JSON"):
        load_corpus(c)
