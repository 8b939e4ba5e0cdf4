"""Sessions' durable rows (SessionRow) and their audit trail; every database call runs in a thread."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker

from livekit_proctor.analyzer.sessions.errors import SessionNotFound
from livekit_proctor.contracts.api import EffectivePolicy, SessionStartRequest
from livekit_proctor.contracts.outbox import AlsoWrite
from livekit_proctor.db import AuditRow, SessionRow, utcnow


def aware(dt: datetime) -> datetime:
    # SQLite drops tzinfo; everything we store is UTC.
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def saver(
    sid: str,
    sitting: str,
    counters: dict[str, Any],
    rule_state: dict[str, Any] | None,
    last_verification_at: datetime | None = None,
) -> AlsoWrite:
    """Database work that saves a session's counters (and rule state, and the time of its latest face check) in
    the caller's transaction."""

    def write(db: OrmSession) -> None:
        row = db.get(SessionRow, sid)
        if row is None or row.state != "active" or (row.sitting or "") != sitting:
            return  # ended meanwhile, or a later sitting: nothing of this one to save
        row.counters = counters
        if rule_state is not None:
            row.rule_state = rule_state
        if last_verification_at is not None:
            row.last_verification_at = last_verification_at

    return write


class SessionStore:
    def __init__(self, sm: sessionmaker) -> None:
        self.sm = sm

    async def get(self, sid: str) -> SessionRow | None:
        def q() -> SessionRow | None:
            with self.sm() as db:
                return db.get(SessionRow, sid)

        return await asyncio.to_thread(q)

    async def create(self, req: SessionStartRequest, policy: EffectivePolicy, actor: str, ttl_s: float) -> SessionRow:
        """A new sitting of this session id (an ended session's row is replaced), audited."""

        def create() -> SessionRow:
            now = utcnow()
            with self.sm.begin() as db:
                old = db.get(SessionRow, req.exam_session_id)
                if old is not None:
                    db.delete(old)  # an ended session id is reused for a new sitting
                    db.flush()
                new = SessionRow(
                    id=req.exam_session_id,
                    sitting=uuid.uuid4().hex,
                    candidate_id=req.candidate_id,
                    exam_id=req.exam_id,
                    frontend_instance_id=req.frontend_instance_id,
                    state="active",
                    policy=policy.model_dump(mode="json"),
                    metadata_=req.metadata,
                    counters={},
                    created_at=now,
                    expires_at=now + timedelta(seconds=ttl_s),
                )
                db.add(new)
                db.add(
                    AuditRow(
                        actor=actor,
                        action="session.start",
                        target=req.exam_session_id,
                        detail={"candidate_id": req.candidate_id, "exam_id": req.exam_id},
                    )
                )
            return new

        return await asyncio.to_thread(create)

    async def finish(
        self, sid: str, state: str, actor: str, reason: str, last: tuple[dict[str, Any], dict[str, Any]] | None
    ) -> SessionRow:
        """Marks an active session ended / expired (with its last counters and rule state), audited."""

        def finish() -> SessionRow:
            with self.sm.begin() as db:
                row = db.get(SessionRow, sid)
                if row is None:
                    raise SessionNotFound(sid)
                if row.state == "active":
                    row.state = state
                    row.ended_at = utcnow()
                    if last is not None:
                        row.counters, row.rule_state = last
                db.add(AuditRow(actor=actor, action=f"session.{state}", target=sid, detail={"reason": reason}))
                return row

        return await asyncio.to_thread(finish)

    async def save(self, writers: list[AlsoWrite]) -> None:
        """Runs these savers in one transaction."""
        if not writers:
            return

        def write() -> None:
            with self.sm.begin() as db:
                for w in writers:
                    w(db)

        await asyncio.to_thread(write)

    async def active(self) -> list[SessionRow]:
        def q() -> list[SessionRow]:
            with self.sm() as db:
                return list(db.scalars(select(SessionRow).where(SessionRow.state == "active")).all())

        return await asyncio.to_thread(q)

    async def ended_elsewhere(self, sittings: dict[str, str]) -> dict[str, str]:
        """Of these sessions (id -> sitting) live in this process, those another node ended, restarted or deleted
        since: id -> why ("deleted": the row is gone, a privacy deletion; else "ended_elsewhere"). The rows are
        the state nodes on one database share; an owner node sees the change at its next sweep."""
        if not sittings:
            return {}

        def q() -> dict[str, str]:
            with self.sm() as db:
                stmt = select(SessionRow.id, SessionRow.state, SessionRow.sitting).where(
                    SessionRow.id.in_(list(sittings))
                )
                rows = {sid: (state, sitting or "") for sid, state, sitting in db.execute(stmt)}
            out = {}
            for sid, sitting in sittings.items():
                row = rows.get(sid)
                if row is None:
                    out[sid] = "deleted"
                elif row != ("active", sitting):
                    out[sid] = "ended_elsewhere"
            return out

        return await asyncio.to_thread(q)

    async def expired_ids(self, limit: int = 500) -> list[str]:
        """Active sessions past their expiry, whichever process (if any) serves them."""

        def q() -> list[str]:
            with self.sm() as db:
                stmt = select(SessionRow.id).where(SessionRow.state == "active", SessionRow.expires_at <= utcnow())
                return list(db.scalars(stmt.limit(limit)).all())

        return await asyncio.to_thread(q)

    async def recent(self, state: str | None = None, limit: int = 100) -> list[SessionRow]:
        def q() -> list[SessionRow]:
            with self.sm() as db:
                stmt = select(SessionRow).order_by(SessionRow.created_at.desc()).limit(limit)
                if state:
                    stmt = stmt.where(SessionRow.state == state)
                return list(db.scalars(stmt).all())

        return await asyncio.to_thread(q)

    async def prune_ended(self, retention_s: float) -> int:
        """Deletes ended / expired sessions past their retention: session state is short-lived."""

        def prune() -> int:
            cutoff = utcnow() - timedelta(seconds=retention_s)
            with self.sm.begin() as db:
                rows = db.scalars(
                    select(SessionRow).where(SessionRow.state != "active", SessionRow.ended_at < cutoff)
                ).all()
                for row in rows:
                    db.delete(row)
                return len(rows)

        return await asyncio.to_thread(prune)
