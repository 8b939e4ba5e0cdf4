"""POST /api/v1/privacy/delete reaches whatever outbox is configured (the Redis Stream outbox here, on a real
redis-server; the SQL one in test_identity_store.py), dispatchers reading it at the time, and the candidate's
sessions live on another analyzer node that shares the database (SQLite and PostgreSQL)."""

from __future__ import annotations

import base64
import contextlib
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import pytest
import redis.asyncio as aredis
import websockets
from sqlalchemy import select

from livekit_proctor.analyzer.rules.policy import effective_policy
from livekit_proctor.analyzer.sessions.store import SessionStore
from livekit_proctor.contracts.alerts import Alert, AlertMetadata, EventType
from livekit_proctor.contracts.api import SessionStartRequest
from livekit_proctor.db import DeadLetterRow, OutboxRow, SessionRow, make_engine, make_sessionmaker
from livekit_proctor.dispatcher.engine import Dispatcher
from livekit_proctor.dispatcher.outbox import RedisOutbox, SqlOutbox
from livekit_proctor.dispatcher.source import GROUP_PREFIX, OutboxSource, RedisSource, SqlSource
from livekit_proctor.dispatcher.transports.base import RetryPolicy
from livekit_proctor.dispatcher.transports.redis_stream import RedisStreamTransport
from livekit_proctor.settings import Settings
from tests.conftest import ADMIN_KEY, LiveServer, StreamClient, black_jpeg, load_rgb, stream_url
from tests.conftest import eventually as wait_until
from tests.servers import RedisServer, stream_entries
from tests.test_postgres import pg_url  # noqa: F401  (the fixture: one PostgreSQL server for this module)

FAST = RetryPolicy(first_s=0.01, max_s=0.05, factor=2.0, jitter=0.0, max_attempts=3)
LANE = "redis"  # the lane of a RedisStreamTransport: consumer group proctor-dispatch:redis
FACE = "faces/identity/angelina_jolie/deepface__img1.jpg"  # shared data (skips without it)


def alert(sid: str, cid: str, i: int) -> Alert:
    return Alert(
        exam_session_id=sid, candidate_id=cid, event_type=EventType.FACE_NOT_FOUND, severity_score=0.5,
        timestamp=datetime.now(UTC).isoformat(), ai_model_source="test",
        evidence={"i": i, "thumbnail_jpeg_b64": "aGVsbG8="}, metadata=AlertMetadata(node_id="n", worker_id="w"),
    )  # fmt: skip


def delete(srv: LiveServer, cid: str) -> dict[str, Any]:
    with srv.http(ADMIN_KEY) as c:
        r = c.post("/api/v1/privacy/delete", json={"candidate_id": cid})
    assert r.status_code == 200, r.text
    return r.json()


