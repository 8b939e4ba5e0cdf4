"""Every kind of bad input gets a clear answer, is counted, and loses nothing else."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import websockets
from fastapi import FastAPI, Request

from livekit_proctor.analyzer.body_limit import BodyLimit, body_limit
from livekit_proctor.contracts import wire
from livekit_proctor.tokens import mint
from tests.conftest import ADMIN_KEY, PROCTOR_KEY, LiveServer, StreamClient, black_jpeg, close_of, jpeg_of, stream_url


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


def test_rest_body_over_the_limit_is_413_and_nothing_is_stored(server: LiveServer) -> None:
    body = {"exam_session_id": "big-1", "candidate_id": "c", "exam_id": "e", "metadata": {"x": "a" * (2 << 20)}}
    raw = json.dumps(body).encode()

    def chunked() -> Iterator[bytes]:  # no Content-Length: the server counts the bytes as they come
        for i in range(0, len(raw), 64 * 1024):
            yield raw[i : i + 64 * 1024]

    with server.http() as c:
        for r in (
            c.post("/api/v1/session/start", json=body),
            c.post("/api/v1/session/start", content=chunked(), headers={"content-type": "application/json"}),
        ):
            assert r.status_code == 413 and r.headers["content-type"] == "application/json"
            assert r.headers["connection"] == "close"
            assert r.json() == {"error": "request body too large: at most 1048576 bytes allowed"}
        assert c.get("/api/v1/session/big-1").status_code == 404


def test_rest_fields_are_bounded(server: LiveServer) -> None:
    base = {"exam_session_id": "fields-1", "candidate_id": "c", "exam_id": "e"}
    deep: dict = {}
    for _ in range(12):
        deep = {"k": deep}
    with server.http() as c:
        for metadata, reason in (
            ({"notes": "a" * 20_000}, "at most 16384 allowed"),  # under the body limit, over the field's
            (deep, "nests 13 levels deep; at most 8 allowed"),
            # copied into every alert's typed metadata (proctor.contracts.alerts.ROOM_KEYS)
            ({"proctor_identities": "proctor-1"}, "metadata.proctor_identities must be a list of strings"),
        ):
            r = c.post("/api/v1/session/start", json={**base, "metadata": metadata})
            assert r.status_code == 422, r.text
            assert r.json()["detail"][0]["loc"] == ["body", "metadata"] and reason in r.json()["detail"][0]["msg"]
        r = c.post("/api/v1/session/start", json={**base, "verification_policy": {"note": "a" * 5000}})
        assert r.status_code == 422 and "extra fields" in r.text
        r = c.post("/api/v1/session/start", json={**base, "features_enabled": ["gaze"] * 100})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", "features_enabled"]
        # What Python's JSON parser takes but JSON and the database do not, and what it cannot take.
        nan = b'{"exam_session_id": "fields-1", "candidate_id": "c", "exam_id": "e", "metadata": {"x": NaN}}'
        r = c.post("/api/v1/session/start", content=nan, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "non-finite" in r.text
        inf = b'{"exam_session_id": "fields-1", "candidate_id": "c", "exam_id": "e", "video_fps": Infinity}'
        assert (
            c.post("/api/v1/session/start", content=inf, headers={"content-type": "application/json"}).status_code
            == 422
        )
        r = c.post("/api/v1/session/start", content=b"[" * 100_000, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json() == {"error": "the body is not parseable JSON: nested too deeply"}
        r = c.post("/api/v1/session/start", json={**base, "video_fps": "5"})  # the schema says number
        assert r.status_code == 422
        assert c.get("/api/v1/session/fields-1").status_code == 404
        assert c.post("/api/v1/session/start", json={**base, "metadata": {"a": [1, {"b": "ok"}]}}).status_code == 200


async def test_body_limit_per_route_and_while_streaming() -> None:
    """A route can declare a larger limit (an upload); a streamed body is refused without being read on."""
    app = FastAPI()
    app.add_middleware(BodyLimit, default=100)

    @app.post("/small")
    async def small(request: Request) -> dict:
        return {"n": len(await request.body())}

    @app.post("/upload", openapi_extra=body_limit(1000))
    async def upload(request: Request) -> dict:
        return {"n": len(await request.body())}

    sent = 0

    async def stream(n: int) -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(n):
            sent += 1
            yield b"x" * 50

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        assert (await c.post("/small", content=b"x" * 100)).json() == {"n": 100}
        assert (await c.post("/small", content=b"x" * 101)).status_code == 413
        assert (await c.post("/upload", content=b"x" * 1000)).json() == {"n": 1000}
        r = await c.post("/upload", content=b"x" * 1001)
        assert r.status_code == 413 and "at most 1000 bytes allowed" in r.text  # (this bare app's error shape)
        r = await c.post("/small", content=stream(1000))
        assert r.status_code == 413 and sent == 3  # refused at the chunk that passed 100 bytes
        sent = 0
        assert (await c.post("/upload", content=stream(20))).json() == {"n": 1000} and sent == 20
    assert app.openapi()["paths"]["/upload"]["post"]["x-max-body-bytes"] == 1000


async def test_websocket_unknown_session_and_bad_tokens(server: LiveServer) -> None:
    cfg = server.start_session("tok-1")
    ws_base = cfg["stream_url"].rsplit("/api/", 1)[0]
    # A stream token opens its own session only; on any other id it learns nothing (tests/test_hostile.py).
    code, reason = await close_of(f"{ws_base}/api/v1/session/ghost/stream?token={cfg['stream_token']}")
    assert code == 4401 and "another session" in reason
    code, reason = await close_of(cfg["stream_url"])
    assert code == 4401 and "missing" in reason
    code, reason = await close_of(cfg["stream_url"] + "?token=garbage")
    assert code == 4401
    other = server.start_session("tok-2")
    code, reason = await close_of(cfg["stream_url"] + f"?token={other['stream_token']}")
    assert code == 4401 and "another session" in reason
    sitting = server.app.state.sessions.live["tok-1"].sitting
    expired, _ = mint(server.app.state.stream_secret, "tok-1", sitting, ttl_s=60, now=time.time() - 3600)
    code, reason = await close_of(cfg["stream_url"] + f"?token={expired}")
    assert code == 4401 and "expired" in reason
    code, _ = await close_of(f"{ws_base}/ws/proctor/ghost/video?token={ADMIN_KEY}")
    assert code == 4404  # API keys belong to trusted backends: they are told unknown from ended
    # Anonymous clients cannot probe which sessions exist.
    code, _ = await close_of(f"{ws_base}/api/v1/session/ghost/stream")
    assert code == 4401
    code, _ = await close_of(f"{ws_base}/api/v1/session/ghost/stream?token=garbage")
    assert code == 4401
    # A read-only proctor key may watch alerts but not push media into a session.
    code, reason = await close_of(cfg["stream_url"] + f"?token={PROCTOR_KEY}")
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
        await c.sync()
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
