"""The rule engine of one session: fusion, then the catalog's rules (catalog.py), then the risk score.

The rule kinds and incident semantics are in incident.py; which rules a session has, with which thresholds,
texts and weights, in catalog.py.
"""

from __future__ import annotations

from typing import Any

from livekit_proctor.analyzer.fusion import PresenceFusion
from livekit_proctor.analyzer.rules import catalog
from livekit_proctor.analyzer.rules.audio import AudioObservation
from livekit_proctor.analyzer.rules.incident import Condition, ControlRule, DurationRule, RuleEvent
from livekit_proctor.analyzer.rules.verification import Check, Verifier
from livekit_proctor.analyzer.signals import AudioSignals, FrameSignals
from livekit_proctor.contracts.alerts import IncidentState
from livekit_proctor.contracts.api import EffectivePolicy

__all__ = ["RiskScore", "RuleEngine", "RuleEvent"]

RISK_HALF_LIFE_S = 300.0


class RiskScore:
    """Session risk 0-100: each incident adds points (type weight x severity) that decay with a
    half-life of RISK_HALF_LIFE_S; open incidents keep adding while they last."""

    def __init__(self) -> None:
        self.contrib: dict[str, dict[str, Any]] = {}

    def on_event(self, ev: RuleEvent) -> None:
        spec = catalog.spec(ev.event_type)
        w = spec.risk_weight if spec is not None else 5.0
        c = self.contrib.setdefault(
            ev.incident_id, {"event_type": ev.event_type, "points": 0.0, "at": ev.ts, "open_since": None}
        )
        self._decay(c, ev.ts)
        if ev.state is IncidentState.STARTED:
            c["points"] += w * ev.severity
            c["open_since"] = ev.ts
        elif c["open_since"] is not None:
            # Duration adds up to the same again over ten minutes.
            c["points"] += w * ev.severity * min(1.0, (ev.ts - c["open_since"]) / 600)
            c["open_since"] = ev.ts if ev.state is IncidentState.ONGOING else None

    @staticmethod
    def _decay(c: dict[str, Any], ts: float) -> None:
        if ts > c["at"]:
            c["points"] *= 0.5 ** ((ts - c["at"]) / RISK_HALF_LIFE_S)
            c["at"] = ts

    def score(self, ts: float) -> float:
        total = 0.0
        for c in self.contrib.values():
            self._decay(c, ts)
            total += c["points"]
        return round(min(100.0, total), 1)

    def snapshot(self) -> dict[str, Any]:
        return {k: dict(v) for k, v in self.contrib.items() if v["points"] >= 0.01 or v["open_since"] is not None}

    def restore(self, d: dict[str, Any]) -> None:
        self.contrib = {str(k): dict(v) for k, v in d.items()}

    @staticmethod
    def band(score: float) -> str:
        return "high" if score >= 60 else "medium" if score >= 30 else "low"

    def explain(self, ts: float, top: int = 5) -> dict[str, Any]:
        s = self.score(ts)
        items = sorted(self.contrib.items(), key=lambda kv: -kv[1]["points"])[:top]
        return {
            "score": s,
            "band": self.band(s),
            "top_incidents": [
                {"incident_id": k, "event_type": v["event_type"], "points": round(v["points"], 1)}
                for k, v in items
                if v["points"] >= 0.1
            ],
        }


def _bind(condition: catalog.Condition, t: catalog.Limits) -> Condition:
    return lambda o: condition(o, t)


