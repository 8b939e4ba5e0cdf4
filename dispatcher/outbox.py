"""The outboxes behind the analyzer's AlertSink (proctor/contracts/outbox.py).

The embedded outbox keeps every alert in the relational store (table `outbox`, read in seq order by the
dispatcher) and appends it to a JSONL file for operators and quick tests; the Redis outbox appends to a
Redis Stream that dispatchers share. The composition root (livekit_proctor.wiring) picks one.

Both remove a candidate's alerts on a privacy deletion (delete_sessions); the JSONL file is the privacy
route's (wiring.AlertsJsonl).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from livekit_proctor.contracts.alerts import Alert
from livekit_proctor.contracts.outbox import AlsoWrite
from livekit_proctor.db import CursorRow, OutboxRow
from livekit_proctor.dispatcher import jsonl


class SqlOutbox:
    """Durable embedded outbox: SQL table + JSONL file."""

    def __init__(self, sm: sessionmaker, jsonl_path: Path | None) -> None:
        self._sm = sm
        self._jsonl = jsonl_path
        self.appended = 0
        self.last_error: str | None = None
        if jsonl_path is not None:
            jsonl_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)

    def append(self, alert: Alert) -> None:
        self.append_many([alert])

    def append_many(self, alerts: Sequence[Alert], also: AlsoWrite | None = None) -> None:
        payloads = [a.to_json() for a in alerts]
        now = time.time()
        with self._sm.begin() as db:
            for alert, payload in zip(alerts, payloads, strict=True):
                db.add(
                    OutboxRow(
                        event_id=alert.event_id,
                        exam_session_id=alert.exam_session_id,
                        event_type=str(alert.event_type),
                        payload=payload,
                        created_at=now,
                    )
                )
            if also is not None:
                also(db)
        if self._jsonl is not None and payloads:
            jsonl.append(self._jsonl, payloads)  # locked against other writers and the pruner
        self.appended += len(payloads)

    async def publish(self, alert: Alert) -> None:
        await self.publish_many([alert])

    async def publish_many(self, alerts: Sequence[Alert], also: AlsoWrite | None = None) -> None:
        try:
            await asyncio.to_thread(self.append_many, alerts, also)
            self.last_error = None
        except Exception as e:  # surfaced in readiness, never to streaming clients
            self.last_error = f"{type(e).__name__}: {e}"
            raise

    async def delete_sessions(self, session_ids: Sequence[str]) -> dict[str, int]:
        """The sessions' rows, delivered or not: {"outbox": rows deleted, "outbox_redacted": rows emptied}."""
        sids = list(dict.fromkeys(session_ids))
        if not sids:
            return {"outbox": 0, "outbox_redacted": 0}

        def run() -> tuple[int, int]:
            with self._sm.begin() as db:
                return _delete_rows(db, sids)

        gone, redacted = await asyncio.to_thread(run)
        return {"outbox": gone, "outbox_redacted": redacted}

    async def export_sessions(self, session_ids: Sequence[str]) -> list[dict[str, Any]]:
        sids = list(dict.fromkeys(session_ids))
        if not sids:
            return []

        def run() -> list[dict[str, Any]]:
            with self._sm() as db:
                rows = db.scalars(select(OutboxRow).where(OutboxRow.exam_session_id.in_(sids)).order_by(OutboxRow.seq))
                return [_exported(o.seq, o.event_id, o.exam_session_id, o.delivered_at is not None, o.payload)
                        for o in rows]  # fmt: skip

        return await asyncio.to_thread(run)

    def pending(self) -> int:
        with self._sm() as db:
            return db.scalar(select(func.count()).select_from(OutboxRow).where(OutboxRow.delivered_at.is_(None))) or 0

    def state(self) -> dict[str, object]:
        return {
            "kind": "sql_outbox",
            "appended": self.appended,
            "jsonl": str(self._jsonl) if self._jsonl else None,
            "ok": self.last_error is None,
            "last_error": self.last_error,
        }


def _delete_rows(db: Session, sids: list[str]) -> tuple[int, int]:
    """Deletes the sessions' outbox rows; (rows deleted, rows emptied in place)."""
    top = db.scalar(select(func.max(OutboxRow.seq)))
    newest = db.get(OutboxRow, top) if top is not None else None
    redacted = 0
    if newest is not None and newest.exam_session_id in sids:
        delivered = db.scalar(select(func.min(CursorRow.last_seq)))
        if delivered is not None and delivered >= newest.seq:
            # SQLite hands the newest seq out again once its row is gone, below the lanes' cursors, and
            # the next alert would never be sent: keep the row, without the candidate's data.
            newest.payload = json.dumps({"redacted": "privacy deletion"})
            newest.exam_session_id = "redacted"
            redacted = 1
    res = cast("CursorResult[Any]", db.execute(delete(OutboxRow).where(OutboxRow.exam_session_id.in_(sids))))
    return res.rowcount, redacted


