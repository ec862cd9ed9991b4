"""Arena session logic without web code: start a session, play a turn, vote, finish, export votes.

Errors a client can cause raise `ArenaError(status, message)`; the web layer turns them into 4xx pages.
Invariants: one vote per turn (a unique constraint; the same vote again is a no-op, a different one a 409),
at most one unvoted turn per session, model names leave the server only once the session is finished.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from topocl.arena.db import ArenaSession, CatchRow, LearnRow, Turn, VoteRow, utcnow
from topocl.arena.pool import ModelPool
from topocl.arena.proxies import render_prompt, score_reply
from topocl.arena.ratings import OUTCOMES, Vote

SESSION_ID_CHARS = frozenset("0123456789abcdef")
MAX_TURN_IDX = 2**31 - 1  # the column is a 32-bit integer; larger indices cannot exist
ALLOWED_CONTROLS = frozenset("\t\n\r")


class ArenaError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Limits:
    turn_chars: int = 2000
    premise_chars: int = 8000
    turns_per_session: int = 500


def check_text(text: str, what: str) -> str:
    """`text` unchanged, or a 422 naming the first control character (NUL, escape, ...; tab and newlines
    are fine): PostgreSQL cannot store NUL at all and no retry would help, so both databases refuse them."""
    for i, ch in enumerate(text):
        if (ch < " " or "\x7f" <= ch <= "\x9f") and ch not in ALLOWED_CONTROLS:
            raise ArenaError(422, f"{what} contains a control character (U+{ord(ch):04X} at character {i + 1}); "
                                  "remove it and try again")
    return text


def client_hash(client_id: str) -> str:
    return hashlib.sha256(client_id.encode()).hexdigest()[:32]


def valid_session_id(sid: str) -> bool:
    return len(sid) == 32 and set(sid) <= SESSION_ID_CHARS


def get_session(db: Session, sid: str) -> ArenaSession:
    s = db.get(ArenaSession, sid) if valid_session_id(sid) else None
    if s is None:
        raise ArenaError(404, "no such session")
    return s


def start_session(db: Session, pool: ModelPool, world: dict, client_id: str, rng: random.Random | None = None
                  ) -> ArenaSession:
    """Two different models drawn at random; which one is A (left) is a fair coin flip."""
    rng = rng or random.SystemRandom()
    a, b = rng.sample(pool.names, 2)  # a uniformly random ordered pair: random sides
    s = ArenaSession(id=uuid.uuid4().hex, world=world, model_a=a, model_b=b, status="open",
                     seed=secrets.randbelow(2**31), client=client_hash(client_id))
    db.add(s)
    db.commit()
    return s


def turns_of(db: Session, sid: str) -> list[Turn]:
    return list(db.scalars(select(Turn).where(Turn.session_id == sid).order_by(Turn.idx)))


def committed_reply(t: Turn) -> str | None:
    return {"a": t.reply_a, "b": t.reply_b}.get(t.committed or "")


def play_turn(factory: sessionmaker, pool: ModelPool, sid: str, text: str, limits: Limits) -> int:
    """Claim the next turn, generate both replies (concurrently), score the proxies, store; returns the
    turn index. The claim is a row with status 'generating', so a second submit races on the unique index."""
    text = check_text(text, "your turn").strip()
    if not text:
        raise ArenaError(422, "write something first")
    if len(text) > limits.turn_chars:
        raise ArenaError(413, f"a turn is at most {limits.turn_chars} characters")
    with factory() as db:
        s = get_session(db, sid)
        if s.status != "open":
            raise ArenaError(409, "this session has ended")
        turns = turns_of(db, sid)
        if turns and turns[-1].status != "voted":
            raise ArenaError(409, "vote on the last turn first")
        if len(turns) >= limits.turns_per_session:
            raise ArenaError(409, f"a session has at most {limits.turns_per_session} turns")
        idx = len(turns)
        history = [{"player_text": t.player_text, "reply": committed_reply(t)} for t in turns]
        db.execute(update(CatchRow).where(CatchRow.session_id == sid, CatchRow.repeat.is_(None)).values(
            repeat="skip"))  # an unanswered catch pair is skipped by playing on
        world, seed, ma, mb = s.world, s.seed, s.model_a, s.model_b
        db.add(Turn(session_id=sid, idx=idx, player_text=text, status="generating"))
        try:
            db.commit()
        except IntegrityError:
            raise ArenaError(409, "this turn is already being played") from None
    try:
        prompts = tuple(render_prompt(world, history, text, idx, pool.specs[m].context_turns) for m in (ma, mb))
        turn_seed = (seed * 1_000_003 + idx) % 2**31
        ra, rb = pool.pair(ma, mb, prompts, turn_seed, sid)
        proxy = {side: score_reply(pool.backends[m], world, prompt, r.text, idx, seed, sid)
                 for side, m, r, prompt in (("a", ma, ra, prompts[0]), ("b", mb, rb, prompts[1]))}
    except Exception:
        with factory() as db:  # free the claim so the player can try again
            db.execute(delete(Turn).where(Turn.session_id == sid, Turn.idx == idx))
            db.commit()
        raise
    with factory() as db:
        t = db.scalar(select(Turn).where(Turn.session_id == sid, Turn.idx == idx))
        t.reply_a, t.reply_b, t.ms_a, t.ms_b, t.proxy, t.status = ra.text, rb.text, ra.ms, rb.ms, proxy, "ready"
        t.step_a, t.step_b = ra.step, rb.step
        db.get(ArenaSession, sid).updated_at = utcnow()
        db.commit()
    return idx


def cast_vote(factory: sessionmaker, sid: str, idx: int, outcome: str, client_id: str,
              pool: ModelPool | None = None, catch_rate: float = 0.0) -> bool:
    """Record the vote on turn `idx`; True if new, False if the same vote was already there (idempotent).
    The winning reply becomes the story's (a tie commits one of the two by a seeded coin, both-bad neither);
    then the pool's learners of this session are told (they learn in the background). With probability
    catch_rate (a seeded coin per turn) the turn becomes a catch pair: shown again with the sides swapped."""
    if outcome not in OUTCOMES:
        raise ArenaError(422, f"outcome must be one of {', '.join(OUTCOMES)}")
    if not 0 <= idx <= MAX_TURN_IDX:
        raise ArenaError(404, "no such turn to vote on")
    for _ in range(2):  # a lost race on the unique index is re-read once
        with factory() as db:
            s = get_session(db, sid)
            t = db.scalar(select(Turn).where(Turn.session_id == sid, Turn.idx == idx))
            if t is None or t.status == "generating":
                raise ArenaError(404, "no such turn to vote on")
            old = db.scalar(select(VoteRow).where(VoteRow.session_id == sid, VoteRow.turn_idx == idx))
            if old is not None:
                if old.outcome == outcome:
                    return False
                raise ArenaError(409, "this turn already has a different vote")
            if s.status != "open":
                raise ArenaError(409, "this session has ended")
            proxy = t.proxy or {}
            db.add(VoteRow(session_id=sid, turn_idx=idx, outcome=outcome, model_a=s.model_a, model_b=s.model_b,
                           proxy_a=(proxy.get("a") or {}).get("score"), proxy_b=(proxy.get("b") or {}).get("score"),
                           client=client_hash(client_id), len_a=len(t.reply_a or ""), len_b=len(t.reply_b or "")))
            if outcome == "tie":
                t.committed = random.Random(f"{s.seed}/{idx}").choice("ab")
            else:
                t.committed = "none" if outcome == "both_bad" else outcome
            t.status = "voted"
            s.updated_at = utcnow()
            if catch_rate > 0 and random.Random(f"{s.seed}/catch/{idx}").random() < catch_rate:
                db.add(CatchRow(session_id=sid, turn_idx=idx, first=outcome, client=client_hash(client_id)))
            try:
                db.commit()
            except IntegrityError:
                db.rollback()
                continue
            if pool is not None:
                pool.learn(sid, (s.model_a, s.model_b))
            return True
    raise ArenaError(409, "concurrent vote on this turn")


def finish_session(factory: sessionmaker, sid: str, pool: ModelPool | None = None) -> None:
    """End the session (idempotent); the model names are shown from now on; learners delete its state."""
    with factory() as db:
        s = get_session(db, sid)
        if s.status != "finished":
            s.status, s.finished_at = "finished", utcnow()
            db.commit()
    if pool is not None:
        pool.end(sid)


SWAP = {"a": "b", "b": "a", "tie": "tie", "both_bad": "both_bad"}


def pending_catch(db: Session, sid: str) -> CatchRow | None:
    return db.scalar(select(CatchRow).where(CatchRow.session_id == sid, CatchRow.repeat.is_(None)))


def answer_catch(factory: sessionmaker, sid: str, idx: int, shown: str) -> bool:
    """The answer to the catch pair of turn `idx`, given on the swapped display; True if consistent."""
    if shown not in SWAP:
        raise ArenaError(422, f"outcome must be one of {', '.join(SWAP)}")
    if not 0 <= idx <= MAX_TURN_IDX:
        raise ArenaError(404, "no such check")
    with factory() as db:
        get_session(db, sid)
        c = db.scalar(select(CatchRow).where(CatchRow.session_id == sid, CatchRow.turn_idx == idx))
        if c is None:
            raise ArenaError(404, "no such check")
        if c.repeat is not None:
            if c.repeat == SWAP[shown]:
                return c.repeat == c.first
            raise ArenaError(409, "this check was already answered or skipped")
        c.repeat = SWAP[shown]
        db.commit()
        return c.repeat == c.first


def catch_stats(db: Session) -> dict:
    """Catch pairs answered, how many consistently (the same choice with the sides swapped), by how many
    players, and how many players (with at least 2 answered) were consistent less than half the time."""
    rows = list(db.scalars(select(CatchRow).where(CatchRow.repeat.is_not(None), CatchRow.repeat != "skip")))
    by: dict[str, list[bool]] = {}
    for r in rows:
        by.setdefault(r.client, []).append(r.repeat == r.first)
    ok = sum(sum(v) for v in by.values())
    return {"pairs": len(rows), "consistent": ok, "rate": ok / len(rows) if rows else float("nan"),
            "players": len(by), "players_below": sum(1 for v in by.values() if len(v) >= 2 and sum(v) < len(v) / 2)}


def story(factory: sessionmaker, sid: str) -> tuple[dict, int, list[dict]] | None:
    """(world, seed, voted turns as {player_text, reply}) of an open session, None if ended or unknown:
    what a learner trains on."""
    with factory() as db:
        s = db.get(ArenaSession, sid) if valid_session_id(sid) else None
        if s is None or s.status != "open":
            return None
        turns = [t for t in turns_of(db, sid) if t.status == "voted"]
        return s.world, s.seed, [{"player_text": t.player_text, "reply": committed_reply(t)} for t in turns]


def log_round(factory: sessionmaker, sid: str, model: str, info: dict) -> None:
    with factory() as db:
        if db.get(ArenaSession, sid) is not None:
            db.add(LearnRow(session_id=sid, model=model, through=info["through"], step=info["step"],
                            loss_first=info["loss_first"], loss_last=info["loss_last"], seconds=info["seconds"]))
            db.commit()


def learning_log(db: Session, sid: str) -> list[LearnRow]:
    return list(db.scalars(select(LearnRow).where(LearnRow.session_id == sid).order_by(LearnRow.id)))


def open_sessions(db: Session) -> list[tuple[str, str, str]]:
    """(id, model_a, model_b) of every open session."""
    return [tuple(r) for r in db.execute(select(ArenaSession.id, ArenaSession.model_a, ArenaSession.model_b).where(
        ArenaSession.status == "open"))]


def drop_stale_claims(factory: sessionmaker) -> int:
    """At start-up no generation can be running: free turns left 'generating' by a stopped server."""
    with factory() as db:
        n = db.execute(delete(Turn).where(Turn.status == "generating")).rowcount
        db.commit()
    return n or 0


def all_votes(db: Session, finished_only: bool = False) -> list[VoteRow]:
    """Votes in time order; finished_only keeps those of ended sessions (what the public leaderboard rates:
    a live rating would tell a player which model sits on which side of an open session)."""
    q = select(VoteRow).order_by(VoteRow.created_at, VoteRow.id)
    if finished_only:
        q = q.join(ArenaSession, ArenaSession.id == VoteRow.session_id).where(ArenaSession.status == "finished")
    return list(db.scalars(q))


def as_rating_votes(rows: list[VoteRow]) -> list[Vote]:
    return [Vote(r.session_id, r.model_a, r.model_b, r.outcome, r.proxy_a, r.proxy_b, r.turn_idx, r.len_a, r.len_b)
            for r in rows]


def vote_count(db: Session) -> tuple[int, int, int, int]:
    """(number of votes, largest vote id, finished sessions, answered catch pairs): changes whenever the
    leaderboard may."""
    n, last = db.execute(select(func.count(VoteRow.id), func.max(VoteRow.id))).one()
    done = db.scalar(select(func.count(ArenaSession.id)).where(ArenaSession.status == "finished"))
    catches = db.scalar(select(func.count(CatchRow.id)).where(CatchRow.repeat.is_not(None)))
    return int(n or 0), int(last or 0), int(done or 0), int(catches or 0)
