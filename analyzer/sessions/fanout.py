"""Fan-out of a session's outgoing messages to the WebSockets that listen, each through a bounded queue."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from livekit_proctor.contracts.wire import ServerMessage


class Subscriber:
    """A bounded outgoing queue of server messages (one per WebSocket that listens)."""

    def __init__(self, maxsize: int, media: bool = False) -> None:
        self.queue: asyncio.Queue[ServerMessage] = asyncio.Queue(maxsize)
        self.overflowed = False
        self.on_overflow: Callable[[], None] | None = None
        self.media = media  # the media stream connection also gets per-frame errors and flow hints

    def offer(self, msg: ServerMessage, droppable: bool = False) -> None:
        try:
            self.queue.put_nowait(msg)
        except asyncio.QueueFull:
            if not droppable and not self.overflowed:
                # Alerts stay in the outbox; a client that does not read is cut off, not buffered forever.
                self.overflowed = True
                if self.on_overflow is not None:
                    self.on_overflow()


class Fanout:
    def __init__(self, queue_size: int) -> None:
        self.queue_size = queue_size
        self.subscribers: set[Subscriber] = set()

    def subscribe(self, media: bool = False) -> Subscriber:
        sub = Subscriber(self.queue_size, media=media)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def broadcast(self, msg: ServerMessage, droppable: bool = False, media_only: bool = False) -> None:
        """droppable: lost (not cut off) when a queue is full; media_only: only for the media connection."""
        for sub in list(self.subscribers):
            if media_only and not sub.media:
                continue
            sub.offer(msg, droppable=droppable)
