"""Binary streaming protocol, version 1 (documented in docs/protocol.md).

Media travels in binary WebSocket messages with a fixed 16-byte header:

    offset size  field
    0      1     version        (1)
    1      1     kind           (1 = video JPEG, 2 = audio PCM s16le 16 kHz mono)
    2      2     flags          (reserved, 0)
    4      4     seq            (per kind, wraps at 2**32)
    8      8     capture_ts_us  (capture time, microseconds since the Unix epoch)
    16     ...   payload

All integers are big-endian. Control messages (client -> server) and every
server message are JSON text messages with a "type" field: each one a pydantic model here (PingMessage,
ControlMessage; HelloMessage ... SessionEndedMessage, the ServerMessage union), sent through
encode_server_message() and read back with parse_server_message().
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from livekit_proctor.contracts.alerts import Alert
from livekit_proctor.contracts.api import FaceVerification

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">BBHIQ")
HEADER_SIZE = HEADER.size  # 16

AUDIO_SAMPLE_RATE = 16_000
AUDIO_SAMPLE_WIDTH = 2  # s16le mono


class Kind(IntEnum):
    VIDEO = 1
    AUDIO = 2


class CloseCode(IntEnum):
    """WebSocket close codes sent by the analyzer (4000-4999 are application codes)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    BAD_REQUEST = 4400
    UNAUTHORIZED = 4401
    UNKNOWN_SESSION = 4404
    SESSION_ENDED = 4408
    SUPERSEDED = 4409
    TOO_SLOW = 4429


class ControlEvent:
    TRACK_MUTED = "track_muted"
    TRACK_UNMUTED = "track_unmuted"
    TRACK_ENDED = "track_ended"
    PARTICIPANT_LEFT = "participant_left"
    ALL = frozenset({TRACK_MUTED, TRACK_UNMUTED, TRACK_ENDED, PARTICIPANT_LEFT})


TRACKS = frozenset({"camera", "microphone", "screen"})


class ProtocolError(ValueError):
    """A message that does not follow the protocol; `code` goes into the error reply."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class MediaMessage:
    kind: Kind
    seq: int
    capture_ts: float  # Unix seconds
    payload: bytes


def encode_media(kind: Kind, seq: int, capture_ts: float, payload: bytes) -> bytes:
    return HEADER.pack(PROTOCOL_VERSION, int(kind), 0, seq & 0xFFFFFFFF, round(capture_ts * 1e6)) + payload


def encode_video(seq: int, capture_ts: float, jpeg: bytes) -> bytes:
    return encode_media(Kind.VIDEO, seq, capture_ts, jpeg)


def encode_audio(seq: int, capture_ts: float, pcm: bytes) -> bytes:
    return encode_media(Kind.AUDIO, seq, capture_ts, pcm)


def decode_media(data: bytes) -> MediaMessage:
    if len(data) < HEADER_SIZE:
        raise ProtocolError("malformed", f"binary message shorter than the {HEADER_SIZE}-byte header")
    version, kind, _flags, seq, ts_us = HEADER.unpack_from(data)
    if version != PROTOCOL_VERSION:
        raise ProtocolError("unsupported_version", f"protocol version {version} not supported (expected 1)")
    try:
        k = Kind(kind)
    except ValueError:
        raise ProtocolError("malformed", f"unknown media kind {kind}") from None
    payload = bytes(memoryview(data)[HEADER_SIZE:])
    if not payload:
        raise ProtocolError("malformed", "empty payload")
    return MediaMessage(k, seq, ts_us / 1e6, payload)


# Control and ping messages are tiny; anything longer is refused before it is parsed.
MAX_TEXT_BYTES = 4096


def _no_constant(name: str) -> Any:
    raise ProtocolError("malformed", f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError("malformed", f"number {text[:24]} is out of range")
    return value


def parse_text(text: str) -> ClientText:
    """Decodes and checks one client text message; returns it or raises ProtocolError ("malformed")."""
    if len(text) > MAX_TEXT_BYTES:
        raise ProtocolError("malformed", f"text message of {len(text)} characters exceeds {MAX_TEXT_BYTES}")
    try:
        msg = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except ProtocolError:
        raise
    except RecursionError:
        raise ProtocolError("malformed", "JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and integers beyond the int/str conversion limit
        raise ProtocolError("malformed", f"invalid JSON: {str(e)[:80]}") from None
    return validate_control(msg)


class PingMessage(BaseModel):
    """{"type": "ping", "id": ...}: answered with a pong once everything sent before it has been analysed."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    type: Literal["ping"]
    id: str | None = Field(default=None, max_length=64, description="Echoed in the pong")


