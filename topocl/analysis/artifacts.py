"""Analysis artifacts: JSONL rows under a run directory, written atomically, read with file:line errors.
No torch here (reports read these).

    RUN/seed{S}-order{O}/telemetry.jsonl            written during the run (analysis.telemetry=true)
    RUN/seed{S}-order{O}/analysis/{graft,routing,sparsity}.jsonl   written by `topocl analyze`
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

STREAM_DIR = re.compile(r"^seed(-?\d+)-order(\d+)$")
STAGES = ("graft", "routing", "sparsity")


def stream_dirs(run_dir: str | Path) -> list[tuple[int, int, Path]]:
    """(seed, order, path) of every seed{S}-order{O} directory of a run, sorted."""
    out = []
    for p in Path(run_dir).iterdir() if Path(run_dir).is_dir() else []:
        m = STREAM_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), int(m.group(2)), p))
    return sorted(out)


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Replace `path` with `rows` atomically (NaN/inf written as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps({k: _clean(v) for k, v in r.items()}) + "\n" for r in rows))
    os.replace(tmp, path)


def append_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps({k: _clean(v) for k, v in r.items()}) + "\n" for r in rows)


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file (null values become NaN); errors name the file and line."""
    path = Path(path)
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object")
        rows.append({k: (math.nan if v is None else v) for k, v in obj.items()})
    return rows


def run_artifacts(run_dir: str | Path) -> dict[str, list[dict]]:
    """{"telemetry" | "graft" | "routing" | "sparsity": rows of every stream, each with seed and order}."""
    out: dict[str, list[dict]] = {k: [] for k in ("telemetry", *STAGES)}
    for seed, order, d in stream_dirs(run_dir):
        files = {"telemetry": d / "telemetry.jsonl", **{s: d / "analysis" / f"{s}.jsonl" for s in STAGES}}
        for key, f in files.items():
            if f.is_file():
                out[key] += [{**r, "seed": seed, "order": order} for r in read_jsonl(f)]
    return out


def artifacts_by_run(run_dirs: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """Run name -> run_artifacts pooled over every directory holding that run (a sweep writes one directory
    per replicate and order under one run name); `run_dirs` are topocl.results.read_run_dir dicts."""
    out: dict[str, dict[str, list[dict]]] = {}
    for d in run_dirs:
        art = run_artifacts(d["dir"])
        for n in d["runs"]:
            mine = out.setdefault(n, {k: [] for k in art})
            for k, rs in art.items():
                mine[k] += rs
    return out
