"""Offline analysis: images (`proctor inspect`), recordings (`proctor analyze`) and audio files (`proctor audio`).

A recording goes through the same sampler, models and rule engine as a live
session, with the recording's own timestamps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from livekit_proctor.analyzer.alerting import AlertBuilder, rate_limit
from livekit_proctor.analyzer.detectors.vad import speech_segments
from livekit_proctor.analyzer.fusion import PresenceFusion
from livekit_proctor.analyzer.pipeline import ModelClock, ModelSet, Sampler
from livekit_proctor.analyzer.rules.engine import RuleEngine, RuleEvent
from livekit_proctor.analyzer.rules.limits import IncidentLimiter
from livekit_proctor.analyzer.rules.policy import effective_policy
from livekit_proctor.analyzer.rules.spoof import stages_off as spoof_stages_off
from livekit_proctor.contracts.alerts import Alert, IncidentState
from livekit_proctor.contracts.api import SessionStartRequest
from livekit_proctor.contracts.wire import AUDIO_SAMPLE_RATE


def load_image_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{path}: not a readable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def inspect_image(models: ModelSet, path: Path) -> dict[str, Any]:
    """Everything the models see in one image, and the fused count of people in view."""
    rgb = load_image_rgb(path)
    sig = models.analyze_rgb(rgb, 0, 0.0)
    req = SessionStartRequest(exam_session_id="inspect", candidate_id="inspect", exam_id="inspect", calibration_s=0)
    obs = PresenceFusion(effective_policy(req, 5.0)).observe(sig)
    faces = []
    for f in sig.faces:
        d = f.to_dict()
        if f is sig.primary_face and sig.mesh is not None:
            d.update(sig.mesh.to_dict())  # head pose and gaze (the mesh runs on the largest face)
        faces.append(d)
    objects = sig.objects or []
    return {
        "image": str(path),
        "width": sig.width,
        "height": sig.height,
        "face_count": sig.face_count,
        "persons_present": obs.persons_present,
        "candidate_present": obs.candidate_present,
        "faces": faces,
        "persons": [o.to_dict() for o in objects if o.label == "person"],
        "objects": [o.to_dict() for o in objects if o.label != "person"],
        "pose": sig.pose.to_dict() if sig.pose else None,
        "shoulders_visible": obs.shoulders_visible,
        "hand_near_ear": obs.hand_near_ear,
        "models": models.describe(),
        "latency_ms": {k: round(v, 2) for k, v in sig.latency_ms.items()},
    }


def video_frames(path: Path) -> Iterator[tuple[int, float, np.ndarray]]:
    """(index, seconds from start, RGB frame), using the container's timestamps."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"{path}: cannot open video")
    # Phone recordings carry a rotation tag; OpenCV ignores it unless asked.
    cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1)
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    i = 0
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                return
            pos_ms = cap.get(cv2.CAP_PROP_POS_MSEC)
            t = pos_ms / 1000 if pos_ms and pos_ms > 0 else i / fps
            yield i, t, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            i += 1
    finally:
        cap.release()


def analyze_video(
    models: ModelSet,
    path: Path,
    fps: float = 5.0,
    sensitivity: str = "medium",
    session_id: str = "offline",
    candidate_id: str = "offline",
    calibration_s: float | None = None,
    limiter: IncidentLimiter | None = None,
    progress: Callable[[float], None] | None = None,
) -> tuple[list[tuple[float, Alert]], dict[str, Any]]:
    """Runs a recording through the session pipeline; returns (offset, alert) pairs and a summary.

    `progress`, when given, is called with the position in the recording (seconds) of every frame read.
    """
    req = SessionStartRequest(
        exam_session_id=session_id,
        candidate_id=candidate_id,
        exam_id="offline",
        sensitivity=sensitivity,  # type: ignore[arg-type]
        video_fps=fps,
        calibration_s=calibration_s,
    )
    policy = effective_policy(req, fps)
    engine = RuleEngine(policy)
    sampler = Sampler(policy.video_fps)
    clock = ModelClock()
    clock.off.add("face_embedding")  # a recording has no enrollment to verify against: no use for embeddings
    clock.off |= spoof_stages_off(policy)  # the anti-spoofing CNNs only when the policy asks (it does not here)
    out: list[tuple[float, Alert]] = []
    analysed = 0
    last_t = 0.0

    limiter = limiter or IncidentLimiter(burst=10, refill_s=60.0)
    suppressed = 0

    builder = _builder(models, session_id, candidate_id)

    def to_alerts(events: list[RuleEvent]) -> None:
        nonlocal suppressed
        passed, dropped = rate_limit(limiter, events, last_t)  # the live rate limit, on the recording's own clock
        suppressed += len(dropped)
        out.extend((round(ev.ts, 3), builder.build(ev)) for ev in passed)

    # The audio track (when there is one and an audio stage is loaded) goes through the audio stages and rules in
    # 0.5 s windows, interleaved with the frames in media time, as a live session's audio.
    audio = _audio_windows(models, path)
    audio_s = 0.0

    def audio_until(t: float) -> None:
        nonlocal audio_s
        while audio and audio[0][1] < t:
            seq, start, pcm = audio.pop(0)
            audio_s += len(pcm) / AUDIO_SAMPLE_RATE
            to_alerts(engine.observe_audio(models.analyze_audio(pcm, seq, start, AUDIO_SAMPLE_RATE, clock)))

    for i, t, rgb in video_frames(path):
        last_t = t
        if progress is not None:
            progress(t)
        if not sampler.due(t):
            continue
        analysed += 1
        audio_until(t)
        to_alerts(engine.observe(models.analyze_rgb(rgb, i, t, clock)))
    audio_until(float("inf"))
    if audio_s:  # the audio track may run on a little after the last frame
        last_t = max(last_t, audio_s)
    to_alerts(engine.close_all(last_t, "recording_ended"))
    summary = {
        "video": str(path),
        "duration_s": round(last_t, 3),
        "frames_analysed": analysed,
        "audio_s_analysed": round(audio_s, 3),
        "incidents": sum(1 for _, a in out if a.incident_state == IncidentState.STARTED),
        "incidents_suppressed": suppressed,
        "risk": engine.risk_summary(last_t),
    }
    return out, summary


