"""The dispatcher: moves every alert from the outbox to every configured backend, at least once.

One lane per transport (fan-out) or one lane for the whole fallback chain (gRPC, then Kafka, then
webhook). A lane reads in order, sends a batch, acknowledges what was delivered, retries the rest with
backoff (honouring Retry-After), and after max_attempts moves the head envelope to the dead-letter queue
(the dead_letters table, and the Kafka DLQ topic when Kafka is configured) with its last error.
event_id never changes, so consumers deduplicate (docs/alerts.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from livekit_proctor import observability
from livekit_proctor.db import DeadLetterRow
from livekit_proctor.dispatcher.metrics import DispatchMetrics
from livekit_proctor.dispatcher.source import OutboxSource
from livekit_proctor.dispatcher.transports.base import DISPATCH, DeliveryError, Envelope, RetryPolicy, Transport

log = logging.getLogger(__name__)


class FallbackChain:
    """One lane over several transports: each envelope goes to the first that takes it."""

    def __init__(self, transports: list[Transport], retry: RetryPolicy | None = None) -> None:
        self.transports = transports
        self.name = "fallback"
        self.retry = retry or DISPATCH
        self.max_batch = min(t.max_batch for t in transports)
        self.used: dict[str, int] = {t.name: 0 for t in transports}

    async def start(self) -> None:
        for t in self.transports:
            await t.start()

    async def send(self, batch: list[Envelope]) -> None:
        done = 0
        errors = []
        for t in self.transports:
            rest = batch[done:]
            if not rest:
                return
            try:
                with observability.dispatch_span(t.name, rest):
                    await t.send(rest)
                self.used[t.name] += len(rest)
                return
            except DeliveryError as e:
                done += e.delivered
                self.used[t.name] += e.delivered
                errors.append(f"{t.name}: {e.reason}")
        if done >= len(batch):
            return
        raise DeliveryError("; ".join(errors), delivered=done)

    async def close(self) -> None:
        for t in self.transports:
            await t.close()

    def state(self) -> dict[str, Any]:
        return {"chain": [t.state() | {"name": t.name} for t in self.transports], "used": dict(self.used)}


@dataclass
class LaneState:
    name: str
    delivered: int = 0
    failed_attempts: int = 0
    dead_lettered: int = 0
    last_error: str | None = None
    attempts: dict[int, int] = field(default_factory=dict)  # seq -> failed attempts of the head


class Dispatcher:
    def __init__(
        self,
        source: OutboxSource,
        lanes: list[Transport],
        sm: sessionmaker,
        *,
        metrics: DispatchMetrics | None = None,
        dlq_producer: Any = None,
        block_s: float = 1.0,
    ) -> None:
        self.source = source
        self.lanes = lanes
        self.sm = sm
        self.metrics = metrics or DispatchMetrics()
        self.dlq_producer = dlq_producer  # a KafkaTransport (send_dlq) when Kafka is configured
        self.block_s = block_s
        self.states = {t.name: LaneState(t.name) for t in lanes}
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    async def start(self) -> None:
        for t in self.lanes:
            await t.start()
        self._tasks = [asyncio.create_task(self._run_lane(t), name=f"lane:{t.name}") for t in self.lanes]
        self._tasks.append(asyncio.create_task(self._gauges(), name="dispatch-gauges"))

    async def stop(self, grace_s: float = 5.0) -> None:
        """Lets each lane finish the batch in hand (sent and acknowledged, so a graceful restart sends no
        duplicates), up to grace_s; then cancels what is left."""
        self._stop.set()
        lanes = [task for task in self._tasks if task.get_name().startswith("lane:")]
        if lanes:
            await asyncio.wait(lanes, timeout=grace_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for t in self.lanes:
            with contextlib.suppress(Exception):
                await t.close()
        await self.source.close()

    # ---- lanes

    async def _run_lane(self, t: Transport) -> None:
        st = self.states[t.name]
        pending: list[Envelope] = []
        while not self._stop.is_set():
            try:
                replayed = await self._replay_dead_letters(t)
                if pending:  # a retry: what a privacy deletion removed from the outbox meanwhile is not sent
                    pending = await self.source.held(t.name, pending)
                    st.attempts = {e.seq: st.attempts[e.seq] for e in pending if e.seq in st.attempts}
                if not pending:
                    pending = await self.source.read(t.name, t.max_batch, 0.2 if replayed else self.block_s)
                    self.metrics.alerts_in.labels(t.name).inc(len(pending))
                if not pending:
                    continue
                batch = pending[: t.max_batch]
                try:
                    with observability.dispatch_span(t.name, batch):
                        await t.send(batch)
                    acked, err = len(batch), None
                except DeliveryError as e:
                    acked, err = min(e.delivered, len(batch)), e
                except Exception as e:  # a transport bug must not stop the lane
                    log.exception("lane %s: send failed", t.name)
                    acked, err = 0, DeliveryError(f"{type(e).__name__}: {e}")
                if acked:
                    done = batch[:acked]
                    await self.source.ack(t.name, done)
                    now = time.time()
                    for e_ in done:
                        self.metrics.latency.labels(t.name).observe(max(0.0, now - e_.created_at))
                        st.attempts.pop(e_.seq, None)
                    st.delivered += acked
                    self.metrics.delivered.labels(t.name).inc(acked)
                    pending = pending[acked:]
                if err is None:
                    continue
                head = pending[0]
                n = st.attempts[head.seq] = st.attempts.get(head.seq, 0) + 1
                st.failed_attempts += 1
                st.last_error = err.reason
                self.metrics.failed.labels(t.name).inc()
                if err.permanent or t.retry.exhausted(n):
                    if await self.source.held(t.name, [head]):  # not when deleted meanwhile
                        await self._dead_letter(t.name, head, n, err.reason)
                    await self.source.ack(t.name, [head])
                    st.attempts.pop(head.seq, None)
                    pending = pending[1:]
                    continue
                self.metrics.retries.labels(t.name).inc()
                delay = max(t.retry.delay(n), err.retry_after or 0.0)
                log.info(
                    "lane %s: %s; retry %d in %.2fs", t.name, err.reason, n, delay, extra={"event_id": head.event_id}
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("lane %s: outbox error; retrying", t.name)
                pending = []
                rewind = getattr(self.source, "rewind", None)
                if rewind:
                    rewind(t.name)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)

    # ---- dead letters

    async def _dead_letter(self, lane: str, e: Envelope, attempts: int, error: str) -> None:
        def write() -> None:
            with self.sm.begin() as db:
                db.add(
                    DeadLetterRow(
                        lane=lane, seq=e.seq, event_id=e.event_id, exam_session_id=e.exam_session_id,
                        event_type=e.event_type, payload=e.payload.decode(), created_at=e.created_at,
                        dead_at=time.time(), attempts=attempts, error=error[:2000],
                    )
                )  # fmt: skip

        await asyncio.to_thread(write)
        self.states[lane].dead_lettered += 1
        self.metrics.dead.labels(lane).inc()
        log.warning(
            "lane %s: event %s dead-lettered after %d attempts: %s",
            lane,
            e.event_id,
            attempts,
            error,
            extra={"event_id": e.event_id},
        )
        if self.dlq_producer is not None and lane != getattr(self.dlq_producer, "name", None):
            try:
                await self.dlq_producer.send_dlq(e, error, lane)
            except Exception as ex:  # the table has it; the topic is a copy
                log.warning("DLQ topic write failed for %s: %s", e.event_id, ex)

    async def _replay_dead_letters(self, t: Transport) -> bool:
        """Sends this lane's dead letters that `proctor dlq replay` asked for; True when there were some."""

        def due() -> list[DeadLetterRow]:
            with self.sm() as db:
                return list(
                    db.scalars(
                        select(DeadLetterRow)
                        .where(DeadLetterRow.lane == t.name, DeadLetterRow.replay_requested_at.is_not(None),
                               DeadLetterRow.replayed_at.is_(None))
                        .order_by(DeadLetterRow.id)
                        .limit(t.max_batch)
                    ).all()
                )  # fmt: skip

        rows = await asyncio.to_thread(due)
        if not rows:
            return False
        batch = [Envelope(r.seq, r.event_id, r.exam_session_id, r.event_type, r.payload.encode(), r.created_at)
                 for r in rows]  # fmt: skip
        try:
            await t.send(batch)
            ok = len(batch)
        except DeliveryError as e:
            ok = e.delivered
            self.states[t.name].last_error = f"replay: {e.reason}"

        def mark() -> None:
            with self.sm.begin() as db:
                for r in rows[:ok]:
                    row = db.get(DeadLetterRow, r.id)
                    if row is not None:
                        row.replayed_at = time.time()
                for r in rows[ok:]:
                    row = db.get(DeadLetterRow, r.id)
                    if row is not None:
                        row.replay_requested_at = None  # failed again: stays dead, replay can be asked again
                        row.attempts += 1

        await asyncio.to_thread(mark)
        if ok:
            self.metrics.delivered.labels(t.name).inc(ok)
        return True

    # ---- observability

    async def _gauges(self) -> None:
        while not self._stop.is_set():
            try:
                depth, age = await self.source.depth([t.name for t in self.lanes])
                self.metrics.outbox_depth.set(depth)
                self.metrics.outbox_age.set(age)
                self.metrics.dlq_size.set(await asyncio.to_thread(dlq_size, self.sm))
            except Exception:
                log.debug("gauge update failed", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 5.0)

    def state(self) -> dict[str, Any]:
        return {
            "lanes": {
                name: {
                    "delivered": s.delivered,
                    "failed_attempts": s.failed_attempts,
                    "dead_lettered": s.dead_lettered,
                    "last_error": s.last_error,
                    "transport": next(t for t in self.lanes if t.name == name).state(),
                }
                for name, s in self.states.items()
            }
        }


def dlq_size(sm: sessionmaker) -> int:
    with sm() as db:
        return (
            db.scalar(select(func.count()).select_from(DeadLetterRow).where(DeadLetterRow.replayed_at.is_(None))) or 0
        )
