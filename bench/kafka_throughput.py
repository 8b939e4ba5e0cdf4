"""Kafka transport throughput and send latency against a local tansu broker (started and stopped here).

    python bench/kafka_throughput.py [--batches 300] [--batch-size 100] [--linger-ms 0,5] [--pad 0]

Sends --batches batches of --batch-size canonical alerts (3 exam sessions interleaved) one after another, as a
dispatcher lane does (send() returns when every record is acked, acks=all), after 20 warm-up batches. Prints,
per linger setting: envelopes/s over the timed batches and p50 / p95 / p99 / max latency of one send() call.
tansu refuses idempotent producers, so the transport runs in its fallback mode (see its state line).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/...` from the repository root

from livekit_proctor.contracts.alerts import Alert, AlertMetadata, EventType
from livekit_proctor.dispatcher.transports.base import Envelope
from livekit_proctor.dispatcher.transports.kafka import KafkaTransport
from tests.kafka_broker import TansuBroker

SESSIONS = ("exam-a", "exam-b", "exam-c")


def make_batch(start: int, n: int, pad: int) -> list[Envelope]:
    out = []
    for seq in range(start, start + n):
        session = SESSIONS[seq % len(SESSIONS)]
        a = Alert(
            exam_session_id=session,
            candidate_id=f"cand-{session}",
            event_type=EventType.MULTIPLE_FACES,
            severity_score=0.8,
            ai_model_source="blazeface-full",
            evidence={"face_count": 2, "boxes": [[10, 20, 110, 140], [300, 40, 380, 150]], "pad": "x" * pad},
            metadata=AlertMetadata(node_id="bench", worker_id="w0"),
        )
        out.append(Envelope(seq, a.event_id, session, a.event_type, a.to_json().encode(), time.time()))
    return out


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def run(bootstrap: str, batches: int, size: int, linger_ms: int, pad: int) -> dict[str, object]:
    t = KafkaTransport(bootstrap, topic=f"bench.linger{linger_ms}", linger_ms=linger_ms)
    await t.start()
    seq = 1
    try:
        for _ in range(20):  # warm-up: connections, metadata, topic creation
            await t.send(make_batch(seq, size, pad))
            seq += size
        work = [make_batch(seq + i * size, size, pad) for i in range(batches)]  # built outside the timing
        lat: list[float] = []
        t0 = time.perf_counter()
        for b in work:
            s = time.perf_counter()
            await t.send(b)
            lat.append(time.perf_counter() - s)
        wall = time.perf_counter() - t0
        state = t.state()
    finally:
        await t.close()
    return {
        "linger_ms": linger_ms,
        "env_per_s": batches * size / wall,
        "p50_ms": statistics.median(lat) * 1000,
        "p95_ms": pct(lat, 0.95) * 1000,
        "p99_ms": pct(lat, 0.99) * 1000,
        "max_ms": max(lat) * 1000,
        "payload_bytes": len(work[0][0].payload),
        "idempotence": state["idempotence"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--linger-ms", default="0,5", help="comma-separated settings to compare")
    p.add_argument("--pad", type=int, default=0, help="extra evidence bytes per alert")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the idempotence fallback warning is expected on tansu

    with TansuBroker() as broker:
        print(f"tansu at {broker.bootstrap}; {args.batches} batches of {args.batch_size}, sequential sends")
        print(f"{'linger_ms':>9} {'env/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}  payload  mode")
        for linger in (int(x) for x in args.linger_ms.split(",")):
            r = asyncio.run(run(broker.bootstrap, args.batches, args.batch_size, linger, args.pad))
            print(
                f"{r['linger_ms']:>9} {r['env_per_s']:>9.0f} {r['p50_ms']:>8.2f} {r['p95_ms']:>8.2f} "
                f"{r['p99_ms']:>8.2f} {r['max_ms']:>8.2f}  {r['payload_bytes']:>5} B  {r['idempotence']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
