"""The runtime of one active session: media in (queues), supervised workers (video, audio, watchdog), rule
state that survives a restart, and alerts out (emitter.py).

Face verification (a session whose policy verifies; docs/rules.md "Face verification", docs/identity.md): the
candidate's enrollment is read in a thread at start, again when it changes (SessionManager tells the session:
at once for a change through this analyzer, within enrollment_recheck_s for one through another), and the
checks leave an audit trail in the identity audit log (first check, FACE_MISMATCH start and end, reloads, a
summary at the end), written in a thread, never on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from livekit_proctor import observability
from livekit_proctor.analyzer.alerting import AlertBuilder
from livekit_proctor.analyzer.pipeline import FrameDecodeError, ModelClock, Sampler
from livekit_proctor.analyzer.rules.engine import RuleEngine, RuleEvent
from livekit_proctor.analyzer.rules.limits import IncidentLimiter
from livekit_proctor.analyzer.rules.spoof import stages_off as spoof_stages_off
from livekit_proctor.analyzer.rules.verification import STAGE as EMBEDDING_STAGE
from livekit_proctor.analyzer.rules.verification import Check, Reference
from livekit_proctor.analyzer.sessions.counters import Counters
from livekit_proctor.analyzer.sessions.emitter import AlertEmitter
from livekit_proctor.analyzer.sessions.fanout import Fanout, Subscriber
from livekit_proctor.analyzer.sessions.frames import FrameBuffer
from livekit_proctor.analyzer.sessions.media import AudioQueue, Barrier, VideoSlot
from livekit_proctor.analyzer.sessions.store import aware, saver
from livekit_proctor.analyzer.sessions.supervisor import Supervisor
from livekit_proctor.contracts.alerts import EventType, IncidentState, ts_to_iso
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
AUDIO_WINDOW_S = 0.5  # audio is analysed in windows of this length (a shorter one only when a ping waits for it)
AUDIO_WINDOW_BYTES = int(AUDIO_WINDOW_S * AUDIO_SAMPLE_RATE) * AUDIO_SAMPLE_WIDTH
AUDIO_GAP_S = 0.5  # a chunk further than this from where the held audio ends starts a new window


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
        # Face verification: the enrollment in use (None: none), whether it was read (here or before a restart),
        # IDENTITY_UNVERIFIED's reason until the next analysed frame says it, the checks' tally (for the audit).
        self.enrollment_id: str | None = None
        self.enrollment_known = False
        self._unverified: str | None = None
        self._analysed_ts: float | None = None  # capture time of the latest frame analysed in this process
        self.face_checks = {"checks": 0, "matches": 0, "mismatches": 0, "reloads": 0}
        self._enrollment_lock = asyncio.Lock()
        self._audit_lock = asyncio.Lock()  # records are written one at a time, in the order they were made
        self._audits: set[asyncio.Task[None]] = set()
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
        # The audio worker's window being assembled: PCM not yet analysed, the capture time of its first sample,
        # and how many received chunks have samples in it (they count as processed once it is analysed).
        self._pcm = bytearray()
        self._pcm_ts = 0.0
        self._pcm_chunks = 0
        self._audio_seq = 0
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

    def enrollment_changed(self, source: str) -> None:
        """The candidate's enrollment changed (or may have): read it again (SessionManager calls this)."""
        if self.state == "active" and self.engine.verifier.wanted:
            self.workers.spawn(self._load_enrollment(source), "enrollment")

    async def _load_enrollment(self, source: str = "start") -> None:
        """Reads the candidate's enrollment and verifies against it from now on: at start (and after a restart),
        and when it changed (source "notified": through this analyzer; "recheck": seen by the periodic
        re-check). A changed enrollment resets the mismatch count. Without an enrollment the session says so
        once, IDENTITY_UNVERIFIED at the next analysed frame, and checks nothing; an enrollment arriving ends
        that incident."""
        async with self._enrollment_lock:  # a notification and a re-check at once: one after the other
            await self._read_enrollment(source)

    async def _read_enrollment(self, source: str) -> None:
        ref: Reference | None = None
        enrollment_id: str | None = None
        store = self.m.identity
        if store is None:
            reason = "no_identity_store"
        else:
            try:
                enrollment = await asyncio.to_thread(store.get_enrollment, self.candidate_id)
            except Exception:
                log.exception("session %s: the candidate's enrollment could not be read", self.id)
                if source != "start":
                    return  # keep verifying against what it has; the next re-check tries again
                reason = "enrollment_unreadable"
                self.enrollment_known = False
            else:
                if enrollment is not None:
                    enrollment_id = enrollment.enrollment_id
                    ref = Reference.from_enrollment(enrollment)
                reason = "no_enrollment" if enrollment is None else "enrollment_without_embeddings"
        if self.state != "active":
            return  # ended meanwhile (or rebuilt only to end its open incidents): nothing to say
        readable = reason != "enrollment_unreadable"
        changed = readable and self.enrollment_known and enrollment_id != self.enrollment_id
        if source != "start" and not changed:
            return  # told of a change that this session has already seen
        # Another enrollment (or none): the earlier checks were against other faces.
        self.engine.verifier.enroll(ref, reset=changed)
        if readable:
            previous, self.enrollment_id, self.enrollment_known = self.enrollment_id, enrollment_id, True
        if changed:
            self.face_checks["reloads"] += 1
            self._audit(
                "reload",
                {
                    "enrollment_id": enrollment_id,
                    "previous_enrollment_id": previous,
                    "source": source,
                    "embeddings": len(ref.ids) if ref is not None else 0,
                },
            )
        self._sync_verification()
        if ref is None:
            self._unverified = "enrollment_deleted" if changed and enrollment_id is None else reason
            if source == "start" and self._analysed_ts is not None:
                # Frames were analysed before the enrollment could be read: the latest one says it.
                await self.emit(self._say_unverified(self._analysed_ts))
            return
        self._unverified = None
        # Enrolled since the session said it was not (before a restart, or in this one): verified from now on.
        ts = self.last_media_ts or time.time()
        events = self.engine.control(EventType.IDENTITY_UNVERIFIED, False, ts, "enrolled")
        if events:
            await self.emit(events)

    def _say_unverified(self, ts: float) -> list[RuleEvent]:
        """IDENTITY_UNVERIFIED, at the media time of an analysed frame like every alert; once: the control rule's
        incident stays open (saved across restarts), so saying it again raises nothing."""
        if self._unverified is None:
            return []
        reason, self._unverified = self._unverified, None
        return self.engine.control(EventType.IDENTITY_UNVERIFIED, True, ts, reason)

    # ---- the identity audit trail of the checks (IdentityStore.record; docs/identity.md)

    def _audit(self, action: str, result: dict[str, Any]) -> None:
        """Records in a thread, in order; close() waits for the records in flight."""
        if self.m.identity is None:
            return
        task = asyncio.create_task(self._record(action, result))
        self._audits.add(task)
        task.add_done_callback(self._audits.discard)

    async def _record(self, action: str, result: dict[str, Any]) -> None:
        store = self.m.identity
        assert store is not None
        async with self._audit_lock:
            try:
                entry = {"exam_session_id": self.id, **result}
                await asyncio.to_thread(store.record, action, self.candidate_id, self.m.auditor, entry)
            except Exception:  # the session goes on; the log says which record is missing
                log.exception("session %s: identity audit record %r not written", self.id, action)

    def _audit_check(self, check: Check) -> None:
        c = self.face_checks
        c["checks"] += 1
        c["matches" if check.match else "mismatches"] += 1
        if c["checks"] == 1:
            self._audit(
                "first-check",
                {
                    "match": check.match,
                    "similarity": round(check.similarity, 4),
                    "threshold": check.threshold,
                    "frame_quality_score": round(check.quality, 3),
                    "enrollment_id": self.enrollment_id,
                    "frame_ts": ts_to_iso(check.ts),
                },
            )

    _MISMATCH_EVIDENCE = (
        "current_similarity", "threshold", "consecutive_mismatches", "frame_quality_score", "enrolled_embedding_id",
        "trigger_frame_seq", "duration_s", "end_reason",
    )  # fmt: skip

    def _audit_mismatches(self, events: list[RuleEvent]) -> None:
        for ev in events:
            if ev.event_type != EventType.FACE_MISMATCH or ev.state not in (IncidentState.STARTED, IncidentState.ENDED):
                continue
            action = "mismatch-started" if ev.state is IncidentState.STARTED else "mismatch-ended"
            detail = {k: ev.evidence[k] for k in self._MISMATCH_EVIDENCE if k in ev.evidence}
            self._audit(
                action,
                {"incident_id": ev.incident_id, "frame_ts": ts_to_iso(ev.ts), "enrollment_id": self.enrollment_id}
                | detail,
            )

    async def _audit_summary(self, reason: str) -> None:
        if not self.engine.verifier.wanted or self.m.identity is None:
            return
        if self._audits:
            await asyncio.wait(set(self._audits), timeout=10)
        summary = {
            **self.face_checks,
            "skipped_quality": self.engine.verifier.skipped,
            "enrollment_id": self.enrollment_id,
            "end_reason": reason,
        }
        await self._record("session-summary", summary)

    # ---- state that survives a restart (SessionRow.rule_state; docs/operations.md "Restarts")

    def state_json(self) -> dict[str, Any]:
        d = {
            "engine": self.engine.snapshot(),
            "limiter": self.limiter.snapshot(),
            "open": self.engine.open_incidents(),
            "last_frame_at": self.last_frame_at,
        }
        if self.engine.verifier.wanted:  # SessionManager.end rebuilds a session with these to audit its end
            d["enrollment"] = {"id": self.enrollment_id, "known": self.enrollment_known}
            d["face_checks"] = dict(self.face_checks)
        return d

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
        enrollment = d.get("enrollment") or {}
        self.enrollment_id, self.enrollment_known = enrollment.get("id"), bool(enrollment.get("known"))
        self.face_checks.update({k: int(v) for k, v in (d.get("face_checks") or {}).items() if k in self.face_checks})
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
            if off:  # without audio there is no evidence: open audio incidents end
                events += self.engine.reset_audio(ts, reason)
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
        if self._audits:  # and the identity audit records they made
            await asyncio.wait(set(self._audits))

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
        self._analysed_ts = msg.capture_ts
        events += self._say_unverified(msg.capture_ts)  # the session's first analysed frame (or after a deletion)
        if (check := self.engine.last_check) is not None:
            self.last_verification_at = datetime.now(UTC)
            self._sync_verification()  # mode "start": no more checks after the first match
            self._audit_check(check)
        await self.emit(events)
        self.m.metrics.frame_to_signal.observe(time.perf_counter() - arrived)

    async def _audio_worker(self) -> None:
        """Assembles the session's PCM into AUDIO_WINDOW_S windows (the remainder waits for the next chunk) and
        runs the audio stages on each in the inference pool, in order; their signals go to the rule engine. No
        audio is dropped: the queue holds it (backpressure) until this worker takes it. A ping waiting for audio
        gets the held part of a window analysed at once, so the barrier keeps its meaning."""
        while True:
            msg = await self._next_audio()
            if msg is None:  # a ping waits for the audio held here
                self.barrier.audio_flush.clear()
                await self._analyse_window(len(self._pcm))
                continue
            rate = AUDIO_SAMPLE_RATE * AUDIO_SAMPLE_WIDTH
            self.counters.audio_bytes += len(msg.payload)
            self.m.metrics.audio_seconds.inc(len(msg.payload) / rate)
            self._update_audio_hint()  # a flow hint goes out before the pong it may precede
            if self._pcm and abs(msg.capture_ts - (self._pcm_ts + len(self._pcm) / rate)) > AUDIO_GAP_S:
                await self._analyse_window(len(self._pcm))  # a gap: what is held ends here
            if not self._pcm:
                self._pcm_ts = msg.capture_ts
            self._pcm += msg.payload
            self._pcm_chunks += 1
            while len(self._pcm) >= AUDIO_WINDOW_BYTES:
                await self._analyse_window(AUDIO_WINDOW_BYTES)
            await asyncio.sleep(0)

    async def _next_audio(self) -> MediaMessage | None:
        """The next chunk; None when a ping waits for audio held in an incomplete window and no chunk is queued."""
        if len(self.audio) or not self._pcm:
            return await self.audio.get()
        if self.barrier.audio_flush.is_set():
            return None
        get = asyncio.ensure_future(self.audio.get())
        flush = asyncio.ensure_future(self.barrier.audio_flush.wait())
        try:
            await asyncio.wait({get, flush}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            flush.cancel()
            if not get.done():
                get.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await get
        if get.done() and not get.cancelled():
            return get.result()  # a chunk came (or came as well): it goes first, the flush is asked again
        return None

    async def _analyse_window(self, nbytes: int) -> None:
        """Analyses the first `nbytes` of the held PCM; chunks all of whose samples are now analysed count as
        processed (for the ping barrier) even when the analysis fails (the supervisor logs and restarts)."""
        nbytes -= nbytes % AUDIO_SAMPLE_WIDTH
        window, ts = bytes(self._pcm[:nbytes]), self._pcm_ts
        del self._pcm[:nbytes]
        self._pcm_ts += nbytes / (AUDIO_SAMPLE_RATE * AUDIO_SAMPLE_WIDTH)
        # The held remainder is always a suffix of the newest chunk: the chunks before it are done.
        done = self._pcm_chunks if not self._pcm else self._pcm_chunks - 1
        self._pcm_chunks -= done
        try:
            if window and self.m.models.audio:
                seq, self._audio_seq = self._audio_seq, self._audio_seq + 1
                pcm = np.frombuffer(window, np.int16)
                sig = await self.m.pool.run(self.m.models.analyze_audio, pcm, seq, ts, AUDIO_SAMPLE_RATE, self.clock)
                for model, ms in sig.latency_ms.items():
                    self.m.metrics.inference_latency.labels(model).observe(ms / 1000)
                if self.state == "active":
                    with observability.rules_span():
                        events = self.engine.observe_audio(sig)
                    await self.emit(events)
            self.counters.audio_analysed_bytes += len(window)  # not a failed window (worker_errors counts that)
        finally:
            self.barrier.audio_processed(done)

    # ---- out

    async def emit(self, events: list[RuleEvent]) -> None:
        self._audit_mismatches(events)
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
        # Let the audio queue drain, the last incomplete window included: audio is never silently dropped.
        for _ in range(100):
            if not len(self.audio) and not self._pcm:
                break
            self.barrier.audio_flush.set()
            await asyncio.sleep(0.01)
        ts = self.last_media_ts or self.engine.last_ts or time.time()
        self.state = "ended"
        self.recent.clear()
        await self.emit(self.engine.close_all(ts, reason))
        await self._audit_summary(reason)  # before a privacy deletion that follows the end removes the audit
        await self.workers.stop()
        self.barrier.close()  # nothing more will be analysed: release waiting pings
        self.broadcast(SessionEndedMessage(reason=reason))

    def stop(self) -> None:
        """Stops the workers without ending anything (server shutdown: the state is saved for the restart)."""
        self.workers.cancel()

    async def flushed(self) -> None:
        """Returns once an outbox append in progress, and the identity audit records made, have been written
        (shutdown saves the state after them)."""
        async with self.emitter.lock:
            pass
        if self._audits:
            await asyncio.wait(set(self._audits))
