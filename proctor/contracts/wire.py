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

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

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


def validate_control(msg: Any) -> dict[str, Any]:
    """Checks a decoded JSON control message; returns it or raises ProtocolError."""
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("malformed", "text messages must be JSON objects with a string 'type'")
    if msg["type"] == "ping":
        return msg
    if msg["type"] != "control":
        raise ProtocolError("malformed", f"unknown message type {msg['type']!r}")
    event = msg.get("event")
    if event not in ControlEvent.ALL:
        raise ProtocolError("malformed", f"unknown control event {event!r}; expected one of {sorted(ControlEvent.ALL)}")
    track = msg.get("track")
    if event != ControlEvent.PARTICIPANT_LEFT and track not in TRACKS:
        raise ProtocolError("malformed", f"control event {event!r} needs 'track' in {sorted(TRACKS)}")
    ts = msg.get("ts")
    if ts is not None and not isinstance(ts, int | float):
        raise ProtocolError("malformed", "'ts' must be a number (Unix seconds)")
    return msg