class RuleEngine:
    """The rules of one session, built from the catalog and its effective policy."""

    def __init__(self, policy: EffectivePolicy) -> None:
        self.policy = policy
        self.fusion = PresenceFusion(policy)
        self.risk = RiskScore()
        self.limits = catalog.limits(policy.thresholds)
        # Face checks against the enrollment (verification.py); FACE_MISMATCH reads its latest check.
        self.verifier = Verifier(policy, self.limits.get("face_verification_min_quality", 0.3))
        self.last_check: Check | None = None  # the check made on the latest frame, if any
        self.rules: list[DurationRule] = []  # frame rules, in catalog order
        self.controls: dict[str, ControlRule] = {}
        self.metas: list[DurationRule] = []  # over the frame rules' incidents (HIGH_CONFIDENCE_CHEATING)
        self.audio_rules: list[DurationRule[AudioObservation]] = []  # over the VAD frames (rules/audio.py)
        for spec in catalog.rules():
            p = policy.rules.get(str(spec.event_type))
            if p is None or not p.enabled:  # off, or unknown when the session started (its policy is kept)
                continue
            if spec.build is not None:
                rule = spec.build(spec, p, self.limits, self)
            elif spec.kind == "control":
                rule = ControlRule(spec.event_type, p, spec.severity)
            else:
                assert spec.condition is not None
                rule = DurationRule(
                    spec.event_type, _bind(spec.condition, self.limits), spec.measure, spec.measure_name,
                    spec.threshold_value(self.limits), p, spec.severity, spec.severity_per_unit,
                )  # fmt: skip
            if spec.kind == "control":
                self.controls[str(spec.event_type)] = rule
            elif spec.kind == "meta":
                self.metas.append(rule)
            elif spec.kind == "audio":
                self.audio_rules.append(rule)
            else:
                self.rules.append(rule)
        self._last_ts: float | None = None

    @property
    def last_ts(self) -> float | None:
        """Media time of the last observed frame."""
        return self._last_ts

    def strong_open(self) -> list[str]:
        """Open frame incidents that are strong evidence (the catalog's evidence_group), by event type."""
        return sorted(
            {
                str(x.event_type)
                for x in [*self.rules, *self.audio_rules]
                if x.active is not None and catalog.group(x.event_type)
            }
        )

    def _account(self, events: list[RuleEvent]) -> list[RuleEvent]:
        for ev in events:
            if ev.state is IncidentState.STARTED:
                spec = catalog.spec(ev.event_type)
                ev.feedback = spec.feedback if spec is not None else None
            self.risk.on_event(ev)
        return events

    def observe(self, s: FrameSignals) -> list[RuleEvent]:
        """Fusion turns the frame's signals into one complete Observation; the frame rules see only that, then
        the meta rules see the frame rules' incidents."""
        o = self.fusion.observe(s)
        self._last_ts = o.ts
        self.last_check = self.verifier.observe(o)
        out: list[RuleEvent] = []
        for rule in self.rules:
            out.extend(self._account(rule.observe(o)))
        for meta in self.metas:
            events = meta.observe(o)
            if events and events[0].state is IncidentState.STARTED:
                events[0].evidence["strong_incidents"] = self.strong_open()
                events[0].evidence["risk_score"] = self.risk.score(o.ts)
            out.extend(self._account(events))
        return out

    def observe_audio(self, s: AudioSignals) -> list[RuleEvent]:
        """The audio rules over one analysed audio window: one AudioObservation per VAD frame, in capture time.
        A window without the "speech" signal (the vad stage is off) says nothing."""
        speech = s.values.get("speech")
        if speech is None or not self.audio_rules:
            return []
        out: list[RuleEvent] = []
        for prob, ts in zip(speech.probs.tolist(), speech.frame_ts.tolist(), strict=True):
            o = AudioObservation(s.seq, ts, s.model, prob, s.values)
            for rule in self.audio_rules:
                out.extend(self._account(rule.observe(o)))
        return out

    def reset_audio(self, ts: float, reason: str) -> list[RuleEvent]:
        """No audio evidence from now on (microphone off): audio incidents end, pending ones start over."""
        out: list[RuleEvent] = []
        for rule in self.audio_rules:
            out.extend(self._account(rule.close(ts, reason)))
        return out

    def control(self, event: str, on: bool, ts: float, reason: str) -> list[RuleEvent]:
        rule = self.controls.get(event)
        return self._account(rule.set(on, ts, reason) if rule else [])

    def tick(self, ts: float) -> list[RuleEvent]:
        """Advances the control rules' grace periods (called by the session's watchdog)."""
        out: list[RuleEvent] = []
        for rule in self.controls.values():
            out.extend(self._account(rule.tick(ts)))
        return out

    def reset_frames(self, ts: float, reason: str) -> list[RuleEvent]:
        """No video evidence from now on (camera off): frame-driven incidents end, pending ones start over."""
        out: list[RuleEvent] = []
        for rule in [*self.rules, *self.metas]:
            out.extend(self._account(rule.close(ts, reason)))
        return out

    def close_all(self, ts: float, reason: str) -> list[RuleEvent]:
        out = self.reset_frames(ts, reason) + self.reset_audio(ts, reason)
        for rule in self.controls.values():
            out.extend(self._account(rule.close(ts, reason)))
        return out

    def open_incidents(self) -> list[dict[str, Any]]:
        frame_rules: list[Any] = [*self.rules, *self.metas, *self.audio_rules]
        out = [
            {"event_type": str(x.event_type), "incident_id": x.active.incident_id, "since": x.active.onset_ts}
            for x in [*frame_rules, *self.controls.values()]
            if x.active is not None
        ]
        return out

    # ---- persistence: a restarted analyzer continues the session where it was

    SNAPSHOT_VERSION = 1

    def snapshot(self) -> dict[str, Any]:
        """JSON-safe state that a restart needs: open and pending incidents, cooldowns, calibration, risk, the
        face checks' consecutive mismatches, tracked face and latest result."""
        frame_rules = [*self.rules, *self.metas, *self.audio_rules]
        return {
            "v": self.SNAPSHOT_VERSION,
            "rules": {str(r.event_type): snap for r in frame_rules if (snap := r.snapshot()) is not None},
            "controls": {name: snap for name, r in self.controls.items() if (snap := r.snapshot()) is not None},
            "calibration": self.fusion.calibration.snapshot(),
            "risk": self.risk.snapshot(),
            "verification": self.verifier.snapshot(),
            "last_ts": self._last_ts,
        }

    def restore(self, d: dict[str, Any]) -> None:
        """The inverse of snapshot(); state of rules the policy no longer has is ignored."""
        if d.get("v") != self.SNAPSHOT_VERSION:
            return
        frame_rules = {str(r.event_type): r for r in [*self.rules, *self.metas, *self.audio_rules]}
        for name, snap in d.get("rules", {}).items():
            if name in frame_rules:
                frame_rules[name].restore(snap)
        for name, snap in d.get("controls", {}).items():
            if name in self.controls:
                self.controls[name].restore(snap)
        if d.get("calibration"):
            self.fusion.calibration.restore(d["calibration"])
        self.risk.restore(d.get("risk", {}))
        if d.get("verification"):
            self.verifier.restore(d["verification"])
        self._last_ts = d.get("last_ts")

    def risk_summary(self, ts: float | None = None) -> dict[str, Any]:
        t = ts if ts is not None else (self._last_ts or 0.0)
        out = self.risk.explain(t)
        out["calibration"] = self.fusion.baseline.to_dict()
        out["calibrating"] = not self.fusion.calibration.done
        return out
