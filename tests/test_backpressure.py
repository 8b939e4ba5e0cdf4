"""Bounded queues: audio waits (never drops) at its bound and hints the client; video is latest-wins."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from livekit_proctor.analyzer.metrics import Metrics
from livekit_proctor.analyzer.pipeline import InferencePool, ModelSet
from livekit_proctor.analyzer.sessions import SessionManager
from livekit_proctor.contracts import wire
from livekit_proctor.contracts.api import SessionStartRequest
from livekit_proctor.db import make_engine, make_sessionmaker
from livekit_proctor.dispatcher.outbox import SqlOutbox  # the outbox `proctor serve` wires by default
from livekit_proctor.settings import Settings


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[SessionManager]:
    s = Settings(data_dir=tmp_path, audio_queue_seconds=1.0)
    sm = make_sessionmaker(make_engine(s.resolved_database_url()))
    metrics = Metrics()
    pool = InferencePool(1, metrics)
    mgr = SessionManager(s, sm, ModelSet.load(), pool, SqlOutbox(sm, None), metrics)
    yield mgr
    await mgr.shutdown()
    pool.shutdown()


async def test_audio_bound_blocks_instead_of_dropping(manager: SessionManager) -> None:
    live, _ = await manager.start(SessionStartRequest(exam_session_id="bp", candidate_id="c", exam_id="e"), "t")
    sub = live.subscribe(media=True)
    consumer = live.workers.tasks["audio"]
    consumer.cancel()  # a stalled audio consumer
    with contextlib.suppress(asyncio.CancelledError):
        await consumer
    chunk = b"\0" * 3200  # 100 ms; the bound is 1 s
    for i in range(10):
        await live.offer_audio(wire.MediaMessage(wire.Kind.AUDIO, i, time.time(), chunk))
    hints = [m for m in list(sub.queue._queue) if isinstance(m, wire.FlowMessage)]  # type: ignore[attr-defined]
    assert hints and hints[0].audio == "slow_down"
    # The 11th chunk does not fit: the sender waits (TCP backpressure) rather than losing it.
    blocked = asyncio.create_task(live.offer_audio(wire.MediaMessage(wire.Kind.AUDIO, 10, time.time(), chunk)))
    await asyncio.sleep(0.2)
    assert not blocked.done() and live.audio_fill() == pytest.approx(1.0)
    live.workers.start("audio", live._audio_worker)  # the consumer recovers
    await asyncio.wait_for(blocked, 5)
    for _ in range(100):
        if live.counters.audio_bytes == 11 * 3200:
            break
        await asyncio.sleep(0.01)
    assert live.counters.audio_bytes == 11 * 3200
    assert [m for m in list(sub.queue._queue) if isinstance(m, wire.FlowMessage)][-1].audio == "resume"  # type: ignore[attr-defined]


async def test_video_latest_wins(manager: SessionManager) -> None:
    live, _ = await manager.start(SessionStartRequest(exam_session_id="lw", candidate_id="c", exam_id="e"), "t")
    video = live.workers.tasks["video"]
    video.cancel()  # analysis stalled
    with contextlib.suppress(asyncio.CancelledError):
        await video
    t = time.time()
    for i in range(50):
        live.offer_frame(wire.MediaMessage(wire.Kind.VIDEO, i, t + i * 0.2, b"\xff\xd8"))
    # One frame waits (the newest); the 49 before it were dropped and counted.
    assert live.video.waiting is not None and live.video.waiting[0].seq == 49
    assert live.counters.frames_dropped == 49 and live.counters.frames_received == 50
