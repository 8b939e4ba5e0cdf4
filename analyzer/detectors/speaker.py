"""Speaker embeddings, online speaker clustering and voice enrollment: Resemblyzer's GE2E encoder as ONNX.

* Features (numpy, no librosa at run time): Resemblyzer's `audio.wav_to_mel_spectrogram`, i.e. librosa's
  `melspectrogram` with 16 kHz audio, a 400-sample (25 ms) periodic Hann window, a 160-sample (10 ms) hop, frames
  centred with zero padding (librosa >= 0.10's default), power spectrum, 40 Slaney-scale mel filters 0-8 kHz with
  Slaney area normalisation. Not a log spectrum: the encoder was trained on these. tests/test_speaker.py checks
  them against librosa's output stored by models/resemblyzer/convert.py.
* Encoder: models/resemblyzer/resemblyzer.onnx, 160 frames (1.6 s) in, a unit-length 256-d embedding out.
  `embed_utterance` reproduces Resemblyzer's (partials at 1.3 per second, the last one zero-padded when it is at
  least 75 % covered, their mean renormalised). Resemblyzer also raises quiet audio to -30 dBFS first
  (`normalize_volume`, increase only); the tracker does the same per partial.
* `SpeakerTracker`: one session's stream. Voiced audio (the "speech" signal of the VAD stage) is cut into 1.6 s
  partials every HOP_S; each is embedded and assigned to the closest speaker cluster by cosine similarity
  (CLUSTER_THRESHOLD) or starts a new one; clusters are running means. `speakers_in(window)` counts the clusters
  heard in the last window (with MIN_PARTIALS partials there); when a voice is enrolled, each partial's
  similarity to it is kept, and `enrolled_similarity_in(window)` is their mean, for OTHER_VOICE. Overlapping
  speech is not separated: a partial over two voices lands in the closer cluster (or, far from both, in a new one).
* Counting speakers on far-field meeting audio is weak (bench/speakers.py: about a third of the 10 s windows of
  the shared multi-speaker files counted exactly, mostly a second speaker missed); see models/resemblyzer/README.md.

The thresholds were chosen from the ROCs of bench/speakers.py on the shared LibriSpeech files
(models/resemblyzer/README.md).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from livekit_proctor.analyzer.detectors.manifest import models_dir, verify
from livekit_proctor.analyzer.detectors.objects import _read_model, _session  # the shared onnxruntime setup
from livekit_proctor.analyzer.signals import Signals
from livekit_proctor.analyzer.stages import Due, StageSettings, StatefulStage, service_setting

MODEL_NAME = "resemblyzer"
SAMPLE_RATE = 16_000
N_FFT = 400  # 25 ms
HOP = 160  # 10 ms
N_MELS = 40
PARTIAL_FRAMES = 160  # 1.6 s per partial utterance
PARTIAL_SAMPLES = PARTIAL_FRAMES * HOP
EMBEDDING_DIM = 256
TARGET_DBFS = -30.0  # Resemblyzer's audio_norm_target_dBFS (raised to, never lowered)

# Cosine similarity of a 1.6 s partial to a cluster's mean at or above which it joins that cluster: between the
# equal-error point of partials against another file's mean (0.660) and the highest different-speaker score (0.699)
# on the shared LibriSpeech files (bench/speakers.py); 0.65 already merged a man's and a woman's voice.
CLUSTER_THRESHOLD = 0.67
# Mean similarity of the voiced partials of a window to the enrolled voice below which it is another voice: the
# enrollment ROC's equal-error point (0.663); per file the mean separated every speaker (a single partial did not).
ENROLL_THRESHOLD = 0.66

# A cluster counts as a speaker in a window only with this many partials there (2: at least 2.4 s of that voice):
# a lone partial that strays from its speaker's cluster (a cough, a laugh) would otherwise be a second speaker.
MIN_PARTIALS = 2

HOP_S = 0.8  # a new partial every 0.8 s of voiced audio (50 % overlap)
MAX_GAP_S = 0.6  # a pause shorter than this does not end a voiced run (its voiced audio is joined)
MIN_RUN_S = 1.0  # a voiced run shorter than 1.6 s is still embedded (zero-padded) when it lasts this long
WINDOW_S = 10.0  # MULTIPLE_SPEAKERS' window (policy)
MAX_UNDECIDED = 2048  # samples kept for the next window's VAD frames (Silero holds back at most 511)
VAD_FRAME_S = 0.032  # Silero's frame, when a window has a single VAD frame to measure it by


def model_file() -> Path:
    """The bundled encoder (under PROCTOR_MODELS_DIR when that is set)."""
    return models_dir() / "resemblyzer" / "resemblyzer.onnx"


# ---- features -----------------------------------------------------------------------------------------------


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    mel = f / f_sp
    high = f >= min_log_hz
    mel[high] = min_log_mel + np.log(f[high] / min_log_hz) / logstep
    return mel


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    f = m * f_sp
    high = m >= min_log_mel
    f[high] = min_log_hz * np.exp(logstep * (m[high] - min_log_mel))
    return f


@lru_cache(maxsize=1)
def mel_filterbank() -> np.ndarray:
    """(40, 201) triangular Slaney mel filters over the rfft bins, area-normalised (librosa.filters.mel)."""
    fft_freqs = np.fft.rfftfreq(N_FFT, 1.0 / SAMPLE_RATE)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([SAMPLE_RATE / 2]))[0],
                                   N_MELS + 2))  # fmt: skip
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    weights.setflags(write=False)
    return weights


@lru_cache(maxsize=1)
def _window() -> np.ndarray:
    w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    w.setflags(write=False)
    return w


def as_float(pcm: np.ndarray) -> np.ndarray:
    """int16 PCM -> float32 in [-1, 1]; float input is kept."""
    if pcm.dtype == np.int16:
        return pcm.astype(np.float32) / 32768.0
    return np.asarray(pcm, np.float32)


def mel_frames(wav: np.ndarray) -> np.ndarray:
    """(frames, 40) float32 power mel frames of 16 kHz audio, one per 10 ms, centred (zero padding)."""
    x = np.pad(as_float(wav).astype(np.float64), N_FFT // 2)
    n = 1 + (len(x) - N_FFT) // HOP
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP][:n]
    power = np.abs(np.fft.rfft(frames * _window(), axis=1)) ** 2
    return (power @ mel_filterbank().T).astype(np.float32)


def normalize_volume(wav: np.ndarray, target_dbfs: float = TARGET_DBFS) -> np.ndarray:
    """Raises quiet audio to target_dbfs RMS (Resemblyzer's preprocessing, increase only)."""
    x = as_float(wav)
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0
    if rms <= 0.0:
        return x
    gain_db = target_dbfs - 20 * math.log10(rms)
    return x if gain_db <= 0 else (x * 10 ** (gain_db / 20)).astype(np.float32)


def partial_starts(n_samples: int, rate: float = 1.3, min_coverage: float = 0.75) -> list[int]:
    """Start frames of Resemblyzer's partial utterances (VoiceEncoder.compute_partial_slices)."""
    n_frames = math.ceil((n_samples + 1) / HOP)
    step = round(SAMPLE_RATE / rate / HOP)
    starts = list(range(0, max(1, n_frames - PARTIAL_FRAMES + step + 1), step))
    coverage = (n_samples - starts[-1] * HOP) / PARTIAL_SAMPLES
    if coverage < min_coverage and len(starts) > 1:
        starts.pop()
    return starts


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


# ---- encoder ------------------------------------------------------------------------------------------------


class SpeakerEncoder:
    """The GE2E encoder with onnxruntime. Thread-safe: one InferenceSession, per-call buffers."""

    def __init__(self, model_path: str | Path | None = None, num_threads: int = 1) -> None:
        path = Path(model_path) if model_path else model_file()
        self.name = "resemblyzer.onnx" if model_path is None else f"resemblyzer:{path.name}"
        data = _read_model(path, "resemblyzer")
        self.verified = verify(MODEL_NAME, data) if model_path is None else False
        self._session = _session(data, num_threads)
        inp = self._session.get_inputs()[0]
        if inp.shape[-1] != N_MELS:
            raise ValueError(f"speaker encoder input {inp.shape} does not end in {N_MELS} mel channels")
        self._input, self._output = inp.name, self._session.get_outputs()[0].name

    def embed_mels(self, mels: np.ndarray) -> np.ndarray:
        """(N, frames, 40) mel frames -> (N, 256) unit-length embeddings."""
        if mels.ndim != 3 or mels.shape[2] != N_MELS or len(mels) == 0:
            raise ValueError(f"expected (N>0, frames, {N_MELS}) mel frames, got {mels.shape}")
        out = self._session.run([self._output], {self._input: np.ascontiguousarray(mels, np.float32)})[0]
        return np.asarray(out, np.float32)

    def embed_partials(self, wavs: list[np.ndarray]) -> np.ndarray:
        """One embedding per 1.6 s partial (16 kHz, zero-padded or cut to 1.6 s): (N, 256)."""
        if not wavs:
            return np.zeros((0, EMBEDDING_DIM), np.float32)
        fixed = [np.pad(w, (0, max(0, PARTIAL_SAMPLES - len(w))))[:PARTIAL_SAMPLES] for w in map(as_float, wavs)]
        # Resemblyzer's frames for a 1.6 s partial are 160 of the centred frames of its padded utterance.
        return self.embed_mels(np.stack([mel_frames(w)[:PARTIAL_FRAMES] for w in fixed]))

    def embed_voice(self, wav: np.ndarray) -> np.ndarray:
        """An enrollment embedding of a recording of one voice (voiced audio, 16 kHz): volume normalised as
        Resemblyzer's preprocessing does, then embed_utterance. What SpeakerTracker.enrolled takes."""
        return self.embed_utterance(normalize_volume(wav))

    def embed_utterance(self, wav: np.ndarray, rate: float = 1.3, min_coverage: float = 0.75) -> np.ndarray:
        """Resemblyzer's VoiceEncoder.embed_utterance: partials of the whole utterance, mean, renormalised.
        (Its preprocess_wav, volume normalisation and silence trimming, is the caller's.)"""
        x = as_float(wav)
        starts = partial_starts(len(x), rate, min_coverage)
        need = (starts[-1] + PARTIAL_FRAMES) * HOP
        if need >= len(x):
            x = np.pad(x, (0, need - len(x)))
        mel = mel_frames(x)
        partials = self.embed_mels(np.stack([mel[s : s + PARTIAL_FRAMES] for s in starts]))
        mean = partials.mean(axis=0)
        return np.asarray(mean / np.linalg.norm(mean), np.float32)


# ---- one session's speakers -----------------------------------------------------------------------------------


class VoicedFrames(Protocol):
    """What the tracker reads from the "speech" signal (analyzer/detectors/vad.py's Speech): per VAD frame, its
    capture time and whether it is voiced."""

    @property
    def voiced(self) -> np.ndarray: ...

    @property
    def frame_ts(self) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class Partial:
    """One embedded 1.6 s stretch of voiced audio and the cluster it joined."""

    start: float  # capture time of its first sample
    end: float
    speaker: int
    similarity: float  # to the cluster it joined (1.0 for a cluster's first partial)
    enrolled_similarity: float | None  # to the enrolled voice, when one is enrolled


@dataclass(slots=True)
class Cluster:
    total: np.ndarray  # sum of its partials' embeddings (the running mean's direction)
    count: int = 1
    first_ts: float = 0.0
    last_ts: float = 0.0

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.total / np.linalg.norm(self.total), np.float32)


