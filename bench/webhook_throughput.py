"""Webhook transport throughput and latency over loopback, against the reference receiver.

    python bench/webhook_throughput.py [--n 3000] [--concurrency 1,4,16] [--sessions 32] [--batch 50]

Starts the reference receiver (`proctor consume webhook --quiet`, a separate process so
sender and receiver do not share a GIL) on a free loopback port, then per concurrency setting sends --n
signed alerts (realistic canonical payloads, --sessions sessions round-robin) through
WebhookTransport.send() in batches of --batch, and prints deliveries/s (wall clock over the whole run) and
the latency of one acknowledged POST (signing + request + 2xx answer) at p50/p95/p99. Finally checks with
the receiver's /stats that every alert arrived exactly once, and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from livekit_proctor.contracts.alerts import Alert, AlertMetadata, EventType, IncidentState  # noqa: E402
from livekit_proctor.dispatcher.transports.base import Envelope  # noqa: E402
from livekit_proctor.dispatcher.transports.webhook import WebhookTransport  # noqa: E402
from livekit_proctor.dispatcher.webhook_signing import generate_secret  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_batch(n: int, sessions: int, seq0: int) -> list[Envelope]:
    out = []
    for i in range(n):
        sid = f"exam-bench-{i % sessions}"
        a = Alert(
            exam_session_id=sid,
            candidate_id=f"cand-{i % sessions}",
            event_type=EventType.FACE_NOT_FOUND,
            severity_score=0.62,
            ai_model_source="mediapipe.blazeface_full_range",
            evidence={"face_count": 0.0, "threshold_s": 5.0, "duration_s": 5.2, "frame_seq": i, "face_scores": []},
            metadata=AlertMetadata(node_id="bench", worker_id="pid0"),
            incident_state=IncidentState.STARTED,
        )
        out.append(Envelope(seq0 + i, a.event_id, sid, "FACE_NOT_FOUND", a.to_json().encode(), time.time()))
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] * 1000


async def run(url: str, secret: str, n: int, concurrency: int, sessions: int, batch: int, seq0: int) -> dict:
    t = WebhookTransport(url, [secret], concurrency=concurrency, max_batch=batch)
    await t.start()
    try:
        await t.send(make_batch(50, sessions, seq0))  # warm-up: connections open, code paths hot
        envs = make_batch(n, sessions, seq0 + 50)
        t.latencies_s = deque(maxlen=n)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            await t.send(envs[i : i + batch])
        elapsed = time.perf_counter() - t0
    finally:
        await t.close()
    lat = list(t.latencies_s)
    return {
        "concurrency": concurrency,
        "sent": n + 50,
        "per_s": n / elapsed,
        "p50": pct(lat, 0.50),
        "p95": pct(lat, 0.95),
        "p99": pct(lat, 0.99),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="alerts per concurrency setting")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated settings")
    ap.add_argument("--sessions", type=int, default=32)
    ap.add_argument("--batch", type=int, default=50)
    args = ap.parse_args()

    secret, port = generate_secret(), _free_port()
    env = {**os.environ, "PROCTOR_WEBHOOK_SECRETS": secret, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "livekit_proctor.dispatcher.consumers.webhook", "--port", str(port), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("receiver did not start")
            time.sleep(0.1)

        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, receiver: 1 uvicorn process, loopback")
        print(f"{'concurrency':>11} {'deliveries/s':>13} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
        total, seq0 = 0, 0
        for c in (int(x) for x in args.concurrency.split(",")):
            r = asyncio.run(run(f"{base}/hook", secret, args.n, c, args.sessions, args.batch, seq0))
            seq0 += r["sent"]
            total += r["sent"]
            print(f"{c:>11} {r['per_s']:>13.0f} {r['p50']:>8.2f} {r['p95']:>8.2f} {r['p99']:>8.2f}")
        stats = httpx.get(f"{base}/stats").json()
        print(f"receiver /stats: {stats} (sent {total})")
        ok = stats["unique"] == total and stats["duplicates"] == 0 and stats["rejected"] == 0
    finally:
        proc.terminate()  # SIGTERM: uvicorn shuts down and the receiver prints its counts
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    if err.strip():
        print(err.strip().splitlines()[-1])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
