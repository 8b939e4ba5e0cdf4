"""The LiveKit agent: REAL livekit.rtc frames (the shared OEP webcam frames, LibriSpeech speech) through a
FAKE room at the SDK boundary (tests/fake_room.py, the only fake) into a REAL analyzer (LiveServer).

Media is fed with capture timestamps faster than real time; nothing here asserts wall-clock speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from livekit import rtc

from livekit_proctor.agent.config import AgentSettings
from livekit_proctor.agent.load import AnalyzerLoad, SessionCount, analyzer_ready, compute_load
from livekit_proctor.agent.media import (
    CHUNK_BYTES,
    AudioChunker,
    CaptureClock,
    FrameConversionError,
    FrameSampler,
    frame_to_jpeg,
    frame_to_rgb,
)
from livekit_proctor.agent.participants import Role, candidate_info, role_of
from livekit_proctor.agent.room import RoomProctor
from livekit_proctor.contracts.room import ALERT_TOPIC, FEEDBACK_TOPIC, MAX_RELIABLE_PACKET
from tests.conftest import SYSTEM_KEY, LiveServer, _free_port, load_rgb
from tests.conftest import eventually as wait_until
from tests.fake_room import FakeRoom, FakeStreams, FakeTrack, Published

T = rtc.VideoBufferType
CAMERA, MIC = rtc.TrackSource.SOURCE_CAMERA, rtc.TrackSource.SOURCE_MICROPHONE
PROCTOR = {"role": "proctor"}
BYTES_PER_S = 32_000  # s16le 16 kHz mono


def candidate(sid: str, cid: str = "cand-1") -> dict[str, str]:
    return {"role": "candidate", "exam_session_id": sid, "candidate_id": cid, "exam_id": "exam-1"}


def rgba_frame(rgb: np.ndarray) -> rtc.VideoFrame:
    h, w = rgb.shape[:2]
    rgba = np.dstack([rgb, np.full((h, w), 255, np.uint8)])
    return rtc.VideoFrame(w, h, T.RGBA, rgba.tobytes())


def i420_frame(rgb: np.ndarray) -> rtc.VideoFrame:
    return rgba_frame(rgb).convert(T.I420)


@pytest.fixture(scope="module")
def candidate_rgb(oep: list[dict[str, Any]]) -> np.ndarray:
    """A seated candidate (OEP subject1), upscaled to 1280x960 so the agent has to downscale it."""
    row = next(r for r in oep if r["condition"] == "normal" and r["oep_subject"] == "subject1")
    rgb = load_rgb(row["file"])
    return cv2.resize(rgb, (rgb.shape[1] * 2, rgb.shape[0] * 2), interpolation=cv2.INTER_LINEAR)


@pytest.fixture(scope="module")
def speech(data_dir: Path) -> list[rtc.AudioFrame]:
    """About 20 s of LibriSpeech as 10 ms 16 kHz mono frames, the way rtc.AudioStream delivers them."""
    import av

    pcm: list[np.ndarray] = []
    total = 0
    for f in sorted((data_dir / "audio" / "single_speaker").glob("*/*.flac")):
        with av.open(str(f)) as c:
            stream = c.streams.audio[0]
            resampler = rtc.AudioResampler(stream.rate, 16_000) if stream.rate != 16_000 else None
            for frame in c.decode(audio=0):
                x = frame.to_ndarray()
                x = (x.mean(axis=0) if x.ndim == 2 and x.shape[0] > 1 else x.reshape(-1)).astype(np.int16)
                if resampler is not None:
                    af = rtc.AudioFrame(x.tobytes(), stream.rate, 1, x.size)
                    x = np.concatenate([np.frombuffer(o.data, np.int16) for o in resampler.push(af)] or [x[:0]])
                pcm.append(x)
                total += x.size
        if total >= 20 * 16_000:
            break
    samples = np.concatenate(pcm)
    n = samples.size // 160
    return [rtc.AudioFrame(samples[i * 160 : (i + 1) * 160].tobytes(), 16_000, 1, 160) for i in range(n)]


def settings_for(server: LiveServer, **kw: Any) -> AgentSettings:
    return AgentSettings(analyzer_url=server.base, analyzer_api_key=SYSTEM_KEY, **kw)


@contextlib.asynccontextmanager
async def proctoring(room: FakeRoom, settings: AgentSettings) -> AsyncIterator[RoomProctor]:
    agent = RoomProctor(room, settings, streams=FakeStreams(), sessions=SessionCount())
    await agent.start()
    try:
        yield agent
    finally:
        await agent.aclose("test_over")


async def connected(agent: RoomProctor, sid: str) -> None:
    await wait_until(lambda: sid in agent.candidates and agent.candidates[sid].stream.connected, 60, f"{sid} up")


async def play(track: FakeTrack, frames: list[rtc.VideoFrame], start: float, seconds: float, fps: float = 10) -> float:
    """Frames with capture times from `start` on, at real time: what a camera does, and what a busy machine
    keeps up with (faster, the analyzer would drop frames and stretch the gaps the rules see)."""
    t = start
    i = 0
    while t < start + seconds:
        track.push_video(frames[i % len(frames)], int(t * 1e6))
        i += 1
        t += 1 / fps
        await asyncio.sleep(1 / fps)
    return t


def payloads(msgs: list[Published]) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in msgs]


def alerts_of(room: FakeRoom, event_type: str, state: str = "started") -> list[Published]:
    return [
        m
        for m in room.sent(ALERT_TOPIC)
        if (a := json.loads(m.payload))["event_type"] == event_type and a["incident_state"] == state
    ]


async def session_state(server: LiveServer, sid: str) -> dict[str, Any]:
    return await asyncio.to_thread(server.session, sid)


# ---- media path units


def test_frames_convert_through_the_sdk_and_never_touch_abgr(candidate_rgb: np.ndarray) -> None:
    rgb = np.ascontiguousarray(candidate_rgb[:480, :640])
    h, w = rgb.shape[:2]
    # RGBA -> I420 -> RGB24 and I420 -> RGB24 (chroma subsampling: close, not exact)
    for frame in (rgba_frame(rgb), i420_frame(rgb)):
        out = frame_to_rgb(frame)
        assert out.shape == (h, w, 3) and np.abs(out.astype(int) - rgb).mean() < 6
    rgb24 = rtc.VideoFrame(w, h, T.RGB24, rgb.tobytes())
    assert np.array_equal(frame_to_rgb(rgb24), rgb)
    abgr = np.dstack([np.full((h, w), 255, np.uint8), rgb[:, :, 2], rgb[:, :, 1], rgb[:, :, 0]])
    assert np.array_equal(frame_to_rgb(rtc.VideoFrame(w, h, T.ABGR, abgr.tobytes())), rgb)
    bgra = np.dstack([rgb[:, :, ::-1], np.full((h, w), 255, np.uint8)])
    assert np.abs(frame_to_rgb(rtc.VideoFrame(w, h, T.BGRA, bgra.tobytes())).astype(int) - rgb).mean() < 6
    with pytest.raises(FrameConversionError):  # would abort the process inside the SDK
        frame_to_rgb(rtc.VideoFrame(w, h, T.I010, bytes(w * h * 3)))
    jpeg = frame_to_jpeg(rgba_frame(candidate_rgb), 640, 80)
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert jpeg[:2] == b"\xff\xd8" and img is not None and img.shape[:2] == (480, 640)
    rotated = frame_to_jpeg(rgba_frame(candidate_rgb), 640, 80, rtc.VideoRotation.VIDEO_ROTATION_90)
    img = cv2.imdecode(np.frombuffer(rotated, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[:2] == (640, 480)


def test_audio_is_chunked_in_100_ms_and_resampled(speech: list[rtc.AudioFrame]) -> None:
    ch = AudioChunker()
    chunks = [c for f in speech[:105] for c in ch.push(f)]
    assert [len(c) for c in chunks] == [CHUNK_BYTES] * 10 and ch.pending_bytes == 5 * 320
    assert b"".join(chunks) == b"".join(bytes(f.data) for f in speech[:100])
    assert ch.flush() == b"".join(bytes(f.data) for f in speech[100:105])
    # 48 kHz stereo in: 1 s becomes ~1 s of 16 kHz mono
    tone = (np.sin(np.arange(48_000) / 10) * 8000).astype(np.int16)
    stereo = np.repeat(tone, 2)
    ch48 = AudioChunker()
    out = [
        c
        for i in range(100)
        for c in ch48.push(rtc.AudioFrame(stereo[i * 960 : (i + 1) * 960].tobytes(), 48_000, 2, 480))
    ]
    total = sum(map(len, out)) + len(ch48.flush() or b"")
    assert abs(total - BYTES_PER_S) <= 0.02 * BYTES_PER_S


def test_capture_times_increase_and_sampling_follows_the_session_rate() -> None:
    clock = CaptureClock()
    now = 1_750_000_000.0
    assert clock(int(now * 1e6), now) == now
    assert clock(int(now * 1e6), now) > now  # equal timestamps still increase
    mono = CaptureClock()  # a monotonic source (seconds since boot) is anchored to the wall clock
    t0 = mono(5_000_000, now)
    assert t0 == pytest.approx(now) and mono(5_500_000, now + 9) == pytest.approx(now + 0.5)
    assert CaptureClock()(0, now) == now
    s = FrameSampler(5.0)
    picked = [i for i in range(90) if s.due(now + i / 30)]  # 3 s at 30 fps
    assert len(picked) == 15


def test_candidates_and_proctors_are_told_apart() -> None:
    room = FakeRoom("r")
    a = room.join("a", candidate("s-1"))
    m = room.join("m", metadata=json.dumps(candidate("s-2", "cand-2") | {"frontend_instance_id": "fe-1"}))
    both = room.join("b", {"exam_session_id": "s-3"}, metadata=json.dumps(candidate("s-x")))  # attribute wins
    p = room.join("p", PROCTOR)
    bot = room.join("bot", candidate("s-4"), kind=rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)
    half = room.join("h", {"role": "candidate", "exam_session_id": "s-5"})
    bad = room.join("x", candidate("bad id!"))
    info = candidate_info(a)
    assert info is not None and info.exam_session_id == "s-1"
    info = candidate_info(m)
    assert info is not None and (info.candidate_id, info.frontend_instance_id) == ("cand-2", "fe-1")
    info = candidate_info(both)
    assert info is not None and info.exam_session_id == "s-3"
    assert role_of(p) is Role.PROCTOR and candidate_info(p) is None
    assert role_of(bot) is Role.AGENT and candidate_info(bot) is None
    assert candidate_info(half) is None and candidate_info(bad) is None


# ---- end to end against the analyzer


async def test_empty_seat_alerts_the_proctors_and_tells_only_the_candidate(
    server: LiveServer, candidate_rgb: np.ndarray
) -> None:
    room = FakeRoom("exam-room-fnf")
    room.join("proctor-1", PROCTOR)
    async with proctoring(room, settings_for(server)) as agent:
        alice = room.join("alice", candidate("agent-fnf"))
        _, cam = room.publish(alice, CAMERA)
        await connected(agent, "agent-fnf")
        base = time.time() - 120
        t = await play(cam, [rgba_frame(candidate_rgb)], base, 2.0)
        black = i420_frame(np.zeros((480, 640, 3), np.uint8))
        await play(cam, [black], t, 8.0)
        msgs = await wait_until(lambda: alerts_of(room, "FACE_NOT_FOUND"), 60, "FACE_NOT_FOUND")
        fb = await wait_until(
            lambda: [m for m in room.sent(FEEDBACK_TOPIC) if json.loads(m.payload)["code"] == "FACE_NOT_FOUND"]
        )
        c = agent.candidates["agent-fnf"]
        assert c.counters.frames_encoded > 0 and not c.counters.frames_unsupported
    alert = json.loads(msgs[0].payload)
    assert msgs[0].destination_identities == ["proctor-1"] and msgs[0].reliable
    assert alert["exam_session_id"] == "agent-fnf" and alert["candidate_id"] == "cand-1"
    assert alert["metadata"]["livekit_room"] == "exam-room-fnf"
    assert alert["metadata"]["candidate_identity"] == "alice"
    assert alert["metadata"]["proctor_identities"] == ["proctor-1"]
    # The rule runs on the frames' capture times: the seat was empty from base+2 s, the alert > 5 s later.
    assert datetime.fromisoformat(alert["timestamp"]).timestamp() - base > 7.0
    assert fb[0].destination_identities == ["alice"]
    assert json.loads(fb[0].payload)["exam_session_id"] == "agent-fnf"
    for m in room.local_participant.published:
        assert m.destination_identities and len(m.payload) <= MAX_RELIABLE_PACKET
        assert (m.topic == ALERT_TOPIC) == ("alice" not in m.destination_identities)
    state = await session_state(server, "agent-fnf")
    assert state["state"] == "ended" and state["counters"]["alerts_by_type"]["FACE_NOT_FOUND"] == 1


async def test_muted_camera_and_microphone_raise_camera_off_and_microphone_off(
    server: LiveServer, candidate_rgb: np.ndarray
) -> None:
    room = FakeRoom("exam-room-mute")
    room.join("proctor-1", PROCTOR)
    async with proctoring(room, settings_for(server)) as agent:
        bob = room.join("bob", candidate("agent-mute"))
        cam_pub, cam = room.publish(bob, CAMERA)
        mic_pub, _ = room.publish(bob, MIC)
        await connected(agent, "agent-mute")
        await play(cam, [i420_frame(candidate_rgb)], time.time() - 2, 1.0)
        room.mute(cam_pub)
        await wait_until(lambda: alerts_of(room, "CAMERA_OFF"), 60, "CAMERA_OFF")
        fb = await wait_until(
            lambda: [m for m in room.sent(FEEDBACK_TOPIC) if json.loads(m.payload)["code"] == "CAMERA_OFF"]
        )
        assert fb[0].destination_identities == ["bob"]
        room.unmute(cam_pub)
        ended = await wait_until(lambda: alerts_of(room, "CAMERA_OFF", "ended"), 60, "CAMERA_OFF ended")
        assert json.loads(ended[0].payload)["evidence"]["duration_s"] >= 2.0
        room.mute(mic_pub)
        mic = await wait_until(lambda: alerts_of(room, "MICROPHONE_OFF"), 60, "MICROPHONE_OFF")
        assert mic[0].destination_identities == ["proctor-1"]
    start = json.loads(alerts_of(room, "CAMERA_OFF")[0].payload)
    assert start["evidence"]["reason"] == "camera:track_muted"


async def test_two_candidates_two_sessions_proctors_ignored_and_leaving_ends_the_session(
    server: LiveServer, speech: list[rtc.AudioFrame]
) -> None:
    room = FakeRoom("exam-room-two")
    p1 = room.join("proctor-1", PROCTOR)
    room.join("proctor-2", metadata=json.dumps(PROCTOR))
    room.join("other-agent", candidate("two-bot"), kind=rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)
    room.join("guest")
    proctor_cam, _ = room.publish(p1, CAMERA)
    async with proctoring(room, settings_for(server, agent_leave_grace_s=2.0)) as agent:
        a = room.join("alice", candidate("two-a", "cand-a"))
        b = room.join("bob", metadata=json.dumps(candidate("two-b", "cand-b")))
        _, mic_a = room.publish(a, MIC)
        _, mic_b = room.publish(b, MIC)
        await connected(agent, "two-a")
        await connected(agent, "two-b")
        assert set(agent.candidates) == {"two-a", "two-b"} and agent.sessions.value == 2
        assert not proctor_cam.subscribed  # only candidates' tracks are subscribed to
        for f in speech[:100]:
            mic_a.push_audio(f)
        for f in speech[100:300]:
            mic_b.push_audio(f)
        for sid, seconds in (("two-a", 1.0), ("two-b", 2.0)):
            st = agent.candidates[sid].stream
            await wait_until(lambda st=st, n=seconds: st.counters.audio_bytes_sent == n * BYTES_PER_S)
        states = {sid: await session_state(server, sid) for sid in ("two-a", "two-b")}
        assert states["two-a"]["metadata"] == {
            "livekit_room": "exam-room-two",
            "candidate_identity": "alice",
            "proctor_identities": ["proctor-1", "proctor-2"],
        }
        assert (
            states["two-b"]["candidate_id"] == "cand-b" and states["two-b"]["metadata"]["candidate_identity"] == "bob"
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the analyzer accounts for each session's own audio
            states = {sid: await session_state(server, sid) for sid in ("two-a", "two-b")}
            if states["two-b"]["counters"]["audio_seconds"] == 2.0:
                break
            await asyncio.sleep(0.05)
        assert states["two-a"]["counters"]["audio_seconds"] == 1.0
        assert states["two-b"]["counters"]["audio_seconds"] == 2.0

        # Bob steps out and is back within the grace period: same session, CANDIDATE_DISCONNECTED ends.
        room.leave(b)
        await wait_until(lambda: alerts_of(room, "CANDIDATE_DISCONNECTED"), 60, "CANDIDATE_DISCONNECTED")
        room.join("bob", metadata=json.dumps(candidate("two-b", "cand-b")))
        await wait_until(lambda: alerts_of(room, "CANDIDATE_DISCONNECTED", "ended"), 60, "CANDIDATE_DISCONNECTED end")
        # Alice leaves for good: after the grace period her session ends, Bob's goes on.
        room.leave(a)
        await wait_until(lambda: "two-a" not in agent.candidates, 60, "alice's session ended")
        assert (await session_state(server, "two-a"))["state"] == "ended"
        assert (await session_state(server, "two-b"))["state"] == "active" and agent.sessions.value == 1
        assert not [m for m in room.sent(ALERT_TOPIC) if json.loads(m.payload)["event_type"] == "MICROPHONE_OFF"]
        left = alerts_of(room, "CANDIDATE_DISCONNECTED")
        assert {tuple(m.destination_identities) for m in left} == {("proctor-1", "proctor-2")}
    assert not any(s.startswith("two-bot") for s in agent.finished | set(agent.candidates))


async def test_analyzer_restart_loses_no_audio_and_no_session(tmp_path: Path, speech: list[rtc.AudioFrame]) -> None:
    srv = LiveServer(tmp_path).start()
    srv2: LiveServer | None = None
    room = FakeRoom("exam-room-restart")
    room.join("proctor-1", PROCTOR)
    agent = RoomProctor(room, settings_for(srv), streams=FakeStreams(), sessions=SessionCount())
    await agent.start()
    sid = "restart-audio"
    try:
        carol = room.join("carol", candidate(sid))
        _, mic = room.publish(carol, MIC)
        await connected(agent, sid)
        c = agent.candidates[sid]
        st = c.stream
        for f in speech[:300]:  # 3 s
            mic.push_audio(f)
        await wait_until(lambda: st.counters.audio_bytes_sent == 3 * BYTES_PER_S)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            before = (await session_state(srv, sid))["counters"]["audio_seconds"]
            if before == 3.0:
                break
            await asyncio.sleep(0.05)
        sent_before = st.counters.audio_bytes_sent

        await asyncio.to_thread(srv.stop)  # the agent's loop must keep running while uvicorn shuts down
        await wait_until(lambda: not st.connected, 60, "disconnect")
        for f in speech[300:700]:  # 4 s while the analyzer is down: buffered
            mic.push_audio(f)
        await wait_until(lambda: c.counters.audio_bytes_in == 7 * BYTES_PER_S)
        assert st.counters.audio_bytes_sent == sent_before and st.audio_buffered_bytes == 4 * BYTES_PER_S

        srv2 = LiveServer(tmp_path, port=srv.port)  # same port and data dir: a restart
        await asyncio.to_thread(srv2.start)
        await wait_until(lambda: st.connected and st.counters.connections >= 2, 60, "reconnect")
        for f in speech[700:900]:  # 2 s after the reconnect
            mic.push_audio(f)
        await wait_until(lambda: st.counters.audio_bytes_sent == 9 * BYTES_PER_S, 60, "all audio handed over")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = await session_state(srv2, sid)
            if state["counters"]["audio_seconds"] >= 9.0:
                break
            await asyncio.sleep(0.05)
        assert state["state"] == "active"
        handed_over_after = (st.counters.audio_bytes_sent - sent_before) / BYTES_PER_S
        assert handed_over_after == 6.0
        assert state["counters"]["audio_seconds"] - before == pytest.approx(handed_over_after, abs=1e-3)
        assert st.counters.audio_chunks_dropped == 0 and st.audio_buffered_bytes == 0
    finally:
        await agent.aclose()
        if srv2 is not None:
            await asyncio.to_thread(srv2.stop)


async def test_audio_beyond_the_buffer_is_dropped_and_counted(server: LiveServer) -> None:
    """The only place audio is lost: more than agent_audio_buffer_s while the analyzer is unreachable."""
    port = _free_port()
    room = FakeRoom("exam-room-down")
    settings = AgentSettings(analyzer_url=f"http://127.0.0.1:{port}", analyzer_api_key=SYSTEM_KEY,
                             agent_audio_buffer_s=1.0)  # fmt: skip
    async with proctoring(room, settings) as agent:
        dora = room.join("dora", candidate("down-1"))
        _, mic = room.publish(dora, MIC)
        await wait_until(lambda: "down-1" in agent.candidates)
        silence = rtc.AudioFrame(bytes(320), 16_000, 1, 160)
        for _ in range(250):  # 2.5 s, the analyzer never answered
            mic.push_audio(silence)
        c = agent.candidates["down-1"]
        await wait_until(lambda: c.counters.audio_bytes_in == 2.5 * BYTES_PER_S)
        assert c.stream.audio_buffered_bytes == BYTES_PER_S
        assert c.stream.counters.audio_bytes_dropped == 1.5 * BYTES_PER_S and c.config is None


async def test_load_reflects_sessions_and_analyzer_readiness(server: LiveServer) -> None:
    assert compute_load(2, 8, 0.1, True) == 0.25
    assert compute_load(2, 8, 0.6, True) == 0.6
    assert compute_load(0, 8, 0.0, False) == 1.0
    assert compute_load(12, 8, 0.0, True) == 1.0
    assert await asyncio.to_thread(analyzer_ready, server.base)
    assert not await asyncio.to_thread(analyzer_ready, f"http://127.0.0.1:{_free_port()}")
    count = SessionCount()
    count.add(1)
    load = AnalyzerLoad(server.base, 4, sessions=count, ready_interval_s=0.2, cpu_interval_s=0.1)
    try:
        load.start()
        await wait_until(lambda: load.ready, 10, "readiness probe")
        assert 0.25 <= load() <= 1.0
        count.add(-1)
        assert load() == pytest.approx(min(1.0, load.cpu), abs=0.2)
    finally:
        load.stop()
    down = AnalyzerLoad(f"http://127.0.0.1:{_free_port()}", 4, sessions=SessionCount(), cpu_interval_s=0.1)
    try:
        down.start()
        await asyncio.sleep(0.3)
        assert down() == 1.0
    finally:
        down.stop()


def test_worker_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    from livekit_proctor.agent import worker

    for var in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET", "PROCTOR_LIVEKIT_URL",
                "PROCTOR_LIVEKIT_API_KEY", "PROCTOR_LIVEKIT_API_SECRET"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(Path(__file__).parent)  # no .env here
    assert worker.main(["start"]) == 2  # no LiveKit credentials
    with pytest.raises(SystemExit):
        worker.main([])
    server = worker.build_server(AgentSettings(livekit_url="ws://127.0.0.1:7880", livekit_api_key="k",
                                               livekit_api_secret="s", agent_name="proctor-test"))  # fmt: skip
    assert server._agent_name == "proctor-test"  # explicit dispatch under this name
    assert isinstance(server.load_fnc, AnalyzerLoad)


async def test_worker_runs_each_room_as_a_job_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real AgentServer, unregistered, with a simulated job: ctx.room is livekit-agents' mock room
    (no media); this checks the wiring (entrypoint, job thread, shutdown callback), not the media path."""
    import threading

    from livekit_proctor.agent import worker

    seen: list[tuple[str, str]] = []
    closed = threading.Event()
    start, aclose = RoomProctor.start, RoomProctor.aclose

    async def recording_start(self: RoomProctor) -> None:
        await start(self)
        seen.append((self.room_name, threading.current_thread().name))

    async def recording_aclose(self: RoomProctor, reason: str = "room_closed") -> None:
        await aclose(self, reason)
        closed.set()

    monkeypatch.setattr(RoomProctor, "start", recording_start)
    monkeypatch.setattr(RoomProctor, "aclose", recording_aclose)
    server = worker.build_server(
        AgentSettings(
            analyzer_url=f"http://127.0.0.1:{_free_port()}",
            analyzer_api_key="k",
            livekit_url="ws://127.0.0.1:9",
            livekit_api_key="key",
            livekit_api_secret="secret-secret-secret-secret-secret",
        )
    )
    started = asyncio.Event()
    server.on("worker_started", lambda *_: started.set())
    run = asyncio.create_task(server.run(devmode=True, unregistered=True))
    try:
        await asyncio.wait_for(started.wait(), 30)
        await server.simulate_job("exam-room-sim", fake_job=True)
        await wait_until(lambda: seen, 60, "the job's entrypoint")
        assert seen[0][1] != threading.current_thread().name  # a job thread, not this loop
        assert [j.job.room.name for j in server.active_jobs] == ["exam-room-sim"]
    finally:
        await server.aclose()
        await run
    assert await asyncio.to_thread(closed.wait, 10)  # the shutdown callback closed the room handler


