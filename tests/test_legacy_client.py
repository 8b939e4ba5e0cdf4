"""A client written the way Procturing-Realtime's LiveKit client is works against the legacy endpoints unchanged.

That client (aiohttp `ws_connect`, no protocol header, no token) sends JPEGs to /video, LiveKit's default
48 kHz mono frames to /audio, and logs `data.get("alerts", [])` of each /events message. The server here is
set up the way an operator of such clients sets it: PROCTOR_LEGACY_WS_AUTH=none and
PROCTOR_LEGACY_AUDIO_SAMPLE_RATE=48000.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import aiohttp  # comes with livekit-agents, as it does in the client's own environment
import numpy as np
import pytest

from livekit_proctor.analyzer.resample import PcmResampler
from livekit_proctor.contracts.alerts import Alert
from livekit_proctor.contracts.wire import CloseCode
from tests.conftest import LiveServer, black_jpeg, eventually

log = logging.getLogger("procturing_client")
CLIENT_RATE = 48_000  # rtc.AudioStream's default
FRAME_SAMPLES = CLIENT_RATE // 100  # LiveKit delivers 10 ms frames


@pytest.fixture(scope="module")
def legacy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = LiveServer(
        tmp_path_factory.mktemp("legacy"), legacy_ws_auth="none", legacy_audio_sample_rate=CLIENT_RATE
    ).start()
    yield srv
    srv.stop()


def ws_base(srv: LiveServer) -> str:
    return srv.base.replace("http://", "ws://")


async def procturing_events_reader(
    url: str, received: list[dict[str, Any]], connected: asyncio.Event | None = None
) -> None:
    """Reads /events like the old client: every text message is JSON, its `alerts` are logged."""
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        if connected is not None:
            connected.set()
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            received.append(data)
            for alert in data.get("alerts", []):
                log.warning("proctoring alert: %s", alert)


def tone(freq: float, seconds: float, rate: int, amplitude: int = 8000) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def peak_hz(pcm: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64) * np.hanning(pcm.size)))
    return float(np.argmax(spectrum) * rate / pcm.size)


async def test_old_client_receives_and_logs_our_alerts(
    legacy_server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    srv = legacy_server
    # Alerts soon: no face for 0.5 s of (arrival) time raises FACE_NOT_FOUND.
    cfg = srv.start_session("old-client", rules={"FACE_NOT_FOUND": {"trigger_after_s": 0.5}})
    events_url = f"{ws_base(srv)}/ws/proctor/old-client/events"
    assert cfg["legacy_endpoints"]["events"] == events_url
    compat: list[dict[str, Any]] = []
    bare: list[dict[str, Any]] = []
    caplog.set_level(logging.WARNING, logger=log.name)
    ready = [asyncio.Event(), asyncio.Event()]
    readers = [
        asyncio.create_task(procturing_events_reader(events_url, compat, ready[0])),
        asyncio.create_task(procturing_events_reader(events_url + "?format=alert", bare, ready[1])),
    ]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 60)
    async with aiohttp.ClientSession() as http, http.ws_connect(cfg["legacy_endpoints"]["video"]) as video:
        frame = black_jpeg(320, 240)

        async def logged() -> bool:
            await video.send_bytes(frame)
            await asyncio.sleep(0.1)  # about 10 fps, as a camera would
            return any("proctoring alert: Face not found" in r.getMessage() for r in caplog.records)

        await eventually(logged, what="the old client to log a FACE_NOT_FOUND alert")
    with srv.http() as c:
        assert c.post("/api/v1/session/old-client/end", json={}).status_code == 200
    await asyncio.wait_for(asyncio.gather(*readers), 60)  # the server closes /events at the session end

    started = next(m for m in compat if m["event_type"] == "FACE_NOT_FOUND" and m["incident_state"] == "started")
    assert started["alerts"] == ["Face not found"]
    ended = next(m for m in compat if m["event_type"] == "FACE_NOT_FOUND" and m["incident_state"] == "ended")
    assert ended["alerts"] == []  # an incident's end is not a new violation for the old client's toasts
    # Beside `alerts`, the message is the canonical alert; ?format=alert gives it bare, as before.
    for m in compat:
        Alert.model_validate({k: v for k, v in m.items() if k != "alerts"})  # extra keys are refused
    # The same alerts (the bare reader may have subscribed a moment later on a busy machine: what it got is a
    # tail of what the old client got, and it includes the incident's end).
    compat_ids = [m["event_id"] for m in compat]
    assert [m["event_id"] for m in bare] == compat_ids[len(compat_ids) - len(bare) :]
    assert ended["event_id"] in {m["event_id"] for m in bare}
    for m in bare:
        Alert.model_validate(m)


class OfferedAudio:
    """What a live session is offered: a spy around the real session's offer_audio, per session."""

    def __init__(self, srv: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.srv, self.monkeypatch = srv, monkeypatch
        self.chunks: dict[str, list[bytes]] = {}

    def watch(self, sid: str) -> None:
        live = self.srv.app.state.sessions.live[sid]
        real = live.offer_audio
        got = self.chunks.setdefault(sid, [])

        async def spy(msg: Any) -> None:
            got.append(bytes(msg.payload))
            await real(msg)

        self.monkeypatch.setattr(live, "offer_audio", spy)

    def pcm(self, sid: str) -> np.ndarray:
        return np.frombuffer(b"".join(self.chunks[sid]), np.int16)


@pytest.fixture
def offered(legacy_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> OfferedAudio:
    return OfferedAudio(legacy_server, monkeypatch)


async def send_audio(url: str, pcm: np.ndarray) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        for i in range(0, pcm.size, FRAME_SAMPLES):
            await ws.send_bytes(pcm[i : i + FRAME_SAMPLES].tobytes())


async def audio_seconds(srv: LiveServer, sid: str) -> float:
    return float(await asyncio.to_thread(lambda: srv.session(sid)["counters"]["audio_seconds"]))


async def settled_seconds(srv: LiveServer, sid: str, want: float) -> float | None:
    got = float(await asyncio.to_thread(lambda: srv.session(sid)["counters"]["audio_seconds"]))
    return got if got >= want else None


async def test_48khz_audio_arrives_as_16khz(legacy_server: LiveServer, offered: OfferedAudio) -> None:
    srv = legacy_server
    cfg = srv.start_session("old-audio")
    offered.watch("old-audio")
    sent = tone(1000.0, 2.0, CLIENT_RATE)
    await send_audio(cfg["legacy_endpoints"]["audio"], sent)  # no ?sample_rate: the server's default, 48 kHz
    # Duration preserved: 2 s in, 2 s counted (the resampler's tail is flushed when the client closes).
    got = await eventually(lambda: settled_seconds(srv, "old-audio", 2.0), what="2 s of audio in the counters")
    assert got == 2.0
    pcm = offered.pcm("old-audio")
    assert pcm.size == 32_000  # 2 s at 16 kHz
    # Frequency and level preserved.
    assert abs(peak_hz(pcm, 16_000) - 1000.0) <= 2.0
    body = pcm[1000:-1000].astype(np.float64)  # away from the filter's ramps at both ends
    rms_in = float(np.sqrt(np.mean(sent.astype(np.float64) ** 2)))
    assert abs(float(np.sqrt(np.mean(body**2))) / rms_in - 1.0) < 0.05


async def test_sample_rate_query_parameter(legacy_server: LiveServer, offered: OfferedAudio) -> None:
    srv = legacy_server
    url = srv.start_session("rate-param")["legacy_endpoints"]["audio"]
    offered.watch("rate-param")
    # A client that says 16 kHz is passed through untouched.
    sent = tone(440.0, 0.5, 16_000)
    async with aiohttp.ClientSession() as http, http.ws_connect(url + "?sample_rate=16000") as ws:
        for i in range(0, sent.size, 160):
            await ws.send_bytes(sent[i : i + 160].tobytes())
    await eventually(lambda: settled_seconds(srv, "rate-param", 0.5), what="0.5 s of audio")
    assert offered.pcm("rate-param").tobytes() == sent.tobytes()
    # 44.1 kHz in chunks that do not divide the rate: still one continuous tone at 16 kHz.
    sent = tone(440.0, 1.0, 44_100)
    async with aiohttp.ClientSession() as http, http.ws_connect(url + "?sample_rate=44100") as ws:
        for i in range(0, sent.size, 441 * 3 + 7):
            await ws.send_bytes(sent[i : i + 441 * 3 + 7].tobytes())
    await eventually(lambda: settled_seconds(srv, "rate-param", 1.5), what="1.5 s of audio")
    pcm = offered.pcm("rate-param")[8000:]
    assert pcm.size == 16_000
    assert abs(peak_hz(pcm, 16_000) - 440.0) <= 2.0
    # A rate the server cannot use is refused with a reason.
    for bad in ("48k", "100", "1000000"):
        async with aiohttp.ClientSession() as http, http.ws_connect(url + f"?sample_rate={bad}") as ws:
            msg = await ws.receive(timeout=60)
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert ws.close_code == CloseCode.BAD_REQUEST and "sample_rate" in str(msg.extra)


def test_resampler_keeps_a_chunked_stream_continuous() -> None:
    sent = tone(3000.0, 1.0, CLIENT_RATE)
    r = PcmResampler(CLIENT_RATE)
    out = b"".join(r.push(sent[i : i + 333].tobytes()) for i in range(0, sent.size, 333)) + r.flush()
    pcm = np.frombuffer(out, np.int16)
    assert pcm.size == 16_000
    assert abs(peak_hz(pcm, 16_000) - 3000.0) <= 2.0


async def test_unknown_events_format_is_refused(legacy_server: LiveServer) -> None:
    url = legacy_server.start_session("bad-format")["legacy_endpoints"]["events"]
    async with aiohttp.ClientSession() as http, http.ws_connect(url + "?format=xml") as ws:
        msg = await ws.receive(timeout=60)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == CloseCode.BAD_REQUEST and "format" in str(msg.extra)
