"""What the models saw in one analysed frame: the input of presence fusion and the rule engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from livekit_proctor.analyzer.detectors.base import BodyPose, Detection, Face, FaceMesh


@dataclass(slots=True)
class FrameSignals:
    seq: int
    ts: float  # capture time (Unix seconds, or offset for a recording)
    width: int
    height: int
    faces: list[Face] = field(default_factory=list)
    # Landmarks / head pose / gaze of the primary (largest) face, when a mesh model ran and found it.
    mesh: FaceMesh | None = None
    # COCO detections; None when the detector did not run on this frame (sampled or motion-gated).
    objects: list[Detection] | None = None
    objects_ts: float | None = None  # capture time of the frame the latest detections came from
    # Body pose; pose_ran is False when no pose model ran on this frame.
    pose: BodyPose | None = None
    pose_ran: bool = False
    # Share of the frame segmented as a person; only computed when no face was found (None otherwise).
    person_fraction: float | None = None
    model: str = ""  # models that ran, for ai_model_source
    latency_ms: dict[str, float] = field(default_factory=dict)
    # Downscaled RGB copy kept for evidence thumbnails (small: <= 160 px wide).
    preview: np.ndarray | None = field(default=None, repr=False)

    @property
    def face_count(self) -> int:
        return len(self.faces)

    @property
    def primary_face(self) -> Face | None:
        return max(self.faces, key=lambda f: f.box.w * f.box.h) if self.faces else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ts": self.ts,
            "width": self.width,
            "height": self.height,
            "face_count": self.face_count,
            "faces": [f.to_dict() for f in self.faces],
            "mesh": self.mesh.to_dict() if self.mesh else None,
            "objects": [o.to_dict() for o in self.objects] if self.objects is not None else None,
            "pose": self.pose.to_dict() if self.pose else None,
        }
