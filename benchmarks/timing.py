"""Timing helpers shared by the benchmarks: every variant in one process, interleaved rounds, median per-round
ratios to a baseline, and an idle check that refuses to print figures from a busy machine unless told.

Why: load from other processes hits whatever runs at that moment, so one process per variant (or all rounds of
one variant, then the next) lets load land on the variants unequally; within one round the variants run
back to back under nearly the same load, so the ratio of their times is stable even when the times are not
(load squeezes ratios toward 1 when it slows the common part, so an idle machine is still the reference).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def machine_load() -> dict[str, float]:
    """1- and 5-minute load averages and the CPU count (the idle test compares the first with the last)."""
    load1, load5, _ = os.getloadavg()
    return {"load1": load1, "load5": load5, "cpus": os.cpu_count() or 1}


def require_idle(max_load: float, allow_busy: bool) -> dict[str, float]:
    """The load before the run; exits (status 2) when the 1-minute load is above `max_load` per CPU, unless
    `allow_busy` (then the figures are printed with the load they were measured under)."""
    load = machine_load()
    load["idle"] = load["load1"] <= max_load * load["cpus"]
    if not load["idle"] and not allow_busy:
        print(f"machine busy: 1-min load {load['load1']:.2f} on {load['cpus']:.0f} CPUs (> {max_load} per CPU); "
              "figures from a busy machine are not comparable. Rerun when idle, or pass --allow-busy (ratios "
              "from interleaved rounds stay meaningful, absolute times do not).", file=sys.stderr)
        sys.exit(2)
    return load


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def interleaved(fns: dict[str, Callable[[], None]], base: str, rounds: int,
                sync: Callable[[], None] = lambda: None) -> dict[str, dict[str, float]]:
    """Time every fn once per round (one warm-up call each first), the order rotated every round.
    Returns {name: {ms: median time, ratio: median over rounds of time / base's time in the same round,
    ratio_min, ratio_max}}."""
    names = list(fns)
    for name in names:
        fns[name]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name in names:
        ratios = [a / b for a, b in zip(times[name], times[base])]
        out[name] = {"ms": 1000 * statistics.median(times[name]), "ratio": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios)}
    return out
