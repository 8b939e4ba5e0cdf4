"""Kafka transport: each outbox envelope becomes one record, keyed by exam session, acked by all in-sync replicas.

Record: key = exam_session_id (all alerts of a session land in one partition, so they stay in order),
value = the canonical alert JSON (Envelope.payload), headers event_id / event_type / seq / schema_version.

Ordering: aiokafka keeps at most one request in flight per broker connection and mutes a partition while its
batch is in flight (the equivalent of max.in.flight.requests.per.connection=1), so retries never reorder a
partition even without idempotence. Idempotence additionally removes the duplicates a retried produce request
can leave behind. Some brokers refuse it (tansu answers InitProducerId with UnknownError; an ACL-less cluster
answers ClusterAuthorizationFailed): with idempotence="auto" we then fall back to a plain producer once, log
it, and report it in state(); consumers deduplicate by event_id in any case.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any, Literal

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import CloseReason
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NodeNotReadyError,
    RecordTooLargeError,
    RequestTimedOutError,
    UnknownError,
    UnsupportedVersionError,
)

from livekit_proctor.contracts.alerts import SCHEMA_VERSION
from livekit_proctor.dispatcher.transports.base import DISPATCH, DeliveryError, Envelope, RetryPolicy, TransportStats

log = logging.getLogger(__name__)

DEFAULT_TOPIC = "proctoring.alerts.v1"
DEFAULT_DLQ_TOPIC = "proctoring.alerts.dlq"

# Errors that say "the broker is not there (yet)", not "the broker refuses this": never a reason to give up
# idempotence or to dead-letter.
_UNREACHABLE = (KafkaConnectionError, NodeNotReadyError, RequestTimedOutError, KafkaTimeoutError, TimeoutError, OSError)
# Retrying the same bytes cannot help: dead-letter at once.
_PERMANENT = (MessageSizeTooLargeError, RecordTooLargeError)
# How brokers say "no idempotence here" (tansu: UnknownError; old brokers: UnsupportedVersion; no
# IdempotentWrite ACL: ClusterAuthorizationFailed).
_IDEMPOTENCE_REFUSED = (UnknownError, UnsupportedVersionError, ClusterAuthorizationFailedError)

IdempotenceMode = Literal["enabled", "disabled", "fallback", "pending"]


def stray_cancel(e: BaseException) -> bool:
    """True for a CancelledError that aiokafka leaked from one of its own tasks (e.g. aio-libs/aiokafka#647,
    stop() soon after start()), False for anything else, including a real cancellation of the current task."""
    if not isinstance(e, asyncio.CancelledError):
        return False
    task = asyncio.current_task()
    return task is None or not task.cancelling()


def watch_connection_loss(client: Any, on_loss: Callable[[], None]) -> None:
    """Calls on_loss when one of the client's broker connections breaks (the broker died or restarted).

    aiokafka reconnects by itself but keeps its metadata, positions and producer state; a broker that came back
    empty (tansu in memory) needs a fresh client. aiokafka has no public hook, so this wraps the client's
    connection-closed callback; it must run before the client opens connections (i.e. before start()).
    """
    original = getattr(client, "_on_connection_closed", None)
    if original is None:  # a future aiokafka without the hook: degrade to "never told"
        return

    def hook(conn: Any, reason: Any) -> None:
        if reason in (CloseReason.CONNECTION_BROKEN, CloseReason.CONNECTION_TIMEOUT):
            on_loss()
        original(conn, reason)

    client._on_connection_closed = hook


async def ensure_topics(
    bootstrap: str, topics: dict[str, int], *, timeout_s: float = 5.0, **security: Any
) -> dict[str, str]:
    """Creates the topics that do not exist (name -> partitions); returns name -> "created" / "exists" / error.

    Best effort: brokers that auto-create topics (tansu does, with 4 partitions) work without it, and a
    cluster that forbids CreateTopics for us reports an error here that we only log.
    """
    result: dict[str, str] = {}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000), **security)
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        resp = await asyncio.wait_for(
            admin.create_topics([NewTopic(t, num_partitions=n, replication_factor=1) for t, n in topics.items()]),
            timeout_s,
        )
        for err in resp.topic_errors:
            name, code = err[0], err[1]
            result[name] = "created" if code == 0 else "exists" if code == 36 else f"error {code}: {err[-1]}"
    except (Exception, asyncio.CancelledError) as e:  # unreachable, not authorised, ...: auto-create may work
        if isinstance(e, asyncio.CancelledError) and not stray_cancel(e):
            raise
        result = {t: f"error {type(e).__name__}: {e}" for t in topics}
    try:
        await asyncio.wait_for(admin.close(), timeout_s)
    except (Exception, asyncio.CancelledError) as e:
        if isinstance(e, asyncio.CancelledError) and not stray_cancel(e):
            raise
    return result


def _schema_version(payload: bytes) -> str:
    # The canonical JSON is compact (pydantic), so a byte search avoids parsing every alert.
    key = b'"schema_version":"'
    i = payload.find(key)
    if i >= 0:
        j = payload.find(b'"', i + len(key))
        if j > 0:
            return payload[i + len(key) : j].decode("ascii", "replace")
    try:
        return str(json.loads(payload).get("schema_version", SCHEMA_VERSION))
    except (ValueError, AttributeError):
        return SCHEMA_VERSION


def _headers(env: Envelope) -> list[tuple[str, bytes]]:
    return [
        ("event_id", env.event_id.encode()),
        ("event_type", env.event_type.encode()),
        ("seq", str(env.seq).encode()),
        ("schema_version", _schema_version(env.payload).encode()),
    ]


def _seal(producer: AIOKafkaProducer) -> None:
    """Sends the open batches now instead of after linger_ms: the caller's batch is complete.

    Within one send() the records are enqueued without yielding, so they are batched anyway; lingering would
    only add linger_ms to every send. Same steps as aiokafka's own flush_for_commit(), without the wait.
    With other aiokafka internals this does nothing and linger_ms applies.
    """
    # Private and untyped: anything missing (None included) raises AttributeError, suppressed below.
    acc: Any = getattr(producer, "_message_accumulator", None)
    with contextlib.suppress(AttributeError):
        for batches in acc._batches.values():
            for batch in batches:
                batch._builder.close()
        if not acc._waiter_future.done():
            acc._waiter_future.set_result(None)


def _describe(e: BaseException) -> str:
    text = str(e)
    name = type(e).__name__
    return text if text.startswith(name) else f"{name}: {text}" if text else name


class KafkaTransport:
    name = "kafka"

    def __init__(
        self,
        bootstrap: str,
        *,
        topic: str = DEFAULT_TOPIC,
        dlq_topic: str = DEFAULT_DLQ_TOPIC,
        idempotence: bool | str = "auto",
        acks: str | int = "all",
        security_protocol: str = "PLAINTEXT",
        ssl_context: ssl.SSLContext | None = None,
        sasl_mechanism: str = "PLAIN",
        sasl_plain_username: str | None = None,
        sasl_plain_password: str | None = None,
        linger_ms: int = 5,
        max_batch: int = 500,
        retry: RetryPolicy | None = None,
        request_timeout_ms: int = 10000,
        partitions: int = 6,
        create_topics: bool = True,
        max_batch_bytes: int = 256 * 1024,
        client_id: str = "proctor-dispatcher",
    ) -> None:
        if idempotence not in (True, False, "auto"):
            raise ValueError(f"idempotence must be True, False or 'auto', not {idempotence!r}")
        self.bootstrap = bootstrap
        self.topic = topic
        self.dlq_topic = dlq_topic
        self.idempotence = idempotence
        self.acks = acks
        self.linger_ms = linger_ms
        self.max_batch = max_batch
        self.retry = retry or DISPATCH
        self.request_timeout_ms = request_timeout_ms
        self.partitions = partitions
        self.create_topics = create_topics
        self.max_batch_bytes = max_batch_bytes
        self.client_id = client_id
        self._security: dict[str, Any] = {"security_protocol": security_protocol, "ssl_context": ssl_context}
        if security_protocol.startswith("SASL"):
            self._security.update(
                sasl_mechanism=sasl_mechanism,
                sasl_plain_username=sasl_plain_username,
                sasl_plain_password=sasl_plain_password,
            )
        self._producer: AIOKafkaProducer | None = None
        self._mode: IdempotenceMode = "pending" if idempotence == "auto" else "enabled" if idempotence else "disabled"
        self._fallback_reason: str | None = None
        self._conn_lost = False
        self._idempotent_acked = False  # an idempotent produce succeeded once: later errors are not refusals
        self._lock = asyncio.Lock()  # one send / (re)connect at a time: keeps batches in outbox order
        self.stats = TransportStats()
        self.reconnects = 0
        self.dead_lettered = 0
        self.topics_ensured: dict[str, str] = {}
        self._last_ok: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connects now if it can; an unreachable or refusing broker is only recorded (send() retries)."""
        async with self._lock:
            try:
                await self._ensure_producer()
            except DeliveryError as e:
                log.warning("kafka transport not connected yet: %s", e)

    async def close(self) -> None:
        async with self._lock:
            await self._drop_producer()

    def state(self) -> dict[str, Any]:
        return {
            "transport": self.name,
            "bootstrap": self.bootstrap,
            "topic": self.topic,
            "dlq_topic": self.dlq_topic,
            "connected": self._producer is not None and not self._conn_lost,
            "acks": self.acks,
            "idempotence_requested": self.idempotence,
            # enabled | disabled | fallback (broker refused, plain producer) | pending (auto, not yet connected)
            "idempotence": self._mode,
            "idempotence_fallback_reason": self._fallback_reason,
            "max_in_flight": 1,  # aiokafka: one request per broker connection, partition muted while in flight
            "delivered": self.stats.delivered,
            "failed_attempts": self.stats.failed_attempts,
            "dead_lettered": self.dead_lettered,
            "reconnects": self.reconnects,
            "last_error": self.stats.last_error,
            "last_ok_age_s": None if self._last_ok is None else round(time.monotonic() - self._last_ok, 3),
            "topics": self.topics_ensured,
        }

    # -- producer management -----------------------------------------------------------------------------

    def _new_producer(self, idempotent: bool) -> AIOKafkaProducer:
        p = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=self.client_id,
            acks=self.acks,
            enable_idempotence=idempotent,
            linger_ms=self.linger_ms,
            max_batch_size=self.max_batch_bytes,
            request_timeout_ms=self.request_timeout_ms,
            # A broker that lost its topics must be noticed soon, not after the default 5 minutes.
            metadata_max_age_ms=30000,
            **self._security,
        )
        watch_connection_loss(p.client, self._on_conn_lost)
        return p

    def _on_conn_lost(self) -> None:
        self._conn_lost = True

    async def _start_producer(self, idempotent: bool) -> AIOKafkaProducer:
        p = self._new_producer(idempotent)
        try:
            # Bounded: an idempotent start waits for a producer id and, on retriable errors, would wait forever.
            await asyncio.wait_for(p.start(), self.request_timeout_ms / 1000)
        except BaseException:
            await self._stop_quietly(p)
            raise
        return p

    async def _ensure_producer(self) -> AIOKafkaProducer:
        """The live producer, (re)creating it after a lost connection; DeliveryError(delivered=0) if impossible."""
        if self._producer is not None and self._conn_lost:
            # The broker went away since the last send: it may have come back empty (topics, producer ids), so
            # start over with fresh metadata rather than trusting aiokafka's cached view.
            await self._drop_producer()
            self.reconnects += 1
        if self._producer is not None:
            return self._producer
        self._conn_lost = False
        idempotent = self._mode in ("enabled", "pending")
        try:
            self._producer = await self._start_producer(idempotent)
        except _UNREACHABLE as e:
            raise self._fail(f"kafka broker {self.bootstrap} unreachable: {_describe(e)}", 0) from e
        except KafkaError as e:
            if self._mode == "pending" and isinstance(e, _IDEMPOTENCE_REFUSED):
                self._fall_back(f"InitProducerId refused: {_describe(e)}")
                try:
                    self._producer = await self._start_producer(False)
                except Exception as e2:
                    raise self._fail(f"kafka producer failed to start: {_describe(e2)}", 0) from e2
            elif self._mode == "enabled" and isinstance(e, _IDEMPOTENCE_REFUSED):
                raise self._fail(
                    f"kafka broker {self.bootstrap} refused the idempotent producer ({_describe(e)}); "
                    "it may not support idempotence: use idempotence='auto' or False",
                    0,
                ) from e
            else:
                raise self._fail(f"kafka producer failed to start: {_describe(e)}", 0) from e
        if self._mode == "pending":
            self._mode = "enabled"
            log.info("kafka transport: idempotent producer active (%s)", self.bootstrap)
        if self.create_topics:
            # After the producer: the broker is known to answer, so this does not double an unreachable timeout.
            # Also after every reconnect, since a broker that restarted empty has lost its topics.
            self.topics_ensured = await ensure_topics(
                self.bootstrap,
                {self.topic: self.partitions, self.dlq_topic: 1},
                timeout_s=self.request_timeout_ms / 1000,
                **self._security,
            )
            log.debug("kafka transport topics: %s", self.topics_ensured)
        return self._producer

    def _fall_back(self, reason: str) -> None:
        # Sticky for the life of the transport: the broker will not learn idempotence between two sends.
        self._mode = "fallback"
        self._fallback_reason = reason
        log.warning(
            "kafka transport: broker %s does not support idempotent producers (%s); using a non-idempotent "
            "producer (acks=%s, one request in flight per partition: order kept, retries may duplicate)",
            self.bootstrap,
            reason,
            self.acks,
        )

    async def _drop_producer(self, *, abort: bool = False) -> None:
        p, self._producer = self._producer, None
        if p is None:
            return
        if abort:
            await self._abort(p)
        else:
            await self._stop_quietly(p)

    async def _abort(self, p: AIOKafkaProducer) -> None:
        # After a failed send: drop the records still queued instead of flushing them (stop() would). Delivering
        # them late, after the caller was told they failed and while it resends them, could put a session's
        # alerts out of order.
        sender = getattr(p, "_sender", None)
        task = getattr(sender, "sender_task", None)
        if task is None:  # a future aiokafka without these internals: plain bounded stop
            await self._stop_quietly(p)
            return
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 2.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(p.client.close(), 2.0)
        p._closed = True  # keeps aiokafka's "Unclosed AIOKafkaProducer" warning quiet

    async def _stop_quietly(self, p: AIOKafkaProducer) -> None:
        # stop() flushes pending batches first; with the broker gone that can take forever, so bound it and
        # then tear the sender down by hand (pending records are reported failed to their futures' owners).
        try:
            await asyncio.wait_for(p.stop(), 2.0)
        except (Exception, asyncio.CancelledError) as e:
            if isinstance(e, asyncio.CancelledError) and not stray_cancel(e):
                raise  # our own cancellation, not aiokafka's internal one
            sender = getattr(p, "_sender", None)
            task = getattr(sender, "sender_task", None)
            if task is not None and not task.done():
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(p.client.close(), 2.0)

    def _fail(self, reason: str, delivered: int, *, permanent: bool = False) -> DeliveryError:
        self.stats.failed_attempts += 1
        self.stats.last_error = reason
        return DeliveryError(reason=reason, delivered=delivered, permanent=permanent)

    # -- delivery ----------------------------------------------------------------------------------------

    async def send(self, batch: list[Envelope]) -> None:
        if not batch:
            return
        async with self._lock:
            delivered, err = await self._produce_guarded(self.topic, [(e, _headers(e)) for e in batch], "kafka")
            self.stats.delivered += delivered
            if delivered:
                self._idempotent_acked = self._idempotent_acked or self._mode == "enabled"
            if delivered == len(batch):
                self._last_ok = time.monotonic()
                return
            assert err is not None
            permanent = isinstance(err, _PERMANENT)
            if not permanent:
                # Whatever broke (timeout, lost broker, refusal), the next attempt gets a fresh producer.
                await self._drop_producer(abort=True)
                self._conn_lost = False
                self.reconnects += 1
                refused = isinstance(err, _IDEMPOTENCE_REFUSED) and not self._idempotent_acked
                if self._mode == "enabled" and self.idempotence == "auto" and refused:
                    # Granted a producer id but refuses idempotent produce requests: same fallback.
                    self._fall_back(f"idempotent produce refused: {_describe(err)}")
            env = batch[delivered]
            raise self._fail(
                f"kafka: {delivered}/{len(batch)} acked; seq {env.seq} failed: {_describe(err)}",
                delivered,
                permanent=permanent,
            ) from err

    async def _produce_guarded(
        self, topic: str, records: list[tuple[Envelope, list[tuple[str, bytes]]]], what: str
    ) -> tuple[int, BaseException | None]:
        """_produce on the current producer, called with self._lock held. A failure mode we do not know is
        reported as a retriable DeliveryError (nothing counted as acked) rather than let it, or a CancelledError
        leaked by aiokafka, take down the dispatcher lane."""
        try:
            producer = await self._ensure_producer()
            return await self._produce(producer, topic, records)
        except DeliveryError:
            raise
        except (Exception, asyncio.CancelledError) as e:
            if isinstance(e, asyncio.CancelledError) and not stray_cancel(e):
                raise
            await self._drop_producer(abort=True)
            raise self._fail(f"{what}: unexpected {_describe(e)}", 0) from e

    async def _produce(
        self, producer: AIOKafkaProducer, topic: str, records: list[tuple[Envelope, list[tuple[str, bytes]]]]
    ) -> tuple[int, BaseException | None]:
        """Produces in order, waits for the acks; returns (leading acked count, first error or None).

        Stops at the first failure: what follows it is resent by the caller anyway, so neither enqueueing more
        nor waiting for later acks helps, and a dead broker would make both wait for every batch's timeout.
        """
        loop = asyncio.get_running_loop()
        # aiokafka expires a non-idempotent batch after request_timeout_ms but never an idempotent one.
        deadline = loop.time() + self.request_timeout_ms / 1000 * 2 + self.linger_ms / 1000 + 1.0
        failed = False

        def on_done(f: asyncio.Future[Any]) -> None:
            nonlocal failed
            if f.cancelled() or f.exception() is not None:  # .exception() also marks it retrieved
                failed = True

        futures: list[asyncio.Future[Any]] = []
        error: BaseException | None = None
        try:
            for env, headers in records:
                if failed or loop.time() > deadline:
                    break
                # Waits when the partition's batch is full (backpressure), up to request_timeout_ms.
                fut = await producer.send(topic, value=env.payload, key=env.exam_session_id.encode(), headers=headers)
                fut.add_done_callback(on_done)
                futures.append(fut)
        except Exception as e:  # metadata timeout, record too large, producer closed, ...
            error = e
        _seal(producer)
        delivered = 0
        for f in futures:
            if not f.done():
                remaining = deadline - loop.time()
                if remaining > 0:
                    await asyncio.wait([f], timeout=remaining)
                if not f.done():
                    error = KafkaTimeoutError(f"no ack within {self.request_timeout_ms * 2 / 1000:.1f}s")
                    break
            if f.cancelled() or f.exception() is not None:
                error = KafkaError("cancelled") if f.cancelled() else f.exception()
                break
            delivered += 1
        if delivered == len(records):
            return delivered, None
        return delivered, error or KafkaTimeoutError("delivery deadline passed before every record was enqueued")

    async def send_dlq(self, envelope: Envelope, error: str, transport: str) -> None:
        """Dead-letters one envelope (same key and value, the failure in headers); DeliveryError if not acked."""
        headers = [
            *_headers(envelope),
            ("error", error.encode("utf-8", "replace")[:4096]),
            ("failed_transport", transport.encode()),
            ("attempts", str(envelope.attempts).encode()),
            ("created_at", repr(envelope.created_at).encode()),
            ("dead_lettered_at", repr(time.time()).encode()),
        ]
        async with self._lock:
            delivered, err = await self._produce_guarded(self.dlq_topic, [(envelope, headers)], "kafka DLQ")
            if delivered == 1:
                self.dead_lettered += 1
                self._last_ok = time.monotonic()
                return
            assert err is not None
            if not isinstance(err, _PERMANENT):
                await self._drop_producer(abort=True)
                self._conn_lost = False
            raise self._fail(
                f"kafka DLQ {self.dlq_topic}: seq {envelope.seq} not acked: {_describe(err)}",
                0,
                permanent=isinstance(err, _PERMANENT),
            ) from err
