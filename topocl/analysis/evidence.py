"""H1 / H2 / H3: each hypothesis, the numbers that test it (mean [95% bootstrap CI] over seeds x orders) and a
verdict COMPUTED from them by one stated rule. No torch: reads artifacts only.

Verdict rule (`verdict`), for a statistic whose hypothesis predicts a sign:
    supported       n >= 2 and the 95% CI lies entirely on the predicted side of 0
    not supported   n >= 2 and the 95% CI lies entirely on the other side of 0
    inconclusive    otherwise (the CI contains 0, fewer than 2 streams, or no data)
A hypothesis with two statistics needs both supported; either one not supported makes it not supported.

    H1 (isolation)  new-task gradients flow into the fast pathway and leave the slow one alone.
        Statistic: per stream, the mean over tasks of log10(E_fast / E_slow), E = the pathway's mean squared
        training gradient per parameter (telemetry grad_energy); predicted > 0. A run whose slow pathway gets
        no gradient (frozen by its role policy) is isolated by construction: inconclusive, with that note.
    H2 (plasticity) the arm absorbs the stream with less forgetting than the dense baseline.
        Statistics: ΔF = F_Chaudhry(arm) − F_Chaudhry(baseline), predicted < 0; and it must still learn:
        ΔLA = LA(arm) − LA(baseline), predicted > −LA_TOLERANCE (the rule with that threshold for 0).
        Paired by (seed, order) when both runs have >= 2 common streams, else an unpaired bootstrap of the
        difference of means.
    H3 (division of labour) fine-grained facts live in the fast pathway, world rules in the slow one.
        From grafting (mode remove: the group's weights from before task j put into the final model), the
        drop d(G, type) = final − grafted accuracy on task j's probes of that type, averaged over tasks.
        Statistics: d(fast, fact) − d(slow, fact) > 0 and d(slow, rule) − d(fast, rule) > 0 (probe types
        fact / rule come from the campaign stream's tags).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from topocl import metrics as M
from topocl.results import matrices, stats

LA_TOLERANCE = 0.05  # H2: the arm may learn up to 5 accuracy points less per task than the baseline
RULE = ("supported iff n ≥ 2 and the 95% bootstrap CI lies entirely on the predicted side of 0 (of −0.05 for "
        "H2's ΔLA); not supported "
        "iff it lies entirely on the other side; inconclusive otherwise (both statistics must be supported "
        "where there are two; either one not supported decides)")
STATEMENTS = {
    "H1": "New-task gradients flow into the selected/fast pathway and leave the compressed/slow pathway alone.",
    "H2": "Asymmetric plasticity lets the model absorb the stream's tasks with less forgetting than the dense "
          "baseline.",
    "H3": "Fine-grained facts live in the selected/fast pathway and world rules in the compressed/slow one "
          "(grafting).",
}


def verdict(s: dict | None, direction: int = 1, threshold: float = 0.0, min_n: int = 2) -> str:
    """The rule above for one statistic {mean, ci_low, ci_high, n}: direction +1 = predicted > threshold,
    -1 = predicted < threshold (the threshold is 0 except for H2's learning guard)."""
    if not s or s.get("n", 0) < min_n or any(s.get(k) is None or math.isnan(s[k]) for k in ("ci_low", "ci_high")):
        return "inconclusive"
    lo, hi = s["ci_low"] - threshold, s["ci_high"] - threshold
    lo, hi = (lo, hi) if direction > 0 else (-hi, -lo)
    if lo > 0:
        return "supported"
    if hi < 0:
        return "not supported"
    return "inconclusive"


def combine(verdicts: Sequence[str]) -> str:
    """All supported -> supported; any not supported -> not supported; else inconclusive."""
    if verdicts and all(v == "supported" for v in verdicts):
        return "supported"
    return "not supported" if "not supported" in verdicts else "inconclusive"


def diff_stats(arm: dict[tuple, float], base: dict[tuple, float], n_boot: int = 2000, seed: int = 0) -> dict:
    """Stats of arm − baseline: paired over common (seed, order) keys when there are >= 2, else a percentile
    bootstrap of the difference of the two means (each resampled on its own, fixed seed)."""
    common = sorted(set(arm) & set(base))
    if len(common) >= 2:
        return {**stats([arm[k] - base[k] for k in common]), "paired": True}
    a = [v for v in arm.values() if not math.isnan(v)]
    b = [v for v in base.values() if not math.isnan(v)]
    if not a or not b:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0, "values": [], "paired": False}
    mean = sum(a) / len(a) - sum(b) / len(b)
    rng = random.Random(seed)
    ds = sorted(sum(rng.choices(a, k=len(a))) / len(a) - sum(rng.choices(b, k=len(b))) / len(b)
                for _ in range(n_boot))
    return {"mean": mean, "ci_low": ds[int(0.025 * n_boot)], "ci_high": ds[min(n_boot - 1, int(0.975 * n_boot))],
            "n": min(len(a), len(b)), "values": [], "paired": False}


# ----------------------------------------------------------------------------- per-stream statistics


def _by_stream(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["seed"], r["order"]), []).append(r)
    return out


def h1_values(telemetry: list[dict]) -> tuple[dict[tuple, float], bool]:
    """(seed, order) -> mean over tasks of log10(E_fast / E_slow); and whether a slow pathway exists but gets
    no gradient anywhere (frozen)."""
    out, frozen = {}, False
    for key, rs in _by_stream(telemetry).items():
        energy: dict[tuple[int, str], float] = {(r["after_task"], r["group"]): r["value"] for r in rs
                                                if r["measure"] == "grad_energy"}
        has_slow = any(r["group"] == "pathway.slow" for r in rs)
        logs = [math.log10(energy[(j, "pathway.fast")] / energy[(j, "pathway.slow")])
                for j in sorted({j for j, _ in energy}) if energy.get((j, "pathway.fast"), 0) > 0
                and energy.get((j, "pathway.slow"), 0) > 0]
        if has_slow and not any(g == "pathway.slow" for _, g in energy):
            frozen = True
        if logs:
            out[key] = sum(logs) / len(logs)
    return out, frozen


