"""Data lifetime: retention of outbox rows, dead letters, audit log and alerts.jsonl; private file modes."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aredis
from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import sessionmaker

from livekit_proctor.contracts.alerts import Alert, AlertMetadata, EventType
from livekit_proctor.db import AuditRow, CursorRow, DeadLetterRow, LeaseRow, OutboxRow, make_engine, make_sessionmaker
from livekit_proctor.dispatcher import jsonl, retention
from livekit_proctor.dispatcher.engine import Dispatcher
from livekit_proctor.dispatcher.outbox import RedisOutbox, SqlOutbox
from livekit_proctor.dispatcher.retention import purge
from livekit_proctor.dispatcher.service import build_dispatcher, lane_names
from livekit_proctor.dispatcher.source import RedisSource, SqlSource
from livekit_proctor.dispatcher.transports.base import RetryPolicy
from livekit_proctor.dispatcher.transports.redis_stream import RedisStreamTransport
from livekit_proctor.settings import Settings
from tests.conftest import LiveServer
from tests.conftest import eventually as wait_until
from tests.servers import RedisServer, free_port, stream_entries, wait_port

DAY = 86400.0
FAST = RetryPolicy(first_s=0.01, max_s=0.05, factor=2.0, jitter=0.0, max_attempts=3)
REPO = Path(__file__).resolve().parents[1]


def alert(i: int, *, age_s: float = 0.0) -> Alert:
    ts = (datetime.now(UTC) - timedelta(seconds=age_s)).isoformat()
    return Alert(
        exam_session_id="s1", candidate_id="c", event_type=EventType.FACE_NOT_FOUND, severity_score=0.5, timestamp=ts,
        ai_model_source="test", evidence={"i": i}, metadata=AlertMetadata(node_id="n", worker_id="w"),
    )  # fmt: skip


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def settings(tmp: Path, **kw: Any) -> Settings:
    return Settings(data_dir=tmp, **kw)


def seqs(sm: sessionmaker) -> list[int]:
    with sm() as db:
        return list(db.scalars(select(OutboxRow.seq).order_by(OutboxRow.seq)))


def age_rows(sm: sessionmaker, seconds: float, *where: ColumnElement[bool]) -> None:
    with sm.begin() as db:
        db.execute(update(OutboxRow).where(*where).values(created_at=OutboxRow.created_at - seconds))


@pytest.fixture(autouse=True)
def loose_umask() -> Iterator[None]:
    """The usual umask 022: without the fix, files would come out 0644 and directories 0755."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def sm(tmp_path: Path) -> sessionmaker:
    return make_sessionmaker(make_engine(settings(tmp_path).resolved_database_url()))


# ---- outbox rows


