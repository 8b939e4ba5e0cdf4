"""WebSocket endpoints: the versioned media stream and the legacy /ws/proctor/... endpoints.

Per message: a bad message is counted, answered with an ErrorMessage and skipped; the session goes on.
Every server message is a model of proctor.contracts.wire (ServerMessage); close codes are in
proctor.contracts.wire.CloseCode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from livekit_proctor import observability
from livekit_proctor.analyzer.auth import CAN_MANAGE_SESSIONS, CAN_READ_SESSIONS
from livekit_proctor.analyzer.jpeg import JpegHeaderError, jpeg_size
from livekit_proctor.analyzer.resample import PcmResampler, parse_rate
from livekit_proctor.analyzer.sessions import LiveSession, SessionClosed, SessionNotFound, Subscriber
from livekit_proctor.contracts.wire import (
    AUDIO_SAMPLE_RATE,
    AUDIO_SAMPLE_WIDTH,
    AlertMessage,
    CloseCode,
    ControlMessage,
    ErrorMessage,
    HeartbeatMessage,
    HeartbeatStats,
    HelloMessage,
    Kind,
    MediaMessage,
    PingMessage,
    PongMessage,
    ProtocolError,
    SessionEndedMessage,
    check_capture_time,
    decode_media,
    encode_server_message,
    parse_text,
)
from livekit_proctor.tokens import StreamClaims, TokenError, verify

log = logging.getLogger(__name__)
router = APIRouter()
MAX_PENDING_PINGS = 32  # per connection: each waits for the analysis of what came before it


def _token(ws: WebSocket) -> str | None:
    tok = ws.query_params.get("token")
    if tok:
        return tok
    auth = ws.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


_background: set[asyncio.Task[Any]] = set()


def _spawn(coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)  # keep a reference until done
    task.add_done_callback(_background.discard)


async def _close(ws: WebSocket, code: CloseCode, reason: str) -> None:
    with contextlib.suppress(Exception):
        await ws.close(code=int(code), reason=reason[:120])


async def _open(
    ws: WebSocket, session_id: str, require_token: bool = True, key_roles: frozenset[str] = CAN_MANAGE_SESSIONS
) -> LiveSession | None:
    """Accepts, authenticates, then checks the session; closes with a code and reason on failure.

    Credentials are checked before the session is looked up, so a client cannot probe which session ids
    exist: anonymous clients, and stream tokens of another session, get the same 4401 whether the session
    exists, has ended or never did. Accepted: a stream token of this sitting of this session, or an API key
    whose role is in key_roles (trusted backends, told 4404 / 4408 apart).
    """
    observability.bind(session_id=session_id)  # for every record of this connection, uvicorn's included
    await ws.accept()
    st = ws.app.state
    mgr = st.sessions
    claims: StreamClaims | None = None
    if require_token:
        token = _token(ws)
        if not token:
            await _close(ws, CloseCode.UNAUTHORIZED, "missing stream token (?token=...)")
            return None
        principal = st.keys.lookup(token)
        if principal is not None:
            if principal.role not in key_roles:
                await _close(ws, CloseCode.UNAUTHORIZED, f"role '{principal.role}' may not use this endpoint")
                return None
        else:
            try:
                claims = verify(st.stream_secret, token)
            except TokenError as e:
                await _close(ws, CloseCode.UNAUTHORIZED, str(e))
                return None
            if claims.session_id != session_id:
                await _close(ws, CloseCode.UNAUTHORIZED, "stream token is for another session")
                return None
    row = await mgr.row(session_id)
    if row is None:
        await _close(ws, CloseCode.UNKNOWN_SESSION, f"unknown session {session_id}")
        return None
    if claims is not None and claims.sitting != (row.sitting or ""):
        reason = "stream token is for an earlier sitting of this session; request a new one"
        await _close(ws, CloseCode.UNAUTHORIZED, reason)
        return None
    if row.state != "active":
        await _close(ws, CloseCode.SESSION_ENDED, f"session {session_id} is {row.state}")
        return None
    try:
        return await mgr.get_live(session_id)
    except SessionNotFound:
        await _close(ws, CloseCode.UNKNOWN_SESSION, f"unknown session {session_id}")
    except SessionClosed as e:
        await _close(ws, CloseCode.SESSION_ENDED, f"session {session_id} is {e}")
    return None


class MediaConnection:
    """One client feeding media into a session; also receives alerts, heartbeats and hints."""

    def __init__(self, ws: WebSocket, live: LiveSession, legacy_kind: Kind | None = None) -> None:
        self.ws = ws
        self.live = live
        self.legacy_kind = legacy_kind  # legacy endpoints carry bare payloads of one kind
        self.settings = ws.app.state.settings
        self.metrics = ws.app.state.metrics
        self.sub: Subscriber = live.subscribe(media=True)
        if legacy_kind is None:
            self.sub.on_overflow = lambda: _spawn(_close(ws, CloseCode.TOO_SLOW, "client does not read its messages"))
        # else: legacy media clients may never read; what they miss is on /events and in the outbox.
        self._seq = 0
        self._pings = 0  # pings waiting for their pong
        self._tasks: list[asyncio.Task[Any]] = []

    def error(self, code: str, reason: str, seq: int | None = None) -> None:
        self.metrics.protocol_errors.labels(code).inc()
        self.sub.offer(ErrorMessage(code=code, reason=reason, seq=seq), droppable=True)

    async def run(self) -> None:
        live = self.live
        old = live.connection
        if old is not None and old is not self.ws and self.legacy_kind is None:
            await _close(old, CloseCode.SUPERSEDED, "replaced by a newer connection for this session")
        if self.legacy_kind in (None, Kind.VIDEO):
            live.connection = self.ws
            live.on_connect()
        self.metrics.connected_streams.inc()
        self._tasks = [asyncio.create_task(self._sender())]
        if self.legacy_kind is None:  # legacy clients expect no hello or heartbeats on their media sockets
            self.sub.offer(
                HelloMessage(
                    session_id=live.id,
                    video_fps=live.policy.video_fps,
                    max_frame_bytes=self.settings.max_frame_bytes,
                    max_frame_pixels=self.settings.max_frame_pixels,
                    max_clock_skew_s=self.settings.max_clock_skew_s,
                    heartbeat_s=self.settings.heartbeat_s,
                )
            )
            self._tasks.append(asyncio.create_task(self._heartbeat()))
        try:
            await self._receive_loop()
        except WebSocketDisconnect:
            pass
        finally:
            for t in self._tasks:
                t.cancel()
            live.unsubscribe(self.sub)
            if live.connection is self.ws:
                live.connection = None
            self.metrics.connected_streams.dec()

    async def _sender(self) -> None:
        try:
            while True:
                msg = await self.sub.queue.get()
                await self.ws.send_text(encode_server_message(msg))
                if isinstance(msg, SessionEndedMessage):
                    await _close(self.ws, CloseCode.SESSION_ENDED, f"session ended: {msg.reason}")
                    return
        except (WebSocketDisconnect, RuntimeError):
            return

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            stats = HeartbeatStats.model_validate(self.live.stats())
            self.sub.offer(HeartbeatMessage(ts=time.time(), session_id=self.live.id, stats=stats), droppable=True)

    async def _receive_loop(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            try:
                data = message.get("bytes")
                if data is not None:
                    await self._on_binary(data)
                    continue
                text = message.get("text")
                if text is not None:
                    self._on_text(text)
            except Exception as e:
                # A bug must not cost the session its connection: the message is reported and skipped.
                self.live.counters.worker_errors += 1
                self.metrics.worker_errors.labels("receive").inc()
                log.error("session %s: a client message could not be processed: %s", self.live.id, e, exc_info=e)
                self.error("internal_error", "this message could not be processed (internal error); it was skipped")

    async def _on_binary(self, data: bytes) -> None:
        live = self.live
        if self.legacy_kind is not None:
            self._seq += 1
            msg = MediaMessage(self.legacy_kind, self._seq, time.time(), data)
        else:
            try:
                msg = decode_media(data)
            except ProtocolError as e:
                live.counters.messages_malformed += 1
                self.error(e.code, e.reason)
                return
        problem = self._check_video(msg) if msg.kind is Kind.VIDEO else self._check_audio(msg)
        if problem is None:
            if msg.kind is Kind.VIDEO:
                live.offer_frame(msg)
            else:
                await live.offer_audio(msg)
            return
        if msg.kind is Kind.VIDEO:
            live.reject_frame()
        else:
            live.reject_audio()
        self.error(problem.code, problem.reason, msg.seq)

    def _check_time(self, ts: float) -> ProtocolError | None:
        try:
            check_capture_time(ts, time.time(), self.settings.max_clock_skew_s)
        except ProtocolError as e:
            return e
        return None

    def _check_video(self, msg: MediaMessage) -> ProtocolError | None:
        """Everything about a frame that can be known without decoding it; None when it may be analysed."""
        s = self.settings
        n = len(msg.payload)
        if n > s.max_frame_bytes:
            return ProtocolError("frame_too_large", f"frame of {n} bytes exceeds max_frame_bytes={s.max_frame_bytes}")
        if msg.payload[:2] != b"\xff\xd8":
            return ProtocolError("not_jpeg", "video payload is not a JPEG (missing FF D8 start marker)")
        try:
            width, height = jpeg_size(msg.payload)
        except JpegHeaderError as e:
            return ProtocolError("undecodable_jpeg", str(e))
        if width * height > s.max_frame_pixels:
            return ProtocolError(
                "frame_too_many_pixels",
                f"JPEG of {width}x{height} pixels exceeds max_frame_pixels={s.max_frame_pixels}; scale it down",
            )
        return self._check_time(msg.capture_ts)

    def _check_audio(self, msg: MediaMessage) -> ProtocolError | None:
        n = len(msg.payload)
        if n % AUDIO_SAMPLE_WIDTH:
            return ProtocolError("pcm_odd_length", f"PCM s16le chunk has odd length {n}; samples are 2 bytes")
        if n > self.settings.max_audio_chunk_bytes:
            return ProtocolError(
                "audio_chunk_too_large", f"audio chunk of {n} bytes exceeds {self.settings.max_audio_chunk_bytes}"
            )
        return self._check_time(msg.capture_ts)

    def _on_text(self, text: str) -> None:
        live = self.live
        try:
            msg = parse_text(text)
            if isinstance(msg, ControlMessage) and msg.ts is not None:
                check_capture_time(msg.ts, time.time(), self.settings.max_clock_skew_s)
        except ProtocolError as e:
            live.counters.messages_malformed += 1
            self.error(e.code, e.reason)
            return
        if isinstance(msg, PingMessage):
            self._ping(msg.id)
            return
        live.on_control(msg.event, msg.track, msg.ts if msg.ts is not None else time.time())

    def _ping(self, ping_id: str | None) -> None:
        """The pong comes once everything received before the ping has been analysed (docs/protocol.md)."""
        if self._pings >= MAX_PENDING_PINGS:
            self.live.counters.messages_malformed += 1
            self.error("too_many_pings", f"more than {MAX_PENDING_PINGS} pings waiting for their pong")
            return
        self._pings += 1

        async def answer() -> None:
            try:
                await self.live.settled()
            finally:
                self._pings -= 1
            self.sub.offer(PongMessage(ts=time.time(), id=ping_id))

        task = asyncio.create_task(answer())
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)


@router.websocket("/api/v1/session/{session_id}/stream")
async def media_stream(ws: WebSocket, session_id: str) -> None:
    live = await _open(ws, session_id)
    if live is None:
        return
    try:
        await MediaConnection(ws, live).run()
    except Exception:
        log.exception("stream handler failed for %s", session_id)
        if ws.application_state != WebSocketState.DISCONNECTED:
            await _close(ws, CloseCode.INTERNAL_ERROR, "internal error")


async def _legacy_media(ws: WebSocket, session_id: str, kind: Kind) -> None:
    live = await _open(ws, session_id, require_token=ws.app.state.settings.legacy_ws_auth != "none")
    if live is None:
        return
    conn: MediaConnection
    if kind is Kind.AUDIO:
        try:
            rate = parse_rate(ws.query_params.get("sample_rate"), ws.app.state.settings.legacy_audio_sample_rate)
        except ValueError as e:
            await _close(ws, CloseCode.BAD_REQUEST, str(e))
            return
        conn = LegacyAudioConnection(ws, live, rate)
    else:
        conn = MediaConnection(ws, live, legacy_kind=kind)
    try:
        await conn.run()
    except Exception:
        log.exception("legacy %s handler failed for %s", kind.name, session_id)
        await _close(ws, CloseCode.INTERNAL_ERROR, "internal error")


class LegacyAudioConnection(MediaConnection):
    """Legacy audio at the client's sample rate: converted to 16 kHz before the usual checks and queueing."""

    def __init__(self, ws: WebSocket, live: LiveSession, sample_rate: int) -> None:
        super().__init__(ws, live, legacy_kind=Kind.AUDIO)
        self.sample_rate = sample_rate
        self._resampler = PcmResampler(sample_rate) if sample_rate != AUDIO_SAMPLE_RATE else None
        # The chunk size limit is a duration: the same number of seconds at the client's rate.
        self._max_in = self.settings.max_audio_chunk_bytes * sample_rate // AUDIO_SAMPLE_RATE

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            if self._resampler is not None and self.live.state == "active":
                tail = self._resampler.flush()  # the last few ms, so the session gets the whole duration
                await self._offer(tail)

    async def _on_binary(self, data: bytes) -> None:
        if self._resampler is None:
            await super()._on_binary(data)
            return
        n = len(data)
        problem: ProtocolError | None = None
        if n % AUDIO_SAMPLE_WIDTH:
            problem = ProtocolError("pcm_odd_length", f"PCM s16le chunk has odd length {n}; samples are 2 bytes")
        elif n > self._max_in:
            problem = ProtocolError("audio_chunk_too_large", f"audio chunk of {n} bytes exceeds {self._max_in}")
        if problem is not None:
            self.live.reject_audio()
            self.error(problem.code, problem.reason)
            return
        await self._offer(self._resampler.push(data))

    async def _offer(self, pcm: bytes) -> None:
        # The resampler may hold a short chunk back (pcm is empty) or release a little more than one chunk's
        # worth: what goes on is cut to the session's chunk limit.
        step = self.settings.max_audio_chunk_bytes // AUDIO_SAMPLE_WIDTH * AUDIO_SAMPLE_WIDTH
        for i in range(0, len(pcm), step):
            await super()._on_binary(pcm[i : i + step])


