"""The capacity study's estimator, fitted laws and report; reads only the study's artifacts (cells.jsonl,
activations.jsonl, cost.json, config.yaml) and writes STUDY/report/{report.md, capacity.json, *.png}.

    capacity(S, θ)           = max { n·d : S(n, d) >= θ }            (0 when no cell passes)
    capacity_monotone(S, θ)  = max { L : S(n, d) >= θ for every cell with n·d <= L }   (the stricter reading
                               "the retained fraction *stays* above θ up to L"; 0 when the smallest load fails)

Capacity is computed per pretraining seed from that seed's surface; tables give the mean and a 95% percentile
bootstrap CI over seeds. Candidate laws for the retained surface r(n, d) are all fitted (least squares on the
seed-mean surface, several starts) and ranked by AIC = N ln(RSS/N) + 2k; none is assumed. A law with k >= N
parameters is not fitted (N = cells).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from topocl.metrics import bootstrap_ci

Surface = dict[tuple[int, int], float]


# ----------------------------------------------------------------------------- estimator


def capacity(surface: Surface, threshold: float) -> int:
    """Largest load n·d among the cells whose retained fraction is >= threshold; 0 when none is."""
    return max((n * d for (n, d), r in surface.items() if r >= threshold), default=0)


def capacity_monotone(surface: Surface, threshold: float) -> int:
    """Largest load L such that every cell with n·d <= L has a retained fraction >= threshold."""
    best = 0
    for load in sorted({n * d for n, d in surface}):
        if any(r < threshold for (n, d), r in surface.items() if n * d == load):
            break
        best = load
    return best


def surfaces(cells: list[dict], model: str) -> dict[int, Surface]:
    """seed -> {(n, d): retained} of one model."""
    out: dict[int, Surface] = {}
    for c in cells:
        if c["model"] == model:
            out.setdefault(c["seed"], {})[(c["n"], c["d"])] = c["retained"]
    return out


def mean_surface(per_seed: dict[int, Surface]) -> Surface:
    keys = sorted({k for s in per_seed.values() for k in s})
    return {k: sum(s[k] for s in per_seed.values() if k in s) / sum(k in s for s in per_seed.values())
            for k in keys}


def diff_ci(a: list[float], b: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """mean(b) - mean(a) and its 95% percentile bootstrap CI, seeds resampled independently in each group."""
    rng = random.Random(seed)
    diff = sum(b) / len(b) - sum(a) / len(a)
    boots = sorted(sum(rng.choices(b, k=len(b))) / len(b) - sum(rng.choices(a, k=len(a))) / len(a)
                   for _ in range(n_boot))
    return diff, boots[int(0.025 * n_boot)], boots[min(n_boot - 1, int(0.975 * n_boot))]


# ----------------------------------------------------------------------------- laws

def _ex(x):
    return torch.exp(x.clamp(-60.0, 60.0))  # exp that cannot overflow into inf / NaN during a line search


# name -> (formula, k, r(θ, n, d)); θ unconstrained (positive quantities as exp)
LAWS: dict[str, tuple[str, int, Callable]] = {
    "product": ("r = A / (1 + (n·d / K)^b)", 3,
                lambda p, n, d: p[0] / (1 + _ex(_ex(p[2]) * ((n * d).log() - p[1])))),
    "separable": ("r = A / (1 + exp(a·ln n + b·ln d - c))", 4,
                  lambda p, n, d: p[0] / (1 + _ex(p[1] * n.log() + p[2] * d.log() - p[3]))),
    "tasks_only": ("r = A / (1 + (n / K)^b)", 3,
                   lambda p, n, d: p[0] / (1 + _ex(_ex(p[2]) * (n.log() - p[1])))),
    "depth_only": ("r = A / (1 + (d / K)^b)", 3,
                   lambda p, n, d: p[0] / (1 + _ex(_ex(p[2]) * (d.log() - p[1])))),
    "exponential": ("r = A · exp(-n·d / K)", 2, lambda p, n, d: p[0] * _ex(-(n * d) / _ex(p[1]))),
    "constant": ("r = A", 1, lambda p, n, d: p[0] + 0 * n),
}


def readable(law: str, p: list[float]) -> dict[str, float]:
    """The fitted parameters under their formula names."""
    if law in ("product", "tasks_only", "depth_only"):
        return {"A": p[0], "K": math.exp(p[1]), "b": math.exp(p[2])}
    if law == "separable":
        return {"A": p[0], "a": p[1], "b": p[2], "c": p[3]}
    if law == "exponential":
        return {"A": p[0], "K": math.exp(p[1])}
    return {"A": p[0]}


def fit_law(law: str, points: list[tuple[int, int, float]]) -> dict | None:
    """Least-squares fit of LAWS[law] to (n, d, r) points from several starts; None when k >= N."""
    formula, k, f = LAWS[law]
    if k >= len(points):
        return None
    n = torch.tensor([float(p[0]) for p in points], dtype=torch.float64)
    d = torch.tensor([float(p[1]) for p in points], dtype=torch.float64)
    r = torch.tensor([p[2] for p in points], dtype=torch.float64)
    loads = sorted({float(a * b) for a, b, _ in points})
    log_loads = [math.log(loads[i]) for i in sorted({0, len(loads) // 2, len(loads) - 1})]  # K starts: min, mid, max
    starts = [[1.0, lk, lb, 0.0][:k] if law != "separable" else [1.0, 1.0, 1.0, lk] for lk in log_loads
              for lb in (0.0, 1.0)]
    if law == "exponential":
        starts = [[1.0, lk] for lk in log_loads]
    best = None
    for s in starts:
        p = torch.tensor(s[:k], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([p], max_iter=100, max_eval=150, tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def closure(opt=opt, p=p):
            opt.zero_grad()
            loss = (f(p, n, d) - r).square().sum()
            loss.backward()
            return loss

        try:
            opt.step(closure)
        except RuntimeError:
            continue
        with torch.no_grad():
            rss = float((f(p, n, d) - r).square().sum())
        if math.isfinite(rss) and (best is None or rss < best[0]):
            best = (rss, p.detach().clone())
    if best is None:
        return None
    rss, p = best
    with torch.no_grad():
        resid = (r - f(p, n, d)).tolist()
    big_n = len(points)
    return {"law": law, "formula": formula, "k": k, "params": readable(law, p.tolist()), "rss": rss,
            "rmse": math.sqrt(rss / big_n), "aic": big_n * math.log(max(rss, 1e-12) / big_n) + 2 * k,
            "residuals": [{"n": a, "d": b, "r": c, "residual": e} for (a, b, c), e in zip(points, resid)]}


def fit_laws(surface: Surface) -> list[dict]:
    """Every identifiable law fitted to the surface, best (lowest AIC) first, with ΔAIC."""
    points = [(n, d, r) for (n, d), r in sorted(surface.items())]
    fits = [x for law in LAWS if (x := fit_law(law, points)) is not None]
    fits.sort(key=lambda x: x["aic"])
    for x in fits:
        x["delta_aic"] = x["aic"] - fits[0]["aic"]
    return fits


def fit_rho(points: list[tuple[float, float]]) -> list[dict]:
    """Capacity vs ρ of the single-regime models: C = a·ρ^b (on C > 0), C = a + b·ln ρ, C = a; best RSS first."""
    out = []
    xs = [math.log(r) for r, _ in points]
    ys = [c for _, c in points]
    for name, k, x, y in (("power: C = a·ρ^b", 2, [xs[i] for i, c in enumerate(ys) if c > 0],
                           [math.log(c) for c in ys if c > 0]),
                          ("log-linear: C = a + b·ln ρ", 2, xs, ys), ("constant: C = a", 1, xs, ys)):
        if len(x) <= k:
            continue
        a_mat = torch.tensor([[1.0, v][:k] for v in x], dtype=torch.float64)
        coef = torch.linalg.lstsq(a_mat, torch.tensor(y, dtype=torch.float64).unsqueeze(1)).solution.squeeze(1)
        pred = (a_mat @ coef).tolist()
        if name.startswith("power"):  # residuals in capacity units
            pred, y = [math.exp(v) for v in pred], [math.exp(v) for v in y]
            coef = torch.tensor([math.exp(coef[0]), coef[1]])
        rss = sum((a - b) ** 2 for a, b in zip(y, pred))
        out.append({"law": name, "params": dict(zip("ab", coef.tolist())), "rss": rss, "n_points": len(x),
                    "residuals": [a - b for a, b in zip(y, pred)]})
    return sorted(out, key=lambda x: x["rss"] / max(1, x["n_points"] - len(x["params"])))


# ----------------------------------------------------------------------------- report


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def summarize(study: Path) -> dict:
    """Everything the report states, as JSON-ready numbers."""
    cfg = yaml.safe_load((study / "config.yaml").read_text())
    cells = _jsonl(study / "cells.jsonl")
    thr = cfg["threshold"]
    models: dict[str, dict] = {}
    for c in cells:
        models.setdefault(c["model"], {"system": c["system"], "rho": c["rho"], "params": c["params"]})
    for name, m in models.items():
        per_seed = surfaces(cells, name)
        caps = [capacity(s, thr) for s in per_seed.values()]
        mono = [capacity_monotone(s, thr) for s in per_seed.values()]
        held = [max(r * n * d for (n, d), r in s.items()) for s in per_seed.values()]
        m.update(seeds=sorted(per_seed), capacity=caps, capacity_ci=bootstrap_ci(caps),
                 capacity_monotone=mono, capacity_monotone_ci=bootstrap_ci(mono), held_facts_ci=bootstrap_ci(held),
                 surface={f"{n}x{d}": r for (n, d), r in mean_surface(per_seed).items()},
                 fits=fit_laws(mean_surface(per_seed)))
    singles = {k: m for k, m in models.items() if m["system"] == "single"}
    out: dict = {"threshold": thr, "models": models, "cells": len(cells),
                 "warmup": int(cfg.get("stream_options", {}).get("warmup_tasks", 0))}
    if singles:
        best = max(singles, key=lambda k: singles[k]["capacity_ci"][0])
        out["best_single"] = best
        out["two_vs_best_single"] = {k: {"diff": diff_ci(singles[best]["capacity"], m["capacity"]),
                                         "params_ratio": m["params"] / singles[best]["params"]}
                                     for k, m in models.items() if m["system"] == "two"}
        out["rho_fits"] = fit_rho([(m["rho"], m["capacity_ci"][0]) for m in singles.values()])
    acts = _jsonl(study / "activations.jsonl")
    table: dict[tuple[str, str], dict[str, list[float]]] = {}
    for a in acts:
        for k, v in a.items():
            if isinstance(v, float) and k != "rho":
                table.setdefault((a["model"], a["stage"]), {}).setdefault(k, []).append(v)
    out["activations"] = [{"model": m, "stage": s, **{k: sum(v) / len(v) for k, v in vals.items()},
                           "seeds": len(next(iter(vals.values())))} for (m, s), vals in sorted(table.items())]
    cost = json.loads((study / "cost.json").read_text()) if (study / "cost.json").is_file() else {"stages": []}
    out["cost"] = cost["stages"]
    return out


def plots(summary: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = summary["models"]
    names = []
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.2), squeeze=False, layout="constrained")
    for ax, (name, m) in zip(axes.flat, models.items()):
        keys = [tuple(map(int, k.split("x"))) for k in m["surface"]]
        ns, ds = sorted({k[0] for k in keys}), sorted({k[1] for k in keys})
        grid = [[m["surface"].get(f"{n}x{d}", math.nan) for d in ds] for n in ns]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
        ax.set_xticks(range(len(ds)), ds)
        ax.set_yticks(range(len(ns)), ns)
        ax.set_xlabel("d (facts per task)")
        ax.set_ylabel("n (tasks)")
        ax.set_title(f"{name} (seeds {len(m['seeds'])})", fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="retained fraction (chance-corrected)")
    fig.savefig(out / "heatmaps.png", dpi=110)
    plt.close(fig)
    names.append("heatmaps.png")

    fig, ax = plt.subplots(figsize=(5, 3.4), layout="constrained")
    singles = sorted((m["rho"], m["capacity_ci"]) for m in models.values() if m["system"] == "single")
    if singles:
        ax.errorbar([r for r, _ in singles], [c[0] for _, c in singles],
                    yerr=[[c[0] - c[1] for _, c in singles], [c[2] - c[0] for _, c in singles]], marker="o",
                    capsize=3, label="single regime (k-WTA at ρ)")
    for i, (name, m) in enumerate((k, v) for k, v in models.items() if v["system"] == "two"):
        mean, lo, hi = m["capacity_ci"]
        ax.axhline(mean, color=f"C{i + 1}", ls="--", label=f"{name} (two systems)")
        ax.axhspan(lo, hi, color=f"C{i + 1}", alpha=0.12)
    ax.set_xscale("log")
    ax.set_xlabel("ρ (active fraction)")
    ax.set_ylabel(f"capacity: largest n·d with retained ≥ {summary['threshold']}")
    ax.legend(fontsize=7)
    fig.savefig(out / "capacity_vs_rho.png", dpi=110)
    plt.close(fig)
    names.append("capacity_vs_rho.png")
    return names


def _fmt_ci(ci) -> str:
    return f"{ci[0]:.1f} [{ci[1]:.1f}, {ci[2]:.1f}]"


def write_report(study: str | Path) -> Path:
    study = Path(study)
    out = study / "report"
    out.mkdir(exist_ok=True)
    s = summarize(study)
    (out / "capacity.json").write_text(json.dumps(s, indent=1))
    if not s["models"]:
        (out / "report.md").write_text("# Capacity study\n\nNo grid cell has finished yet.\n")
        return out / "report.md"
    figs = plots(s, out)
    thr = s["threshold"]
    lines = ["# Capacity study", "", f"Threshold θ = {thr} on the chance-corrected retained fraction; mean and 95% "
             "bootstrap CI over pretraining seeds. Generated by `topocl capacity` from cells.jsonl "
             "(reports only read artifacts).", "",
             "| model | system | ρ | params | seeds | capacity | capacity (monotone) | max facts held |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in s["models"].items():
        lines.append(f"| {name} | {m['system']} | {m['rho'] if m['system'] == 'single' else '-'} | {m['params']:,} | "
                     f"{len(m['seeds'])} | {_fmt_ci(m['capacity_ci'])} | {_fmt_ci(m['capacity_monotone_ci'])} | "
                     f"{_fmt_ci(m['held_facts_ci'])} |")
    if s.get("two_vs_best_single"):
        lines += ["", f"Two-system models vs the best single-regime model ({s['best_single']}), capacity difference "
                  "(two - single) with a 95% bootstrap CI:", ""]
        for name, x in s["two_vs_best_single"].items():
            d, lo, hi = x["diff"]
            lines.append(f"- {name}: {d:+.1f} [{lo:+.1f}, {hi:+.1f}] (parameters ×{x['params_ratio']:.3f})")
    if s.get("rho_fits"):
        lines += ["", "Capacity vs ρ, candidate laws (best first by residual variance):", ""]
        for f in s["rho_fits"]:
            lines.append(f"- {f['law']}: {', '.join(f'{k}={v:.3g}' for k, v in f['params'].items())}; RSS "
                         f"{f['rss']:.3g} on {f['n_points']} points; residuals "
                         f"{', '.join(f'{r:+.2g}' for r in f['residuals'])}")
    lines += ["", "## Fitted laws of the retained surface (seed-mean), ranked by AIC", ""]
    for name, m in s["models"].items():
        if not m["fits"]:
            lines.append(f"- {name}: too few cells to fit any law")
            continue
        b = m["fits"][0]
        others = ", ".join(f"{f['law']} ΔAIC {f['delta_aic']:.1f}" for f in m["fits"][1:])
        lines.append(f"- {name}: **{b['law']}** `{b['formula']}` with "
                     f"{', '.join(f'{k}={v:.3g}' for k, v in b['params'].items())} ({b['k']} parameters), RMSE "
                     f"{b['rmse']:.3f} on {len(b['residuals'])} cells; max |residual| "
                     f"{max(abs(r['residual']) for r in b['residuals']):.3f}. Others: {others or 'none fitted'}")
    if s["activations"]:
        lines += ["", "## FFN activation statistics (answer sites of the probes; seed mean)", "",
                  "| model | stage | active frac | near-zero frac (all tokens) | Jaccard within task | "
                  "Jaccard between tasks | usage overlap |", "|---|---|---|---|---|---|---|"]
        for a in s["activations"]:
            lines.append(f"| {a['model']} | {a['stage']} | {a['active_frac']:.3f} | {a['ffn_frac_near_zero']:.3f} | "
                         f"{a['jaccard_within']:.3f} | {a['jaccard_between']:.3f} | {a['usage_overlap']:.3f} |")
    if s["cost"]:
        pre = [c["wall_s"] for c in s["cost"] if c["stage"] == "pretrain"]
        cont = [c for c in s["cost"] if c["stage"] == "continual"]
        lines += ["", "## Measured cost (wall seconds on this study's device)", ""]
        if pre:
            lines.append(f"- pretraining: mean {sum(pre) / len(pre):.0f} s over {len(pre)} runs")
        for c in sorted(cont, key=lambda c: (c["model"], c["seed"], c["d"])):
            w = c.get("warmup", s["warmup"])
            lines.append(f"- stream {c['model']} s{c['seed']} d={c['d']} ({c['n'] + w} tasks incl. {w} "
                         f"warm-up × {c['steps_per_task']} steps, evaluations included): {c['wall_s']:.0f} s")
    lines += ["", *[f"![{f}]({f})" for f in figs], ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
