"""The client side of the v1 protocol (docs/protocol.md), shared by the agent, the tests and bench/loadgen.py:
AnalyzerClient for the REST calls of a backend (session start, token, end, state), StreamConnection for the
media WebSocket.

    async with StreamConnection.connect(stream_url, stream_token) as conn:
        hello = await conn.recv()                        # a HelloMessage
        await conn.send_video(jpeg, capture_ts)          # binary header + JPEG (seq counted here)
        pong = await conn.sync()                         # needs a reader: see sync()
        async for msg in conn:                           # typed server messages until the close
            ...

Server messages come back as the models of livekit_proctor.contracts.wire (ServerMessage); a message of an
unknown type or one that does not validate is skipped and counted (clients must ignore what they do not
know), unless the connection is strict (tests: every message the analyzer sends must parse).

This module speaks the protocol only: no buffering, reconnecting or media pacing (the agent's SessionStream
and the load generator do that their own way). It imports contracts only, never the analyzer or dispatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, Literal

import httpx
import websockets
from websockets.exceptions import ConnectionClosed

from livekit_proctor.contracts import wire
from livekit_proctor.contracts.wire import ControlMessage, PongMessage, ServerMessage

try:  # websockets >= 13
    from websockets.asyncio.client import connect as _ws_connect

    _NEW_API = True
except ImportError:  # pragma: no cover - websockets 12
    # The legacy connect function in place of 13's connect class: a different type, the same call.
    _ws_connect = websockets.connect  # type: ignore[misc]
    _NEW_API = False

log = logging.getLogger(__name__)

# Larger than any message the analyzer sends (an alert with its thumbnail is tens of KiB).
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def stream_url(base_url: str, session_id: str) -> str:
    """The v1 stream URL of a session on the analyzer at base_url (http[s]://host:port)."""
    base = base_url.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base[8:]
    elif base.startswith("http://"):
        base = "ws://" + base[7:]
    return f"{base}/api/v1/session/{session_id}/stream"


def _open(url: str, token: str | None, token_in: Literal["header", "query"], **options: Any) -> Any:
    kw: dict[str, Any] = {"max_size": MAX_MESSAGE_BYTES, "open_timeout": 10, "close_timeout": 2, "compression": None}
    kw.update(options)
    headers: dict[str, str] = {}
    if token and token_in == "header":
        headers["Authorization"] = f"Bearer {token}"  # a header keeps the token out of access logs
    elif token:
        url = f"{url}{'&' if '?' in url else '?'}token={token}"  # browsers' way; what stream_url + token means
    if _NEW_API:
        if headers:
            kw["additional_headers"] = headers
        if "proxy" in inspect.signature(_ws_connect.__init__).parameters:
            kw.setdefault("proxy", None)  # the analyzer is a direct peer; never route media through HTTP(S)_PROXY
    elif headers:  # pragma: no cover
        kw["extra_headers"] = headers
    return _ws_connect(url, **kw)


class AnalyzerError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"analyzer answered {status}: {message}")
        self.status = status


