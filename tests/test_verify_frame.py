"""POST /api/v1/session/{id}/verify-frame through the real server: frames of an enrolled candidate streamed
over the WebSocket, then a recent one verified (the newest, or one by its seq), from the session's buffer of
recent JPEG frames (analyzer/sessions/frames.py), which stays under its byte budget.

Identity A (angelina_jolie) is enrolled straight into the identity store as in test_continuous_verification."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import PROCTOR_KEY, LiveServer, StreamClient, black_jpeg, jpeg_of, stream_url
from tests.test_continuous_verification import A_ENROLL, A_OTHERS, A, _enroll, _photos

CAP = 200_000  # bytes of JPEG per session: less than 5 s of these photos at 2 frames a second


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    _photos(A, A_ENROLL + A_OTHERS)
    s = LiveServer(tmp_path_factory.mktemp("verify-frame"), verify_frame_buffer_bytes=CAP).start()
    yield s
    s.stop()


async def _stream(c: StreamClient, jpegs: list[bytes], n: int) -> dict[int, float]:
    """n frames, two a second of media time; returns seq -> capture time once all were received and analysed."""
    sent: dict[int, float] = {}
    t0 = time.time()
    for i in range(n):
        ts = t0 + i / 2
        sent[await c.video(jpegs[i % len(jpegs)], ts)] = ts
    await c.sync()
    return sent


def _verify_frame(srv: LiveServer, sid: str, body: dict[str, Any], key: str = PROCTOR_KEY) -> tuple[int, Any]:
    with srv.http(key) as h:
        r = h.post(f"/api/v1/session/{sid}/verify-frame", json=body)
        return r.status_code, r.json()


async def test_a_recent_frame_of_the_enrolled_candidate_matches(srv: LiveServer) -> None:
    _enroll(srv, "vf-a")
    cfg = srv.start_session("vf-1", candidate="vf-a")
    photos = [jpeg_of(p) for p in _photos(A, A_OTHERS)]
    async with StreamClient.connect(stream_url(cfg)) as c:
        sent = await _stream(c, photos, 4)
        seqs = sorted(sent)
        status, out = _verify_frame(srv, "vf-1", {"latest": True, "trigger": "proctor_request"})
        assert status == 200, out
        assert out["match"] is True and out["similarity_score"] >= out["threshold_used"]
        assert out["frame_id"] == seqs[-1] and out["trigger"] == "proctor_request"
        assert out["candidate_id"] == "vf-a" and out["exam_session_id"] == "vf-1" and out["frame_ts"]
        # A given frame: that one (another photo, so another score).
        status, one = _verify_frame(srv, "vf-1", {"frame_id": seqs[-2], "trigger": "manual"})
        assert status == 200, one
        assert one["frame_id"] == seqs[-2] and one["match"] is True
        assert one["similarity_score"] != out["similarity_score"]
        await c.sync()
        assert c.alerts() == []  # an audit record, never an alert
    audit = [a for a in srv.app.state.identity.audit_entries("vf-a") if a["action"] == "verify"]
    assert [(a["result"]["frame_id"], a["result"]["trigger"]) for a in audit] == [
        (seqs[-1], "proctor_request"),
        (seqs[-2], "manual"),
    ]
    assert audit[0]["role"] == "proctor" and audit[0]["result"]["exam_session_id"] == "vf-1"


async def test_old_frames_leave_the_buffer_which_stays_under_its_budget(srv: LiveServer) -> None:
    _enroll(srv, "vf-b")
    cfg = srv.start_session("vf-2", candidate="vf-b")
    photos = [jpeg_of(p) for p in _photos(A, A_OTHERS)]
    async with StreamClient.connect(stream_url(cfg)) as c:
        sent = await _stream(c, photos, 30)  # 15 s of media time
        recent = srv.app.state.sessions.live["vf-2"].recent
        assert 0 < recent.bytes <= CAP and 0 < len(recent) < 10
        first = min(sent)
        status, out = _verify_frame(srv, "vf-2", {"frame_id": first})
        assert status == 404 and f"frame {first} is not among the recent frames" in out["error"], out
        status, out = _verify_frame(srv, "vf-2", {"frame_id": max(sent)})
        assert status == 200 and out["frame_id"] == max(sent), out


async def test_errors(srv: LiveServer) -> None:
    status, out = _verify_frame(srv, "vf-nobody", {"latest": True})
    assert status == 404 and "unknown session" in out["error"]
    cfg = srv.start_session("vf-3", candidate="vf-never-enrolled")
    status, out = _verify_frame(srv, "vf-3", {"latest": True})
    assert status == 404 and "no recent frame" in out["error"]  # nothing received yet
    for bad in ({}, {"latest": False}, {"latest": True, "frame_id": 1}, {"frame_id": -1}):
        assert _verify_frame(srv, "vf-3", bad)[0] == 422, bad
    async with StreamClient.connect(stream_url(cfg)) as c:
        await _stream(c, [jpeg_of(p) for p in _photos(A, A_OTHERS)], 1)
        status, out = _verify_frame(srv, "vf-3", {"latest": True})
        assert status == 404 and "has no enrollment" in out["error"]
        _enroll(srv, "vf-never-enrolled")
        await _stream(c, [black_jpeg()], 1)
        status, out = _verify_frame(srv, "vf-3", {"latest": True})
        assert status == 422 and out["images"][0]["reasons"][0]["code"] == "no_face", out
    assert _verify_frame(srv, "vf-3", {"latest": True}, key="nope")[0] == 401
    with srv.http() as h:
        assert h.post("/api/v1/session/vf-3/end").status_code == 200
    status, out = _verify_frame(srv, "vf-3", {"latest": True})
    assert status == 409 and "ended" in out["error"]
