"""Reference AlertDelivery consumer (server side of proto/proctoring/v1/delivery.proto).

    proctor consume grpc --port 50051 --record seen.txt [--tls-cert C --tls-key K
        [--client-ca CA]] [--quiet]

- Deduplicates by event_id: per process, plus the event_ids already in --record, so a restarted consumer
  still knows what it saw. Prints each new alert as one JSON line to stdout; counts duplicates and prints a
  summary line to stderr on exit (SIGINT / SIGTERM).
- --record FILE: one event_id per line, appended and flushed per line before the envelope is acked.
  last_acked_sequence per stream_id is persisted beside it (FILE.acks.json), so after a restart Ready tells the
  dispatcher where to resume.
- Acks cumulatively after recording and grants credit back as it processes (credit-based flow control).
  A client exceeding its credit, or skipping Hello, is cut off; an envelope without a usable event_id is
  rejected with INVALID_ARGUMENT after everything before it was acked (the dispatcher dead-letters it).

Durability is a flush to the OS (survives a killed consumer, not a power loss).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc
import grpc.aio

from livekit_proctor.dispatcher.transports.grpc import alert_from_proto
from livekit_proctor.protogen import ensure_generated

ensure_generated()  # regenerates only in a checkout whose .proto files changed since the build
from livekit_proctor.proto.proctoring.v1 import alerts_pb2, delivery_pb2, delivery_pb2_grpc  # noqa: E402

_END = object()  # reader -> processor: the client half-closed


@dataclass
class ConsumerStats:
    received: int = 0  # envelopes received
    new: int = 0  # envelopes whose event_id was new: recorded and printed
    duplicates: int = 0  # envelopes whose event_id was already seen
    streams: int = 0  # Deliver streams accepted (Hello answered)
    active_streams: int = 0
    max_in_flight: int = 0  # most envelopes one stream had received beyond the credit given back
    protocol_errors: int = 0  # streams cut off for a protocol violation or a rejected envelope


class _ProtocolError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class AlertConsumer:
    """State shared by all streams: seen event_ids, record file, last acked sequence per stream_id."""

    def __init__(
        self,
        record: Path | None,
        *,
        credit: int = 256,
        print_alerts: bool = True,
        ack_delay_s: float = 0.0,
        out: TextIO | None = None,
    ) -> None:
        self.record = record
        self.acks_path = record.with_name(record.name + ".acks.json") if record is not None else None
        self.credit = credit
        self.print_alerts = print_alerts
        self.ack_delay_s = ack_delay_s
        self.out = out
        self.stats = ConsumerStats()
        self.seen: set[str] = set()
        self.acked: dict[str, int] = {}
        self._record_file: Any = None
        self._lock = asyncio.Lock()  # dedup check + record + mark seen happen as one step across streams
        self._io_lock = threading.Lock()  # record and acks files are written from worker threads
        self._ack_budget: int | None = None  # None: ack freely; n: ack n more envelopes, then hold
        self._released = asyncio.Event()

    # -- lifecycle (file work in threads: never on the event loop) ------------------------------------------

    async def open(self) -> None:
        await asyncio.to_thread(self._open_files)

    def _open_files(self) -> None:
        if self.record is None:
            return
        self.record.parent.mkdir(parents=True, exist_ok=True)
        if self.record.exists():
            data = self.record.read_bytes()
            if data and not data.endswith(b"\n"):  # a line cut by a crash: it was never acked
                data = data[: data.rfind(b"\n") + 1]
                with self.record.open("r+b") as f:
                    f.truncate(len(data))
            self.seen.update(line for line in data.decode("utf-8").split("\n") if line)
        if self.acks_path is not None and self.acks_path.exists():
            with contextlib.suppress(ValueError):
                self.acked = {str(k): int(v) for k, v in json.loads(self.acks_path.read_text()).items()}
        self._record_file = self.record.open("a", encoding="utf-8")

    async def close(self) -> None:
        await asyncio.to_thread(self._close_files)

    def _close_files(self) -> None:
        with self._io_lock:
            if self._record_file is not None:
                self._record_file.close()
                self._record_file = None

    def summary(self) -> str:
        s = self.stats
        return (
            f"grpc consumer: received={s.received} new={s.new} duplicates={s.duplicates} streams={s.streams} "
            f"protocol_errors={s.protocol_errors} seen_total={len(self.seen)}"
        )

    # -- ack hold: lets fault tests (and operators) freeze acks and credit while envelopes keep arriving ----

    def hold_acks(self, after: int = 0) -> None:
        """Ack (and credit back) at most `after` more envelopes, then hold until release_acks()."""
        self._ack_budget = after
        self._released.clear()

    def release_acks(self) -> None:
        self._ack_budget = None
        self._released.set()

    async def _ackable(self, n: int) -> int:
        """How many of n recorded envelopes may be acked now; waits while acks are held."""
        while self._ack_budget is not None and self._ack_budget <= 0:
            await self._released.wait()
        if self._ack_budget is None:
            return n
        k = min(n, self._ack_budget)
        self._ack_budget -= k
        return k

    # -- processing -----------------------------------------------------------------------------------------

    @staticmethod
    def _parse(env: alerts_pb2.AlertEnvelope) -> tuple[str, str]:
        """-> (event_id, one-line JSON); alert_json is authoritative, the typed alert a fallback."""
        if env.alert_json:
            try:
                alert = json.loads(env.alert_json)
                event_id = alert["event_id"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"alert_json is not a JSON alert with event_id: {e}") from e
            line = env.alert_json if "\n" not in env.alert_json else json.dumps(alert, separators=(",", ":"))
        elif env.HasField("alert"):
            alert = alert_from_proto(env.alert)
            event_id = alert["event_id"]
            line = json.dumps(alert, separators=(",", ":"), ensure_ascii=False)
        else:
            raise ValueError("envelope carries neither alert_json nor alert")
        if not isinstance(event_id, str) or not event_id:
            raise ValueError("empty or non-string event_id")
        return event_id, line

    async def record_batch(self, envs: list[alerts_pb2.AlertEnvelope]) -> tuple[int, str | None]:
        """Records the new alerts of envs in order; -> (how many of envs are processed, rejection or None)."""
        new: list[tuple[str, str]] = []
        rejected: str | None = None
        async with self._lock:
            batch_ids: set[str] = set()
            for i, env in enumerate(envs):
                try:
                    event_id, line = self._parse(env)
                except ValueError as e:
                    rejected, envs = f"envelope seq {env.sequence}: {e}", envs[:i]
                    break
                if event_id in self.seen or event_id in batch_ids:
                    self.stats.duplicates += 1
                else:
                    batch_ids.add(event_id)
                    new.append((event_id, line))
            # Marked seen before the write, so a stream cancelled mid-write (client gone; the thread still
            # finishes the write) does not record them twice; a failed write un-marks them for the retry.
            self.seen.update(batch_ids)
            if new and (self._record_file is not None or self.print_alerts):
                try:
                    await asyncio.to_thread(self._write, new)
                except Exception:
                    self.seen.difference_update(batch_ids)
                    raise
            self.stats.new += len(new)
        return len(envs), rejected

    def _write(self, new: list[tuple[str, str]]) -> None:
        with self._io_lock:  # close() may run meanwhile
            if self._record_file is not None:
                for event_id, _ in new:
                    self._record_file.write(event_id + "\n")
                    self._record_file.flush()  # per line: fault tests read the record while we run
        if self.print_alerts:
            out = self.out or sys.stdout
            out.write("".join(line + "\n" for _, line in new))
            out.flush()

    async def ack(self, stream_id: str, seq: int) -> int:
        """Marks everything <= seq on stream_id received (persisted first); -> the cumulative ack to send."""
        acked = max(self.acked.get(stream_id, 0), seq)
        if acked != self.acked.get(stream_id):
            self.acked[stream_id] = acked
            if self.acks_path is not None:
                await asyncio.to_thread(self._write_acks, dict(self.acked))
        return acked

    def _write_acks(self, acked: dict[str, int]) -> None:
        assert self.acks_path is not None
        with self._io_lock:
            tmp = self.acks_path.with_name(self.acks_path.name + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(acked))
            os.replace(tmp, self.acks_path)  # atomic: a restart reads the old or the new map


class _Servicer(delivery_pb2_grpc.AlertDeliveryServicer):
    def __init__(self, consumer: AlertConsumer) -> None:
        self.c = consumer

    async def Deliver(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        c = self.c
        try:
            first = await context.read()
        except Exception:  # the client went away before Hello
            return
        if first is grpc.aio.EOF:
            return
        if first.WhichOneof("kind") != "hello":
            c.stats.protocol_errors += 1
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "first message must be Hello")
        stream_id = first.hello.stream_id or "default"
        ready = delivery_pb2.Ready(last_acked_sequence=c.acked.get(stream_id, 0), credit=c.credit)
        await context.write(delivery_pb2.ServerMessage(ready=ready))
        c.stats.streams += 1
        c.stats.active_streams += 1
        queue: asyncio.Queue[Any] = asyncio.Queue()
        flow = {"received": 0, "returned": 0}  # credit accounting for this stream

        async def read() -> None:
            try:
                while True:
                    msg = await context.read()
                    if msg is grpc.aio.EOF:
                        queue.put_nowait(_END)
                        return
                    if msg.WhichOneof("kind") != "envelope":
                        raise _ProtocolError(grpc.StatusCode.FAILED_PRECONDITION, "only envelopes after Hello")
                    flow["received"] += 1
                    c.stats.received += 1
                    in_flight = flow["received"] - flow["returned"]
                    c.stats.max_in_flight = max(c.stats.max_in_flight, in_flight)
                    if in_flight > c.credit:
                        raise _ProtocolError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"sent beyond credit ({in_flight})")
                    queue.put_nowait(msg.envelope)
            except _ProtocolError as e:
                queue.put_nowait(e)
            except Exception as e:  # the client went away: end the stream quietly
                queue.put_nowait(_ProtocolError(grpc.StatusCode.CANCELLED, f"read failed: {e!r}"))

        reader = asyncio.create_task(read(), name=f"grpc-consumer-reader:{stream_id}")
        try:
            while True:
                items = [await queue.get()]
                while not queue.empty():  # everything that arrived meanwhile: one record write, one ack
                    items.append(queue.get_nowait())
                envs = [x for x in items if isinstance(x, alerts_pb2.AlertEnvelope)]
                stop = next((x for x in items if not isinstance(x, alerts_pb2.AlertEnvelope)), None)
                done, rejected = await c.record_batch(envs) if envs else (0, None)
                pending = [e.sequence for e in envs[:done]]
                while pending:
                    k = await c._ackable(len(pending))
                    if c.ack_delay_s > 0:
                        await asyncio.sleep(c.ack_delay_s)
                    acked = await c.ack(stream_id, max(pending[:k]))
                    flow["returned"] += k  # before the write: the client may send again as soon as it reads it
                    await context.write(delivery_pb2.ServerMessage(ack=alerts_pb2.Ack(sequence=acked)))
                    await context.write(delivery_pb2.ServerMessage(credit=delivery_pb2.Credit(credit=k)))
                    pending = pending[k:]
                if rejected is not None:
                    stop = _ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, rejected)
                if stop is _END:
                    return
                if isinstance(stop, _ProtocolError):
                    if stop.code != grpc.StatusCode.CANCELLED:
                        c.stats.protocol_errors += 1
                    await context.abort(stop.code, stop.details)
        finally:
            c.stats.active_streams -= 1
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


class ConsumerServer:
    """A running consumer: .port, .consumer (stats, hold_acks), await .stop()."""

    def __init__(self, server: grpc.aio.Server, port: int, consumer: AlertConsumer) -> None:
        self.server, self.port, self.consumer = server, port, consumer

    @property
    def stats(self) -> ConsumerStats:
        return self.consumer.stats

    def hold_acks(self, after: int = 0) -> None:
        self.consumer.hold_acks(after)

    def release_acks(self) -> None:
        self.consumer.release_acks()

    async def stop(self, grace: float | None = None) -> None:
        """grace None: cancels open streams at once (what a crash looks like to the client)."""
        await self.server.stop(grace)
        await self.consumer.close()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def _read(p: str | Path | None) -> bytes | None:
    return Path(p).read_bytes() if p is not None else None


def _read_tls(cert: str | Path, key: str | Path, ca: str | Path | None) -> tuple[bytes, bytes, bytes | None]:
    return Path(cert).read_bytes(), Path(key).read_bytes(), _read(ca)


async def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    record: Path | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    client_ca: str | Path | None = None,
    credit: int = 256,
    print_alerts: bool = True,
    ack_delay_s: float = 0.0,
    out: TextIO | None = None,
) -> ConsumerServer:
    """Starts a consumer on host:port (0: any free port, see .port). client_ca: require client certs (mTLS)."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together")
    if client_ca is not None and tls_cert is None:
        raise ValueError("client_ca (mTLS) needs tls_cert / tls_key")
    consumer = AlertConsumer(
        Path(record) if record is not None else None,
        credit=credit,
        print_alerts=print_alerts,
        ack_delay_s=ack_delay_s,
        out=out,
    )
    await consumer.open()
    server = grpc.aio.server(
        options=[
            # Let dispatchers keep the idle stream alive with pings (GrpcTransport keepalive_s >= 10).
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.so_reuseport", 0),  # a second consumer on a busy port fails instead of sharing it
        ]
    )
    delivery_pb2_grpc.add_AlertDeliveryServicer_to_server(_Servicer(consumer), server)
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    if tls_cert is not None and tls_key is not None:  # both or neither (checked above)
        cert, key, ca = await asyncio.to_thread(_read_tls, tls_cert, tls_key, client_ca)
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    await server.start()
    return ConsumerServer(server, bound, consumer)


async def _run(args: argparse.Namespace) -> int:
    srv = await serve(
        args.host,
        args.port,
        record=args.record,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        client_ca=args.client_ca,
        credit=args.credit,
        print_alerts=not args.quiet,
    )
    print(f"grpc consumer listening on {args.host}:{srv.port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await srv.stop(grace=1.0)
    print(srv.consumer.summary(), file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="proctor consume grpc", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=50051, help="0: any free port (printed on stderr)")
    ap.add_argument("--record", type=Path, default=None, help="append each new event_id here (and FILE.acks.json)")
    ap.add_argument("--tls-cert", default=None, help="server certificate chain (PEM)")
    ap.add_argument("--tls-key", default=None, help="server private key (PEM)")
    ap.add_argument("--client-ca", default=None, help="require client certificates signed by this CA (mTLS)")
    ap.add_argument("--credit", type=int, default=256, help="flow-control window per stream")
    ap.add_argument("--quiet", action="store_true", help="do not print alerts to stdout")
    args = ap.parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except (ValueError, OSError, RuntimeError) as e:
        print(f"grpc consumer: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
