"""The canonical alert: one model for JSON, JSON Schema (docs/alert.schema.json) and protobuf.

Every message has its own event_id, so a consumer deduplicates at-least-once
delivery by event_id. The messages of one incident share incident_id; the
incident's start has incident_state "started" and its end "ended".
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

SCHEMA_VERSION = "1.0"


class EventType(StrEnum):
    FACE_NOT_FOUND = "FACE_NOT_FOUND"
    MULTIPLE_FACES = "MULTIPLE_FACES"
    # Raised by later stages (vision fusion, audio, agent); listed here so the
    # schema is stable for consumers from the start.
    CANDIDATE_ABSENT = "CANDIDATE_ABSENT"
    FACE_NOT_VISIBLE = "FACE_NOT_VISIBLE"
    MULTIPLE_PERSONS = "MULTIPLE_PERSONS"
    PRESENCE_LOSS = "PRESENCE_LOSS"
    GAZE_OFF_SCREEN = "GAZE_OFF_SCREEN"
    PROLONGED_LOOK_AWAY = "PROLONGED_LOOK_AWAY"
    FREQUENT_DISTRACTION = "FREQUENT_DISTRACTION"
    HEAD_DOWN = "HEAD_DOWN"
    HEAD_TURNED_AWAY = "HEAD_TURNED_AWAY"
    SUSPICIOUS_MOVEMENT = "SUSPICIOUS_MOVEMENT"
    PHONE_DETECTED = "PHONE_DETECTED"
    LEFT_FRAME = "LEFT_FRAME"
    HAND_NEAR_EAR = "HAND_NEAR_EAR"
    CAMERA_OFF = "CAMERA_OFF"
    MICROPHONE_OFF = "MICROPHONE_OFF"
    CANDIDATE_DISCONNECTED = "CANDIDATE_DISCONNECTED"
    FACE_MISMATCH = "FACE_MISMATCH"
    MULTIPLE_SPEAKERS = "MULTIPLE_SPEAKERS"
    HIGH_CONFIDENCE_CHEATING = "HIGH_CONFIDENCE_CHEATING"


class IncidentState(StrEnum):
    STARTED = "started"
    ONGOING = "ongoing"
    ENDED = "ended"


class RoomRouting(BaseModel):
    """Typed routing hints: the LiveKit room a session came from and who watches it.

    The agent writes them into the session metadata at session start (as_metadata()), the analyzer copies them
    into every alert's metadata (AlertMetadata inherits these fields), and the room transport delivers by them
    (of_alert()). Sessions started without the agent have none.
    """

    model_config = ConfigDict(extra="ignore")

    livekit_room: str | None = Field(
        default=None, description="LiveKit room the session came from (sessions started by the agent)"
    )
    proctor_identities: list[str] | None = Field(
        default=None, description="Room participants the room transport sends the alert to"
    )
    candidate_identity: str | None = Field(default=None, description="The candidate's identity in the room")

    def as_metadata(self) -> dict[str, Any]:
        """The hints as session metadata keys (unset ones left out)."""
        return {k: v for k in ROOM_KEYS if (v := getattr(self, k)) is not None}

    @classmethod
    def of(cls, metadata: Mapping[str, Any]) -> RoomRouting:
        """The hints in session or alert metadata; a value of another type is left out rather than failing."""
        return cls(**{k: v for k in ROOM_KEYS if (v := metadata.get(k)) is not None and _room_value_ok(k, v)})

    @classmethod
    def of_alert(cls, alert: Mapping[str, Any]) -> RoomRouting:
        """The hints of a canonical alert as JSON (an outbox envelope's payload)."""
        meta = alert.get("metadata")
        return cls.of(meta) if isinstance(meta, Mapping) else cls()


# Session metadata keys the analyzer copies into every alert's metadata (the RoomRouting fields).
ROOM_KEYS = tuple(RoomRouting.model_fields)


class AlertMetadata(RoomRouting):
    model_config = ConfigDict(extra="allow")

    node_id: str = Field(description="Analyzer node that produced the alert")
    worker_id: str = Field(description="Worker (process / thread pool) within the node")
    traceparent: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
        description="W3C Trace Context traceparent of the span that appended the alert to the outbox (a child of "
        "the analysed frame's span); null when tracing is off. A consumer continues the trace from it",
    )
    # Optional keys, absent from the message when unset (older messages and consumers know them as extra keys).
    exam_id: str | None = Field(default=None, description="The session's exam_id (live sessions)")
    # livekit_room, proctor_identities, candidate_identity: from RoomRouting.

    @property
    def routing(self) -> RoomRouting:
        return RoomRouting(**{k: getattr(self, k) for k in ROOM_KEYS})

    # No return annotation: pydantic would derive the schema of the serialized form from it instead of the fields.
    @model_serializer(mode="wrap")
    def _omit_unset_optional_keys(self, handler: SerializerFunctionWrapHandler):
        out = handler(self)
        for key in _OMITTED_WHEN_NONE:
            if key in out and out[key] is None:
                del out[key]
        return out


_OMITTED_WHEN_NONE = ("exam_id", *ROOM_KEYS)
_ROOM_KEY_TYPES = {
    "livekit_room": "a string",
    "proctor_identities": "a list of strings",
    "candidate_identity": "a string",
}


def _room_value_ok(key: str, value: Any) -> bool:
    if key == "proctor_identities":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, str)


def check_room_keys(metadata: Mapping[str, Any]) -> None:
    """Raises ValueError naming a ROOM_KEYS entry of session metadata that AlertMetadata cannot carry."""
    for key in ROOM_KEYS:
        value = metadata.get(key)
        if value is not None and not _room_value_ok(key, value):
            raise ValueError(f"metadata.{key} must be {_ROOM_KEY_TYPES[key]} (it is copied into every alert)")


def room_keys(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The ROOM_KEYS of session metadata for AlertMetadata; a value of another type (a session stored before
    session start checked them) is left out rather than failing every alert."""
    return RoomRouting.of(metadata).as_metadata()


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class Alert(BaseModel):
    """One proctoring alert in the canonical schema."""

    model_config = ConfigDict(extra="forbid", use_enum_values=True)

    event_id: str = Field(default_factory=lambda: str(uuid.uuid4()), description="UUID, unique per message")
    exam_session_id: str
    candidate_id: str
    timestamp: str = Field(default_factory=_now_iso, description="ISO 8601, when the observed condition held")
    event_type: EventType
    severity_score: float = Field(ge=0.0, le=1.0)
    ai_model_source: str = Field(description="Model(s) whose output raised the alert")
    evidence: dict[str, Any] = Field(default_factory=dict)
    metadata: AlertMetadata
    # Extensions to the seed schema (optional for consumers):
    incident_id: str | None = Field(default=None, description="Shared by the messages of one incident")
    incident_state: IncidentState | None = None
    schema_version: str = SCHEMA_VERSION

    def to_json(self) -> str:
        return self.model_dump_json()


def ts_to_iso(ts: float) -> str:
    """Unix seconds -> ISO 8601 UTC."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")


class _SerializedAlert(Alert):
    # What goes over the wire always carries every field, defaults included.
    model_config = ConfigDict(json_schema_serialization_defaults_required=True, title="Alert")


def alert_json_schema() -> dict[str, Any]:
    schema = _SerializedAlert.model_json_schema(mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://github.com/livekit-proctor/livekit-proctor/docs/alert.schema.json"
    return schema