class RedisOutbox:
    """Production outbox: appends to a Redis Stream (durable with AOF) that dispatchers share."""

    def __init__(
        self,
        client: Any,
        stream: str = "proctor:alerts",
        jsonl_path: Path | None = None,
        sm: sessionmaker | None = None,
    ) -> None:
        self.r = client
        self.stream = stream
        self._jsonl = jsonl_path
        self._sm = sm  # where `also` work commits (the sessions live in the SQL database)
        self.appended = 0
        self.last_error: str | None = None

    async def publish(self, alert: Alert) -> None:
        await self.publish_many([alert])

    async def publish_many(self, alerts: Sequence[Alert], also: AlsoWrite | None = None) -> None:
        payloads = [a.to_json() for a in alerts]
        try:
            if payloads:
                async with self.r.pipeline(transaction=True) as pipe:
                    for alert, payload in zip(alerts, payloads, strict=True):
                        pipe.xadd(
                            self.stream,
                            {
                                "event_id": alert.event_id,
                                "exam_session_id": alert.exam_session_id,
                                "event_type": str(alert.event_type),
                                "payload": payload,
                                "created_at": repr(time.time()),
                            },
                        )
                    await pipe.execute()
            self.last_error = None
        except Exception as e:
            self.last_error = f"{type(e).__name__}: {e}"
            raise
        self.appended += len(payloads)
        if also is not None:
            if self._sm is None:
                raise RuntimeError("RedisOutbox needs a sessionmaker for work committed with alerts")
            await asyncio.to_thread(self._commit, also)
        if self._jsonl is not None and payloads:
            await asyncio.to_thread(jsonl.append, self._jsonl, payloads)

    async def delete_sessions(self, session_ids: Sequence[str], page: int = 500) -> dict[str, int]:
        """XDELs the sessions' entries, delivered or not, and XACKs them in every consumer group in the same
        MULTI, so that no dispatcher reads, claims or re-delivers them afterwards. A dispatcher that read one
        before may still send it once (it is in its hands); its later XACK is a no-op.
        {"outbox": entries deleted, "outbox_pending": (lane, entry) pairs read but not yet acknowledged}."""
        ids = [eid for eid, _ in await self._entries_of(session_ids, page)]
        if not ids:
            return {"outbox": 0, "outbox_pending": 0}
        groups = [_b(g["name"]) for g in await self.r.xinfo_groups(self.stream)]
        async with self.r.pipeline(transaction=True) as pipe:
            for g in groups:
                pipe.xack(self.stream, g, *ids)
            pipe.xdel(self.stream, *ids)
            res = await pipe.execute()
        return {"outbox": int(res[-1]), "outbox_pending": sum(int(n) for n in res[:-1])}

    async def export_sessions(self, session_ids: Sequence[str], page: int = 500) -> list[dict[str, Any]]:
        """The sessions' entries (one pass over the stream, as delete_sessions). "delivered": every consumer
        group has read the entry (its last-delivered id is past it) and acknowledged it (not pending); None
        while no group exists yet."""
        found = await self._entries_of(session_ids, page)
        if not found:
            return []
        groups = await self.r.xinfo_groups(self.stream)
        ours = {eid for eid, _ in found}
        pending: set[bytes] = set()
        for g in groups:
            # Other sessions' entries may be pending between ours too: page through the range, keep ours.
            start = found[0][0].decode()
            while True:
                rows = await self.r.xpending_range(self.stream, _b(g["name"]), min=start, max=found[-1][0], count=page)
                pending |= {m for r in rows if (m := _b(r["message_id"])) in ours}
                if len(rows) < page:
                    break
                start = "(" + _b(rows[-1]["message_id"]).decode()
        read_by_all = [_stream_id(_b(g["last-delivered-id"])) for g in groups]

        def delivered(eid: bytes) -> bool | None:
            if not groups:
                return None
            return eid not in pending and all(_stream_id(eid) <= last for last in read_by_all)

        return [
            _exported(eid.decode(), _field(f, "event_id"), _field(f, "exam_session_id"), delivered(eid),
                      _field(f, "payload"))
            for eid, f in found
        ]  # fmt: skip

    async def _entries_of(self, session_ids: Sequence[str], page: int) -> list[tuple[bytes, dict[Any, Any]]]:
        """(entry id, fields) of the sessions' entries, oldest first. The stream is not indexed by session: one
        pass over it, a page at a time."""
        sids = {s.encode() for s in session_ids}
        found: list[tuple[bytes, dict[Any, Any]]] = []
        start = "-"
        while sids:
            entries = await self.r.xrange(self.stream, min=start, max="+", count=page)
            found += [(_b(eid), f) for eid, f in entries if _session_of(f) in sids]
            if len(entries) < page:
                break
            start = "(" + _b(entries[-1][0]).decode()
        return found

    def _commit(self, also: AlsoWrite) -> None:
        assert self._sm is not None
        with self._sm.begin() as db:
            also(db)

    def state(self) -> dict[str, object]:
        return {"kind": "redis_stream", "stream": self.stream, "appended": self.appended,
                "ok": self.last_error is None, "last_error": self.last_error}  # fmt: skip


def _b(v: Any) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode()


def _field(fields: dict[Any, Any], name: str) -> str:
    v = fields.get(name.encode(), fields.get(name))
    return "" if v is None else _b(v).decode()


def _stream_id(eid: bytes) -> tuple[int, int]:
    ms, _, n = eid.decode().partition("-")
    return int(ms), int(n or 0)


def _exported(seq: int | str, event_id: str, sid: str, delivered: bool | None, payload: str) -> dict[str, Any]:
    try:
        alert: Any = json.loads(payload)
    except ValueError:
        alert = payload
    return {"seq": seq, "event_id": event_id, "exam_session_id": sid, "delivered": delivered, "alert": alert}


def _session_of(fields: dict[Any, Any]) -> bytes | None:
    """An entry's exam_session_id, whether the client decodes responses or not."""
    v = fields.get(b"exam_session_id", fields.get("exam_session_id"))
    return None if v is None else _b(v)
