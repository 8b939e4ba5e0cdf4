"""The agent's side of the analyzer protocol (docs/protocol.md): one WebSocket per session, kept connected.

SessionStream keeps one candidate's session connected:

- reconnects with exponential backoff (livekit_proctor.retry.RECONNECT: 0.2 s doubling to 10 s, ±20 %
  jitter) and resumes the same
  session; a fresh stream token is fetched (POST /api/v1/session/{id}/token) when the old one has
  expired or the server closed with 4401;
- close codes 4404 / 4408 (and a `session_ended` message) end the session's handling, 4409 (another
  connection took over) too, without ending the session;
- audio is lossless while connected and buffered while not, up to `audio_buffer_s` seconds; beyond
  that the oldest chunks are dropped, counted and logged: the only place audio is lost. After a
  reconnect buffered control messages go first, then the buffered audio in order, then video;
- `flow` `slow_down` pauses audio sending (buffering goes on), `resume` restarts it;
- video is latest-wins: one frame waits at most, and none while disconnected (stale pictures are of
  no use to the rules).

A chunk that ws.send() accepted just before the connection died may still be lost: the protocol has no
acknowledgements. What the agent guarantees is that nothing it buffered during an outage is lost.

The protocol itself (REST calls, connecting with the token, encoding media, typed server messages) is
livekit_proctor.client (AnalyzerClient, StreamConnection), shared with the tests and bench/loadgen.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
from websockets.exceptions import ConnectionClosed, WebSocketException

from livekit_proctor.client import AnalyzerClient, AnalyzerError, StreamConnection
from livekit_proctor.contracts.wire import (
    AUDIO_SAMPLE_RATE,
    AUDIO_SAMPLE_WIDTH,
    AlertMessage,
    CloseCode,
    ControlMessage,
    ErrorMessage,
    FeedbackMessage,
    FlowMessage,
    HeartbeatMessage,
    HelloMessage,
    ServerMessage,
    SessionEndedMessage,
)
from livekit_proctor.retry import RECONNECT, RetryPolicy

log = logging.getLogger(__name__)

TOKEN_MARGIN_S = 30.0  # refresh a token this long before it expires
_ENDING = {int(CloseCode.UNKNOWN_SESSION): "unknown_session", int(CloseCode.SESSION_ENDED): "session_ended"}


def _expiry(config: dict[str, Any]) -> float:
    try:
        return datetime.fromisoformat(config["stream_token_expires_at"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return time.time() + 300  # unknown: assume short-lived, a 4401 corrects it


class _SessionGone(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class StreamCounters:
    connections: int = 0  # connections that got a hello
    connect_failures: int = 0
    token_refreshes: int = 0
    audio_chunks_sent: int = 0
    audio_bytes_sent: int = 0  # what ws.send() accepted: the audio "handed over"
    audio_chunks_dropped: int = 0
    audio_bytes_dropped: int = 0
    video_sent: int = 0
    video_replaced: int = 0  # a newer frame took its place before it was sent
    video_skipped: int = 0  # offered while disconnected, or over max_frame_bytes
    controls_sent: int = 0
    controls_dropped: int = 0
    alerts: int = 0
    feedback: int = 0
    server_errors: Counter[str] = field(default_factory=Counter)
    skipped_messages: Counter[str] = field(default_factory=Counter)  # unknown types, malformed (newer servers)

    @property
    def audio_seconds_sent(self) -> float:
        return self.audio_bytes_sent / (AUDIO_SAMPLE_RATE * AUDIO_SAMPLE_WIDTH)


class SessionStream:
    """One session's media connection; see the module docstring."""

    def __init__(
        self,
        client: AnalyzerClient,
        session_id: str,
        *,
        audio_buffer_s: float = 30.0,
        on_alert: Callable[[AlertMessage], None] | None = None,
        on_feedback: Callable[[FeedbackMessage], None] | None = None,
        on_ended: Callable[[str], None] | None = None,
        retry: RetryPolicy = RECONNECT,
        max_controls: int = 256,
        hello_timeout: float = 10.0,
    ) -> None:
        self.client = client
        self.session_id = session_id
        self.on_alert, self.on_feedback, self.on_ended = on_alert, on_feedback, on_ended
        self.retry = retry
        self.hello_timeout = hello_timeout
        self.counters = StreamCounters()
        self.video_fps = 5.0
        self.max_frame_bytes = 2 * 1024 * 1024
        self.connected = False
        self.flow_paused = False
        self.ended: str | None = None  # reason, once the session's handling is over
        self.last_heartbeat: HeartbeatMessage | None = None
        self._token = ""
        self._token_expires = 0.0
        self._need_token = False
        self._audio_max = int(audio_buffer_s * AUDIO_SAMPLE_RATE * AUDIO_SAMPLE_WIDTH)
        self._audio: deque[tuple[int, float, bytes]] = deque()
        self._audio_bytes = 0
        self._inflight: tuple[int, float, bytes] | None = None
        self._aseq = 0
        self._vseq = 0
        self._video: tuple[int, float, bytes] | None = None
        self._controls: deque[ControlMessage] = deque()
        self._max_controls = max_controls
        self._wake = asyncio.Event()
        self._connected_evt = asyncio.Event()
        self._ws: StreamConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._reconnect_requested = False
        self._last_drop_log = 0.0
        self._got_hello = False
        self._closing: asyncio.Task[None] | None = None

    # ---- lifecycle

    def begin(self, config: dict[str, Any]) -> None:
        """Starts connecting with the SessionConfig of session start."""
        self._apply_config(config)
        fps = (config.get("policy") or {}).get("video_fps")
        if isinstance(fps, int | float) and fps > 0:
            self.video_fps = float(fps)
        self._task = asyncio.create_task(self._run(), name=f"analyzer-stream:{self.session_id}")

    def _apply_config(self, config: dict[str, Any]) -> None:
        self._token = config["stream_token"]
        self._token_expires = _expiry(config)

    async def close(self) -> None:
        self._stopping = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def reconnect_now(self) -> None:
        """Opens a new connection right away (the analyzer ends CANDIDATE_DISCONNECTED on a reconnect)."""
        ws = self._ws
        if ws is None:
            return
        self._reconnect_requested = True
        # Referenced until done: the loop itself keeps only weak references to tasks.
        self._closing = asyncio.get_running_loop().create_task(ws.close(code=1000, reason="candidate rejoined"))

    async def wait_connected(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await asyncio.wait_for(self._connected_evt.wait(), timeout)

    async def drain(self, timeout: float = 5.0) -> bool:  # noqa: ASYNC109
        """Waits until buffered controls and audio are handed over; False if that did not happen in time."""
        deadline = time.monotonic() + timeout
        while self._controls or self._audio or self._inflight is not None:
            if time.monotonic() > deadline or self.ended is not None or self._task is None:
                return False
            await asyncio.sleep(0.02)
        return True

    @property
    def audio_buffered_bytes(self) -> int:
        return self._audio_bytes

    # ---- media in (from the candidate's readers; never blocks)

    def put_audio(self, pcm: bytes, ts: float) -> None:
        if self.ended is not None or not pcm:
            return
        self._aseq += 1
        self._audio.append((self._aseq, ts, pcm))
        self._audio_bytes += len(pcm)
        while self._audio_bytes > self._audio_max and len(self._audio) > 1:
            _, _, old = self._audio.popleft()
            self._audio_bytes -= len(old)
            self.counters.audio_chunks_dropped += 1
            self.counters.audio_bytes_dropped += len(old)
            now = time.monotonic()
            if now - self._last_drop_log > 5.0:
                self._last_drop_log = now
                log.warning(
                    "session %s: analyzer unreachable beyond the %.0f s audio buffer; dropped %d chunks so far",
                    self.session_id,
                    self._audio_max / (AUDIO_SAMPLE_RATE * AUDIO_SAMPLE_WIDTH),
                    self.counters.audio_chunks_dropped,
                )
        self._wake.set()

    def offer_video(self, jpeg: bytes, ts: float) -> bool:
        if not self.connected or len(jpeg) > self.max_frame_bytes:
            self.counters.video_skipped += 1
            return False
        if self._video is not None:
            self.counters.video_replaced += 1
        self._vseq += 1
        self._video = (self._vseq, ts, jpeg)
        self._wake.set()
        return True

    def send_control(self, event: str, track: str | None = None, ts: float | None = None) -> None:
        if self.ended is not None:
            return
        msg = ControlMessage.model_validate(
            {"type": "control", "event": event, "track": track, "ts": ts if ts is not None else time.time()}
        )
        if len(self._controls) >= self._max_controls:
            self._controls.popleft()
            self.counters.controls_dropped += 1
        self._controls.append(msg)
        self._wake.set()

    # ---- connection loop

    async def _run(self) -> None:
        backoff = self.retry.backoff()
        while not self._stopping and self.ended is None:
            code: int | None = None
            try:
                if self._need_token or time.time() > self._token_expires - TOKEN_MARGIN_S:
                    await self._refresh_token()
                code = await self._connect_once()
                if self._got_hello:
                    backoff.reset()
            except _SessionGone as e:
                self._finish(e.reason)
                return
            except (OSError, TimeoutError, WebSocketException, httpx.HTTPError, AnalyzerError, ValueError) as e:
                self.counters.connect_failures += 1
                log.info("session %s: analyzer connection failed (%s: %s)", self.session_id, type(e).__name__, e)
            if self._stopping:
                return
            if code is not None and not self._reconnect_requested:
                log.info("session %s: analyzer closed the connection with %s", self.session_id, code)
            if code in _ENDING:
                self._finish(_ENDING[code])
                return
            if code == CloseCode.SUPERSEDED:
                self._finish("superseded")
                return
            if code == CloseCode.UNAUTHORIZED:
                self._need_token = True
            if self._reconnect_requested:
                self._reconnect_requested = False
                continue
            await backoff.sleep()

    async def _refresh_token(self) -> None:
        try:
            config = await self.client.refresh_token(self.session_id)
        except AnalyzerError as e:
            if e.status == 404:
                raise _SessionGone("unknown_session") from None
            if e.status == 409:
                raise _SessionGone("session_ended") from None
            raise
        self._apply_config(config)
        self._need_token = False
        self.counters.token_refreshes += 1

    async def _connect_once(self) -> int | None:
        self._got_hello = False
        async with StreamConnection.connect(self.client.stream_url(self.session_id), self._token) as ws:
            self._ws = ws
            try:
                try:
                    first = await asyncio.wait_for(ws.recv(), self.hello_timeout)
                except ConnectionClosed:
                    return ws.close_code  # refused after the upgrade: 4401, 4404, 4408
                self._on_message(first)
                self._got_hello = True
                self.connected = True
                self._connected_evt.set()
                self.counters.connections += 1
                if self.counters.connections > 1:
                    log.info("session %s: reconnected to the analyzer", self.session_id)
                self._wake.set()
                sender = asyncio.create_task(self._sender(ws), name=f"analyzer-send:{self.session_id}")
                try:
                    async for msg in ws:
                        self._on_message(msg)
                finally:
                    self.counters.skipped_messages.update(ws.skipped)
                    self.connected = False
                    self._connected_evt.clear()
                    self._video = None
                    sender.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await sender
                return ws.close_code
            finally:
                self.connected = False
                self._ws = None

    async def _sender(self, ws: StreamConnection) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while await self._send_one(ws):
                    pass
        except ConnectionClosed:
            return  # the reader sees the close and the loop reconnects
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("session %s: sender failed; reconnecting", self.session_id)
            with contextlib.suppress(Exception):
                await ws.close(code=1011, reason="agent sender failed")

    async def _send_one(self, ws: StreamConnection) -> bool:
        """Sends the next message by priority: controls, then audio (unless paused), then video."""
        if self._controls:
            await ws.send_control(self._controls[0])
            self._controls.popleft()
            self.counters.controls_sent += 1
            return True
        if self._audio and not self.flow_paused:
            item = self._audio.popleft()
            self._audio_bytes -= len(item[2])
            self._inflight = item
            try:
                seq, ts, pcm = item
                await ws.send_audio(pcm, ts, seq)
            except BaseException:
                # Not handed over: back to the head of the buffer, resent after the reconnect.
                self._audio.appendleft(item)
                self._audio_bytes += len(item[2])
                raise
            finally:
                self._inflight = None
            self.counters.audio_chunks_sent += 1
            self.counters.audio_bytes_sent += len(item[2])
            return True
        if self._video is not None:
            (vseq, vts, jpeg), self._video = self._video, None
            await ws.send_video(jpeg, vts, vseq)
            self.counters.video_sent += 1
            return True
        return False

    # ---- server messages (never block: the analyzer cuts off clients that do not read, 4429)

    def _on_message(self, msg: ServerMessage) -> None:
        # Unknown types and messages that do not validate never get here: StreamConnection skips and counts them.
        if isinstance(msg, HelloMessage):
            if msg.video_fps > 0:
                self.video_fps = msg.video_fps
            if msg.max_frame_bytes > 0:
                self.max_frame_bytes = msg.max_frame_bytes
        elif isinstance(msg, AlertMessage):
            self.counters.alerts += 1
            self._callback(self.on_alert, msg)
        elif isinstance(msg, FeedbackMessage):
            self.counters.feedback += 1
            self._callback(self.on_feedback, msg)
        elif isinstance(msg, FlowMessage):
            self.flow_paused = msg.audio == "slow_down"
            self._wake.set()
        elif isinstance(msg, HeartbeatMessage):
            self.last_heartbeat = msg
        elif isinstance(msg, ErrorMessage):
            self.counters.server_errors[msg.code] += 1
            log.debug("session %s: analyzer rejected a message: %s %s", self.session_id, msg.code, msg.reason)
        elif isinstance(msg, SessionEndedMessage):
            log.info("session %s ended at the analyzer (%s)", self.session_id, msg.reason)
            self._finish(msg.reason or "session_ended")

    def _callback(self, fn: Callable[[Any], None] | None, arg: Any) -> None:
        if fn is None:
            return
        try:
            fn(arg)
        except Exception:
            log.exception("session %s: message handler failed", self.session_id)

    def _finish(self, reason: str) -> None:
        if self.ended is not None:
            return
        self.ended = reason
        self.connected = False
        if self.on_ended is not None:
            try:
                self.on_ended(reason)
            except Exception:
                log.exception("session %s: on_ended failed", self.session_id)