async def test_purge_removes_delivered_expired_rows_and_keeps_what_a_lane_has_not_delivered(
    tmp_path: Path, sm, redis_server: RedisServer
) -> None:
    s = settings(tmp_path, redis_publish_stream="out", redis_url=redis_server.url)
    assert lane_names(s) == ["redis"]
    outbox = SqlOutbox(sm, None)
    for i in range(10):
        await outbox.publish(alert(i))
    d = Dispatcher(SqlSource(sm, "d1"), [RedisStreamTransport(redis_server.url, "out", retry=FAST)], sm)
    await d.start()
    r = aredis.from_url(redis_server.url)

    async def delivered(n: int) -> bool:
        return await r.xlen("out") >= n

    async def acked(n: int) -> bool:  # the lane's cursor is written after the send: wait for it, not the send
        def cursor() -> int:
            with sm() as db:
                row = db.get(CursorRow, "redis")
                return row.last_seq if row else 0

        return await asyncio.to_thread(cursor) >= n

    await wait_until(lambda: acked(10))
    await d.stop()
    for i in range(10, 15):  # appended while the dispatcher is down: lane "redis" is behind
        await outbox.publish(alert(i))
    # Everything but seq 9 and 10 is past the retention, including the five undelivered rows.
    age_rows(sm, 8 * DAY, (OutboxRow.seq <= 8) | (OutboxRow.seq >= 11))

    dry = purge(s, sm, dry_run=True)
    assert (dry.outbox, dry.outbox_held, dry.held_by) == (8, 5, ["redis"])
    assert seqs(sm) == list(range(1, 16))
    rep = purge(s, sm)
    assert (rep.outbox, rep.outbox_held, rep.held_by) == (8, 5, ["redis"])
    assert rep.line().startswith("removed 8 outbox rows,")
    assert rep.line().endswith("; kept 5 expired outbox entries not yet delivered by lane redis")
    assert seqs(sm) == list(range(9, 16))
    assert purge(s, sm).outbox == 0  # idempotent

    # The dispatcher comes back and delivers the five it had not: nothing was lost.
    d2 = Dispatcher(SqlSource(sm, "d2"), [RedisStreamTransport(redis_server.url, "out", retry=FAST)], sm)
    await d2.start()
    await wait_until(lambda: delivered(15))
    await d2.stop()
    got = [json.loads(f[b"payload"])["evidence"]["i"] for _, f in stream_entries(await r.xrange("out"))]
    await r.aclose()
    assert got == list(range(15))
    rep = purge(s, sm, now=time.time() + 8 * DAY)
    assert (rep.outbox, rep.outbox_held) == (6, 0)
    assert seqs(sm) == [15]  # the newest row stays: SQLite would reuse its seq


def test_a_configured_lane_that_never_delivered_holds_every_row(tmp_path: Path, sm) -> None:
    outbox = SqlOutbox(sm, None)
    for i in range(4):
        outbox.append(alert(i))
    later = time.time() + 8 * DAY
    hooked = settings(tmp_path, webhook_url="http://127.0.0.1:9/hook", webhook_secrets="whsec_dGVzdA==")
    rep = purge(hooked, sm, now=later)
    assert (rep.outbox, rep.outbox_held, rep.held_by) == (0, 4, ["webhook"])
    # A lane this process's settings do not name but a dispatcher works (its lease): held as well.
    with sm.begin() as db:
        db.add(LeaseRow(lane="grpc", owner="other-host-1", expires_at=0.0))
    rep = purge(settings(tmp_path), sm, now=later)
    assert (rep.outbox, rep.held_by) == (0, ["grpc"])
    assert seqs(sm) == [1, 2, 3, 4]
    with sm.begin() as db:
        db.delete(db.get(LeaseRow, "grpc"))
    # No transport configured and no lane ever seen: nothing to wait for, age alone decides.
    assert purge(settings(tmp_path), sm, now=time.time()).outbox == 0  # not old enough
    assert purge(settings(tmp_path), sm, now=later).outbox == 3
    assert seqs(sm) == [4]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"webhook_url": "http://127.0.0.1:9/h", "webhook_secrets": "whsec_dGVzdA==", "redis_publish_stream": "o"},
        {"webhook_url": "http://127.0.0.1:9/h", "webhook_secrets": "whsec_dGVzdA==", "redis_publish_stream": "o",
         "dispatch_mode": "fallback"},
    ],
)  # fmt: skip
def test_lane_names_are_the_dispatchers_lanes(tmp_path: Path, sm, kw: dict[str, str]) -> None:
    s = settings(tmp_path, **kw)
    assert sorted(lane_names(s)) == sorted(t.name for t in build_dispatcher(s, sm).lanes)


# ---- dead letters and audit log