@router.websocket("/ws/proctor/{session_id}/video")
async def legacy_video(ws: WebSocket, session_id: str) -> None:
    """Binary messages, each one whole JPEG; seq and timestamp are assigned on arrival."""
    await _legacy_media(ws, session_id, Kind.VIDEO)


@router.websocket("/ws/proctor/{session_id}/audio")
async def legacy_audio(ws: WebSocket, session_id: str) -> None:
    """Binary messages of raw PCM s16le mono at ?sample_rate= (default PROCTOR_LEGACY_AUDIO_SAMPLE_RATE, 16 kHz);
    other rates are resampled to 16 kHz."""
    await _legacy_media(ws, session_id, Kind.AUDIO)


LEGACY_EVENT_FORMATS = ("compat", "alert")


def legacy_alert_texts(alert: dict[str, Any]) -> list[str]:
    """The short texts a Procturing-Realtime client shows for an alert ("Phone detected"): one when an
    incident starts (or for an alert without incidents), none for its updates and end."""
    if alert.get("incident_state") not in (None, "started"):
        return []
    return [str(alert.get("event_type", "alert")).replace("_", " ").capitalize()]


def legacy_event(alert: dict[str, Any], fmt: str) -> dict[str, Any]:
    """One /events message: the canonical alert, plus (format "compat") the `alerts` list of texts that
    Procturing-Realtime's clients read (`data.get("alerts", [])`)."""
    if fmt == "alert":
        return alert
    return {**alert, "alerts": legacy_alert_texts(alert)}


