"""gRPC transport throughput and send latency over loopback.

    python bench/grpc_throughput.py [--batches 200] [--batch-size 100] [--record] [--no-typed] [--target H:P]

Starts the reference consumer (proctor consume grpc --quiet) in its own process on a free
port unless --target is given, then sends --batches batches of --batch-size realistic alerts (about 700 bytes of
JSON each) through one GrpcTransport and prints envelopes/s and the p50 / p95 / max latency of one send()
(from the first write to the Ack covering the batch). The first 10 batches are a warm-up and not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from livekit_proctor.contracts.alerts import Alert, AlertMetadata, EventType, IncidentState  # noqa: E402
from livekit_proctor.dispatcher.transports.base import Envelope  # noqa: E402
from livekit_proctor.dispatcher.transports.grpc import GrpcTransport  # noqa: E402

WARMUP = 10


def envelopes(first_seq: int, n: int) -> list[Envelope]:
    out = []
    for seq in range(first_seq, first_seq + n):
        a = Alert(
            exam_session_id="exam-2025-0412-c17",
            candidate_id="cand-8841",
            event_type=EventType.FACE_NOT_FOUND,
            severity_score=0.621,
            ai_model_source="mediapipe.blazeface_full_range",
            evidence={
                "face_count": 0.0,
                "peak_face_count": 0.0,
                "threshold_s": 5.0,
                "clear_after_s": 1.0,
                "condition_since": 1747041242.213,
                "duration_s": 5.2,
                "first_frame_seq": 1180,
                "trigger_frame_seq": 1206,
                "frame_seq": seq,
                "face_scores": [],
            },
            metadata=AlertMetadata(node_id="analyzer-1", worker_id="pid8533", exam_id="math-101"),
            incident_id="a73bbced-576e-47b5-abb6-85e7d9552288",
            incident_state=IncidentState.STARTED,
        )
        out.append(Envelope(seq, a.event_id, a.exam_session_id, a.event_type, a.to_json().encode(), time.time()))
    return out


async def start_consumer(record: Path | None) -> tuple[asyncio.subprocess.Process, int]:
    args = [sys.executable, "-m", "livekit_proctor.dispatcher.consumers.grpc_server", "--port", "0", "--quiet"]
    if record is not None:
        args += ["--record", str(record)]
    proc = await asyncio.create_subprocess_exec(*args, cwd=REPO, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
        if not line:
            raise RuntimeError("consumer exited before listening")
        if "listening on" in line:
            return proc, int(line.rsplit(":", 1)[1])


async def run(args: argparse.Namespace) -> None:
    proc = None
    tmp = tempfile.TemporaryDirectory()
    target = args.target
    if target is None:
        proc, port = await start_consumer(Path(tmp.name) / "seen.txt" if args.record else None)
        target = f"127.0.0.1:{port}"
    t = GrpcTransport(target, typed_alert=not args.no_typed, max_batch=max(256, args.batch_size))
    total = args.batches + WARMUP
    batches = [envelopes(1 + i * args.batch_size, args.batch_size) for i in range(total)]
    payload = statistics.mean(len(e.payload) for e in batches[0])
    try:
        await t.start()
        lat: list[float] = []
        t_start = 0.0
        for i, b in enumerate(batches):
            if i == WARMUP:
                t_start = time.perf_counter()
            t0 = time.perf_counter()
            await t.send(b)
            if i >= WARMUP:
                lat.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - t_start
    finally:
        await t.close()
        if proc is not None:
            proc.terminate()
            await proc.wait()
        tmp.cleanup()
    lat.sort()
    n = args.batches * args.batch_size
    p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
    print(
        f"grpc loopback: {n} envelopes ({payload:.0f} B JSON each) in {args.batches} batches of {args.batch_size}, "
        f"typed_alert={not args.no_typed}, record={'yes' if args.record else 'no'}"
    )
    print(f"  throughput: {n / elapsed:,.0f} envelopes/s")
    print(
        f"  send() latency per batch: p50 {statistics.median(lat) * 1e3:.2f} ms, p95 {p95 * 1e3:.2f} ms, "
        f"max {lat[-1] * 1e3:.2f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--record", action="store_true", help="consumer records event_ids and acks to files")
    ap.add_argument("--no-typed", action="store_true", help="send alert_json only (no typed Alert)")
    ap.add_argument("--target", default=None, help="use a running consumer instead of starting one")
    asyncio.run(run(ap.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