def test_dead_letters_replayed_or_past_the_dlq_retention_are_removed(tmp_path: Path, sm) -> None:
    now = time.time()

    def dead(event_id: str, dead_at: float, requested: float | None = None, replayed: float | None = None) -> None:
        with sm.begin() as db:
            db.add(
                DeadLetterRow(lane="webhook", seq=1, event_id=event_id, exam_session_id="s1", event_type="X",
                              payload="{}", created_at=dead_at, dead_at=dead_at, attempts=5, error="HTTP 500",
                              replay_requested_at=requested, replayed_at=replayed)
            )  # fmt: skip

    dead("replayed-long-ago", now - 40 * DAY, now - 9 * DAY, now - 9 * DAY)
    dead("replayed-yesterday", now - 40 * DAY, now - DAY, now - DAY)
    dead("dead-long-ago", now - 31 * DAY)
    dead("dead-yesterday", now - DAY)
    dead("replay-in-flight", now - 31 * DAY, now)
    rep = purge(settings(tmp_path), sm, dry_run=True)
    assert rep.dead_letters == 2
    assert purge(settings(tmp_path), sm).dead_letters == 2
    with sm() as db:
        left = set(db.scalars(select(DeadLetterRow.event_id)))
    assert left == {"replayed-yesterday", "dead-yesterday", "replay-in-flight"}
    kept_forever = settings(tmp_path, dlq_retention_s=0, outbox_retention_s=0)
    assert purge(kept_forever, sm, now=now + 365 * DAY).dead_letters == 0


# ---- the running server: file modes (older install tightened) and the audit log


def test_an_older_install_is_made_private_at_start_and_its_audit_log_purged(tmp_path: Path) -> None:
    # A data dir as an older version left it (0755, files 0644), then the current server starts on it.
    d = tmp_path / "old-install"
    d.mkdir(mode=0o755)
    con = sqlite3.connect(d / "proctor.db")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE leftover (x)")
    con.close()
    (d / "alerts.jsonl").write_text(alert(0, age_s=30 * DAY).to_json() + "\n")
    (d / "stream-secret").write_text("ab" * 32)
    assert mode(d) == 0o755 and mode(d / "proctor.db") == mode(d / "alerts.jsonl") == 0o644
    srv = LiveServer(d, purge_interval_s=0).start()  # only the explicit purge below, however slow the machine
    try:
        assert mode(d) == 0o700
        for name in ("proctor.db", "proctor.db-wal", "proctor.db-shm", "alerts.jsonl", "stream-secret"):
            assert mode(d / name) == 0o600, name
        srv.app.state.sink.append(alert(1))  # the server's own outbox writes an alert
        assert mode(d / "alerts.jsonl") == 0o600
        assert len((d / "alerts.jsonl").read_text().splitlines()) == 2

        # Audit rows by age; a second engine on the same database, as `proctor purge` from cron.
        sm = make_sessionmaker(make_engine(srv.settings.resolved_database_url()))
        srv.start_session("audit-old")
        with sm.begin() as db:
            db.execute(update(AuditRow).values(at=datetime.now(UTC) - timedelta(days=91)))
        srv.start_session("audit-new")
        rep = purge(srv.settings, sm)
        assert (rep.audit, rep.jsonl) == (1, 1)  # the old session's start; the older install's 30-day-old line
        with sm() as db:
            assert list(db.scalars(select(AuditRow.target))) == ["audit-new"]
        lines = (d / "alerts.jsonl").read_text().splitlines()
        assert [json.loads(x)["evidence"]["i"] for x in lines] == [1]
        assert mode(d / "alerts.jsonl") == 0o600  # the rewritten file too
    finally:
        srv.stop()


async def test_the_server_purges_at_most_every_purge_interval(tmp_path: Path, sm) -> None:
    s = settings(tmp_path, purge_interval_s=3600)
    assert await retention.purge_due(s, sm) is not None
    assert await retention.purge_due(s, sm) is None  # not due yet
    assert await retention.purge_due(settings(tmp_path, purge_interval_s=0), sm) is None  # disabled


async def test_the_running_server_applies_retention_on_its_own(tmp_path: Path) -> None:
    """`proctor serve` runs retention beside the analyzer (livekit_proctor.wiring): an old audit row goes."""
    srv = LiveServer(tmp_path, expiry_sweep_s=0.2, purge_interval_s=0.2).start()
    try:
        srv.start_session("audit-old")
        sm = make_sessionmaker(make_engine(srv.settings.resolved_database_url()))
        with sm.begin() as db:
            db.execute(update(AuditRow).values(at=datetime.now(UTC) - timedelta(days=91)))

        def purged() -> bool:
            with sm() as db:
                return not list(db.scalars(select(AuditRow.target)))

        await wait_until(purged, what="the server's retention to remove the 91-day-old audit row")
    finally:
        srv.stop()


