"""The arena web app: FastAPI + server-rendered Jinja2 pages (plain HTML forms, a few lines of vanilla JS).

Security: a double-submit CSRF token (cookie `arena_csrf`, SameSite=Strict, echoed in every form) on every
POST; a per-client sliding-window rate limit (POSTs and all requests, by client address); request bodies
over `max_body` bytes get 413; input lengths are checked; the admin page needs `admin_token` (compared in
constant time; no token configured = no admin page); pages carry a strict Content-Security-Policy. Client
mistakes raise ArenaError or fail FastAPI's validation and come back as 4xx pages, never 500.
"""

from __future__ import annotations

import csv
import hmac
import io
import math
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Form, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from starlette.exceptions import HTTPException as StarletteHTTPException

from topocl.arena import service
from topocl.arena.board import board_data, json_clean
from topocl.arena.db import ArenaSession, open_db
from topocl.arena.pool import ModelPool
from topocl.arena.proxies import campaign_world, custom_world, gm_note
from topocl.arena.service import ArenaError, Limits
from topocl.arena.serving import ModelSpec, demo_specs

HERE = Path(__file__).parent
CAMPAIGN_SEEDS = range(5)
OUTCOME_LABELS = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both are bad"}


@dataclass
class ArenaSettings:
    db_url: str = "sqlite:///runs/arena/arena.db"
    specs: list[ModelSpec] = field(default_factory=demo_specs)
    admin_token: str = ""  # "" = no admin page
    posts_per_minute: int = 30  # per client address; 0 = no limit
    requests_per_minute: int = 600  # 0 = no limit
    max_body: int = 32_768  # bytes
    limits: Limits = field(default_factory=Limits)
    bootstrap_rounds: int = 200
    secure_cookies: bool = False  # set the Secure flag (behind HTTPS)
    state_dir: str = ""  # learners' per-session weights ("" = learner_state/ next to a SQLite file)
    catch_rate: float = 0.0  # share of voted turns shown again with the sides swapped (consistency check)


def learner_state_dir(settings: ArenaSettings) -> Path:
    if settings.state_dir:
        return Path(settings.state_dir)
    if settings.db_url.startswith("sqlite:///") and settings.db_url != "sqlite:///:memory:":
        return Path(settings.db_url[len("sqlite:///"):]).parent / "learner_state"
    return Path("runs/arena/learner_state")


class RateLimiter:
    """Sliding one-minute window of request times per key."""

    def __init__(self) -> None:
        self.hits: dict[str, deque[float]] = {}
        self.lock = threading.Lock()

    def allow(self, key: str, per_minute: int, now: float | None = None) -> bool:
        """True if `key` made fewer than `per_minute` requests in the last minute (recording this one);
        per_minute <= 0 means no limit."""
        if per_minute <= 0:
            return True
        now = time.monotonic() if now is None else now
        with self.lock:
            q = self.hits.setdefault(key, deque())
            while q and q[0] <= now - 60.0:
                q.popleft()
            if len(q) >= per_minute:
                return False
            q.append(now)
            if len(self.hits) > 10_000:  # forget idle clients
                for k in [k for k, v in self.hits.items() if not v or v[-1] <= now - 60.0]:
                    del self.hits[k]
            return True


