"""From rule events to canonical alerts: shared by live sessions (sessions/emitter.py) and `proctor analyze`.

The rate limit decides which events become alerts; AlertBuilder turns each into an `Alert` with the
session's identity, the node's metadata (room routing hints included) and the event's evidence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from livekit_proctor.analyzer.evidence import thumbnail_b64
from livekit_proctor.analyzer.rules.engine import RuleEvent
from livekit_proctor.analyzer.rules.limits import IncidentLimiter
from livekit_proctor.contracts.alerts import Alert, AlertMetadata, IncidentState, room_keys, ts_to_iso


@dataclass(frozen=True)
class AlertBuilder:
    """Who raised the alerts (session, candidate, node) and how event times map to wall time."""

    exam_session_id: str
    candidate_id: str
    default_model: str  # ai_model_source when the rule names no model
    node_id: str
    worker_id: str
    exam_id: str | None = None
    session_metadata: Mapping[str, Any] = field(default_factory=dict)  # room routing hints are copied from it
    time_base: float = 0.0  # added to event times: a recording's times are offsets from its start

    def build(self, ev: RuleEvent) -> Alert:
        return Alert(
            exam_session_id=self.exam_session_id,
            candidate_id=self.candidate_id,
            timestamp=ts_to_iso(self.time_base + ev.ts),
            event_type=ev.event_type,
            severity_score=ev.severity,
            ai_model_source=ev.model or self.default_model,
            evidence=ev.evidence,
            metadata=AlertMetadata(
                node_id=self.node_id,
                worker_id=self.worker_id,
                exam_id=self.exam_id,
                # Routing hints for room delivery, when the session came from a LiveKit room.
                **room_keys(self.session_metadata),
            ),
            incident_id=ev.incident_id,
            incident_state=ev.state,
        )


def attach_thumbnail(ev: RuleEvent) -> None:
    """Adds a small JPEG of the frame that started an incident to its evidence (CPU work: run it in a thread)."""
    if ev.preview is None:
        return
    thumb = thumbnail_b64(ev.preview)
    if thumb:
        ev.evidence["thumbnail_jpeg_b64"] = thumb


def rate_limit(
    limiter: IncidentLimiter, events: list[RuleEvent], now: float
) -> tuple[list[RuleEvent], list[RuleEvent]]:
    """(events that become alerts, incident starts suppressed by the rate limit; rules/limits.py)."""
    passed = limiter.filter(events, now)
    kept = {id(ev) for ev in passed}
    suppressed = [ev for ev in events if ev.state is IncidentState.STARTED and id(ev) not in kept]
    return passed, suppressed
