"""Shared fixtures: the shared data folder, a real analyzer server on loopback, a streaming client."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import inspect
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Self

import cv2
import httpx
import numpy as np
import pytest
import uvicorn
import websockets

from livekit_proctor.client import StreamConnection
from livekit_proctor.contracts import wire

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY, SYSTEM_KEY, PROCTOR_KEY = "test-admin-key", "test-system-key", "test-proctor-key"


def shared_data() -> Path | None:
    d = Path(os.environ.get("PROCTOR_SHARED_DATA", REPO.parent / "shared" / "data"))
    return d if (d / "manifest.csv").exists() else None


def legacy_mediapipe() -> Any:
    """mediapipe's own Python API, to check our decoders against it; skips where it cannot load.

    It is not a dependency: its protobuf<5 pin conflicts with livekit's protobuf>=5. Run these checks in a
    virtualenv with `pip install mediapipe==0.10.21`.
    """
    try:
        import mediapipe as mp

        mp.solutions.face_mesh  # noqa: B018 - touches the part that needs a compatible protobuf
    except Exception as e:
        pytest.skip(f"mediapipe's Python API not usable here ({type(e).__name__}): reference check skipped")
    return mp


def load_rgb(rel: str) -> np.ndarray:
    """An image of the shared data as RGB; skips the test when the data is not there."""
    d = shared_data()
    if d is None or not (d / rel).is_file():
        pytest.skip(f"shared data not available: {rel}")
    bgr = cv2.imread(str(d / rel))
    assert bgr is not None, rel
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def oep_frames(n: int) -> list[str]:
    """n OEP frame paths (relative to the shared data), spread over subjects and conditions; skips if absent."""
    d = shared_data()
    labels = d / "faces" / "webcam_oep" / "labels.csv" if d else None
    if labels is None or not labels.is_file():
        pytest.skip("shared OEP frames not available")
    with labels.open(newline="") as f:
        rows = list(csv.DictReader(f))
    step = max(1, len(rows) // n)
    return [r["file"] for r in rows[::step][:n]]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data()
    if d is None:
        pytest.skip("shared data (../shared/data) not available")
    return d


@pytest.fixture(scope="session")
def oep(data_dir: Path) -> list[dict[str, Any]]:
    """The labelled OEP exam-webcam frames."""
    with (data_dir / "faces/webcam_oep/labels.csv").open() as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["path"] = data_dir / r["file"]
        r["face_count"] = int(r["face_count"])
    return rows


def jpeg_of(path: Path, long_side: int = 640) -> bytes:
    img = cv2.imread(str(path))
    assert img is not None, f"not a readable image: {path}"
    h, w = img.shape[:2]
    s = long_side / max(h, w)
    if s < 1:
        img = cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()


def black_jpeg(w: int = 640, h: int = 480) -> bytes:
    return cv2.imencode(".jpg", np.zeros((h, w, 3), np.uint8))[1].tobytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real analyzer (uvicorn + the app) on a loopback port, in a background thread."""

    def __init__(self, tmp: Path, port: int | None = None, **overrides: Any) -> None:
        from livekit_proctor.settings import Settings
        from livekit_proctor.wiring import analyzer_app

        self.port = port or _free_port()
        self.settings = Settings(
            host="127.0.0.1",
            port=self.port,
            data_dir=tmp,
            api_keys=f"{ADMIN_KEY}:admin,{SYSTEM_KEY}:system,{PROCTOR_KEY}:proctor",
            heartbeat_s=1.0,
            max_frame_bytes=256 * 1024,
            inference_workers=2,
            **overrides,
        )
        self.app = analyzer_app(self.settings)
        ws_max = 4 * max(self.settings.max_frame_bytes, self.settings.max_audio_chunk_bytes) + 64
        cfg = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", ws_max_size=ws_max)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("analyzer server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def http(self, key: str | None = SYSTEM_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=30)

    def start_session(self, sid: str, candidate: str = "cand-1", **body: Any) -> dict[str, Any]:
        with self.http() as c:
            r = c.post(
                "/api/v1/session/start",
                json={"exam_session_id": sid, "candidate_id": candidate, "exam_id": "exam-1", **body},
            )
            assert r.status_code == 200, r.text
            return r.json()

    def session(self, sid: str) -> dict[str, Any]:
        with self.http(PROCTOR_KEY) as c:
            r = c.get(f"/api/v1/session/{sid}")
            assert r.status_code == 200, r.text
            return r.json()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = LiveServer(tmp_path_factory.mktemp("analyzer")).start()
    yield srv
    srv.stop()


