"""The outboxes behind the analyzer's AlertSink (proctor/contracts/outbox.py).

The embedded outbox keeps every alert in the relational store (table `outbox`, read in seq order by the
dispatcher) and appends it to a JSONL file for operators and quick tests; the Redis outbox appends to a
Redis Stream that dispatchers share. The composition root (livekit_proctor.wiring) picks one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from livekit_proctor.contracts.alerts import Alert
from livekit_proctor.contracts.outbox import AlsoWrite
from livekit_proctor.db import OutboxRow
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

    def _commit(self, also: AlsoWrite) -> None:
        assert self._sm is not None
        with self._sm.begin() as db:
            also(db)

    def state(self) -> dict[str, object]:
        return {"kind": "redis_stream", "stream": self.stream, "appended": self.appended,
                "ok": self.last_error is None, "last_error": self.last_error}  # fmt: skip
