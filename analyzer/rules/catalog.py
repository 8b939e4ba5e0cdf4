"""Rules as a catalog: one RuleSpec per event type, everything about the rule in one place.

A spec holds the rule's default timing (at sensitivity "medium"), the feature that switches it off, the
candidate's feedback text, its weight in the risk score, its strong-evidence group (for
HIGH_CONFIDENCE_CHEATING), its severity, and what it watches: a condition over the fused Observation with the
measured value and threshold for the evidence. `effective_policy` (policy.py) and `RuleEngine` (engine.py) build
a session's rules from the catalog; `register_rule` also registers the event type with the alert contract
(docs/architecture.md, "Adding a rule").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from livekit_proctor.analyzer.fusion import Observation
from livekit_proctor.analyzer.rules.audio import FEATURE as AUDIO_FEATURE
from livekit_proctor.analyzer.rules.audio import (
    MULTIPLE_SPEAKERS,
    OTHER_VOICE,
    VOICE_DETECTED,
    other_voice_rule,
    speakers_rule,
    voice_rule,
)
from livekit_proctor.analyzer.rules.audio import THRESHOLDS as AUDIO_THRESHOLDS
from livekit_proctor.analyzer.rules.incident import DistractionRule, DurationRule
from livekit_proctor.analyzer.rules.spoof import FEATURE as SPOOF_FEATURE
from livekit_proctor.analyzer.rules.spoof import THRESHOLDS as SPOOF_THRESHOLDS
from livekit_proctor.analyzer.rules.spoof import spoof_rule
from livekit_proctor.analyzer.rules.verification import DEFAULT_MIN_QUALITY, mismatch_rule
from livekit_proctor.contracts.alerts import EventType as E
from livekit_proctor.contracts.alerts import register_event_type, unregister_event_type
from livekit_proctor.contracts.api import FEATURES, RulePolicy, Thresholds

if TYPE_CHECKING:
    from livekit_proctor.analyzer.rules.engine import RuleEngine


class Limits(dict[str, float]):
    """The measured-value thresholds of a session: the catalog's defaults, then the session's Thresholds
    (docs/rules.md); read as attributes (t.phone_score)."""

    def __getattr__(self, name: str) -> float:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no threshold {name!r}") from None


Condition = Callable[[Observation, Limits], "bool | None"]  # None: the frame says nothing about it
Measure = Callable[[Observation], "float | None"]
Build = Callable[["RuleSpec", RulePolicy, Limits, "RuleEngine"], Any]


@dataclass(frozen=True)
class RuleSpec:
    event_type: str
    feature: str  # the feature (contracts/api.py FEATURES) whose switch turns the rule off
    trigger_after_s: float  # condition must hold longer than this (seconds of media time); 0 = at once
    clear_after_s: float  # condition must be gone this long to end the incident
    cooldown_s: float = 5.0  # no new incident of this type this soon after the last one ended
    severity: float = 0.5  # base severity at the start
    severity_per_unit: float = 0.0  # added per unit of the peak measure beyond the threshold
    risk_weight: float = 5.0  # points in the risk score at start, for severity 1.0
    feedback: str | None = None  # what the candidate is told when an incident starts
    evidence_group: str | None = None  # strong evidence of this kind; two kinds at once: HIGH_CONFIDENCE_CHEATING
    # "frame": a DurationRule over observations; "control": session state (CAMERA_OFF & co.); "meta": after the
    # frame rules, over their incidents; "audio": a rule (its `build`) over the VAD frames of the session's audio
    # (rules/audio.py)
    kind: Literal["frame", "control", "meta", "audio"] = "frame"
    condition: Condition | None = None
    measure: Measure = lambda o: None  # the value that raised it, for evidence and severity
    measure_name: str = "value"
    threshold: str | float | None = None  # a threshold name (Limits) or a number, for evidence and severity
    thresholds: dict[str, float] = field(default_factory=dict)  # defaults of thresholds this rule introduces
    build: Build | None = None  # another rule class than DurationRule / ControlRule

    def threshold_value(self, t: Limits) -> float | None:
        return t[self.threshold] if isinstance(self.threshold, str) else self.threshold


def _head(fn: Callable[[Any, Limits], bool]) -> Condition:
    # Relative to the calibrated baseline: nothing to say until calibration is done.
    return lambda o, t: None if o.head is None or o.calibrating else fn(o.head, t)


def _gaze_off(o: Observation, t: Limits) -> bool | None:
    return None if o.calibrating else o.gaze_off


def _gaze_dev(o: Observation) -> float | None:
    return None if o.gaze is None else max(abs(o.gaze.yaw), abs(o.gaze.pitch))


def _distraction(spec: RuleSpec, p: RulePolicy, t: Limits, engine: RuleEngine) -> DistractionRule:
    return DistractionRule(p, int(t.distraction_count), t.distraction_window_s)


def _cheating(spec: RuleSpec, p: RulePolicy, t: Limits, engine: RuleEngine) -> DurationRule:
    # The seed's fusion rule: two different kinds of strong evidence at once, or a high session risk.
    def cond(o: Observation) -> bool:
        return len({group(e) for e in engine.strong_open()}) >= 2 or engine.risk.score(o.ts) >= 85

    return DurationRule(spec.event_type, cond, lambda o: float(len(engine.strong_open())), "strong_incidents", 2.0,
                        p, spec.severity, spec.severity_per_unit)  # fmt: skip


# Seed defaults at sensitivity "medium"; frame rules run in this order.
BUILTIN: tuple[RuleSpec, ...] = (
    RuleSpec(  # no person in view (CANDIDATE_ABSENT)
        E.FACE_NOT_FOUND, "face_detection", 5.0, 1.0, severity=0.6, risk_weight=10,
        feedback="Please return to your seat and keep your face in view of the camera.",
        condition=lambda o, t: not o.candidate_present, measure=lambda o: float(o.persons_present),
        measure_name="persons_present", threshold=0.0,
    ),
    RuleSpec(  # person there, face hidden / turned
        E.FACE_NOT_VISIBLE, "face_detection", 5.0, 1.0, severity=0.4, risk_weight=4,
        feedback="Please keep your face in view of the camera.",
        condition=lambda o, t: o.candidate_present and not o.face_visible, measure=lambda o: float(o.face_count),
        measure_name="face_count", threshold=0.0,
    ),
    RuleSpec(
        E.MULTIPLE_FACES, "multiple_faces", 3.0, 1.0, severity=0.6, severity_per_unit=0.05, risk_weight=20,
        evidence_group="another_person",
        condition=lambda o, t: o.face_count > 1, measure=lambda o: float(o.face_count), measure_name="face_count",
        threshold=1.0,
    ),
    RuleSpec(
        E.MULTIPLE_PERSONS, "objects", 3.0, 2.0, severity=0.7, severity_per_unit=0.05, risk_weight=25,
        evidence_group="another_person",  # usually the same second person as MULTIPLE_FACES: one group
        condition=lambda o, t: None if o.persons_detected is None else o.persons_present > 1,
        measure=lambda o: float(o.persons_present), measure_name="persons_present", threshold=1.0,
    ),
    RuleSpec(
        E.PRESENCE_LOSS, "face_detection", 5.0, 1.0, severity=0.4, risk_weight=4,
        feedback="Please move closer to the camera.",
        condition=lambda o, t: (
            None if o.face_area_ratio is None or o.calibrating else o.face_area_ratio < t.presence_loss_ratio
        ),
        measure=lambda o: o.face_area_ratio, measure_name="face_area_ratio", threshold="presence_loss_ratio",
    ),
    RuleSpec(
        E.GAZE_OFF_SCREEN, "gaze", 4.0, 1.0, severity=0.4, risk_weight=4,
        feedback="Please keep your eyes on the screen.",
        condition=_gaze_off, measure=_gaze_dev, measure_name="gaze_deviation_deg", threshold="gaze_yaw_deg",
    ),
    RuleSpec(
        E.PROLONGED_LOOK_AWAY, "gaze", 10.0, 1.0, severity=0.6, risk_weight=10, evidence_group="attention",
        condition=_gaze_off, measure=_gaze_dev, measure_name="gaze_deviation_deg", threshold="gaze_yaw_deg",
    ),
    RuleSpec(
        E.HEAD_DOWN, "head_pose", 3.0, 1.0, severity=0.4, risk_weight=4,
        condition=_head(lambda h, t: h.pitch < t.head_down_pitch_deg),
        measure=lambda o: None if o.head is None else o.head.pitch, measure_name="head_pitch_deg",
        threshold="head_down_pitch_deg",
    ),
    RuleSpec(
        E.HEAD_TURNED_AWAY, "head_pose", 3.0, 1.0, severity=0.5, severity_per_unit=0.005, risk_weight=6,
        feedback="Please face the screen.",
        condition=_head(lambda h, t: abs(h.yaw) > t.head_turn_yaw_deg),
        measure=lambda o: None if o.head is None else abs(o.head.yaw), measure_name="head_yaw_deg",
        threshold="head_turn_yaw_deg",
    ),
    RuleSpec(
        # Two consecutive fast frames: one fast frame pair is landmark jitter or a scene cut, not a movement.
        E.SUSPICIOUS_MOVEMENT, "head_pose", 0.15, 1.0, cooldown_s=10.0, severity=0.3, severity_per_unit=0.002,
        risk_weight=3,
        condition=lambda o, t: None if o.head_speed is None else o.head_speed > t.movement_deg_s,
        measure=lambda o: o.head_speed, measure_name="head_speed_deg_s", threshold="movement_deg_s",
    ),
    RuleSpec(
        E.PHONE_DETECTED, "objects", 1.5, 2.5, severity=0.7, severity_per_unit=0.5, risk_weight=35,
        evidence_group="device", feedback="Phones are not allowed during the exam. Please put it away.",
        condition=lambda o, t: None if o.phone_score is None else o.phone_score >= t.phone_score,
        measure=lambda o: o.phone_score, measure_name="phone_score", threshold="phone_score",
    ),
    RuleSpec(
        E.LEFT_FRAME, "body_pose", 5.0, 1.0, severity=0.5, risk_weight=8,
        feedback="Please stay seated in front of the camera.",
        # Shoulders gone while the candidate is still there (leaning out, standing up); a candidate gone
        # altogether is FACE_NOT_FOUND, not a second alert for the same thing.
        condition=lambda o, t: None if o.shoulders_visible is None else o.candidate_present and not o.shoulders_visible,
        measure_name="shoulders_visible",
    ),
    RuleSpec(
        E.HAND_NEAR_EAR, "body_pose", 3.0, 1.0, severity=0.5, risk_weight=10, evidence_group="call",
        condition=lambda o, t: o.hand_near_ear, measure=lambda o: o.hand_ear_ratio, measure_name="hand_ear_ratio",
        threshold="hand_ear_ratio",
    ),
    RuleSpec(  # MISMATCHES_TO_ALERT face checks in a row below the threshold (verification.py)
        E.FACE_MISMATCH, "face_verification", 0.0, 4.0, cooldown_s=10.0, severity=0.8, risk_weight=40,
        evidence_group="identity", measure_name="current_similarity",
        thresholds={"face_verification_min_quality": DEFAULT_MIN_QUALITY}, build=mismatch_rule,
    ),
    RuleSpec(  # a labelled heuristic, opt-in (spoof.py): a face that stays still for 10 s while the scene moves
        E.SPOOF_SUSPECTED, SPOOF_FEATURE, 10.0, 2.0, cooldown_s=10.0, severity=0.5, risk_weight=10,
        measure_name="still_s", thresholds=SPOOF_THRESHOLDS, build=spoof_rule,
    ),
    RuleSpec(  # more than distraction_count off-screen episodes within distraction_window_s
        E.FREQUENT_DISTRACTION, "gaze", 0.0, 0.0, cooldown_s=60.0, severity=0.5, severity_per_unit=0.05,
        risk_weight=12, build=_distraction,
    ),
    RuleSpec(  # speech heard (rules/audio.py): probability > voice_probability for > trigger_after_s
        VOICE_DETECTED, AUDIO_FEATURE, 2.0, 1.0, cooldown_s=10.0, severity=0.4, risk_weight=6,
        measure_name="speech_probability", thresholds=AUDIO_THRESHOLDS, build=voice_rule, kind="audio",
    ),
    RuleSpec(  # two or more voices within the speaker stage's 10 s window (rules/audio.py; needs that stage)
        MULTIPLE_SPEAKERS, AUDIO_FEATURE, 0.0, 2.0, cooldown_s=10.0, severity=0.6, risk_weight=20,
        measure_name="speakers_in_window", build=speakers_rule, kind="audio",
        # Heard, the second person is usually the one MULTIPLE_FACES sees: one group, so that a second voice
        # with the candidate looking away (attention) or a phone (device) is strong evidence, not voice + face.
        evidence_group="another_person",
    ),
    RuleSpec(  # voiced audio unlike the session's enrolled voice (rules/audio.py; needs the speaker stage)
        OTHER_VOICE, AUDIO_FEATURE, 0.0, 2.0, cooldown_s=10.0, severity=0.6, risk_weight=20,
        measure_name="enrolled_voice_similarity", threshold="voice_match", build=other_voice_rule, kind="audio",
        evidence_group="another_person",
    ),
    RuleSpec(
        E.CAMERA_OFF, "face_detection", 2.0, 0.0, cooldown_s=0.0, severity=0.5, risk_weight=15, kind="control",
        feedback="Your camera is off. Please turn it back on.",
    ),
    RuleSpec(
        E.MICROPHONE_OFF, "audio", 2.0, 0.0, cooldown_s=0.0, severity=0.4, risk_weight=10, kind="control",
        feedback="Your microphone is off. Please turn it back on.",
    ),
    RuleSpec(
        E.CANDIDATE_DISCONNECTED, "face_detection", 0.0, 0.0, cooldown_s=0.0, severity=0.3, risk_weight=5,
        kind="control",
    ),
    RuleSpec(  # no enrollment to verify against: once, open for the session (LiveSession loads the enrollment)
        E.IDENTITY_UNVERIFIED, "face_verification", 0.0, 0.0, cooldown_s=0.0, severity=0.4, risk_weight=5,
        kind="control",
    ),
    RuleSpec(
        E.HIGH_CONFIDENCE_CHEATING, "face_detection", 0.0, 5.0, cooldown_s=60.0, severity=0.85,
        severity_per_unit=0.05, risk_weight=30, kind="meta", build=_cheating,
    ),
)  # fmt: skip

_catalog: dict[str, RuleSpec] = {}


def register_rule(spec: RuleSpec) -> RuleSpec:
    """Adds (or replaces) the rule of spec.event_type and registers the event type with the alert contract.
    Sessions started afterwards have it (a session keeps the rules of its policy)."""
    if spec.feature not in FEATURES:
        raise ValueError(f"rule {spec.event_type}: unknown feature {spec.feature!r}; known: {list(FEATURES)}")
    if spec.kind == "frame" and spec.condition is None and spec.build is None:
        raise ValueError(f"rule {spec.event_type}: a frame rule needs a condition (or a build)")
    if spec.kind == "audio" and spec.build is None:
        raise ValueError(f"rule {spec.event_type}: an audio rule needs a build (rules/audio.py)")
    register_event_type(spec.event_type)
    _catalog[str(spec.event_type)] = spec
    return spec


def unregister_rule(event_type: str) -> None:
    """Undoes register_rule for a rule that is not built in (tests)."""
    if event_type not in E.__members__ and _catalog.pop(event_type, None) is not None:
        unregister_event_type(event_type)


def rules() -> list[RuleSpec]:
    return list(_catalog.values())


def spec(event_type: str) -> RuleSpec | None:
    return _catalog.get(event_type)


def group(event_type: str) -> str | None:
    s = _catalog.get(event_type)
    return s.evidence_group if s is not None else None


def limits(thresholds: Thresholds) -> Limits:
    """A session's thresholds: the defaults rules introduce, then the contract's Thresholds (overridable per
    session)."""
    out = Limits()
    for s in _catalog.values():
        out.update(s.thresholds)
    out.update(thresholds.model_dump())
    return out


for _spec in BUILTIN:
    register_rule(_spec)
