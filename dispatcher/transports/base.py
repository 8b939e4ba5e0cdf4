"""What every transport implements, and what it hands back on failure.

The dispatcher reads envelopes from the outbox in sequence order and calls send() with a batch. A
transport delivers the batch in order and returns only when every envelope is acknowledged by its peer
(gRPC ack, Kafka acks=all, webhook 2xx, ...). When it cannot, it raises DeliveryError saying how many
envelopes from the head of the batch were acknowledged before the failure; the dispatcher retries the
rest with backoff and, after the transport's max attempts, moves the head envelope to the dead-letter
queue. Delivery is at least once: an envelope may be sent again after a crash or a lost ack, always with
the same event_id (and the same seq).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from livekit_proctor.contracts.outbox import Envelope as Envelope  # what every transport is handed
from livekit_proctor.retry import DISPATCH, RetryPolicy

__all__ = ["DISPATCH", "DeliveryError", "Envelope", "RetryPolicy", "Transport", "TransportStats"]


@dataclass
class DeliveryError(Exception):
    """A send that did not fully succeed.

    delivered: envelopes from the head of the batch that the peer acknowledged before the failure.
    retry_after: seconds the peer asked us to wait (HTTP Retry-After, broker throttling), if any.
    permanent: retrying cannot help (e.g. the peer rejects the payload with 4xx): dead-letter at once.
    """

    reason: str
    delivered: int = 0
    retry_after: float | None = None
    permanent: bool = False

    def __str__(self) -> str:
        return self.reason


class Transport(Protocol):
    name: str  # "grpc", "kafka", "webhook", "livekit", "redis"
    retry: RetryPolicy  # livekit_proctor.retry.DISPATCH unless configured
    max_batch: int  # largest batch send() accepts

    async def start(self) -> None:
        """Connects (or prepares to connect lazily); must not raise for an unreachable peer."""

    async def send(self, batch: list[Envelope]) -> None:
        """Delivers in order; returns when all are acknowledged; raises DeliveryError otherwise."""

    async def close(self) -> None: ...

    def state(self) -> dict[str, Any]:
        """For readiness and /metrics: connected, last error, ..."""


@dataclass
class TransportStats:
    delivered: int = 0
    failed_attempts: int = 0
    last_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
