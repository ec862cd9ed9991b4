"""Arena storage: SQLAlchemy 2 ORM tables, engine set-up, and a small versioned migration table.

SQLite is the embedded default (a file in the run directory, WAL journal, foreign keys on, 30 s busy
timeout so concurrent writers queue instead of failing); PostgreSQL works by URL
(`postgresql+psycopg://user:pass@host/db`, needs `pip install psycopg[binary]`). Every query goes through
the ORM / SQLAlchemy Core, so every value is a bound parameter.

Migrations: alembic would add a second config tree and a migration directory for what is so far one schema;
instead `arena_schema_version` records applied versions and `migrate` applies the missing steps of
MIGRATIONS in order, each in its own transaction. A later schema change appends a step with explicit DDL
(`ALTER TABLE ...`), never edits an earlier one.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)  # naive UTC: SQLite and PostgreSQL read back the same


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    __tablename__ = "arena_schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    description: Mapped[str] = mapped_column(String(200))
    applied_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class ArenaSession(Base):
    """One story: a world, two anonymised models on fixed sides, turns until the player ends it."""

    __tablename__ = "arena_session"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex: the URL is the capability
    world: Mapped[dict] = mapped_column(JSON)  # title, premise, rules, events (facts with their probes)
    model_a: Mapped[str] = mapped_column(String(128))
    model_b: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default="open")  # open | finished
    seed: Mapped[int] = mapped_column(Integer)
    client: Mapped[str] = mapped_column(String(64))  # hash of the creating browser's client cookie
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class Turn(Base):
    """A player line and both models' replies; `committed` says which reply joined the shared history."""

    __tablename__ = "arena_turn"
    __table_args__ = (UniqueConstraint("session_id", "idx", name="uq_turn_session_idx"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("arena_session.id", ondelete="CASCADE"), index=True)
    idx: Mapped[int] = mapped_column(Integer)
    player_text: Mapped[str] = mapped_column(Text)
    reply_a: Mapped[str | None] = mapped_column(Text, nullable=True)
    reply_b: Mapped[str | None] = mapped_column(Text, nullable=True)
    ms_a: Mapped[float | None] = mapped_column(Float, nullable=True)
    ms_b: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="generating")  # generating | ready | voted
    committed: Mapped[str | None] = mapped_column(String(8), nullable=True)  # a | b | none
    proxy: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # {"a": {...}, "b": {...}}
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    step_a: Mapped[int | None] = mapped_column(Integer, nullable=True)  # v2: learning step that wrote reply_a
    step_b: Mapped[int | None] = mapped_column(Integer, nullable=True)


class VoteRow(Base):
    """One vote per turn (unique), with the model names and proxy scores copied in for export."""

    __tablename__ = "arena_vote"
    __table_args__ = (UniqueConstraint("session_id", "turn_idx", name="uq_vote_session_turn"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("arena_session.id", ondelete="CASCADE"), index=True)
    turn_idx: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(8))  # a | b | tie | both_bad
    model_a: Mapped[str] = mapped_column(String(128))
    model_b: Mapped[str] = mapped_column(String(128))
    proxy_a: Mapped[float | None] = mapped_column(Float, nullable=True)
    proxy_b: Mapped[float | None] = mapped_column(Float, nullable=True)
    client: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    len_a: Mapped[int | None] = mapped_column(Integer, nullable=True)  # v2: reply lengths (characters)
    len_b: Mapped[int | None] = mapped_column(Integer, nullable=True)


class LearnRow(Base):
    """One learning round of a learner game master on a session (v2)."""

    __tablename__ = "arena_learn"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("arena_session.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(128))
    through: Mapped[int] = mapped_column(Integer)  # turns learned after this round
    step: Mapped[int] = mapped_column(Integer)  # optimizer steps after this round
    loss_first: Mapped[float] = mapped_column(Float)
    loss_last: Mapped[float] = mapped_column(Float)
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class CatchRow(Base):
    """A catch pair (v2): a voted turn shown again with the sides swapped; `repeat` is the second answer mapped
    back to the original sides (None until answered; "skip" when the player went on without answering)."""

    __tablename__ = "arena_catch"
    __table_args__ = (UniqueConstraint("session_id", "turn_idx", name="uq_catch_session_turn"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("arena_session.id", ondelete="CASCADE"), index=True)
    turn_idx: Mapped[int] = mapped_column(Integer)
    first: Mapped[str] = mapped_column(String(8))  # the vote on the turn: a | b | tie | both_bad
    repeat: Mapped[str | None] = mapped_column(String(8), nullable=True)
    client: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


V1_TABLES = {"arena_session", "arena_turn", "arena_vote"}
V2_COLUMNS = {"arena_turn": ("step_a", "step_b"), "arena_vote": ("len_a", "len_b")}


def _v1(conn: Connection) -> None:
    """Creates the v1 tables (from today's classes; _v2 then finds its columns present and skips them)."""
    Base.metadata.create_all(conn, tables=[t for n, t in Base.metadata.tables.items() if n in V1_TABLES],
                             checkfirst=True)


def _v2(conn: Connection) -> None:
    for table, cols in V2_COLUMNS.items():
        have = {c["name"] for c in inspect(conn).get_columns(table)}
        for col in cols:
            if col not in have:
                conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {col} INTEGER"))
    Base.metadata.create_all(conn, tables=[LearnRow.__table__, CatchRow.__table__], checkfirst=True)


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "sessions, turns, votes", _v1),
    (2, "learning game masters: reply steps, reply lengths, learning rounds, catch pairs", _v2),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def migrate(engine: Engine) -> list[int]:
    """Apply the migrations not yet recorded; returns the versions applied now."""
    SchemaVersion.__table__.create(engine, checkfirst=True)
    applied = []
    for version, description, step in MIGRATIONS:
        with engine.begin() as conn:
            done = conn.execute(select(SchemaVersion.version).where(SchemaVersion.version == version)).first()
            if done is not None:
                continue
            step(conn)
            conn.execute(SchemaVersion.__table__.insert().values(version=version, description=description,
                                                                 applied_at=utcnow()))
            applied.append(version)
    return applied


def schema_version(engine: Engine) -> int:
    with engine.connect() as conn:
        rows = conn.execute(select(SchemaVersion.version)).scalars().all()
    return max(rows, default=0)


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL, foreign keys and a busy timeout on every connection."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=8, max_overflow=16)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def open_db(url: str) -> tuple[Engine, sessionmaker]:
    """Engine (migrated to the current schema) and a session factory."""
    engine = make_engine(url)
    migrate(engine)
    return engine, sessionmaker(engine, expire_on_commit=False)
