"""Temporal rules: turn fused observations into incidents.

An incident is one alert when it starts ("started"), an update every UPDATE_INTERVAL_S while it lasts
("ongoing") and one alert when it ends ("ended", with its duration). Hysteresis (clear_after_s) and a
cooldown keep a flickering signal from opening and closing incidents. All times are media time
(capture timestamps), so a recording raises the same alerts at the same offsets as a live stream.
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from livekit_proctor.analyzer.fusion import Observation, PresenceFusion
from livekit_proctor.analyzer.signals import FrameSignals
from livekit_proctor.contracts.alerts import EventType as E
from livekit_proctor.contracts.alerts import IncidentState
from livekit_proctor.contracts.api import EffectivePolicy, RulePolicy

# A frame gap longer than this means we saw nothing in between: a pending
# (not yet raised) condition starts again instead of counting the gap.
MAX_EVIDENCE_GAP_S = 2.0
# A pending condition survives interruptions shorter than this (missed detections).
PENDING_GAP_TOLERANCE_S = 0.5
UPDATE_INTERVAL_S = 30.0

# What the candidate is told when an incident starts (proctor alerts stay separate).
FEEDBACK: dict[str, str] = {
    E.FACE_NOT_FOUND: "Please return to your seat and keep your face in view of the camera.",
    E.FACE_NOT_VISIBLE: "Please keep your face in view of the camera.",
    E.PRESENCE_LOSS: "Please move closer to the camera.",
    E.GAZE_OFF_SCREEN: "Please keep your eyes on the screen.",
    E.HEAD_TURNED_AWAY: "Please face the screen.",
    E.LEFT_FRAME: "Please stay seated in front of the camera.",
    E.CAMERA_OFF: "Your camera is off. Please turn it back on.",
    E.MICROPHONE_OFF: "Your microphone is off. Please turn it back on.",
    E.PHONE_DETECTED: "Phones are not allowed during the exam. Please put it away.",
}

# Weight of each incident type in the risk score (points at start for severity 1.0).
RISK_WEIGHT: dict[str, float] = {
    E.FACE_NOT_FOUND: 10, E.FACE_NOT_VISIBLE: 4, E.MULTIPLE_FACES: 20, E.MULTIPLE_PERSONS: 25,
    E.PRESENCE_LOSS: 4, E.GAZE_OFF_SCREEN: 4, E.PROLONGED_LOOK_AWAY: 10, E.FREQUENT_DISTRACTION: 12,
    E.HEAD_DOWN: 4, E.HEAD_TURNED_AWAY: 6, E.SUSPICIOUS_MOVEMENT: 3, E.PHONE_DETECTED: 35,
    E.LEFT_FRAME: 8, E.HAND_NEAR_EAR: 10, E.CAMERA_OFF: 15, E.MICROPHONE_OFF: 10,
    E.CANDIDATE_DISCONNECTED: 5, E.HIGH_CONFIDENCE_CHEATING: 30,
}  # fmt: skip
RISK_HALF_LIFE_S = 300.0
# Strong incidents by what they show; two different groups at once make HIGH_CONFIDENCE_CHEATING (the
# seed's fusion rule). MULTIPLE_FACES and MULTIPLE_PERSONS usually see the same second person: one group.
STRONG_GROUP: dict[str, str] = {
    E.MULTIPLE_FACES: "another_person",
    E.MULTIPLE_PERSONS: "another_person",
    E.PHONE_DETECTED: "device",
    E.HAND_NEAR_EAR: "call",
    E.PROLONGED_LOOK_AWAY: "attention",
}
STRONG = frozenset(STRONG_GROUP)


@dataclass(slots=True)
class RuleEvent:
    """What a rule reports; the session turns it into a canonical Alert."""

    event_type: E
    state: IncidentState
    incident_id: str
    ts: float  # media time the event refers to
    severity: float
    model: str
    evidence: dict[str, Any]
    observation: Observation | None = field(default=None, repr=False)

    @property
    def feedback(self) -> str | None:
        return FEEDBACK.get(self.event_type) if self.state is IncidentState.STARTED else None


@dataclass(slots=True)
class _Incident:
    incident_id: str
    onset_ts: float
    onset_seq: int
    started_ts: float
    trigger_seq: int
    peak: float
    last_update: float


Condition = Callable[[Observation], "bool | None"]


@dataclass
class DurationRule:
    """Raises an incident when `condition` has held for more than trigger_after_s.

    condition returns None when the frame says nothing about it (no mesh, a blink, no detector):
    such frames neither extend nor break the condition. The incident ends once the condition has
    been false for clear_after_s; a new one cannot start until cooldown_s after that.
    """

    event_type: E
    condition: Condition
    measure: Callable[[Observation], float | None]  # the value that raised it, for evidence and severity
    measure_name: str
    threshold: float | None  # the measured-value threshold, for evidence
    policy: RulePolicy
    base_severity: float
    severity_per_unit: float = 0.0  # added per unit of the peak measure beyond the threshold
    _onset: tuple[float, int] | None = field(default=None, init=False)
    _last_true: float | None = field(default=None, init=False)
    _last_seen: float | None = field(default=None, init=False)
    _peak: float = field(default=0.0, init=False)
    _active: _Incident | None = field(default=None, init=False)
    _cooldown_until: float = field(default=-math.inf, init=False)

    @property
    def active(self) -> _Incident | None:
        return self._active

    def _severity(self, peak: float, duration: float) -> float:
        excess = max(0.0, peak - (self.threshold or 0.0)) if self.severity_per_unit else 0.0
        horizon = 10 * max(self.policy.trigger_after_s, 1.0)
        dur_term = min(0.2, 0.2 * duration / horizon)  # longer incidents weigh more
        return round(min(1.0, self.base_severity + self.severity_per_unit * excess + dur_term), 3)

    def observe(self, o: Observation) -> list[RuleEvent]:
        out: list[RuleEvent] = []
        if self._last_seen is not None and o.ts < self._last_seen:
            if self._last_seen - o.ts <= 1.0:
                return out  # a late sample: ignore rather than corrupt durations
            out.extend(self.close(o.ts, "clock_reset"))  # the client's clock stepped back: start over
            self._last_true = None
        if self._last_seen is not None and o.ts - self._last_seen > MAX_EVIDENCE_GAP_S and self._active is None:
            self._onset = None
        self._last_seen = o.ts
        hit = self.condition(o)
        if hit is None:
            return out
        value = self.measure(o)
        if hit:
            if self._onset is None:
                if o.ts < self._cooldown_until:
                    return out
                self._onset = (o.ts, o.seq)
                self._peak = value if value is not None else 0.0
            if value is not None:
                self._peak = max(self._peak, value)
            self._last_true = o.ts
            elapsed = o.ts - self._onset[0]
            due = elapsed > self.policy.trigger_after_s or (self.policy.trigger_after_s == 0 and elapsed == 0)
            if self._active is None and due:
                self._active = _Incident(
                    str(uuid.uuid4()), self._onset[0], self._onset[1], o.ts, o.seq, self._peak, o.ts
                )
                out.append(self._event(IncidentState.STARTED, o.ts, o, value))
            elif self._active is not None:
                self._active.peak = max(self._active.peak, self._peak)
                if o.ts - self._active.last_update >= UPDATE_INTERVAL_S:
                    self._active.last_update = o.ts
                    out.append(self._event(IncidentState.ONGOING, o.ts, o, value))
            return out
        if self._active is not None:
            assert self._last_true is not None
            if o.ts - self._last_true >= self.policy.clear_after_s:
                out.append(self._event(IncidentState.ENDED, o.ts, o, value, reason="condition_cleared"))
                self._end(o.ts)
        elif self._onset is not None and self._last_true is not None:
            if o.ts - self._last_true >= PENDING_GAP_TOLERANCE_S:
                self._onset = None
        return out

    def _end(self, ts: float) -> None:
        self._active = None
        self._onset = None
        self._cooldown_until = ts + self.policy.cooldown_s

    def close(self, ts: float, reason: str) -> list[RuleEvent]:
        """Ends an open incident (session end, camera off); forgets a pending one."""
        self._onset = None
        if self._active is None:
            return []
        ev = self._event(IncidentState.ENDED, ts, None, None, reason=reason)
        self._end(ts)
        return [ev]

    def _event(
        self, state: IncidentState, ts: float, o: Observation | None, value: float | None, reason: str | None = None
    ) -> RuleEvent:
        inc = self._active
        assert inc is not None
        end_ts = self._last_true if state is IncidentState.ENDED and self._last_true is not None else ts
        duration = max(0.0, end_ts - inc.onset_ts)
        evidence: dict[str, Any] = o.evidence() if o is not None else {}
        evidence.update(
            {
                self.measure_name: value,
                f"peak_{self.measure_name}": inc.peak,
                "threshold": self.threshold,
                "threshold_s": self.policy.trigger_after_s,
                "clear_after_s": self.policy.clear_after_s,
                "condition_since": inc.onset_ts,
                "duration_s": round(duration, 3),
                "first_frame_seq": inc.onset_seq,
                "trigger_frame_seq": inc.trigger_seq,
            }
        )
        if o is not None and o.signals is not None:
            evidence["face_scores"] = [round(f.score, 3) for f in o.signals.faces]
        if reason:
            evidence["end_reason"] = reason
        return RuleEvent(
            event_type=self.event_type,
            state=state,
            incident_id=inc.incident_id,
            ts=ts,
            severity=self._severity(inc.peak, duration),
            model=o.model if o is not None else "",
            evidence=evidence,
            observation=o,
        )

    # ---- persistence (RuleEngine.snapshot): what a restart needs to continue this rule's incident

    def snapshot(self) -> dict[str, Any] | None:
        d: dict[str, Any] = {}
        if self._active is not None:
            d["active"] = asdict(self._active)
        if self._onset is not None:
            d["onset"] = list(self._onset)
        for key, value in (("last_true", self._last_true), ("last_seen", self._last_seen)):
            if value is not None:
                d[key] = value
        if math.isfinite(self._cooldown_until):
            d["cooldown_until"] = self._cooldown_until
        if d:
            d["peak"] = self._peak
        return d or None

    def restore(self, d: dict[str, Any]) -> None:
        active = d.get("active")
        self._active = _Incident(**active) if active else None
        onset = d.get("onset")
        self._onset = (float(onset[0]), int(onset[1])) if onset else None
        self._last_true = d.get("last_true")
        self._last_seen = d.get("last_seen")
        self._peak = float(d.get("peak", 0.0))
        self._cooldown_until = float(d.get("cooldown_until", -math.inf))


class DistractionRule(DurationRule):
    """FREQUENT_DISTRACTION: more than N off-screen episodes within a sliding window."""

    def __init__(self, policy: RulePolicy, count: int, window_s: float) -> None:
        self.window_s = window_s
        self.episodes: deque[float] = deque()
        self._off: bool = False
        super().__init__(
            E.FREQUENT_DISTRACTION, self._cond, lambda o: float(len(self.episodes)), "off_screen_episodes",
            float(count), policy, base_severity=0.5, severity_per_unit=0.05,
        )  # fmt: skip
        self.count = count

    def _cond(self, o: Observation) -> bool | None:
        if o.gaze_off is None:
            return None
        if o.gaze_off and not self._off:
            self.episodes.append(o.ts)  # an episode starts when the gaze leaves the screen
        self._off = o.gaze_off
        while self.episodes and o.ts - self.episodes[0] > self.window_s:
            self.episodes.popleft()
        return len(self.episodes) > self.count

    def snapshot(self) -> dict[str, Any] | None:
        d = super().snapshot() or {}
        if self.episodes:
            d["episodes"] = list(self.episodes)
            d["off"] = self._off
        return d or None

    def restore(self, d: dict[str, Any]) -> None:
        super().restore(d)
        self.episodes = deque(float(x) for x in d.get("episodes", []))
        self._off = bool(d.get("off", False))


class ControlRule:
    """Incidents driven by track and participant state, not by frames (CAMERA_OFF & co.).

    The condition is set by control messages or by the no-frames watchdog; the incident starts
    after trigger_after_s (a grace period: a quick mute-unmute is not an incident).
    """

    def __init__(self, event_type: E, policy: RulePolicy, base_severity: float) -> None:
        self.event_type = event_type
        self.policy = policy
        self.base_severity = base_severity
        self.since: float | None = None
        self.reason = ""
        self.active: _Incident | None = None

    def set(self, on: bool, ts: float, reason: str) -> list[RuleEvent]:
        if on:
            if self.since is None:
                self.since, self.reason = ts, reason
            return self.tick(ts)
        self.since = None
        return self.close(ts, reason)

    def tick(self, ts: float) -> list[RuleEvent]:
        if self.since is None or self.active is not None or ts - self.since < self.policy.trigger_after_s:
            return []
        self.active = _Incident(str(uuid.uuid4()), self.since, -1, ts, -1, 0.0, ts)
        return [self._event(IncidentState.STARTED, ts, None)]

    def close(self, ts: float, reason: str) -> list[RuleEvent]:
        if self.active is None:
            return []
        ev = self._event(IncidentState.ENDED, ts, reason)
        self.active = None
        return [ev]

    def _event(self, state: IncidentState, ts: float, end_reason: str | None) -> RuleEvent:
        assert self.active is not None
        duration = max(0.0, ts - self.active.onset_ts)
        ev: dict[str, Any] = {
            "reason": self.reason,
            "condition_since": self.active.onset_ts,
            "duration_s": round(duration, 3),
            "threshold_s": self.policy.trigger_after_s,
        }
        if end_reason:
            ev["end_reason"] = end_reason
        sev = round(min(1.0, self.base_severity + min(0.3, duration / 600)), 3)
        return RuleEvent(self.event_type, state, self.active.incident_id, ts, sev, "session-state", ev)

    def snapshot(self) -> dict[str, Any] | None:
        if self.since is None and self.active is None:
            return None
        return {"since": self.since, "reason": self.reason, "active": asdict(self.active) if self.active else None}

    def restore(self, d: dict[str, Any]) -> None:
        self.since = d.get("since")
        self.reason = str(d.get("reason", ""))
        self.active = _Incident(**d["active"]) if d.get("active") else None


class RiskScore:
    """Session risk 0-100: each incident adds points (type weight x severity) that decay with a
    half-life of RISK_HALF_LIFE_S; open incidents keep adding while they last."""

    def __init__(self) -> None:
        self.contrib: dict[str, dict[str, Any]] = {}

    def on_event(self, ev: RuleEvent) -> None:
        w = RISK_WEIGHT.get(ev.event_type, 5.0)
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


class RuleEngine:
    """The rules of one session, built from its effective policy."""

    def __init__(self, policy: EffectivePolicy) -> None:
        self.policy = policy
        self.fusion = PresenceFusion(policy)
        self.risk = RiskScore()
        t = policy.thresholds
        r = policy.rules
        self.rules: list[DurationRule] = []
        self.controls: dict[str, ControlRule] = {}
        self.meta: DurationRule | None = None

        def add(event: E, cond: Condition, measure: Callable[[Observation], float | None], name: str,
                threshold: float | None, base: float, per_unit: float = 0.0) -> None:  # fmt: skip
            if r[event].enabled:
                self.rules.append(DurationRule(event, cond, measure, name, threshold, r[event], base, per_unit))

        def head(fn: Callable[[Any], bool]) -> Condition:
            # Relative to the calibrated baseline: nothing to say until calibration is done.
            return lambda o: None if o.head is None or o.calibrating else fn(o.head)

        add(
            E.FACE_NOT_FOUND,
            lambda o: not o.candidate_present,
            lambda o: float(o.persons_present),
            "persons_present",
            0.0,
            0.6,
        )
        add(
            E.FACE_NOT_VISIBLE,
            lambda o: o.candidate_present and not o.face_visible,
            lambda o: float(o.face_count),
            "face_count",
            0.0,
            0.4,
        )
        add(E.MULTIPLE_FACES, lambda o: o.face_count > 1, lambda o: float(o.face_count), "face_count", 1.0, 0.6, 0.05)
        add(
            E.MULTIPLE_PERSONS,
            lambda o: None if o.persons_detected is None else o.persons_present > 1,
            lambda o: float(o.persons_present),
            "persons_present",
            1.0,
            0.7,
            0.05,
        )
        add(
            E.PRESENCE_LOSS,
            lambda o: None if o.face_area_ratio is None or o.calibrating else o.face_area_ratio < t.presence_loss_ratio,
            lambda o: o.face_area_ratio,
            "face_area_ratio",
            t.presence_loss_ratio,
            0.4,
        )
        gaze_off: Condition = lambda o: None if o.calibrating else o.gaze_off  # noqa: E731
        gaze_dev = lambda o: None if o.gaze is None else max(abs(o.gaze.yaw), abs(o.gaze.pitch))  # noqa: E731
        add(E.GAZE_OFF_SCREEN, gaze_off, gaze_dev, "gaze_deviation_deg", t.gaze_yaw_deg, 0.4)
        add(E.PROLONGED_LOOK_AWAY, gaze_off, gaze_dev, "gaze_deviation_deg", t.gaze_yaw_deg, 0.6)
        add(
            E.HEAD_DOWN,
            head(lambda h: h.pitch < t.head_down_pitch_deg),
            lambda o: None if o.head is None else o.head.pitch,
            "head_pitch_deg",
            t.head_down_pitch_deg,
            0.4,
        )
        add(
            E.HEAD_TURNED_AWAY,
            head(lambda h: abs(h.yaw) > t.head_turn_yaw_deg),
            lambda o: None if o.head is None else abs(o.head.yaw),
            "head_yaw_deg",
            t.head_turn_yaw_deg,
            0.5,
            0.005,
        )
        add(
            E.SUSPICIOUS_MOVEMENT,
            lambda o: None if o.head_speed is None else o.head_speed > t.movement_deg_s,
            lambda o: o.head_speed,
            "head_speed_deg_s",
            t.movement_deg_s,
            0.3,
            0.002,
        )
        add(
            E.PHONE_DETECTED,
            lambda o: None if o.phone_score is None else o.phone_score >= t.phone_score,
            lambda o: o.phone_score,
            "phone_score",
            t.phone_score,
            0.7,
            0.5,
        )
        add(
            E.LEFT_FRAME,
            # Shoulders gone while the candidate is still there (leaning out, standing up); a candidate
            # gone altogether is FACE_NOT_FOUND, not a second alert for the same thing.
            lambda o: None if o.shoulders_visible is None else o.candidate_present and not o.shoulders_visible,
            lambda o: None,
            "shoulders_visible",
            None,
            0.5,
        )
        add(
            E.HAND_NEAR_EAR,
            lambda o: o.hand_near_ear,
            lambda o: o.hand_ear_ratio,
            "hand_ear_ratio",
            t.hand_ear_ratio,
            0.5,
        )
        if r[E.FREQUENT_DISTRACTION].enabled:
            self.rules.append(DistractionRule(r[E.FREQUENT_DISTRACTION], t.distraction_count, t.distraction_window_s))
        for event, base in ((E.CAMERA_OFF, 0.5), (E.MICROPHONE_OFF, 0.4), (E.CANDIDATE_DISCONNECTED, 0.3)):
            if r[event].enabled:
                self.controls[event] = ControlRule(event, r[event], base)
        if r[E.HIGH_CONFIDENCE_CHEATING].enabled:
            self.meta = DurationRule(
                E.HIGH_CONFIDENCE_CHEATING, self._cheating, lambda o: float(len(self._strong_open())),
                "strong_incidents", 2.0, r[E.HIGH_CONFIDENCE_CHEATING], 0.85, 0.05,
            )  # fmt: skip
        self._last_ts: float | None = None

    @property
    def last_ts(self) -> float | None:
        """Media time of the last observed frame."""
        return self._last_ts

    def _strong_open(self) -> list[str]:
        return sorted({str(x.event_type) for x in self.rules if x.active is not None and x.event_type in STRONG})

    def _cheating(self, o: Observation) -> bool:
        # The seed's fusion rule: two different kinds of strong evidence at once, or a high session risk.
        groups = {STRONG_GROUP[e] for e in self._strong_open()}
        return len(groups) >= 2 or self.risk.score(o.ts) >= 85

    def observe(self, s: FrameSignals) -> list[RuleEvent]:
        o = self.fusion.observe(s)
        self._last_ts = o.ts
        out: list[RuleEvent] = []
        for rule in self.rules:
            out.extend(rule.observe(o))
        for ev in out:
            self.risk.on_event(ev)
        if self.meta is not None:
            meta = self.meta.observe(o)
            if meta and meta[0].state is IncidentState.STARTED:
                meta[0].evidence["strong_incidents"] = self._strong_open()
                meta[0].evidence["risk_score"] = self.risk.score(o.ts)
            for ev in meta:
                self.risk.on_event(ev)
            out.extend(meta)
        return out

    def control(self, event: str, on: bool, ts: float, reason: str) -> list[RuleEvent]:
        rule = self.controls.get(event)
        out = rule.set(on, ts, reason) if rule else []
        for ev in out:
            self.risk.on_event(ev)
        return out

    def tick(self, ts: float) -> list[RuleEvent]:
        """Advances the control rules' grace periods (called by the session's watchdog)."""
        out: list[RuleEvent] = []
        for rule in self.controls.values():
            out.extend(rule.tick(ts))
        for ev in out:
            self.risk.on_event(ev)
        return out

    def reset_frames(self, ts: float, reason: str) -> list[RuleEvent]:
        """No video evidence from now on (camera off): frame-driven incidents end, pending ones start over."""
        out: list[RuleEvent] = []
        for rule in [*self.rules, *([self.meta] if self.meta else [])]:
            out.extend(rule.close(ts, reason))
        for ev in out:
            self.risk.on_event(ev)
        return out

    def close_all(self, ts: float, reason: str) -> list[RuleEvent]:
        out = self.reset_frames(ts, reason)
        for rule in self.controls.values():
            ended = rule.close(ts, reason)
            for ev in ended:
                self.risk.on_event(ev)
            out.extend(ended)
        return out

    def open_incidents(self) -> list[dict[str, Any]]:
        frame_rules: list[Any] = [*self.rules, *([self.meta] if self.meta else [])]
        out = [
            {"event_type": str(x.event_type), "incident_id": x.active.incident_id, "since": x.active.onset_ts}
            for x in [*frame_rules, *self.controls.values()]
            if x.active is not None
        ]
        return out

    # ---- persistence: a restarted analyzer continues the session where it was

    SNAPSHOT_VERSION = 1

    def snapshot(self) -> dict[str, Any]:
        """JSON-safe state that a restart needs: open and pending incidents, cooldowns, calibration, risk."""
        frame_rules = [*self.rules, *([self.meta] if self.meta else [])]
        return {
            "v": self.SNAPSHOT_VERSION,
            "rules": {str(r.event_type): snap for r in frame_rules if (snap := r.snapshot()) is not None},
            "controls": {name: snap for name, r in self.controls.items() if (snap := r.snapshot()) is not None},
            "calibration": self.fusion.calibration.snapshot(),
            "risk": self.risk.snapshot(),
            "last_ts": self._last_ts,
        }

    def restore(self, d: dict[str, Any]) -> None:
        """The inverse of snapshot(); state of rules the policy no longer has is ignored."""
        if d.get("v") != self.SNAPSHOT_VERSION:
            return
        frame_rules = {str(r.event_type): r for r in [*self.rules, *([self.meta] if self.meta else [])]}
        for name, snap in d.get("rules", {}).items():
            if name in frame_rules:
                frame_rules[name].restore(snap)
        for name, snap in d.get("controls", {}).items():
            if name in self.controls:
                self.controls[name].restore(snap)
        if d.get("calibration"):
            self.fusion.calibration.restore(d["calibration"])
        self.risk.restore(d.get("risk", {}))
        self._last_ts = d.get("last_ts")

    def risk_summary(self, ts: float | None = None) -> dict[str, Any]:
        t = ts if ts is not None else (self._last_ts or 0.0)
        out = self.risk.explain(t)
        out["calibration"] = self.fusion.baseline.to_dict()
        out["calibrating"] = not self.fusion.calibration.done
        return out