async def test_delete_removes_the_candidates_redis_outbox_entries_and_the_others_are_still_delivered(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    srv = LiveServer(tmp_path, outbox="redis", redis_url=redis_server.url, dispatcher_embedded=False).start()
    r = aredis.from_url(redis_server.url)
    try:
        for sid, cid in (("x-1", "x"), ("x-2", "x"), ("y-1", "y")):
            srv.start_session(sid, candidate=cid)
        stream = srv.settings.outbox_stream
        outbox = RedisOutbox(aredis.from_url(redis_server.url), stream)
        order = ["x-1", "x-2", "y-1", "x-1", "y-1", "y-1", "x-2", "y-1"]  # queued, no dispatcher running
        for i, sid in enumerate(order):
            await outbox.publish(alert(sid, sid[0], i))
        await outbox.r.aclose()
        group = GROUP_PREFIX + LANE
        await r.xgroup_create(stream, group, id="0")
        # A dispatcher that read three entries and died (pending, claimable by another) ...
        await r.xreadgroup(group, "dead", {stream: ">"}, count=3)
        # ... and one that holds two in its hands, sending them, while the deletion runs.
        busy = RedisSource(aredis.from_url(redis_server.url), "busy", stream)
        in_hand = await busy.read(LANE, 2, 0.1)
        assert [json.loads(e.payload)["evidence"]["i"] for e in in_hand] == [3, 4]

        with srv.http(ADMIN_KEY) as c:  # the export reads the configured outbox too
            ex = c.get("/api/v1/privacy/export", params={"candidate_id": "x"}).json()
        assert [a["alert"]["evidence"]["i"] for a in ex["alerts"]] == [
            i for i, sid in enumerate(order) if sid[0] == "x"
        ]
        assert {a["delivered"] for a in ex["alerts"]} == {False}  # read at most, acknowledged by none

        rep = delete(srv, "x")
        assert sorted(rep["session_ids"]) == ["x-1", "x-2"]
        assert rep["deleted"]["outbox"] == 4  # every entry of x: queued, pending with "dead", in "busy"'s hands
        assert rep["deleted"]["outbox_pending"] == 3  # x-1, x-2 pending with "dead"; x-1 with "busy"

        entries = stream_entries(await r.xrange(stream))
        assert {f[b"exam_session_id"] for _, f in entries} == {b"y-1"}
        assert b"thumbnail" in entries[0][1][b"payload"]  # y's alerts are intact
        pending = await r.xpending_range(stream, group, min="-", max="+", count=100)
        left = {p["message_id"] for p in pending}
        assert left <= {eid for eid, _ in entries}  # no deleted entry waits in a pending list
        assert {p["consumer"] for p in pending} == {b"dead", b"busy"}  # y's pending entries stay claimable

        await busy.ack(LANE, in_hand)  # "busy" finishes sending the deleted entry: a no-op, not an error
        await busy.close()

        # A dispatcher now delivers exactly y's alerts: the queued ones and those the dead one left pending.
        d = Dispatcher(
            RedisSource(aredis.from_url(redis_server.url), "d2", stream, claim_idle_s=0.05),
            [RedisStreamTransport(redis_server.url, "out", retry=FAST)],
            srv.app.state.sessions.sm,
        )
        await d.start()
        want = {i for i, sid in enumerate(order) if sid == "y-1"} - {4}  # 4 was acknowledged by "busy"

        async def delivered() -> set[int]:
            return {json.loads(f[b"payload"])["evidence"]["i"] for _, f in stream_entries(await r.xrange("out"))}

        async def done() -> bool:
            return await delivered() >= want and (await r.xpending(stream, group))["pending"] == 0

        await wait_until(done, what=f"{want} delivered and acknowledged")
        await d.stop()
        assert await delivered() == want
    finally:
        await r.aclose()
        srv.stop()


@pytest.mark.parametrize("kind", ["sql", "redis"])
async def test_a_lane_retrying_an_alert_deleted_meanwhile_drops_it(
    kind: str, tmp_path: Path, redis_server: RedisServer
) -> None:
    """A lane whose backend is down holds its batch and retries it; a deletion meanwhile takes the candidate's
    alerts out of that batch: never sent, never dead-lettered, the rest delivered once the backend is back."""
    sm = make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'proctor.db'}"))
    outbox: SqlOutbox | RedisOutbox
    source: OutboxSource
    if kind == "redis":
        outbox = RedisOutbox(aredis.from_url(redis_server.url), "proctor:alerts")
        source = RedisSource(aredis.from_url(redis_server.url), "d1", "proctor:alerts")
    else:
        outbox, source = SqlOutbox(sm, None), SqlSource(sm, "d1")
    for i, sid in enumerate(["x-1", "y-1", "x-1", "y-1"]):
        await outbox.publish(alert(sid, sid[0], i))
    backend = RedisServer()  # not started yet: every send fails
    patient = RetryPolicy(first_s=0.01, max_s=0.05, factor=2.0, jitter=0.0, max_attempts=1_000_000)
    d = Dispatcher(source, [RedisStreamTransport(backend.url, "out", retry=patient)], sm)
    await d.start()
    try:
        await wait_until(lambda: d.states[LANE].failed_attempts >= 2, what="the lane retrying its batch")
        assert (await outbox.delete_sessions(["x-1"]))["outbox"] == 2
        backend.start()
        out = aredis.from_url(backend.url)

        async def sent() -> list[int]:
            return [json.loads(f[b"payload"])["evidence"]["i"] for _, f in stream_entries(await out.xrange("out"))]

        await wait_until(lambda: d.states[LANE].delivered >= 2, what="y's alerts delivered")
        assert await sent() == [1, 3]
        await out.aclose()
        with sm() as db:
            assert db.scalars(select(DeadLetterRow)).all() == []
    finally:
        await d.stop()
        if kind == "redis":
            await outbox.r.aclose()  # type: ignore[union-attr]
        backend.stop()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
