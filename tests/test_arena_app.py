"""The arena web app through FastAPI's TestClient: the session flow, anonymity, one idempotent vote per turn,
CSRF, malformed requests (4xx, never 500), rate limiting, the admin page, restarts, the ratings export."""

import csv
import io
import json
import os

import pytest
from markupsafe import escape

pytest.importorskip("fastapi")
from arena_util import CSRF  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from topocl.arena.app import ArenaSettings, create_app  # noqa: E402
from topocl.arena.cli import cli as arena_cli  # noqa: E402
from topocl.arena.cli import ratings_export  # noqa: E402
from topocl.arena.db import SCHEMA_VERSION, Turn, open_db, schema_version  # noqa: E402
from topocl.arena.service import ArenaError  # noqa: E402
from topocl.arena.serving import ModelSpec, demo_specs  # noqa: E402

NAMES = ("scripted-keeper", "scripted-forgetter")


def make(tmp_path, **kw):
    settings = ArenaSettings(db_url=f"sqlite:///{tmp_path / 'arena.db'}", **kw)
    client = TestClient(create_app(settings), raise_server_exceptions=False)
    csrf = CSRF.search(client.get("/").text).group(1)
    return client, csrf


def start(client, csrf, world="campaign:0", **extra):
    r = client.post("/sessions", data={"csrf": csrf, "world": world, **extra}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return r.headers["location"].rsplit("/", 1)[-1]


def turn(client, csrf, sid, text="I open the door."):
    return client.post(f"/s/{sid}/turns", data={"csrf": csrf, "text": text}, follow_redirects=False)


def vote(client, csrf, sid, idx, outcome):
    return client.post(f"/s/{sid}/turns/{idx}/vote", data={"csrf": csrf, "outcome": outcome}, follow_redirects=False)


def test_session_flow_anonymity_and_shared_history(tmp_path):
    c, csrf = make(tmp_path)
    sid = start(c, csrf)
    seen = []
    for idx, outcome in enumerate(["a", "b", "both_bad", "tie"]):
        assert turn(c, csrf, sid, f"Action number {idx}.").status_code == 303
        page = c.get(f"/s/{sid}").text
        seen.append(page)
        assert 'data-testid="reply-a"' in page and 'data-testid="reply-b"' in page
        assert vote(c, csrf, sid, idx, outcome).status_code == 303
        seen.append(c.get(f"/s/{sid}").text)
    assert not any(n in p for p in seen for n in NAMES)  # names never shown before the end
    app = c.app
    with app.state.factory() as db:
        turns = db.query(Turn).filter_by(session_id=sid).order_by(Turn.idx).all()
    assert [t.committed for t in turns[:3]] == ["a", "b", "none"] and turns[3].committed in ("a", "b")
    page = c.get(f"/s/{sid}").text
    assert escape(turns[0].reply_a) in page and escape(turns[1].reply_b) in page
    assert "(both replies rejected)" in page
    assert "GM note:" in page  # a campaign fact introduced at turn 2
    # the next turn's prompt is built from the committed replies only
    assert all(t.proxy and t.proxy["a"]["n_probes"] >= 0 for t in turns)
    assert turns[3].proxy["a"]["n_probes"] > 0  # facts of the premise are probed from turn 1 on
    assert c.post(f"/s/{sid}/finish", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    final = c.get(f"/s/{sid}").text
    assert 'data-testid="reveal"' in final and all(n in final for n in NAMES)
    assert turn(c, csrf, sid).status_code == 409  # ended


def test_one_vote_per_turn_is_idempotent(tmp_path):
    c, csrf = make(tmp_path)
    sid = start(c, csrf)
    turn(c, csrf, sid)
    assert turn(c, csrf, sid).status_code == 409  # the last turn has no vote yet
    assert vote(c, csrf, sid, 0, "a").status_code == 303
    assert vote(c, csrf, sid, 0, "a").status_code == 303  # the same vote again: no-op
    assert vote(c, csrf, sid, 0, "b").status_code == 409  # a different vote: refused
    board = c.get("/api/ratings").json()
    assert (board["votes"], board["votes_recorded"]) == (0, 1)  # an open session's votes are not rated yet
    assert all(r["votes"] == 0 for r in board["rows"])  # ... so the board cannot reveal who sits where
    c.post(f"/s/{sid}/finish", data={"csrf": csrf})
    assert c.get("/api/ratings").json()["votes"] == 1


def test_own_premise_with_facts_and_rules(tmp_path):
    c, csrf = make(tmp_path)
    facts = "The sword is called | Emberfang | Frostbite, Nightfall\nrule: Magic is paid for with | memories | gold"
    sid = start(c, csrf, "custom", title="Harbour", premise="A rainy harbour town.", facts=facts)
    turn(c, csrf, sid)
    vote(c, csrf, sid, 0, "a")
    turn(c, csrf, sid)
    with c.app.state.factory() as db:
        t = db.query(Turn).filter_by(session_id=sid, idx=1).one()
    assert t.proxy["a"]["n_probes"] == 2 and t.proxy["a"]["recall"] in (0.0, 1.0)
    r = c.post("/sessions", data={"csrf": csrf, "world": "custom", "premise": "x", "facts": "no pipes here"})
    assert r.status_code == 422


def test_csrf_is_required(tmp_path):
    c, csrf = make(tmp_path)
    assert c.post("/sessions", data={"world": "campaign:0"}).status_code == 422  # no token
    assert c.post("/sessions", data={"csrf": "forged", "world": "campaign:0"}).status_code == 403
    other = TestClient(c.app)  # another browser: its cookie does not match this token
    assert other.post("/sessions", data={"csrf": csrf, "world": "campaign:0"}).status_code == 403


def test_malformed_requests_get_4xx_never_500(tmp_path):
    c, csrf = make(tmp_path)
    sid = start(c, csrf)
    cases = {
        "unknown session": (c.get("/s/" + "0" * 32), 404),
        "bad session id": (c.get("/s/../../etc/passwd"), 404),
        "injection-like id": (c.get("/s/1' OR '1'='1"), 404),
        "turn index not int": (c.post(f"/s/{sid}/turns/abc/vote", data={"csrf": csrf, "outcome": "a"}), 422),
        "no such turn": (vote(c, csrf, sid, 7, "a"), 404),
        "negative turn": (vote(c, csrf, sid, -1, "a"), 404),
        "bad outcome": (vote(c, csrf, sid, 0, "left"), 422),
        "empty turn": (turn(c, csrf, sid, "   "), 422),
        "turn too long": (turn(c, csrf, sid, "x" * 2500), 413),
        "body too large": (turn(c, csrf, sid, "x" * 40000), 413),  # body over max_body
        "json body to a form": (c.post(f"/s/{sid}/turns", json={"csrf": csrf, "text": "hi"}), 422),
        "wrong method": (c.get(f"/s/{sid}/turns"), 405),
        "unknown world": (c.post("/sessions", data={"csrf": csrf, "world": "campaign:99"}), 422),
        "custom without premise": (c.post("/sessions", data={"csrf": csrf, "world": "custom"}), 422),
        "unknown page": (c.get("/nope"), 404),
        "bad content length": (c.post("/sessions", content=b"a=1", headers={"content-length": "abc"}), 413),
        "admin off": (c.get("/admin"), 404),
    }
    for name, (resp, status) in cases.items():
        assert resp.status_code == status, f"{name}: {resp.status_code} {resp.text[:200]}"
    assert all(r.status_code < 500 for r, _ in cases.values())


def test_huge_turn_index_and_control_characters_are_4xx(tmp_path):
    c, csrf = make(tmp_path)
    sid = start(c, csrf)
    assert turn(c, csrf, sid).status_code == 303
    for idx in ("99999999999999999999", str(2**63), str(2**31)):
        r = c.post(f"/s/{sid}/turns/{idx}/vote", data={"csrf": csrf, "outcome": "a"})
        assert r.status_code == 404, (idx, r.status_code)
    assert vote(c, csrf, sid, 0, "a").status_code == 303
    for text in ("Hello\x00world", "bell\x07", "esc \x1b[31m red", "c1 \x85 next line"):
        r = turn(c, csrf, sid, text)
        assert r.status_code == 422 and "control character" in r.text, (text, r.status_code)
    r = turn(c, csrf, sid, "Hello\x00world")
    assert "U+0000 at character 6" in r.text
    assert turn(c, csrf, sid, "Tabs\tand\r\nnewlines are fine.").status_code == 303
    for field in ("title", "premise", "facts"):
        data = {"title": "T", "premise": "A harbour.", "facts": "", field: "evil\x00"}
        r = c.post("/sessions", data={"csrf": csrf, "world": "custom", **data})
        assert r.status_code == 422 and f"the {field} contains a control character" in r.text


def test_a_typed_premise_needs_my_own_premise(tmp_path):
    c, csrf = make(tmp_path)
    r = c.post("/sessions", data={"csrf": csrf, "world": "campaign:0", "premise": "A rainy harbour town."})
    assert r.status_code == 422 and "My own premise" in r.text  # was silently dropped
    assert start(c, csrf, "campaign:0", title="  ", premise="", facts="")  # blank fields are not a premise


def test_favicon_plurals_and_single_session_interval(tmp_path):
    c, csrf = make(tmp_path, bootstrap_rounds=20)
    r = c.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")
    assert 'rel="icon"' in c.get("/").text
    sid = start(c, csrf)
    turn(c, csrf, sid)
    vote(c, csrf, sid, 0, "a")
    c.post(f"/s/{sid}/finish", data={"csrf": csrf})
    page = c.get("/leaderboard").text
    assert "1 vote in 1 session." in page and "0 votes of sessions" in page
    assert page.count("needs ≥ 2 sessions") == 2 and " … " not in page
    rows = c.get("/api/ratings").json()["rows"]
    assert all(r["sessions"] == 1 and r["ci_low"] is None for r in rows)
    sid = start(c, csrf)
    turn(c, csrf, sid)
    vote(c, csrf, sid, 0, "b")
    c.post(f"/s/{sid}/finish", data={"csrf": csrf})
    page = c.get("/leaderboard").text
    assert "2 votes in 2 sessions." in page and "needs ≥ 2 sessions" not in page and page.count(" … ") == 2


def test_catch_pairs_measure_consistency(tmp_path):
    c, csrf = make(tmp_path, catch_rate=1.0)  # every voted turn comes back with the sides swapped
    sid = start(c, csrf)

    def catch(idx, shown):
        return c.post(f"/s/{sid}/catch/{idx}", data={"csrf": csrf, "outcome": shown}, follow_redirects=False)

    turn(c, csrf, sid)
    vote(c, csrf, sid, 0, "a")
    page = c.get(f"/s/{sid}").text
    with c.app.state.factory() as db:
        t0 = db.query(Turn).filter_by(session_id=sid, idx=0).one()
    section = page[page.index('data-testid="catch"'):]
    assert section.index(str(escape(t0.reply_b))) < section.index(str(escape(t0.reply_a)))  # swapped
    assert 'data-testid="turn-form"' in page  # playing on stays possible
    assert catch(0, "b").status_code == 303  # shown B = the original A: consistent
    assert catch(0, "b").status_code == 303 and catch(0, "a").status_code == 409  # repeat no-op, change refused
    assert 'data-testid="catch"' not in c.get(f"/s/{sid}").text
    turn(c, csrf, sid)
    vote(c, csrf, sid, 1, "tie")
    assert catch(1, "a").status_code == 303  # a tie, then a preference: inconsistent
    turn(c, csrf, sid)
    vote(c, csrf, sid, 2, "b")
    turn(c, csrf, sid)  # played on: the catch of turn 2 is skipped
    assert catch(2, "a").status_code == 409
    assert catch(0, "left").status_code == 422 and catch(2**63, "a").status_code == 404
    assert catch(9, "a").status_code == 404
    stats = c.get("/api/ratings").json()["catches"]
    assert stats == {"pairs": 2, "consistent": 1, "rate": 0.5, "players": 1, "players_below": 0}
    assert "2 repeated pairs with the sides swapped: 1 answered consistently (50%) by 1 player" in c.get(
        "/leaderboard").text


def test_ratings_beyond_the_context_window_length_and_robustness(tmp_path):
    specs = [ModelSpec("keeper", "scripted", style="keeper", context_turns=2),
             ModelSpec("forgetter", "scripted", style="forgetter")]
    c, csrf = make(tmp_path, specs=specs, bootstrap_rounds=20)
    for _ in range(2):
        sid = start(c, csrf)
        for idx in range(5):  # turn idx has idx earlier turns: turns 3 and 4 lie beyond K = 2
            turn(c, csrf, sid)
            vote(c, csrf, sid, idx, "a" if idx < 3 else "tie")
        c.post(f"/s/{sid}/finish", data={"csrf": csrf})
    board = c.get("/api/ratings").json()
    assert board["windows"] == {"keeper": 2}
    assert board["beyond"]["votes"] == 4 and board["beyond"]["sessions"] == 2
    assert sum(r["votes"] for r in board["beyond"]["rows"]) == 8
    assert board["robustness"] is not None and board["length_coef"] is not None
    assert all(r["rating_lc"] is not None for r in board["rows"])
    page = c.get("/leaderboard").text
    assert "Beyond the context window" in page and 'data-testid="robustness"' in page


def test_rate_limit_per_client(tmp_path):
    c, csrf = make(tmp_path, posts_per_minute=3)
    codes = [c.post("/sessions", data={"csrf": csrf, "world": "campaign:0"}, follow_redirects=False).status_code
             for _ in range(4)]
    assert codes == [303, 303, 303, 429]
    assert c.get("/").status_code == 200  # page views have their own, larger budget


def test_admin_page_behind_a_token(tmp_path):
    c, csrf = make(tmp_path, admin_token="s3cret")
    sid = start(c, csrf)
    turn(c, csrf, sid)
    vote(c, csrf, sid, 0, "a")
    assert c.get("/admin").status_code == 401
    assert c.get("/admin/votes.csv").status_code == 403
    assert c.post("/admin/login", data={"csrf": csrf, "token": "guess"}).status_code == 403
    assert c.post("/admin/login", data={"csrf": csrf, "token": "s3cret"}, follow_redirects=False).status_code == 303
    page = c.get("/admin")
    assert page.status_code == 200 and all(n in page.text for n in NAMES)
    rows = list(csv.DictReader(io.StringIO(c.get("/admin/votes.csv").text)))
    assert len(rows) == 1 and rows[0]["session_id"] == sid and rows[0]["outcome"] == "a"


def test_sessions_survive_a_restart(tmp_path):
    c, csrf = make(tmp_path)
    sid = start(c, csrf)
    turn(c, csrf, sid, "Before the restart.")
    vote(c, csrf, sid, 0, "b")
    turn(c, csrf, sid, "Voted after the restart.")
    with c.app.state.factory() as db:  # a generation that was running when the server stopped
        t = db.query(Turn).filter_by(session_id=sid, idx=1).one()
        t.status = "generating"
        db.commit()
    c.app.state.engine.dispose()
    c2 = TestClient(create_app(ArenaSettings(db_url=f"sqlite:///{tmp_path / 'arena.db'}")), cookies=c.cookies)
    page = c2.get(f"/s/{sid}").text
    assert "Before the restart." in page and 'data-testid="turn-form"' in page  # the stale claim was freed
    assert turn(c2, csrf, sid, "Again.").status_code == 303 and vote(c2, csrf, sid, 1, "a").status_code == 303
    assert schema_version(c2.app.state.engine) == SCHEMA_VERSION
    assert c2.get("/api/ratings").json()["votes_recorded"] == 2


def test_a_failing_model_gives_503_and_frees_the_turn(tmp_path):
    specs = [ModelSpec("good", "scripted"), ModelSpec("broken", "topocl", path=str(tmp_path / "missing"))]
    c, csrf = make(tmp_path, specs=specs)
    sid = start(c, csrf)
    assert turn(c, csrf, sid).status_code == 503
    page = c.get(f"/s/{sid}").text
    assert 'data-testid="turn-form"' in page and "broken" not in page


def test_ratings_cli_exports_votes_and_ratings(tmp_path, capsys):
    c, csrf = make(tmp_path)
    for outcome in ("a", "b", "tie"):
        sid = start(c, csrf)
        turn(c, csrf, sid)
        vote(c, csrf, sid, 0, outcome)
    url = f"sqlite:///{tmp_path / 'arena.db'}"
    assert arena_cli(["ratings", "--db", url, "--rounds", "20"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["votes"]) == 3 and {r["model"] for r in data["ratings"]} == set(NAMES)
    assert sum(r["votes"] for r in data["ratings"]) == 6 and "rate" in data["agreement"]
    assert arena_cli(["ratings", "--db", url, "--format", "csv", "--out", str(tmp_path / "v.csv")]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "v.csv")))) == 3
    assert {r["model"] for r in csv.DictReader(open(tmp_path / "v.ratings.csv"))} == set(NAMES)
    assert "agreement" in c.get("/leaderboard").text


