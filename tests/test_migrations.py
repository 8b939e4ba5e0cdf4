"""Schema migrations (livekit_proctor.migrations): fresh databases, databases an earlier release made, concurrent
starts; on SQLite and on a real PostgreSQL server (the pg_url fixture of tests/test_postgres.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import JSON, DateTime, Float, Integer, String, Text, create_engine, insert, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from livekit_proctor import migrations
from livekit_proctor.db import ApiKey, AuditRow, Base, OutboxRow, SessionRow, make_engine
from tests.test_postgres import pg_url  # noqa: F401  (the fixture: one PostgreSQL server for this module)

# --- the schema of the release before migrations, verbatim (its proctor/db.py models): what it created


class Old(DeclarativeBase):
    pass


class OldApiKey(Old):
    __tablename__ = "api_keys"
    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class OldSession(Old):
    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    candidate_id: Mapped[str] = mapped_column(String(128), index=True)
    exam_id: Mapped[str] = mapped_column(String(128))
    frontend_instance_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    counters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_verification_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    sitting: Mapped[str | None] = mapped_column(String(32), nullable=True)
    rule_state: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class OldOutbox(Old):
    __tablename__ = "outbox"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(36), unique=True)
    exam_session_id: Mapped[str] = mapped_column(String(128), index=True)
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    delivered_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)


class OldCursor(Old):
    __tablename__ = "dispatch_cursors"
    lane: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[float] = mapped_column(Float, default=0.0)


class OldLease(Old):
    __tablename__ = "dispatch_leases"
    lane: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[float] = mapped_column(Float)


class OldDeadLetter(Old):
    __tablename__ = "dead_letters"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    lane: Mapped[str] = mapped_column(String(64), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    event_id: Mapped[str] = mapped_column(String(36), index=True)
    exam_session_id: Mapped[str] = mapped_column(String(128))
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    dead_at: Mapped[float] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer)
    error: Mapped[str] = mapped_column(Text)
    replay_requested_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    replayed_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class OldAudit(Old):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(128))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def old_release_database(url: str, *, without: tuple[str, ...] = ()) -> None:
    """A database as the previous release left it, with a row in each kind of table.

    without: session columns to drop first (an even older release, before _add_missing_columns added them).
    """
    engine = create_engine(url)
    Old.metadata.create_all(engine)
    with engine.begin() as conn:
        for col in without:  # SQLite >= 3.35 and PostgreSQL both drop columns
            conn.execute(text(f"ALTER TABLE sessions DROP COLUMN {col}"))
    with Session(engine) as db, db.begin():
        db.add(OldApiKey(key_hash="h" * 64, role="system", label="backend", created_at=NOW))
        # Core, naming only the columns every old release had (the ORM would name all of them).
        db.execute(insert(Old.metadata.tables[OldSession.__tablename__]).values(
            id="s-1", candidate_id="c-1", exam_id="e-1", state="active", policy={"p": 1}, metadata={"m": 1},
            counters={"frames": 3}, created_at=NOW, expires_at=NOW))  # fmt: skip
        db.add(OldOutbox(event_id=str(uuid.uuid4()), exam_session_id="s-1", event_type="FACE_MISSING",
                         payload=json.dumps({"x": 1}), created_at=1.0))  # fmt: skip
        db.add(OldCursor(lane="grpc", last_seq=1, updated_at=2.0))
        db.add(OldAudit(at=NOW, actor="admin:abc", action="session.start", target="s-1",
                        detail={"candidate_id": "c-1"}))  # fmt: skip
    engine.dispose()


def schema_diff(url: str) -> list[Any]:
    """What Alembic's autogenerate would change to reach the models: nothing when the revisions match them."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))
    finally:
        engine.dispose()


def version(url: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return migrations.current(conn)
    finally:
        engine.dispose()


def assert_rows_kept(url: str) -> None:
    engine = make_engine(url)
    try:
        with Session(engine) as db:
            assert db.scalars(select(ApiKey.label)).all() == ["backend"]
            s = db.get(SessionRow, "s-1")
            assert s is not None and (s.policy, s.metadata_, s.counters) == ({"p": 1}, {"m": 1}, {"frames": 3})
            assert [(o.seq, o.exam_session_id) for o in db.scalars(select(OutboxRow))] == [(1, "s-1")]
            assert db.scalars(select(AuditRow.action)).all() == ["session.start"]
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a file on SQLite, a new database on the module's PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'proctor.db'}"
        return
    server = request.getfixturevalue("pg_url")
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(server).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


def test_a_fresh_database_is_at_head_and_matches_the_models(db_url: str) -> None:
    make_engine(db_url).dispose()
    assert version(db_url) == migrations.head()
    assert schema_diff(db_url) == []
    assert {"identity_enrollments", "identity_embeddings", "identity_audit"} <= set(
        inspect(create_engine(db_url)).get_table_names()
    )
    make_engine(db_url).dispose()  # a second start: nothing to do
    assert version(db_url) == migrations.head()


def test_a_database_of_the_previous_release_upgrades_in_place_and_keeps_its_rows(db_url: str) -> None:
    old_release_database(db_url)
    assert version(db_url) is None  # no alembic_version: made by create_all
    assert_rows_kept(db_url)  # make_engine: stamped as the baseline, then upgraded
    assert version(db_url) == migrations.head()
    assert schema_diff(db_url) == []


def test_a_database_of_an_older_release_gets_the_columns_it_lacked(db_url: str) -> None:
    old_release_database(db_url, without=("sitting", "rule_state"))
    assert_rows_kept(db_url)
    assert schema_diff(db_url) == []
    engine = make_engine(db_url)
    with Session(engine) as db:
        s = db.get(SessionRow, "s-1")
        assert s is not None and s.sitting is None and s.rule_state is None
    engine.dispose()


def test_a_database_at_the_baseline_is_upgraded_to_head(db_url: str) -> None:
    engine = create_engine(db_url)
    migrations.upgrade(engine, migrations.BASELINE)
    assert version(db_url) == migrations.BASELINE
    assert "identity_enrollments" not in inspect(engine).get_table_names()
    engine.dispose()
    make_engine(db_url).dispose()
    assert version(db_url) == migrations.head()
    assert schema_diff(db_url) == []


def test_processes_starting_together_migrate_once(db_url: str) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            make_engine(db_url).dispose()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert version(db_url) == migrations.head()
    assert schema_diff(db_url) == []


def test_cli_commands_upgrade_an_old_data_dir(tmp_path: Path) -> None:
    """`proctor purge` (cron) and `proctor keys create` open the database through make_engine too."""
    data = tmp_path / "proctor-data"
    data.mkdir()
    url = f"sqlite:///{data / 'proctor.db'}"
    old_release_database(url)
    env = {**os.environ, "PROCTOR_DATA_DIR": str(data)}
    env.pop("PROCTOR_DATABASE_URL", None)
    r = subprocess.run([sys.executable, "-m", "livekit_proctor.cli", "purge", "--dry-run"], env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert version(url) == migrations.head()
    assert_rows_kept(url)
    r = subprocess.run([sys.executable, "-m", "livekit_proctor.cli", "keys", "create", "--role", "proctor"], env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    engine = make_engine(url)
    with Session(engine) as db:
        assert sorted(db.scalars(select(ApiKey.role))) == ["proctor", "system"]
    engine.dispose()
