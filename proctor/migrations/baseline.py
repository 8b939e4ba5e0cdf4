"""The schema of the releases before migrations, frozen: revision 0001 creates it or completes an old one.

A copy, not proctor/db.py's models: those move on with later revisions, this stays what the old releases
made (their create_all, plus the nullable columns their _add_missing_columns added on upgrade).
"""

from __future__ import annotations

from sqlalchemy import JSON, Column, DateTime, Float, Integer, MetaData, String, Table, Text, inspect
from sqlalchemy.engine import Connection

BASELINE = MetaData()

Table(
    "api_keys", BASELINE,
    Column("key_hash", String(64), primary_key=True),
    Column("role", String(16), nullable=False),
    Column("label", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)  # fmt: skip
Table(
    "sessions", BASELINE,
    Column("id", String(128), primary_key=True),
    Column("candidate_id", String(128), nullable=False, index=True),
    Column("exam_id", String(128), nullable=False),
    Column("frontend_instance_id", String(128), nullable=True),
    Column("state", String(16), nullable=False, index=True),
    Column("policy", JSON, nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("counters", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True), nullable=True),
    Column("last_verification_at", DateTime(timezone=True), nullable=True),
    Column("sitting", String(32), nullable=True),
    Column("rule_state", JSON, nullable=True),
)  # fmt: skip
Table(
    "outbox", BASELINE,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("exam_session_id", String(128), nullable=False, index=True),
    Column("event_type", String(64), nullable=False),
    Column("payload", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("delivered_at", Float, nullable=True, index=True),
)  # fmt: skip
Table(
    "dispatch_cursors", BASELINE,
    Column("lane", String(64), primary_key=True),
    Column("last_seq", Integer, nullable=False),
    Column("updated_at", Float, nullable=False),
)  # fmt: skip
Table(
    "dispatch_leases", BASELINE,
    Column("lane", String(64), primary_key=True),
    Column("owner", String(128), nullable=False),
    Column("expires_at", Float, nullable=False),
)  # fmt: skip
Table(
    "dead_letters", BASELINE,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("lane", String(64), nullable=False, index=True),
    Column("seq", Integer, nullable=False),
    Column("event_id", String(36), nullable=False, index=True),
    Column("exam_session_id", String(128), nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("payload", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("dead_at", Float, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("error", Text, nullable=False),
    Column("replay_requested_at", Float, nullable=True, index=True),
    Column("replayed_at", Float, nullable=True),
)  # fmt: skip
Table(
    "audit_log", BASELINE,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(64), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", String(128), nullable=False),
    Column("detail", JSON, nullable=False),
)  # fmt: skip


def adopt(conn: Connection) -> None:
    """Creates the baseline tables that are missing and adds the nullable columns an older release lacked."""
    BASELINE.create_all(conn, checkfirst=True)
    insp = inspect(conn)
    for table in BASELINE.sorted_tables:
        have = {c["name"] for c in insp.get_columns(table.name)}
        for col in table.columns:
            if col.name in have:
                continue
            if not col.nullable:
                raise RuntimeError(f"table {table.name} lacks the non-nullable column {col.name}: migrate by hand")
            ddl = f"ALTER TABLE {table.name} ADD COLUMN {col.name} {col.type.compile(dialect=conn.dialect)}"
            conn.exec_driver_sql(ddl)