# ---- alerts.jsonl


def test_jsonl_prune_keeps_new_and_undatable_lines_and_leaves_the_file_alone_when_nothing_is_due(
    tmp_path: Path,
) -> None:
    path = tmp_path / "alerts.jsonl"
    jsonl.append(path, [alert(0, age_s=9 * DAY).to_json(), "not json", alert(1, age_s=8 * DAY).to_json()])
    jsonl.append(path, [alert(2, age_s=DAY).to_json(), alert(3).to_json()])
    cutoff = time.time() - 7 * DAY
    assert jsonl.prune(path, cutoff, dry_run=True) == 2
    assert jsonl.prune(path, cutoff) == 2
    assert path.read_text().splitlines()[0] == "not json"
    assert [json.loads(x)["evidence"]["i"] for x in path.read_text().splitlines()[1:]] == [2, 3]
    inode = path.stat().st_ino
    assert jsonl.prune(path, cutoff) == 0
    assert path.stat().st_ino == inode  # nothing due: not rewritten
    assert jsonl.prune(tmp_path / "missing.jsonl", cutoff) == 0


WRITER = """
import json, sys
from datetime import UTC, datetime
from pathlib import Path
from livekit_proctor.dispatcher import jsonl
path, n, base = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
for i in range(n):
    ts = datetime.fromtimestamp(base + i / 1000, UTC).isoformat()
    jsonl.append(path, [json.dumps({"timestamp": ts, "i": i})])
"""


def test_jsonl_prune_while_another_process_appends_loses_and_repeats_nothing(tmp_path: Path) -> None:
    path, n, base = tmp_path / "alerts.jsonl", 6000, time.time() - 100 * DAY
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(n), str(base)], cwd=REPO)
    removed = prunes = 0
    try:
        # Each prune drops the oldest line: a full rewrite and rename while the writer appends.
        while proc.poll() is None or prunes == 0:
            try:
                with path.open("rb") as f:
                    first = json.loads(f.readline())["i"]
            except (FileNotFoundError, ValueError):
                if proc.poll() is not None:
                    break
                continue
            removed += jsonl.prune(path, base + first / 1000 + 0.0005)
            prunes += 1
    finally:
        proc.wait(60)
    assert proc.returncode == 0
    got = [json.loads(x)["i"] for x in path.read_text().splitlines()]
    assert got == list(range(removed, n))  # every line once, in order; only the pruned head missing
    assert mode(path) == 0o600


# ---- the Redis outbox


async def test_redis_outbox_is_trimmed_below_what_every_lane_acknowledged(
    tmp_path: Path, sm, redis_server: RedisServer
) -> None:
    s = settings(tmp_path, outbox="redis", redis_url=redis_server.url, redis_publish_stream="out")
    outbox = RedisOutbox(aredis.from_url(redis_server.url), s.outbox_stream)
    for i in range(6):
        await outbox.publish(alert(i))
    later = time.time() + 8 * DAY
    # The lane has not read the stream yet (no consumer group): nothing may go.
    rep = purge(s, sm, now=later)
    assert (rep.redis, rep.held_by) == (0, ["redis"])
    src = RedisSource(aredis.from_url(redis_server.url), "d1", s.outbox_stream)
    d = Dispatcher(src, [RedisStreamTransport(redis_server.url, "out", retry=FAST)], sm)
    await d.start()
    r = aredis.from_url(redis_server.url)

    async def delivered(n: int) -> bool:
        return await r.xlen("out") >= n

    await wait_until(lambda: delivered(6))
    await d.stop()
    for i in range(6, 9):  # not read by the lane
        await outbox.publish(alert(i))
    assert purge(s, sm, now=time.time()).redis == 0  # nothing expired
    assert purge(s, sm, now=later, dry_run=True).redis == 6
    rep = purge(s, sm, now=later)
    assert (rep.redis, rep.held_by) == (6, ["redis"])
    left = [json.loads(f[b"payload"])["evidence"]["i"] for _, f in stream_entries(await r.xrange(s.outbox_stream))]
    await r.aclose()
    await outbox.r.aclose()
    assert left == [6, 7, 8]


