"""Reference Kafka consumer: reads the alert topic, deduplicates by event_id, prints alerts.

    proctor consume kafka --bootstrap HOST:PORT [--topic proctoring.alerts.v1] \\
        [--group proctor-consumer] [--record seen.txt] [--from-latest] [--quiet]

Delivery is at least once, so the same event_id can arrive more than once (a retried produce, a redelivery
after a rebalance or a broker restart): each new alert is printed to stdout as one JSON line, duplicates are
only counted. With --record FILE the ids already in FILE are loaded at start and every new id is appended
(flushed per line) before the offsets are committed, so a crash re-reads at most what was not yet recorded.
Counts go to stderr at exit.

Broker restarts: when a connection to the broker breaks, the consumer is rebuilt (topic re-created if missing,
group re-joined, positions taken from the committed offsets). A broker that comes back empty (tansu in memory)
has no committed offsets, so we read its new log from the beginning instead of from stale positions, which
could skip records; dedup absorbs the re-reads. Offsets read from the old broker are never committed to the
new one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from livekit_proctor.dispatcher.consumers.record import load_record
from livekit_proctor.dispatcher.transports.kafka import (
    DEFAULT_TOPIC,
    ensure_topics,
    stray_cancel,
    watch_connection_loss,
)
from livekit_proctor.retry import CONSUMER_START

log = logging.getLogger("proctor.consumer.kafka")


@dataclass
class ConsumerStats:
    received: int = 0
    unique: int = 0
    duplicates: int = 0
    invalid: int = 0
    reconnects: int = 0  # consumers dropped for a lost broker connection or an error, and re-created

    def summary(self) -> str:
        return (
            f"kafka consumer: {self.received} received, {self.unique} new, {self.duplicates} duplicates, "
            f"{self.invalid} invalid, {self.reconnects} reconnects"
        )


def _header(rec: ConsumerRecord[Any, Any], name: str) -> str | None:
    for k, v in rec.headers or ():
        if k == name and v is not None:
            return v.decode("utf-8", "replace")
    return None


class _Sink:
    """Dedup + print + record; synchronous, so one record is handled atomically."""

    def __init__(self, record: Path | None, print_alerts: bool, out: IO[str], stats: ConsumerStats) -> None:
        self.record = record
        self.print_alerts = print_alerts
        self.out = out
        self.stats = stats
        self.seen: set[str] = load_record(record) if record is not None else set()
        self._f: IO[str] | None = None

    def handle(self, rec: ConsumerRecord[Any, Any]) -> None:
        self.stats.received += 1
        try:
            alert = json.loads(rec.value) if rec.value is not None else None
        except ValueError:
            alert = None
        eid = _header(rec, "event_id") or (alert.get("event_id") if isinstance(alert, dict) else None)
        if not isinstance(alert, dict) or not isinstance(eid, str):
            self.stats.invalid += 1
            log.warning("skipping a record that is not an alert: %s[%d]@%d", rec.topic, rec.partition, rec.offset)
            return
        if eid in self.seen:
            self.stats.duplicates += 1
            return
        self.seen.add(eid)
        self.stats.unique += 1
        if self.record is not None:
            if self._f is None:
                self.record.parent.mkdir(parents=True, exist_ok=True)
                self._f = self.record.open("a", encoding="utf-8")
            self._f.write(eid + "\n")
            self._f.flush()  # recorded before the offset is committed
        if self.print_alerts:
            self.out.write(json.dumps(alert, separators=(",", ":"), ensure_ascii=False) + "\n")
            self.out.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _close_quietly(consumer: AIOKafkaConsumer) -> None:
    # stop() leaves the group and may wait on a broker that is gone: bound it. After a lost connection
    # aiokafka's fetcher re-raises the CancelledError of its own cancelled fetch task: swallow that one,
    # but not a cancellation of our task.
    try:
        await asyncio.wait_for(consumer.stop(), 3.0)
    except (Exception, asyncio.CancelledError) as e:
        if isinstance(e, asyncio.CancelledError) and not stray_cancel(e):
            raise
        log.debug("kafka consumer stop: %r", e)


async def consume(
    bootstrap: str,
    *,
    topic: str = DEFAULT_TOPIC,
    group_id: str = "proctor-consumer",
    record: Path | None = None,
    print_alerts: bool = True,
    from_beginning: bool = True,
    stop: asyncio.Event | None = None,
    out: IO[str] | None = None,
    stats: ConsumerStats | None = None,
    partitions: int = 6,
    session_timeout_ms: int = 6000,
    **security: Any,
) -> ConsumerStats:
    """Consumes until `stop` is set; returns the counts (also updated live in `stats` if given)."""
    stop = stop or asyncio.Event()
    stats = stats if stats is not None else ConsumerStats()
    sink = _Sink(Path(record) if record is not None else None, print_alerts, out or sys.stdout, stats)
    backoff = CONSUMER_START.backoff()
    try:
        while not stop.is_set():
            lost = asyncio.Event()

            def on_loss(lost: asyncio.Event = lost) -> None:
                if not lost.is_set():  # counted here, not when noticed: a stop may come first
                    stats.reconnects += 1
                    lost.set()

            # The topic may not exist yet, or no longer (a broker that restarted empty): create it rather than
            # wait for a producer to auto-create it.
            await ensure_topics(bootstrap, {topic: partitions}, timeout_s=3.0, **security)
            consumer = AIOKafkaConsumer(
                topic,
                bootstrap_servers=bootstrap,
                group_id=group_id,
                enable_auto_commit=False,  # we commit after recording
                auto_offset_reset="earliest" if from_beginning else "latest",
                metadata_max_age_ms=5000,  # notice re-created topics / partitions soon
                # Some brokers (tansu) hold JoinGroup for half the session timeout, and every rebuild joins
                # again: 6 s is the smallest a default-configured Kafka accepts.
                session_timeout_ms=session_timeout_ms,
                heartbeat_interval_ms=max(100, session_timeout_ms // 3),
                request_timeout_ms=10000,
                **security,
            )
            watch_connection_loss(consumer._client, on_loss)
            try:
                await asyncio.wait_for(consumer.start(), 10.0)
            except (Exception, asyncio.CancelledError) as e:
                if isinstance(e, asyncio.CancelledError) and not stray_cancel(e):
                    raise
                delay = backoff.next_delay()
                log.warning("kafka consumer cannot start (%r); retrying in %.1fs", e, delay)
                await _close_quietly(consumer)
                await _sleep_or_stop(stop, delay)
                continue
            try:
                await _poll(consumer, sink, stop, lost)
                backoff.reset()
            except (Exception, asyncio.CancelledError) as e:
                # UnknownTopicOrPartition, OffsetOutOfRange without reset, coordinator errors, a stopped
                # consumer, a CancelledError leaked by aiokafka, ...: start over with a fresh consumer.
                if isinstance(e, asyncio.CancelledError) and not stray_cancel(e):
                    raise
                log.warning("kafka consumer error (%r); reconnecting", e)
                if not lost.is_set():
                    stats.reconnects += 1
                await _sleep_or_stop(stop, backoff.next_delay())
            finally:
                await _close_quietly(consumer)
    finally:
        sink.close()
    return stats


async def _poll(consumer: AIOKafkaConsumer, sink: _Sink, stop: asyncio.Event, lost: asyncio.Event) -> None:
    """Reads until stop, or until a broker connection broke (the caller then rebuilds the consumer)."""
    while not stop.is_set():
        batches = await consumer.getmany(timeout_ms=300, max_records=1000)
        offsets: dict[TopicPartition, int] = {}
        for tp, records in batches.items():
            for rec in records:
                sink.handle(rec)
            if records:
                offsets[tp] = records[-1].offset + 1
        if lost.is_set():
            # Anything fetched around the break may come from the old broker: handled (dedup makes that safe)
            # but not committed, since its offsets mean nothing to a broker that came back empty.
            log.warning("kafka consumer: broker connection lost; rebuilding the consumer")
            return
        if offsets:
            try:
                await asyncio.wait_for(consumer.commit(offsets), 5.0)
            except (KafkaError, TimeoutError) as e:
                # A rebalance or a restart: the records are recorded, a redelivery is only a duplicate.
                log.warning("kafka consumer: commit failed (%r)", e)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="proctor consume kafka", description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", default=os.environ.get("PROCTOR_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    p.add_argument("--topic", default=os.environ.get("PROCTOR_KAFKA_TOPIC", DEFAULT_TOPIC))
    p.add_argument("--group", default="proctor-consumer", help="consumer group id")
    p.add_argument("--record", type=Path, help="file of processed event_ids (loaded at start, appended)")
    p.add_argument("--from-latest", action="store_true", help="without committed offsets start at the end")
    p.add_argument("--quiet", action="store_true", help="do not print alerts, only the counts at exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    stats = ConsumerStats()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await consume(
            args.bootstrap,
            topic=args.topic,
            group_id=args.group,
            record=args.record,
            print_alerts=not args.quiet,
            from_beginning=not args.from_latest,
            stop=stop,
            stats=stats,
        )

    try:
        asyncio.run(run())
    finally:
        print(stats.summary(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
