"""Voice activity: Silero VAD (models/silero_vad/) with onnxruntime, and the `vad` stage that writes "speech".

Silero takes 512 new samples (32 ms at 16 kHz) with the last 64 samples before them as context, and a recurrent
state; it returns the probability that those 512 samples are speech. The context, the state and the samples left
over from a window that is not a multiple of 512 belong to one audio stream, so they live in a `VadState` per
session (a stateful stage, analyzer/stages.py; docs/architecture.md "Per-session stage state"), never in the
stage object that all sessions share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from livekit_proctor.analyzer.detectors.manifest import models_dir, verify
from livekit_proctor.analyzer.detectors.objects import _read_model, _session  # the shared onnxruntime setup
from livekit_proctor.analyzer.signals import Signals
from livekit_proctor.analyzer.stages import StageSettings, StatefulStage, service_setting

SAMPLE_RATE = 16_000
FRAME = 512  # new samples per model call (32 ms)
CONTEXT = 64  # samples of the previous call prepended to each
FRAME_S = FRAME / SAMPLE_RATE
# A speech probability above this counts a 32 ms frame as voiced: the best F1 on bench/vad.py's curve over the
# labelled and the non-speech frames pooled (0.55-0.60 and 0.75 tie there; Silero's own default is 0.5).
DEFAULT_THRESHOLD = 0.55
# A gap in the stream longer than this starts the recurrent state afresh (what was before does not continue).
RESET_GAP_S = 1.0


def model_file() -> Path:
    """models/silero_vad/silero_vad.onnx (under PROCTOR_MODELS_DIR when that is set)."""
    return models_dir() / "silero_vad" / "silero_vad.onnx"


@dataclass(slots=True)
class VadState:
    """One stream's Silero state: the recurrent state, the 64-sample context, samples not yet a full frame."""

    rnn: np.ndarray = field(default_factory=lambda: np.zeros((2, 1, 128), np.float32))
    context: np.ndarray = field(default_factory=lambda: np.zeros(CONTEXT, np.float32))
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    end_ts: float | None = None  # capture time just after the last sample seen


@dataclass(frozen=True, slots=True)
class Speech:
    """Voice activity over one audio window: a probability per 32 ms frame that ended in it.

    `frame_ts[i]` is the capture time of frame i's first sample (a frame can start in the previous window: its
    leftover samples are completed by this one). True when any frame is voiced (Due.if_speech)."""

    probs: np.ndarray  # float32, one per frame
    frame_ts: np.ndarray  # float64 capture times
    threshold: float

    @property
    def voiced(self) -> np.ndarray:
        return self.probs > self.threshold

    @property
    def voiced_s(self) -> float:
        return float(np.count_nonzero(self.voiced)) * FRAME_S

    @property
    def voiced_fraction(self) -> float:
        return float(np.mean(self.voiced)) if len(self.probs) else 0.0

    def segments(self) -> list[tuple[float, float]]:
        """Runs of voiced frames as (start, end) capture times."""
        out: list[tuple[float, float]] = []
        for i in np.flatnonzero(self.voiced):
            start, end = float(self.frame_ts[i]), float(self.frame_ts[i]) + FRAME_S
            if out and start - out[-1][1] < FRAME_S / 2:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
        return out

    def __bool__(self) -> bool:
        return bool(np.any(self.voiced))

    def to_dict(self) -> dict[str, Any]:
        return {
            "frames": len(self.probs),
            "voiced_s": round(self.voiced_s, 3),
            "voiced_fraction": round(self.voiced_fraction, 3),
            "mean_probability": round(float(np.mean(self.probs)), 3) if len(self.probs) else None,
            "segments": [[round(a, 3), round(b, 3)] for a, b in self.segments()],
        }


def speech_segments(
    probs: np.ndarray, frame_ts: np.ndarray, threshold: float, min_silence_s: float = 0.1, min_speech_s: float = 0.25
) -> list[tuple[float, float]]:
    """Voiced frames as (start, end) segments of a whole recording: pauses shorter than min_silence_s are bridged,
    segments shorter than min_speech_s dropped (Silero's own get_speech_timestamps defaults: 100 ms, 250 ms)."""
    out: list[tuple[float, float]] = []
    for start, end in Speech(probs, frame_ts, threshold).segments():
        if out and start - out[-1][1] < min_silence_s:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return [(a, b) for a, b in out if b - a >= min_speech_s]


class SileroVad:
    """Silero VAD with onnxruntime. Thread-safe: one InferenceSession; the stream's state is the caller's."""

    model = "silero-vad-6"

    def __init__(self, model_path: str | Path | None = None, num_threads: int = 1) -> None:
        path = Path(model_path) if model_path else model_file()
        data = _read_model(path, "silero_vad")
        self.verified = model_path is None and verify("silero_vad", data)
        self._sess = _session(data, num_threads)
        self._sr = np.array(SAMPLE_RATE, np.int64)

    def probabilities(self, pcm: np.ndarray, state: VadState, ts: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Speech probability of every complete 512-sample frame of `state.pending` + `pcm` (int16 or float in
        [-1, 1] at 16 kHz), with each frame's start time when `ts` (the capture time of pcm[0]) is given
        (else sample offsets in seconds from pcm[0]). Updates `state`; leftover samples wait for the next call."""
        x = pcm.astype(np.float32) / 32768.0 if pcm.dtype == np.int16 else pcm.astype(np.float32, copy=False)
        t0 = 0.0 if ts is None else ts
        if ts is not None and state.end_ts is not None and abs(ts - state.end_ts) > RESET_GAP_S:
            # A gap (or the clock stepped back): what came before does not continue into this audio.
            state.rnn, state.context, state.pending = np.zeros_like(state.rnn), np.zeros_like(state.context), x[:0]
        start = t0 - len(state.pending) / SAMPLE_RATE
        buf = np.concatenate([state.pending, x]) if len(state.pending) else x
        n = len(buf) // FRAME
        probs = np.empty(n, np.float32)
        inp = np.empty((1, CONTEXT + FRAME), np.float32)
        ctx, rnn = state.context, state.rnn
        for i in range(n):
            inp[0, :CONTEXT] = ctx
            inp[0, CONTEXT:] = buf[i * FRAME : (i + 1) * FRAME]
            out, rnn = self._sess.run(None, {"input": inp, "state": rnn, "sr": self._sr})
            probs[i] = out[0, 0]
            ctx = inp[0, -CONTEXT:].copy()
        state.context, state.rnn = ctx, rnn
        state.pending = buf[n * FRAME :].copy()
        state.end_ts = t0 + len(x) / SAMPLE_RATE
        return probs, start + np.arange(n) * FRAME_S


class VadSettings(StageSettings):
    vad: bool = service_setting("vad")
    vad_threshold: float = service_setting("vad_threshold")  # its default is DEFAULT_THRESHOLD


class VadStage(StatefulStage[VadState]):
    """Voice activity on each audio window: writes "speech" (a `Speech`)."""

    name = "vad"
    writes = "speech"
    media = "audio"
    settings_model = VadSettings

    def __init__(self, settings: VadSettings) -> None:
        super().__init__(settings)
        self.vad = SileroVad()
        self.model = self.vad.model
        self.verified = self.vad.verified
        self.threshold = settings.vad_threshold

    @classmethod
    def enabled(cls, settings: Any) -> bool:
        return bool(settings.vad)

    def new_state(self) -> VadState:
        return VadState()

    def step(self, media: np.ndarray, signals: Signals, state: VadState) -> Speech:
        probs, frame_ts = self.vad.probabilities(media, state, signals.ts)
        return Speech(probs, frame_ts, self.threshold)