def test_migrations_are_recorded_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    engine, _ = open_db(url)
    from topocl.arena.db import migrate

    assert migrate(engine) == [] and schema_version(engine) == SCHEMA_VERSION == 2


def test_a_version_1_database_migrates_to_2(tmp_path):
    """A database made before learners (no reply steps / lengths, no learning table) keeps its votes."""
    from sqlalchemy import inspect, text

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine, _ = open_db(url)
    with engine.begin() as conn:  # back to schema 1
        for table, col in (("arena_turn", "step_a"), ("arena_turn", "step_b"), ("arena_vote", "len_a"),
                           ("arena_vote", "len_b")):
            conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {col}"))
        conn.execute(text("DROP TABLE arena_learn"))
        conn.execute(text("DELETE FROM arena_schema_version WHERE version = 2"))
        conn.execute(text("INSERT INTO arena_session (id, world, model_a, model_b, status, seed, client, created_at, "
                          "updated_at) VALUES ('" + "a" * 32 + "', '{}', 'x', 'y', 'finished', 1, 'c', "
                          "'2026-01-01', '2026-01-01')"))
        conn.execute(text("INSERT INTO arena_vote (session_id, turn_idx, outcome, model_a, model_b, client, "
                          "created_at) VALUES ('" + "a" * 32 + "', 0, 'a', 'x', 'y', 'c', '2026-01-01')"))
    engine.dispose()
    engine, _ = open_db(url)
    assert schema_version(engine) == 2
    cols = {c["name"] for c in inspect(engine).get_columns("arena_turn")}
    assert {"step_a", "step_b"} <= cols and "arena_learn" in inspect(engine).get_table_names()
    assert [v["outcome"] for v in ratings_export(url, rounds=5)["votes"]] == ["a"]


