"""One candidate in the room: their analyzer session, media readers, control messages and room feedback.

Each candidate has an analyzer session of their own (exam_session_id from their attributes), so several
candidates in one room are independent. The session is started when the candidate is recognised and
ended (POST /end) when they leave for good (not back within agent_leave_grace_s) or the room closes. A
session the analyzer ends (session_ended, 4404, 4408) or that another connection took over (4409) just
stops being handled.

Media: the camera (latest-wins, sampled at the session's video_fps by capture time, JPEG-encoded in a
thread) and the microphone (16 kHz mono, 100 ms chunks, lossless up to the connection's buffer). Screen
shares are not streamed (the protocol has one video channel, the camera's); their mute / end events are
still reported as `screen` control messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from livekit import rtc

from livekit_proctor.agent.analyzer_client import SessionStream
from livekit_proctor.agent.config import AgentSettings
from livekit_proctor.agent.load import ACTIVE_SESSIONS, SessionCount
from livekit_proctor.agent.media import (
    AudioChunker,
    AudioClock,
    CaptureClock,
    FrameConversionError,
    FrameSampler,
    LatestSlot,
    MediaStreams,
    buffer_type_name,
    close_stream,
    frame_to_jpeg,
)
from livekit_proctor.agent.participants import CandidateInfo
from livekit_proctor.agent.publisher import RoomPublisher
from livekit_proctor.client import AnalyzerClient, AnalyzerError
from livekit_proctor.contracts.alerts import RoomRouting
from livekit_proctor.contracts.room import RoomFeedback
from livekit_proctor.contracts.wire import AlertMessage, ControlEvent, FeedbackMessage
from livekit_proctor.retry import SESSION_START

log = logging.getLogger(__name__)

SOURCE_NAMES = {
    rtc.TrackSource.SOURCE_CAMERA: "camera",
    rtc.TrackSource.SOURCE_MICROPHONE: "microphone",
    rtc.TrackSource.SOURCE_SCREENSHARE: "screen",
}
STREAMED = frozenset({"camera", "microphone"})
TRACK_ENDED_DELAY_S = 0.5
_PERMANENT_START_ERRORS = frozenset({400, 401, 403, 404, 409, 422})


def source_name(publication: Any) -> str | None:
    return SOURCE_NAMES.get(getattr(publication, "source", None))  # type: ignore[arg-type]


@dataclass
class CandidateCounters:
    frames_in: int = 0
    frames_sampled: int = 0
    frames_encoded: int = 0
    frames_failed: int = 0
    frames_unsupported: Counter[str] = field(default_factory=Counter)  # by buffer type
    audio_bytes_in: int = 0


class CandidateSession:
    def __init__(
        self,
        info: CandidateInfo,
        *,
        room_name: str,
        client: AnalyzerClient,
        settings: AgentSettings,
        streams: MediaStreams,
        publisher: RoomPublisher,
        proctors: Callable[[], list[str]],
        on_closed: Callable[[CandidateSession, str], None],
        sessions: SessionCount = ACTIVE_SESSIONS,
    ) -> None:
        self.info = info
        self.identity = info.identity
        self.session_id = info.exam_session_id
        self.room_name = room_name
        self.client = client
        self.settings = settings
        self.streams = streams
        self.publisher = publisher
        self.proctors = proctors
        self.on_closed = on_closed
        self.sessions = sessions
        self.stream = SessionStream(
            client,
            self.session_id,
            audio_buffer_s=settings.agent_audio_buffer_s,
            on_alert=self._on_alert,
            on_feedback=self._on_feedback,
            on_ended=self._on_stream_ended,
        )
        self.counters = CandidateCounters()
        self.config: dict[str, Any] | None = None
        self.closed = False
        self.end_reason: str | None = None
        self.away = False  # left the room, within the grace period
        self._readers: dict[str, asyncio.Task[None]] = {}  # by publication sid
        self._track_state: dict[str, str] = {}
        self._slot: LatestSlot[tuple[rtc.VideoFrame, float, int]] = LatestSlot()
        self._video_clock = CaptureClock()  # per candidate: a republished camera keeps capture_ts increasing
        self._sampler = FrameSampler(self.stream.video_fps)
        self._audio_clock = AudioClock()
        self._encoder: asyncio.Task[None] | None = None
        self._grace: asyncio.Task[None] | None = None
        self._counted = False
        self._unsupported_logged: set[str] = set()
        self._ending: asyncio.Task[None] | None = None

    # ---- session

    def start_body(self) -> dict[str, Any]:
        i = self.info
        return {
            "exam_session_id": i.exam_session_id,
            "candidate_id": i.candidate_id,
            "exam_id": i.exam_id,
            "frontend_instance_id": i.frontend_instance_id,
            # Copied into every alert: where it came from and who watches (the room transport delivers by them).
            "metadata": RoomRouting(
                livekit_room=self.room_name, candidate_identity=self.identity, proctor_identities=self.proctors()
            ).as_metadata(),
        }

    async def start(self) -> bool:
        """Starts the analyzer session (retrying while the analyzer is unreachable) and its connection."""
        backoff = SESSION_START.backoff()
        while not self.closed:
            try:
                config = await self.client.start_session(self.start_body())
                break
            except AnalyzerError as e:
                if e.status in _PERMANENT_START_ERRORS:
                    log.error("session %s of %s refused by the analyzer: %s", self.session_id, self.identity, e)
                    await self.end("start_refused", end_session=False)
                    return False
                log.warning("session %s: start failed (%s); retrying", self.session_id, e)
            except httpx.HTTPError as e:
                log.warning("session %s: analyzer unreachable (%s); retrying", self.session_id, e)
            await backoff.sleep()
        else:
            return False
        if self.closed:  # ended (left, room closed) while the start was in flight: undo it
            with contextlib.suppress(AnalyzerError, httpx.HTTPError):
                await self.client.end_session(self.session_id)
            return False
        self.config = config
        self.sessions.add(1)
        self._counted = True
        self.stream.begin(config)
        self._sampler.fps = self.stream.video_fps
        self._encoder = asyncio.create_task(self._encode_loop(), name=f"encode:{self.session_id}")
        log.info("session %s started for %s in room %s", self.session_id, self.identity, self.room_name)
        return True

    async def end(self, reason: str, *, end_session: bool = True) -> None:
        """Stops handling the candidate; ends the analyzer session unless the analyzer already did."""
        if self.closed:
            return
        self.closed = True
        self.end_reason = reason
        me = asyncio.current_task()
        tasks = [t for t in (self._grace, self._encoder, *self._readers.values()) if t is not None and t is not me]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._readers.clear()
        if end_session and self.config is not None and self.stream.ended is None:
            if self.stream.connected:
                await self.stream.drain(3.0)  # buffered audio and controls first
            try:
                await self.client.end_session(self.session_id)
                # The end alerts of open incidents come over the stream just before session_ended.
                for _ in range(100):
                    if self.stream.ended is not None or not self.stream.connected:
                        break
                    await asyncio.sleep(0.02)
            except (AnalyzerError, httpx.HTTPError) as e:
                log.warning("session %s: end failed: %s", self.session_id, e)
        await self.stream.close()
        if self._counted:
            self.sessions.add(-1)
            self._counted = False
        log.info("session %s of %s: handling ended (%s)", self.session_id, self.identity, reason)
        self.on_closed(self, reason)

    # ---- room events (called from the room's event handlers; never block)

    def attach_track(self, track: Any, publication: Any) -> None:
        name = source_name(publication)
        if self.closed or name not in STREAMED or publication.sid in self._readers:
            return
        reader = self._video_reader(track) if name == "camera" else self._audio_reader(track)
        self._readers[publication.sid] = asyncio.create_task(reader, name=f"{name}:{self.session_id}")
        if getattr(publication, "muted", False):
            self.control(ControlEvent.TRACK_MUTED, name)
        elif self._track_state.get(name) in (ControlEvent.TRACK_MUTED, ControlEvent.TRACK_ENDED):
            self.control(ControlEvent.TRACK_UNMUTED, name)  # a new track after a mute or an unpublish

    def detach_track(self, publication: Any) -> None:
        task = self._readers.pop(getattr(publication, "sid", ""), None)
        if task is not None:
            task.cancel()

    def control(self, event: str, track: str | None) -> None:
        if self.closed:
            return
        if track is not None:
            if self._track_state.get(track) == event:
                return  # e.g. unpublish after mute reported twice by the SDK
            self._track_state[track] = event
        self.stream.send_control(event, track, time.time())

    def track_ended(self, track: str) -> None:
        """An unpublished track, reported a moment later: when the whole participant is leaving (their
        tracks are unpublished just before the disconnect) participant_left alone says it."""

        def report() -> None:
            if not self.away:
                self.control(ControlEvent.TRACK_ENDED, track)

        asyncio.get_running_loop().call_later(TRACK_ENDED_DELAY_S, report)

    def participant_left(self) -> None:
        if self.closed or self.away:
            return
        self.away = True
        self.stream.send_control(ControlEvent.PARTICIPANT_LEFT, None, time.time())
        for t in self._readers.values():
            t.cancel()
        self._readers.clear()
        self._grace = asyncio.create_task(self._grace_period(), name=f"grace:{self.session_id}")

    def rejoined(self, identity: str) -> None:
        if self.closed:
            return
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        self.away = False
        self.identity = identity
        self._track_state.clear()
        # A new media connection is how the analyzer learns the candidate is back (CANDIDATE_DISCONNECTED ends).
        self.stream.reconnect_now()
        log.info("session %s: %s is back", self.session_id, identity)

    async def _grace_period(self) -> None:
        await asyncio.sleep(self.settings.agent_leave_grace_s)
        await self.end("candidate_left")

    # ---- media

    async def _video_reader(self, track: Any) -> None:
        stream = self.streams.video(track)
        try:
            async for ev in stream:
                self.counters.frames_in += 1
                ts = self._video_clock(ev.timestamp_us)
                self._sampler.fps = self.stream.video_fps  # hello may change it
                if self._sampler.due(ts):
                    self.counters.frames_sampled += 1
                    # livekit annotates VideoFrameEvent.rotation as the enum class; it is the enum's int value.
                    self._slot.put((ev.frame, ts, ev.rotation))  # type: ignore[arg-type]
        finally:
            await close_stream(stream)

    async def _encode_loop(self) -> None:
        s = self.settings
        while True:
            frame, ts, rotation = await self._slot.get()
            if not self.stream.connected:
                self.stream.counters.video_skipped += 1  # no use encoding what cannot be sent
                continue
            try:
                # Conversion, scaling and JPEG take milliseconds: off the event loop.
                jpeg = await asyncio.to_thread(frame_to_jpeg, frame, s.agent_video_long_side, s.agent_jpeg_quality,
                                               rotation)  # fmt: skip
            except FrameConversionError as e:
                kind = buffer_type_name(frame.type)
                self.counters.frames_unsupported[kind] += 1
                if kind not in self._unsupported_logged:
                    self._unsupported_logged.add(kind)
                    log.warning("session %s: skipping %s frames: %s", self.session_id, kind, e)
                continue
            except Exception:
                self.counters.frames_failed += 1
                log.exception("session %s: frame encoding failed", self.session_id)
                continue
            self.counters.frames_encoded += 1
            self.stream.offer_video(jpeg, ts)

    async def _audio_reader(self, track: Any) -> None:
        stream = self.streams.audio(track)
        chunker = AudioChunker()
        try:
            async for ev in stream:
                for chunk in chunker.push(ev.frame):
                    self._put_audio(chunk, chunker.pending_bytes)
        finally:
            rest = chunker.flush()
            if rest:
                self._put_audio(rest, 0)
            await close_stream(stream)

    def _put_audio(self, pcm: bytes, pending_after: int) -> None:
        self.counters.audio_bytes_in += len(pcm)
        self.stream.put_audio(pcm, self._audio_clock.stamp(len(pcm), pending_after))

    # ---- analyzer messages

    def _on_alert(self, msg: AlertMessage) -> None:
        self.publisher.alert(msg.alert.model_dump(mode="json"))

    def _on_feedback(self, msg: FeedbackMessage) -> None:
        feedback = RoomFeedback(
            exam_session_id=self.session_id, code=msg.code, message=msg.message, incident_id=msg.incident_id, ts=msg.ts
        )
        self.publisher.feedback(self.identity, feedback)

    def _on_stream_ended(self, reason: str) -> None:
        # Keep a reference until done (the loop only holds weak ones).
        self._ending = asyncio.get_running_loop().create_task(self.end(reason, end_session=False))
