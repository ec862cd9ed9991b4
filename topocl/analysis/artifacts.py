"""Analysis artifacts: JSONL rows under a run directory, written atomically, read with file:line errors.
No torch here (reports read these).

    RUN/seed{S}-order{O}/telemetry.jsonl            written during the run (analysis.telemetry=true)
    RUN/seed{S}-order{O}/analysis/{graft,routing,sparsity}.jsonl   written by `topocl analyze`
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from topocl import jsonl
from topocl.jsonl import append_jsonl, write_jsonl  # noqa: F401  (the artifact writers, re-exported)

STREAM_DIR = re.compile(r"^seed(-?\d+)-order(\d+)$")
STAGES = ("graft", "routing", "sparsity")
GRAFT_MODES = ("remove", "recover")  # topocl/analysis/graft.py


def stream_dirs(run_dir: str | Path) -> list[tuple[int, int, Path]]:
    """(seed, order, path) of every seed{S}-order{O} directory of a run, sorted."""
    out = []
    for p in Path(run_dir).iterdir() if Path(run_dir).is_dir() else []:
        m = STREAM_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), int(m.group(2)), p))
    return sorted(out)


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of an artifact JSONL file (null values become NaN); errors name the file and line, a torn last line
    (a kill during an append) is dropped with a warning (topocl.jsonl)."""
    return [{k: (math.nan if v is None else v) for k, v in r.items()} for r in jsonl.read_jsonl(path)]


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
