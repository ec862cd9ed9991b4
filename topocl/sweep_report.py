"""`topocl report SWEEP_DIR`: the comparison over a sweep's runs (reads SWEEP/sweep.json and the run artifacts).

Continual runs that have results go through the ordinary report (`topocl.report.write_report`: the runs of one
arm share a run name, so seeds x orders pool into the CIs); pretraining runs get a table of their own (final
held-out loss and bits/byte, throughput, mean [95% bootstrap CI] over seeds per arm and size); every run's
status (failed runs with their log) closes the report.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from topocl.jsonl import read_jsonl
from topocl.metrics import bootstrap_ci
from topocl.sweep import MANIFEST, load_manifest


def is_sweep(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def pretrain_row(run: dict) -> dict:
    out = Path(run["out_dir"])
    summary, meta = _json(out / "summary.json"), _json(out / "meta.json")
    metrics = out / "metrics.jsonl"
    rows = read_jsonl(metrics) if metrics.is_file() else []
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return {"name": run["name"], "arm": run["arm"], "size": run["size"], "seed": run["seed"],
            "status": run.get("status", "?"), "params": meta.get("params_total"),
            "tokens": summary.get("tokens_seen"), "val_loss": summary.get("val_loss"),
            "val_bpb": summary.get("val_bpb"), "tokens_per_s": statistics.median(tps) if tps else None,
            "device": meta.get("device_name") or meta.get("device"), "world_size": meta.get("world_size")}


def _num(x: float | int | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _ci(values: list[float]) -> str:
    if not values:
        return "–"
    mean, lo, hi = bootstrap_ci(values)
    return f"{mean:.4f}" if len(values) == 1 else f"{mean:.4f} [{lo:.4f}, {hi:.4f}]"


def pretrain_section(runs: list[dict]) -> list[str]:
    rows = [pretrain_row(r) for r in runs if r["kind"] == "pretrain"]
    if not rows:
        return []
    md = ["## Pretraining runs", "", "| arm | size | seeds done | val bits/byte ↓ | val loss ↓ | params | tokens/s |",
          "|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["size"]), []).append(r)
    for (arm, size), rs in groups.items():
        ok = [r for r in rs if r["val_bpb"] is not None and r["status"] == "done"]
        tps = [r["tokens_per_s"] for r in ok if r["tokens_per_s"]]
        md.append(f"| {arm} | {size or '–'} | {len(ok)}/{len(rs)} | {_ci([r['val_bpb'] for r in ok])} | "
                  f"{_ci([r['val_loss'] for r in ok])} | {_num(rs[0]['params'], ',')} | "
                  f"{_num(statistics.median(tps) if tps else None, ',.0f')} |")
    md += ["", "Mean [95% percentile-bootstrap CI over seeds] of the final held-out evaluation (summary.json); "
           "tokens/s = median of the logged training steps (metrics.jsonl).", "",
           "| run | seed | status | tokens | val bits/byte | val loss | tokens/s | device | world |",
           "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['name']} | {r['seed']} | {r['status']} | {_num(r['tokens'], ',')} | {_num(r['val_bpb'], '.4f')} | "
           f"{_num(r['val_loss'], '.4f')} | {_num(r['tokens_per_s'], ',.0f')} | {r['device'] or '–'} | "
           f"{r['world_size'] or '–'} |" for r in rows]
    return md


def status_section(man: dict) -> list[str]:
    md = ["## Sweep status", "", f"Sweep `{man['name']}` ({man['sweep_file']}), manifest updated {man['updated']}: "
          + ", ".join(f"{n} {k}" for k, n in man["counts"].items()) + ".", ""]
    bad = [r for r in man["runs"] if r.get("status") in ("failed", "skipped", "pending")]
    if bad:
        md += ["| run | status | detail |", "|---|---|---|"]
        md += [f"| {r['name']} | {r['status']} | {r.get('log') if r['status'] == 'failed' else r.get('reason', '')} |"
               for r in bad]
    return md


def sweep_parts(root: Path) -> tuple[str, list[Path], list[str]]:
    """(sweep name, its continual run directories that have results, the sweep's own report sections). The
    run report around them is topocl.report's (write_sweep_report): this module does not import it."""
    man = load_manifest(root)
    cont = [Path(r["out_dir"]) for r in man["runs"]
            if r["kind"] == "continual" and (Path(r["out_dir"]) / "results.jsonl").is_file()]
    return man["name"], cont, pretrain_section(man["runs"]) + [""] + status_section(man)
