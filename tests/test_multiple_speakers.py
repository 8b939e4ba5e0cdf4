"""MULTIPLE_SPEAKERS over the WebSocket: two LibriSpeech readers one after the other raise it once the second has
been heard; one reader's three recordings in a row raise nothing. Needs the speaker stage (off by default:
PROCTOR_SPEAKER_EMBEDDING) and the shared data (skips without it)."""

from __future__ import annotations

import json
import time
import wave
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import LiveServer, StreamClient, shared_data, stream_url
from tests.synthetic import read_16k

READER_A = [f"audio/single_speaker/librispeech_1998/1998-15444-000{i}.flac" for i in range(3)]  # F, 28 s
READER_B = "audio/single_speaker/librispeech_1688/1688-142285-0000.flac"  # M, 15 s


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    if shared_data() is None:
        pytest.skip("shared data not available")
    s = LiveServer(tmp_path_factory.mktemp("speakers"), speaker_embedding=True).start()
    yield s
    s.stop()


async def _stream(srv: LiveServer, sid: str, pcm: np.ndarray) -> tuple[list[dict[str, Any]], float]:
    """Streams the audio in 100 ms chunks (capture times as recorded); (alerts, capture time of the start)."""
    cfg = srv.start_session(sid)
    async with StreamClient.connect(stream_url(cfg)) as c:
        t0 = time.time()
        for i in range(0, len(pcm), 1600):
            await c.audio(pcm[i : i + 1600].tobytes(), t0 + i / 16000)
        await c.sync()  # everything sent has been analysed
        counters = srv.session(sid)["counters"]
        assert counters["worker_errors"] == 0 and counters["audio_analysed_seconds"] == counters["audio_seconds"]
        return c.alerts(), t0