def create_app(settings: ArenaSettings, pool: ModelPool | None = None) -> FastAPI:
    engine, factory = open_db(settings.db_url)
    pool = pool or ModelPool(settings.specs)
    service.drop_stale_claims(factory)
    if pool.learners:  # learning resumes where each open session's last finished round left it
        pool.attach(learner_state_dir(settings), lambda sid: service.story(factory, sid),
                    lambda sid, model, info: service.log_round(factory, sid, model, info))
        with factory() as db:
            for sid, ma, mb in service.open_sessions(db):
                pool.learn(sid, (ma, mb))
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["plural"] = plural
    templates.env.filters["num"] = lambda x: "–" if x is None else f"{x:.2f}"
    app = FastAPI(title="TopoCL arena", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.factory, app.state.pool, app.state.settings = engine, factory, pool, settings
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    posts, everything = RateLimiter(), RateLimiter()
    board_cache: dict[str, tuple[tuple[int, int, int], dict]] = {}
    board_lock = threading.Lock()

    def page(request: Request, name: str, status: int = 200, **ctx) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"csrf": request.state.csrf, **ctx}, status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next):  # noqa: ANN001, ANN202
        request.state.csrf = request.cookies.get("arena_csrf") or secrets.token_urlsafe(24)
        request.state.client_id = request.cookies.get("arena_client") or secrets.token_urlsafe(24)
        host = request.client.host if request.client else "unknown"
        if not everything.allow(host, settings.requests_per_minute) or (
                request.method == "POST" and not posts.allow(host, settings.posts_per_minute)):
            resp: Response = HTMLResponse("Too many requests; slow down.", status_code=429,
                                          headers={"Retry-After": "60"})
        else:
            length = request.headers.get("content-length", "")
            if length and (not length.isdigit() or int(length) > settings.max_body):
                resp = HTMLResponse("Request too large.", status_code=413)
            elif request.method == "POST" and not length and "chunked" in request.headers.get("transfer-encoding",
                                                                                               ""):
                resp = HTMLResponse("Send a Content-Length.", status_code=411)
            else:
                resp = await call_next(request)
        for name, value in (("arena_csrf", request.state.csrf), ("arena_client", request.state.client_id)):
            if request.cookies.get(name) != value:
                resp.set_cookie(name, value, max_age=3600 * 24 * 365, httponly=True, samesite="strict",
                                secure=settings.secure_cookies)
        resp.headers["Content-Security-Policy"] = "default-src 'self'; frame-ancestors 'none'; form-action 'self'"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "same-origin"
        return resp

    def check_csrf(request: Request, token: str) -> None:
        cookie = request.cookies.get("arena_csrf", "")
        if not cookie or not hmac.compare_digest(cookie.encode(), token.encode()):
            raise ArenaError(403, "stale or missing form token; reload the page and try again")

    @app.exception_handler(ArenaError)
    async def arena_error(request: Request, exc: ArenaError) -> HTMLResponse:
        return page(request, "error.html", exc.status, message=exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> HTMLResponse:
        return page(request, "error.html", exc.status_code, message=str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> HTMLResponse:
        fields = sorted({".".join(str(p) for p in e.get("loc", ())[1:]) for e in exc.errors()})
        return page(request, "error.html", 422, message=f"invalid request ({', '.join(fields) or 'body'})")

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request) -> HTMLResponse:
        with factory() as db:
            mine = db.scalars(select(ArenaSession).where(
                ArenaSession.client == service.client_hash(request.state.client_id)).order_by(
                ArenaSession.updated_at.desc()).limit(20)).all()
        return page(request, "index.html", sessions=mine, seeds=list(CAMPAIGN_SEEDS), limits=settings.limits)

    @app.post("/sessions")
    def new_session(request: Request, csrf: str = Form(..., max_length=100), world: str = Form(..., max_length=20),
                    title: str = Form("", max_length=200), premise: str = Form("", max_length=20_000),
                    facts: str = Form("", max_length=8000)) -> RedirectResponse:
        check_csrf(request, csrf)
        for what, text in (("the title", title), ("the premise", premise), ("the facts", facts)):
            service.check_text(text, what)
        if world != "custom" and (title.strip() or premise.strip() or facts.strip()):
            raise ArenaError(422, "you wrote your own premise but chose a campaign world: pick \"My own premise\" "
                                  "to play it, or clear the premise fields")
        if world == "custom":
            if not premise.strip():
                raise ArenaError(422, "write a premise for your own world")
            if len(premise) > settings.limits.premise_chars:
                raise ArenaError(413, f"a premise is at most {settings.limits.premise_chars} characters")
            try:
                w = custom_world(title.strip(), premise.strip(), facts)
            except ValueError as e:
                raise ArenaError(422, str(e)) from None
        elif world.startswith("campaign:") and world[9:].isdigit() and int(world[9:]) in CAMPAIGN_SEEDS:
            w = campaign_world(int(world[9:]))
        else:
            raise ArenaError(422, "unknown world")
        with factory() as db:
            s = service.start_session(db, pool, w, request.state.client_id)
        return RedirectResponse(f"/s/{s.id}", status_code=303)

    @app.get("/s/{sid}", response_class=HTMLResponse)
    def show_session(request: Request, sid: str) -> HTMLResponse:
        with factory() as db:
            s = service.get_session(db, sid)
            turns = service.turns_of(db, sid)
            learning = service.learning_log(db, sid) if s.status == "finished" else []  # names the models
            catch = service.pending_catch(db, sid) if s.status == "open" else None
        rows = [{"t": t, "note": gm_note(s.world, t.idx), "reply": service.committed_reply(t)} for t in turns]
        catch_turn = next((t for t in turns if catch is not None and t.idx == catch.turn_idx), None)
        pending = turns[-1] if turns and turns[-1].status != "voted" else None
        return page(request, "session.html", s=s, rows=rows, pending=pending, revealed=s.status == "finished",
                    next_note=gm_note(s.world, len(turns)), labels=OUTCOME_LABELS, limits=settings.limits,
                    learning=learning, catch=catch_turn)

    @app.post("/s/{sid}/turns")
    def post_turn(request: Request, sid: str, csrf: str = Form(..., max_length=100),
                  text: str = Form(..., max_length=20_000)) -> RedirectResponse:
        check_csrf(request, csrf)
        try:
            idx = service.play_turn(factory, pool, sid, text, settings.limits)
        except ArenaError:
            raise
        except Exception as e:  # a model failed: the claim is freed, the player may retry
            raise ArenaError(503, f"a model could not reply ({type(e).__name__}); try again") from None
        return RedirectResponse(f"/s/{sid}#turn-{idx}", status_code=303)

    @app.post("/s/{sid}/turns/{idx}/vote")
    def post_vote(request: Request, sid: str, idx: int, csrf: str = Form(..., max_length=100),
                  outcome: str = Form(..., max_length=10)) -> RedirectResponse:
        check_csrf(request, csrf)
        service.cast_vote(factory, sid, idx, outcome, request.state.client_id, pool, settings.catch_rate)
        return RedirectResponse(f"/s/{sid}#turn-{idx}", status_code=303)

    @app.post("/s/{sid}/catch/{idx}")
    def post_catch(request: Request, sid: str, idx: int, csrf: str = Form(..., max_length=100),
                   outcome: str = Form(..., max_length=10)) -> RedirectResponse:
        check_csrf(request, csrf)
        service.answer_catch(factory, sid, idx, outcome)
        return RedirectResponse(f"/s/{sid}", status_code=303)

    @app.post("/s/{sid}/finish")
    def post_finish(request: Request, sid: str, csrf: str = Form(..., max_length=100)) -> RedirectResponse:
        check_csrf(request, csrf)
        service.finish_session(factory, sid, pool)
        return RedirectResponse(f"/s/{sid}", status_code=303)

    def board() -> dict:
        """Leaderboard data, recomputed only when the votes changed, by one request at a time; while one
        request recomputes, the others get the previous board (stale by a few votes) instead of waiting."""
        with factory() as db:
            key = service.vote_count(db)
        last = board_cache.get("last")
        if last is not None and last[0] == key:
            return last[1]
        if not board_lock.acquire(blocking=last is None):
            return last[1]
        try:
            with factory() as db:
                key = service.vote_count(db)
                votes = service.as_rating_votes(service.all_votes(db, finished_only=True))
                catches = service.catch_stats(db)
            windows = {n: s.context_turns for n, s in pool.specs.items()}
            out = {**board_data(votes, pool.names, rounds=settings.bootstrap_rounds, windows=windows,
                                catches=catches),
                   "votes_recorded": key[0]}
            board_cache["last"] = (key, out)
            return out
        finally:
            board_lock.release()

    @app.get("/leaderboard", response_class=HTMLResponse)
    def show_leaderboard(request: Request) -> HTMLResponse:
        return page(request, "leaderboard.html", board=board(), isnan=math.isnan, e=math.e)

    @app.get("/api/ratings")
    def api_ratings() -> JSONResponse:
        return JSONResponse(json_clean(board()))

    def is_admin(request: Request) -> bool:
        token = request.cookies.get("arena_admin", "")
        return bool(settings.admin_token) and hmac.compare_digest(token.encode(), settings.admin_token.encode())

    @app.get("/admin", response_class=HTMLResponse)
    def admin(request: Request) -> HTMLResponse:
        if not settings.admin_token:
            raise ArenaError(404, "the admin page is off (start the server with --admin-token)")
        if not is_admin(request):
            return page(request, "admin_login.html", 401)
        with factory() as db:
            sessions = db.scalars(select(ArenaSession).order_by(ArenaSession.updated_at.desc()).limit(100)).all()
            votes = service.all_votes(db)[-100:]
        return page(request, "admin.html", sessions=sessions, votes=votes, board=board(), isnan=math.isnan)

    @app.post("/admin/login")
    def admin_login(request: Request, csrf: str = Form(..., max_length=100),
                    token: str = Form(..., max_length=200)) -> RedirectResponse:
        check_csrf(request, csrf)
        if not settings.admin_token or not hmac.compare_digest(token.encode(), settings.admin_token.encode()):
            raise ArenaError(403, "wrong admin token")
        resp = RedirectResponse("/admin", status_code=303)
        resp.set_cookie("arena_admin", token, httponly=True, samesite="strict", secure=settings.secure_cookies)
        return resp

    @app.get("/admin/votes.csv")
    def admin_votes(request: Request) -> Response:
        if not is_admin(request):
            raise ArenaError(403 if settings.admin_token else 404, "admin only")
        with factory() as db:
            return Response(votes_csv(service.all_votes(db)), media_type="text/csv")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> RedirectResponse:  # browsers and crawlers ask for it whatever the <link rel=icon> says
        return RedirectResponse("/static/favicon.svg", status_code=308)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True, "models": len(pool.names), "posts_per_minute": settings.posts_per_minute,
                "requests_per_minute": settings.requests_per_minute}

    return app


def plural(n: int, word: str) -> str:
    """'1 session', '2 sessions', '0 sessions'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


VOTE_FIELDS = ("id", "session_id", "turn_idx", "outcome", "model_a", "model_b", "proxy_a", "proxy_b", "created_at")


def votes_csv(rows: list) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(VOTE_FIELDS)
    for r in rows:
        w.writerow([getattr(r, f) for f in VOTE_FIELDS])
    return buf.getvalue()
