"""Interfaces every detector backend implements.

A backend is constructed once (loading its model), then called from inference
worker threads. Backends must be safe to call from several threads at once
(keep per-thread interpreters) and must never touch the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


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