@dataclass(slots=True)
class SpeakerTracker:
    """One session's stream: voiced audio not yet embedded, the speaker clusters, recent partials."""

    threshold: float = CLUSTER_THRESHOLD
    min_partials: int = MIN_PARTIALS
    enrolled: np.ndarray | None = None  # unit-length voice embedding of the candidate
    # Enroll the session's first voice once its cluster has this many partials (0: never): the candidate's voice
    # from the first confident speech of the session (calibration), when no enrollment recording is given.
    auto_enroll_partials: int = 0
    enrolled_at: float | None = None  # capture time of the partial that completed the session's enrollment
    clusters: list[Cluster] = field(default_factory=list)
    partials: deque[Partial] = field(default_factory=lambda: deque(maxlen=256))
    _run: list[np.ndarray] = field(default_factory=list)  # the current voiced run's audio (float32 pieces)
    _run_start: float | None = None  # capture time of the first sample in _run
    _run_end: float | None = None  # capture time just after the last voiced sample appended
    _undecided: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # samples no VAD frame covers yet
    _undecided_end: float = 0.0  # capture time just after them

    def assign(self, emb: np.ndarray, start: float, end: float) -> Partial:
        """Adds one partial embedding to the closest cluster (or a new one)."""
        sims = [cosine(emb, c.mean) for c in self.clusters]
        best = int(np.argmax(sims)) if sims else -1
        if best >= 0 and sims[best] >= self.threshold:
            c = self.clusters[best]
            c.total = c.total + emb
            c.count += 1
            c.last_ts = end
            speaker, sim = best, sims[best]
        else:
            self.clusters.append(Cluster(emb.astype(np.float64), 1, start, end))
            speaker, sim = len(self.clusters) - 1, 1.0
        enrolled = cosine(emb, self.enrolled) if self.enrolled is not None else None
        p = Partial(start, end, speaker, sim, enrolled)
        self.partials.append(p)
        first_voice_heard = 0 < self.auto_enroll_partials <= self.clusters[speaker].count
        if self.enrolled is None and first_voice_heard:
            self.enroll_main_voice()
            self.enrolled_at = end
        return p

    def turns(self) -> list[tuple[float, float, int]]:
        """Speaker turns over the partials kept (the last 256): runs of consecutive partials of one cluster as
        (start, end, speaker); where two turns' partials overlap, the boundary is the middle of the overlap.
        Clusters that never reached MIN_PARTIALS partials are left out (stray partials, like speakers_in)."""
        counts = Counter(p.speaker for p in self.partials)
        out: list[tuple[float, float, int]] = []
        for p in self.partials:
            if counts[p.speaker] < self.min_partials:
                continue
            if out and out[-1][2] == p.speaker and p.start <= out[-1][1] + MAX_GAP_S:
                out[-1] = (out[-1][0], p.end, p.speaker)
            elif out and p.start < out[-1][1]:
                middle = (p.start + out[-1][1]) / 2
                out[-1] = (out[-1][0], middle, out[-1][2])
                out.append((middle, p.end, p.speaker))
            else:
                out.append((p.start, p.end, p.speaker))
        return out

    def speaker_count(self) -> int:
        """Speakers heard in the whole stream: clusters with at least MIN_PARTIALS partials."""
        return sum(1 for c in self.clusters if c.count >= self.min_partials)

    def enroll_main_voice(self) -> bool:
        """Enrolls the voice heard most so far (the largest cluster's mean): the candidate's voice taken from the
        calibration period's speech. False when nothing was heard yet."""
        if not self.clusters:
            return False
        self.enrolled = max(self.clusters, key=lambda c: c.count).mean
        return True

    def enrolled_similarity_in(self, end: float, window_s: float = WINDOW_S) -> float | None:
        """Mean similarity to the enrolled voice of the partials centred in (end - window_s, end]; None without an
        enrolled voice or voice. OTHER_VOICE should rest on this mean, not on one partial: per file of the shared
        LibriSpeech set the mean separated every enrolled speaker from every other, the lowest partial did not."""
        sims = [p.enrolled_similarity for p in self._in(end, window_s) if p.enrolled_similarity is not None]
        return float(np.mean(sims)) if sims else None

    def _in(self, end: float, window_s: float) -> list[Partial]:
        return [p for p in self.partials if end - window_s < (p.start + p.end) / 2 <= end]

    def speakers_in(self, end: float, window_s: float = WINDOW_S) -> set[int]:
        """The clusters heard in (end - window_s, end]: those with at least min_partials partials centred in it."""
        heard = Counter(p.speaker for p in self._in(end, window_s))
        return {k for k, n in heard.items() if n >= self.min_partials}

    def feed(self, encoder: SpeakerEncoder, pcm: np.ndarray, ts: float, speech: VoicedFrames | None) -> list[Partial]:
        """Adds a window of audio (capture time ts of pcm[0]) with its VAD frames; embeds every complete partial
        of voiced audio and returns them. Without VAD frames the whole window counts as voiced."""
        x = as_float(pcm)
        # The VAD decides a frame only once its 512 samples are in: the samples after its last frame wait for the
        # next window's frames (when that window follows on without a gap), or they would be lost.
        if len(self._undecided) and abs(ts - self._undecided_end) < 0.5 / SAMPLE_RATE:
            ts -= len(self._undecided) / SAMPLE_RATE
            x = np.concatenate([self._undecided, x])
        self._undecided = x[:0]
        t = ts + np.arange(len(x)) / SAMPLE_RATE
        if speech is None:
            mask = np.ones(len(x), bool)
        else:
            starts, voiced = np.asarray(speech.frame_ts, np.float64), np.asarray(speech.voiced, bool)
            frame_s = float(starts[1] - starts[0]) if len(starts) > 1 else VAD_FRAME_S
            k = np.searchsorted(starts, t, side="right") - 1  # the frame each sample falls in (-1: before all)
            inside = (k >= 0) & (t < starts[np.maximum(k, 0)] + frame_s) if len(starts) else np.zeros(len(t), bool)
            mask = inside & voiced[np.maximum(k, 0)] if len(starts) else inside
            decided = (
                len(x) if not len(starts) else min(len(x), max(0, round((starts[-1] + frame_s - ts) * SAMPLE_RATE)))
            )
            if decided < len(x) and len(x) - decided <= MAX_UNDECIDED:
                self._undecided, self._undecided_end = x[decided:].copy(), ts + len(x) / SAMPLE_RATE
                x, t, mask = x[:decided], t[:decided], mask[:decided]
        wavs: list[tuple[np.ndarray, float]] = []
        i = 0
        while i < len(x):
            # The next voiced stretch of this window.
            voiced = np.flatnonzero(mask[i:])
            if len(voiced) == 0:
                break
            a = i + int(voiced[0])
            unvoiced = np.flatnonzero(~mask[a:])
            b = a + int(unvoiced[0]) if len(unvoiced) else len(x)
            if self._run_end is not None and t[a] - self._run_end > MAX_GAP_S:
                wavs += self._close_run()
            if self._run_start is None:
                self._run_start = float(t[a])
            self._run.append(x[a:b])
            self._run_end = float(t[a]) + (b - a) / SAMPLE_RATE
            wavs += self._complete_partials()
            i = b
        if self._run_end is not None and float(t[-1] if len(t) else ts) - self._run_end > MAX_GAP_S:
            wavs += self._close_run()
        return self._embed(encoder, wavs)

    def flush(self, encoder: SpeakerEncoder) -> list[Partial]:
        """Ends the current voiced run (the end of the stream): embeds its tail when it is long enough."""
        return self._embed(encoder, self._close_run())

    def _embed(self, encoder: SpeakerEncoder, wavs: list[tuple[np.ndarray, float]]) -> list[Partial]:
        if not wavs:
            return []
        embs = encoder.embed_partials([normalize_volume(w) for w, _ in wavs])
        return [self.assign(e, s, s + PARTIAL_SAMPLES / SAMPLE_RATE) for e, (_, s) in zip(embs, wavs, strict=True)]

    def _complete_partials(self) -> list[tuple[np.ndarray, float]]:
        """Every full 1.6 s partial of the current run, one per HOP_S; the run keeps what the next one needs."""
        run = np.concatenate(self._run) if len(self._run) > 1 else self._run[0]
        assert self._run_start is not None
        out = []
        hop = round(HOP_S * SAMPLE_RATE)
        s = 0
        while s + PARTIAL_SAMPLES <= len(run):
            out.append((run[s : s + PARTIAL_SAMPLES], self._run_start + s / SAMPLE_RATE))
            s += hop
        self._run = [run[s:]]
        self._run_start += s / SAMPLE_RATE
        return out

    def _close_run(self) -> list[tuple[np.ndarray, float]]:
        """The end of a voiced run: what no partial started on yet, zero-padded, when it lasts MIN_RUN_S."""
        run = np.concatenate(self._run) if self._run else np.zeros(0, np.float32)
        start = self._run_start
        self._run, self._run_start, self._run_end = [], None, None
        if start is None or len(run) < MIN_RUN_S * SAMPLE_RATE:
            return []
        return [(run, start)]


