"""Sessions: their durable row, their live runtime (media queues, rules) and the manager.

A session is created over REST, streamed to over one WebSocket (a reconnect
replaces the previous connection and keeps the rule state), and ended over
REST or by expiry. Counters and rule state (open incidents, calibration,
risk) are saved with every alert and every state_flush_s; after an analyzer
restart every active session is rebuilt from its row and continues.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker

from livekit_proctor import observability
from livekit_proctor.analyzer.evidence import FeedbackLimiter, thumbnail_b64
from livekit_proctor.analyzer.metrics import Metrics
from livekit_proctor.analyzer.pipeline import FrameDecodeError, InferencePool, ModelClock, ModelSet, Sampler
from livekit_proctor.analyzer.rules.engine import RuleEngine, RuleEvent
from livekit_proctor.analyzer.rules.limits import IncidentLimiter
from livekit_proctor.analyzer.rules.policy import effective_policy
from livekit_proctor.contracts.alerts import Alert, AlertMetadata, EventType, IncidentState, room_keys, ts_to_iso
from livekit_proctor.contracts.api import EffectivePolicy, SessionCounters, SessionStartRequest, SessionState
from livekit_proctor.contracts.wire import AUDIO_SAMPLE_RATE, AUDIO_SAMPLE_WIDTH, CloseCode, ControlEvent, MediaMessage
from livekit_proctor.db import AuditRow, SessionRow, utcnow
from livekit_proctor.dispatcher import retention
from livekit_proctor.dispatcher.outbox import AlertSink
from livekit_proctor.observability import session_context

log = logging.getLogger(__name__)


class SessionConflict(Exception):
    pass


class SessionNotFound(Exception):
    pass


class SessionClosed(Exception):
    pass


def _aware(dt: datetime) -> datetime:
    # SQLite drops tzinfo; everything we store is UTC.
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


@dataclass
class Counters:
    frames_received: int = 0
    frames_analysed: int = 0
    frames_dropped: int = 0  # replaced by a newer frame before analysis (latest-wins)
    frames_sampled_out: int = 0  # above the session's analysis rate
    frames_rejected: int = 0  # oversize, not JPEG, undecodable
    audio_chunks: int = 0
    audio_bytes: int = 0
    audio_rejected: int = 0
    messages_malformed: int = 0
    feedback_sent: int = 0
    worker_errors: int = 0  # exceptions in this session's workers (each logged; the worker restarted)
    alerts_by_type: Counter[str] = field(default_factory=Counter)
    incidents_suppressed: Counter[str] = field(default_factory=Counter)  # over the rate limit (rules/limits.py)

    @property
    def audio_seconds(self) -> float:
        return round(self.audio_bytes / (AUDIO_SAMPLE_RATE * AUDIO_SAMPLE_WIDTH), 3)

    def public(self) -> SessionCounters:
        return SessionCounters(
            frames_received=self.frames_received,
            frames_analysed=self.frames_analysed,
            frames_dropped=self.frames_dropped,
            frames_sampled_out=self.frames_sampled_out,
            frames_rejected=self.frames_rejected,
            audio_chunks=self.audio_chunks,
            audio_seconds=self.audio_seconds,
            audio_rejected=self.audio_rejected,
            messages_malformed=self.messages_malformed,
            feedback_sent=self.feedback_sent,
            worker_errors=self.worker_errors,
            alerts_by_type=dict(self.alerts_by_type),
            incidents_suppressed=dict(self.incidents_suppressed),
        )

    def to_json(self) -> dict[str, Any]:
        d = self.public().model_dump()
        d["audio_bytes"] = self.audio_bytes  # exact; audio_seconds is rounded
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Counters:
        c = cls()
        for k in (
            "frames_received",
            "frames_analysed",
            "frames_dropped",
            "frames_rejected",
            "frames_sampled_out",
            "audio_chunks",
            "audio_rejected",
            "messages_malformed",
            "feedback_sent",
            "worker_errors",
        ):
            setattr(c, k, int(d.get(k, 0)))
        c.audio_bytes = int(
            d.get("audio_bytes", float(d.get("audio_seconds", 0)) * AUDIO_SAMPLE_RATE * AUDIO_SAMPLE_WIDTH)
        )
        c.alerts_by_type = Counter(d.get("alerts_by_type", {}))
        c.incidents_suppressed = Counter(d.get("incidents_suppressed", {}))
        return c


class Subscriber:
    """A bounded outgoing queue of JSON messages (one per WebSocket that listens)."""

    def __init__(self, maxsize: int, media: bool = False) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize)
        self.overflowed = False
        self.on_overflow: Callable[[], None] | None = None
        self.media = media  # the media stream connection also gets per-frame errors and flow hints

    def offer(self, msg: dict[str, Any], droppable: bool = False) -> None:
        try:
            self.queue.put_nowait(msg)
        except asyncio.QueueFull:
            if not droppable and not self.overflowed:
                # Alerts stay in the outbox; a client that does not read is cut off, not buffered forever.
                self.overflowed = True
                if self.on_overflow is not None:
                    self.on_overflow()


class LiveSession:
    """Runtime state of one active session."""

    def __init__(self, row: SessionRow, manager: SessionManager) -> None:
        self.id = row.id
        self.sitting = row.sitting or ""
        self.candidate_id = row.candidate_id
        self.exam_id = row.exam_id
        self.frontend_instance_id = row.frontend_instance_id
        self.metadata = dict(row.metadata_ or {})
        self.created_at = _aware(row.created_at)
        self.expires_at = _aware(row.expires_at)
        self.policy = EffectivePolicy.model_validate(row.policy)
        self.counters = Counters.from_json(row.counters or {})
        self.last_verification_at = row.last_verification_at
        self.m = manager
        settings = manager.settings
        self.engine = RuleEngine(self.policy)
        self.limiter = IncidentLimiter(settings.incident_burst, settings.incident_refill_s)
        self.last_frame_at: float | None = None  # wall time of the last frame received
        self.restored = self._restore(row.rule_state or {})
        self.sampler = Sampler(self.policy.video_fps)
        self.state = "active"
        self.subscribers: set[Subscriber] = set()
        self.connection: Any = None  # the media WebSocket currently feeding this session
        self.last_media_ts: float | None = None
        # latest-wins video slot: (message, arrival perf_counter, its number among frames offered)
        self._frame: tuple[MediaMessage, float, int] | None = None
        self._frame_ready = asyncio.Event()
        # lossless audio queue, bounded in bytes
        self.audio_max_bytes = int(settings.audio_queue_seconds * AUDIO_SAMPLE_RATE * AUDIO_SAMPLE_WIDTH)
        self._audio: deque[MediaMessage] = deque()
        self._audio_bytes = 0
        self._audio_space = asyncio.Condition()
        self._audio_ready = asyncio.Event()
        self.audio_paused_hint = False
        # Progress of what came in, for the ping barrier (settled()).
        self._video_in = self._video_done = 0
        self._audio_in = self._audio_done = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self.track_state: dict[str, str] = {}
        self._bg: set[asyncio.Task[Any]] = set()
        self._emit_lock = asyncio.Lock()  # alerts leave in the order the rules raised them
        self.clock = ModelClock()
        self.feedback = FeedbackLimiter()
        # Each worker logs with this session's id (its own context: a span current in one stays there).
        self._tasks = [
            asyncio.create_task(self._supervise(name, fn), name=f"{name}:{self.id}", context=session_context(self.id))
            for name, fn in (("video", self._video_worker), ("audio", self._audio_worker), ("watchdog", self._watchdog))
        ]

    # ---- state that survives a restart (SessionRow.rule_state; docs/operations.md "Restarts")

    def state_json(self) -> dict[str, Any]:
        return {
            "engine": self.engine.snapshot(),
            "limiter": self.limiter.snapshot(),
            "open": self.engine.open_incidents(),
            "last_frame_at": self.last_frame_at,
        }

    def _restore(self, d: dict[str, Any]) -> bool:
        if not d:
            return False
        try:
            self.engine.restore(d.get("engine") or {})
            self.limiter.restore(d.get("limiter") or {})
        except Exception:  # a corrupt or incompatible row: start the rules afresh rather than fail the session
            log.exception("session %s: saved rule state unusable; starting it afresh", self.id)
            self.engine = RuleEngine(self.policy)
            self.limiter = IncidentLimiter(self.m.settings.incident_burst, self.m.settings.incident_refill_s)
            return False
        if d.get("last_frame_at") is not None:
            # Frames had been coming: they are due again now, or CAMERA_OFF follows (the outage is not counted).
            self.last_frame_at = time.time()
        return bool(d.get("open"))

    def writer(self, with_rules: bool = True) -> Callable[[OrmSession], None]:
        """Database work that saves this session's counters (and rule state) in the caller's transaction."""
        counters = self.counters.to_json()
        rules = self.state_json() if with_rules else None
        sid, sitting = self.id, self.sitting

        def write(db: OrmSession) -> None:
            row = db.get(SessionRow, sid)
            if row is None or row.state != "active" or (row.sitting or "") != sitting:
                return  # ended meanwhile, or a later sitting: nothing of this one to save
            row.counters = counters
            if rules is not None:
                row.rule_state = rules

        return write

    # ---- ingest (called by the WebSocket handler on the event loop)

    def offer_frame(self, msg: MediaMessage) -> None:
        self.counters.frames_received += 1
        self.m.metrics.frames.labels("received").inc()
        self.last_media_ts = msg.capture_ts
        now = time.time()
        if self.last_frame_at is None or now - self.last_frame_at > 1.0:
            ended = self.engine.control(EventType.CAMERA_OFF, False, now, "frames_resumed")
            if ended:
                self._spawn(self.emit(ended))
        self.last_frame_at = now
        if not self.sampler.due(msg.capture_ts):
            self.counters.frames_sampled_out += 1
            self.m.metrics.frames.labels("sampled_out").inc()
            return
        if self._frame is not None:
            self.counters.frames_dropped += 1
            self.m.metrics.frames.labels("dropped").inc()
        self._video_in += 1
        self._frame = (msg, time.perf_counter(), self._video_in)
        self._frame_ready.set()

    def reject_frame(self) -> None:
        self.counters.frames_rejected += 1
        self.m.metrics.frames.labels("rejected").inc()

    def reject_audio(self) -> None:
        self.counters.audio_rejected += 1
        self.m.metrics.audio_chunks.labels("rejected").inc()

    async def offer_audio(self, msg: MediaMessage) -> None:
        """Queues audio without loss; waits (TCP backpressure) when the bound is reached."""
        n = len(msg.payload)
        async with self._audio_space:
            await self._audio_space.wait_for(lambda: self._audio_bytes + n <= self.audio_max_bytes or not self._audio)
            self._audio.append(msg)
            self._audio_bytes += n
            self._audio_in += 1
        self.counters.audio_chunks += 1
        self.m.metrics.audio_chunks.labels("received").inc()
        self._audio_ready.set()
        self._update_audio_hint()

    def audio_fill(self) -> float:
        return self._audio_bytes / self.audio_max_bytes if self.audio_max_bytes else 0.0

    def _update_audio_hint(self) -> None:
        fill = self.audio_fill()
        if not self.audio_paused_hint and fill >= 0.75:
            self.audio_paused_hint = True
            self.broadcast({"type": "flow", "audio": "slow_down", "audio_queue_fill": round(fill, 3)})
        elif self.audio_paused_hint and fill <= 0.25:
            self.audio_paused_hint = False
            self.broadcast({"type": "flow", "audio": "resume", "audio_queue_fill": round(fill, 3)})

    def on_control(self, event: str, track: str | None, ts: float) -> None:
        """Track and participant state from the client: CAMERA_OFF, MICROPHONE_OFF, CANDIDATE_DISCONNECTED."""
        self.track_state[track or "participant"] = event
        now = time.time()  # state rules run on wall time: they are about the connection, not the pictures
        reason = f"{track or 'participant'}:{event}"
        off = event in (ControlEvent.TRACK_MUTED, ControlEvent.TRACK_ENDED)
        events: list[RuleEvent] = []
        if track == "camera":
            if off:
                # Without video there is no evidence: open frame incidents end, pending ones start over.
                events += self.engine.reset_frames(ts, reason)
            events += self.engine.control(EventType.CAMERA_OFF, off, now, reason)
        elif track == "microphone":
            events += self.engine.control(EventType.MICROPHONE_OFF, off, now, reason)
        elif event == ControlEvent.PARTICIPANT_LEFT:
            events += self.engine.reset_frames(ts, reason)
            events += self.engine.control(EventType.CANDIDATE_DISCONNECTED, True, now, reason)
        if events:
            self._spawn(self.emit(events))

    def on_connect(self) -> None:
        """A media connection (re)opened: the candidate is back."""
        events = self.engine.control(EventType.CANDIDATE_DISCONNECTED, False, time.time(), "reconnected")
        if events:
            self._spawn(self.emit(events))

    # ---- the ping barrier

    async def settled(self) -> None:
        """Returns once every frame and audio chunk received before the call has been processed (analysed,
        replaced by a newer frame, or failed) and the alerts they raised have been sent to subscribers."""
        bg = list(self._bg)
        if self._video_done < self._video_in or self._audio_done < self._audio_in:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append((self._video_in, self._audio_in, fut))
            await fut
        if bg:
            await asyncio.wait(bg)

    def _progress(self) -> None:
        if not self._waiters:
            return
        keep = []
        for v, a, fut in self._waiters:
            if fut.done():
                continue
            if self.state != "active" or (self._video_done >= v and self._audio_done >= a):
                fut.set_result(None)
            else:
                keep.append((v, a, fut))
        self._waiters = keep

    # ---- workers

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg_done)

    def _bg_done(self, task: asyncio.Task[Any]) -> None:
        self._bg.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None:
            self._worker_failed("emit", e)

    def _worker_failed(self, name: str, e: BaseException) -> None:
        """Every exception in a session's work is logged, counted and told to the client; never silent."""
        self.counters.worker_errors += 1
        self.m.metrics.worker_errors.labels(name).inc()
        log.error("session %s: %s worker failed: %s", self.id, name, e, exc_info=e)
        self.broadcast(
            {
                "type": "error",
                "code": "analysis_error",
                "reason": f"internal error in this session's {name} work; it was restarted and the session goes on",
            },
            droppable=True,
            media_only=True,
        )

    async def _supervise(self, name: str, worker: Callable[[], Awaitable[None]]) -> None:
        """Runs a worker for the life of the session; an exception is reported and the worker restarted."""
        failures = 0
        while True:
            try:
                await worker()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._worker_failed(name, e)
                failures += 1
                # Back off when it keeps failing, so a poisoned session cannot spin a core.
                await asyncio.sleep(min(5.0, 0.05 * 2 ** min(failures, 7)))

    async def _watchdog(self) -> None:
        """Once a second: CAMERA_OFF when frames stop for camera_timeout_s, and the control rules' grace periods."""
        timeout = self.policy.thresholds.camera_timeout_s
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            events: list[RuleEvent] = []
            camera_muted = self.track_state.get("camera") in (ControlEvent.TRACK_MUTED, ControlEvent.TRACK_ENDED)
            if self.last_frame_at is not None and not camera_muted and now - self.last_frame_at > timeout:
                events += self.engine.control(EventType.CAMERA_OFF, True, self.last_frame_at + timeout, "no_frames")
            events += self.engine.tick(now)
            if events:
                await self.emit(events)

    async def _video_worker(self) -> None:
        while True:
            await self._frame_ready.wait()
            self._frame_ready.clear()
            item, self._frame = self._frame, None
            if item is None:
                continue
            msg, arrived, n = item
            try:
                with observability.frame_span(self.id, msg.seq, arrived):
                    await self._analyse(msg, arrived)
            finally:  # analysed or failed: a ping waiting for it may be answered
                self._video_done = max(self._video_done, n)
                self._progress()

    async def _analyse(self, msg: MediaMessage, arrived: float) -> None:
        try:
            sig = await self.m.pool.run(self.m.models.analyze_jpeg, msg.payload, msg.seq, msg.capture_ts, self.clock)
        except FrameDecodeError as e:
            self.reject_frame()
            self.m.metrics.protocol_errors.labels("undecodable_jpeg").inc()
            self.broadcast(
                {"type": "error", "code": "undecodable_jpeg", "reason": str(e), "seq": msg.seq},
                droppable=True,
                media_only=True,
            )
            return
        if self.state != "active":
            return
        self.counters.frames_analysed += 1
        self.m.metrics.frames.labels("analysed").inc()
        for model, ms in sig.latency_ms.items():
            self.m.metrics.inference_latency.labels(model).observe(ms / 1000)
        with observability.rules_span():
            events = self.engine.observe(sig)
        await self.emit(events)
        self.m.metrics.frame_to_signal.observe(time.perf_counter() - arrived)

    async def _audio_worker(self) -> None:
        # Audio models come with the audio issue; here audio is accounted for and released.
        while True:
            await self._audio_ready.wait()
            self._audio_ready.clear()
            while self._audio:
                msg = self._audio.popleft()
                async with self._audio_space:
                    self._audio_bytes -= len(msg.payload)
                    self._audio_space.notify_all()
                self.counters.audio_bytes += len(msg.payload)
                self.m.metrics.audio_seconds.inc(len(msg.payload) / (AUDIO_SAMPLE_RATE * AUDIO_SAMPLE_WIDTH))
                self._audio_done += 1
                self._update_audio_hint()  # a flow hint goes out before the pong it may precede
                self._progress()
                await asyncio.sleep(0)

    # ---- alerts out

    def make_alert(self, ev: RuleEvent) -> Alert:
        return Alert(
            exam_session_id=self.id,
            candidate_id=self.candidate_id,
            timestamp=ts_to_iso(ev.ts),
            event_type=ev.event_type,
            severity_score=ev.severity,
            ai_model_source=ev.model or self.m.models.face.name,
            evidence=ev.evidence,
            metadata=AlertMetadata(
                node_id=self.m.settings.node_id,
                worker_id=self.m.worker_id,
                exam_id=self.exam_id,
                # Routing hints for room delivery, when the session came from a LiveKit room.
                **room_keys(self.metadata),
            ),
            incident_id=ev.incident_id,
            incident_state=ev.state,
        )

    async def emit(self, events: list[RuleEvent]) -> None:
        """Rate-limits, builds and appends the alerts of these rule events, with the session's state in the same
        transaction, then sends them to subscribers. Alerts leave in the order the rules raised them."""
        if not events:
            return
        async with self._emit_lock:
            passed = self.limiter.filter(events, time.monotonic())
            kept = {id(ev) for ev in passed}
            for ev in events:
                if ev.state is IncidentState.STARTED and id(ev) not in kept:
                    self.counters.incidents_suppressed[ev.event_type] += 1
                    self.m.metrics.incidents_suppressed.labels(ev.event_type).inc()
                    if self.counters.incidents_suppressed[ev.event_type] == 1:
                        log.warning(
                            "session %s: %s incidents over the rate limit are suppressed", self.id, ev.event_type
                        )
            alerts: list[Alert] = []
            for ev in passed:
                if ev.state is IncidentState.STARTED:
                    await self._attach_thumbnail(ev)
                    self.counters.alerts_by_type[ev.event_type] += 1
                    self._feedback(ev)
                alerts.append(self.make_alert(ev))
                self.m.metrics.alerts.labels(ev.event_type, str(ev.state)).inc()
            # Open incidents changed (or one was suppressed): their state commits with the alerts.
            rules_changed = any(ev.state is not IncidentState.ONGOING for ev in events)
            try:
                with observability.alerts_outbox_span(alerts):  # also sets each alert's metadata.traceparent
                    await self.m.sink.publish_many(alerts, self.writer(with_rules=rules_changed))
            except Exception:
                ids = [a.event_id for a in alerts]
                log.exception("session %s: outbox append failed for %s", self.id, ids)
                self.m.metrics.outbox_errors.inc()
            for alert in alerts:
                self.broadcast({"type": "alert", "alert": alert.model_dump(mode="json")})

    async def _attach_thumbnail(self, ev: RuleEvent) -> None:
        if ev.preview is None:
            return
        thumb = await asyncio.to_thread(thumbnail_b64, ev.preview)
        if thumb:
            ev.evidence["thumbnail_jpeg_b64"] = thumb

    def _feedback(self, ev: RuleEvent) -> None:
        text = ev.feedback
        if text and self.feedback.allow(ev.event_type, time.time()):
            self.counters.feedback_sent += 1
            self.broadcast(
                {"type": "feedback", "code": ev.event_type, "message": text, "incident_id": ev.incident_id,
                 "ts": time.time()},
                media_only=True,
            )  # fmt: skip

    def broadcast(self, msg: dict[str, Any], droppable: bool = False, media_only: bool = False) -> None:
        for sub in list(self.subscribers):
            if media_only and not sub.media:
                continue
            sub.offer(msg, droppable=droppable)

    def subscribe(self, media: bool = False) -> Subscriber:
        sub = Subscriber(self.m.settings.subscriber_queue, media=media)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def stats(self) -> dict[str, Any]:
        risk = self.engine.risk.score(self.last_media_ts or time.time())
        return {
            "frames_processed": self.counters.frames_analysed,
            "frames_received": self.counters.frames_received,
            "frames_dropped": self.counters.frames_dropped,
            "alerts_triggered": sum(self.counters.alerts_by_type.values()),
            "incidents_suppressed": sum(self.counters.incidents_suppressed.values()),
            "worker_errors": self.counters.worker_errors,
            "audio_seconds": self.counters.audio_seconds,
            "audio_queue_fill": round(self.audio_fill(), 3),
            "last_face_verification": self.last_verification_at.isoformat() if self.last_verification_at else None,
            "risk_score": risk,
            "risk_band": self.engine.risk.band(risk),
        }

    async def close(self, reason: str) -> None:
        """Ends open incidents (their end alerts are emitted) and stops the workers."""
        # Let the audio queue drain: audio is never silently dropped.
        for _ in range(100):
            if not self._audio:
                break
            await asyncio.sleep(0.01)
        ts = self.last_media_ts or self.engine.last_ts or time.time()
        self.state = "ended"
        await self.emit(self.engine.close_all(ts, reason))
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._progress()  # nothing more will be analysed: release waiting pings
        self.broadcast({"type": "session_ended", "reason": reason})

    def stop(self) -> None:
        """Stops the workers without ending anything (server shutdown: the state is saved for the restart)."""
        for t in self._tasks:
            t.cancel()


