"""Wire protocol, stream tokens, alert schema and sampler."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from livekit_proctor.analyzer.pipeline import Sampler
from livekit_proctor.contracts import wire
from livekit_proctor.contracts.alerts import (
    Alert,
    AlertMetadata,
    EventType,
    alert_json_schema,
    check_room_keys,
    room_keys,
)
from livekit_proctor.tokens import TokenError, mint, verify

REPO = Path(__file__).resolve().parents[1]


def test_media_roundtrip_and_header_layout() -> None:
    ts = 1_790_000_000.123456
    data = wire.encode_video(7, ts, b"\xff\xd8jpeg")
    assert len(data) == wire.HEADER_SIZE + 6 == 22
    assert data[:2] == b"\x01\x01" and data[4:8] == (7).to_bytes(4, "big")
    m = wire.decode_media(data)
    assert (m.kind, m.seq, m.payload) == (wire.Kind.VIDEO, 7, b"\xff\xd8jpeg")
    assert m.capture_ts == pytest.approx(ts, abs=1e-6)
    assert wire.decode_media(wire.encode_audio(2**32 + 5, ts, b"\0\0")).seq == 5  # wraps


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "malformed"),
        (b"\x01\x01", "malformed"),
        (bytes([2, 1]) + bytes(14) + b"x", "unsupported_version"),
        (bytes([1, 9]) + bytes(14) + b"x", "malformed"),
        (bytes([1, 1]) + bytes(14), "malformed"),
    ],
)
def test_bad_media_headers(data: bytes, code: str) -> None:
    with pytest.raises(wire.ProtocolError) as e:
        wire.decode_media(data)
    assert e.value.code == code and e.value.reason


def test_control_validation() -> None:
    assert wire.validate_control({"type": "control", "event": "track_muted", "track": "camera"})
    assert wire.validate_control({"type": "control", "event": "participant_left"})
    bad: Any
    for bad in (
        [],
        {"type": 1},
        {"type": "control", "event": "track_muted"},
        {"type": "nope"},
        {"type": "control", "event": "track_muted", "track": "camera", "ts": "x"},
        {"type": "control", "event": "track_muted", "track": ["camera"]},
        {"type": "control", "event": "track_muted", "track": "camera", "ts": True},
        {"type": "control", "event": "track_muted", "track": "camera", "ts": 10**400},
        {"type": "ping", "id": {"k": 1}},
        {"type": "ping", "id": "x" * 65},
    ):
        with pytest.raises(wire.ProtocolError):
            wire.validate_control(bad)


def test_stream_tokens() -> None:
    secret = b"s3cret-of-at-least-32-bytes-length"
    tok, exp = mint(secret, "sess-1", "sitting-a", 60)
    claims = verify(secret, tok)
    assert (claims.session_id, claims.sitting, claims.expires_at) == ("sess-1", "sitting-a", exp)
    assert exp > time.time()
    with pytest.raises(TokenError, match="signature"):
        verify(b"another-secret-of-32-bytes-length", tok)
    old, _ = mint(secret, "sess-1", "sitting-a", 60, now=time.time() - 120)
    with pytest.raises(TokenError, match="expired"):
        verify(secret, old)
    with pytest.raises(TokenError, match="malformed"):
        verify(secret, "abc")
    # A JWT signed with the secret but not a stream token (no audience, no sitting) is refused.
    import jwt

    with pytest.raises(TokenError, match="malformed"):
        verify(secret, jwt.encode({"sid": "sess-1", "exp": int(time.time()) + 60}, secret, algorithm="HS256"))


def test_alert_schema_doc_matches_model() -> None:
    doc = REPO / "docs" / "alert.schema.json"
    if not doc.exists():
        pytest.skip("docs/alert.schema.json not generated")
    assert json.loads(doc.read_text()) == json.loads(json.dumps(alert_json_schema(), sort_keys=True))


def test_alert_validates_fields() -> None:
    a = Alert(
        exam_session_id="s",
        candidate_id="c",
        event_type=EventType.FACE_NOT_FOUND,
        severity_score=0.5,
        ai_model_source="m",
        metadata=AlertMetadata(node_id="n", worker_id="w"),
    )
    assert len(a.event_id) == 36 and a.timestamp.endswith("+00:00")
    with pytest.raises(ValueError):
        Alert(
            exam_session_id="s",
            candidate_id="c",
            event_type="NOPE",  # not an event type, on purpose
            severity_score=0.5,
            ai_model_source="m",
            metadata=AlertMetadata(node_id="n", worker_id="w"),
        )
    with pytest.raises(ValueError):
        Alert(
            exam_session_id="s",
            candidate_id="c",
            event_type=EventType.FACE_NOT_FOUND,
            severity_score=1.5,
            ai_model_source="m",
            metadata=AlertMetadata(node_id="n", worker_id="w"),
        )


def test_alert_metadata_optional_keys_appear_only_when_set() -> None:
    def alert(metadata: AlertMetadata) -> dict:
        a = Alert(
            exam_session_id="s",
            candidate_id="c",
            event_type=EventType.CAMERA_OFF,
            severity_score=0.5,
            ai_model_source="m",
            metadata=metadata,
        )
        return json.loads(a.to_json())["metadata"]

    # Unset: the message is what it was before these keys were typed (traceparent is always there).
    assert alert(AlertMetadata(node_id="n", worker_id="w")) == {"node_id": "n", "worker_id": "w", "traceparent": None}
    room: dict[str, Any] = {"livekit_room": "r", "candidate_identity": "alice", "proctor_identities": ["p1", "p2"]}
    extra = {"custom": {"k": 1}}  # metadata stays open
    full = alert(AlertMetadata.model_validate({"node_id": "n", "worker_id": "w", "exam_id": "e", **room, **extra}))
    assert full == {"node_id": "n", "worker_id": "w", "traceparent": None, "exam_id": "e", **room, **extra}
    # Session metadata: the room keys are checked at the door, and a stored value of another type is left out.
    check_room_keys({**room, "other": 5})
    for bad in ({"livekit_room": 5}, {"proctor_identities": "p1"}, {"proctor_identities": ["p1", 2]}):
        with pytest.raises(ValueError, match=f"metadata.{next(iter(bad))} must be"):
            check_room_keys(bad)
        assert room_keys({**bad, "candidate_identity": "alice"}) == {"candidate_identity": "alice"}
    assert room_keys({**room, "livekit_room": None, "other": 1}) == {
        k: v for k, v in room.items() if k != "livekit_room"
    }


def test_sampler_keeps_the_rate_by_capture_time() -> None:
    s = Sampler(5.0)
    picked = [i for i in range(240) if s.due(i / 24)]  # 10 s of 24 fps
    assert len(picked) == 50
    s = Sampler(5.0)
    assert sum(s.due(i / 30) for i in range(300)) == 50  # 10 s of 30 fps
    s = Sampler(5.0)
    assert [s.due(t) for t in (0.0, 0.1, 5.0, 5.1, 5.2, 1.0)] == [True, False, True, False, True, True]


def test_access_logs_never_show_tokens() -> None:
    import logging

    from livekit_proctor.analyzer.app import RedactTokens

    rec = logging.LogRecord(
        "uvicorn.error",
        logging.INFO,
        "",
        0,
        '%s - "WebSocket %s" [accepted]',
        ("127.0.0.1:5", "/api/v1/session/s/stream?token=abc.def&x=1"),
        None,
    )
    RedactTokens().filter(rec)
    assert "abc.def" not in rec.getMessage() and "token=***&x=1" in rec.getMessage()
