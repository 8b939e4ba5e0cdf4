"""How long alert data lives: delivered outbox rows, dead letters, the audit log, alerts.jsonl, the Redis outbox;
and identity data: enrollments (embeddings, template) identity_retention_s after the candidate's last session,
identity audit rows after audit_retention_s (livekit_proctor.identity_store.purge_identity).

`purge` removes what is past its retention (the *_retention_s settings; 0 keeps that kind forever). It
never removes an alert a delivery lane has not delivered yet. The lanes waited for are those the settings
configure (dispatcher/service.py) plus every lane the outbox has seen (a cursor or a lease row), so a
purge run with other settings than the dispatcher's (cron, an analyzer without the embedded dispatcher)
is still safe. A lane removed from the configuration holds rows back until its cursor row is deleted.

The running server calls `purge_due` (livekit_proctor.wiring), at most every purge_interval_s;
`proctor purge` runs `purge` once (cron). Both are idempotent and safe to run concurrently.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.orm import sessionmaker

from livekit_proctor.db import AuditRow, CursorRow, DeadLetterRow, IdentityAuditRow, LeaseRow, OutboxRow
from livekit_proctor.dispatcher import jsonl
from livekit_proctor.dispatcher.service import lane_names
from livekit_proctor.dispatcher.source import GROUP_PREFIX
from livekit_proctor.identity_store import purge_identity
from livekit_proctor.settings import Settings

log = logging.getLogger("proctor.retention")

BATCH = 2000  # outbox rows per delete transaction: short write locks while the server appends


@dataclass
class PurgeReport:
    dry_run: bool = False
    outbox: int = 0
    outbox_held: int = 0  # past retention, not yet delivered by every lane: kept
    held_by: list[str] = field(default_factory=list)
    dead_letters: int = 0
    audit: int = 0
    enrollments: int = 0  # identity: enrollments (with their embeddings) past identity retention
    identity_audit: int = 0
    jsonl: int = 0
    redis: int | None = None  # None: the SQL outbox is in use

    @property
    def total(self) -> int:
        identity = self.enrollments + self.identity_audit
        return self.outbox + self.dead_letters + self.audit + identity + self.jsonl + (self.redis or 0)

    def line(self) -> str:
        parts = [f"{self.outbox} outbox rows", f"{self.dead_letters} dead letters", f"{self.audit} audit rows",
                 f"{self.jsonl} alerts.jsonl lines", f"{self.enrollments} enrollments",
                 f"{self.identity_audit} identity audit rows"]  # fmt: skip
        if self.redis is not None:
            parts.append(f"{self.redis} redis outbox entries")
        out = ("would remove " if self.dry_run else "removed ") + ", ".join(parts)
        if self.held_by:
            n = f"{self.outbox_held} " if self.outbox_held else ""
            out += f"; kept {n}expired outbox entries not yet delivered by lane {', '.join(self.held_by)}"
        return out


def _cutoff(now: float, retention_s: int) -> float | None:
    return now - retention_s if retention_s > 0 else None


def _outbox(sm: sessionmaker, lanes: list[str], cutoff: float, dry_run: bool) -> tuple[int, int, list[str]]:
    """(rows removed, expired rows kept for a lane, the lanes holding them)."""
    with sm() as db:
        top = db.scalar(select(func.max(OutboxRow.seq)))
        last_expired = db.scalar(select(func.max(OutboxRow.seq)).where(OutboxRow.created_at < cutoff))
        if top is None or last_expired is None:
            return 0, 0, []
        known = set(lanes) | set(db.scalars(select(CursorRow.lane))) | set(db.scalars(select(LeaseRow.lane)))
        cursors = dict(db.execute(select(CursorRow.lane, CursorRow.last_seq)).tuples().all())
        position = {lane: cursors.get(lane, 0) for lane in known}
        delivered = min(position.values(), default=top)
        # Never the newest row: SQLite (no AUTOINCREMENT) would hand its seq out again, below the cursors.
        bound = min(delivered, top - 1, last_expired)
        held = db.scalar(
            select(func.count()).select_from(OutboxRow).where(OutboxRow.created_at < cutoff, OutboxRow.seq > delivered)
        )
        held_by = sorted(lane for lane, p in position.items() if p < last_expired)
        first = db.scalar(select(func.min(OutboxRow.seq)))
        expired_delivered = and_(OutboxRow.created_at < cutoff, OutboxRow.seq <= bound)
        if dry_run or first is None or bound < first:
            n = db.scalar(select(func.count()).select_from(OutboxRow).where(expired_delivered)) or 0
            return n, held or 0, held_by if held else []
    removed, lo = 0, first
    while lo <= bound:
        hi = min(lo + BATCH - 1, bound)
        with sm.begin() as db:
            removed += db.execute(delete(OutboxRow).where(OutboxRow.seq.between(lo, hi), expired_delivered)).rowcount
        lo = hi + 1
    return removed, held or 0, held_by if held else []


def _dead_letters(sm: sessionmaker, replayed_cutoff: float | None, dead_cutoff: float | None, dry_run: bool) -> int:
    due = []
    if replayed_cutoff is not None:  # replayed: delivered, so the delivered outbox rows' lifetime
        due.append(and_(DeadLetterRow.replayed_at.is_not(None), DeadLetterRow.replayed_at < replayed_cutoff))
    if dead_cutoff is not None:  # never replayed (and no replay in flight)
        due.append(and_(DeadLetterRow.replayed_at.is_(None), DeadLetterRow.replay_requested_at.is_(None),
                        DeadLetterRow.dead_at < dead_cutoff))  # fmt: skip
    if not due:
        return 0
    return _delete(sm, DeadLetterRow, or_(*due), dry_run)


def _delete(sm: sessionmaker, model: Any, where: Any, dry_run: bool) -> int:
    if dry_run:
        with sm() as db:
            return db.scalar(select(func.count()).select_from(model).where(where)) or 0
    with sm.begin() as db:
        return db.execute(delete(model).where(where)).rowcount


def _stream_id(v: Any) -> tuple[int, int]:
    ms, _, n = (v.decode() if isinstance(v, bytes) else str(v)).partition("-")
    return int(ms), int(n or 0)


def _trim_redis(s: Settings, lanes: list[str], cutoff: float, dry_run: bool) -> tuple[int, list[str]]:
    """Trims the Redis outbox stream below what every consumer group acknowledged and the cutoff.

    (entries removed, lanes that hold entries back). A lane configured here whose group does not
    exist yet will read the stream from its start: nothing is trimmed until it exists.
    """
    import redis

    r = redis.Redis.from_url(s.redis_url)
    try:
        if not r.exists(s.outbox_stream):
            return 0, []
        groups = {(g["name"].decode() if isinstance(g["name"], bytes) else g["name"]): g
                  for g in r.xinfo_groups(s.outbox_stream)}  # fmt: skip
        limit = (int(cutoff * 1000), 0)
        if not r.xrange(s.outbox_stream, min="-", max=f"({limit[0]}-0", count=1):
            return 0, []  # nothing expired
        missing = [lane for lane in lanes if GROUP_PREFIX + lane not in groups]
        if missing:
            return 0, missing
        safe, holders = limit, []
        for name, g in groups.items():
            pending = r.xpending(s.outbox_stream, name)
            if pending["pending"]:
                acked_below = _stream_id(pending["min"])  # the oldest entry not acknowledged
            else:
                ms, n = _stream_id(g["last-delivered-id"])
                acked_below = (ms, n + 1)  # everything delivered so far was acknowledged
            if acked_below < limit:
                holders.append(name.removeprefix(GROUP_PREFIX))
            safe = min(safe, acked_below)
        minid = f"{safe[0]}-{safe[1]}"
        if not r.xrange(s.outbox_stream, min=minid, max=f"({limit[0]}-0", count=1):
            holders = []  # no expired entry waits for them
        if dry_run:
            return sum(1 for _ in _ids_below(r, s.outbox_stream, minid)), holders
        return int(r.xtrim(s.outbox_stream, minid=minid, approximate=False)), holders
    finally:
        r.close()


def _ids_below(r: Any, stream: str, minid: str) -> Any:
    start = "-"
    while True:
        page = r.xrange(stream, min=start, max=f"({minid}", count=1000)
        yield from page
        if len(page) < 1000:
            return
        start = f"({page[-1][0].decode()}"


def purge(s: Settings, sm: sessionmaker, *, now: float | None = None, dry_run: bool = False) -> PurgeReport:
    """Removes (or, dry_run, counts) everything past its retention; see the module docstring."""
    now = time.time() if now is None else now
    lanes = lane_names(s)
    rep = PurgeReport(dry_run=dry_run)
    delivered_cut = _cutoff(now, s.outbox_retention_s)
    if delivered_cut is not None:
        rep.outbox, rep.outbox_held, rep.held_by = _outbox(sm, lanes, delivered_cut, dry_run)
    rep.dead_letters = _dead_letters(sm, delivered_cut, _cutoff(now, s.dlq_retention_s), dry_run)
    if (cut := _cutoff(now, s.audit_retention_s)) is not None:
        rep.audit = _delete(sm, AuditRow, AuditRow.at < datetime.fromtimestamp(cut, UTC), dry_run)
        where = IdentityAuditRow.at < datetime.fromtimestamp(cut, UTC)
        rep.identity_audit = _delete(sm, IdentityAuditRow, where, dry_run)
    # After the audit purge: a retention deletion's own record stays for audit_retention_s.
    rep.enrollments = purge_identity(sm, s.identity_retention_s, now=datetime.fromtimestamp(now, UTC), dry_run=dry_run)
    if (cut := _cutoff(now, s.alerts_jsonl_retention_s)) is not None:
        rep.jsonl = jsonl.prune(s.resolved_outbox_jsonl(), cut, dry_run=dry_run)
    if s.outbox == "redis":
        rep.redis = 0
        if delivered_cut is not None:
            rep.redis, holders = _trim_redis(s, lanes, delivered_cut, dry_run)
            rep.held_by = sorted(set(rep.held_by) | set(holders))
    return rep


_last_run: dict[tuple[str, str], float] = {}  # (database, jsonl) -> monotonic time of this process's last purge


async def purge_due(s: Settings, sm: sessionmaker) -> PurgeReport | None:
    """The running server's retention (wired beside the analyzer): a purge every purge_interval_s."""
    if s.purge_interval_s <= 0:
        return None
    key = (s.resolved_database_url(), str(s.resolved_outbox_jsonl()))
    last = _last_run.get(key)
    if last is not None and time.monotonic() - last < s.purge_interval_s:
        return None
    _last_run[key] = time.monotonic()
    try:
        rep = await asyncio.to_thread(purge, s, sm)
    except Exception:
        log.exception("retention purge failed; retrying in %ss", s.purge_interval_s)
        return None
    if rep.total or rep.held_by:
        log.info("retention: %s", rep.line())
    return rep