# ---- the stage --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Speakers:
    """The "speakers" signal of one audio window: the partials embedded on it and the speakers heard in the last
    WINDOW_S (clusters), and their mean similarity to the enrolled voice over that window."""

    partials: list[Partial]
    speakers: int  # distinct clusters heard in the last WINDOW_S
    clusters: int  # clusters of the whole session so far
    enrolled_similarity: float | None  # None: no voice enrolled, or no partial in the window

    def to_dict(self) -> dict[str, Any]:
        return {
            "speakers": self.speakers,
            "clusters": self.clusters,
            "partials": [
                {
                    "start": round(p.start, 3),
                    "end": round(p.end, 3),
                    "speaker": p.speaker,
                    "similarity": round(p.similarity, 3),
                }
                for p in self.partials
            ],
            "enrolled_similarity": None if self.enrolled_similarity is None else round(self.enrolled_similarity, 3),
        }


class SpeakerSettings(StageSettings):
    speaker_embedding: bool = service_setting("speaker_embedding")
    speaker_threshold: float = service_setting("speaker_threshold")  # its default is CLUSTER_THRESHOLD
    voice_enroll_s: float = service_setting("voice_enroll_s")


def partials_in(seconds: float) -> int:
    """Partials a voiced run of `seconds` yields (one per HOP_S after the first PARTIAL_SAMPLES); 0 for 0 s."""
    if seconds <= 0:
        return 0
    return 1 + max(0, math.ceil((seconds - PARTIAL_SAMPLES / SAMPLE_RATE) / HOP_S))


