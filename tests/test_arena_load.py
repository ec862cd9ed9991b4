"""Load test: concurrent simulated players against `topocl arena serve` in a subprocess on loopback. Every
acknowledged vote must be in the database (none lost, repeats not double-counted); p95 page latency is
reported (printed; asserted only loosely, the CI machine is shared)."""

import json
import os
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
from arena_util import free_port  # noqa: E402

from topocl.arena.cli import ratings_export  # noqa: E402
from topocl.arena.loadtest import run_load  # noqa: E402

PLAYERS, TURNS = 12, 3


def test_concurrent_players_lose_no_votes(tmp_path):
    port = free_port()
    db = f"sqlite:///{tmp_path / 'arena.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "topocl", "arena", "serve", "--db", db, "--port", str(port),
                             "--posts-per-minute", "100000", "--requests-per-minute", "100000"],
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
        report = run_load(url, players=PLAYERS, turns=TURNS)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    print("\narena load test:", json.dumps(report))
    assert report["errors"] == 0, out[-2000:]
    assert report["votes_ok"] == report["votes_expected"] == report["votes_gained"] == PLAYERS * TURNS
    assert len(ratings_export(db, rounds=5)["votes"]) == PLAYERS * TURNS  # what the database holds
    assert report["p95_ms"] < 5000