@router.websocket("/ws/proctor/{session_id}/events")
async def legacy_events(ws: WebSocket, session_id: str) -> None:
    """JSON alerts out: one canonical alert per text message, with an `alerts` list of short texts
    (?format=compat, the default) or bare (?format=alert)."""
    live = await _open(
        ws, session_id, require_token=ws.app.state.settings.legacy_ws_auth != "none", key_roles=CAN_READ_SESSIONS
    )
    if live is None:
        return
    fmt = ws.query_params.get("format") or "compat"
    if fmt not in LEGACY_EVENT_FORMATS:
        await _close(ws, CloseCode.BAD_REQUEST, f"format must be one of {', '.join(LEGACY_EVENT_FORMATS)}")
        return
    sub = live.subscribe()
    sub.on_overflow = lambda: _spawn(_close(ws, CloseCode.TOO_SLOW, "client does not read its messages"))

    async def drain_client() -> None:
        # Clients may send keepalives; they are ignored. A disconnect ends the handler.
        while (await ws.receive())["type"] != "websocket.disconnect":
            pass

    reader = asyncio.create_task(drain_client())
    try:
        while not reader.done():
            get = asyncio.create_task(sub.queue.get())
            await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                break
            msg = get.result()
            if isinstance(msg, AlertMessage):
                event = legacy_event(msg.alert.model_dump(mode="json"), fmt)
                await ws.send_text(json.dumps(event, separators=(",", ":")))
            elif isinstance(msg, SessionEndedMessage):
                await _close(ws, CloseCode.SESSION_ENDED, "session ended")
                break
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        reader.cancel()
        live.unsubscribe(sub)
