"""`topocl arena serve | ratings | loadtest | simulate`.

    topocl arena serve   [--db URL] [--models CONFIG | --preset NAME] [--run-dir DIR] [--host H] [--port P]
                         [--admin-token T] [--catch-rate R]
    topocl arena ratings [--db URL] [--run-dir DIR] [--format json|csv] [--rounds N] [--out FILE]
    topocl arena loadtest URL [--players N] [--turns T] [--one-address]
    topocl arena simulate [--preset NAME | --models CONFIG] [--sessions S] [--turns T] [--out DIR]

Without --db the database is SQLite at RUN_DIR/arena.db (default run directory runs/arena); learners keep
per-session weights in RUN_DIR/learner_state. Without --models or --preset the arena serves two scripted
demo models; --preset smollm2 serves SmolLM2-135M-Instruct as four learning game masters (configs/arena/).
`ratings --format json` prints the leaderboard, the proxy agreement and every vote; `--format csv` prints
the votes table, a blank line and the ratings table (with --out FILE: the votes to FILE, the ratings to
FILE with suffix .ratings.csv).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path


def db_url(args: argparse.Namespace) -> str:
    if args.db:
        return args.db
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{run_dir / 'arena.db'}"


PRESETS = Path(__file__).resolve().parents[2] / "configs" / "arena"


def model_specs(args: argparse.Namespace) -> list:
    """--models YAML, or --preset NAME (configs/arena/NAME.yaml), or the two scripted demo models."""
    from topocl.arena.serving import demo_specs, load_specs

    if args.models and args.preset:
        raise SystemExit("give --models or --preset, not both")
    if args.preset:
        path = PRESETS / f"{args.preset}.yaml"
        if not path.is_file():
            names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
            raise SystemExit(f"no arena preset {args.preset!r} ({path}); presets: {names}")
        return load_specs(path)
    return load_specs(args.models) if args.models else demo_specs()


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from topocl.arena.app import ArenaSettings, create_app

    specs = model_specs(args)
    token = args.admin_token or os.environ.get("ARENA_ADMIN_TOKEN", "")
    settings = ArenaSettings(db_url=db_url(args), specs=specs, admin_token=token, secure_cookies=args.secure_cookies,
                             posts_per_minute=args.posts_per_minute, requests_per_minute=args.requests_per_minute,
                             catch_rate=args.catch_rate, state_dir=str(Path(args.run_dir) / "learner_state"))
    app = create_app(settings)
    names = ", ".join(s.name for s in specs)
    print(f"arena: {len(specs)} models ({names}); database {settings.db_url}; admin page "
          f"{'on' if token else 'off'}; http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def ratings_export(url: str, rounds: int = 200) -> dict:
    """Leaderboard, proxy agreement and all votes of the database at `url` (plain JSON types)."""
    from topocl.arena.board import board_data, json_clean
    from topocl.arena.db import open_db
    from topocl.arena.service import all_votes, as_rating_votes

    engine, factory = open_db(url)
    with factory() as db:
        rows = all_votes(db)
    engine.dispose()
    votes = as_rating_votes(rows)
    board = json_clean(board_data(votes, sorted({m for v in votes for m in (v.model_a, v.model_b)}), rounds=rounds))
    return {"ratings": board["rows"], "agreement": board["agreement"], "length_coef": board["length_coef"],
            "robustness": board["robustness"],
            "votes": [{"id": r.id, "session_id": r.session_id, "turn_idx": r.turn_idx, "outcome": r.outcome,
                       "model_a": r.model_a, "model_b": r.model_b, "proxy_a": r.proxy_a, "proxy_b": r.proxy_b,
                       "created_at": r.created_at.isoformat()} for r in rows]}


def _table_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def _ratings(args: argparse.Namespace) -> int:
    data = ratings_export(db_url(args), args.rounds)
    if args.format == "json":
        text = json.dumps(data, indent=2)
        if args.out:
            Path(args.out).write_text(text + "\n")
        else:
            print(text)
        return 0
    votes, board = _table_csv(data["votes"]), _table_csv(data["ratings"])
    if args.out:
        out = Path(args.out)
        out.write_text(votes)
        out.with_suffix(".ratings.csv").write_text(board)
    else:
        sys.stdout.write(votes + "\n" + board)
    return 0


def _loadtest(args: argparse.Namespace) -> int:
    from topocl.arena.loadtest import run_load

    report = run_load(args.url, players=args.players, turns=args.turns, one_address=args.one_address)
    print(json.dumps(report, indent=2))
    if report["requests_refused"]:
        print(f"loadtest: the server's rate limit ({report['server_posts_per_minute']} POSTs/min per address) refused "
              f"{report['requests_refused']} requests, {report['votes_refused']} votes were never cast (refused, not "
              "lost); serve with --posts-per-minute 0 to take the limit off", file=sys.stderr)
    if report["votes_lost"] or report["errors"]:
        print(f"loadtest: {report['votes_lost']} acknowledged votes lost, {report['errors']} errors", file=sys.stderr)
        return 1
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from topocl.arena.simulate import simulate

    simulate(model_specs(args), args.out, sessions=args.sessions, turns=args.turns, every=args.every,
             max_probes=args.max_probes, seed=args.seed)
    print(f"simulate: {args.out}/report.md, simulate.json, recall_vs_delay.png")
    return 0


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="topocl arena", description="human-feedback arena for long role-play")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="start the web app")
    r = sub.add_parser("ratings", help="export votes and ratings")
    for q in (s, r):
        q.add_argument("--db", default="", help="SQLAlchemy URL (default: SQLite in --run-dir)")
        q.add_argument("--run-dir", default="runs/arena", help="where the default SQLite file lives")
    sim = sub.add_parser("simulate", help="scripted players drive long sessions: recall vs delay per game master")
    for q in (s, sim):
        q.add_argument("--models", default="", help="models YAML (default: two scripted demo models)")
        q.add_argument("--preset", default="", help="configs/arena/NAME.yaml, e.g. smollm2 (learning game masters)")
    sim.add_argument("--sessions", type=int, default=4)
    sim.add_argument("--turns", type=int, default=12)
    sim.add_argument("--every", type=int, default=2, help="a new fact every N turns")
    sim.add_argument("--max-probes", type=int, default=4, help="facts asked per reply")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--out", default="runs/arena/simulate")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--admin-token", default="", help="enables /admin (or set ARENA_ADMIN_TOKEN)")
    s.add_argument("--secure-cookies", action="store_true", help="mark cookies Secure (serving over HTTPS)")
    s.add_argument("--posts-per-minute", type=int, default=30,
                   help="rate limit on form posts per client address (0 = none)")
    s.add_argument("--catch-rate", type=float, default=0.1,
                   help="share of voted turns shown again with the sides swapped (vote consistency; 0 = none)")
    s.add_argument("--requests-per-minute", type=int, default=600,
                   help="rate limit on all requests per client address (0 = none)")
    r.add_argument("--format", choices=("json", "csv"), default="json")
    r.add_argument("--rounds", type=int, default=200, help="bootstrap rounds (sessions resampled)")
    r.add_argument("--out", default="", help="write here instead of stdout")
    lt = sub.add_parser("loadtest", help="simulated concurrent players against a running arena")
    lt.add_argument("url")
    lt.add_argument("--players", type=int, default=8)
    lt.add_argument("--turns", type=int, default=3)
    lt.add_argument("--one-address", action="store_true",
                    help="all players from one address (default: one loopback address each, like real players)")
    args = p.parse_args(argv)
    return {"serve": _serve, "ratings": _ratings, "loadtest": _loadtest, "simulate": _simulate}[args.cmd](args)
