"""Inference pipeline: decode, sample, run the models in worker threads.

The event loop only moves bytes. Everything CPU-bound (JPEG decode, models)
runs in InferencePool's threads; the model runtimes and OpenCV release the GIL,
so N threads use N cores. Each session contributes at most one frame in
flight and one waiting (latest-wins), so the work queue is bounded by the
number of sessions whatever the clients send.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import cv2
import numpy as np

from analyzer.detectors.base import FaceDetector
from analyzer.metrics import Metrics
from analyzer.signals import FrameSignals

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


class ModelSet:
    """The models a session pipeline runs, loaded once per process."""

    def __init__(self, face: FaceDetector) -> None:
        self.face = face

    @classmethod
    def load(cls, variant: str = "full", score_threshold: float = 0.4) -> ModelSet:
        from analyzer.detectors.blazeface import BlazeFaceDetector

        return cls(face=BlazeFaceDetector(variant=variant, score_threshold=score_threshold))

    def describe(self) -> dict[str, Any]:
        return {"face": self.face.name, "models_verified": bool(getattr(self.face, "verified", False))}

    def analyze_rgb(self, rgb: np.ndarray, seq: int, ts: float) -> FrameSignals:
        t0 = time.perf_counter()
        faces = self.face.detect(rgb)
        face_ms = (time.perf_counter() - t0) * 1000
        h, w = rgb.shape[:2]
        return FrameSignals(
            seq=seq, ts=ts, width=w, height=h, faces=faces, model=self.face.name, latency_ms={self.face.name: face_ms}
        )

    def analyze_jpeg(self, jpeg: bytes, seq: int, ts: float) -> FrameSignals:
        t0 = time.perf_counter()
        rgb = decode_jpeg(jpeg)
        decode_ms = (time.perf_counter() - t0) * 1000
        sig = self.analyze_rgb(rgb, seq, ts)
        sig.latency_ms["jpeg_decode"] = decode_ms
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
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
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
