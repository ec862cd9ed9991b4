"""H1 / H2 / H3: each hypothesis, the numbers that test it and a verdict COMPUTED from them by one stated rule.
No torch: reads artifacts only. docs/protocol.md states the protocol this implements.

Unit of replication: a replicate = one pretraining seed (meta.json `replicate`, topocl.results.replicate_map).
Continual seeds x task orders of one pretrained model are NOT independent tests of a topology: they are
averaged inside their replicate first. Without replicate information every stream counts as a unit, and the
unit column says it is ONE pretrained model.

Verdict rule (`verdict`), for a statistic whose hypothesis predicts a sign:
    supported       n >= MIN_N (5) units and the 95% Student-t CI of the mean lies entirely on the predicted side
    not supported   n >= MIN_N units and the 95% t-CI lies entirely on the other side
    inconclusive    otherwise (CI contains the threshold, n < 5, no data, or not applicable)
A comparison (H2) is the paired difference arm − baseline per replicate. A hypothesis with two statistics needs
both supported; either one not supported makes it not supported. Simulated false "supported" rates under the
null (`simulate_null`) are in docs/protocol.md.

    H1 (isolation)  new-task gradients overlap less with earlier tasks' gradients in the slow pathway.
        Statistic: per stream, the mean over task pairs (j, i < j) of |cos(ḡ_j, ḡ_i)|_slow − |cos(ḡ_j, ḡ_i)|_fast
        (telemetry grad_cos per pathway); predicted < 0. A pathway frozen by the role policy has no gradients:
        not applicable.
    H2 (plasticity) the arm forgets less than the dense baseline AT MATCHED LEARNING.
        Statistic: ΔF Chaudhry at matched LA (topocl/analysis/frontier.py: the arm's and the baseline arm's
        F(LA) curves over their learning-rate grids, compared on the overlap of their LA ranges, per
        replicate); predicted < 0. No overlap: inconclusive (never extrapolated). The raw ΔF and ΔLA of the
        runs as configured are shown beside it, without a verdict.
    H3 (division of labour) fine-grained facts live in the fast pathway, world rules in the slow one.
        From grafting (mode remove: the group's weights from before task j put into the final model), the
        drop d(G, type) = final − grafted accuracy on task j's probes of that type, averaged over tasks.
        Statistics: d(fast, fact) − d(slow, fact) > 0 and d(slow, rule) − d(fast, rule) > 0. A pathway whose
        weights never moved (frozen) cannot lose anything to grafting: not applicable. Every other role group
        (MLP, embeddings, head, norms) is grafted too; their drops are shown, without a verdict.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from topocl import metrics as M
from topocl.analysis.frontier import arm_of, frontiers, matched_delta
from topocl.results import by_unit, matrices, stats, unit_label

MIN_N = 5
RULE = ("a statistic is supported iff it has n ≥ 5 independent units (replicates = pretraining seeds) and the "
        "95% Student-t CI of its mean (for H2: of the paired difference arm − baseline per replicate) lies "
        "entirely on the predicted side of 0; not supported iff n ≥ 5 and the CI lies entirely on the other "
        "side; inconclusive otherwise. Where there are two statistics both must be supported; either one not "
        "supported decides")
STATEMENTS = {
    "H1": "New-task gradients overlap less with earlier tasks' gradients in the compressed/slow pathway than in "
          "the selected/fast pathway.",
    "H2": "Asymmetric plasticity lets the model absorb the stream's tasks with less forgetting than the dense "
          "baseline, at matched new-task learning.",
    "H3": "Fine-grained facts live in the selected/fast pathway and world rules in the compressed/slow one "
          "(grafting).",
}


def verdict(s: dict | None, direction: int = 1, threshold: float = 0.0, min_n: int = MIN_N) -> str:
    """The rule above for one statistic {mean, ci_low, ci_high, n}: direction +1 = predicted > threshold,
    -1 = predicted < threshold."""
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


def diff_stats(arm: dict, base: dict) -> dict:
    """Stats of the paired differences arm[u] − base[u] over the units both have (unit -> value; the units are
    replicates, or streams of one model). No common unit: n = 0 (inconclusive), never an unpaired test."""
    common = sorted(set(arm) & set(base), key=str)
    vals = [arm[u] - base[u] for u in common]
    return {**stats(vals, [list(u) if isinstance(u, tuple) else u for u in common]), "paired": True}


# ----------------------------------------------------------------------------- per-stream statistics


def _by_stream(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["seed"], r["order"]), []).append(r)
    return out


def h1_values(telemetry: list[dict]) -> tuple[dict[tuple, float], list[str]]:
    """(seed, order) -> mean over task pairs of |cos|_slow − |cos|_fast (grad_cos rows, pathway groups, pairs
    both pathways have); and the pathways that exist but never get a gradient (frozen), e.g. ["slow"]."""
    out, frozen = {}, set()
    for key, rs in _by_stream(telemetry).items():
        cos = {(r["after_task"], r["ref_task"], r["group"]): r["value"] for r in rs if r["measure"] == "grad_cos"}
        for p in ("slow", "fast"):
            group = f"pathway.{p}"
            if any(r["group"] == group for r in rs) and not any(r["group"] == group and r["measure"]
                                                                  in ("grad_cos", "grad_energy") for r in rs):
                frozen.add(p)
        pairs = sorted({(j, i) for j, i, _ in cos})
        diffs = [abs(cos[(j, i, "pathway.slow")]) - abs(cos[(j, i, "pathway.fast")]) for j, i in pairs
                 if all(not math.isnan(cos.get((j, i, f"pathway.{p}"), math.nan)) for p in ("slow", "fast"))]
        if diffs:
            out[key] = sum(diffs) / len(diffs)
    return out, sorted(frozen)


def stream_metric(rows: list[dict], run: str, fn) -> dict[tuple, float]:
    """(seed, order) -> fn(R) over the run's finished retain-accuracy matrices."""
    return {(s, o): fn(R) for (r, s, o), R in matrices(rows, "retain", "acc").items()
            if r == run and len(R) == len(R[0]) + 1}