class StreamClient:
    """A test's v1 connection: livekit_proctor.client.StreamConnection with a background reader that keeps every
    server message (as the JSON object it arrived as). Every message must parse with the protocol's models and
    lose nothing to them: a test fails at the end of `connect` otherwise."""

    def __init__(self, conn: StreamConnection) -> None:
        self.conn = conn
        self.ws = conn.ws  # the raw WebSocket, for what no well-behaved client sends
        self.messages: list[dict[str, Any]] = []
        self.typed: list[wire.ServerMessage] = []
        self.bad: list[str] = []  # server messages the models reject, or that they would change
        self.closed: tuple[int, str] | None = None
        self._reader = asyncio.create_task(self._read())

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str) -> AsyncIterator[Self]:
        async with StreamConnection.connect(url, strict=True, max_size=None) as conn:
            c = cls(conn)
            try:
                yield c
            finally:
                c._reader.cancel()
        assert not c.bad, f"server messages that do not follow the protocol's models: {c.bad[:5]}"

    async def _read(self) -> None:
        try:
            while True:
                try:
                    msg = await self.conn.recv()
                except wire.ProtocolError as e:
                    self.bad.append(e.reason)
                    continue
                d = json.loads(self.conn.last_text)
                if d != json.loads(wire.encode_server_message(msg)):
                    self.bad.append(f"{self.conn.last_text[:300]} (the model keeps {wire.encode_server_message(msg)})")
                self.typed.append(msg)
                d["_rx"] = time.time()
                self.messages.append(d)
        except websockets.ConnectionClosed:
            pass
        finally:
            if self.conn.close_code is not None:
                self.closed = (self.conn.close_code, self.conn.close_reason)

    async def video(self, jpeg: bytes, ts: float, seq: int | None = None) -> int:
        return await self.conn.send_video(jpeg, ts, seq)

    async def audio(self, pcm: bytes, ts: float) -> None:
        await self.conn.send_audio(pcm, ts)

    async def sync(self, timeout: float = 120.0) -> wire.PongMessage:  # noqa: ASYNC109
        """The protocol's ping: the pong comes once everything sent before it has been analysed and its alerts
        sent, so a test waits for the analysis of what it sent, however slow the machine is."""
        try:
            return await self.conn.sync(timeout)
        except TimeoutError:
            raise AssertionError(f"no pong in {timeout}s; got {[m.get('type') for m in self.messages]}") from None

    async def wait_closed(self) -> tuple[int, str]:
        """Returns (close code, reason) once the server has closed the connection: the reader task ends when it
        sees the close, so this waits for that event however slow the machine is, not for a deadline."""
        await asyncio.shield(self._reader)
        assert self.closed is not None, "the reader stopped without a close"
        return self.closed

    def of_type(self, t: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == t]

    def alerts(self) -> list[dict[str, Any]]:
        return [m["alert"] for m in self.of_type("alert")]

    async def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 60.0) -> dict[str, Any]:  # noqa: ASYNC109
        deadline = time.time() + timeout
        while time.time() < deadline:
            for m in self.messages:
                if pred(m):
                    return m
            if self.closed:
                break
            await asyncio.sleep(0.02)
        raise AssertionError(f"no matching message in {timeout}s; got {[m.get('type') for m in self.messages]}")


async def eventually(pred: Any, timeout: float = 60.0, what: str = "") -> Any:  # noqa: ASYNC109
    """Polls `pred` (a function; it may return an awaitable) until it gives something truthy, and returns that.
    The deadline is generous on purpose: a busy machine makes a test slower, never red."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or pred}")
        await asyncio.sleep(0.05)


async def close_of(url: str) -> tuple[int, str]:
    """Connects and reads until the server closes: (close code, reason)."""
    async with websockets.connect(url) as ws:
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 60)
        assert ws.close_code is not None
        return ws.close_code, ws.close_reason or ""


@pytest.fixture
def redis_server() -> Iterator[Any]:
    """A real redis-server on a free loopback port (skips where it is not installed)."""
    from tests.servers import RedisServer

    srv = RedisServer().start()
    yield srv
    srv.stop()


def stream_url(cfg: dict[str, Any]) -> str:
    return f"{cfg['stream_url']}?token={cfg['stream_token']}"
