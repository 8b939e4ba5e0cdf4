"""The kinds of rules: how a condition over observations becomes an incident.

An incident is one alert when it starts ("started"), an update every UPDATE_INTERVAL_S while it lasts
("ongoing") and one alert when it ends ("ended", with its duration). Hysteresis (clear_after_s) and a
cooldown keep a flickering signal from opening and closing incidents. All times are media time
(capture timestamps), so a recording raises the same alerts at the same offsets as a live stream.

Which rules a session has, with which thresholds and texts, is the catalog's business (catalog.py).
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from livekit_proctor.analyzer.fusion import Observation
from livekit_proctor.contracts.alerts import EventType as E
from livekit_proctor.contracts.alerts import IncidentState
from livekit_proctor.contracts.api import RulePolicy

# A frame gap longer than this means we saw nothing in between: a pending
# (not yet raised) condition starts again instead of counting the gap.
MAX_EVIDENCE_GAP_S = 2.0
# A pending condition survives interruptions shorter than this (missed detections).
PENDING_GAP_TOLERANCE_S = 0.5
UPDATE_INTERVAL_S = 30.0

# What the candidate is told when an incident starts (proctor alerts stay separate).


class Observed(Protocol):
    """What a duration rule observes: a video Observation (fusion.py), or an audio one (rules/audio.py)."""

    @property
    def seq(self) -> int: ...
    @property
    def ts(self) -> float: ...
    @property
    def model(self) -> str: ...
    @property
    def preview(self) -> np.ndarray | None: ...
    def evidence(self) -> dict[str, Any]: ...


Obs = TypeVar("Obs", bound=Observed)


@dataclass(slots=True)
class RuleEvent:
    """What a rule reports; the session turns it into a canonical Alert."""

    event_type: str
    state: IncidentState
    incident_id: str
    ts: float  # media time the event refers to
    severity: float
    model: str
    evidence: dict[str, Any]
    observation: Observed | None = field(default=None, repr=False)
    # What the candidate is told (the catalog's feedback text; only on "started"); set by the engine.
    feedback: str | None = None

    @property
    def preview(self) -> np.ndarray | None:
        """The downscaled frame the event was raised on, for the evidence thumbnail."""
        return self.observation.preview if self.observation is not None else None


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
class DurationRule(Generic[Obs]):
    """Raises an incident when `condition` has held for more than trigger_after_s.

    condition returns None when the frame says nothing about it (no mesh, a blink, no detector):
    such frames neither extend nor break the condition. The incident ends once the condition has
    been false for clear_after_s; a new one cannot start until cooldown_s after that.
    """

    event_type: str
    condition: Callable[[Obs], bool | None]
    measure: Callable[[Obs], float | None]  # the value that raised it, for evidence and severity
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

    def observe(self, o: Obs) -> list[RuleEvent]:
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
        self, state: IncidentState, ts: float, o: Obs | None, value: float | None, reason: str | None = None
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
        if isinstance(o, Observation):
            evidence["face_scores"] = [round(x, 3) for x in o.face_scores]
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


class DistractionRule(DurationRule[Observation]):
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

    def __init__(self, event_type: str, policy: RulePolicy, base_severity: float) -> None:
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