def h3_values(graft: list[dict]) -> tuple[dict[tuple, float], dict[tuple, float], dict[str, dict[tuple, float]],
                                          list[str]]:
    """(fact specificity, rule specificity, {group: own-task drop over all types}) per (seed, order) from
    remove-mode graft rows (module doc), and the pathway groups that never moved (graft rows `moved` false)."""
    facts, rules, groups, frozen = {}, {}, {}, set()
    for key, rs in _by_stream(graft).items():
        drop: dict[tuple[str, str], list[float]] = {}
        moved: dict[str, bool] = {}
        for r in rs:
            if r["mode"] == "remove":
                moved[r["group"]] = moved.get(r["group"], False) or bool(r.get("moved", True))
                if r["eval_task"] == r["task"] and r["kind"] == "retain":
                    drop.setdefault((r["group"], r["type"]), []).append(r["final"] - r["value"])
        frozen |= {g for g in ("slow", "fast") if g in moved and not moved[g]}
        d = {k: sum(v) / len(v) for k, v in drop.items()}
        for g in {g for g, _ in drop}:
            groups.setdefault(g, {})[key] = M.nanmean(x for (gg, _), v in drop.items() if gg == g for x in v)
        if any(g in frozen for g in ("slow", "fast")):
            continue
        if all(k in d for k in (("fast", "fact"), ("slow", "fact"))):
            facts[key] = d[("fast", "fact")] - d[("slow", "fact")]
        if all(k in d for k in (("fast", "rule"), ("slow", "rule"))):
            rules[key] = d[("slow", "rule")] - d[("fast", "rule")]
    return facts, rules, groups, sorted(frozen)


# ----------------------------------------------------------------------------- the section


def _reps(replicates: dict[tuple, object] | None, run: str, keys) -> dict[tuple, object]:
    return {k: (replicates or {}).get((run, *k)) for k in keys}


def _unit_stats(vals: dict[tuple, float], replicates, run: str) -> tuple[dict, str]:
    reps = _reps(replicates, run, vals)
    u = by_unit(vals, reps)
    return stats(list(u.values()), [list(k) if isinstance(k, tuple) else k for k in u]), unit_label(sorted(vals), reps)


