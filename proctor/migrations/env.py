"""Alembic's environment: runs the revisions on the connection livekit_proctor.migrations.upgrade passes."""

from __future__ import annotations

from alembic import context

from livekit_proctor.db import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through livekit_proctor.migrations.upgrade (it passes the connection)")
# render_as_batch: SQLite alters tables by copying them; batch mode does that for later revisions.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
