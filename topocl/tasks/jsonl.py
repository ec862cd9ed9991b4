"""`jsonl`: a user-supplied stream, validated against topocl/schemas/stream.schema.json (checked by hand,
no extra dependency). Two layouts:

    stream.jsonl        one task per line: {"name": str, "texts": [str, ...], "probes": [probe, ...]}
    stream_dir/         one file per task, *.jsonl in sorted order, task name = file stem; each line is
                        either {"text": str} or a probe object
    probe = {"prompt": str, "answer": str, "candidates": [str, ...] (contains answer),
             "kind": "retain" | "update" | "base" (default retain), "tags": {str: str}, "id": str}

Errors name the file, the line and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from topocl.jsonl import iter_jsonl
from topocl.registry import STREAMS
from topocl.tasks.base import PROBE_KINDS, Probe, Task


class StreamError(ValueError):
    pass


@dataclass
class JsonlConfig:
    path: str = ""  # a .jsonl file (a task per line) or a directory (a .jsonl file per task)


def _str(obj: dict, key: str, where: str, required: bool = True) -> str | None:
    if key not in obj:
        if required:
            raise StreamError(f"{where}: missing field '{key}'")
        return None
    if not isinstance(obj[key], str):
        raise StreamError(f"{where}: field '{key}' must be a string, got {type(obj[key]).__name__}")
    return obj[key]


def parse_probe(obj: object, where: str, task_index: int, n: int) -> Probe:
    if not isinstance(obj, dict):
        raise StreamError(f"{where}: a probe must be an object")
    allowed = {"prompt", "answer", "candidates", "kind", "tags", "id"}
    if set(obj) - allowed:
        raise StreamError(f"{where}: unknown probe field(s) {sorted(set(obj) - allowed)}; allowed: {sorted(allowed)}")
    prompt, answer = _str(obj, "prompt", where), _str(obj, "answer", where)
    cands = obj.get("candidates")
    if not isinstance(cands, list) or not cands or not all(isinstance(c, str) for c in cands):
        raise StreamError(f"{where}: field 'candidates' must be a non-empty list of strings")
    if answer not in cands:
        raise StreamError(f"{where}: field 'answer' {answer!r} is not among 'candidates'")
    kind = _str(obj, "kind", where, required=False) or "retain"
    if kind not in PROBE_KINDS:
        raise StreamError(f"{where}: field 'kind' must be one of {PROBE_KINDS}, got {kind!r}")
    tags = obj.get("tags", {})
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise StreamError(f"{where}: field 'tags' must be an object of strings")
    pid = _str(obj, "id", where, required=False) or f"jsonl/{task_index}/{n}"
    return Probe(prompt, answer, cands, kind, task_index, dict(tags), pid)


def _lines(path: Path):
    """(line number, object) of a stream file; bad JSON or UTF-8 -> StreamError naming file:line."""
    return iter_jsonl(path, torn=False, error=StreamError, objects=False)


def read_tasks_file(path: Path) -> list[Task]:
    tasks = []
    for n, obj in _lines(path):
        where = f"{path}:{n}"
        if not isinstance(obj, dict):
            raise StreamError(f"{where}: a task must be an object")
        if set(obj) - {"name", "texts", "probes"}:
            raise StreamError(f"{where}: unknown task field(s) {sorted(set(obj) - {'name', 'texts', 'probes'})}")
        name = _str(obj, "name", where)
        texts = obj.get("texts")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise StreamError(f"{where}: field 'texts' must be a non-empty list of strings")
        probes = obj.get("probes")
        if not isinstance(probes, list):
            raise StreamError(f"{where}: field 'probes' must be a list")
        j = len(tasks)
        tasks.append(Task(name, texts, [parse_probe(p, f"{where}: probes[{i}]", j, i) for i, p in enumerate(probes)]))
    return tasks


def read_task_dir(path: Path) -> list[Task]:
    tasks = []
    for f in sorted(path.glob("*.jsonl")):
        texts, probes = [], []
        for n, obj in _lines(f):
            where = f"{f}:{n}"
            if isinstance(obj, dict) and set(obj) == {"text"}:
                texts.append(_str(obj, "text", where))
            else:
                probes.append(parse_probe(obj, where, len(tasks), len(probes)))
        if not texts:
            raise StreamError(f"{f}: a task file needs at least one {{\"text\": ...}} line")
        tasks.append(Task(f.stem, texts, probes))
    return tasks


@STREAMS.register("jsonl")
def build(cfg: JsonlConfig) -> list[Task]:
    path = Path(cfg.path)
    if not cfg.path or not path.exists():
        raise StreamError(f"jsonl stream: path {cfg.path!r} not found (set stream_options.path)")
    tasks = read_task_dir(path) if path.is_dir() else read_tasks_file(path)
    if not tasks:
        raise StreamError(f"{path}: the stream holds no tasks")
    return tasks
