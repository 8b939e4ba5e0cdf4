"""Interfaces every detector backend implements.

A backend is constructed once (loading its model), then called from inference
worker threads. Backends must be safe to call from several threads at once
(keep per-thread interpreters) and must never touch the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


def check_rgb(rgb: object) -> np.ndarray:
    """Every backend's input check: an H x W x 3 uint8 image; returns it C-contiguous."""
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        desc = f"{rgb.shape} {rgb.dtype}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"expected an RGB image H x W x 3 uint8, got {desc}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"empty image {rgb.shape}")
    return np.ascontiguousarray(rgb)


@dataclass(frozen=True, slots=True)
class Box:
    """Axis-aligned box in pixels of the analysed image (x, y = top-left)."""

    x: float
    y: float
    w: float
    h: float

    def to_dict(self) -> dict[str, float]:
        return {"x": round(self.x, 1), "y": round(self.y, 1), "w": round(self.w, 1), "h": round(self.h, 1)}


@dataclass(frozen=True, slots=True)
class Face:
    box: Box
    score: float
    # Named keypoints in pixels (right_eye, left_eye, nose_tip, mouth_center,
    # right_ear_tragion, left_ear_tragion for BlazeFace).
    keypoints: dict[str, tuple[float, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "box": self.box.to_dict(),
            "score": round(self.score, 4),
            "keypoints": {k: [round(v[0], 1), round(v[1], 1)] for k, v in self.keypoints.items()},
        }


class FaceDetector(Protocol):
    """Finds faces in one RGB image (H x W x 3, uint8)."""

    name: str  # reported as ai_model_source, e.g. "mediapipe.blazeface_full_range"

    def detect(self, rgb: np.ndarray) -> list[Face]: ...


# ---- persons and objects ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Detection:
    """One object from a COCO detector (pixels of the analysed image)."""

    label: str  # COCO name: "person", "cell phone", "book", "laptop", ...
    class_id: int  # COCO class index (0-79)
    score: float
    box: Box

    def to_dict(self) -> dict[str, object]:
        return {
            "label": self.label,
            "class_id": self.class_id,
            "score": round(self.score, 4),
            "box": self.box.to_dict(),
        }


class ObjectDetector(Protocol):
    """Finds COCO objects in one RGB image; returns detections above its threshold, best first."""

    name: str

    def detect(self, rgb: np.ndarray) -> list[Detection]: ...


# ---- face mesh, head pose, gaze ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeadPose:
    """Degrees. yaw > 0: face turned toward the image's right; pitch > 0: looking up;
    roll > 0: head tilted clockwise as seen in the image."""

    yaw: float
    pitch: float
    roll: float

    def to_dict(self) -> dict[str, float]:
        return {"yaw": round(self.yaw, 1), "pitch": round(self.pitch, 1), "roll": round(self.roll, 1)}


@dataclass(frozen=True, slots=True)
class Gaze:
    """Where the eyes point, head pose included, in degrees (same signs as HeadPose).

    eye_yaw / eye_pitch: the eyes within the head (iris position in the eye opening).
    ear: eye aspect ratio (mean of both eyes); blink is True when the eyes are closed, and then
    the angles are not meaningful.
    """

    yaw: float
    pitch: float
    eye_yaw: float
    eye_pitch: float
    ear: float
    blink: bool

    def to_dict(self) -> dict[str, object]:
        return {
            "yaw": round(self.yaw, 1),
            "pitch": round(self.pitch, 1),
            "eye_yaw": round(self.eye_yaw, 1),
            "eye_pitch": round(self.eye_pitch, 1),
            "ear": round(self.ear, 3),
            "blink": self.blink,
        }


@dataclass(frozen=True, slots=True)
class FaceMesh:
    """Face landmarks of one face (478 points with iris, pixels; z in the same scale as x)."""

    landmarks: np.ndarray  # shape (478, 3), float32
    score: float  # face presence score of the mesh model (0-1)
    head_pose: HeadPose
    gaze: Gaze | None

    def to_dict(self) -> dict[str, object]:
        return {
            "mesh_score": round(self.score, 3),
            "head_pose": self.head_pose.to_dict(),
            "gaze": self.gaze.to_dict() if self.gaze else None,
        }


class FaceMeshEstimator(Protocol):
    """Landmarks, head pose and gaze for a face already found by a FaceDetector."""

    name: str

    def estimate(self, rgb: np.ndarray, face: Face) -> FaceMesh | None: ...


# ---- body pose ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BodyPose:
    """Body keypoints (pixels) with visibility 0-1, named as in mediapipe pose
    (nose, left_shoulder, right_shoulder, left_wrist, right_ear, ...)."""

    keypoints: dict[str, tuple[float, float, float]]  # name -> (x, y, visibility)
    score: float

    def visible(self, name: str, min_visibility: float = 0.5) -> bool:
        kp = self.keypoints.get(name)
        return kp is not None and kp[2] >= min_visibility

    def to_dict(self) -> dict[str, object]:
        return {
            "score": round(self.score, 3),
            "keypoints": {k: [round(v[0], 1), round(v[1], 1), round(v[2], 2)] for k, v in self.keypoints.items()},
        }


class PoseEstimator(Protocol):
    """The main person's body pose in one RGB image, or None when no body is found."""

    name: str

    def estimate(self, rgb: np.ndarray) -> BodyPose | None: ...