async def test_rejected_token_is_refreshed_and_the_session_resumes(tmp_path: Path, candidate_rgb: np.ndarray) -> None:
    """The analyzer comes back with a rotated stream secret: the old token gets 4401, the agent asks for a new
    one (POST /api/v1/session/{id}/token) and resumes the same session."""
    srv = LiveServer(tmp_path, stream_secret="a" * 32).start()
    srv2: LiveServer | None = None
    room = FakeRoom("exam-room-token")
    agent = RoomProctor(room, settings_for(srv), streams=FakeStreams(), sessions=SessionCount())
    await agent.start()
    try:
        erin = room.join("erin", candidate("token-1"))
        _, cam = room.publish(erin, CAMERA)
        await connected(agent, "token-1")
        st = agent.candidates["token-1"].stream
        refreshes = st.counters.token_refreshes
        await asyncio.to_thread(srv.stop)
        await wait_until(lambda: not st.connected, 60, "disconnect")
        srv2 = LiveServer(tmp_path, port=srv.port, stream_secret="b" * 32)
        await asyncio.to_thread(srv2.start)
        await wait_until(lambda: st.connected and st.counters.connections >= 2, 60, "reconnect")
        assert st.counters.token_refreshes > refreshes
        await play(cam, [i420_frame(candidate_rgb)], time.time() - 1, 0.6)
        await wait_until(lambda: st.counters.video_sent > 0)
        state = await session_state(srv2, "token-1")
        assert state["state"] == "active"
    finally:
        await agent.aclose()
        if srv2 is not None:
            await asyncio.to_thread(srv2.stop)
