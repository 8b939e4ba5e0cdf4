"""Rule defaults (the seed's thresholds), sensitivity presets and per-exam overrides."""

from __future__ import annotations

from dataclasses import dataclass

from proctor.contracts.alerts import EventType
from proctor.contracts.api import (
    FEATURES,
    EffectivePolicy,
    RulePolicy,
    SessionStartRequest,
)


@dataclass(frozen=True)
class RuleDefault:
    trigger_after_s: float  # condition must hold longer than this (seconds of media time)
    clear_after_s: float  # condition must be gone this long to end the incident
    feature: str  # the feature that switches the rule off


# Seed defaults at sensitivity "medium".
RULE_DEFAULTS: dict[str, RuleDefault] = {
    EventType.FACE_NOT_FOUND: RuleDefault(5.0, 1.0, "face_detection"),
    EventType.MULTIPLE_FACES: RuleDefault(3.0, 1.0, "multiple_faces"),
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
    rules: dict[str, RulePolicy] = {}
    unknown = sorted(set(req.rules) - set(RULE_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown rules {unknown}; known: {sorted(str(k) for k in RULE_DEFAULTS)}")
    for name, d in RULE_DEFAULTS.items():
        o = req.rules.get(name)
        rules[name] = RulePolicy(
            enabled=features.get(d.feature, True) if o is None or o.enabled is None else o.enabled,
            trigger_after_s=round(d.trigger_after_s * scale, 3)
            if o is None or o.trigger_after_s is None
            else o.trigger_after_s,
            clear_after_s=d.clear_after_s if o is None or o.clear_after_s is None else o.clear_after_s,
        )
    return EffectivePolicy(
        sensitivity=req.sensitivity,
        features=features,
        video_fps=req.video_fps or default_fps,
        verification=req.verification_policy,
        rules=rules,
    )
