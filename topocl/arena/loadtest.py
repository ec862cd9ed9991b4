"""Simulated concurrent players against a running arena: each plays a session of `turns` turns and votes on
every one; reports the votes the server acknowledged, refused (429, its per-address rate limit) and lost
(acknowledged but missing from /api/ratings), and page latency.

The server rate-limits per client address. Real players come from different addresses, so against a
loopback URL (127.x.y.z) each simulated player connects from its own loopback address (127.0.0.2, 127.0.0.3,
...; Linux routes all of 127/8 to the loopback interface); `one_address=True` sends everything from one
address, as a single abusive client would, and then the rate limit refuses most of it.
"""

from __future__ import annotations

import ipaddress
import random
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class Refused(Exception):
    """The server answered 429 (rate limit)."""


def player_addresses(url: str, players: int, one_address: bool = False) -> list[str | None]:
    """The local address each player connects from: distinct loopback addresses for a loopback IPv4 URL on
    Linux, else None (the system's choice) for everyone."""
    try:
        host = ipaddress.ip_address(urlsplit(url).hostname or "")
    except ValueError:
        host = None
    if one_address or host is None or host.version != 4 or not host.is_loopback or not sys.platform.startswith(
            "linux"):
        return [None] * players
    return [str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("127.0.0.2")) + i)) for i in range(players)]


def _play(url: str, turns: int, seed: int, address: str | None, latencies: dict[str, list[float]],
          lock: threading.Lock) -> dict:
    rng = random.Random(seed)
    out = {"votes_ok": 0, "votes_refused": 0, "requests_refused": 0, "errors": 0}
    transport = httpx.HTTPTransport(local_address=address) if address else None
    with httpx.Client(base_url=url, timeout=60.0, transport=transport) as c:
        def get(path: str) -> str:
            t0 = time.perf_counter()
            r = c.get(path)
            dt = time.perf_counter() - t0
            if r.status_code == 429:
                raise Refused
            kind = "leaderboard" if path == "/leaderboard" else "session" if path.startswith("/s/") else "index"
            with lock:
                latencies.setdefault(kind, []).append(dt)
            r.raise_for_status()
            return r.text

        def post(path: str, data: dict) -> httpx.Response:
            r = c.post(path, data=data)
            if r.status_code == 429:
                raise Refused
            return r

        voted = 0  # turns whose vote is settled (acknowledged, refused or failed)
        try:
            csrf = CSRF.search(get("/")).group(1)
            r = post("/sessions", {"csrf": csrf, "world": f"campaign:{seed % 5}"})
            sid = r.headers["location"].rsplit("/", 1)[-1]
            get(f"/s/{sid}")
            for t in range(turns):
                r = post(f"/s/{sid}/turns", {"csrf": csrf, "text": f"Player {seed} acts, turn {t}."})
                if r.status_code != 303:
                    raise httpx.HTTPStatusError(f"turn {t}: {r.status_code}", request=r.request, response=r)
                get(f"/s/{sid}")
                outcome = rng.choice(["a", "b", "tie", "both_bad"])
                r = post(f"/s/{sid}/turns/{t}/vote", {"csrf": csrf, "outcome": outcome})
                voted += 1
                if r.status_code != 303:
                    out["errors"] += 1
                    break
                out["votes_ok"] += 1
                if t % 2:  # every other vote is sent twice: the repeat must be a no-op
                    try:
                        if post(f"/s/{sid}/turns/{t}/vote", {"csrf": csrf, "outcome": outcome}).status_code != 303:
                            out["errors"] += 1
                    except Refused:
                        out["requests_refused"] += 1
                get(f"/s/{sid}")
            post(f"/s/{sid}/finish", {"csrf": csrf})
            get("/leaderboard")
        except Refused:
            out["requests_refused"] += 1
            out["votes_refused"] += turns - voted
        except (httpx.HTTPError, AttributeError, KeyError):
            out["errors"] += 1
    return out


def run_load(url: str, players: int = 8, turns: int = 3, one_address: bool = False) -> dict:
    """Play `players` sessions at once. votes_expected = votes_ok + votes_refused + votes that failed;
    votes_lost = acknowledged votes missing from the server's count (must be 0)."""
    health = httpx.get(f"{url}/healthz", timeout=60.0).json()
    before = httpx.get(f"{url}/api/ratings", timeout=60.0).json()["votes_recorded"]
    addresses = player_addresses(url, players, one_address)
    latencies: dict[str, list[float]] = {}
    lock = threading.Lock()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(players) as ex:
        results = list(ex.map(lambda i: _play(url, turns, i, addresses[i], latencies, lock), range(players)))
    wall = time.perf_counter() - t0
    after = httpx.get(f"{url}/api/ratings", timeout=60.0).json()["votes_recorded"]
    lat = sorted(x for xs in latencies.values() for x in xs)

    def q(xs: list[float], p: float) -> float:
        xs = sorted(xs)
        return round(1000.0 * xs[min(len(xs) - 1, int(p * len(xs)))], 1) if xs else float("nan")

    ok = sum(r["votes_ok"] for r in results)
    return {"players": players, "turns": turns, "client_addresses": len(set(addresses)),
            "server_posts_per_minute": health.get("posts_per_minute"), "votes_expected": players * turns,
            "votes_ok": ok, "votes_gained": after - before, "votes_lost": ok - (after - before),
            "votes_refused": sum(r["votes_refused"] for r in results),
            "requests_refused": sum(r["requests_refused"] for r in results),
            "errors": sum(r["errors"] for r in results), "pages": len(lat), "p50_ms": q(lat, 0.50),
            "p95_ms": q(lat, 0.95), "max_ms": q(lat, 1.0),
            "p95_ms_by_page": {k: q(v, 0.95) for k, v in sorted(latencies.items())}, "wall_s": round(wall, 2)}