def _h2(rows: list[dict], baseline: str, joint: str | None, replicates) -> dict:
    fr = frontiers(rows, replicates, exclude=[joint] if joint else [])
    base_arm = arm_of(baseline)
    out = {}
    for arm, points in fr.items():
        if arm == base_arm or base_arm not in fr:
            continue
        md = matched_delta(points, fr[base_arm])
        s = md["stats"]
        if md["pooled"]["range"] is None:
            note = (f"no overlap of the LA ranges (arm {_range(points)}, baseline {_range(fr[base_arm])}): not "
                    "compared at matched learning (never extrapolated); run a learning-rate grid")
        else:
            lo, hi = md["pooled"]["range"]
            note = f"vs {base_arm}, matched LA range [{lo:.3f}, {hi:.3f}]"
            if md["units_without_overlap"]:
                note += f"; {md['units_without_overlap']} replicate(s) without overlap left out"
        reps = {u for p in points for u in p["units"]}
        unit = (f"{len(reps)} unit(s): " + ("pretraining seeds" if not any(isinstance(u, tuple) for u in reps)
                                            else "streams of ONE pretrained model"))
        st = {"ΔF Chaudhry at matched LA (arm − baseline), predicted < 0": s}
        if len(points) == 1 and any(p["run"] == baseline for p in fr[base_arm]):
            run = points[0]["run"]
            for name, fn in (("ΔF Chaudhry as run (descriptive)", M.forgetting_chaudhry),
                             ("ΔLA as run (descriptive)", M.learning_acc)):
                a, b = stream_metric(rows, run, fn), stream_metric(rows, baseline, fn)
                st[name] = diff_stats(by_unit(a, _reps(replicates, run, a)),
                                      by_unit(b, _reps(replicates, baseline, b)))
        out[arm] = {"stats": st, "verdict": verdict(s, -1), "note": note, "unit": unit}
    return out


def _range(points: list[dict]) -> str:
    las = [p["LA"]["mean"] for p in points]
    return f"[{min(las):.3f}, {max(las):.3f}]"


def evidence(rows: list[dict], artifacts: dict[str, dict[str, list[dict]]], baseline: str | None = None,
             joint: str | None = None, replicates: dict[tuple, object] | None = None) -> dict:
    """{"H1" | "H2" | "H3": {"statement", "runs": {run or arm: {"stats": {name: stats}, "verdict", "note",
    "unit"}}}, "rule"}. `artifacts`: run name -> topocl.analysis.artifacts.run_artifacts(its directories);
    `replicates`: (run, seed, order) -> pretraining seed (topocl.results.replicate_map)."""
    runs = sorted({r["run"] for r in rows} | set(artifacts))
    out: dict = {"rule": RULE, **{h: {"statement": s, "runs": {}} for h, s in STATEMENTS.items()}}
    for run in runs:
        art = artifacts.get(run, {})
        if art.get("telemetry"):
            vals, frozen = h1_values(art["telemetry"])
            s, unit = _unit_stats(vals, replicates, run)
            v, note = verdict(s, -1), ""
            if frozen:
                v, note = "not applicable", (f"{' and '.join(frozen)} pathway frozen by the role policy (no "
                                             "gradients): gradient overlap cannot be compared")
            elif not vals:
                note = "no gradient cosines for both pathways (dense model, or a single task)"
            if vals or frozen:
                out["H1"]["runs"][run] = {"stats": {"mean |cos|_slow − |cos|_fast, predicted < 0": s},
                                          "verdict": v, "note": note, "unit": unit}
        if art.get("graft"):
            facts, rules, groups, frozen = h3_values(art["graft"])
            (sf, unit), (sr, _) = _unit_stats(facts, replicates, run), _unit_stats(rules, replicates, run)
            st = {"fact: d(fast) − d(slow), predicted > 0": sf, "rule: d(slow) − d(fast), predicted > 0": sr}
            for g, vals in sorted(groups.items()):
                if g not in ("slow", "fast"):
                    st[f"own-task drop d({g}) (descriptive)"] = _unit_stats(vals, replicates, run)[0]
            v = combine([verdict(sf), verdict(sr)])
            note = "" if facts and rules else "needs fact and rule probe types (campaign stream) and slow/fast groups"
            if frozen:
                v, note = "not applicable", (f"{' and '.join(frozen)} pathway frozen (its weights never moved): "
                                             "grafting it cannot remove anything, a difference would be a positive "
                                             "by construction")
            out["H3"]["runs"][run] = {"stats": st, "verdict": v, "note": note, "unit": unit}
    if baseline and any(r["run"] == baseline for r in rows):
        out["H2"]["runs"] = _h2(rows, baseline, joint, replicates)
    return out


