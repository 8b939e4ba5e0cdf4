"""Inference pipeline: decode, sample, run the stages (analyzer/stages.py) in worker threads.

The event loop only moves bytes. Everything CPU-bound (JPEG decode, models)
runs in InferencePool's threads; the model runtimes and OpenCV release the GIL,
so N threads use N cores. Each session contributes at most one frame in
flight and one waiting (latest-wins), so the work queue is bounded by the
number of sessions whatever the clients send.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import cv2
import numpy as np

from livekit_proctor import observability
from livekit_proctor.analyzer.metrics import Metrics
from livekit_proctor.analyzer.signals import AudioSignals, FrameSignals, Signals
from livekit_proctor.analyzer.stages import Media, Stage, StatefulStage, check_order, registered_stages

log = logging.getLogger(__name__)
T = TypeVar("T")


class FrameDecodeError(ValueError):
    pass


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> RGB uint8 array; FrameDecodeError when it is not a decodable image."""
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        raise FrameDecodeError("payload is not a JPEG (missing SOI marker)")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None or bgr.size == 0:
        raise FrameDecodeError("JPEG could not be decoded (truncated or corrupt)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@dataclass(slots=True)
class _LastRun:
    ts: float  # capture time of the unit the stage last ran on
    value: Any
    gray: np.ndarray | None  # motion-gated stages: the grey thumbnail of that frame


class ModelClock:
    """Per-session scheduling state of the stages (when each last ran, and its result for reuse).

    Only the session's single in-flight job per media touches it, so it needs no lock: a video and an audio job of
    the same session may run at once, but they touch different stages' entries.
    """

    def __init__(self) -> None:
        self.last: dict[str, _LastRun] = {}
        self.gated = 0  # runs skipped because nothing moved
        # Per-session switches set by the session (e.g. face verification follows its policy): stages this
        # session does not run, and Due.interval_s overrides.
        self.off: set[str] = set()
        self.intervals: dict[str, float] = {}
        # Stateful stages' stream state (StatefulStage.new_state()), by stage name: created at the stage's first
        # run in this session, continued by every later one.
        self.states: dict[str, Any] = {}

    def state(self, stage: StatefulStage[Any]) -> Any:
        if stage.name not in self.states:
            self.states[stage.name] = stage.new_state()
        return self.states[stage.name]


Decision = Literal["run", "reuse", "wait", "skip"]


def _thumb(rgb: np.ndarray) -> np.ndarray:
    return cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (64, 48), interpolation=cv2.INTER_AREA)