class ControlMessage(BaseModel):
    """Track and participant state (docs/protocol.md, "Text messages")."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    type: Literal["control"]
    event: Literal["track_muted", "track_unmuted", "track_ended", "participant_left"]
    track: Literal["camera", "microphone", "screen"] | None = None
    ts: float | None = Field(default=None, allow_inf_nan=False, description="Unix seconds; default: arrival")

    @model_validator(mode="after")
    def _track_needed(self) -> ControlMessage:
        if self.event != ControlEvent.PARTICIPANT_LEFT and self.track is None:
            raise ValueError(f"control event {self.event!r} needs 'track' in {sorted(TRACKS)}")
        return self


ClientText = PingMessage | ControlMessage
_CLIENT_TEXT: TypeAdapter[ClientText] = TypeAdapter(
    Annotated[PingMessage | ControlMessage, Field(discriminator="type")]
)


def validate_control(msg: Any) -> ClientText:
    """Checks a decoded JSON text message; returns it as a model or raises ProtocolError ("malformed")."""
    try:
        return _CLIENT_TEXT.validate_python(msg)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("ping", "control"))
        msg_text = str(err.get("msg", "invalid"))
        if err.get("type") in ("union_tag_invalid", "union_tag_not_found", "model_attributes_type", "model_type"):
            msg_text = 'text messages must be JSON objects with \'type\' "ping" or "control"'
            where = ""
        raise ProtocolError("malformed", f"{where + ': ' if where else ''}{msg_text}"[:200]) from None


def check_capture_time(ts: float, now: float, max_skew_s: float) -> None:
    """Media and control times must lie within max_skew_s of the server clock (docs/protocol.md).

    The rules run on these times and alerts carry them: a far-future or nanosecond value is refused at the
    door instead of poisoning a session's rule state.
    """
    if not abs(ts - now) <= max_skew_s:
        raise ProtocolError(
            "bad_timestamp",
            f"capture_ts {ts:.6f} is {ts - now:+.0f} s from server time; it must be Unix seconds within "
            f"{max_skew_s:.0f} s of it (capture_ts_us in microseconds)",
        )


# --------------------------------------------------------------------------- server -> client messages
#
# Every JSON text message the analyzer sends is one of the models below (docs/protocol.md, "Server messages";
# tests/test_protocol_messages.py checks that table against them). Clients ignore unknown fields and unknown
# types: parse_server_message() drops the first and raises UnknownServerMessage for the second.


class ErrorCode(StrEnum):
    """The `code` of an error message; clients must accept codes not listed here (newer servers)."""

    MALFORMED = "malformed"
    UNSUPPORTED_VERSION = "unsupported_version"
    BAD_TIMESTAMP = "bad_timestamp"
    FRAME_TOO_LARGE = "frame_too_large"
    FRAME_TOO_MANY_PIXELS = "frame_too_many_pixels"
    NOT_JPEG = "not_jpeg"
    UNDECODABLE_JPEG = "undecodable_jpeg"
    PCM_ODD_LENGTH = "pcm_odd_length"
    AUDIO_CHUNK_TOO_LARGE = "audio_chunk_too_large"
    TOO_MANY_PINGS = "too_many_pings"
    ANALYSIS_ERROR = "analysis_error"
    INTERNAL_ERROR = "internal_error"


class _ServerMessage(BaseModel):
    # Lenient on input (a client ignores fields it does not know), exact on output: keys listed in
    # _omit_when_none are left out of the JSON when unset instead of being sent as null.
    model_config = ConfigDict(extra="ignore", frozen=True)
    _omit_when_none: ClassVar[tuple[str, ...]] = ()

    # No return annotation: pydantic would derive the serialization schema from it instead of the fields.
    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler):
        out = handler(self)
        for key in self._omit_when_none:
            if out.get(key, 0) is None:
                del out[key]
        return out


class AudioFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    sample_rate: int = AUDIO_SAMPLE_RATE
    format: Literal["s16le"] = "s16le"
    channels: int = 1


class HelloMessage(_ServerMessage):
    """First message on every v1 connection: the limits the client must keep to."""

    type: Literal["hello"] = "hello"
    protocol_version: int = PROTOCOL_VERSION
    session_id: str
    video_fps: float = Field(description="Frames analysed per second; send at about this rate")
    max_frame_bytes: int
    max_frame_pixels: int
    max_clock_skew_s: float = Field(description="Capture times must lie within this of the server clock")
    audio: AudioFormat = Field(default_factory=AudioFormat)
    heartbeat_s: float = Field(description="Seconds between heartbeats")


class AlertMessage(_ServerMessage):
    """One canonical alert (docs/alerts.md), incident start or end."""

    type: Literal["alert"] = "alert"
    alert: Alert

    @field_validator("alert", mode="before")
    @classmethod
    def _known_fields_only(cls, v: Any) -> Any:
        # Alert forbids unknown keys (its JSON Schema is closed); a client reading a newer server's alert keeps
        # the fields it knows instead of losing the alert.
        if isinstance(v, dict):
            return {k: x for k, x in v.items() if k in Alert.model_fields}
        return v


class FeedbackMessage(_ServerMessage):
    """A short text for the candidate about an incident that just started (rate-limited per event type)."""

    type: Literal["feedback"] = "feedback"
    code: str = Field(description="The alert's event_type")
    message: str
    incident_id: str | None = None
    ts: float = Field(description="Server time, Unix seconds")


class HeartbeatStats(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    frames_processed: int = Field(description="The session counter frames_analysed")
    frames_received: int
    frames_dropped: int
    alerts_triggered: int = Field(description="Incidents reported")
    incidents_suppressed: int = Field(description="Incidents held back by the rate limit")
    worker_errors: int
    audio_seconds: float
    audio_queue_fill: float = Field(description="0-1, see Backpressure")
    last_face_verification: FaceVerification | None = Field(
        description="The latest face check (at, similarity, match), or null before the first one"
    )
    risk_score: float
    risk_band: str


class HeartbeatMessage(_ServerMessage):
    """Every heartbeat_s seconds."""

    type: Literal["heartbeat"] = "heartbeat"
    ts: float = Field(description="Server time, Unix seconds")
    session_id: str
    stats: HeartbeatStats


class FlowMessage(_ServerMessage):
    """Audio flow hint: the session's audio queue crossed 75 % (slow_down) or fell to 25 % (resume)."""

    type: Literal["flow"] = "flow"
    audio: Literal["slow_down", "resume"]
    audio_queue_fill: float