class SpeakerStage(StatefulStage[SpeakerTracker]):
    """Speaker embeddings on voiced audio windows; writes "speakers" (a `Speakers`).

    Per-session state (`SpeakerTracker`: audio of the current voiced run, the clusters, the enrolled voice) is
    never kept here: the stage object is shared by every session. `new_state()` / `step()` follow the stateful
    stage interface (a session's ModelClock owns one state per stateful stage and passes it to `step`); `run`
    alone treats the window as a stream of its own."""

    name = "speaker"
    writes = "speakers"
    reads = ("speech",)
    media = "audio"
    settings_model = SpeakerSettings

    def __init__(self, settings: SpeakerSettings) -> None:
        super().__init__(settings)
        self.encoder = SpeakerEncoder()
        self.model, self.verified = self.encoder.name, self.encoder.verified
        self.threshold = settings.speaker_threshold
        self.auto_enroll = partials_in(settings.voice_enroll_s)

    @classmethod
    def enabled(cls, settings: SpeakerSettings) -> bool:
        return settings.speaker_embedding

    def due(self) -> Due:
        return Due(if_speech=True)

    def new_state(self) -> SpeakerTracker:
        return SpeakerTracker(threshold=self.threshold, auto_enroll_partials=self.auto_enroll)

    def step(self, media: np.ndarray, signals: Signals, state: SpeakerTracker) -> Speakers:
        speech: VoicedFrames | None = signals.values.get("speech")
        new = state.feed(self.encoder, media, signals.ts, speech)
        return _summary(new, state, signals.ts + len(media) / SAMPLE_RATE)

    def run(self, media: np.ndarray, signals: Signals) -> Speakers:
        """Without a session: the window is a whole stream (its last voiced run is embedded too, which
        StatefulStage.run would leave in the state)."""
        state = self.new_state()
        new = self.step(media, signals, state).partials + state.flush(self.encoder)
        return _summary(new, state, signals.ts + len(media) / SAMPLE_RATE)


def _summary(new: list[Partial], state: SpeakerTracker, end: float) -> Speakers:
    return Speakers(new, len(state.speakers_in(end)), len(state.clusters), state.enrolled_similarity_in(end))