def read_audio(path: Path, rate: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
    """An audio file (wav, flac, mp3, or a video's first audio track: anything FFmpeg reads) as int16 mono PCM at
    `rate`, resampled by FFmpeg's libswresample (PyAV). ValueError when it has no readable audio."""
    import av  # imported here: only the offline audio commands need FFmpeg

    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
    parts: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise ValueError(f"{path}: no audio track")
            for frame in container.decode(audio=0):
                parts += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            parts += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    except av.FFmpegError as e:
        raise ValueError(f"{path}: not a readable audio file ({e})") from None
    return np.concatenate(parts).astype(np.int16) if parts else np.zeros(0, np.int16)


AUDIO_WINDOW_S = 0.5  # as a live session's audio worker


def _audio_windows(models: ModelSet, path: Path) -> list[tuple[int, float, np.ndarray]]:
    """(seq, start offset, PCM) of a recording's audio track in 0.5 s windows; none without an audio track or an
    audio stage."""
    if not models.audio:
        return []
    try:
        pcm = read_audio(path)
    except ValueError:
        return []  # no (readable) audio track: the video alone
    window = int(AUDIO_WINDOW_S * AUDIO_SAMPLE_RATE)
    return [(n, i / AUDIO_SAMPLE_RATE, pcm[i : i + window]) for n, i in enumerate(range(0, len(pcm), window))]


def _builder(models: ModelSet, session_id: str, candidate_id: str) -> AlertBuilder:
    """Alerts of a recording: their times are the analysis start + the offset in the recording."""
    return AlertBuilder(
        exam_session_id=session_id,
        candidate_id=candidate_id,
        default_model=models.source,
        node_id="offline",
        worker_id="cli",
        time_base=time.time(),
    )


def analyze_audio_file(
    models: ModelSet,
    path: Path,
    sensitivity: str = "medium",
    session_id: str = "offline",
    candidate_id: str = "offline",
    limiter: IncidentLimiter | None = None,
) -> tuple[list[tuple[float, Alert]], dict[str, Any]]:
    """Runs a recording's audio through the session's audio stages and rules, in 0.5 s windows with one session
    state, as a live session does; returns (offset, alert) pairs and a summary with the speech segments."""
    pcm = read_audio(path)
    req = SessionStartRequest(
        exam_session_id=session_id,
        candidate_id=candidate_id,
        exam_id="offline",
        sensitivity=sensitivity,  # type: ignore[arg-type]
    )
    engine = RuleEngine(effective_policy(req, 5.0))
    clock = ModelClock()
    limiter = limiter or IncidentLimiter(burst=10, refill_s=60.0)
    builder = _builder(models, session_id, candidate_id)
    out: list[tuple[float, Alert]] = []
    probs: list[np.ndarray] = []
    frame_ts: list[np.ndarray] = []
    threshold = None
    window = int(AUDIO_WINDOW_S * AUDIO_SAMPLE_RATE)
    duration = len(pcm) / AUDIO_SAMPLE_RATE

    def to_alerts(events: list[RuleEvent], t: float) -> None:
        passed, _ = rate_limit(limiter, events, t)
        out.extend((round(ev.ts, 3), builder.build(ev)) for ev in passed)

    for seq, i in enumerate(range(0, len(pcm), window)):
        t = i / AUDIO_SAMPLE_RATE
        sig = models.analyze_audio(pcm[i : i + window], seq, t, AUDIO_SAMPLE_RATE, clock)
        speech = sig.values.get("speech")
        if speech is not None:
            probs.append(speech.probs)
            frame_ts.append(speech.frame_ts)
            threshold = speech.threshold
        to_alerts(engine.observe_audio(sig), t)
    to_alerts(engine.close_all(duration, "recording_ended"), duration)
    segments: list[tuple[float, float]] | None = None
    if threshold is not None:
        segments = speech_segments(np.concatenate(probs), np.concatenate(frame_ts), threshold)
    turns, speakers = _speaker_turns(models, clock)
    summary = {
        "audio": str(path),
        "duration_s": round(duration, 3),
        # None: no voice-activity stage ran (the vad setting is off)
        "speech": None if segments is None else [[round(a, 3), round(min(b, duration), 3)] for a, b in segments],
        "incidents": sum(1 for _, a in out if a.incident_state == IncidentState.STARTED),
        # None: the speaker stage is off (PROCTOR_SPEAKER_EMBEDDING)
        "turns": turns,
        "speakers": speakers,
    }
    return out, summary


def _speaker_turns(models: ModelSet, clock: ModelClock) -> tuple[list[dict[str, Any]], int | None]:
    """The speaker stage's turns and speaker count over the whole recording (its last voiced run embedded too);
    ([], None) when the stage is off."""
    from livekit_proctor.analyzer.detectors.speaker import SpeakerStage

    stage = next((s for s in models.audio if isinstance(s, SpeakerStage)), None)
    if stage is None:
        return [], None
    tracker = clock.states.get(stage.name)
    if tracker is None:  # on but never due: no speech at all
        return [], 0
    tracker.flush(stage.encoder)
    turns = [{"start_s": round(a, 3), "end_s": round(b, 3), "speaker": k} for a, b, k in tracker.turns()]
    return turns, tracker.speaker_count()
