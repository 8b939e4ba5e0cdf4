"""A session's media queues and the ping barrier.

Video is latest-wins (one frame waits; a newer one replaces it: the analysis stays current). Audio is
lossless and bounded in bytes: a full queue makes the sender wait, which becomes TCP backpressure.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

from livekit_proctor.contracts.wire import MediaMessage

T = TypeVar("T")


class VideoSlot(Generic[T]):
    def __init__(self) -> None:
        self._item: T | None = None
        self._ready = asyncio.Event()

    @property
    def waiting(self) -> T | None:
        return self._item

    def put(self, item: T) -> bool:
        """True when a waiting frame was replaced (dropped)."""
        dropped = self._item is not None
        self._item = item
        self._ready.set()
        return dropped

    async def get(self) -> T:
        while True:
            await self._ready.wait()
            self._ready.clear()
            item, self._item = self._item, None
            if item is not None:
                return item


class AudioQueue:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._chunks: deque[MediaMessage] = deque()
        self._changed = asyncio.Condition()

    def __len__(self) -> int:
        return len(self._chunks)

    def fill(self) -> float:
        return self.bytes / self.max_bytes if self.max_bytes else 0.0

    async def put(self, msg: MediaMessage) -> None:
        """Waits while the chunk does not fit (one chunk always fits into an empty queue)."""
        n = len(msg.payload)
        async with self._changed:
            await self._changed.wait_for(lambda: self.bytes + n <= self.max_bytes or not self._chunks)
            self._chunks.append(msg)
            self.bytes += n
            self._changed.notify_all()

    async def get(self) -> MediaMessage:
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._chunks))
            msg = self._chunks.popleft()
            self.bytes -= len(msg.payload)
            self._changed.notify_all()
        return msg


class Barrier:
    """The ping barrier: wait() returns once every frame and audio chunk received before the call has been
    processed (analysed, replaced by a newer frame, or failed)."""

    def __init__(self) -> None:
        self.video_in = self.video_done = 0
        self.audio_in = self.audio_done = 0
        self._open = True
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        # Set while a ping waits for audio: the audio worker then analyses the part of a window it holds back
        # (windows are otherwise analysed only when full) and clears it.
        self.audio_flush = asyncio.Event()

    def video_received(self) -> int:
        """Counts a frame offered for analysis; returns its number (frames before it are done with it)."""
        self.video_in += 1
        return self.video_in

    def video_processed(self, n: int) -> None:
        self.video_done = max(self.video_done, n)
        self._release()

    def audio_received(self) -> None:
        self.audio_in += 1

    def audio_processed(self, n: int = 1) -> None:
        self.audio_done += n
        self._release()

    def close(self) -> None:
        """Nothing more will be processed: every waiter (and every later one) is released."""
        self._open = False
        self._release()

    async def wait(self) -> None:
        if self._open and (self.video_done < self.video_in or self.audio_done < self.audio_in):
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append((self.video_in, self.audio_in, fut))
            if self.audio_done < self.audio_in:
                self.audio_flush.set()
            await fut

    def _release(self) -> None:
        keep = []
        for v, a, fut in self._waiters:
            if fut.done():
                continue
            if not self._open or (self.video_done >= v and self.audio_done >= a):
                fut.set_result(None)
            else:
                keep.append((v, a, fut))
        self._waiters = keep
