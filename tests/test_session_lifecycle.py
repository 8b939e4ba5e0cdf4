"""Session lifecycle over the real server: heartbeats, reconnects, legacy endpoints, end, metrics, restart."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest
import websockets

from tests.conftest import ADMIN_KEY, LiveServer, StreamClient, black_jpeg, stream_url


async def test_hello_and_heartbeat_with_stats(server: LiveServer) -> None:
    cfg = server.start_session("hb-1")
    async with StreamClient.connect(stream_url(cfg)) as c:
        hello = await c.wait_for(lambda m: m["type"] == "hello")
        assert hello["protocol_version"] == 1 and hello["video_fps"] == 5.0
        await c.video(black_jpeg(), time.time())
        hb = await c.wait_for(lambda m: m["type"] == "heartbeat")
        assert {"frames_processed", "alerts_triggered", "last_face_verification"} <= hb["stats"].keys()
        await c.ws.send('{"type": "ping"}')
        await c.wait_for(lambda m: m["type"] == "pong")
    assert server.session("hb-1")["connected"] is False


async def test_newer_connection_supersedes_and_keeps_rule_state(server: LiveServer) -> None:
    cfg = server.start_session("re-1")
    base = time.time() - 30
    black = black_jpeg()
    async with StreamClient.connect(stream_url(cfg)) as first:
        for i in range(15):  # 3 s without a face
            await first.video(black, base + i * 0.2)
            await first.sync()
        async with StreamClient.connect(stream_url(cfg)) as second:
            await second.wait_for(lambda m: m["type"] == "hello")
            code, _ = await first.wait_closed()
            assert code == 4409
            for i in range(15, 30):  # 3 s more: the 5 s rule fires across the reconnect
                await second.video(black, base + i * 0.2)
                await second.sync()
            alert = await second.wait_for(lambda m: m["type"] == "alert")
    assert alert["alert"]["event_type"] == "FACE_NOT_FOUND"
    assert alert["alert"]["evidence"]["first_frame_seq"] == 1


async def test_legacy_endpoints(server: LiveServer) -> None:
    cfg = server.start_session("legacy-1")
    tok = cfg["stream_token"]
    ev_url = cfg["legacy_endpoints"]["events"] + f"?token={tok}"
    async with (
        websockets.connect(ev_url) as events,
        websockets.connect(cfg["legacy_endpoints"]["video"] + f"?token={tok}") as video,
        websockets.connect(cfg["legacy_endpoints"]["audio"] + f"?token={tok}") as audio,
    ):
        await audio.send(np.zeros(1600, np.int16).tobytes())  # 100 ms of PCM
        black = black_jpeg()
        # Legacy frames are timestamped on arrival: real time. Sent until the alert comes (5 s of absence), however
        # long that takes on a busy machine; a closed events socket ends the loop with its error.
        received = asyncio.create_task(events.recv())
        while not received.done():
            await video.send(black)
            await asyncio.sleep(0.1)
        alert = json.loads(received.result())
    assert alert["event_type"] == "FACE_NOT_FOUND" and alert["exam_session_id"] == "legacy-1"
    st = server.session("legacy-1")["counters"]
    assert st["audio_seconds"] == pytest.approx(0.1)


async def test_end_closes_incidents_and_stream(server: LiveServer) -> None:
    cfg = server.start_session("end-1")
    base = time.time() - 30
    async with StreamClient.connect(stream_url(cfg)) as c:
        for i in range(30):
            await c.video(black_jpeg(), base + i * 0.2)
            await c.sync()
        await c.wait_for(lambda m: m["type"] == "alert")
        with server.http() as h:
            r = h.post("/api/v1/session/end-1/end")
        assert r.status_code == 200 and r.json()["state"] == "ended"
        ended = await c.wait_for(lambda m: m["type"] == "alert" and m["alert"]["incident_state"] == "ended")
        assert ended["alert"]["evidence"]["end_reason"] == "ended_by_api"
        code, _ = await c.wait_closed()
        assert code == 4408
    st = server.session("end-1")
    assert st["state"] == "ended" and st["counters"]["frames_received"] == 30
    # An ended session takes no more streams.
    async with websockets.connect(stream_url(cfg)) as ws:
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()  # the server closes it at once: nothing else arrives
        assert ws.close_code == 4408


def test_metrics_and_admin_views(server: LiveServer) -> None:
    server.start_session("adm-1")
    with server.http(ADMIN_KEY) as c:
        text = c.get("/metrics").text
        for name in (
            "proctor_frames_total",
            "proctor_inference_seconds",
            "proctor_active_sessions",
            "proctor_queue_depth",
            "proctor_alerts_total",
            "proctor_dispatch_delivered_total",  # the embedded dispatcher's, wired beside the analyzer
        ):
            assert name in text
        sessions = c.get("/api/v1/admin/sessions", params={"state": "active"}).json()["sessions"]
        assert "adm-1" in {s["exam_session_id"] for s in sessions}
        stats = c.get("/api/v1/admin/stats").json()
        assert stats["active_sessions"] >= 1 and stats["dispatcher"]["ok"] is True
        ready = c.get("/.well-known/ready").json()
        assert ready["ready"] is True and ready["models"]["face"].startswith("mediapipe")
        assert "lanes" in ready["delivery"]  # the embedded dispatcher's state


async def test_session_survives_analyzer_restart(tmp_path: Path) -> None:
    srv = LiveServer(tmp_path).start()
    try:
        cfg = srv.start_session("restart-1")
    finally:
        srv.stop()
    srv2 = LiveServer(tmp_path, port=srv.port).start()  # same data dir: sessions and stream secret persist
    try:
        async with StreamClient.connect(stream_url(cfg)) as c:
            await c.wait_for(lambda m: m["type"] == "hello")
            await c.audio(np.zeros(1600, np.int16).tobytes(), time.time())
            await c.sync()
        assert srv2.session("restart-1")["counters"]["audio_seconds"] == pytest.approx(0.1)
    finally:
        srv2.stop()


async def test_audio_flood_is_never_dropped(server: LiveServer) -> None:
    """60 s of audio sent as fast as the socket takes it: every sample is accounted for."""
    cfg = server.start_session("audio-flood")
    chunk = (np.sin(np.arange(1600) / 5) * 8000).astype(np.int16).tobytes()  # 100 ms
    t0 = time.time()
    async with StreamClient.connect(stream_url(cfg)) as c:
        for i in range(600):
            await c.audio(chunk, t0 + i * 0.1)
        await c.sync()  # answered once every chunk sent before it was consumed
        flows = c.of_type("flow")
    st = server.session("audio-flood")["counters"]
    assert st["audio_chunks"] == 600 and st["audio_seconds"] == pytest.approx(60.0)
    assert st["audio_rejected"] == 0
    # Any slow-down hint is followed by a resume once the queue drained.
    if flows:
        assert flows[-1]["audio"] == "resume"


async def test_muted_camera_raises_camera_off_and_tells_the_candidate(server: LiveServer) -> None:
    cfg = server.start_session("cam-off")
    async with StreamClient.connect(stream_url(cfg)) as c:
        await c.video(black_jpeg(), time.time())
        await c.ws.send('{"type": "control", "event": "track_muted", "track": "camera"}')
        start = await c.wait_for(lambda m: m["type"] == "alert" and m["alert"]["event_type"] == "CAMERA_OFF")
        assert start["alert"]["incident_state"] == "started"
        assert start["alert"]["evidence"]["reason"] == "camera:track_muted"
        fb = await c.wait_for(lambda m: m["type"] == "feedback" and m["code"] == "CAMERA_OFF")
        assert "camera" in fb["message"].lower()
        await c.ws.send('{"type": "control", "event": "track_unmuted", "track": "camera"}')
        end = await c.wait_for(
            lambda m: (
                m["type"] == "alert"
                and m["alert"]["event_type"] == "CAMERA_OFF"
                and m["alert"]["incident_state"] == "ended"
            )
        )
        assert end["alert"]["evidence"]["duration_s"] >= 2.0
        await c.ws.send('{"type": "control", "event": "track_muted", "track": "microphone"}')
        mic = await c.wait_for(lambda m: m["type"] == "alert" and m["alert"]["event_type"] == "MICROPHONE_OFF")
        assert mic["alert"]["incident_state"] == "started"
    st = server.session("cam-off")
    assert st["counters"]["alerts_by_type"]["CAMERA_OFF"] == 1 and st["counters"]["feedback_sent"] >= 1
    assert st["risk"]["score"] > 0 and st["risk"]["top_incidents"]


async def test_frames_that_stop_raise_camera_off(tmp_path: Path) -> None:
    from livekit_proctor.analyzer.rules import catalog

    srv = LiveServer(tmp_path).start()
    try:
        cfg = srv.start_session("no-frames", thresholds={"camera_timeout_s": 2.0})
        async with StreamClient.connect(stream_url(cfg)) as c:
            await c.video(black_jpeg(), time.time())
            alert = await c.wait_for(lambda m: m["type"] == "alert" and m["alert"]["event_type"] == "CAMERA_OFF")
            assert alert["alert"]["evidence"]["reason"] == "no_frames"
            await c.video(black_jpeg(), time.time())  # frames again: the incident ends
            await c.wait_for(
                lambda m: (
                    m["type"] == "alert"
                    and m["alert"]["event_type"] == "CAMERA_OFF"
                    and m["alert"]["incident_state"] == "ended"
                )
            )
        camera_off = catalog.spec("CAMERA_OFF")
        assert camera_off is not None and camera_off.trigger_after_s == 2.0
    finally:
        srv.stop()
