"""The dispatcher over real parts: SQL and Redis outboxes, a real Redis peer, retries, DLQ, replay, claims."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest
import redis.asyncio as aredis
from sqlalchemy.orm import sessionmaker

from livekit_proctor.contracts.alerts import Alert, AlertMetadata, EventType
from livekit_proctor.db import DeadLetterRow, make_engine, make_sessionmaker
from livekit_proctor.dispatcher.engine import Dispatcher
from livekit_proctor.dispatcher.outbox import RedisOutbox, SqlOutbox
from livekit_proctor.dispatcher.source import STREAM, RedisSource, SqlSource
from livekit_proctor.dispatcher.transports.base import DISPATCH, RetryPolicy
from livekit_proctor.dispatcher.transports.redis_stream import RedisStreamTransport
from tests.conftest import eventually as wait_until
from tests.servers import RedisServer, free_port

FAST = RetryPolicy(first_s=0.01, max_s=0.05, factor=2.0, jitter=0.0, max_attempts=3)
SLOW = replace(DISPATCH, max_attempts=99)


def alert(i: int, session: str = "s1") -> Alert:
    return Alert(
        exam_session_id=session, candidate_id="c", event_type=EventType.FACE_NOT_FOUND, severity_score=0.5,
        ai_model_source="test", evidence={"i": i}, metadata=AlertMetadata(node_id="n", worker_id="w"),
    )  # fmt: skip


@pytest.fixture
def sm(tmp_path: Path) -> sessionmaker:
    return make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'd.db'}"))


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "livekit_proctor.cli", *args], capture_output=True, text=True, env=env,
                          timeout=60)  # fmt: skip


async def out_stream(url: str, stream: str = "proctoring.alerts.v1") -> list[dict[str, str]]:
    r = aredis.from_url(url, decode_responses=True)
    try:
        entries = cast(list[tuple[str, dict[str, str]]], await r.xrange(stream))  # decoded: str, not bytes
        return [f for _, f in entries]
    finally:
        await r.aclose()


async def test_sql_outbox_to_redis_in_order_and_resumes_after_restart(sm, redis_server: RedisServer) -> None:
    outbox = SqlOutbox(sm, None)
    sent = [alert(i, f"s{i % 3}") for i in range(300)]
    for a in sent[:200]:
        await outbox.publish(a)
    d = Dispatcher(SqlSource(sm, "d1"), [RedisStreamTransport(redis_server.url, retry=FAST)], sm)
    await d.start()

    async def count(n: int) -> bool:
        return len(await out_stream(redis_server.url)) >= n

    await wait_until(lambda: count(200))
    await d.stop()
    for a in sent[200:]:  # appended while no dispatcher runs
        await outbox.publish(a)
    d2 = Dispatcher(SqlSource(sm, "d2"), [RedisStreamTransport(redis_server.url, retry=FAST)], sm)
    await d2.start()
    await wait_until(lambda: count(300))
    await d2.stop()
    got = await out_stream(redis_server.url)
    assert [f["event_id"] for f in got] == [a.event_id for a in sent]  # in order, none lost, none twice
    assert json.loads(got[0]["payload"])["event_id"] == sent[0].event_id


async def test_failures_retry_then_dead_letter_then_replay(sm, tmp_path: Path) -> None:
    outbox = SqlOutbox(sm, None)
    dead_port = free_port()
    d = Dispatcher(SqlSource(sm, "d1"), [RedisStreamTransport(f"redis://127.0.0.1:{dead_port}/0", retry=FAST)], sm)
    await d.start()
    for i in range(2):
        await outbox.publish(alert(i))

    def dead() -> list[DeadLetterRow]:
        with sm() as db:
            return list(db.query(DeadLetterRow).all())

    async def both_dead() -> bool:
        return len(await asyncio.to_thread(dead)) == 2

    await wait_until(both_dead)
    await d.stop()
    rows = dead()
    assert {r.attempts for r in rows} == {3} and all("Error" in r.error for r in rows)
    assert d.states["redis"].dead_lettered == 2

    env = {"PROCTOR_DATABASE_URL": f"sqlite:///{tmp_path / 'd.db'}", "PATH": "/usr/bin:/bin"}
    listed = await asyncio.to_thread(cli, env, "dlq", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {json.loads(x)["event_id"] for x in listed.stdout.splitlines()} == {r.event_id for r in rows}

    # The peer comes up; the operator replays; the dispatcher sends them on the same lane, same event_id.
    srv = RedisServer(port=dead_port).start()
    try:
        replay = await asyncio.to_thread(cli, env, "dlq", "replay")
        assert replay.returncode == 0 and "2 dead letter(s) queued" in replay.stdout
        d = Dispatcher(SqlSource(sm, "d2"), [RedisStreamTransport(srv.url, retry=FAST)], sm)
        await d.start()

        async def replayed() -> bool:
            return len(await out_stream(srv.url)) == 2

        await wait_until(replayed)
        await d.stop()
        assert {f["event_id"] for f in await out_stream(srv.url)} == {r.event_id for r in rows}
        assert all(r.replayed_at for r in dead())
    finally:
        srv.stop()


@pytest.fixture
async def shared_redis(redis_server: RedisServer) -> AsyncIterator[RedisServer]:
    yield redis_server


async def test_redis_outbox_shared_by_two_dispatchers_and_claims_a_dead_ones_work(
    sm, shared_redis: RedisServer
) -> None:
    url = shared_redis.url
    outbox = RedisOutbox(aredis.from_url(url))
    sent = [alert(i) for i in range(400)]
    # Dispatcher A reads a batch and dies before acknowledging (no send: its peer is unreachable).
    dead = Dispatcher(RedisSource(aredis.from_url(url), "A", claim_idle_s=0.5),
                      [RedisStreamTransport(f"redis://127.0.0.1:{free_port()}/0", retry=SLOW)],
                      sm)  # fmt: skip
    for a in sent[:50]:
        await outbox.publish(a)
    await dead.start()
    probe = aredis.from_url(url)

    async def dead_holds_all() -> bool:  # A has read all 50 (they are pending on it) and tried to send
        try:
            pending = await probe.xpending(STREAM, "proctor-dispatch:redis")
        except aredis.ResponseError:  # NOGROUP: A has not created its consumer group yet
            return False
        return pending["pending"] == 50 and dead.states["redis"].failed_attempts >= 1

    await wait_until(dead_holds_all)
    await probe.aclose()
    for t in dead._tasks:  # SIGKILL-like: no ack, no cleanup
        t.cancel()
    b = Dispatcher(
        RedisSource(aredis.from_url(url), "B", claim_idle_s=0.5), [RedisStreamTransport(url, retry=FAST)], sm
    )
    c = Dispatcher(
        RedisSource(aredis.from_url(url), "C", claim_idle_s=0.5), [RedisStreamTransport(url, retry=FAST)], sm
    )
    await b.start()
    await c.start()
    for a in sent[50:]:
        await outbox.publish(a)

    async def all_there() -> bool:
        return {f["event_id"] for f in await out_stream(url)} >= {a.event_id for a in sent}

    await wait_until(all_there)
    await b.stop()
    await c.stop()
    got = [f["event_id"] for f in await out_stream(url)]
    assert set(got) == {a.event_id for a in sent}
    assert b.states["redis"].delivered > 0 and c.states["redis"].delivered > 0  # work was shared


async def test_fallback_chain_uses_the_first_transport_that_works(sm, redis_server: RedisServer) -> None:
    from livekit_proctor.dispatcher.engine import FallbackChain

    down = RedisStreamTransport(f"redis://127.0.0.1:{free_port()}/0", "primary", retry=FAST)
    down.name = "primary"
    up = RedisStreamTransport(redis_server.url, "secondary", retry=FAST)
    up.name = "secondary"
    chain = FallbackChain([down, up], FAST)
    outbox = SqlOutbox(sm, None)
    sent = [alert(i) for i in range(20)]
    for a in sent:
        await outbox.publish(a)
    d = Dispatcher(SqlSource(sm, "d1"), [chain], sm)
    await d.start()

    async def arrived() -> bool:
        return len(await out_stream(redis_server.url, "secondary")) == 20

    await wait_until(arrived)
    await d.stop()
    assert [f["event_id"] for f in await out_stream(redis_server.url, "secondary")] == [a.event_id for a in sent]
    assert chain.used == {"primary": 0, "secondary": 20} and d.states["fallback"].dead_lettered == 0