# ----------------------------------------------------------------------------- the null, simulated


def _null_matrix(rng: random.Random, tasks: int, quality: float, probes: int) -> list[list[float]]:
    """A plausible retain-accuracy matrix: chance before learning, learned to ~quality, decaying after, scored
    on `probes` probes (accuracy steps of 1/probes)."""
    def q(x: float) -> float:
        return round(min(1.0, max(0.0, x)) * probes) / probes

    R = [[q(0.1 + rng.gauss(0, 0.03)) for _ in range(tasks)]]
    for i in range(1, tasks + 1):
        row = []
        for j in range(tasks):
            if j == i - 1:
                row.append(q(quality + rng.gauss(0, 0.08)))
            elif j < i - 1:
                row.append(q(R[-1][j] - abs(rng.gauss(0.06, 0.05)) + rng.gauss(0, 0.04)))
            else:
                row.append(q(0.1 + rng.gauss(0, 0.03)))
        R.append(row)
    return R


def simulate_null(n: int, sims: int = 1000, seed: int = 0, tasks: int = 4, streams: int = 2, probes: int = 20,
                  effect: float = 0.0, min_n: int = MIN_N) -> float:
    """Share of "supported" H2 verdicts (ΔF predicted < 0) when arm and baseline are the same process (effect
    0; otherwise `effect` is added to the arm's forgetting): n replicates per arm, each with its own model
    quality (a replicate effect) and `streams` nested continual streams; forgetting_chaudhry of simulated
    matrices, averaged per replicate (by_unit), paired per replicate (diff_stats) and judged by `verdict`
    (with `min_n`), the functions the report uses."""
    rng = random.Random(seed)
    hits = 0
    for _ in range(sims):
        arms = []
        for _arm in range(2):
            per_stream = {}
            for r in range(n):
                quality = 0.75 + rng.gauss(0, 0.08)  # the replicate (pretraining seed) effect
                for s in range(streams):
                    per_stream[(r, s)] = M.forgetting_chaudhry(_null_matrix(rng, tasks, quality, probes))
            arms.append(by_unit(per_stream, {k: k[0] for k in per_stream}))
        arm = {u: v + effect for u, v in arms[0].items()}
        hits += verdict(diff_stats(arm, arms[1]), -1, min_n=min_n) == "supported"
    return hits / sims


# ----------------------------------------------------------------------------- markdown


def _fmt(s: dict) -> str:
    if not s or s.get("mean") is None or math.isnan(s["mean"]):
        return "–"
    if s["n"] > 1 and not math.isnan(s["ci_low"]):
        return f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"
    return f"{s['mean']:.3f}"


def evidence_markdown(ev: dict, hypotheses: Sequence[str] = ("H1", "H2", "H3")) -> list[str]:
    """The "H1/H2/H3 evidence" section of a report (of the `hypotheses` named: "## H3 evidence" for ("H3",))."""
    md = [f"## {'/'.join(hypotheses)} evidence", "",
          f"Each verdict is computed, never written by hand (`topocl/analysis/evidence.py`, docs/protocol.md): "
          f"{ev['rule']}.", ""]
    for h in hypotheses:
        md += [f"### {h}: {ev[h]['statement']}", ""]
        if not ev[h]["runs"]:
            md += ["No run has the artifacts this needs "
                   + {"H1": "(run with `analysis.telemetry=true`).",
                      "H2": "(name the dense baseline: `--baseline RUN`).",
                      "H3": "(run `topocl analyze` on a run with `analysis.keep_task_checkpoints=true`)."}[h], ""]
            continue
        md += ["| run | statistic | mean [95% t-CI] | n | unit | verdict | note |", "|---|---|---|---|---|---|---|"]
        for run, r in ev[h]["runs"].items():
            for i, (name, s) in enumerate(r["stats"].items()):
                md.append(f"| {run if i == 0 else ''} | {name} | {_fmt(s)} | {s.get('n', 0)} | "
                          f"{r.get('unit', '') if i == 0 else ''} | {r['verdict'] if i == 0 else ''} | "
                          f"{r['note'] if i == 0 else ''} |")
        md.append("")
    return md
