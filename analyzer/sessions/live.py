"""The runtime of one active session: media in (queues), supervised workers (video, audio, watchdog), rule
state that survives a restart, and alerts out (emitter.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from livekit_proctor import observability
from livekit_proctor.analyzer.alerting import AlertBuilder
from livekit_proctor.analyzer.pipeline import FrameDecodeError, ModelClock, Sampler
from livekit_proctor.analyzer.rules.engine import RuleEngine, RuleEvent
from livekit_proctor.analyzer.rules.limits import IncidentLimiter
from livekit_proctor.analyzer.rules.spoof import stages_off as spoof_stages_off
from livekit_proctor.analyzer.rules.verification import STAGE as EMBEDDING_STAGE
from livekit_proctor.analyzer.rules.verification import Reference
from livekit_proctor.analyzer.sessions.counters import Counters
from livekit_proctor.analyzer.sessions.emitter import AlertEmitter
from livekit_proctor.analyzer.sessions.fanout import Fanout, Subscriber
from livekit_proctor.analyzer.sessions.frames import FrameBuffer
from livekit_proctor.analyzer.sessions.media import AudioQueue, Barrier, VideoSlot
from livekit_proctor.analyzer.sessions.store import aware, saver
from livekit_proctor.analyzer.sessions.supervisor import Supervisor
from livekit_proctor.contracts.alerts import EventType
from livekit_proctor.contracts.api import EffectivePolicy
from livekit_proctor.contracts.outbox import AlsoWrite
from livekit_proctor.contracts.wire import (
    AUDIO_SAMPLE_RATE,
    AUDIO_SAMPLE_WIDTH,
    ControlEvent,
    ErrorCode,
    ErrorMessage,
    FlowMessage,
    MediaMessage,
    ServerMessage,
    SessionEndedMessage,
)
from livekit_proctor.db import SessionRow
from livekit_proctor.observability import session_context

if TYPE_CHECKING:
    from livekit_proctor.analyzer.sessions.manager import SessionManager

log = logging.getLogger(__package__)  # livekit_proctor.analyzer.sessions, as docs/operations.md shows

Frame = tuple[MediaMessage, float, int]  # (message, arrival perf_counter, its number among frames offered)


class LiveSession:
    def __init__(self, row: SessionRow, manager: SessionManager) -> None:
        self.id = row.id
        self.sitting = row.sitting or ""
        self.candidate_id = row.candidate_id
        self.exam_id = row.exam_id
        self.frontend_instance_id = row.frontend_instance_id
        self.metadata = dict(row.metadata_ or {})
        self.created_at = aware(row.created_at)
        self.expires_at = aware(row.expires_at)
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
        self.clock = ModelClock()
        self.clock.off |= spoof_stages_off(self.policy)  # the anti-spoofing CNNs only for sessions that ask
        # The face-embedding stage runs only while this session verifies an enrolled candidate, at its policy's
        # interval; the enrollment is read in a thread (below), never on the event loop.
        self.clock.intervals[EMBEDDING_STAGE] = self.engine.verifier.interval_s
        self._sync_verification()
        self.state = "active"
        self.connection: Any = None  # the media WebSocket currently feeding this session
        self.last_media_ts: float | None = None
        self.track_state: dict[str, str] = {}
        self.video: VideoSlot[Frame] = VideoSlot()
        # The last seconds of received frames, as JPEG (verify-frame; frames.py says why not decoded).
        self.recent = FrameBuffer(settings.verify_frame_buffer_s, settings.verify_frame_buffer_bytes)
        self.audio = AudioQueue(int(settings.audio_queue_seconds * AUDIO_SAMPLE_RATE * AUDIO_SAMPLE_WIDTH))
        self.audio_paused_hint = False
        self.barrier = Barrier()
        self.fanout = Fanout(settings.subscriber_queue)
        builder = AlertBuilder(
            exam_session_id=self.id,
            candidate_id=self.candidate_id,
            exam_id=self.exam_id,
            default_model=manager.models.source,
            node_id=settings.node_id,
            worker_id=manager.worker_id,
            session_metadata=self.metadata,
        )
        self.emitter = AlertEmitter(
            builder, self.limiter, manager.sink, manager.metrics, self.counters, self.fanout, self.writer
        )
        # Each worker logs with this session's id.
        self.workers = Supervisor(self.id, self._worker_failed, lambda: session_context(self.id))
        self.workers.start("video", self._video_worker)
        self.workers.start("audio", self._audio_worker)
        self.workers.start("watchdog", self._watchdog)
        if self.engine.verifier.wanted:
            self.workers.spawn(self._load_enrollment(), "enrollment")

    # ---- face verification (analyzer/rules/verification.py)

    def _sync_verification(self) -> None:
        if self.engine.verifier.active:
            self.clock.off.discard(EMBEDDING_STAGE)
        else:
            self.clock.off.add(EMBEDDING_STAGE)

    async def _load_enrollment(self) -> None:
        """Reads the candidate's enrollment; without one the session says so once (IDENTITY_UNVERIFIED, open
        until the session ends) and goes on unverified."""
        ref: Reference | None = None
        store = self.m.identity
        if store is None:
            reason = "no_identity_store"
        else:
            try:
                enrollment = await asyncio.to_thread(store.get_enrollment, self.candidate_id)
            except Exception:
                log.exception("session %s: the candidate's enrollment could not be read", self.id)
                reason = "enrollment_unreadable"
            else:
                ref = Reference.from_enrollment(enrollment) if enrollment is not None else None
                reason = "no_enrollment" if enrollment is None else "enrollment_without_embeddings"
        if self.state != "active":
            return  # ended meanwhile (or rebuilt only to end its open incidents): nothing to say
        now = time.time()
        if ref is None:
            events = self.engine.control(EventType.IDENTITY_UNVERIFIED, True, now, reason)
        else:
            self.engine.verifier.enroll(ref)
            self._sync_verification()
            # Enrolled since a restart of this session: it is verified from now on.
            events = self.engine.control(EventType.IDENTITY_UNVERIFIED, False, now, "enrolled")
        if events:
            await self.emit(events)

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

    def writer(self, with_rules: bool = True) -> AlsoWrite:
        """Database work that saves this session's counters (and rule state) in the caller's transaction."""
        rules = self.state_json() if with_rules else None
        return saver(self.id, self.sitting, self.counters.to_json(), rules, self.last_verification_at)

    # ---- ingest (called by the WebSocket handler on the event loop)

    def offer_frame(self, msg: MediaMessage) -> None:
        self.counters.frames_received += 1
        self.m.metrics.frames.labels("received").inc()
        self.last_media_ts = msg.capture_ts
        self.recent.add(msg.seq, msg.capture_ts, msg.payload)
        now = time.time()
        if self.last_frame_at is None or now - self.last_frame_at > 1.0:
            ended = self.engine.control(EventType.CAMERA_OFF, False, now, "frames_resumed")
            if ended:
                self.workers.spawn(self.emit(ended))
        self.last_frame_at = now
        if not self.sampler.due(msg.capture_ts):
            self.counters.frames_sampled_out += 1
            self.m.metrics.frames.labels("sampled_out").inc()
            return
        if self.video.put((msg, time.perf_counter(), self.barrier.video_received())):
            self.counters.frames_dropped += 1
            self.m.metrics.frames.labels("dropped").inc()

    def reject_frame(self) -> None:
        self.counters.frames_rejected += 1
        self.m.metrics.frames.labels("rejected").inc()

    def reject_audio(self) -> None:
        self.counters.audio_rejected += 1
        self.m.metrics.audio_chunks.labels("rejected").inc()

    async def offer_audio(self, msg: MediaMessage) -> None:
        """Queues audio without loss; waits (TCP backpressure) when the bound is reached."""
        await self.audio.put(msg)
        self.barrier.audio_received()
        self.counters.audio_chunks += 1
        self.m.metrics.audio_chunks.labels("received").inc()
        self._update_audio_hint()

    def audio_fill(self) -> float:
        return self.audio.fill()

    def _update_audio_hint(self) -> None:
        fill = self.audio.fill()
        if not self.audio_paused_hint and fill >= 0.75:
            self.audio_paused_hint = True
            self.broadcast(FlowMessage(audio="slow_down", audio_queue_fill=round(fill, 3)))
        elif self.audio_paused_hint and fill <= 0.25:
            self.audio_paused_hint = False
            self.broadcast(FlowMessage(audio="resume", audio_queue_fill=round(fill, 3)))

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
            self.workers.spawn(self.emit(events))

    def on_connect(self) -> None:
        """A media connection (re)opened: the candidate is back."""
        events = self.engine.control(EventType.CANDIDATE_DISCONNECTED, False, time.time(), "reconnected")
        if events:
            self.workers.spawn(self.emit(events))

    async def settled(self) -> None:
        """Returns once every frame and audio chunk received before the call has been processed and the
        alerts they raised have been sent to subscribers (the ping barrier)."""
        bg = self.workers.background()
        await self.barrier.wait()
        if bg:
            await asyncio.wait(bg)

    # ---- workers

    def _worker_failed(self, name: str, e: BaseException) -> None:
        """Every exception in a session's work is logged, counted and told to the client; never silent."""
        self.counters.worker_errors += 1
        self.m.metrics.worker_errors.labels(name).inc()
        log.error("session %s: %s worker failed: %s", self.id, name, e, exc_info=e)
        self.broadcast(
            ErrorMessage(
                code=ErrorCode.ANALYSIS_ERROR,
                reason=f"internal error in this session's {name} work; it was restarted and the session goes on",
            ),
            droppable=True,
            media_only=True,
        )

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
            msg, arrived, n = await self.video.get()
            try:
                with observability.frame_span(self.id, msg.seq, arrived):
                    await self._analyse(msg, arrived)
            finally:  # analysed or failed: a ping waiting for it (and the frames it replaced) may be answered
                self.barrier.video_processed(n)

    async def _analyse(self, msg: MediaMessage, arrived: float) -> None:
        try:
            sig = await self.m.pool.run(self.m.models.analyze_jpeg, msg.payload, msg.seq, msg.capture_ts, self.clock)
        except FrameDecodeError as e:
            self.reject_frame()
            self.m.metrics.protocol_errors.labels("undecodable_jpeg").inc()
            self.broadcast(
                ErrorMessage(code=ErrorCode.UNDECODABLE_JPEG, reason=str(e), seq=msg.seq),
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
        if self.engine.last_check is not None:
            self.last_verification_at = datetime.now(UTC)
            self._sync_verification()  # mode "start": no more checks after the first match
        await self.emit(events)
        self.m.metrics.frame_to_signal.observe(time.perf_counter() - arrived)

    async def _audio_worker(self) -> None:
        # Audio models come with the audio issue; here audio is accounted for and released.
        while True:
            msg = await self.audio.get()
            self.counters.audio_bytes += len(msg.payload)
            self.m.metrics.audio_seconds.inc(len(msg.payload) / (AUDIO_SAMPLE_RATE * AUDIO_SAMPLE_WIDTH))
            self._update_audio_hint()  # a flow hint goes out before the pong it may precede
            self.barrier.audio_processed()
            await asyncio.sleep(0)

    # ---- out

    async def emit(self, events: list[RuleEvent]) -> None:
        await self.emitter.emit(events)

    def broadcast(self, msg: ServerMessage, droppable: bool = False, media_only: bool = False) -> None:
        self.fanout.broadcast(msg, droppable=droppable, media_only=media_only)

    def subscribe(self, media: bool = False) -> Subscriber:
        return self.fanout.subscribe(media)

    def unsubscribe(self, sub: Subscriber) -> None:
        self.fanout.unsubscribe(sub)

    def last_face_verification(self) -> dict[str, Any] | None:
        last = self.engine.verifier.last
        return last.public() if last is not None else None

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
            "audio_queue_fill": round(self.audio.fill(), 3),
            "last_face_verification": self.last_face_verification(),
            "risk_score": risk,
            "risk_band": self.engine.risk.band(risk),
        }

    # ---- end

    async def close(self, reason: str) -> None:
        """Ends open incidents (their end alerts are emitted) and stops the workers."""
        # Let the audio queue drain: audio is never silently dropped.
        for _ in range(100):
            if not len(self.audio):
                break
            await asyncio.sleep(0.01)
        ts = self.last_media_ts or self.engine.last_ts or time.time()
        self.state = "ended"
        self.recent.clear()
        await self.emit(self.engine.close_all(ts, reason))
        await self.workers.stop()
        self.barrier.close()  # nothing more will be analysed: release waiting pings
        self.broadcast(SessionEndedMessage(reason=reason))

    def stop(self) -> None:
        """Stops the workers without ending anything (server shutdown: the state is saved for the restart)."""
        self.workers.cancel()

    async def flushed(self) -> None:
        """Returns once an outbox append in progress has finished (shutdown saves the state after it)."""
        async with self.emitter.lock:
            pass