def _started(alerts: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [a for a in alerts if a["event_type"] == kind and a["incident_state"] == "started"]


async def test_a_second_reader_raises_multiple_speakers_after_they_start(srv: LiveServer) -> None:
    a, b = read_16k(READER_A[0]), read_16k(READER_B)
    alerts, t0 = await _stream(srv, "two-readers", np.concatenate([a, b]))
    (alert,) = _started(alerts, "MULTIPLE_SPEAKERS")
    switch = len(a) / 16000
    ev = alert["evidence"]
    assert ev["speakers_in_window"] >= 2 and ev["speaker_clusters"] >= 2
    # Raised while B is speaking (a voice counts after 2.4 s of it), within the 10 s window after the switch.
    at = datetime.fromisoformat(alert["timestamp"]).timestamp() - t0
    assert switch + 2.4 <= at <= switch + 10.0, (switch, at)


async def test_one_reader_raises_nothing(srv: LiveServer) -> None:
    pcm = np.concatenate([read_16k(p) for p in READER_A])
    alerts, _ = await _stream(srv, "one-reader", pcm)
    assert not _started(alerts, "MULTIPLE_SPEAKERS") and not _started(alerts, "OTHER_VOICE")
    assert _started(alerts, "VOICE_DETECTED")  # the audio was heard


def test_proctor_audio_json_gives_speaker_turns_when_the_speaker_stage_is_on(tmp_path: Path) -> None:
    from tests.test_cli import clean_env, proctor

    a, b = read_16k(READER_A[0]), read_16k(READER_B)
    wav = tmp_path / "two-readers.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.concatenate([a, b]).tobytes())
    r = proctor("audio", str(wav), "--json", env=clean_env(PROCTOR_SPEAKER_EMBEDDING="true"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["speakers"] == 2
    switch = len(a) / 16000
    first, last = out["turns"][0], out["turns"][-1]
    assert first["start_s"] < 2.0 and last["end_s"] > switch + 10 and first["speaker"] != last["speaker"]
    assert any(x["event_type"] == "MULTIPLE_SPEAKERS" for x in out["alerts"])
    off = json.loads(proctor("audio", str(wav), "--json", env=clean_env()).stdout)  # the default: stage off
    assert off["speakers"] is None and off["turns"] == [] and off["speech"]


def test_a_second_voice_is_strong_evidence_of_another_person() -> None:
    from livekit_proctor.analyzer.detectors.speaker import Speakers
    from livekit_proctor.analyzer.detectors.vad import FRAME_S, Speech
    from livekit_proctor.analyzer.rules import catalog
    from livekit_proctor.analyzer.rules.engine import RuleEngine
    from livekit_proctor.analyzer.rules.policy import effective_policy
    from livekit_proctor.analyzer.signals import AudioSignals
    from livekit_proctor.contracts.api import SessionStartRequest

    assert catalog.group("MULTIPLE_SPEAKERS") == catalog.group("MULTIPLE_FACES") == "another_person"
    engine = RuleEngine(effective_policy(SessionStartRequest(exam_session_id="s", candidate_id="c", exam_id="e"), 5))
    events = []
    for seq, n in enumerate([1, 1, 2, 2]):  # the speaker stage's count per 0.5 s window (a stand-in signal)
        ts = 100.0 + seq * 0.5
        sig = AudioSignals(seq, ts, 16000, 0.5)
        sig.put("speech", Speech(np.full(15, 0.9, np.float32), ts + np.arange(15) * FRAME_S, 0.55))
        sig.put("speakers", Speakers([], n, 2, None))
        events += engine.observe_audio(sig)
    started = [e for e in events if e.event_type == "MULTIPLE_SPEAKERS" and e.state == "started"]
    assert len(started) == 1 and started[0].ts == pytest.approx(101.0)
    assert started[0].evidence["speakers_in_window"] == 2 and "trigger_audio_window_seq" in started[0].evidence
    assert "MULTIPLE_SPEAKERS" in engine.strong_open()


async def test_another_voice_than_the_sessions_first_raises_other_voice(srv: LiveServer) -> None:
    a, b = read_16k(READER_A[0]), read_16k(READER_B)
    alerts, t0 = await _stream(srv, "other-voice", np.concatenate([a, b]))
    (alert,) = _started(alerts, "OTHER_VOICE")
    switch = len(a) / 16000
    at = datetime.fromisoformat(alert["timestamp"]).timestamp() - t0
    assert switch < at <= switch + 10.0, (switch, at)
    ev = alert["evidence"]
    assert ev["enrolled_voice_similarity"] < ev["threshold"] == 0.66 and ev["enrolled_voice"] == "session"


def _windows(models: Any, pcm: np.ndarray, t0: float, clock: Any, engine: Any) -> list[Any]:
    events = []
    for i in range(0, len(pcm), 8000):  # 0.5 s windows, as a live session
        events += engine.observe_audio(models.analyze_audio(pcm[i : i + 8000], i // 8000, t0 + i / 16000, clock=clock))
    return events


def test_every_other_librispeech_speaker_is_another_voice_and_the_enrolled_one_is_not() -> None:
    """Each shared LibriSpeech speaker's first recording(s) enroll their voice (the session's first voice, 4 s of
    it); their remaining recordings raise nothing; every other speaker's first recording raises OTHER_VOICE."""
    from livekit_proctor.analyzer.detectors.speaker import SpeakerTracker
    from livekit_proctor.analyzer.pipeline import ModelClock, ModelSet
    from livekit_proctor.analyzer.rules.engine import RuleEngine
    from livekit_proctor.analyzer.rules.policy import effective_policy
    from livekit_proctor.contracts.api import SessionStartRequest

    d = shared_data()
    if d is None:
        pytest.skip("shared data not available")
    speakers = sorted(p.name for p in (d / "audio" / "single_speaker").iterdir() if p.is_dir())
    files = {s: sorted((d / "audio" / "single_speaker" / s).glob("*.flac")) for s in speakers}
    audio = {f: read_16k(str(f.relative_to(d))) for fs in files.values() for f in fs}
    models = ModelSet.load(media="audio", speaker_embedding=True)
    req = SessionStartRequest(exam_session_id="s", candidate_id="c", exam_id="e")
    missed, false = [], []
    for s in speakers:
        clock, engine = ModelClock(), RuleEngine(effective_policy(req, 5.0))
        t, rest = 0.0, list(files[s])
        tracker = None
        while rest and (tracker is None or tracker.enrolled is None):  # the session's first voice enrolls
            f = rest.pop(0)
            _windows(models, audio[f], t, clock, engine)
            t += len(audio[f]) / 16000 + 1.0
            tracker = clock.states.get("speaker")
        assert tracker is not None and tracker.enrolled is not None, f"{s}: no voice enrolled"
        assert rest, f"{s}: no recording left to check the enrolled voice against"
        for own in rest:
            events = _windows(models, audio[own], t, clock, engine)
            t += len(audio[own]) / 16000 + 1.0
            false += [f"{s} {own.name}" for e in events if e.event_type == "OTHER_VOICE" and e.state == "started"]
        for other in speakers:
            if other == s:
                continue
            # A session of its own whose enrolled voice is s's: only the other speaker is heard in it.
            c2, e2 = ModelClock(), RuleEngine(effective_policy(req, 5.0))
            c2.states["speaker"] = SpeakerTracker(threshold=tracker.threshold, enrolled=tracker.enrolled)
            events = _windows(models, audio[files[other][0]], 0.0, c2, e2)
            if not any(e.event_type == "OTHER_VOICE" and e.state == "started" for e in events):
                missed.append(f"{s} enrolled, {other} not flagged")
    assert not false, false
    assert not missed, missed
