"""What the stages saw in one analysed frame or audio window: the input of presence fusion and the rule engine.

Each stage writes one signal, by name (`values`). The built-in signals have typed accessors below; a new stage's
signal needs no field here: rules read it as `Observation.values[name]`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from livekit_proctor.analyzer.detectors.base import BodyPose, Detection, Face, FaceMesh


class Signals:
    """Signals of one unit of media (a frame or an audio window), written by the stages that were due on it."""

    __slots__ = ("fresh", "latency_ms", "model", "seq", "ts", "values")

    def __init__(self, seq: int, ts: float) -> None:
        self.seq = seq
        self.ts = ts  # capture time (Unix seconds, or offset for a recording)
        # signal name -> value written on this unit (the stage ran, or reused a result still valid for it)
        self.values: dict[str, Any] = {}
        # signal name -> capture time of the unit the stage's latest result came from; also set on units where
        # the stage was not due, so fusion knows the stage exists and how old its last result is
        self.fresh: dict[str, float] = {}
        self.model = ""  # models that ran, for ai_model_source
        self.latency_ms: dict[str, float] = {}  # model -> inference time on this unit

    def put(self, name: str, value: Any, at: float | None = None) -> None:
        self.values[name] = value
        self.fresh[name] = self.ts if at is None else at


class FrameSignals(Signals):
    __slots__ = ("height", "preview", "width")

    def __init__(
        self,
        seq: int,
        ts: float,
        width: int,
        height: int,
        faces: list[Face] | None = None,
        mesh: FaceMesh | None = None,
        objects: list[Detection] | None = None,
        objects_ts: float | None = None,
        pose: BodyPose | None = None,
        pose_ran: bool = False,
        person_fraction: float | None = None,
        model: str = "",
        preview: np.ndarray | None = None,
    ) -> None:
        """The keyword arguments set built-in signals directly (tests, offline tools); stages use put()."""
        super().__init__(seq, ts)
        self.width = width
        self.height = height
        self.model = model
        # Downscaled RGB copy kept for evidence thumbnails (small: <= 160 px wide).
        self.preview = preview
        self.put("faces", list(faces or []))
        if mesh is not None:
            self.put("mesh", mesh)
        if objects is not None:
            self.put("objects", objects)
        if objects_ts is not None:
            self.fresh["objects"] = objects_ts
        if pose_ran or pose is not None:
            self.put("pose", pose)
        if person_fraction is not None:
            self.put("person_fraction", person_fraction)

    # ---- typed access to the built-in signals

    @property
    def faces(self) -> list[Face]:
        faces: list[Face] = self.values.get("faces", [])
        return faces

    @property
    def mesh(self) -> FaceMesh | None:
        """Landmarks / head pose / gaze of the primary (largest) face, when a mesh model ran and found it."""
        return self.values.get("mesh")

    @property
    def objects(self) -> list[Detection] | None:
        """COCO detections; None when the detector did not run on this frame (sampled or motion-gated)."""
        return self.values.get("objects")

    @property
    def objects_ts(self) -> float | None:
        """Capture time of the frame the latest detections came from."""
        return self.fresh.get("objects")

    @property
    def pose(self) -> BodyPose | None:
        return self.values.get("pose")

    @property
    def pose_ran(self) -> bool:
        """False when no pose model ran on this frame."""
        return "pose" in self.values

    @property
    def person_fraction(self) -> float | None:
        """Share of the frame segmented as a person; only computed when no face was found (None otherwise)."""
        return self.values.get("person_fraction")

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


class AudioSignals(Signals):
    """Signals of one audio window (mono PCM, `sample_rate` Hz)."""

    __slots__ = ("duration_s", "sample_rate")

    def __init__(self, seq: int, ts: float, sample_rate: int, duration_s: float) -> None:
        super().__init__(seq, ts)
        self.sample_rate = sample_rate
        self.duration_s = duration_s
