"""Simulated concurrent players against a running arena (loopback): each plays a session of `turns` turns
and votes on every one; reports how many votes the server acknowledged and gained, and page latency."""

from __future__ import annotations

import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def _play(url: str, turns: int, seed: int, latencies: dict[str, list[float]], lock: threading.Lock) -> dict:
    rng = random.Random(seed)
    out = {"votes_ok": 0, "errors": 0}
    with httpx.Client(base_url=url, timeout=60.0) as c:
        def get(path: str) -> str:
            t0 = time.perf_counter()
            r = c.get(path)
            dt = time.perf_counter() - t0
            kind = "leaderboard" if path == "/leaderboard" else "session" if path.startswith("/s/") else "index"
            with lock:
                latencies.setdefault(kind, []).append(dt)
            r.raise_for_status()
            return r.text

        try:
            csrf = CSRF.search(get("/")).group(1)
            r = c.post("/sessions", data={"csrf": csrf, "world": f"campaign:{seed % 5}"})
            sid = r.headers["location"].rsplit("/", 1)[-1]
            get(f"/s/{sid}")
            for t in range(turns):
                r = c.post(f"/s/{sid}/turns", data={"csrf": csrf, "text": f"Player {seed} acts, turn {t}."})
                if r.status_code != 303:
                    out["errors"] += 1
                    continue
                get(f"/s/{sid}")
                outcome = rng.choice(["a", "b", "tie", "both_bad"])
                for _ in range(1 + (t % 2)):  # every other vote is sent twice: the repeat must be a no-op
                    r = c.post(f"/s/{sid}/turns/{t}/vote", data={"csrf": csrf, "outcome": outcome})
                if r.status_code == 303:
                    out["votes_ok"] += 1
                else:
                    out["errors"] += 1
                get(f"/s/{sid}")
            c.post(f"/s/{sid}/finish", data={"csrf": csrf})
            get("/leaderboard")
        except (httpx.HTTPError, AttributeError, KeyError):
            out["errors"] += 1
    return out


def run_load(url: str, players: int = 8, turns: int = 3) -> dict:
    """Play `players` sessions at once; votes_gained (from /api/ratings) must equal votes_ok."""
    before = httpx.get(f"{url}/api/ratings", timeout=60.0).json()["votes_recorded"]
    latencies: dict[str, list[float]] = {}
    lock = threading.Lock()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(players) as ex:
        results = list(ex.map(lambda i: _play(url, turns, i, latencies, lock), range(players)))
    wall = time.perf_counter() - t0
    after = httpx.get(f"{url}/api/ratings", timeout=60.0).json()["votes_recorded"]
    lat = sorted(x for xs in latencies.values() for x in xs)

    def q(xs: list[float], p: float) -> float:
        xs = sorted(xs)
        return round(1000.0 * xs[min(len(xs) - 1, int(p * len(xs)))], 1) if xs else float("nan")

    return {"players": players, "turns": turns, "votes_expected": players * turns,
            "votes_ok": sum(r["votes_ok"] for r in results), "votes_gained": after - before,
            "errors": sum(r["errors"] for r in results), "pages": len(lat), "p50_ms": q(lat, 0.50),
            "p95_ms": q(lat, 0.95), "max_ms": q(lat, 1.0),
            "p95_ms_by_page": {k: q(v, 0.95) for k, v in sorted(latencies.items())}, "wall_s": round(wall, 2)}
