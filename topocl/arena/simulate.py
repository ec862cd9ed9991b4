"""`topocl arena simulate`: the machine-judged counterpart of the human leaderboard.

A scripted player drives `sessions` long sessions of `turns` turns through every game master on its own
(each GM's replies become its own story, as the winner's would in the arena). The worlds are campaign worlds
(`topocl.arena.proxies.campaign_world`, seed = session): a new fact arrives as a GM note every `every` turns.
After each reply the recall proxy asks, by candidate log-likelihood with the GM's own prompt + reply in
context (topocl.evaluate.score_probes), about at most `max_probes` facts introduced earlier *by a GM note*
(the premise's facts are always in the prompt and are left out), drawn per (session, turn). A fact
introduced at turn e and asked at turn t has delay d = t - e; with context_turns K > 0 it is in the
prompt while d <= K, and only in the weights (if anywhere) beyond. Learners learn synchronously after
every `learn_every` turns, exactly as the arena's worker does.

Every GM plays the same sessions: session s has the same world, the same player lines and, per turn, the same
facts asked, so a learner is compared with the context-only model (`arm: none`) paired by session: the
difference of their recall beyond the window, per session, with a bootstrap interval over sessions. Chance is
the mean of 1 / (number of candidates) over the probes asked: the recall of a model that guesses.

Output (out_dir): simulate.json (per GM: recall per delay with 95% percentile intervals from 1000 bootstrap
resamples of sessions, recall within / beyond the window and its chance level, the paired difference to the
context-only model, mean reply ms, seconds per learning step, bytes of per-session state, and every session's
raw (delay, correct, chance) triples), recall_vs_delay.png and report.md.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from topocl.arena.pool import ModelPool
from topocl.arena.proxies import campaign_world, in_context, render_prompt
from topocl.arena.serving import ModelSpec
from topocl.tasks.base import Probe

PLAYER_LINES = ["I look around the common room and listen.", "I ask the innkeeper what news there is.",
                "We pack our things and take the road north.", "I ask Mira what she remembers of the last nights.",
                "We make camp and I keep the first watch.", "I ask Arlen who carried what, and to whom.",
                "I study the old map by the fire.", "We reach the next village and look for work."]


def session_id(s: int) -> str:
    return format(s + 1, "032x")


def ci(values: list[float], rounds: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile of bootstrap means) over per-session values."""
    xs = np.asarray(values, dtype=float)
    if len(xs) == 0:
        return float("nan"), float("nan"), float("nan")
    means = np.random.default_rng(seed).choice(xs, (rounds, len(xs))).mean(1)
    return float(xs.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def play(pool: ModelPool, name: str, s: int, turns: int, every: int, max_probes: int, seed: int,
         bar: tqdm | None = None) -> dict:
    """One session of one GM: per probe asked (delay, correct, chance); reply ms; learning step seconds."""
    spec, backend = pool.specs[name], pool.backends[name]
    world = campaign_world(seed + s, sessions=turns // every + 1, every=every)
    sid, history, hits, ms, learn = session_id(s), [], [], [], []
    if spec.kind == "learner":
        backend.story = lambda _sid: (world, seed + s, history)
    rng = random.Random(f"{seed}/{s}")
    for t in range(turns):
        line = rng.choice(PLAYER_LINES)
        prompt = render_prompt(world, history, line, t, spec.context_turns)
        t0 = time.perf_counter()
        text, _ = backend.reply(prompt, (seed * 1_000_003 + s * 1009 + t) % 2**31, sid)
        ms.append(1000.0 * (time.perf_counter() - t0))
        asked = [(t - e["turn"], Probe(**p)) for e in world["events"] if 0 < e["turn"] < t for p in e["probes"]]
        if len(asked) > max_probes:
            asked = random.Random(f"{seed}/{s}/{t}").sample(asked, max_probes)
        if asked:
            correct = backend.score(in_context([p for _, p in asked], f"{prompt} {text}"), sid)
            hits += [(d, bool(c), 1.0 / len(p.candidates)) for (d, p), c in zip(asked, correct)]
        history.append({"player_text": line, "reply": text})
        if spec.kind == "learner" and spec.learns:
            n0 = len(backend.live.get(sid).rounds) if sid in backend.live else 0
            backend.sync(sid)
            rounds = backend.live[sid].rounds[n0:] if sid in backend.live else []
            learn += [r["seconds"] / spec.learn_steps for r in rounds]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(session=s, turn=t, reply_s=f"{ms[-1] / 1000:.1f}",
                            **({"learn_step_s": f"{learn[-1]:.1f}"} if learn else {}))
    state = 0
    if spec.kind == "learner" and backend.names and sid in backend.live:
        st = backend.live[sid]
        state = sum(t.numel() * t.element_size() for t in st.weights.values())
        for v in (st.optim or {}).get("state", {}).values():
            state += sum(x.numel() * x.element_size() for x in v.values() if hasattr(x, "numel") and x.dim() > 0)
    if spec.kind == "learner":
        backend.end(sid)
    return {"hits": hits, "ms": ms, "learn": learn, "state_bytes": state}


def summarise(runs: list[dict], k: int) -> dict:
    delays = sorted({h[0] for r in runs for h in r["hits"]})
    per_delay = {}
    for d in delays:
        vals = [np.mean([h[1] for h in r["hits"] if h[0] == d]) for r in runs if any(h[0] == d for h in r["hits"])]
        m, lo, hi = ci(vals)
        per_delay[d] = {"mean": m, "lo": lo, "hi": hi, "sessions": len(vals)}

    def part(keep) -> dict:
        vals = [np.mean(xs) for r in runs if (xs := [h[1] for h in r["hits"] if keep(h[0])])]
        m, lo, hi = ci(vals)
        chance = [h[2] for r in runs for h in r["hits"] if keep(h[0])]
        return {"mean": m, "lo": lo, "hi": hi, "sessions": len(vals),
                "chance": float(np.mean(chance)) if chance else float("nan")}

    learn = [x for r in runs for x in r["learn"]]
    return {"recall": per_delay, "within": part(lambda d: k == 0 or d <= k), "beyond": part(lambda d: k > 0 and d > k),
            "reply_ms": float(np.mean([x for r in runs for x in r["ms"]])),
            "learn_step_s": float(np.mean(learn)) if learn else None,
            "state_bytes": max(r["state_bytes"] for r in runs)}


def paired_beyond(runs: list[dict], base: list[dict], k: int) -> dict:
    """Recall beyond the window (delay > k), GM minus baseline, paired by session: (mean, 95% bootstrap
    interval, sessions) over the sessions where both were asked a fact beyond the window."""
    diffs = []
    for r, b in zip(runs, base):
        mine, theirs = [h[1] for h in r["hits"] if h[0] > k], [h[1] for h in b["hits"] if h[0] > k]
        if k > 0 and mine and theirs:
            diffs.append(float(np.mean(mine)) - float(np.mean(theirs)))
    m, lo, hi = ci(diffs)
    return {"mean": m, "lo": lo, "hi": hi, "sessions": len(diffs)}


def simulate(specs: list[ModelSpec], out_dir: str | Path, *, sessions: int = 4, turns: int = 12, every: int = 2,
             max_probes: int = 4, seed: int = 0) -> dict:
    if sessions < 1 or turns < 2 or every < 1 or max_probes < 1:
        raise ValueError(f"sessions={sessions} >= 1, turns={turns} >= 2, every={every} >= 1 and "
                         f"max_probes={max_probes} >= 1 are needed")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pool = ModelPool(specs)
    for b in pool.learners.values():
        b.root = out / "learner_state"  # synchronous learning: no worker thread
    gms, raw = {}, {}
    for name, spec in pool.specs.items():
        t0 = time.perf_counter()
        with tqdm(total=sessions * turns, desc=f"simulate {name}", unit="turn") as bar:
            raw[name] = [play(pool, name, s, turns, every, max_probes, seed, bar) for s in range(sessions)]
        gms[name] = {"kind": spec.kind, "arm": spec.arm if spec.kind == "learner" else None,
                     "context_turns": spec.context_turns, **summarise(raw[name], spec.context_turns),
                     "wall_s": time.perf_counter() - t0}
        print(f"simulate: {name}: recall within the window {gms[name]['within']['mean']:.3f}, beyond "
              f"{gms[name]['beyond']['mean']:.3f} ({time.perf_counter() - t0:.0f} s)")
    base_name = next((n for n, g in gms.items() if g["arm"] == "none"), None)
    base = gms.get(base_name)
    for name, g in gms.items():
        g["reply_ms_ratio"] = g["reply_ms"] / base["reply_ms"] if base and base["reply_ms"] > 0 else None
        same_k = base is not None and name != base_name and g["context_turns"] == base["context_turns"]
        g["beyond_vs_context_only"] = paired_beyond(raw[name], raw[base_name], g["context_turns"]) if same_k else None
        g["sessions_raw"] = [{"session": s, "hits": [list(h) for h in r["hits"]]} for s, r in enumerate(raw[name])]
    result = {"sessions": sessions, "turns": turns, "every": every, "max_probes": max_probes, "seed": seed,
              "gms": gms}
    state_dir = out / "learner_state"
    if state_dir.is_dir() and not any(state_dir.iterdir()):
        state_dir.rmdir()  # every session ended: nothing of the learners is left to keep
    (out / "simulate.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    plot(result, out / "recall_vs_delay.png")
    (out / "report.md").write_text(report(result))
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, g in result["gms"].items():
        ds = sorted(int(d) for d in g["recall"])
        rows = [g["recall"][d] if d in g["recall"] else g["recall"][str(d)] for d in ds]
        line = ax.plot(ds, [r["mean"] for r in rows], marker="o", label=name)[0]
        ax.fill_between(ds, [r["lo"] for r in rows], [r["hi"] for r in rows], alpha=0.15, color=line.get_color())
    chance = [h[2] for g in result["gms"].values() for r in g.get("sessions_raw", []) for h in r["hits"]]
    if chance:
        ax.axhline(float(np.mean(chance)), color="black", linestyle=":", linewidth=1, label="chance (guessing)")
    ks = sorted({g["context_turns"] for g in result["gms"].values() if g["context_turns"] > 0})
    for k in ks:
        ax.axvline(k + 0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("delay (turns since the fact's GM note); dashed: end of the context window")
    ax.set_ylabel("recall proxy (probe accuracy)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"{result['sessions']} sessions x {result['turns']} turns, 95% CI over sessions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(result: dict) -> str:
    lines = [f"# Arena simulation: {result['sessions']} sessions x {result['turns']} turns", "",
             "| game master | arm | K | recall within window | recall beyond window (chance) | beyond: minus "
             "context-only, paired | reply ms (x context-only) | s / learning step | state / session |",
             "|---|---|---|---|---|---|---|---|---|"]

    def fmt(p: dict | None) -> str:
        return "–" if not p or p["sessions"] == 0 else f"{p['mean']:.3f} [{p['lo']:.3f}, {p['hi']:.3f}]"

    for name, g in result["gms"].items():
        ratio = f" (x{g['reply_ms_ratio']:.2f})" if g["reply_ms_ratio"] is not None else ""
        step = f"{g['learn_step_s']:.2f}" if g["learn_step_s"] is not None else "–"
        chance = f" ({g['beyond']['chance']:.2f})" if g["beyond"]["sessions"] else ""
        lines.append(f"| {name} | {g['arm'] or g['kind']} | {g['context_turns'] or 'all'} | {fmt(g['within'])} | "
                     f"{fmt(g['beyond'])}{chance} | {fmt(g.get('beyond_vs_context_only'))} | "
                     f"{g['reply_ms']:.0f}{ratio} | {step} | {g['state_bytes'] / 2**20:.1f} MiB |")
    n = result["sessions"]
    lines += ["", f"Recall = probe accuracy (candidate log-likelihood) per session, then the mean over sessions with a "
              f"95% bootstrap interval over the {n} sessions. Every game master plays the same {n} sessions (same "
              "world, player lines and facts asked), so the paired column is the per-session difference to the "
              "context-only model's recall beyond the window. "
              + ("Descriptive only: fewer than 5 sessions." if n < 5 else
                 "An interval that excludes 0 is a difference at these sessions, not yet a verdict.")]
    return "\n".join(lines) + "\n\n![recall vs delay](recall_vs_delay.png)\n"
