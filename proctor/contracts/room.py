"""The LiveKit room data-channel contract: topics, packet limit and the packets themselves.

Proctor alerts go to proctor identities only (topic `proctoring.alert`, the canonical alert as JSON); candidate
feedback goes to that candidate only (`proctoring.feedback`, a RoomFeedback). Both are sent reliable, and a
reliable data packet carries at most MAX_RELIABLE_PACKET bytes: fit_packet() makes an alert fit. The agent
(livekit_proctor.agent.publisher) and the dispatcher's room transport (dispatcher/transports/livekit_room.py)
send exactly these; docs/livekit.md documents them for room clients.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_RELIABLE_PACKET = 15 * 1024
ALERT_TOPIC = "proctoring.alert"
FEEDBACK_TOPIC = "proctoring.feedback"


class RoomFeedback(BaseModel):
    """What the candidate's client receives on FEEDBACK_TOPIC."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    type: Literal["feedback"] = "feedback"
    exam_session_id: str
    code: str = Field(description="The alert's event_type")
    message: str = Field(description="Text to show the candidate")
    incident_id: str | None = None
    ts: float = Field(description="Analyzer time, Unix seconds")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def fit_packet(alert: dict[str, Any], limit: int = MAX_RELIABLE_PACKET) -> bytes:
    """The alert as JSON within the reliable-packet limit.

    When it would not fit, the evidence thumbnail is dropped (`thumbnail_omitted`: true) and, if still too
    large, the evidence is reduced to its scalar values (`evidence_truncated`: true).
    """
    data = _dumps(alert)
    if len(data) <= limit:
        return data
    a = dict(alert)
    ev = dict(a.get("evidence") or {})
    if ev.pop("thumbnail_jpeg_b64", None) is not None:
        ev["thumbnail_omitted"] = True
    a["evidence"] = ev
    data = _dumps(a)
    if len(data) <= limit:
        return data
    a["evidence"] = {k: v for k, v in ev.items() if isinstance(v, str | int | float | bool) or v is None}
    a["evidence"]["evidence_truncated"] = True
    return _dumps(a)[:limit]
