"""JSONL: the one validated reader and writer for every JSONL file TopoCL reads or appends. No torch here.

    for n, obj in iter_jsonl(path, error=StreamError, torn=False):   # input: every bad line is an error
    rows = read_jsonl(path)              # an appended artifact (results, metrics, telemetry): torn last line dropped
    append_jsonl(path, rows)             # strict JSON: NaN/inf are written as null
    rewrite_jsonl(path, keep)            # on resume: keep some rows (atomic), the torn last line gone
    write_jsonl(path, rows)              # replace the file atomically

Torn-line rule. An append is one write of whole lines, so a kill (or a full disk) during it can only leave
the file's last line cut short: no newline at its end, and not valid JSON (or UTF-8). Readers of appended
files (torn=True) drop such a line with a TornLineWarning naming the file and line, and rewrite_jsonl removes
it from the file. Any other bad line, and every bad line of an input file (torn=False: corpora, task
streams), raises `error` with "file:line: what is wrong". Lines are decoded as UTF-8 one by one (a leading
byte-order mark is dropped), so a bad byte is reported with its line too. Blank lines are skipped.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class JsonlError(ValueError):
    """A malformed JSONL line; the message starts with file:line."""


class TornLineWarning(UserWarning):
    """An appended JSONL file ended in a line cut short by a kill; the line was dropped."""


def clean(x: Any) -> Any:
    """NaN/inf -> None, recursively, so that the output is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [clean(v) for v in x]
    return x


def dumps(row: dict) -> str:
    """One line of strict JSON (no bare NaN / Infinity: they become null)."""
    return json.dumps(clean(row), allow_nan=False)


def iter_jsonl(path: str | Path, *, torn: bool = True, error: type[Exception] = JsonlError,
               objects: bool = True) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line. objects: every value must be a JSON object."""
    path = Path(path)
    lines = path.read_bytes().split(b"\n")  # the last item is b"" when the file ends with a newline
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        cut = torn and n == len(lines)  # the unterminated last line of an appended file
        try:
            text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            obj = json.loads(text)
        except UnicodeDecodeError as e:
            if cut:
                return _torn(path, n, "not valid UTF-8")
            raise error(f"{path}:{n}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
        except json.JSONDecodeError as e:
            if cut:
                return _torn(path, n, e.msg)
            raise error(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
        if objects and not isinstance(obj, dict):
            raise error(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        yield n, obj


def _torn(path: Path, n: int, why: str) -> None:
    warnings.warn(f"{path}:{n}: dropped a torn last line ({why}; a run was killed while appending to it)",
                  TornLineWarning, stacklevel=3)


def read_jsonl(path: str | Path, *, torn: bool = True, error: type[Exception] = JsonlError) -> list[dict]:
    """The objects of a JSONL file (see iter_jsonl)."""
    return [obj for _, obj in iter_jsonl(path, torn=torn, error=error)]


def append_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Append rows as strict JSON lines in one write."""
    if rows:
        with open(path, "a") as f:
            f.write("".join(dumps(r) + "\n" for r in rows))


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Replace `path` with `rows` atomically (strict JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def rewrite_jsonl(path: str | Path, keep: Callable[[dict], bool] | None = None,
                  error: type[Exception] = JsonlError) -> None:
    """On resume: rewrite an appended file with the rows that `keep` accepts (all by default), without a torn
    last line. A missing file is left missing."""
    path = Path(path)
    if path.is_file():
        write_jsonl(path, [r for r in read_jsonl(path, error=error) if keep is None or keep(r)])