def stream_metric(rows: list[dict], run: str, fn) -> dict[tuple, float]:
    """(seed, order) -> fn(R) over the run's complete retain-accuracy matrices."""
    return {(s, o): fn(R) for (r, s, o), R in matrices(rows, "retain", "acc").items()
            if r == run and len(R) == len(R[0]) + 1}


def h3_values(graft: list[dict]) -> tuple[dict[tuple, float], dict[tuple, float]]:
    """(fact specificity, rule specificity) per (seed, order) from remove-mode graft rows (see module doc)."""
    facts, rules = {}, {}
    for key, rs in _by_stream(graft).items():
        drop: dict[tuple[str, str], list[float]] = {}
        for r in rs:
            if r["mode"] == "remove" and r["eval_task"] == r["task"] and r["kind"] == "retain":
                drop.setdefault((r["group"], r["type"]), []).append(r["final"] - r["value"])
        d = {k: sum(v) / len(v) for k, v in drop.items()}
        if all(k in d for k in (("fast", "fact"), ("slow", "fact"))):
            facts[key] = d[("fast", "fact")] - d[("slow", "fact")]
        if all(k in d for k in (("fast", "rule"), ("slow", "rule"))):
            rules[key] = d[("slow", "rule")] - d[("fast", "rule")]
    return facts, rules


# ----------------------------------------------------------------------------- the section


def evidence(rows: list[dict], artifacts: dict[str, dict[str, list[dict]]], baseline: str | None = None,
             joint: str | None = None) -> dict:
    """{"H1" | "H2" | "H3": {"statement", "runs": {run: {"stats": {name: stats}, "verdict", "note"}}}, "rule"}.
    `artifacts`: run name -> topocl.analysis.artifacts.run_artifacts(its directory)."""
    runs = sorted({r["run"] for r in rows} | set(artifacts))
    out: dict = {"rule": RULE, **{h: {"statement": s, "runs": {}} for h, s in STATEMENTS.items()}}
    for run in runs:
        art = artifacts.get(run, {})
        if art.get("telemetry"):
            vals, frozen = h1_values(art["telemetry"])
            s = stats(list(vals.values()))
            v, note = verdict(s), ""
            if not vals and frozen:
                note = "slow pathway frozen by the role policy: isolated by construction, nothing to test"
            elif not vals:
                note = "no pathway gradients (dense model?)"
            if vals or frozen:
                out["H1"]["runs"][run] = {"stats": {"log10 E_fast/E_slow, predicted > 0": s}, "verdict": v,
                                          "note": note}
        if baseline and run not in (baseline, joint) and any(r["run"] == run for r in rows):
            df = diff_stats(stream_metric(rows, run, M.forgetting_chaudhry),
                            stream_metric(rows, baseline, M.forgetting_chaudhry))
            dla = diff_stats(stream_metric(rows, run, M.learning_acc), stream_metric(rows, baseline, M.learning_acc))
            out["H2"]["runs"][run] = {"stats": {"ΔF Chaudhry (arm − baseline), predicted < 0": df,
                                                f"ΔLA (arm − baseline), predicted > −{LA_TOLERANCE}": dla},
                                      "verdict": combine([verdict(df, -1), verdict(dla, +1, -LA_TOLERANCE)]),
                                      "note": f"vs {baseline}" + ("" if df.get("paired") else ", unpaired")}
        if art.get("graft"):
            facts, rules = h3_values(art["graft"])
            sf, sr = stats(list(facts.values())), stats(list(rules.values()))
            note = "" if facts and rules else "needs fact and rule probe types (campaign stream) and slow/fast groups"
            out["H3"]["runs"][run] = {"stats": {"fact: d(fast) − d(slow), predicted > 0": sf,
                                                "rule: d(slow) − d(fast), predicted > 0": sr},
                                      "verdict": combine([verdict(sf), verdict(sr)]), "note": note}
    return out


def _fmt(s: dict) -> str:
    if not s or s.get("mean") is None or math.isnan(s["mean"]):
        return "–"
    return f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]" if s["n"] > 1 else f"{s['mean']:.3f}"


def evidence_markdown(ev: dict) -> list[str]:
    """The "H1/H2/H3 evidence" section of a report."""
    md = ["## H1/H2/H3 evidence", "",
          f"Each verdict is computed, never written by hand (`topocl/analysis/evidence.py`): {ev['rule']}.", ""]
    for h in ("H1", "H2", "H3"):
        md += [f"### {h}: {ev[h]['statement']}", ""]
        if not ev[h]["runs"]:
            md += ["No run has the artifacts this needs "
                   + {"H1": "(run with `analysis.telemetry=true`).",
                      "H2": "(name the dense baseline: `--baseline RUN`).",
                      "H3": "(run `topocl analyze` on a run with `analysis.keep_task_checkpoints=true`)."}[h], ""]
            continue
        md += ["| run | statistic | mean [95% CI] | n | verdict | note |", "|---|---|---|---|---|---|"]
        for run, r in ev[h]["runs"].items():
            for i, (name, s) in enumerate(r["stats"].items()):
                md.append(f"| {run if i == 0 else ''} | {name} | {_fmt(s)} | {s.get('n', 0)} | "
                          f"{r['verdict'] if i == 0 else ''} | {r['note'] if i == 0 else ''} |")
        md.append("")
    return md
