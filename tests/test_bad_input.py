"""Every kind of bad input gets a clear answer, is counted, and loses nothing else."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest
import websockets

from proctor.contracts import wire
from proctor.tokens import mint
from tests.conftest import ADMIN_KEY, PROCTOR_KEY, LiveServer, StreamClient, black_jpeg, jpeg_of, stream_url


def test_rest_auth_and_roles(server: LiveServer) -> None:
    body = {"exam_session_id": "auth-1", "candidate_id": "c", "exam_id": "e"}
    with server.http(None) as c:
        r = c.post("/api/v1/session/start", json=body)
        assert r.status_code == 401 and "API key" in r.json()["error"]
    with server.http("not-a-key") as c:
        assert c.post("/api/v1/session/start", json=body).status_code == 401
        assert c.get("/api/v1/admin/stats").status_code == 401
    with server.http(PROCTOR_KEY) as c:
        r = c.post("/api/v1/session/start", json=body)
        assert r.status_code == 403 and "proctor" in r.json()["error"]
        assert c.get("/api/v1/admin/sessions").status_code == 403
    with server.http() as c:  # system
        assert c.get("/api/v1/admin/stats").status_code == 403
    with server.http(ADMIN_KEY) as c:
        assert c.get("/api/v1/admin/stats").status_code == 200
    with server.http(None) as c:
        assert c.get("/.well-known/health").status_code == 200
        assert c.get("/metrics").status_code == 401
        assert c.get("/api/v1/session/auth-1").status_code == 401
    with server.http(PROCTOR_KEY) as c:
        assert c.get("/metrics").status_code == 403


def test_session_start_validation_and_conflicts(server: LiveServer) -> None:
    with server.http() as c:
        r = c.post("/api/v1/session/start", json={"candidate_id": "c", "exam_id": "e"})
        assert r.status_code == 422
        assert any("exam_session_id" in d["loc"] for d in r.json()["detail"])
        r = c.post(
            "/api/v1/session/start",
            json={"exam_session_id": "v1", "candidate_id": "c", "exam_id": "e", "features_enabled": ["x-ray"]},
        )
        assert r.status_code == 422 and "x-ray" in r.text
        r = c.post("/api/v1/session/start", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422
        first = server.start_session("dup-1", candidate="alice")
        again = server.start_session("dup-1", candidate="alice")
        assert first["created"] is True and again["created"] is False
        r = c.post("/api/v1/session/start", json={"exam_session_id": "dup-1", "candidate_id": "bob", "exam_id": "e"})
        assert r.status_code == 409 and "another candidate" in r.json()["error"]
        assert c.get("/api/v1/session/nope").status_code == 404
        assert c.post("/api/v1/session/nope/end").status_code == 404
        for r in (c.get("/api/v1/session/nope"), c.post("/api/v1/session/start", content=b"[")):
            assert "Traceback" not in r.text


async def _close_of(url: str) -> tuple[int, str]:
    async with websockets.connect(url) as ws:
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        return ws.close_code, ws.close_reason


async def test_websocket_unknown_session_and_bad_tokens(server: LiveServer) -> None:
    cfg = server.start_session("tok-1")
    ws_base = cfg["stream_url"].rsplit("/api/", 1)[0]
    # A stream token opens its own session only; on any other id it learns nothing (tests/test_hostile.py).
    code, reason = await _close_of(f"{ws_base}/api/v1/session/ghost/stream?token={cfg['stream_token']}")
    assert code == 4401 and "another session" in reason
    code, reason = await _close_of(cfg["stream_url"])
    assert code == 4401 and "missing" in reason
    code, reason = await _close_of(cfg["stream_url"] + "?token=garbage")
    assert code == 4401
    other = server.start_session("tok-2")
    code, reason = await _close_of(cfg["stream_url"] + f"?token={other['stream_token']}")
    assert code == 4401 and "another session" in reason
    sitting = server.app.state.sessions.live["tok-1"].sitting
    expired, _ = mint(server.app.state.stream_secret, "tok-1", sitting, ttl_s=60, now=time.time() - 3600)
    code, reason = await _close_of(cfg["stream_url"] + f"?token={expired}")
    assert code == 4401 and "expired" in reason
    code, _ = await _close_of(f"{ws_base}/ws/proctor/ghost/video?token={ADMIN_KEY}")
    assert code == 4404  # API keys belong to trusted backends: they are told unknown from ended
    # Anonymous clients cannot probe which sessions exist.
    code, _ = await _close_of(f"{ws_base}/api/v1/session/ghost/stream")
    assert code == 4401
    code, _ = await _close_of(f"{ws_base}/api/v1/session/ghost/stream?token=garbage")
    assert code == 4401
    # A read-only proctor key may watch alerts but not push media into a session.
    code, reason = await _close_of(cfg["stream_url"] + f"?token={PROCTOR_KEY}")
    assert code == 4401 and "proctor" in reason
    async with websockets.connect(cfg["legacy_endpoints"]["events"] + f"?token={PROCTOR_KEY}") as ws:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.3)  # connected, nothing to say yet


async def test_bad_messages_are_answered_counted_and_the_session_goes_on(server: LiveServer, oep: list) -> None:
    cfg = server.start_session("bad-msgs")
    face = jpeg_of(next(r["path"] for r in oep if r["condition"] == "normal"))
    now = time.time()
    async with StreamClient.connect(stream_url(cfg)) as c:
        await c.ws.send(b"\x01\x01\x00")  # shorter than the header
        await c.ws.send(struct.pack(">BBHIQ", 9, 1, 0, 1, 0) + b"\xff\xd8")  # unknown version
        await c.ws.send(struct.pack(">BBHIQ", 1, 7, 0, 1, 0) + b"x")  # unknown kind
        await c.ws.send("this is not json")
        await c.ws.send('{"type": "control", "event": "explode"}')
        await c.video(b"\xff\xd8" + b"\0" * (300 * 1024), now)  # over max_frame_bytes (256 KiB)
        await c.video(b"GIF89a....", now + 0.2)
        await c.video(face[: len(face) // 3], now + 0.4)  # truncated JPEG
        await c.audio(b"\x00" * 3201, now)  # odd PCM length
        await c.audio(b"\x00" * 3200, now + 0.1)  # fine
        # (wait: a newer frame sent now would replace the truncated one before it is decoded: latest-wins)
        await c.wait_for(lambda m: m["type"] == "error" and m["code"] == "undecodable_jpeg")
        await c.video(face, now + 0.6)  # fine
        errs = [
            "malformed",
            "unsupported_version",
            "malformed",
            "malformed",
            "malformed",
            "frame_too_large",
            "not_jpeg",
            "pcm_odd_length",
            "undecodable_jpeg",
        ]
        got = [m["code"] for m in c.of_type("error")]
        assert sorted(got) == sorted(errs), got
        for m in c.of_type("error"):
            assert m["reason"] and "Traceback" not in m["reason"]
        assert c.closed is None  # still connected
        # The session went on: the good frame and the good audio were taken.
        for _ in range(200):
            if server.session("bad-msgs")["counters"]["frames_analysed"] >= 1:
                break
            await asyncio.sleep(0.05)
    st = server.session("bad-msgs")["counters"]
    assert st["frames_analysed"] == 1
    assert st["frames_rejected"] == 3
    assert st["messages_malformed"] == 5
    assert st["audio_rejected"] == 1 and st["audio_seconds"] == pytest.approx(0.1)


async def test_message_over_transport_cap_closes_with_1009(server: LiveServer) -> None:
    cfg = server.start_session("huge")
    async with websockets.connect(stream_url(cfg), max_size=None) as ws:
        await ws.send(wire.encode_video(1, time.time(), b"\xff\xd8" + b"\0" * (2 * 1024 * 1024)))
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == 1009
    # The session survives; a new connection streams again.
    async with StreamClient.connect(stream_url(cfg)) as c:
        await c.video(black_jpeg(), time.time())
        await c.wait_for(lambda m: m["type"] == "hello")
