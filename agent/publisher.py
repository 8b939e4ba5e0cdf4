"""Alerts and candidate feedback into the room's data channel.

The agent owns room messages by default (docs/delivery.md): proctor alerts go to the proctors currently in
the room (topic `proctoring.alert`), candidate feedback only to that candidate (`proctoring.feedback`).
Recipients are resolved when the packet is sent, so a proctor who joined after the session started gets
the alerts too. A packet is never sent with an empty recipient list: for publish_data that means everyone,
candidates included. Packets are reliable and fit in 15 KiB (the room contract: livekit_proctor.contracts.room).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from livekit_proctor.contracts.room import ALERT_TOPIC, FEEDBACK_TOPIC, RoomFeedback, fit_packet

log = logging.getLogger(__name__)


@dataclass
class PublishCounters:
    alerts: int = 0
    feedback: int = 0
    no_recipient: int = 0
    queue_dropped: int = 0
    failed: int = 0


class RoomPublisher:
    def __init__(self, local_participant: Any, proctors: Callable[[], list[str]], *, max_queue: int = 256) -> None:
        self.local = local_participant
        self.proctors = proctors
        self.counters = PublishCounters()
        # (topic, payload, fixed recipients or None for "proctors at send time")
        self._queue: deque[tuple[str, bytes, list[str] | None]] = deque()
        self._max = max_queue
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="room-publisher")

    async def aclose(self, flush_timeout: float = 2.0) -> None:
        if self._task is None:
            return
        for _ in range(int(flush_timeout / 0.02)):
            if not self._queue:
                break
            await asyncio.sleep(0.02)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    def alert(self, alert: dict[str, Any]) -> None:
        self._put(ALERT_TOPIC, fit_packet(alert), None)

    def feedback(self, candidate_identity: str, msg: RoomFeedback) -> None:
        if not candidate_identity:
            self.counters.no_recipient += 1
            return
        self._put(FEEDBACK_TOPIC, msg.model_dump_json().encode(), [candidate_identity])

    def _put(self, topic: str, payload: bytes, to: list[str] | None) -> None:
        if len(self._queue) >= self._max:
            # Bounded: the oldest goes (alerts are also in the analyzer's outbox for other transports).
            self._queue.popleft()
            self.counters.queue_dropped += 1
            log.warning("room publish queue full; dropped the oldest message")
        self._queue.append((topic, payload, to))
        self._ready.set()

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._queue:
                topic, payload, to = self._queue.popleft()
                recipients = list(to) if to is not None else list(self.proctors())
                if not recipients:
                    self.counters.no_recipient += 1
                    log.info("no recipient in the room for a %s message; not sent", topic)
                    continue
                try:
                    await self.local.publish_data(
                        payload, reliable=True, destination_identities=recipients, topic=topic
                    )
                except Exception as e:
                    self.counters.failed += 1
                    log.warning("publish_data on %s failed: %s", topic, e)
                    continue
                if topic == ALERT_TOPIC:
                    self.counters.alerts += 1
                else:
                    self.counters.feedback += 1
