"""The one retry / backoff policy: exponential delays with a cap and proportional jitter.

Used by the dispatcher (delay before retrying a transport's batch, dead-letter after max_attempts), the
agent (reconnecting its analyzer stream, retrying a session start), the analyzer (restarting a session's
failing worker) and the reference Kafka consumer. The
retry loops themselves differ too much for a generic retry decorator (partial delivery, close codes that end
the loop, a delay reset after a good connection), so they share this policy object and nothing else.
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Delay before retry n (1 = the first retry): first_s * factor**(n-1), at most max_s, each ±jitter.

    max_attempts: attempts in all before the caller gives up (dead letter); None for callers that retry
    forever (reconnect loops).
    """

    first_s: float = 0.2
    max_s: float = 10.0
    factor: float = 2.0
    jitter: float = 0.2
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if not (0 <= self.first_s <= self.max_s and self.factor >= 1 and 0 <= self.jitter < 1):
            raise ValueError(f"invalid retry policy {self}")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    def base_delay(self, attempt: int) -> float:
        """The delay before retry `attempt` without jitter."""
        if self.first_s == 0:
            return 0.0
        # Past the cap the exponent stops growing (a large attempt number must not overflow the float).
        steps = math.log(self.max_s / self.first_s, self.factor) + 1 if self.factor > 1 else 0
        n = min(max(attempt, 1) - 1, math.ceil(steps))
        return min(self.max_s, self.first_s * self.factor**n)

    def delay(self, attempt: int) -> float:
        d = self.base_delay(attempt)
        return max(0.0, d * (1 + random.uniform(-self.jitter, self.jitter)))

    def exhausted(self, attempts: int) -> bool:
        """True once `attempts` failed attempts reach max_attempts."""
        return self.max_attempts is not None and attempts >= self.max_attempts

    def backoff(self) -> Backoff:
        return Backoff(self)


class Backoff:
    """The running state of one retry loop: sleep() waits the next delay; reset() after a success."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0

    def next_delay(self) -> float:
        self.attempt += 1
        return self.policy.delay(self.attempt)

    async def sleep(self) -> float:
        d = self.next_delay()
        await asyncio.sleep(d)
        return d


# The policies of this code base, in one place (docs/delivery.md, docs/livekit.md).
DISPATCH = RetryPolicy(first_s=0.1, max_s=60.0, factor=4.0, jitter=0.2, max_attempts=5)  # outbox -> transport
RECONNECT = RetryPolicy(first_s=0.2, max_s=10.0, factor=2.0, jitter=0.2)  # agent -> analyzer WebSocket
SESSION_START = RetryPolicy(first_s=0.5, max_s=10.0, factor=2.0, jitter=0.2)  # agent: session start
CONSUMER_START = RetryPolicy(first_s=0.2, max_s=2.0, factor=2.0, jitter=0.2)  # reference consumers
WORKER_RESTART = RetryPolicy(first_s=0.1, max_s=5.0, factor=2.0, jitter=0.2)  # a session's failing worker
