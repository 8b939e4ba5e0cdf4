"""Schema migrations (Alembic), shipped in the package and applied by make_engine at every start.

No alembic.ini: the script location is this folder and env.py runs on the connection given here, so an
installed wheel migrates its database the same way a checkout does. Revisions live in versions/:

    v0001_baseline  the schema of the releases before migrations; also adopts a database one of them made
                    (creates what is missing, adds the nullable columns older releases lacked) and stamps it
    v0002_identity  enrollments, embeddings (encrypted), the identity audit log

Several processes may start at once (`proctor serve` and `proctor dispatcher`, a cron'd `proctor purge`): the
upgrade holds a lock (PostgreSQL: an advisory lock; SQLite: BEGIN IMMEDIATE, the write lock) and runs in that
one transaction, so the second process waits and then finds the database at head.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

HERE = Path(__file__).resolve().parent
BASELINE = "0001"
_PG_LOCK = 0x70726F63  # pg_advisory_xact_lock key: "proc"

log = logging.getLogger("proctor")
# Alembic says "Context impl ..." at INFO on every start; the line below (migrated from -> to) is enough.
logging.getLogger("alembic").setLevel(logging.WARNING)


def config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    rev = ScriptDirectory.from_config(config()).get_current_head()
    assert rev is not None
    return rev


def current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, target: str = "head") -> None:
    """Brings the database to `target` (default: the newest revision); a no-op when it is there already."""
    want = head() if target == "head" else target
    with engine.connect() as conn:
        if current(conn) == want:
            return
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            # pysqlite runs DDL outside transactions: take the write lock ourselves, so the DDL and the
            # version stamp commit together and a concurrent start waits (busy timeout) instead of racing.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})
        before = current(conn)
        if before == want:
            return
        command.upgrade(config(conn), target)
        log.info("database migrated from %s to %s", before or "an unversioned schema", want)
