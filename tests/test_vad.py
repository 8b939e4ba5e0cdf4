"""Voice activity: the Silero VAD stage (state carried per session across windows), VOICE_DETECTED, and both end to
end over the WebSocket on the shared audio (skipped without it)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from livekit_proctor.analyzer.detectors.vad import (
    DEFAULT_THRESHOLD,
    FRAME_S,
    SileroVad,
    Speech,
    VadSettings,
    VadStage,
    VadState,
)
from livekit_proctor.analyzer.pipeline import ModelClock, ModelSet
from livekit_proctor.analyzer.rules.engine import RuleEngine
from livekit_proctor.analyzer.rules.policy import effective_policy
from livekit_proctor.analyzer.signals import AudioSignals
from livekit_proctor.contracts.api import SessionStartRequest
from tests.conftest import LiveServer, StreamClient, shared_data, stream_url
from tests.synthetic import read_16k

LIBRISPEECH = "audio/single_speaker/librispeech_1998/1998-15444-0000.flac"  # read speech, 13.3 s
NON_SPEECH = ["audio/non_speech/esc50_1-100032-A-0_dog.wav", "audio/non_speech/max_typing_parta.wav"]  # 44.1 / 48 kHz


def voice_like(seconds: float, seed: int = 0) -> np.ndarray:
    """A synthetic signal with some structure (not speech): enough to exercise the model's state."""
    t = np.arange(int(seconds * 16000)) / 16000
    rng = np.random.default_rng(seed)
    x = 4000 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + rng.normal(0, 300, len(t))
    return x.astype(np.int16)


def test_the_service_setting_is_the_threshold_the_bench_chose() -> None:
    assert VadSettings().vad_threshold == DEFAULT_THRESHOLD


def test_the_state_is_carried_per_session_whatever_the_windows() -> None:
    models = ModelSet([VadStage(VadSettings())])
    a, b = voice_like(3.0, 1), voice_like(3.0, 2)
    whole, _ = SileroVad().probabilities(a, VadState())

    def stream(pcm: np.ndarray, window: int, clock: ModelClock, t0: float) -> list[Speech]:
        return [
            models.analyze_audio(pcm[i : i + window], i, t0 + i / 16000, clock=clock).values["speech"]
            for i in range(0, len(pcm), window)
        ]

    # Two sessions interleaved, each with its own clock: same probabilities as one uninterrupted stream, for any
    # window length (leftover samples and the 64-sample context wait in the session's state).
    ca, cb = ModelClock(), ModelClock()
    out_a: list[Speech] = []
    out_b: list[Speech] = []
    for i in range(0, len(a), 5000):
        out_a += stream(a[i : i + 5000], 5000, ca, 100.0 + i / 16000)
        out_b += stream(b[i : i + 5000], 5000, cb, 500.0 + i / 16000)
    probs_a = np.concatenate([s.probs for s in out_a])
    np.testing.assert_allclose(probs_a, whole, atol=1e-5)
    frame_ts = np.concatenate([s.frame_ts for s in out_a])
    np.testing.assert_allclose(frame_ts, 100.0 + np.arange(len(whole)) * FRAME_S, atol=1e-6)
    other = np.concatenate([s.probs for s in stream(a, 8000, ModelClock(), 0.0)])
    np.testing.assert_allclose(other, whole, atol=1e-5)
    # Without a session (one window on its own) the stage starts afresh every time.
    alone = models.analyze_audio(a[:8000], 0, 0.0).values["speech"]
    np.testing.assert_allclose(alone.probs, whole[: len(alone.probs)], atol=1e-5)


def _speech_window(seq: int, ts: float, probs: list[float]) -> AudioSignals:
    sig = AudioSignals(seq, ts, 16000, len(probs) * FRAME_S)
    sig.put("speech", Speech(np.array(probs, np.float32), ts + np.arange(len(probs)) * FRAME_S, 0.55))
    sig.model = "silero-vad-6"
    return sig


