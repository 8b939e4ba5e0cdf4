"""Alerts out of one live session: rate limit, build, append to the outbox with the session's state in the
same transaction, then fan out to subscribers (and feedback to the candidate). Alerts leave in the order
the rules raised them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from livekit_proctor import observability
from livekit_proctor.analyzer.alerting import AlertBuilder, attach_thumbnail, rate_limit
from livekit_proctor.analyzer.evidence import FeedbackLimiter
from livekit_proctor.analyzer.metrics import Metrics
from livekit_proctor.analyzer.rules.engine import RuleEvent
from livekit_proctor.analyzer.rules.limits import IncidentLimiter
from livekit_proctor.analyzer.sessions.counters import Counters
from livekit_proctor.analyzer.sessions.fanout import Fanout
from livekit_proctor.contracts.alerts import Alert, IncidentState
from livekit_proctor.contracts.outbox import AlertSink, AlsoWrite
from livekit_proctor.contracts.wire import AlertMessage, FeedbackMessage

log = logging.getLogger(__package__)  # livekit_proctor.analyzer.sessions, as docs/operations.md shows


class AlertEmitter:
    def __init__(
        self,
        builder: AlertBuilder,
        limiter: IncidentLimiter,
        sink: AlertSink,
        metrics: Metrics,
        counters: Counters,
        fanout: Fanout,
        saver: Callable[[bool], AlsoWrite],  # the session's state (with its rule state when True)
    ) -> None:
        self.builder = builder
        self.limiter = limiter
        self.sink = sink
        self.metrics = metrics
        self.counters = counters
        self.fanout = fanout
        self.saver = saver
        self.feedback = FeedbackLimiter()
        self.lock = asyncio.Lock()  # one batch at a time: alerts leave in the order the rules raised them

    async def emit(self, events: list[RuleEvent]) -> None:
        if not events:
            return
        sid = self.builder.exam_session_id
        async with self.lock:
            passed, suppressed = rate_limit(self.limiter, events, time.monotonic())
            for ev in suppressed:
                self.counters.incidents_suppressed[ev.event_type] += 1
                self.metrics.incidents_suppressed.labels(ev.event_type).inc()
                if self.counters.incidents_suppressed[ev.event_type] == 1:
                    log.warning("session %s: %s incidents over the rate limit are suppressed", sid, ev.event_type)
            alerts: list[Alert] = []
            for ev in passed:
                if ev.state is IncidentState.STARTED:
                    await asyncio.to_thread(attach_thumbnail, ev)
                    self.counters.alerts_by_type[ev.event_type] += 1
                    self._feedback(ev)
                alerts.append(self.builder.build(ev))
                self.metrics.alerts.labels(ev.event_type, str(ev.state)).inc()
            # Open incidents changed (or one was suppressed): their state commits with the alerts.
            rules_changed = any(ev.state is not IncidentState.ONGOING for ev in events)
            try:
                with observability.alerts_outbox_span(alerts):  # also sets each alert's metadata.traceparent
                    await self.sink.publish_many(alerts, self.saver(rules_changed))
            except Exception:
                log.exception("session %s: outbox append failed for %s", sid, [a.event_id for a in alerts])
                self.metrics.outbox_errors.inc()
            for alert in alerts:
                self.fanout.broadcast(AlertMessage(alert=alert))

    def _feedback(self, ev: RuleEvent) -> None:
        """A short message to the candidate (media connection only), rate-limited per kind."""
        text = ev.feedback
        if text and self.feedback.allow(ev.event_type, time.time()):
            self.counters.feedback_sent += 1
            self.fanout.broadcast(
                FeedbackMessage(code=ev.event_type, message=text, incident_id=ev.incident_id, ts=time.time()),
                media_only=True,
            )
