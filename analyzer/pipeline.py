"""Inference pipeline: decode, sample, run the models in worker threads.

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
from typing import Any, TypeVar

import cv2
import numpy as np

from livekit_proctor import observability
from livekit_proctor.analyzer.detectors.base import (
    BodyPose,
    Detection,
    FaceDetector,
    FaceMeshEstimator,
    ObjectDetector,
    PoseEstimator,
)
from livekit_proctor.analyzer.metrics import Metrics
from livekit_proctor.analyzer.signals import FrameSignals

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


@dataclass
class ModelRates:
    """How often the slower models run, per session (face detection runs on every analysed frame)."""

    objects_interval_s: float = 1.0
    pose_interval_s: float = 0.5
    # Object detection is skipped while the scene is still: mean absolute difference of a 64x48 grey
    # thumbnail against the last detected frame, in grey levels (0-255) ...
    motion_threshold: float = 3.0
    # ... but runs at least this often even when nothing moves.
    max_gated_s: float = 5.0


class ModelClock:
    """Per-session scheduling state of the slower models.

    Only the session's single in-flight job touches it, so it needs no lock.
    """

    def __init__(self) -> None:
        self.objects_ts: float | None = None
        self.objects: list[Detection] = []
        self.objects_gray: np.ndarray | None = None
        self.pose_ts: float | None = None
        self.pose: BodyPose | None = None
        self.gated = 0  # object detections skipped because nothing moved

    def objects_due(self, ts: float, gray: np.ndarray, rates: ModelRates) -> str:
        """ "run" the detector, "reuse" its last result (due, but the scene has not changed), or "wait"."""
        if self.objects_ts is None or ts < self.objects_ts:
            return "run"
        age = ts - self.objects_ts
        if age < rates.objects_interval_s * 0.95:
            return "wait"
        if age >= rates.max_gated_s or self.objects_gray is None:
            return "run"
        if float(np.mean(cv2.absdiff(gray, self.objects_gray))) >= rates.motion_threshold:
            return "run"
        self.gated += 1
        return "reuse"

    def pose_due(self, ts: float, rates: ModelRates) -> bool:
        return self.pose_ts is None or ts < self.pose_ts or ts - self.pose_ts >= rates.pose_interval_s * 0.95


class ModelSet:
    """The models a session pipeline runs, loaded once per process and shared by all sessions."""

    def __init__(
        self,
        face: FaceDetector,
        mesh: FaceMeshEstimator | None = None,
        objects: ObjectDetector | None = None,
        pose: PoseEstimator | None = None,
        rates: ModelRates | None = None,
        segmenter: Any = None,
    ) -> None:
        self.face = face
        self.mesh = mesh
        self.objects = objects
        self.pose = pose
        self.segmenter = segmenter
        self.rates = rates or ModelRates()

    @classmethod
    def load(
        cls,
        variant: str = "full",
        score_threshold: float = 0.4,
        mesh: bool = True,
        objects: str = "nanodet",
        pose: bool = True,
        rates: ModelRates | None = None,
        segmentation: bool = True,
    ) -> ModelSet:
        from livekit_proctor.analyzer.detectors.blazeface import BlazeFaceDetector

        face = BlazeFaceDetector(variant=variant, score_threshold=score_threshold)
        mesh_b = _optional("face mesh", _load_mesh) if mesh else None
        obj_b = _optional("object detector", lambda: _load_objects(objects)) if objects != "none" else None
        pose_b = _optional("body pose", _load_pose) if pose else None
        seg_b = _optional("person segmentation", _load_segmenter) if segmentation else None
        return cls(face=face, mesh=mesh_b, objects=obj_b, pose=pose_b, rates=rates, segmenter=seg_b)

    @classmethod
    def from_settings(cls, s: Any) -> ModelSet:
        rates = ModelRates(
            objects_interval_s=1.0 / s.objects_fps,
            pose_interval_s=1.0 / s.pose_fps,
            motion_threshold=s.motion_threshold,
        )
        return cls.load(
            s.face_model, s.face_score_threshold, s.face_mesh, s.objects_model, s.body_pose, rates, s.segmentation
        )

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"face": self.face.name}
        backends = (
            ("face_mesh", self.mesh),
            ("objects", self.objects),
            ("pose", self.pose),
            ("segmentation", self.segmenter),
        )
        for key, backend in backends:
            d[key] = backend.name if backend is not None else None
        d["models_verified"] = all(
            bool(getattr(b, "verified", False))
            for b in (self.face, self.mesh, self.objects, self.pose, self.segmenter)
            if b is not None
        )
        return d

    def analyze_rgb(self, rgb: np.ndarray, seq: int, ts: float, clock: ModelClock | None = None) -> FrameSignals:
        """Runs every model that is due on this frame. Without a clock (single images) all models run."""
        lat: dict[str, float] = {}
        ran = [self.face.name]

        def timed(name: str, fn: Callable[[], T]) -> T:
            with observability.model_span(name):
                t0 = time.perf_counter()
                out = fn()
                lat[name] = (time.perf_counter() - t0) * 1000
            return out

        faces = timed(self.face.name, lambda: self.face.detect(rgb))
        h, w = rgb.shape[:2]
        sig = FrameSignals(seq=seq, ts=ts, width=w, height=h, faces=faces, latency_ms=lat)
        primary = sig.primary_face
        if self.mesh is not None and primary is not None:
            mesh = self.mesh
            sig.mesh = timed(mesh.name, lambda: mesh.estimate(rgb, primary))
            ran.append(mesh.name)
        if self.objects is not None:
            det = self.objects
            gray = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (64, 48), interpolation=cv2.INTER_AREA)
            due = "run" if clock is None else clock.objects_due(ts, gray, self.rates)
            if due == "run":
                sig.objects = timed(det.name, lambda: det.detect(rgb))
                sig.objects_ts = ts
                ran.append(det.name)
                if clock is not None:
                    clock.objects_ts, clock.objects, clock.objects_gray = ts, sig.objects, gray
            elif due == "reuse" and clock is not None:
                # Nothing moved since the last detection: it still describes this frame.
                sig.objects, sig.objects_ts = clock.objects, ts
            elif clock is not None:
                sig.objects_ts = clock.objects_ts
        if self.pose is not None:
            pe = self.pose
            if clock is None or clock.pose_due(ts, self.rates):
                sig.pose = timed(pe.name, lambda: pe.estimate(rgb))
                sig.pose_ran = True
                ran.append(pe.name)
                if clock is not None:
                    clock.pose_ts, clock.pose = ts, sig.pose
        if self.segmenter is not None and not faces:
            seg = self.segmenter
            # Only without a face: then it tells "someone is there, face hidden" from "nobody".
            sig.person_fraction = timed(seg.name, lambda: seg.person_fraction(rgb))
            ran.append(seg.name)
        sig.model = "+".join(ran)
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


def _optional(what: str, load: Callable[[], T]) -> T | None:
    """Loads an optional backend; a missing one disables its signals instead of failing the service."""
    try:
        return load()
    except Exception as e:
        log.warning("%s unavailable, its signals are off: %s", what, e)
        return None


def _load_mesh() -> FaceMeshEstimator:
    from livekit_proctor.analyzer.detectors.facemesh import MediapipeFaceMesh

    return MediapipeFaceMesh()


def _load_objects(spec: str) -> ObjectDetector:
    from livekit_proctor.analyzer.detectors.objects import load_object_detector

    return load_object_detector(spec)


def _load_segmenter() -> Any:
    from livekit_proctor.analyzer.detectors.segmentation import SelfieSegmenter

    return SelfieSegmenter()


def _load_pose() -> PoseEstimator:
    from livekit_proctor.analyzer.detectors.pose import MediapipePose

    return MediapipePose()


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
