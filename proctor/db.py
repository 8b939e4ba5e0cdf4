"""Relational storage through SQLAlchemy: SQLite embedded, PostgreSQL in production.

Only what the service must keep: API keys (hashed), sessions (short-lived state),
the alert outbox, a minimal audit log, and the identity data of enrolled candidates
(face embeddings encrypted: livekit_proctor.identity_store). Calls are synchronous;
async code runs them through asyncio.to_thread so the event loop never waits on the
database. The schema is made and upgraded by Alembic (livekit_proctor.migrations):
a change to these models needs a new revision there.
"""

from __future__ import annotations

import contextlib
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from livekit_proctor import migrations


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"
    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SessionRow(Base):
    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    candidate_id: Mapped[str] = mapped_column(String(128), index=True)
    exam_id: Mapped[str] = mapped_column(String(128))
    frontend_instance_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # active | ended | expired
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    counters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_verification_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # A new random id per sitting (a session id may be reused later): stream tokens are bound to it.
    sitting: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # Open incidents, calibration, risk and rate-limit state of the rules, so a restart continues them.
    rule_state: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class OutboxRow(Base):
    """Alerts waiting for (or done with) delivery; the dispatcher reads them in seq order."""

    __tablename__ = "outbox"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(36), unique=True)
    exam_session_id: Mapped[str] = mapped_column(String(128), index=True)
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    delivered_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)


class CursorRow(Base):
    """Per delivery lane (a transport, or the fallback chain): the last outbox seq it delivered."""

    __tablename__ = "dispatch_cursors"
    lane: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[float] = mapped_column(Float, default=0.0)


class LeaseRow(Base):
    """Only one dispatcher works a SQL outbox lane at a time (the Redis outbox shares work instead)."""

    __tablename__ = "dispatch_leases"
    lane: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[float] = mapped_column(Float)


class DeadLetterRow(Base):
    """Alerts a lane gave up on after its retries, with the last error; replayable."""

    __tablename__ = "dead_letters"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    lane: Mapped[str] = mapped_column(String(64), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    event_id: Mapped[str] = mapped_column(String(36), index=True)
    exam_session_id: Mapped[str] = mapped_column(String(128))
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)  # when the analyzer appended the alert
    dead_at: Mapped[float] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer)
    error: Mapped[str] = mapped_column(Text)
    replay_requested_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    replayed_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class AuditRow(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    actor: Mapped[str] = mapped_column(String(64))  # role and key prefix, never the key
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(128))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class EnrollmentRow(Base):
    """A candidate's enrolled face: one per candidate; re-enrollment replaces it (and its embeddings)."""

    __tablename__ = "identity_enrollments"
    enrollment_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    candidate_id: Mapped[str] = mapped_column(String(128), unique=True)
    exam_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)  # first enrollment
    replaced_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The candidate's latest session as far as identity retention knows (sessions rows are short-lived).
    last_session_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    model: Mapped[str] = mapped_column(String(64), default="")  # which embedding model made the vectors
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    # The average of the selected embeddings, encrypted (livekit_proctor.crypto); null when none was selected.
    template: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class EmbeddingRow(Base):
    """One enrollment image's face embedding (encrypted) and the quality figures it was selected by."""

    __tablename__ = "identity_embeddings"
    embedding_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    enrollment_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("identity_enrollments.enrollment_id", ondelete="CASCADE"), index=True
    )
    candidate_id: Mapped[str] = mapped_column(String(128), index=True)
    position: Mapped[int] = mapped_column(Integer)  # the image's place in the enrollment request
    quality_score: Mapped[float] = mapped_column(Float)
    face_bbox: Mapped[list[float]] = mapped_column(JSON)
    pose_angles: Mapped[dict[str, float]] = mapped_column(JSON)
    sharpness_score: Mapped[float] = mapped_column(Float)
    selected: Mapped[bool] = mapped_column(Boolean)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32 little-endian, AES-256-GCM encrypted
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class IdentityAuditRow(Base):
    """Who enrolled, verified, deleted or exported a candidate's identity data, and the outcome (no vectors)."""

    __tablename__ = "identity_audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    action: Mapped[str] = mapped_column(String(16))  # identity_store.ACTIONS
    candidate_id: Mapped[str] = mapped_column(String(128), index=True)
    key_id: Mapped[str] = mapped_column(String(64))  # the API key's id (hash prefix), never the key
    role: Mapped[str] = mapped_column(String(16))
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


def sqlite_path(url: str) -> Path | None:
    """The database file of a file-backed SQLite URL, else None (PostgreSQL, :memory:, URI filenames)."""
    u = make_url(url)
    db = u.database
    if u.get_backend_name() != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db)


def make_engine(url: str) -> Engine:
    kwargs: dict[str, Any] = {"future": True}
    path = sqlite_path(url)
    if path is not None and path.parent.is_dir():
        # SQLite would create the file 0644 and gives -wal / -shm the file's mode: create it private
        # first (an empty file is an empty database).
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _rec: Any) -> None:
            # WAL lets the dispatcher read while the analyzer appends.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    migrations.upgrade(engine)
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
