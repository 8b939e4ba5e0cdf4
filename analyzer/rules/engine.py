"""Temporal rules: turn per-frame signals into incidents (one alert at start, one at end).

All times are media time (capture timestamps from the client), so a recording
analysed offline raises the same alerts at the same offsets as a live stream.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from analyzer.signals import FrameSignals
from proctor.contracts.alerts import EventType, IncidentState
from proctor.contracts.api import EffectivePolicy

# A frame gap longer than this means we saw nothing in between: a pending
# (not yet raised) condition starts again instead of counting the gap.
MAX_EVIDENCE_GAP_S = 2.0
# A pending condition survives interruptions shorter than this (missed detections).
PENDING_GAP_TOLERANCE_S = 0.5


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


@dataclass(slots=True)
class _Incident:
    incident_id: str
    onset_ts: float
    onset_seq: int
    started_ts: float
    trigger_seq: int
    peak: float


@dataclass
class DurationRule:
    """Raises an incident when `condition` has held for more than trigger_after_s.

    The incident ends once the condition has been absent for clear_after_s
    (hysteresis: a flickering detector does not open and close incidents).
    """

    event_type: str
    condition: Callable[[FrameSignals], bool]
    measure: Callable[[FrameSignals], float]  # value recorded in evidence (face count, ...)
    measure_name: str
    trigger_after_s: float
    clear_after_s: float
    base_severity: float
    severity_per_unit: float = 0.0  # added per unit of the measure above its triggering value
    _onset: tuple[float, int] | None = field(default=None, init=False)
    _last_true: float | None = field(default=None, init=False)
    _last_seen: float | None = field(default=None, init=False)
    _peak: float = field(default=0.0, init=False)
    _active: _Incident | None = field(default=None, init=False)

    @property
    def active(self) -> _Incident | None:
        return self._active

    def _severity(self, peak: float, duration: float) -> float:
        # Longer and stronger incidents weigh more; capped to the 0-1 schema range.
        dur_term = min(0.2, 0.2 * duration / (10 * self.trigger_after_s))
        return round(min(1.0, self.base_severity + self.severity_per_unit * peak + dur_term), 3)

    def observe(self, s: FrameSignals) -> list[RuleEvent]:
        out: list[RuleEvent] = []
        if self._last_seen is not None and s.ts - self._last_seen > MAX_EVIDENCE_GAP_S and self._active is None:
            self._onset = None
        if self._last_seen is not None and s.ts < self._last_seen:
            if self._last_seen - s.ts <= 1.0:
                return out  # a late sample: ignore rather than corrupt durations
            # The client's clock stepped back: durations across the step mean nothing, start over.
            out.extend(self.close(s.ts, "clock_reset"))
            self._last_true = None
        self._last_seen = s.ts
        hit = self.condition(s)
        value = self.measure(s)
        if hit:
            if self._onset is None:
                self._onset = (s.ts, s.seq)
                self._peak = value
            self._peak = max(self._peak, value)
            self._last_true = s.ts
            if self._active is None and s.ts - self._onset[0] > self.trigger_after_s:
                self._active = _Incident(str(uuid.uuid4()), self._onset[0], self._onset[1], s.ts, s.seq, self._peak)
                out.append(self._event(IncidentState.STARTED, s.ts, s, value))
            elif self._active is not None:
                self._active.peak = max(self._active.peak, value)
            return out
        # condition false
        if self._active is not None:
            assert self._last_true is not None
            if s.ts - self._last_true >= self.clear_after_s:
                out.append(self._event(IncidentState.ENDED, s.ts, s, value, reason="condition_cleared"))
                self._active = None
                self._onset = None
        elif self._onset is not None and self._last_true is not None:
            if s.ts - self._last_true >= PENDING_GAP_TOLERANCE_S:
                self._onset = None
        return out

    def close(self, ts: float, reason: str) -> list[RuleEvent]:
        """Ends an open incident (session end, camera off); forgets a pending one."""
        self._onset = None
        if self._active is None:
            return []
        ev = self._event(IncidentState.ENDED, ts, None, None, reason=reason)
        self._active = None
        return [ev]

    def _event(
        self, state: IncidentState, ts: float, s: FrameSignals | None, value: float | None, reason: str | None = None
    ) -> RuleEvent:
        inc = self._active
        assert inc is not None
        end_ts = self._last_true if state is IncidentState.ENDED and self._last_true is not None else ts
        duration = max(0.0, end_ts - inc.onset_ts)
        evidence: dict[str, Any] = {
            self.measure_name: value,
            f"peak_{self.measure_name}": inc.peak,
            "threshold_s": self.trigger_after_s,
            "clear_after_s": self.clear_after_s,
            "condition_since": inc.onset_ts,
            "duration_s": round(duration, 3),
            "first_frame_seq": inc.onset_seq,
            "trigger_frame_seq": inc.trigger_seq,
        }
        if s is not None:
            evidence["frame_seq"] = s.seq
            evidence["face_scores"] = [round(f.score, 3) for f in s.faces]
        if reason:
            evidence["end_reason"] = reason
        return RuleEvent(
            event_type=self.event_type,
            state=state,
            incident_id=inc.incident_id,
            ts=ts,
            severity=self._severity(inc.peak, duration),
            model=s.model if s is not None else "",
            evidence=evidence,
        )


class RuleEngine:
    """The rules of one session, built from its effective policy."""

    def __init__(self, policy: EffectivePolicy) -> None:
        self.rules: list[DurationRule] = []
        r = policy.rules
        nf = r.get(EventType.FACE_NOT_FOUND)
        if nf and nf.enabled:
            self.rules.append(
                DurationRule(
                    EventType.FACE_NOT_FOUND,
                    condition=lambda s: s.face_count == 0,
                    measure=lambda s: float(s.face_count),
                    measure_name="face_count",
                    trigger_after_s=nf.trigger_after_s,
                    clear_after_s=nf.clear_after_s,
                    base_severity=0.6,
                )
            )
        mf = r.get(EventType.MULTIPLE_FACES)
        if mf and mf.enabled:
            self.rules.append(
                DurationRule(
                    EventType.MULTIPLE_FACES,
                    condition=lambda s: s.face_count > 1,
                    measure=lambda s: float(s.face_count),
                    measure_name="face_count",
                    trigger_after_s=mf.trigger_after_s,
                    clear_after_s=mf.clear_after_s,
                    base_severity=0.6,
                    severity_per_unit=0.05,
                )
            )

    def observe(self, s: FrameSignals) -> list[RuleEvent]:
        out: list[RuleEvent] = []
        for rule in self.rules:
            out.extend(rule.observe(s))
        return out

    def close_all(self, ts: float, reason: str) -> list[RuleEvent]:
        out: list[RuleEvent] = []
        for rule in self.rules:
            out.extend(rule.close(ts, reason))
        return out

    def open_incidents(self) -> list[dict[str, Any]]:
        return [
            {"event_type": r.event_type, "incident_id": r.active.incident_id, "since": r.active.onset_ts}
            for r in self.rules
            if r.active is not None
        ]