def test_voice_detected_after_two_seconds_of_speech_with_its_evidence() -> None:
    engine = RuleEngine(effective_policy(SessionStartRequest(exam_session_id="s", candidate_id="c", exam_id="e"), 5))
    events = []
    # 1.5 s of speech: not yet; a 1 s pause; then 3 s of speech with a short (0.2 s) dip: raised once.
    probs = [0.95] * 47 + [0.1] * 31 + [0.9] * 40 + [0.3] * 6 + [0.97] * 50 + [0.05] * 60
    for k in range(0, len(probs), 16):
        events += engine.observe_audio(_speech_window(k // 16, 1000 + k * FRAME_S, probs[k : k + 16]))
    started = [e for e in events if e.event_type == "VOICE_DETECTED" and e.state.value == "started"]
    ended = [e for e in events if e.event_type == "VOICE_DETECTED" and e.state.value == "ended"]
    assert len(started) == 1 and len(ended) == 1
    onset = 1000 + 78 * FRAME_S
    assert started[0].ts == pytest.approx(onset + 2.0, abs=0.05)
    ev = ended[0].evidence
    assert ev["threshold"] == 0.8 and ev["threshold_s"] == 2.0
    assert ev["voiced_s"] == pytest.approx(90 * FRAME_S, abs=1e-3)  # the dip is not voiced
    assert 0.85 < ev["mean_speech_probability"] < 0.95
    assert ev["duration_s"] == pytest.approx(95 * FRAME_S, abs=0.05)
    assert started[0].preview is None  # audio: no thumbnail
    assert "trigger_frame_seq" not in ev and ev["trigger_audio_window_seq"] >= ev["first_audio_window_seq"]


async def _stream(srv: LiveServer, sid: str, pcm: np.ndarray) -> list[dict[str, Any]]:
    cfg = srv.start_session(sid)
    async with StreamClient.connect(stream_url(cfg)) as c:
        t0 = time.time()
        for i in range(0, len(pcm), 1600):  # 100 ms chunks, faster than real time, capture times as recorded
            await c.audio(pcm[i : i + 1600].tobytes(), t0 + i / 16000)
        await c.sync()  # everything sent has been analysed and its alerts sent
        counters = srv.session(sid)["counters"]
        assert counters["worker_errors"] == 0
        assert counters["audio_seconds"] == pytest.approx(len(pcm) / 16000, abs=0.01)
        assert counters["audio_analysed_seconds"] == counters["audio_seconds"]  # none dropped, the last part included
        return c.alerts()


@pytest.fixture(scope="module")
def vad_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    if shared_data() is None:
        pytest.skip("shared data not available")
    srv = LiveServer(tmp_path_factory.mktemp("vad")).start()
    yield srv
    srv.stop()


async def test_speech_streamed_over_the_websocket_raises_voice_detected(vad_server: LiveServer) -> None:
    alerts = await _stream(vad_server, "vad-speech", read_16k(LIBRISPEECH))
    voice = [a for a in alerts if a["event_type"] == "VOICE_DETECTED"]
    assert voice and voice[0]["incident_state"] == "started", alerts
    ev = voice[0]["evidence"]
    assert ev["voiced_s"] > 1.5 and ev["mean_speech_probability"] > 0.8


@pytest.mark.parametrize("rel", NON_SPEECH)
async def test_non_speech_streamed_over_the_websocket_raises_nothing(vad_server: LiveServer, rel: str) -> None:
    pcm = read_16k(rel)
    alerts = await _stream(vad_server, f"vad-none-{Path(rel).stem[:20]}", pcm)
    assert not [a for a in alerts if a["event_type"] == "VOICE_DETECTED"]


async def test_an_audio_stage_failure_is_counted_and_the_audio_goes_on(tmp_path: Path) -> None:
    from livekit_proctor.analyzer.metrics import Metrics
    from livekit_proctor.analyzer.pipeline import InferencePool
    from livekit_proctor.analyzer.sessions import SessionManager
    from livekit_proctor.analyzer.signals import Signals
    from livekit_proctor.analyzer.stages import Stage
    from livekit_proctor.contracts import wire
    from livekit_proctor.db import make_engine, make_sessionmaker
    from livekit_proctor.dispatcher.outbox import SqlOutbox
    from livekit_proctor.settings import Settings

    class FailsOnce(Stage):
        name = writes = "fails_once"
        media = "audio"
        model = "test.fails_once"
        calls = 0

        def run(self, media: np.ndarray, signals: Signals) -> int:
            FailsOnce.calls += 1
            if FailsOnce.calls == 1:
                raise RuntimeError("boom")
            return len(media)

    s = Settings(data_dir=tmp_path)
    sm = make_sessionmaker(make_engine(s.resolved_database_url()))
    metrics = Metrics()
    pool = InferencePool(1, metrics)
    models = ModelSet([VadStage(VadSettings()), FailsOnce(None)])
    mgr = SessionManager(s, sm, models, pool, SqlOutbox(sm, None), metrics)
    try:
        live, _ = await mgr.start(SessionStartRequest(exam_session_id="f", candidate_id="c", exam_id="e"), "t")
        t0 = time.time()
        chunk = voice_like(0.1).tobytes()
        for i in range(12):  # 1.2 s: two full windows and a held remainder
            await live.offer_audio(wire.MediaMessage(wire.Kind.AUDIO, i, t0 + i * 0.1, chunk))
        await live.settled()  # the ping barrier: every chunk analysed (or failed), the remainder included
        assert live.counters.worker_errors == 1
        assert FailsOnce.calls == 3  # the failed window, the next one, and the remainder flushed for the barrier
        await live.offer_audio(wire.MediaMessage(wire.Kind.AUDIO, 12, t0 + 1.2, chunk))
        await live.settled()
        assert FailsOnce.calls == 4 and live.counters.worker_errors == 1
        # Every byte went through the stages but the window that failed.
        assert live.counters.audio_analysed_bytes == live.counters.audio_bytes - 16000
    finally:
        await mgr.shutdown()
        pool.shutdown()


def test_proctor_audio_json_gives_speech_segments_and_alerts() -> None:
    from tests.test_cli import proctor

    d = shared_data()
    if d is None:
        pytest.skip("shared data not available")
    r = proctor("audio", str(d / LIBRISPEECH), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"duration_s", "speech", "turns", "speakers", "alerts"}
    assert out["duration_s"] == pytest.approx(13.3, abs=0.05)
    assert out["speech"] and all(0 <= a < b <= out["duration_s"] for a, b in out["speech"])
    assert sum(b - a for a, b in out["speech"]) > 8  # read speech, a few pauses
    assert (out["alerts"][0]["event_type"], out["alerts"][0]["incident_state"]) == ("VOICE_DETECTED", "started")
    r = proctor("audio", str(d / NON_SPEECH[1]), "--json")  # 48 kHz stereo typing
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["speech"] == [] and out["alerts"] == [] and out["duration_s"] == pytest.approx(6.0, abs=0.05)


def test_microphone_off_ends_an_open_voice_incident() -> None:
    engine = RuleEngine(effective_policy(SessionStartRequest(exam_session_id="s", candidate_id="c", exam_id="e"), 5))
    events = []
    for k in range(0, 160, 16):  # 5 s of speech
        events += engine.observe_audio(_speech_window(k // 16, 1000 + k * FRAME_S, [0.95] * 16))
    assert [e.state.value for e in events] == ["started"]
    ended = engine.reset_audio(1006.0, "microphone:track_muted")
    assert [(e.event_type, e.state.value, e.evidence["end_reason"]) for e in ended] == [
        ("VOICE_DETECTED", "ended", "microphone:track_muted")
    ]
    assert engine.open_incidents() == []


def test_proctor_analyze_runs_the_recordings_audio_track_too() -> None:
    from tests.test_cli import proctor

    d = shared_data()
    if d is None:
        pytest.skip("shared data not available")
    r = proctor("analyze", str(d / "video/face_recognition__short_hamilton_clip.mp4"), "--json")  # speech / rap
    assert r.returncode == 0, r.stderr
    voice = [json.loads(x) for x in r.stdout.splitlines() if '"VOICE_DETECTED"' in x]
    assert [a["incident_state"] for a in voice] == ["started", "ended"]
    assert voice[0]["offset_s"] < 5 and voice[1]["evidence"]["end_reason"] == "recording_ended"
    r = proctor("analyze", str(d / "video/proctoring_ai__center_focus.mp4"), "--json")  # near-silent room tone
    assert r.returncode == 0, r.stderr
    assert '"VOICE_DETECTED"' not in r.stdout
