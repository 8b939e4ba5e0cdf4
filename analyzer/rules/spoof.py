"""SPOOF_SUSPECTED: a presentation attack (a photo or a screen held up to the camera), suspected by a HEURISTIC.

Off by default. A session asks for it with the feature `presentation_attack` (features_enabled); the rule then
runs the model-free still-face check. The feature `antispoof_model` adds the two CNNs' scores as a second method
(it needs the service's `antispoof` stage too, PROCTOR_ANTISPOOF=true; the stage runs only for sessions that ask,
`stages_off`). `evidence.method` says which check raised the incident, with its figures:

* ``still_face`` (detectors/antispoof.py, StillFaceTracker; one tracker per session, in this rule): the largest
  face's landmarks (its box when no mesh ran) stay within `still_face_max_motion` of the face size, from the
  start of the run, for trigger_after_s (10 s at sensitivity medium) while the scene around the face (the 64 x 48
  grey thumbnail of the frame outside the face box widened by half its size) changes by at least
  `still_face_min_scene_motion` grey levels. A person moves a little all the time; a photo propped in front of a
  live scene does not. A frozen picture (a still frame held by a virtual camera) does not move its scene either:
  this check does not fire on it (nor on someone sitting very still in a still room).
* ``antispoof_model``: the means of the antispoof ``real`` and liveness ``live`` scores (stage every 1 s on the
  largest face) over the last MODEL_WINDOW_S, at least MODEL_MIN_SCORES of them, both below `spoof_model_score`.

Measured (bench/antispoof.py; models/antispoof/README.md and docs/rules.md have the figures): no false alarm on
the shared real videos and OEP frames, two synthetic attacks caught (by still_face; the model method caught
neither), and no real attack data at all. A heuristic, weighed lightly in the risk score and never strong
evidence; the candidate is told nothing.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from livekit_proctor.analyzer.detectors.antispoof import AntiSpoofStage, SpoofScores, StillFace, StillFaceTracker
from livekit_proctor.analyzer.detectors.base import Face, FaceMesh
from livekit_proctor.analyzer.fusion import Observation
from livekit_proctor.analyzer.rules.incident import MAX_EVIDENCE_GAP_S, DurationRule, RuleEvent
from livekit_proctor.contracts.alerts import IncidentState
from livekit_proctor.contracts.api import EffectivePolicy, RulePolicy

if TYPE_CHECKING:
    from livekit_proctor.analyzer.rules.catalog import Limits, RuleSpec
    from livekit_proctor.analyzer.rules.engine import RuleEngine

FEATURE = "presentation_attack"
MODEL_FEATURE = "antispoof_model"
STILL_FACE, ANTISPOOF_MODEL = "still_face", "antispoof_model"
MODEL_WINDOW_S = 5.0  # the model scores averaged (the stage runs once a second)
MODEL_MIN_SCORES = 3
THUMB_SIZE = (64, 48)  # the pipeline's motion thumbnail (pipeline._thumb), here made from the frame's preview
# Catalog thresholds (docs/rules.md), from bench/antispoof.py: real people's landmarks stay within 0.5% of the face
# size for at most 1.7 s at 5 fps, a frozen photo's (camera noise) drift at most 0.3%; on the OEP faces the
# lowest antispoof `real` was 0.33, the lowest liveness `live` 0.10.
THRESHOLDS = {"still_face_max_motion": 0.005, "still_face_min_scene_motion": 6.0, "spoof_model_score": 0.3}


def model_wanted(policy: EffectivePolicy) -> bool:
    """Whether this session asks for the model method (its rule on, and the feature `antispoof_model`)."""
    rule = policy.rules.get("SPOOF_SUSPECTED")
    return rule is not None and rule.enabled and policy.features.get(MODEL_FEATURE, False)


def stages_off(policy: EffectivePolicy) -> set[str]:
    """Stages this session does not run (ModelClock.off): the anti-spoofing CNNs unless it asks for them."""
    return set() if model_wanted(policy) else {AntiSpoofStage.name}


def _thumb(preview: np.ndarray) -> np.ndarray:
    return cv2.resize(cv2.cvtColor(preview, cv2.COLOR_RGB2GRAY), THUMB_SIZE, interpolation=cv2.INTER_AREA)


class SpoofRule(DurationRule):
    """The session's presentation-attack checks (module docstring). The still-face timing is the tracker's: its
    still_s is the policy's trigger_after_s, and the incident starts on the first frame a method holds."""

    def __init__(self, spec: RuleSpec, policy: RulePolicy, limits: Limits, use_model: bool) -> None:
        self.tracker = StillFaceTracker(
            still_s=policy.trigger_after_s,
            max_face_motion=limits.still_face_max_motion,
            min_scene_motion=limits.still_face_min_scene_motion,
        )
        self.use_model = use_model
        self.model_threshold = limits.spoof_model_score
        self.scores: deque[tuple[float, float, float]] = deque()  # (ts, real, live) of the model runs
        self.still: StillFace | None = None  # this frame's still-face result
        self.model: dict[str, Any] | None = None  # this frame's model figures, when enough scores
        self.method: str | None = None  # the method that started the open incident
        self._figures: dict[str, Any] = {}  # the latest figures of each method that held, for the evidence
        self._ts: float | None = None
        super().__init__(
            spec.event_type, self._cond, lambda o: self.still.still_s if self.still else None, "still_s", None,
            policy.model_copy(update={"trigger_after_s": 0.0}), spec.severity, spec.severity_per_unit,
        )  # fmt: skip
        self.still_s = policy.trigger_after_s

    def _reset(self) -> None:
        self.tracker.reset()
        self.scores.clear()

    def _cond(self, o: Observation) -> bool | None:
        """True while a method holds; False when the face is gone or was seen to move (the still run restarted);
        None (says nothing) while a still run is under way but not yet long enough, so that one jittery frame
        of a photo, or an analyzer restart (the tracker starts afresh), does not end an open incident."""
        if self._ts is not None and (o.ts < self._ts or o.ts - self._ts > MAX_EVIDENCE_GAP_S):
            self._reset()  # a gap (nothing seen in between) or the clock stepped back: a still run starts over
        self._ts = o.ts
        faces: list[Face] = o.values.get("faces") or []
        face = max(faces, key=lambda f: f.box.w * f.box.h) if faces else None
        if face is None:
            self._reset()
            self.still = self.model = None
            return False
        looked = o.preview is not None and o.frame_size is not None
        moved = False
        if looked:
            before = self.tracker.run_start
            self.still = self._still_face(o, face)
            moved = before is not None and self.tracker.run_start == o.ts  # the run restarted on this frame
        else:
            self.still = None
        self.model = self._model(o) if self.use_model else None
        model_hit = self.model is not None and self.model["hit"]
        hit = self.still is not None or model_hit
        if not hit and self.active is None:
            self._figures = {}
        if self.still is not None:
            self._figures[STILL_FACE] = self._still_dict(self.still)
        if self.model is not None and model_hit:
            self._figures[ANTISPOOF_MODEL] = self.model
        if hit or moved:
            return hit
        if not looked and self.model is not None:
            return False  # only the model could look, and its scores are not low
        return None

    def _still_face(self, o: Observation, face: Face) -> StillFace | None:
        assert o.preview is not None and o.frame_size is not None
        mesh: FaceMesh | None = o.values.get("mesh") if "mesh" in o.ran else None
        landmarks = mesh.landmarks if mesh is not None else None
        return self.tracker.update(o.ts, _thumb(o.preview), o.frame_size, face.box, landmarks)

    def _still_dict(self, s: StillFace) -> dict[str, Any]:
        return {
            "still_s": round(s.still_s, 2),
            "face_motion": round(s.face_motion, 5),
            "max_face_motion": self.tracker.max_face_motion,
            "scene_motion": round(s.scene_motion, 2),
            "min_scene_motion": self.tracker.min_scene_motion,
            "points": s.points,
        }

    def _model(self, o: Observation) -> dict[str, Any] | None:
        s: SpoofScores | None = o.values.get(AntiSpoofStage.writes) if AntiSpoofStage.writes in o.ran else None
        if s is not None:
            self.scores.append((o.ts, s.real, s.live))
        while self.scores and o.ts - self.scores[0][0] > MODEL_WINDOW_S:
            self.scores.popleft()
        if len(self.scores) < MODEL_MIN_SCORES:
            return None
        real = float(np.mean([x[1] for x in self.scores]))
        live = float(np.mean([x[2] for x in self.scores]))
        return {
            "hit": real < self.model_threshold and live < self.model_threshold,
            "antispoof_real_mean": round(real, 4),
            "liveness_live_mean": round(live, 4),
            "model_score_threshold": self.model_threshold,
            "model_scores": len(self.scores),
            "model_window_s": MODEL_WINDOW_S,
        }

    def close(self, ts: float, reason: str) -> list[RuleEvent]:
        self._reset()
        return super().close(ts, reason)

    def _event(
        self, state: IncidentState, ts: float, o: Observation | None, value: float | None, reason: str | None = None
    ) -> RuleEvent:
        if state is IncidentState.STARTED:
            self.method = STILL_FACE if self.still is not None else ANTISPOOF_MODEL
        ev = super()._event(state, ts, o, value, reason)
        ev.evidence["method"] = self.method or STILL_FACE
        ev.evidence["heuristic"] = True  # docs/rules.md, "Presentation attacks": measured on very little data
        ev.evidence["threshold_s"] = self.still_s  # the still-face time (the rule itself starts at once)
        for method, figures in self._figures.items():
            ev.evidence.update({k: v for k, v in figures.items() if k != "hit"})
            if method == ANTISPOOF_MODEL:
                ev.evidence["model"] = "human-models.antispoof+liveness"
        if state is IncidentState.ENDED:
            self.method = None
            self._figures = {}
        return ev

    def snapshot(self) -> dict[str, Any] | None:
        d = super().snapshot()
        if d is not None and self.method is not None:
            d["method"] = self.method  # the tracker itself starts afresh after a restart
        return d

    def restore(self, d: dict[str, Any]) -> None:
        super().restore(d)
        self.method = d.get("method")


def spoof_rule(spec: RuleSpec, p: RulePolicy, t: Limits, engine: RuleEngine) -> SpoofRule:
    return SpoofRule(spec, p, t, model_wanted(engine.policy))