class SessionManager:
    def __init__(
        self, settings: Any, sm: sessionmaker, models: ModelSet, pool: InferencePool, sink: AlertSink, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.sm = sm
        self.models = models
        self.pool = pool
        self.sink = sink
        self.metrics = metrics
        self.worker_id = f"pid{os.getpid()}"
        self.live: dict[str, LiveSession] = {}
        self._lock = asyncio.Lock()

    # ---- database helpers (run in threads)

    async def row(self, sid: str) -> SessionRow | None:
        return await asyncio.to_thread(self._db_get, sid)

    def _db_get(self, sid: str) -> SessionRow | None:
        with self.sm() as db:
            return db.get(SessionRow, sid)

    def _audit(self, actor: str, action: str, target: str, detail: dict[str, Any] | None = None) -> None:
        with self.sm.begin() as db:
            db.add(AuditRow(actor=actor, action=action, target=target, detail=detail or {}))

    # ---- lifecycle

    async def start(self, req: SessionStartRequest, actor: str) -> tuple[LiveSession, bool]:
        """Returns (session, created). Idempotent for the same candidate; SessionConflict otherwise."""
        policy = effective_policy(req, self.settings.video_fps)
        async with self._lock:
            row = await asyncio.to_thread(self._db_get, req.exam_session_id)
            if row is not None and row.state == "active" and _aware(row.expires_at) > utcnow():
                if row.candidate_id != req.candidate_id:
                    raise SessionConflict(f"session {req.exam_session_id} is active for another candidate")
                return self._live(row), False
            if row is not None and row.state == "active":
                await self._expire(row.id)

            def create() -> SessionRow:
                now = utcnow()
                with self.sm.begin() as db:
                    old = db.get(SessionRow, req.exam_session_id)
                    if old is not None:
                        db.delete(old)  # an ended session id is reused for a new sitting
                        db.flush()
                    new = SessionRow(
                        id=req.exam_session_id,
                        sitting=uuid.uuid4().hex,
                        candidate_id=req.candidate_id,
                        exam_id=req.exam_id,
                        frontend_instance_id=req.frontend_instance_id,
                        state="active",
                        policy=policy.model_dump(mode="json"),
                        metadata_=req.metadata,
                        counters={},
                        created_at=now,
                        expires_at=now + timedelta(seconds=self.settings.session_ttl_s),
                    )
                    db.add(new)
                    db.add(
                        AuditRow(
                            actor=actor,
                            action="session.start",
                            target=req.exam_session_id,
                            detail={"candidate_id": req.candidate_id, "exam_id": req.exam_id},
                        )
                    )
                return new

            row = await asyncio.to_thread(create)
            return self._live(row), True

    def _live(self, row: SessionRow) -> LiveSession:
        live = self.live.get(row.id)
        if live is None:  # new, or rebuilt from its row after an analyzer restart
            live = LiveSession(row, self)
            self.live[row.id] = live
            self.metrics.active_sessions.set(len(self.live))
        return live

    async def get_live(self, sid: str) -> LiveSession:
        """The active session, rebuilt from its row when needed; SessionNotFound / SessionClosed."""
        live = self.live.get(sid)
        if live is not None:
            return live
        row = await asyncio.to_thread(self._db_get, sid)
        if row is None:
            raise SessionNotFound(sid)
        if row.state != "active":
            raise SessionClosed(row.state)
        if _aware(row.expires_at) <= utcnow():
            await self._expire(sid)
            raise SessionClosed("expired")
        async with self._lock:
            return self._live(row)

    async def restore_active(self) -> int:
        """At startup: rebuilds every active session from its row, so that its open incidents, watchdog and
        expiry go on without waiting for its client to reconnect. Sessions that expired meanwhile are ended
        (their open incidents get their end alerts)."""

        def q() -> list[SessionRow]:
            with self.sm() as db:
                return list(db.scalars(select(SessionRow).where(SessionRow.state == "active")).all())

        rows = await asyncio.to_thread(q)
        now = utcnow()
        for row in rows:
            if _aware(row.expires_at) <= now:
                await self._expire(row.id)
            else:
                self._live(row)
        restored = [s for s in self.live.values() if s.restored]
        if rows:
            log.info("restored %d active session(s), %d with open incidents", len(self.live), len(restored))
        return len(self.live)

    async def end(self, sid: str, actor: str, reason: str = "ended_by_api", state: str = "ended") -> SessionRow:
        live = self.live.pop(sid, None)
        self.metrics.active_sessions.set(len(self.live))
        if live is None:
            row = await self.row(sid)
            if row is not None and row.state == "active" and (row.rule_state or {}).get("open"):
                live = LiveSession(row, self)  # rebuilt only to end its saved open incidents with their alerts
        if live is not None:
            await live.close(reason)  # its last messages tell connected clients; their senders then close
            for _ in range(50):
                if live.connection is None:
                    break
                await asyncio.sleep(0.02)
            if live.connection is not None:
                with contextlib.suppress(Exception):
                    await live.connection.close(code=int(CloseCode.SESSION_ENDED), reason=f"session {state}")

        def finish() -> SessionRow:
            with self.sm.begin() as db:
                row = db.get(SessionRow, sid)
                if row is None:
                    raise SessionNotFound(sid)
                if row.state == "active":
                    row.state = state
                    row.ended_at = utcnow()
                    if live is not None:
                        row.counters = live.counters.to_json()
                        row.rule_state = live.state_json()
                db.add(AuditRow(actor=actor, action=f"session.{state}", target=sid, detail={"reason": reason}))
                return row

        return await asyncio.to_thread(finish)

    async def _expire(self, sid: str) -> None:
        with contextlib.suppress(SessionNotFound):
            await self.end(sid, "system:expiry", reason="expired", state="expired")

    async def save_state(self) -> None:
        """Saves counters and rule state of every live session (a restart continues from here)."""
        writers = [s.writer() for s in self.live.values()]
        if not writers:
            return

        def write() -> None:
            with self.sm.begin() as db:
                for w in writers:
                    w(db)

        await asyncio.to_thread(write)

    def _expired_ids(self) -> list[str]:
        """Active sessions past their expiry, in memory or only in the database (e.g. after a restart)."""
        with self.sm() as db:
            stmt = select(SessionRow.id).where(SessionRow.state == "active", SessionRow.expires_at <= utcnow())
            return list(db.scalars(stmt.limit(500)).all())

    async def housekeeping(self) -> None:
        """Saves live sessions' state every state_flush_s; every expiry_sweep_s ends sessions past their TTL
        (live or only in the database), prunes old ones and applies data retention (dispatcher/retention.py)."""
        s = self.settings
        last_save = last_sweep = time.monotonic()
        while True:
            await asyncio.sleep(min(s.state_flush_s, s.expiry_sweep_s))
            try:
                if time.monotonic() - last_save >= s.state_flush_s:
                    last_save = time.monotonic()
                    await self.save_state()
                if time.monotonic() - last_sweep < s.expiry_sweep_s:
                    continue
                last_sweep = time.monotonic()
                now = utcnow()
                expired = {sid for sid, s in self.live.items() if s.expires_at <= now}
                expired.update(await asyncio.to_thread(self._expired_ids))
                for sid in expired:
                    await self._expire(sid)
                await asyncio.to_thread(self.prune_ended)
                await retention.purge_due(self.settings, self.sm)  # outbox, DLQ, audit, alerts.jsonl
            except Exception:
                log.exception("housekeeping failed")

    def prune_ended(self) -> int:
        """Deletes ended / expired sessions past their retention: session state is short-lived."""
        cutoff = utcnow() - timedelta(seconds=self.settings.ended_session_retention_s)
        with self.sm.begin() as db:
            rows = db.scalars(
                select(SessionRow).where(SessionRow.state != "active", SessionRow.ended_at < cutoff)
            ).all()
            for row in rows:
                db.delete(row)
            return len(rows)

    async def shutdown(self) -> None:
        """Stops every session's workers and saves its state; open incidents stay open for the restart."""
        for s in list(self.live.values()):
            s.stop()
        for s in list(self.live.values()):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    async with s._emit_lock:  # an append in progress finishes first
                        pass
        await self.save_state()

    # ---- views

    def state_of(self, row: SessionRow) -> SessionState:
        live = self.live.get(row.id)
        counters = live.counters.public() if live else Counters.from_json(row.counters or {}).public()
        saved = row.rule_state or {}
        return SessionState(
            exam_session_id=row.id,
            candidate_id=row.candidate_id,
            exam_id=row.exam_id,
            frontend_instance_id=row.frontend_instance_id,
            state=row.state,  # type: ignore[arg-type]
            created_at=_aware(row.created_at).isoformat(),
            ended_at=_aware(row.ended_at).isoformat() if row.ended_at else None,
            expires_at=_aware(row.expires_at).isoformat(),
            connected=bool(live and live.connection is not None),
            counters=counters,
            open_incidents=live.engine.open_incidents()
            if live
            else ([] if row.state != "active" else saved.get("open", [])),
            risk=live.engine.risk_summary() if live else {},
            last_verification_at=_aware(row.last_verification_at).isoformat() if row.last_verification_at else None,
            policy=EffectivePolicy.model_validate(row.policy),
            metadata=row.metadata_ or {},
        )

    async def list_rows(self, state: str | None = None, limit: int = 100) -> list[SessionRow]:
        def q() -> list[SessionRow]:
            with self.sm() as db:
                stmt = select(SessionRow).order_by(SessionRow.created_at.desc()).limit(limit)
                if state:
                    stmt = stmt.where(SessionRow.state == state)
                return list(db.scalars(stmt).all())

        return await asyncio.to_thread(q)
