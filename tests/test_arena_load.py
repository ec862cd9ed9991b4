"""Load test: concurrent simulated players against `topocl arena serve` in a subprocess on loopback, with the
server's default rate limit (the README's pair of commands). Every acknowledged vote must be in the database
(none lost, repeats not double-counted); requests the rate limit refuses are reported as refused, not lost;
p95 page latency is reported (printed; asserted only loosely, the CI machine is shared)."""

import json
import os
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
from arena_util import free_port  # noqa: E402

from topocl.arena.cli import ratings_export  # noqa: E402
from topocl.arena.loadtest import player_addresses, run_load  # noqa: E402

PLAYERS, TURNS = 12, 3


def test_player_addresses():
    assert player_addresses("http://127.0.0.1:8000", 3) == (
        ["127.0.0.2", "127.0.0.3", "127.0.0.4"] if sys.platform.startswith("linux") else [None] * 3)
    assert player_addresses("http://127.0.0.1:8000", 300)[-1] in ("127.0.1.45", None)
    assert player_addresses("http://127.0.0.1:8000", 2, one_address=True) == [None, None]
    assert player_addresses("http://example.org", 2) == [None, None]


def test_readme_pair_loses_no_votes_and_refusals_are_not_losses(tmp_path):
    port = free_port()
    db = f"sqlite:///{tmp_path / 'arena.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "topocl", "arena", "serve", "--db", db, "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        report = run_load(url, players=PLAYERS, turns=TURNS)  # default server limits, as in the README
        crowd = run_load(url, players=PLAYERS, turns=TURNS, one_address=True)  # one address: throttled
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    print("\narena load test:", json.dumps(report), "\none address:", json.dumps(crowd))
    assert report["server_posts_per_minute"] == 30 and report["client_addresses"] == PLAYERS
    assert report["errors"] == report["requests_refused"] == report["votes_lost"] == 0, out[-2000:]
    assert report["votes_ok"] == report["votes_expected"] == report["votes_gained"] == PLAYERS * TURNS
    assert crowd["requests_refused"] > 0 and crowd["votes_refused"] > 0  # ~114 POSTs from one address
    assert crowd["votes_lost"] == crowd["errors"] == 0 and crowd["votes_gained"] == crowd["votes_ok"]
    assert crowd["votes_ok"] + crowd["votes_refused"] == PLAYERS * TURNS
    assert len(ratings_export(db, rounds=5)["votes"]) == PLAYERS * TURNS + crowd["votes_ok"]  # the database
    assert report["p95_ms"] < 5000