def test_arena_error_carries_status():
    e = ArenaError(409, "x")
    assert e.status == 409 and e.message == "x" and len(demo_specs()) == 2


@pytest.mark.skipif(not os.environ.get("ARENA_POSTGRES_URL"),
                    reason="set ARENA_POSTGRES_URL=postgresql+psycopg://... to run the arena against PostgreSQL")
def test_the_same_flow_on_postgresql():
    url = os.environ["ARENA_POSTGRES_URL"]
    c = TestClient(create_app(ArenaSettings(db_url=url)), raise_server_exceptions=False)
    csrf = CSRF.search(c.get("/").text).group(1)
    sid = start(c, csrf)
    assert turn(c, csrf, sid).status_code == 303
    assert vote(c, csrf, sid, 0, "tie").status_code == 303 and vote(c, csrf, sid, 0, "tie").status_code == 303
    assert vote(c, csrf, sid, 0, "a").status_code == 409
    assert c.post(f"/s/{sid}/turns/{2**63}/vote", data={"csrf": csrf, "outcome": "a"}).status_code == 404
    r = turn(c, csrf, sid, "NUL\x00byte")  # PostgreSQL cannot store it: refused before it gets there
    assert r.status_code == 422 and "control character" in r.text
    c.app.state.engine.dispose()
    c2 = TestClient(create_app(ArenaSettings(db_url=url)), cookies=c.cookies)  # migrations are not re-applied
    assert schema_version(c2.app.state.engine) == SCHEMA_VERSION and c2.get(f"/s/{sid}").status_code == 200
    assert sid in {v["session_id"] for v in ratings_export(url, rounds=5)["votes"]}