# ---- the command line


def cli(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PROCTOR_")}
    return subprocess.run([sys.executable, "-m", "livekit_proctor.cli", *args], capture_output=True, text=True, cwd=tmp,
                          env=base | {"PYTHONPATH": str(REPO)} | env, timeout=120)  # fmt: skip


def test_purge_command_output_dry_run_and_idempotence(tmp_path: Path) -> None:
    data = tmp_path / "proctor-data"
    s = settings(data)
    data.mkdir()
    sm = make_sessionmaker(make_engine(s.resolved_database_url()))
    outbox = SqlOutbox(sm, s.resolved_outbox_jsonl())
    for i in range(3):
        outbox.append(alert(i, age_s=8 * DAY))
    outbox.append(alert(3))
    age_rows(sm, 8 * DAY, OutboxRow.seq <= 3)

    r = cli(tmp_path, "purge", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout == (
        "would remove 3 outbox rows, 0 dead letters, 0 audit rows, 3 alerts.jsonl lines, "
        "0 enrollments, 0 identity audit rows\n"
    )
    assert seqs(sm) == [1, 2, 3, 4] and len(s.resolved_outbox_jsonl().read_text().splitlines()) == 4
    r = cli(tmp_path, "purge")
    assert r.returncode == 0, r.stderr
    assert r.stdout == (
        "removed 3 outbox rows, 0 dead letters, 0 audit rows, 3 alerts.jsonl lines, "
        "0 enrollments, 0 identity audit rows\n"
    )
    assert seqs(sm) == [4]
    r = cli(tmp_path, "purge")  # idempotent
    assert r.returncode == 0, r.stderr
    assert r.stdout == (
        "removed 0 outbox rows, 0 dead letters, 0 audit rows, 0 alerts.jsonl lines, "
        "0 enrollments, 0 identity audit rows\n"
    )


def test_purge_command_fails_with_one_line(tmp_path: Path) -> None:
    r = cli(tmp_path, "purge")  # cron in the wrong directory: no database there
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("proctor: purge failed: FileNotFoundError: no database at proctor-data/proctor.db")
    assert len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "proctor-data").exists()  # and it did not create one

    (tmp_path / "proctor-data").mkdir()
    make_engine(settings(tmp_path / "proctor-data").resolved_database_url()).dispose()
    r = cli(tmp_path, "purge", PROCTOR_OUTBOX="redis", PROCTOR_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert r.returncode == 1 and r.stderr.startswith("proctor: purge failed: ConnectionError")
    assert len(r.stderr.splitlines()) == 1


# ---- file modes of the other commands


def test_keys_create_and_the_dispatcher_make_private_files(tmp_path: Path) -> None:
    r = cli(tmp_path, "keys", "create", "--role", "system")
    assert r.returncode == 0, r.stderr
    data = tmp_path / "proctor-data"
    assert mode(data) == 0o700 and mode(data / "proctor.db") == 0o600

    other = tmp_path / "dispatcher-data"
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("PROCTOR_")}
    env = base | {"PYTHONPATH": str(REPO), "PROCTOR_DATA_DIR": str(other), "PROCTOR_DISPATCHER_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "livekit_proctor.cli", "dispatcher"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_port(port, timeout=60)
        assert httpx.get(f"http://127.0.0.1:{port}/.well-known/health").json()["status"] == "ok"
        assert mode(other) == 0o700
        for name in ("proctor.db", "proctor.db-wal", "proctor.db-shm"):
            assert mode(other / name) == 0o600, name
    finally:
        proc.terminate()
        proc.wait(30)
