"""`proctor demo`: streams a synthetic clip to an analyzer and prints what comes back.

The clip is drawn here (an empty seat: a wall and a desk, nobody in view), so no media file is needed. It goes
through the public path a client takes (docs/protocol.md): start a session over REST, stream JPEG frames on
the WebSocket with capture times, ping after each frame (the pong comes once that frame is analysed), end the
session. Without a URL an analyzer runs inside this process on a free loopback port, with a temporary data
directory and a throwaway key.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from livekit_proctor.client import AnalyzerClient, AnalyzerError, StreamConnection
from livekit_proctor.contracts import wire
from livekit_proctor.settings import Settings

FPS = 5.0
EMPTY_SEAT_S = 8.0  # longer than FACE_NOT_FOUND's default 5 s (docs/rules.md)


def empty_seat_jpeg(width: int = 640, height: int = 480) -> bytes:
    """A room with nobody in it: a shaded wall, a desk edge and a lamp; deterministic."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    wall = (150 + 40 * y) * np.ones((1, width), np.float32)
    img = np.repeat(wall[:, :, None], 3, axis=2).astype(np.uint8)
    img[int(height * 0.72) :, :] = (60, 90, 120)  # desk (BGR)
    cv2.rectangle(
        img, (int(width * 0.7), int(height * 0.35)), (int(width * 0.76), int(height * 0.72)), (40, 40, 40), -1
    )
    cv2.circle(img, (int(width * 0.73), int(height * 0.33)), 28, (80, 200, 230), -1)
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()


def describe(msg: wire.ServerMessage, base: float) -> str | None:
    """One line for a server message worth showing (alerts and the candidate's feedback), else None."""
    if isinstance(msg, wire.AlertMessage):
        a = msg.alert
        at = datetime.fromisoformat(a.timestamp).timestamp() - base  # the frame's capture time in the clip
        state = a.incident_state or ""
        return f"alert     {a.event_type:<18} {state:<8} at {at:4.1f}s  severity={a.severity_score:.2f}"
    if isinstance(msg, wire.FeedbackMessage):
        return f"feedback  {msg.code}: {msg.message}"
    if isinstance(msg, wire.SessionEndedMessage):
        return f"session   ended ({msg.reason})"
    return None


async def stream_demo(base_url: str, api_key: str, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Runs the clip through the analyzer at `base_url`; returns the alerts received, printing lines via `say`."""
    sid = f"demo-{int(time.time())}-{secrets.token_hex(2)}"
    alerts: list[dict[str, Any]] = []
    async with AnalyzerClient(base_url, api_key, timeout=60) as client:
        try:
            cfg = await client.start_session(
                {"exam_session_id": sid, "candidate_id": "demo-candidate", "exam_id": "demo"}
            )
        except AnalyzerError as e:
            raise RuntimeError(f"session start failed: {e}") from None
        say(f"session {sid}: streaming {EMPTY_SEAT_S:g}s of an empty seat at {FPS:g} fps")
        frame = empty_seat_jpeg()
        base = time.time() - EMPTY_SEAT_S - 1  # capture times in the recent past, as a live camera's
        async with StreamConnection.connect(cfg["stream_url"], cfg["stream_token"], max_size=None) as conn:

            async def read() -> None:
                async for msg in conn:
                    if isinstance(msg, wire.AlertMessage):
                        alerts.append(msg.alert.model_dump(mode="json"))
                    if (line := describe(msg, base)) is not None:
                        say(line)

            reader = asyncio.create_task(read())
            try:
                for i in range(int(EMPTY_SEAT_S * FPS)):
                    await conn.send_video(frame, base + i / FPS)
                    await conn.sync(60)  # the pong comes once that frame is analysed
            except ConnectionError:
                raise RuntimeError(f"the analyzer closed the stream: {conn.close_code} {conn.close_reason}") from None
            try:
                await client.end_session(sid)
            except AnalyzerError as e:
                raise RuntimeError(f"session end failed: {e}") from None
            await asyncio.wait_for(reader, 30)  # session_ended, then the close
    return alerts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def in_process_analyzer(settings: Settings) -> AsyncIterator[str]:
    """The analyzer on `settings.host:port` in this event loop, for the duration of the block; yields its URL."""
    import uvicorn

    from livekit_proctor.wiring import analyzer_app

    server = uvicorn.Server(
        uvicorn.Config(analyzer_app(settings), host=settings.host, port=settings.port, log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():  # failed to start: its exception
            task.result()
            raise RuntimeError("the analyzer stopped during start")
        await asyncio.sleep(0.05)
    try:
        yield f"http://{settings.host}:{settings.port}"
    finally:
        server.should_exit = True
        await task


def demo_settings(data_dir: Path, key: str, **overrides: Any) -> dict[str, Any]:
    """Settings of the in-process analyzer: loopback, a temporary data dir, one system key, quiet logs."""
    return {"host": "127.0.0.1", "port": _free_port(), "data_dir": data_dir, "api_keys": f"{key}:system",
            "log_level": "WARNING", **overrides}  # fmt: skip


async def run(url: str | None, api_key: str | None, make_settings: Callable[..., Settings],
              say: Callable[[str], None]) -> list[dict[str, Any]]:  # fmt: skip
    """The demo against `url`, or against an analyzer started here when url is None."""
    if url is not None:
        if not api_key:
            raise ValueError("--url needs --api-key (a key with role system or admin)")
        return await stream_demo(url.rstrip("/"), api_key, say)
    key = "pk_demo_" + secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="proctor-demo-") as tmp:
        say("starting an analyzer in this process (models load in a few seconds)")
        async with in_process_analyzer(make_settings(**demo_settings(Path(tmp), key))) as base_url:
            return await stream_demo(base_url, key, say)
