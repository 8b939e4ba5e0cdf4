"""Presence fusion and calibration: per-frame signals -> one Observation the rules can trust.

A face detector alone says "no face" for a head turned down to write or a hand over the face.
Fusing face detection, face mesh, a person detector and body pose separates three situations:
the candidate is absent, present with the face not visible, or joined by another person.
Head pose and gaze are made relative to the candidate's own baseline from the calibration period.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from livekit_proctor.analyzer.detectors.base import Detection, Gaze, HeadPose
from livekit_proctor.analyzer.signals import FrameSignals
from livekit_proctor.contracts.api import EffectivePolicy

PHONE_LABELS = frozenset({"cell phone"})
OBJECT_LABELS = frozenset({"person", "cell phone", "book", "laptop"})
# A person box this small is background (a poster, a passer-by far away), not someone at the desk.
MIN_PERSON_AREA = 0.02


@dataclass(slots=True)
class Observation:
    seq: int
    ts: float
    face_count: int
    persons_detected: int | None  # person boxes from the detector (held between its runs); None: no detector
    persons_present: int  # fused count of people in view
    candidate_present: bool
    face_visible: bool
    face_area: float | None  # primary face box / frame area
    face_area_ratio: float | None  # vs the calibrated baseline
    head: HeadPose | None  # relative to baseline
    gaze: Gaze | None  # relative to baseline (None without a mesh)
    gaze_off: bool | None  # None: unknown (no mesh, or a blink)
    head_speed: float | None  # degrees per second since the previous frame with a head pose
    phone_score: float | None  # best "cell phone" score; None: no detector
    objects: list[Detection]
    shoulders_visible: bool | None  # None: no pose model
    hand_near_ear: bool | None
    hand_ear_ratio: float | None
    calibrating: bool
    model: str
    face_scores: list[float] = field(default_factory=list)
    # The latest value of every signal (analyzer/stages.py): this frame's, or the last one a stage wrote when it
    # was not due on this frame. Rules of stages that fusion does not know read their signal here.
    values: dict[str, Any] = field(default_factory=dict, repr=False)
    # The signals computed on this very frame (a rule that must count each model run once reads this).
    ran: frozenset[str] = field(default_factory=frozenset, repr=False)
    # Downscaled copy of the frame, for the evidence thumbnail of an alert (<= 160 px wide).
    preview: np.ndarray | None = field(default=None, repr=False)
    frame_size: tuple[int, int] | None = None  # (width, height) of the analysed frame: the pixels of faces / mesh

    def evidence(self) -> dict[str, Any]:
        """Measured values for alert evidence."""
        out: dict[str, Any] = {
            "face_count": self.face_count,
            "persons_present": self.persons_present,
            "frame_seq": self.seq,
        }
        if self.persons_detected is not None:
            out["persons_detected"] = self.persons_detected
        if self.face_area_ratio is not None:
            out["face_area_ratio"] = round(self.face_area_ratio, 3)
        if self.head is not None:
            out["head_pose"] = self.head.to_dict()
        if self.gaze is not None:
            out["gaze"] = self.gaze.to_dict()
        if self.head_speed is not None:
            out["head_speed_deg_s"] = round(self.head_speed, 1)
        if self.phone_score is not None:
            out["phone_score"] = round(self.phone_score, 3)
        if self.objects:
            out["objects"] = [o.to_dict() for o in self.objects if o.label in OBJECT_LABELS][:8]
        if self.shoulders_visible is not None:
            out["shoulders_visible"] = self.shoulders_visible
        if self.hand_ear_ratio is not None:
            out["hand_ear_ratio"] = round(self.hand_ear_ratio, 3)
        return out


@dataclass
class Baseline:
    yaw: float = 0.0
    pitch: float = 0.0
    gaze_yaw: float = 0.0
    gaze_pitch: float = 0.0
    face_area: float | None = None
    frames: int = 0
    calibrated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "calibrated": self.calibrated,
            "frames": self.frames,
            "head_yaw": round(self.yaw, 1),
            "head_pitch": round(self.pitch, 1),
            "gaze_yaw": round(self.gaze_yaw, 1),
            "gaze_pitch": round(self.gaze_pitch, 1),
            "face_area": round(self.face_area, 4) if self.face_area is not None else None,
        }


class Calibration:
    """Collects the first calibration period's head pose, gaze and face size; medians become the baseline.

    Frames count only when exactly one face with a mesh is seen and the eyes are open. With too few
    such frames the period is extended, up to three times its length; then the defaults stay.
    """

    def __init__(self, duration_s: float, min_frames: int) -> None:
        self.duration_s = duration_s
        self.min_frames = min_frames
        self.start: float | None = None
        self.samples: list[tuple[float, float, float, float, float]] = []
        self.baseline = Baseline()
        self.done = duration_s <= 0

    def add(self, s: FrameSignals) -> None:
        if self.done:
            return
        if self.start is None:
            self.start = s.ts
        if s.face_count == 1 and s.mesh is not None and s.mesh.gaze is not None and not s.mesh.gaze.blink:
            f = s.faces[0]
            area = f.box.w * f.box.h / max(1, s.width * s.height)
            hp, g = s.mesh.head_pose, s.mesh.gaze
            self.samples.append((hp.yaw, hp.pitch, g.yaw, g.pitch, area))
        elapsed = s.ts - self.start
        if elapsed >= self.duration_s and (len(self.samples) >= self.min_frames or elapsed >= 3 * self.duration_s):
            self._finish()

    def snapshot(self) -> dict[str, Any]:
        samples = [] if self.done else [list(x) for x in self.samples]  # only needed until the baseline is set
        return {"start": self.start, "samples": samples, "done": self.done, "baseline": asdict(self.baseline)}

    def restore(self, d: dict[str, Any]) -> None:
        self.start = d.get("start")
        self.samples = [(a, b, c, e, f) for a, b, c, e, f in d.get("samples", [])]
        self.done = bool(d.get("done", self.done))
        if d.get("baseline"):
            self.baseline = Baseline(**d["baseline"])

    def _finish(self) -> None:
        self.done = True
        if len(self.samples) < max(5, self.min_frames // 5):
            return  # too little to trust: keep neutral defaults
        cols = list(zip(*self.samples, strict=True))
        med = [statistics.median(c) for c in cols]
        self.baseline = Baseline(med[0], med[1], med[2], med[3], med[4], len(self.samples), True)


class PresenceFusion:
    """Per-session fusion state: turns FrameSignals into Observations."""

    def __init__(self, policy: EffectivePolicy) -> None:
        self.t = policy.thresholds
        self.calibration = Calibration(policy.calibration.duration_s, policy.calibration.min_frames)
        # The detector runs at ~1 fps: its detections stand for the frames in between. Phones flicker
        # between detections, so they are held longer; a person box is held just past one interval so a
        # candidate who left is not kept "present" by a stale box.
        self.hold_s = 2.5
        self.person_hold_s = 1.2
        self._objects: list[Detection] = []
        self._objects_ts: float | None = None
        self._has_detector = False
        self._pose_state: tuple[bool | None, bool | None, float | None] = (None, None, None)
        self._has_pose = False
        self._last_head: tuple[float, HeadPose, float, float, float] | None = None  # ts, pose, cx, cy, face w
        self._values: dict[str, Any] = {}

    @property
    def baseline(self) -> Baseline:
        return self.calibration.baseline

    def observe(self, s: FrameSignals) -> Observation:
        self.calibration.add(s)
        b = self.calibration.baseline
        # Objects: keep the latest detections for hold_s of media time.
        if s.objects is not None:
            self._objects, self._objects_ts, self._has_detector = s.objects, s.ts, True
        elif s.objects_ts is not None:
            self._has_detector = True
        objects = self._objects if self._objects_ts is not None and s.ts - self._objects_ts <= self.hold_s else []
        persons_detected: int | None = None
        person_seen = False
        phone: float | None = None
        if self._has_detector:
            frame_area = max(1, s.width * s.height)
            fresh = self._objects_ts is not None and s.ts - self._objects_ts <= self.person_hold_s
            people = [
                o
                for o in (objects if fresh else [])
                if o.label == "person" and o.box.w * o.box.h / frame_area >= MIN_PERSON_AREA
            ]
            # Counting needs a confident box; presence takes a weaker one (a bowed head, a turned back).
            persons_detected = sum(1 for o in people if o.score >= self.t.person_score)
            person_seen = any(o.score >= self.t.presence_person_score for o in people)
            phone = max((o.score for o in objects if o.label in PHONE_LABELS), default=0.0)
        # Pose: latest result, refreshed when the pose model ran.
        if s.pose_ran:
            self._has_pose = True
            if s.pose is None:
                self._pose_state = (False, False, None)
            else:
                from livekit_proctor.analyzer.detectors.pose import hand_near_ear, shoulders_visible

                near, ratio = hand_near_ear(s.pose, self.t.hand_ear_ratio)
                self._pose_state = (shoulders_visible(s.pose), near, ratio)
        shoulders, near_ear, ear_ratio = self._pose_state if self._has_pose else (None, None, None)

        face_visible = s.face_count > 0
        segmented = s.person_fraction is not None and s.person_fraction >= self.t.presence_segmentation
        body_seen = bool(shoulders) or person_seen or segmented
        candidate_present = face_visible or body_seen
        persons_present = max(s.face_count, persons_detected or 0, 1 if candidate_present else 0)

        pf = s.primary_face
        face_area = pf.box.w * pf.box.h / max(1, s.width * s.height) if pf is not None else None
        area_ratio = face_area / b.face_area if face_area is not None and b.face_area else None

        head = gaze = None
        gaze_off: bool | None = None
        speed: float | None = None
        if s.mesh is not None and pf is not None:
            hp = s.mesh.head_pose
            head = HeadPose(hp.yaw - b.yaw, hp.pitch - b.pitch, hp.roll)
            cx, cy = pf.box.x + pf.box.w / 2, pf.box.y + pf.box.h / 2
            if self._last_head is not None:
                t0, prev, px, py, pw = self._last_head
                dt = s.ts - t0
                # Only between close frames (a gap says nothing about speed), and only for the same face:
                # when the largest face switches to another person the "head" did not move.
                if 0 < dt <= 0.6 and math.hypot(cx - px, cy - py) < pw:
                    speed = math.hypot(hp.yaw - prev.yaw, hp.pitch - prev.pitch) / dt
            self._last_head = (s.ts, hp, cx, cy, pf.box.w)
            g = s.mesh.gaze
            if g is not None:
                gaze = Gaze(g.yaw - b.gaze_yaw, g.pitch - b.gaze_pitch, g.eye_yaw, g.eye_pitch, g.ear, g.blink)
                if not g.blink:
                    gaze_off = (
                        abs(gaze.yaw) > self.t.gaze_yaw_deg
                        or gaze.pitch > self.t.gaze_pitch_up_deg
                        or gaze.pitch < -self.t.gaze_pitch_down_deg
                    )
        else:
            self._last_head = None
            if face_visible is False and candidate_present:
                gaze_off = None  # face hidden: FACE_NOT_VISIBLE covers it, not gaze

        return Observation(
            seq=s.seq,
            ts=s.ts,
            face_count=s.face_count,
            persons_detected=persons_detected,
            persons_present=persons_present,
            candidate_present=candidate_present,
            face_visible=face_visible,
            face_area=face_area,
            face_area_ratio=area_ratio,
            head=head,
            gaze=gaze,
            gaze_off=gaze_off,
            head_speed=speed,
            phone_score=phone,
            objects=objects,
            shoulders_visible=shoulders,
            hand_near_ear=near_ear,
            hand_ear_ratio=ear_ratio,
            calibrating=not self.calibration.done,
            model=s.model,
            face_scores=[f.score for f in s.faces],
            values=self._latest(s),
            ran=frozenset(s.values),
            preview=s.preview,
            frame_size=(s.width, s.height),
        )

    def _latest(self, s: FrameSignals) -> dict[str, Any]:
        self._values.update(s.values)
        return dict(self._values)
