"""A session's effective policy: the catalog's rule defaults (catalog.py), sensitivity presets and per-exam
overrides."""

from __future__ import annotations

from livekit_proctor.analyzer.rules import catalog
from livekit_proctor.contracts.api import (
    FEATURES,
    CalibrationSettings,
    EffectivePolicy,
    RulePolicy,
    SessionStartRequest,
    Thresholds,
    feature_default,
)

# Higher sensitivity alerts sooner; lower waits longer. Scales trigger_after_s.
SENSITIVITY_SCALE = {"low": 1.5, "medium": 1.0, "high": 0.6}


def effective_policy(req: SessionStartRequest, default_fps: float) -> EffectivePolicy:
    if req.features_enabled is None:
        features = {f: feature_default(f) for f in FEATURES}
    elif isinstance(req.features_enabled, dict):
        features = {f: req.features_enabled.get(f, feature_default(f)) for f in FEATURES}
    else:
        features = {f: f in req.features_enabled for f in FEATURES}
    scale = SENSITIVITY_SCALE[req.sensitivity]
    specs = {str(s.event_type): s for s in catalog.rules()}
    unknown = sorted(set(req.rules) - set(specs))
    if unknown:
        raise ValueError(f"unknown rules {unknown}; known: {sorted(specs)}")
    rules: dict[str, RulePolicy] = {}
    for name, d in specs.items():
        o = req.rules.get(name)

        def pick(field: str, default: float, o=o) -> float:
            v = getattr(o, field) if o is not None else None
            return default if v is None else v

        rules[name] = RulePolicy(
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
