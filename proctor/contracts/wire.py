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
server message are JSON text messages with a "type" field.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

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