class ModelSet:
    """The stages a session pipeline runs (analyzer/stages.py), loaded once per process and shared by all
    sessions. Each analysed frame (or audio window) goes through the registered stages in order."""

    def __init__(self, stages: list[Stage], off: tuple[str, ...] = ()) -> None:
        self.stages = stages
        self.off = off  # registered stages switched off by settings or failed to load
        self.video = [s for s in stages if s.media == "video"]
        self.audio = [s for s in stages if s.media == "audio"]

    @classmethod
    def load(cls, media: Media | None = None, **settings: Any) -> ModelSet:
        """Loads every registered stage (only those of `media` when given: `proctor audio` needs no video model);
        `settings` override its settings fields by name (else PROCTOR_* env)."""
        stages: list[Stage] = []
        off: list[str] = []
        registered = registered_stages()
        check_order(registered)
        for stage_cls in registered:
            if media is not None and stage_cls.media != media:
                continue
            fields = stage_cls.settings_model.model_fields
            s = stage_cls.settings_model(**{k: v for k, v in settings.items() if k in fields})
            if not stage_cls.enabled(s):
                off.append(stage_cls.name)
                continue
            try:
                stages.append(stage_cls(s))
            except Exception as e:
                if stage_cls.required:
                    raise
                # A missing optional model disables its signals instead of failing the service.
                log.warning("stage %s unavailable, its signals are off: %s", stage_cls.name, e)
                off.append(stage_cls.name)
        return cls(stages, tuple(off))

    @classmethod
    def from_settings(cls, s: Any, media: Media | None = None) -> ModelSet:
        """The stages with the service settings' values for the fields they declare (Settings wins over env)."""
        names = {k for c in registered_stages() for k in c.settings_model.model_fields}
        return cls.load(media, **{k: getattr(s, k) for k in names if hasattr(s, k)})

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    @property
    def source(self) -> str:
        """ai_model_source of an alert no model raised (session-state rules): the first stage's model."""
        return self.stages[0].model if self.stages else "none"

    def describe(self) -> dict[str, Any]:
        loaded = {s.name: s.model for s in self.stages}
        d: dict[str, Any] = {
            c.name: loaded.get(c.name) for c in registered_stages() if c.name in loaded or c.name in self.off
        }
        d.update(loaded)  # stages passed in that are not registered
        d["models_verified"] = all(s.verified for s in self.stages)
        return d

    def _decide(self, stage: Stage, sig: Signals, rgb: np.ndarray | None, clock: ModelClock | None,
                thumb: Callable[[], np.ndarray]) -> Decision:  # fmt: skip
        due = stage.due()
        if clock is not None and stage.name in clock.off:
            return "skip"
        if any(r not in sig.values for r in stage.reads):
            return "skip"  # what it reads was not produced on this unit (its stage is off or was not due)
        if due.if_face is not None and bool(sig.values.get("faces")) != due.if_face:
            return "skip"
        if due.if_speech is not None and bool(sig.values.get("speech")) != due.if_speech:
            return "skip"
        last = clock.last.get(stage.name) if clock is not None else None
        if last is None or sig.ts < last.ts:
            return "run"
        age = sig.ts - last.ts
        interval = clock.intervals.get(stage.name, due.interval_s) if clock is not None else due.interval_s
        if age < interval * 0.95:
            return "wait"
        if due.motion_threshold is None or rgb is None:
            return "run"
        if age >= due.max_gated_s or last.gray is None:
            return "run"
        if float(np.mean(cv2.absdiff(thumb(), last.gray))) >= due.motion_threshold:
            return "run"
        assert clock is not None
        clock.gated += 1
        return "reuse"

    def _run_stages(self, stages: list[Stage], media: np.ndarray, sig: Signals, clock: ModelClock | None,
                    rgb: np.ndarray | None) -> None:  # fmt: skip
        ran: list[str] = []
        gray: list[np.ndarray] = []

        def thumb() -> np.ndarray:  # computed once per frame, only when a motion-gated stage is due
            if not gray:
                assert rgb is not None
                gray.append(_thumb(rgb))
            return gray[0]

        for stage in stages:
            decision = self._decide(stage, sig, rgb, clock, thumb)
            last = clock.last.get(stage.name) if clock is not None else None
            if decision == "run":
                with observability.model_span(stage.model):
                    t0 = time.perf_counter()
                    if isinstance(stage, StatefulStage) and clock is not None:
                        value = stage.step(media, sig, clock.state(stage))
                    else:
                        value = stage.run(media, sig)
                    sig.latency_ms[stage.model] = (time.perf_counter() - t0) * 1000
                sig.put(stage.writes, value)
                ran.append(stage.model)
                if clock is not None:
                    gated = rgb is not None and stage.due().motion_threshold is not None
                    clock.last[stage.name] = _LastRun(sig.ts, value, thumb() if gated else None)
            elif decision == "reuse" and last is not None:
                sig.put(stage.writes, last.value)  # nothing moved since the last run: it still describes this frame
            elif decision == "wait" and last is not None:
                sig.fresh[stage.writes] = last.ts
        sig.model = "+".join(ran)

    def analyze_rgb(self, rgb: np.ndarray, seq: int, ts: float, clock: ModelClock | None = None) -> FrameSignals:
        """Runs every video stage that is due on this frame. Without a clock (single images) all due stages run."""
        h, w = rgb.shape[:2]
        sig = FrameSignals(seq=seq, ts=ts, width=w, height=h)
        self._run_stages(self.video, rgb, sig, clock, rgb)
        scale = 160 / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        sig.preview = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        return sig

    def analyze_jpeg(self, jpeg: bytes, seq: int, ts: float, clock: ModelClock | None = None) -> FrameSignals:
        with observability.span("decode jpeg"):
            t0 = time.perf_counter()
            rgb = decode_jpeg(jpeg)
            decode_ms = (time.perf_counter() - t0) * 1000
        sig = self.analyze_rgb(rgb, seq, ts, clock)
        sig.latency_ms["jpeg_decode"] = decode_ms
        return sig

    def analyze_audio(
        self, pcm: np.ndarray, seq: int, ts: float, sample_rate: int = 16000, clock: ModelClock | None = None
    ) -> AudioSignals:
        """Runs every audio stage that is due on this window (int16 mono PCM starting at capture time ts)."""
        sig = AudioSignals(seq=seq, ts=ts, sample_rate=sample_rate, duration_s=len(pcm) / sample_rate)
        self._run_stages(self.audio, pcm, sig, clock, None)
        return sig


class InferencePool:
    """Worker threads shared by all sessions of this process."""

    def __init__(self, workers: int, metrics: Metrics | None = None) -> None:
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inference")
        self._metrics = metrics
        self.inflight = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        self.inflight += 1
        if self._metrics:
            self._metrics.queue_depth.labels("inference").set(self.inflight)
        try:
            # The caller's context goes along (run_in_executor does not carry it): its trace span and
            # log fields (session_id) hold in the worker thread too.
            ctx = contextvars.copy_context()
            return await asyncio.get_running_loop().run_in_executor(self._pool, ctx.run, fn, *args)
        finally:
            self.inflight -= 1
            if self._metrics:
                self._metrics.queue_depth.labels("inference").set(self.inflight)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Sampler:
    """Picks frames at the session's analysis rate, by capture time, on a fixed grid.

    A grid (next += interval) rather than "interval since the last pick" keeps the
    rate exact: 24 fps sampled at 5 fps gives 5 frames a second, not 4.8.
    """

    def __init__(self, fps: float) -> None:
        self.interval = 1.0 / fps
        self._next: float | None = None

    def due(self, ts: float) -> bool:
        nxt = self._next
        if nxt is None or ts - nxt > self.interval or ts < nxt - self.interval - 1.0:
            self._next = ts + self.interval  # first frame, a gap in the stream, or the clock stepped back
            return True
        if ts >= nxt - 1e-3:
            self._next = nxt + self.interval
            return True
        return False