class ErrorMessage(_ServerMessage):
    """A rejected client message (skipped; the session goes on), or `analysis_error`."""

    type: Literal["error"] = "error"
    code: str = Field(description="An ErrorCode value")
    reason: str
    seq: int | None = Field(default=None, description="The media message's seq, for errors about one")
    _omit_when_none = ("seq",)


class PongMessage(_ServerMessage):
    """Answer to a ping, once everything sent before it was processed."""

    type: Literal["pong"] = "pong"
    ts: float = Field(description="Server time, Unix seconds")
    id: str | None = Field(default=None, description="The ping's id, when it had one")
    _omit_when_none = ("id",)


class SessionEndedMessage(_ServerMessage):
    """The session ended (`ended_by_api`, `privacy_deletion`, `ended_elsewhere`: another node ended it) or
    expired (`expired`); a 4408 close follows."""

    type: Literal["session_ended"] = "session_ended"
    reason: str


ServerMessage = (
    HelloMessage
    | AlertMessage
    | FeedbackMessage
    | HeartbeatMessage
    | FlowMessage
    | ErrorMessage
    | PongMessage
    | SessionEndedMessage
)
SERVER_MESSAGES: tuple[type[_ServerMessage], ...] = (
    HelloMessage,
    AlertMessage,
    FeedbackMessage,
    HeartbeatMessage,
    FlowMessage,
    ErrorMessage,
    PongMessage,
    SessionEndedMessage,
)
_SERVER: TypeAdapter[ServerMessage] = TypeAdapter(Annotated[ServerMessage, Field(discriminator="type")])


class UnknownServerMessage(ProtocolError):
    """A server message of a type this client does not know (a newer server): ignore it."""

    def __init__(self, type_: str) -> None:
        super().__init__("unknown_type", f"unknown server message type {type_[:40]!r}")
        self.type = type_


def encode_server_message(msg: ServerMessage) -> str:
    """The message as compact JSON, the way the analyzer sends it."""
    return msg.model_dump_json()


def parse_server_message(data: str | bytes | dict[str, Any]) -> ServerMessage:
    """One server text message (JSON text or its decoded object) as its model.

    Raises UnknownServerMessage for a type not in ServerMessage (ignore it), ProtocolError("malformed") for
    anything else that does not validate.
    """
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except ValueError as e:
            raise ProtocolError("malformed", f"server message is not JSON: {str(e)[:80]}") from None
    if not isinstance(data, dict):
        raise ProtocolError("malformed", "server message is not a JSON object")
    try:
        return _SERVER.validate_python(data)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        if err.get("type") == "union_tag_invalid":
            raise UnknownServerMessage(str(data.get("type"))) from None
        where = ".".join(str(x) for x in err.get("loc", ()))
        raise ProtocolError("malformed", f"{where}: {err.get('msg', 'invalid')}"[:200]) from None