async def test_delete_on_one_node_ends_the_candidates_session_live_on_another(
    database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two analyzer nodes on one database: the delete on node 1 ends the session node 2 serves at node 2's next
    sweep (no end alert for the deleted candidate), and what node 2 wrote meanwhile (alerts in the outbox, the
    identity audit record of its session re-reading the deleted enrollment) goes too."""
    face = cv2.imencode(".jpg", cv2.cvtColor(load_rgb(FACE), cv2.COLOR_RGB2BGR))[1].tobytes()
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    if database == "postgresql":
        db = request.getfixturevalue("pg_url")  # one server for this module; a database for each test is not needed
    key = base64.b64encode(b"k" * 32).decode()  # one embedding key on every node (docs/operations.md)
    common: dict[str, Any] = {"database_url": db, "stream_secret": "s" * 32, "embedding_key": key,
                              "dispatcher_embedded": False}  # fmt: skip
    (tmp_path / "n1").mkdir()
    (tmp_path / "n2").mkdir()
    node1 = LiveServer(tmp_path / "n1", **common).start()
    # Node 2 re-checks enrollments more often than it sweeps: its session of x re-reads the deleted enrollment
    # (an identity audit record, IDENTITY_UNVERIFIED) before the sweep ends it.
    node2 = LiveServer(tmp_path / "n2", expiry_sweep_s=1.0, enrollment_recheck_s=0.1, **common).start()
    try:
        with node1.http() as c:
            r = c.post("/api/v1/enroll", json={"candidate_id": "x", "image_base64": base64.b64encode(face).decode()})
            assert r.status_code == 200, r.text
        cfg = node2.start_session("x-live", candidate="x", verification_policy={"mode": "periodic"})
        node2.start_session("y-live", candidate="y")
        base = time.time() - 60
        async with StreamClient.connect(stream_url(cfg)) as s:
            for i in range(30):  # 6 s without a face: FACE_NOT_FOUND, its start alert carries a thumbnail
                await s.video(black_jpeg(), base + i * 0.2)
            await s.sync()
            await s.wait_for(lambda m: m["type"] == "alert")

            rep = delete(node1, "x")
            assert rep["sessions_ended"] == ["x-live"] and rep["deleted"]["sessions"] == 1
            with contextlib.suppress(websockets.ConnectionClosed):
                for i in range(30, 60):  # node 2 goes on until its sweep: what it appends now must go too
                    await s.video(black_jpeg(), base + i * 0.2)
            ended = await s.wait_for(lambda m: m["type"] == "session_ended")
            mgr2 = node2.app.state.sessions
            sweeps = mgr2.metrics.registry.get_sample_value("proctor_expiry_sweeps_total")
            # "ended_elsewhere" when node 2's sweep fell between node 1's end and its deletion of the row.
            assert ended["reason"] in ("privacy_deletion", "ended_elsewhere")
            closed = await wait_until(lambda: s.closed, what="connection closed")
            assert closed[0] == 4408
        assert "x-live" not in mgr2.live and "y-live" in mgr2.live  # the other candidate's session goes on
        # The sweep that ended it is over once the count moves on (its clean-up is its last step).
        await wait_until(lambda: mgr2.metrics.registry.get_sample_value("proctor_expiry_sweeps_total") > sweeps)
        with mgr2.sm() as db_:
            left = db_.scalars(select(OutboxRow.event_type).where(OutboxRow.exam_session_id == "x-live")).all()
        assert left == []
        assert [a["action"] for a in node1.app.state.identity.audit_entries("x")] == ["delete"]
        with node2.http(ADMIN_KEY) as c:
            assert c.get("/api/v1/session/x-live").status_code == 404
            assert c.get("/api/v1/session/y-live").json()["state"] == "active"
    finally:
        node2.stop()
        node1.stop()


async def test_redis_outbox_delete_pages_through_the_stream(redis_server: RedisServer) -> None:
    outbox = RedisOutbox(aredis.from_url(redis_server.url), "proctor:alerts")
    try:
        assert await outbox.delete_sessions(["x-1"]) == {"outbox": 0, "outbox_pending": 0}  # no stream yet
        sids = ["x-1", "y-1", "x-2", "x-1", "y-1", "x-2", "x-1"]
        for i, sid in enumerate(sids):
            await outbox.publish(alert(sid, sid[0], i))
        # No consumer group yet: nothing was read, nothing to acknowledge.
        assert await outbox.delete_sessions(["x-1", "x-2", "z"], page=2) == {"outbox": 5, "outbox_pending": 0}
        left = [json.loads(f[b"payload"])["evidence"]["i"] for _, f in await outbox.r.xrange("proctor:alerts")]
        assert left == [1, 4]
    finally:
        await outbox.r.aclose()


async def test_redis_outbox_export_says_which_entries_every_reader_has_acknowledged(redis_server: RedisServer) -> None:
    outbox = RedisOutbox(aredis.from_url(redis_server.url), "proctor:alerts")
    r = outbox.r
    try:
        for i, sid in enumerate(["x-1", "y-1", "x-1", "x-1"]):
            await outbox.publish(alert(sid, sid[0], i))
        got = await outbox.export_sessions(["x-1"])
        assert [(a["alert"]["evidence"]["i"], a["delivered"]) for a in got] == [(0, None), (2, None), (3, None)]
        await r.xgroup_create("proctor:alerts", "lane-a", id="0")
        await r.xgroup_create("proctor:alerts", "lane-b", id="0")
        read = await r.xreadgroup("lane-a", "c", {"proctor:alerts": ">"}, count=3)  # entries 0, 1, 2
        await r.xack("proctor:alerts", "lane-a", read[0][1][0][0])  # lane a acknowledges entry 0 only
        await r.xreadgroup("lane-b", "c", {"proctor:alerts": ">"}, count=4)
        await r.xack("proctor:alerts", "lane-b", *[eid for eid, _ in (await r.xrange("proctor:alerts"))])
        got = await outbox.export_sessions(["x-1"])
        # 0: acknowledged by both lanes; 2: read but pending in lane a; 3: lane a has not read it yet.
        assert [(a["alert"]["evidence"]["i"], a["delivered"]) for a in got] == [(0, True), (2, False), (3, False)]
        assert await outbox.export_sessions(["x-1"], page=1) == got  # the same when the stream and pending lists page
        assert all(a["exam_session_id"] == "x-1" and a["event_id"] for a in got)
    finally:
        await r.aclose()


async def test_a_sessions_row_tells_its_node_whether_another_ended_restarted_or_deleted_it(tmp_path: Path) -> None:
    store = SessionStore(make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'proctor.db'}")))
    rows = {}
    for sid in ("live", "ended", "restarted", "deleted"):
        req = SessionStartRequest(exam_session_id=sid, candidate_id="c", exam_id="e")
        rows[sid] = await store.create(req, effective_policy(req, Settings().video_fps), "test", 3600)
    await store.finish("ended", "ended", "node1", "ended_by_api", None)
    req = SessionStartRequest(exam_session_id="restarted", candidate_id="c", exam_id="e")
    await store.create(req, effective_policy(req, Settings().video_fps), "node1", 3600)  # a new sitting
    with store.sm.begin() as db:
        db.delete(db.get(SessionRow, "deleted"))
    sittings = {sid: row.sitting or "" for sid, row in rows.items()}
    assert await store.ended_elsewhere(sittings) == {
        "ended": "ended_elsewhere", "restarted": "ended_elsewhere", "deleted": "deleted"
    }  # fmt: skip
