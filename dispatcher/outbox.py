"""The one interface through which alerts leave the analyzer.

The analyzer appends and never waits on a transport. The embedded outbox
keeps every alert in the relational store (table `outbox`, read in seq order by
the dispatcher) and appends it to a JSONL file for operators and quick tests.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from dispatcher import jsonl
from proctor.contracts.alerts import Alert
from proctor.db import OutboxRow


class AlertSink(Protocol):
    async def publish(self, alert: Alert) -> None: ...

    def state(self) -> dict[str, object]: ...


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
        payload = alert.to_json()
        with self._sm.begin() as db:
            db.add(
                OutboxRow(
                    event_id=alert.event_id,
                    exam_session_id=alert.exam_session_id,
                    event_type=str(alert.event_type),
                    payload=payload,
                    created_at=time.time(),
                )
            )
        if self._jsonl is not None:
            jsonl.append(self._jsonl, [payload])  # locked against other writers and the pruner
        self.appended += 1

    async def publish(self, alert: Alert) -> None:
        try:
            await asyncio.to_thread(self.append, alert)
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

    def __init__(self, client: Any, stream: str = "proctor:alerts", jsonl_path: Path | None = None) -> None:
        self.r = client
        self.stream = stream
        self._jsonl = jsonl_path
        self.appended = 0
        self.last_error: str | None = None

    async def publish(self, alert: Alert) -> None:
        payload = alert.to_json()
        try:
            await self.r.xadd(
                self.stream,
                {
                    "event_id": alert.event_id,
                    "exam_session_id": alert.exam_session_id,
                    "event_type": str(alert.event_type),
                    "payload": payload,
                    "created_at": repr(time.time()),
                },
            )
            self.last_error = None
        except Exception as e:
            self.last_error = f"{type(e).__name__}: {e}"
            raise
        self.appended += 1
        if self._jsonl is not None:
            await asyncio.to_thread(self._write_jsonl, payload)

    def _write_jsonl(self, payload: str) -> None:
        assert self._jsonl is not None
        jsonl.append(self._jsonl, [payload])

    def state(self) -> dict[str, object]:
        return {"kind": "redis_stream", "stream": self.stream, "appended": self.appended,
                "ok": self.last_error is None, "last_error": self.last_error}  # fmt: skip
