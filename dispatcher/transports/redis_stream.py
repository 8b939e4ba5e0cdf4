"""Redis Streams as a further durable pub/sub backend: XADD each alert to an output stream that other
services read with their own consumer groups."""

from __future__ import annotations

from typing import Any

from livekit_proctor.dispatcher.transports.base import DISPATCH, DeliveryError, Envelope, RetryPolicy


class RedisStreamTransport:
    name = "redis"

    def __init__(self, url: str, stream: str = "proctoring.alerts.v1", *, maxlen: int | None = None,
                 retry: RetryPolicy | None = None, max_batch: int = 500) -> None:  # fmt: skip
        self.url = url
        self.stream = stream
        self.maxlen = maxlen  # approximate trimming; None keeps everything (consumers trim)
        self.retry = retry or DISPATCH
        self.max_batch = max_batch
        self._r: Any = None
        self.last_error: str | None = None

    async def start(self) -> None:
        import redis.asyncio as redis

        self._r = redis.from_url(self.url)

    async def send(self, batch: list[Envelope]) -> None:
        done = 0
        try:
            # One pipeline, executed in order: all or an error; XADD is idempotent only by event_id
            # at the consumer, like every other transport.
            pipe = self._r.pipeline(transaction=False)
            for e in batch:
                fields = {"event_id": e.event_id, "exam_session_id": e.exam_session_id, "event_type": e.event_type,
                          "seq": str(e.seq), "payload": e.payload}  # fmt: skip
                pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
            results = await pipe.execute(raise_on_error=False)
            for res in results:
                if isinstance(res, Exception):
                    raise res
                done += 1
            self.last_error = None
        except Exception as e:
            self.last_error = f"{type(e).__name__}: {e}"
            raise DeliveryError(self.last_error, delivered=done) from None

    async def close(self) -> None:
        if self._r is not None:
            await self._r.aclose()

    def state(self) -> dict[str, Any]:
        return {"stream": self.stream, "last_error": self.last_error}
