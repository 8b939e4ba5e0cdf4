"""The agent against a REAL LiveKit server (no fake anywhere): runs only when LIVEKIT_URL, LIVEKIT_API_KEY and
LIVEKIT_API_SECRET point at one (e.g. `livekit-server --dev`: ws://127.0.0.1:7880, devkey / secret).

A candidate joins with a synthetic camera (black frames, rtc.VideoSource) and microphone (silence,
rtc.AudioSource), a proctor joins, the agent worker registers and is dispatched to the room, streams the
candidate to a real analyzer, and the proctor receives the FACE_NOT_FOUND alert on `proctoring.alert`
while the candidate receives the feedback on `proctoring.feedback`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SYSTEM_KEY, LiveServer

_VARS = ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")
pytestmark = pytest.mark.skipif(
    not all(os.environ.get(v) for v in _VARS),
    reason="needs a LiveKit server: set LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET",
)


def _token(identity: str, room: str, attributes: dict[str, str]) -> str:
    from livekit import api

    key, secret = os.environ["LIVEKIT_API_KEY"], os.environ["LIVEKIT_API_SECRET"]
    grants = api.VideoGrants(room_join=True, room=room, can_publish=True, can_subscribe=True, can_publish_data=True)
    return (
        api.AccessToken(key, secret)
        .with_identity(identity)
        .with_name(identity)
        .with_attributes(attributes)
        .with_grants(grants)
        .to_jwt()
    )


async def test_proctor_receives_the_alert_of_a_candidate_in_a_real_room(tmp_path: Path) -> None:
    from livekit import api, rtc

    from livekit_proctor.agent.config import AgentSettings
    from livekit_proctor.agent.worker import build_server
    from livekit_proctor.contracts.room import ALERT_TOPIC, FEEDBACK_TOPIC

    url, key, secret = (os.environ[v] for v in _VARS)
    tag = uuid.uuid4().hex[:8]
    room_name, agent_name = f"proctor-it-{tag}", f"proctor-it-{tag}"
    analyzer = LiveServer(tmp_path).start()
    settings = AgentSettings(
        analyzer_url=analyzer.base,
        analyzer_api_key=SYSTEM_KEY,
        livekit_url=url,
        livekit_api_key=key,
        livekit_api_secret=secret,
        agent_name=agent_name,
    )
    server = build_server(settings)
    registered = asyncio.Event()
    server.on("worker_registered", lambda *_: registered.set())
    run = asyncio.create_task(server.run(devmode=True))
    lk = api.LiveKitAPI(url, key, secret)
    proctor, cand = rtc.Room(), rtc.Room()
    alerts: list[dict[str, Any]] = []
    feedback: list[dict[str, Any]] = []
    proctor.on("data_received", lambda p: alerts.append(json.loads(p.data)) if p.topic == ALERT_TOPIC else None)
    cand.on("data_received", lambda p: feedback.append(json.loads(p.data)) if p.topic == FEEDBACK_TOPIC else None)
    try:
        await asyncio.wait_for(registered.wait(), 30)
        await lk.room.create_room(api.CreateRoomRequest(name=room_name))
        await proctor.connect(url, _token("proctor-1", room_name, {"role": "proctor"}))
        attrs = {"role": "candidate", "exam_session_id": f"it-{tag}", "candidate_id": "cand-it", "exam_id": "exam-it"}
        await cand.connect(url, _token("candidate-1", room_name, attrs))
        video = rtc.VideoSource(640, 480)
        audio = rtc.AudioSource(16_000, 1)
        await cand.local_participant.publish_track(
            rtc.LocalVideoTrack.create_video_track("camera", video),
            rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA),
        )
        await cand.local_participant.publish_track(
            rtc.LocalAudioTrack.create_audio_track("microphone", audio),
            rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE),
        )
        await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(agent_name=agent_name, room=room_name))
        black = rtc.VideoFrame(640, 480, rtc.VideoBufferType.RGBA, bytes(640 * 480 * 4))
        silence = rtc.AudioFrame(bytes(3200), 16_000, 1, 1600)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            video.capture_frame(black)
            await audio.capture_frame(silence)
            if any(a["event_type"] == "FACE_NOT_FOUND" for a in alerts) and feedback:
                break
            await asyncio.sleep(0.05)
        found = [a for a in alerts if a["event_type"] == "FACE_NOT_FOUND"]
        assert found, f"no FACE_NOT_FOUND alert reached the proctor; got {[a.get('event_type') for a in alerts]}"
        assert found[0]["metadata"]["livekit_room"] == room_name
        assert found[0]["metadata"]["candidate_identity"] == "candidate-1"
        assert any(f["code"] == "FACE_NOT_FOUND" for f in feedback)
        state = analyzer.session(f"it-{tag}")
        assert state["counters"]["frames_received"] > 0 and state["counters"]["audio_seconds"] > 0
    finally:
        await cand.disconnect()
        await proctor.disconnect()
        try:
            await lk.room.delete_room(api.DeleteRoomRequest(room=room_name))
        finally:
            await lk.aclose()
            await server.aclose()
            await run
            analyzer.stop()
