"""Rate limit on incidents, per session and event type (docs/rules.md, "Rate limit").

A client can make some conditions come and go at will (leave and rejoin, mute and unmute): without a limit
one client could push thousands of incidents into the outbox, the dispatcher and the proctors' screens.
A token bucket per event type lets `burst` incidents through, then one more per `refill_s`. An incident over
the limit is suppressed whole: neither its start nor its updates nor its end leave the session, so every
reported incident still has its end. The next reported incident of that type says how many were suppressed
before it (evidence `incidents_suppressed_before`); the session counts them (`incidents_suppressed`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from livekit_proctor.analyzer.rules.engine import RuleEvent
from livekit_proctor.contracts.alerts import IncidentState


class IncidentLimiter:
    def __init__(self, burst: int, refill_s: float) -> None:
        self.burst = burst  # 0: no limit
        self.refill_s = refill_s
        self._tokens: dict[str, float] = {}
        self._at: dict[str, float] = {}
        self._muted: set[str] = set()  # incident ids being suppressed until their end
        self._since_reported: Counter[str] = Counter()

    def _take(self, event_type: str, now: float) -> bool:
        if self.burst <= 0:
            return True
        tokens = self._tokens.get(event_type, float(self.burst))
        last = self._at.get(event_type, now)
        tokens = min(float(self.burst), tokens + max(0.0, now - last) / self.refill_s)
        self._at[event_type] = now
        if tokens < 1.0:
            self._tokens[event_type] = tokens
            return False
        self._tokens[event_type] = tokens - 1.0
        return True

    def filter(self, events: list[RuleEvent], now: float) -> list[RuleEvent]:
        """The events that may leave; `now` is the limiter's clock (server time live, media time offline)."""
        out: list[RuleEvent] = []
        for ev in events:
            kind = str(ev.event_type)
            if ev.state is IncidentState.STARTED:
                if not self._take(kind, now):
                    self._muted.add(ev.incident_id)
                    self._since_reported[kind] += 1
                    continue
                if self._since_reported[kind]:
                    ev.evidence["incidents_suppressed_before"] = self._since_reported.pop(kind)
            elif ev.incident_id in self._muted:
                if ev.state is IncidentState.ENDED:
                    self._muted.discard(ev.incident_id)
                continue
            out.append(ev)
        return out

    def snapshot(self) -> dict[str, Any]:
        return {"muted": sorted(self._muted), "since_reported": dict(self._since_reported)}

    def restore(self, d: dict[str, Any]) -> None:
        # The buckets start full again after a restart; what matters is that a muted incident stays muted.
        self._muted = {str(x) for x in d.get("muted", [])}
        self._since_reported = Counter({str(k): int(v) for k, v in d.get("since_reported", {}).items()})