class AnalyzerClient:
    """REST calls with an API key (role `system` or `admin`); `http` for other routes (/metrics, ...)."""

    def __init__(self, base_url: str, api_key: str | None, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout, trust_env=False)

    async def __aenter__(self) -> AnalyzerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        r = await self.http.request(method, path, json=body)
        if r.status_code >= 400:
            raise AnalyzerError(r.status_code, r.text[:500])
        return r.json()

    async def start_session(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call("POST", "/api/v1/session/start", body)

    async def refresh_token(self, session_id: str) -> dict[str, Any]:
        return await self._call("POST", f"/api/v1/session/{session_id}/token")

    async def end_session(self, session_id: str) -> dict[str, Any] | None:
        try:
            return await self._call("POST", f"/api/v1/session/{session_id}/end")
        except AnalyzerError as e:
            if e.status == 404:
                return None
            raise

    async def session(self, session_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/api/v1/session/{session_id}")

    async def ready(self) -> bool:
        try:
            r = await self.http.get("/.well-known/ready")
            return r.status_code == 200 and bool(r.json().get("ready"))
        except (httpx.HTTPError, ValueError):
            return False

    def stream_url(self, session_id: str) -> str:
        # Built from the agent's own analyzer URL, not the advertised stream_url: that one is for browsers
        # (PROCTOR_PUBLIC_URL) and may not be reachable from inside the cluster.
        return stream_url(self.base_url, session_id)

    async def aclose(self) -> None:
        await self.http.aclose()


class StreamConnection:
    """One open v1 connection: encoded media, controls and pings out; typed server messages in."""

    def __init__(self, ws: Any, *, strict: bool = False) -> None:
        self.ws = ws  # the raw WebSocket, for tests that send what no well-behaved client would
        self.strict = strict
        self.video_seq = 0  # the last seq sent of each kind (when the caller does not choose it)
        self.audio_seq = 0
        self.skipped: Counter[str] = Counter()  # server messages skipped: "unknown_type", "malformed"
        self.last_text = ""  # the JSON text of the message recv() returned last
        self._pings: dict[str, asyncio.Future[PongMessage]] = {}
        self._ping_n = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        url: str,
        token: str | None = None,
        *,
        token_in: Literal["header", "query"] = "header",
        strict: bool = False,
        **options: Any,
    ) -> AsyncIterator[StreamConnection]:
        """Opens the WebSocket (token as `Authorization: Bearer`, or `?token=`); options go to websockets."""
        async with _open(url, token, token_in, **options) as ws:
            conn = cls(ws, strict=strict)
            try:
                yield conn
            finally:
                conn._fail_pings()

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    @property
    def close_reason(self) -> str:
        return str(self.ws.close_reason or "")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code=code, reason=reason)

    # ---- client -> server

    async def send_video(self, jpeg: bytes, capture_ts: float, seq: int | None = None) -> int:
        """Sends one JPEG frame; returns its seq (one more than the last, unless given)."""
        self.video_seq = self.video_seq + 1 if seq is None else seq
        await self.ws.send(wire.encode_video(self.video_seq, capture_ts, jpeg))
        return self.video_seq

    async def send_audio(self, pcm: bytes, capture_ts: float, seq: int | None = None) -> int:
        """Sends one chunk of PCM s16le 16 kHz mono; returns its seq."""
        self.audio_seq = self.audio_seq + 1 if seq is None else seq
        await self.ws.send(wire.encode_audio(self.audio_seq, capture_ts, pcm))
        return self.audio_seq

    async def send_control(self, msg: ControlMessage) -> None:
        await self.ws.send(msg.model_dump_json(exclude_none=True))

    async def ping(self, ping_id: str | None = None) -> asyncio.Future[PongMessage]:
        """Sends a ping; the future gets its pong once recv() (whoever reads) sees it."""
        if ping_id is None:
            self._ping_n += 1
            ping_id = f"sync-{self._ping_n}"
        fut: asyncio.Future[PongMessage] = asyncio.get_running_loop().create_future()
        self._pings[ping_id] = fut
        await self.ws.send(wire.PingMessage(type="ping", id=ping_id).model_dump_json())
        return fut

    async def sync(self, timeout: float = 120.0) -> PongMessage:  # noqa: ASYNC109
        """The protocol's barrier: returns once everything sent before it has been analysed and the alerts it
        raised have arrived. Another task must be reading (recv() / async for) meanwhile."""
        fut = await self.ping()
        return await asyncio.wait_for(fut, timeout)

    # ---- server -> client

    async def recv(self) -> ServerMessage:
        """The next server message; raises websockets.ConnectionClosed once the connection is closed."""
        while True:
            try:
                raw = await self.ws.recv()
            except ConnectionClosed:
                self._fail_pings()
                raise
            if not isinstance(raw, str):
                self._skip("binary", "a binary message")
                continue
            try:
                msg = wire.parse_server_message(raw)
            except wire.UnknownServerMessage as e:
                self._skip("unknown_type", e.reason)
                continue
            except wire.ProtocolError as e:
                self._skip("malformed", e.reason)
                continue
            self.last_text = raw
            if isinstance(msg, PongMessage) and msg.id is not None:
                fut = self._pings.pop(msg.id, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            return msg

    async def __aiter__(self) -> AsyncIterator[ServerMessage]:
        """Server messages until the connection closes (the close ends the iteration, it does not raise)."""
        while True:
            try:
                yield await self.recv()
            except ConnectionClosed:
                return

    def _skip(self, what: str, reason: str) -> None:
        if self.strict:
            raise wire.ProtocolError(what, f"server sent {reason}")
        self.skipped[what] += 1
        log.debug("skipped a server message (%s): %s", what, reason)

    def _fail_pings(self) -> None:
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(ConnectionError("connection closed before the pong"))
                fut.exception()  # retrieved: nobody may be waiting for it
        self._pings.clear()
