"""The outbox: the one interface through which alerts leave the analyzer, and the envelope a dispatcher reads.

The analyzer appends to an AlertSink and never waits on a transport; which sink (SQL table, Redis Stream)
is chosen by the composition root (livekit_proctor.wiring). A dispatcher reads the outbox back as
Envelopes, in order, and hands them to its transports (docs/delivery.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from livekit_proctor.contracts.alerts import Alert

if TYPE_CHECKING:
    from sqlalchemy.orm import Session as OrmSession

# Work to commit together with appended alerts (the session's rule state: the transactional outbox).
AlsoWrite = Callable[["OrmSession"], None]


class AlertSink(Protocol):
    async def publish(self, alert: Alert) -> None: ...

    async def publish_many(self, alerts: Sequence[Alert], also: AlsoWrite | None = None) -> None:
        """Appends alerts in order. `also` runs in the same database transaction for the SQL outbox, so a
        session's state and the alerts it produced commit together; other sinks run it right after."""

    async def delete_sessions(self, session_ids: Sequence[str]) -> dict[str, int]:
        """Removes every alert of these sessions the outbox still holds, delivered or not (evidence thumbnails
        are inside the alerts), so that no dispatcher delivers them afterwards: a privacy deletion. Returns
        counts by kind (at least "outbox": alerts removed). Copies a transport already delivered are out of
        reach."""
        ...

    async def export_sessions(self, session_ids: Sequence[str]) -> list[dict[str, Any]]:
        """Every alert of these sessions the outbox still holds, oldest first, for a privacy export:
        {"seq", "event_id", "exam_session_id", "delivered", "alert"}. "delivered": True once every reader
        (dispatcher lane / consumer group) has it, False before, None when the outbox cannot tell."""
        ...

    def state(self) -> dict[str, object]:
        """Shown in readiness and admin stats; "ok": False while appends fail."""
        ...


@dataclass(frozen=True, slots=True)
class Envelope:
    """One alert as the outbox holds it (an `outbox` row or a Redis Stream entry)."""

    seq: int  # position in the outbox: increasing, unique per outbox
    event_id: str  # the alert's event_id: the consumers' deduplication key
    exam_session_id: str  # Kafka key / per-session ordering
    event_type: str
    payload: bytes  # the canonical alert as UTF-8 JSON (proctor.contracts.alerts.Alert)
    created_at: float  # Unix seconds when the analyzer appended it (for delivery latency)
    attempts: int = 0  # failed attempts so far on the current transport

    def alert(self) -> dict[str, Any]:
        return json.loads(self.payload)
