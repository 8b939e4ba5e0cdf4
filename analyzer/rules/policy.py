"""Rule defaults (the seed's thresholds), sensitivity presets and per-exam overrides."""

from __future__ import annotations

from dataclasses import dataclass

from livekit_proctor.contracts.alerts import EventType as E
from livekit_proctor.contracts.api import (
    FEATURES,
    CalibrationSettings,
    EffectivePolicy,
    RulePolicy,
    SessionStartRequest,
    Thresholds,
)


@dataclass(frozen=True)
class RuleDefault:
    trigger_after_s: float  # condition must hold longer than this (seconds of media time); 0 = at once
    clear_after_s: float  # condition must be gone this long to end the incident
    feature: str  # the feature that switches the rule off
    cooldown_s: float = 5.0  # no new incident of this type this soon after the last one ended


# Seed defaults at sensitivity "medium".
RULE_DEFAULTS: dict[str, RuleDefault] = {
    E.FACE_NOT_FOUND: RuleDefault(5.0, 1.0, "face_detection"),  # no person in view (CANDIDATE_ABSENT)
    E.FACE_NOT_VISIBLE: RuleDefault(5.0, 1.0, "face_detection"),  # person there, face hidden / turned
    E.MULTIPLE_FACES: RuleDefault(3.0, 1.0, "multiple_faces"),
    E.MULTIPLE_PERSONS: RuleDefault(3.0, 2.0, "objects"),
    E.PRESENCE_LOSS: RuleDefault(5.0, 1.0, "face_detection"),
    E.GAZE_OFF_SCREEN: RuleDefault(4.0, 1.0, "gaze"),
    E.PROLONGED_LOOK_AWAY: RuleDefault(10.0, 1.0, "gaze"),
    E.FREQUENT_DISTRACTION: RuleDefault(0.0, 0.0, "gaze", cooldown_s=60.0),
    E.HEAD_DOWN: RuleDefault(3.0, 1.0, "head_pose"),
    E.HEAD_TURNED_AWAY: RuleDefault(3.0, 1.0, "head_pose"),
    # Two consecutive fast frames: one fast frame pair is landmark jitter or a scene cut, not a movement.
    E.SUSPICIOUS_MOVEMENT: RuleDefault(0.15, 1.0, "head_pose", cooldown_s=10.0),
    E.PHONE_DETECTED: RuleDefault(1.5, 2.5, "objects"),
    E.LEFT_FRAME: RuleDefault(5.0, 1.0, "body_pose"),
    E.HAND_NEAR_EAR: RuleDefault(3.0, 1.0, "body_pose"),
    E.CAMERA_OFF: RuleDefault(2.0, 0.0, "face_detection", cooldown_s=0.0),
    E.MICROPHONE_OFF: RuleDefault(2.0, 0.0, "audio", cooldown_s=0.0),
    E.CANDIDATE_DISCONNECTED: RuleDefault(0.0, 0.0, "face_detection", cooldown_s=0.0),
    E.HIGH_CONFIDENCE_CHEATING: RuleDefault(0.0, 5.0, "face_detection", cooldown_s=60.0),
}

# Higher sensitivity alerts sooner; lower waits longer. Scales trigger_after_s.
SENSITIVITY_SCALE = {"low": 1.5, "medium": 1.0, "high": 0.6}


def effective_policy(req: SessionStartRequest, default_fps: float) -> EffectivePolicy:
    if req.features_enabled is None:
        features = dict.fromkeys(FEATURES, True)
    elif isinstance(req.features_enabled, dict):
        features = {f: req.features_enabled.get(f, True) for f in FEATURES}
    else:
        features = {f: f in req.features_enabled for f in FEATURES}
    scale = SENSITIVITY_SCALE[req.sensitivity]
    unknown = sorted(set(req.rules) - set(RULE_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown rules {unknown}; known: {sorted(str(k) for k in RULE_DEFAULTS)}")
    rules: dict[str, RulePolicy] = {}
    for name, d in RULE_DEFAULTS.items():
        o = req.rules.get(name)

        def pick(field: str, default: float, o=o) -> float:
            v = getattr(o, field) if o is not None else None
            return default if v is None else v

        rules[str(name)] = RulePolicy(
            enabled=features.get(d.feature, True) if o is None or o.enabled is None else o.enabled,
            trigger_after_s=pick("trigger_after_s", round(d.trigger_after_s * scale, 3)),
            clear_after_s=pick("clear_after_s", d.clear_after_s),
            cooldown_s=pick("cooldown_s", d.cooldown_s),
        )
    bad = sorted(set(req.thresholds) - set(Thresholds.model_fields))
    if bad:
        raise ValueError(f"unknown thresholds {bad}; known: {sorted(Thresholds.model_fields)}")
    calibration = CalibrationSettings()
    if req.calibration_s is not None:
        calibration.duration_s = req.calibration_s
        calibration.min_frames = min(calibration.min_frames, int(req.calibration_s * (req.video_fps or default_fps)))
    return EffectivePolicy(
        sensitivity=req.sensitivity,
        features=features,
        video_fps=req.video_fps or default_fps,
        verification=req.verification_policy,
        rules=rules,
        thresholds=Thresholds.model_validate(req.thresholds),
        calibration=calibration,
    )
