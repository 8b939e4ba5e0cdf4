"""gRPC transport: one long-lived bidirectional AlertDelivery.Deliver stream (proto/proctoring/v1/delivery.proto).

Per connection: Hello -> Ready {last_acked_sequence, credit}; then envelopes, one per unit of credit; the
server answers cumulative Acks and more Credit. Envelope.seq is the wire sequence, so the sequence space is
the outbox: give each outbox its own stream_id.

- Resume: after a (re)connect, batch envelopes with seq <= Ready.last_acked_sequence count as delivered and
  are not sent again (the consumer persisted them before it restarted).
- Flow control: never more envelopes sent and not yet credited back than the server allowed.
- Failure: a broken stream, or no ack / credit for ack_timeout_s, raises DeliveryError(delivered=k), k = the
  batch's envelopes covered by the last cumulative Ack; the stream and channel are dropped and the next
  send() reconnects on a fresh channel (no inherited reconnect backoff).
- A server that rejects an envelope (INVALID_ARGUMENT, after acking everything before it) gives
  DeliveryError(permanent=True): the dispatcher dead-letters that envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf import json_format

from livekit_proctor.dispatcher.transports.base import DISPATCH, DeliveryError, Envelope, RetryPolicy
from livekit_proctor.protogen import ensure_generated

ensure_generated()  # regenerates only in a checkout whose .proto files changed since the build
from livekit_proctor.proto.proctoring.v1 import alerts_pb2, delivery_pb2, delivery_pb2_grpc  # noqa: E402

log = logging.getLogger(__name__)

_STATE_TO_PB = {
    "started": alerts_pb2.INCIDENT_STATE_STARTED,
    "ongoing": alerts_pb2.INCIDENT_STATE_ONGOING,
    "ended": alerts_pb2.INCIDENT_STATE_ENDED,
}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}
_METADATA_FIELDS = ("node_id", "worker_id", "traceparent")


def alert_to_proto(alert: dict[str, Any]) -> alerts_pb2.Alert:
    """Canonical JSON alert (as a dict) -> proctoring.v1.Alert, per the mapping in alerts.proto."""
    msg = alerts_pb2.Alert(
        event_id=str(alert.get("event_id", "")),
        exam_session_id=str(alert.get("exam_session_id", "")),
        candidate_id=str(alert.get("candidate_id", "")),
        timestamp=str(alert.get("timestamp", "")),
        event_type=str(alert.get("event_type", "")),
        severity_score=float(alert.get("severity_score") or 0.0),
        ai_model_source=str(alert.get("ai_model_source", "")),
        schema_version=str(alert.get("schema_version", "")),
    )
    msg.evidence.update(alert.get("evidence") or {})
    metadata = alert.get("metadata") or {}
    msg.metadata.node_id = str(metadata.get("node_id", ""))
    msg.metadata.worker_id = str(metadata.get("worker_id", ""))
    if metadata.get("traceparent") is not None:
        msg.metadata.traceparent = str(metadata["traceparent"])
    for k, v in metadata.items():
        if k not in _METADATA_FIELDS:
            msg.metadata.extra[k] = v if isinstance(v, str) else json.dumps(v)
    if alert.get("incident_id") is not None:
        msg.incident_id = str(alert["incident_id"])
    msg.incident_state = _STATE_TO_PB.get(alert.get("incident_state") or "", alerts_pb2.INCIDENT_STATE_UNSPECIFIED)
    return msg


def alert_from_proto(msg: alerts_pb2.Alert) -> dict[str, Any]:
    """proctoring.v1.Alert -> JSON alert dict (for envelopes that carry no alert_json)."""
    metadata: dict[str, Any] = {
        "node_id": msg.metadata.node_id,
        "worker_id": msg.metadata.worker_id,
        "traceparent": msg.metadata.traceparent if msg.metadata.HasField("traceparent") else None,
    }
    metadata.update(msg.metadata.extra)
    return {
        "event_id": msg.event_id,
        "exam_session_id": msg.exam_session_id,
        "candidate_id": msg.candidate_id,
        "timestamp": msg.timestamp,
        "event_type": msg.event_type,
        "severity_score": msg.severity_score,
        "ai_model_source": msg.ai_model_source,
        "evidence": json_format.MessageToDict(msg.evidence),
        "metadata": metadata,
        "incident_id": msg.incident_id if msg.HasField("incident_id") else None,
        "incident_state": _STATE_FROM_PB.get(msg.incident_state),
        "schema_version": msg.schema_version,
    }


class _Conn:
    """One Deliver stream on its own channel; the reader task folds Acks and Credits into it."""

    def __init__(self, channel: grpc.aio.Channel, call: grpc.aio.StreamStreamCall) -> None:
        self.channel = channel
        self.call = call
        self.reader: asyncio.Task[None] | None = None
        self.last_acked = 0
        self.credit = 0
        self.broken: str | None = None  # why the stream is unusable; set once
        self.permanent = False  # the server rejected an envelope (INVALID_ARGUMENT)
        self.changed = asyncio.Event()  # set on every ack, credit or break

    def fail(self, reason: str, *, permanent: bool = False) -> None:
        if self.broken is None:
            self.broken, self.permanent = reason, permanent
        self.changed.set()

    async def read_loop(self) -> None:
        try:
            while True:
                msg: Any = await self.call.read()  # a ServerMessage (generated, untyped) or EOF
                if msg is grpc.aio.EOF:
                    self.fail("server closed the stream")
                    return
                kind = msg.WhichOneof("kind")
                if kind == "ack":
                    self.last_acked = max(self.last_acked, msg.ack.sequence)  # cumulative
                elif kind == "credit":
                    self.credit += msg.credit.credit
                self.changed.set()
        except grpc.aio.AioRpcError as e:
            self.fail(_rpc_reason(e), permanent=e.code() == grpc.StatusCode.INVALID_ARGUMENT)
        except asyncio.CancelledError:
            self.fail("stream closed")
            raise
        except Exception as e:  # never leave a waiting send() hanging
            self.fail(f"stream read failed: {type(e).__name__}: {e}")

    async def close(self) -> None:
        self.fail("stream closed")
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.reader
        self.call.cancel()
        await self.channel.close(grace=None)


def _rpc_reason(e: grpc.aio.AioRpcError) -> str:
    return f"stream ended: {e.code().name}: {e.details()}"


class GrpcTransport:
    """Delivers outbox envelopes over one AlertDelivery.Deliver stream, with resume and credit flow control."""

    name = "grpc"

    def __init__(
        self,
        target: str,
        *,
        tls: bool = False,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        server_name: str | None = None,
        client_id: str = "dispatcher",
        stream_id: str = "default",
        connect_timeout_s: float = 5.0,
        ack_timeout_s: float = 10.0,
        retry: RetryPolicy | None = None,
        max_batch: int = 256,
        typed_alert: bool = True,
        keepalive_s: float | None = None,
    ) -> None:
        """typed_alert: also fill AlertEnvelope.alert (alert_json is always sent and authoritative).

        keepalive_s: HTTP/2 pings on an idle connection to notice a silently dead peer; the server must
        allow pings that often (the reference consumer allows every 10 s).
        """
        if (cert_file is None) != (key_file is None):
            raise ValueError("cert_file and key_file go together (client certificate for mTLS)")
        self.target = target
        self.tls = tls or any(x is not None for x in (ca_file, cert_file, key_file))
        self._ca_file, self._cert_file, self._key_file = ca_file, cert_file, key_file
        self.server_name = server_name
        self.client_id, self.stream_id = client_id, stream_id
        self.connect_timeout_s, self.ack_timeout_s = connect_timeout_s, ack_timeout_s
        self.retry = retry or DISPATCH
        self.max_batch = max_batch
        self.typed_alert = typed_alert
        self.keepalive_s = keepalive_s
        self._creds: grpc.ChannelCredentials | None = None
        self._conn: _Conn | None = None
        self._lock = asyncio.Lock()  # one send at a time: the stream is ordered
        self._last_acked = 0
        self._last_error: str | None = None
        self.delivered = 0  # envelopes acknowledged (including ones found delivered on resume)
        self.connects = 0
        self.credit_waits = 0  # times a send had to wait for credit

    # -- Transport protocol --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Loads TLS files and tries to connect; an unreachable peer is only recorded in state()."""
        await self._credentials()
        async with self._lock:
            with contextlib.suppress(DeliveryError):
                await self._ensure_conn()

    async def send(self, batch: list[Envelope]) -> None:
        if not batch:
            return
        if len(batch) > self.max_batch:
            raise ValueError(f"batch of {len(batch)} > max_batch {self.max_batch}")
        if any(a.seq >= b.seq for a, b in itertools.pairwise(batch)):
            raise ValueError("batch sequences must increase (cumulative acks)")
        async with self._lock:
            conn = await self._ensure_conn()
            try:
                await self._send_on(conn, batch)
            except asyncio.CancelledError:
                conn.fail("send cancelled")  # stream state unknown: reconnect and resume from Ready next time
                raise
            except DeliveryError as e:
                self._last_error = e.reason
                await self._drop()  # the next send reconnects; Ready tells where to resume
                raise
            self._last_error = None

    async def close(self) -> None:
        # Not under the lock: a send stuck waiting for acks must not delay shutdown; it sees the break.
        await self._drop()

    def state(self) -> dict[str, Any]:
        conn = self._conn
        return {
            "name": self.name,
            "target": self.target,
            "tls": self.tls,
            "stream_id": self.stream_id,
            "connected": conn is not None and conn.broken is None,
            "last_acked": conn.last_acked if conn is not None else self._last_acked,
            "credit": conn.credit if conn is not None and conn.broken is None else 0,
            "last_error": self._last_error,
            "delivered": self.delivered,
            "connects": self.connects,
            "credit_waits": self.credit_waits,
        }

    # -- internals -----------------------------------------------------------------------------------------

    async def _credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        if self._creds is None:

            def read(p: str | Path | None) -> bytes | None:
                return Path(p).read_bytes() if p is not None else None

            # File reads off the event loop.
            ca, cert, key = await asyncio.to_thread(
                lambda: (read(self._ca_file), read(self._cert_file), read(self._key_file))
            )
            self._creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        return self._creds

    def _channel(self, creds: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
        options: list[tuple[str, Any]] = []
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        if self.keepalive_s:
            options += [
                ("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)),
                ("grpc.keepalive_timeout_ms", int(self.ack_timeout_s * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
            ]
        if creds is not None:
            return grpc.aio.secure_channel(self.target, creds, options=options)
        return grpc.aio.insecure_channel(self.target, options=options)

    async def _ensure_conn(self) -> _Conn:
        if self._conn is not None and self._conn.broken is None:
            return self._conn
        await self._drop()
        # A fresh channel per connection: its first attempt is immediate, whereas a reused channel may sit in
        # reconnect backoff (up to minutes) after the peer was down.
        channel = self._channel(await self._credentials())
        call = delivery_pb2_grpc.AlertDeliveryStub(channel).Deliver()
        conn = _Conn(channel, call)
        try:
            ready = await asyncio.wait_for(self._handshake(call), self.connect_timeout_s)
        except asyncio.CancelledError:
            await conn.close()
            raise
        except Exception as e:  # refused, TLS failure, no Ready in time, ...: all a failed connect
            reason = _rpc_reason(e) if isinstance(e, grpc.aio.AioRpcError) else f"connect: {type(e).__name__}: {e}"
            if isinstance(e, TimeoutError):
                reason = f"connect: no Ready within {self.connect_timeout_s}s"
            self._last_error = f"{self.target}: {reason}"
            await conn.close()
            raise DeliveryError(self._last_error) from e
        conn.last_acked, conn.credit = ready.last_acked_sequence, ready.credit
        conn.reader = asyncio.create_task(conn.read_loop(), name=f"grpc-transport-reader:{self.target}")
        self._conn = conn
        self.connects += 1
        self._last_error = None
        log.info("grpc %s connected: resume after seq %d, credit %d", self.target, conn.last_acked, conn.credit)
        return conn

    async def _handshake(self, call: grpc.aio.StreamStreamCall) -> delivery_pb2.Ready:
        hello = delivery_pb2.Hello(client_id=self.client_id, stream_id=self.stream_id)
        await call.write(delivery_pb2.ClientMessage(hello=hello))
        msg: Any = await call.read()  # a ServerMessage (generated, untyped) or EOF
        if msg is grpc.aio.EOF or msg.WhichOneof("kind") != "ready":
            raise ValueError("server did not answer Hello with Ready")
        return msg.ready

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._last_acked = conn.last_acked
            await conn.close()

    def _envelope(self, env: Envelope) -> delivery_pb2.ClientMessage:
        text = env.payload.decode("utf-8")  # proto strings are UTF-8; bytes stay identical
        msg = alerts_pb2.AlertEnvelope(sequence=env.seq, alert_json=text)
        if self.typed_alert:
            try:
                msg.alert.CopyFrom(alert_to_proto(json.loads(text)))
            except (ValueError, TypeError, AttributeError) as e:  # alert_json alone still carries it
                log.warning("envelope seq %d: no typed alert (%s)", env.seq, e)
        return delivery_pb2.ClientMessage(envelope=msg)

    async def _send_on(self, conn: _Conn, batch: list[Envelope]) -> None:
        msgs: list[delivery_pb2.ClientMessage] = []
        bad: str | None = None
        for env in batch:  # build first, so a malformed envelope stops the batch right before it
            try:
                msgs.append(self._envelope(env))
            except UnicodeDecodeError as e:
                bad = f"envelope seq {env.seq} ({env.event_id}): payload is not UTF-8: {e}"
                break
        for env, msg in zip(batch, msgs, strict=False):
            if env.seq <= conn.last_acked:
                continue  # resume: the peer already has it
            if conn.credit <= 0:
                self.credit_waits += 1
                await self._wait(conn, batch, lambda: conn.credit > 0, "credit")
            try:
                async with asyncio.timeout(self.ack_timeout_s):  # HTTP/2 flow control of a stuck peer
                    await conn.call.write(msg)
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, TimeoutError) as e:
                if conn.reader is not None and not isinstance(e, TimeoutError):
                    # The reader sees the final status after any Acks still in flight: count those as delivered.
                    await asyncio.wait({conn.reader}, timeout=self.ack_timeout_s)
                conn.fail(_rpc_reason(e) if isinstance(e, grpc.aio.AioRpcError) else f"write failed: {e!r}")
                raise self._error(conn, batch, conn.broken or "write failed", permanent=conn.permanent) from e
            conn.credit -= 1
        if msgs:
            last = batch[len(msgs) - 1].seq
            await self._wait(conn, batch, lambda: conn.last_acked >= last, "ack")
        if bad is not None:
            raise self._error(conn, batch, bad, permanent=True)
        self.delivered += len(batch)

    async def _wait(self, conn: _Conn, batch: list[Envelope], done: Callable[[], bool], what: str) -> None:
        """Waits until done(); fails on a broken stream or ack_timeout_s without any ack or credit."""
        while not done():
            if conn.broken is not None:
                raise self._error(conn, batch, conn.broken, permanent=conn.permanent)
            conn.changed.clear()  # no await between the checks and clear(): no lost wake-up
            try:
                await asyncio.wait_for(conn.changed.wait(), self.ack_timeout_s)
            except TimeoutError:
                raise self._error(conn, batch, f"no {what} from {self.target} within {self.ack_timeout_s}s") from None

    def _error(self, conn: _Conn, batch: list[Envelope], reason: str, *, permanent: bool = False) -> DeliveryError:
        delivered = sum(1 for e in batch if e.seq <= conn.last_acked)  # batch is ordered: a prefix
        self.delivered += delivered
        return DeliveryError(reason, delivered=delivered, permanent=permanent)
