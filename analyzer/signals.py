"""What the models saw in one analysed frame: the input of the rule engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from analyzer.detectors.base import Face


@dataclass(slots=True)
class FrameSignals:
    seq: int
    ts: float  # capture time (Unix seconds, or offset for a recording)
    width: int
    height: int
    faces: list[Face] = field(default_factory=list)
    model: str = ""
    latency_ms: dict[str, float] = field(default_factory=dict)

    @property
    def face_count(self) -> int:
        return len(self.faces)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ts": self.ts,
            "width": self.width,
            "height": self.height,
            "face_count": self.face_count,
            "faces": [f.to_dict() for f in self.faces],
        }
