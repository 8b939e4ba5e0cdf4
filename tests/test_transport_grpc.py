"""GrpcTransport against the reference consumer on loopback: ordering, resume, credit, mTLS, codegen."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import ipaddress
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from livekit_proctor.contracts.alerts import Alert, AlertMetadata, EventType, IncidentState
from livekit_proctor.dispatcher.consumers.grpc_server import ConsumerServer, serve
from livekit_proctor.dispatcher.transports.base import DeliveryError, Envelope
from livekit_proctor.dispatcher.transports.grpc import GrpcTransport, alert_from_proto, alert_to_proto
from livekit_proctor.protogen import ensure_generated

WAIT_S = 60.0  # upper bound for conditions that hold after a few loop turns: generous, never a speed test

REPO = Path(__file__).resolve().parents[1]


def make_envelopes(first_seq: int, n: int) -> list[Envelope]:
    out = []
    for seq in range(first_seq, first_seq + n):
        alert = Alert(
            exam_session_id="exam-1",
            candidate_id="cand-1",
            event_type=EventType.FACE_NOT_FOUND,
            severity_score=0.6,
            ai_model_source="mediapipe.blazeface_full_range",
            evidence={"face_count": 0.0, "frame_seq": seq, "face_scores": []},
            metadata=AlertMetadata(node_id="n1", worker_id="w1", exam_id="math-101"),
            incident_id="a73bbced-576e-47b5-abb6-85e7d9552288",
            incident_state=IncidentState.STARTED,
        )
        payload = alert.to_json().encode()
        out.append(Envelope(seq, alert.event_id, "exam-1", "FACE_NOT_FOUND", payload, time.time()))
    return out


async def until(cond: Callable[[], bool], what: str, state: Callable[[], object] = lambda: "") -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} {state()}")
        await asyncio.sleep(0.005)


def recorded(path: Path) -> list[str]:
    return path.read_text().splitlines()


async def test_delivers_in_order_on_one_stream(tmp_path: Path) -> None:
    out = io.StringIO()
    record = tmp_path / "seen.txt"
    srv = await serve("127.0.0.1", 0, record=record, out=out)
    t = GrpcTransport(f"127.0.0.1:{srv.port}", stream_id="s1")
    try:
        await t.start()
        envs = make_envelopes(1, 120)
        for i in range(0, 120, 40):
            await t.send(envs[i : i + 40])
        assert recorded(record) == [e.event_id for e in envs]
        assert out.getvalue().splitlines() == [e.payload.decode() for e in envs]  # byte-for-byte alert_json
        st = t.state()
        assert st["connected"] and st["last_acked"] == 120 and st["delivered"] == 120 and st["last_error"] is None
        assert srv.stats.streams == 1 and t.connects == 1  # one long-lived stream for all sends
        assert srv.stats.new == 120 and srv.stats.duplicates == 0
        # A resend of acked envelopes (e.g. the dispatcher lost our return) is skipped, not re-sent.
        await t.send(envs[-5:])
        assert srv.stats.received == 120
    finally:
        await t.close()
        await srv.stop()


async def test_consumer_restart_mid_stream_resumes(tmp_path: Path) -> None:
    record = tmp_path / "seen.txt"
    srv1 = await serve("127.0.0.1", 0, record=record, credit=4, print_alerts=False)
    port = srv1.port
    t = GrpcTransport(f"127.0.0.1:{port}", stream_id="outbox-A", ack_timeout_s=60)
    envs = make_envelopes(1, 20)
    srv2: ConsumerServer | None = None
    try:
        await t.send(envs[:10])
        # Ack 2 more envelopes (11, 12), then hold: 13 (and what came with it) is recorded but not acked, and
        # with the 2 credits given back for 11, 12 the client sends up to 16 (window: 4).
        srv1.hold_acks(after=2)
        task = asyncio.create_task(t.send(envs[10:]))
        # Which of 13..16 the consumer records before it holds depends on how what arrived was batched (timing):
        # after acking 12 it records the batch holding 13 and stops there, so 13 to 16 end up recorded.
        await until(
            lambda: srv1.stats.received == 16 and srv1.stats.new >= 13 and t.state()["last_acked"] == 12,
            "16 received, 13 or more recorded, 12 acked",
            lambda: (srv1.stats, t.state()),
        )
        recorded_by_srv1 = srv1.stats.new
        await srv1.stop()  # the consumer dies with 13.. recorded but never acked
        with pytest.raises(DeliveryError) as ei:
            await task
        assert ei.value.delivered == 2 and not ei.value.permanent
        assert not t.state()["connected"]

        srv2 = await serve("127.0.0.1", port, record=record, print_alerts=False)
        rest = envs[10 + ei.value.delivered :]  # what the dispatcher retries
        await t.send(rest)
        assert t.state()["last_acked"] == 20 and t.state()["connected"]
        lines = recorded(record)
        assert set(lines) == {e.event_id for e in envs}  # every event_id at least once ...
        assert len(lines) == 20  # ... and recorded once: the restarted consumer loaded the record
        dups = recorded_by_srv1 - 12  # recorded by the first consumer but never acked: sent again
        assert srv2.stats.received == 8 and srv2.stats.duplicates == dups and srv2.stats.new == 8 - dups
        assert f"duplicates={dups}" in srv2.consumer.summary()
        acks = json.loads((tmp_path / "seen.txt.acks.json").read_text())
        assert acks == {"outbox-A": 20}
    finally:
        await t.close()
        await srv1.stop()
        if srv2 is not None:
            await srv2.stop()


async def test_resume_skips_what_a_restarted_consumer_acked(tmp_path: Path) -> None:
    record = tmp_path / "seen.txt"
    envs = make_envelopes(1, 10)
    srv = await serve("127.0.0.1", 0, record=record, print_alerts=False)
    t = GrpcTransport(f"127.0.0.1:{srv.port}", stream_id="s")
    await t.send(envs[:6])
    await t.close()
    await srv.stop()
    srv = await serve("127.0.0.1", srv.port, record=record, print_alerts=False)
    t = GrpcTransport(f"127.0.0.1:{srv.port}", stream_id="s")
    try:
        await t.send(envs)  # an outbox replay: Ready says 6, so only 7..10 travel
        assert srv.stats.received == 4 and srv.stats.duplicates == 0
        assert recorded(record) == [e.event_id for e in envs]
    finally:
        await t.close()
        await srv.stop()


async def test_credit_limits_unacked_envelopes(tmp_path: Path) -> None:
    srv = await serve("127.0.0.1", 0, record=tmp_path / "seen.txt", credit=2, print_alerts=False)
    t = GrpcTransport(f"127.0.0.1:{srv.port}", ack_timeout_s=60)
    try:
        await t.send(make_envelopes(1, 10))
        assert 1 <= srv.stats.max_in_flight <= 2
        srv.hold_acks()  # no acks, no credit back: the client must stop at 2
        task = asyncio.create_task(t.send(make_envelopes(11, 10)))
        await until(lambda: srv.stats.received == 12 and t.state()["credit"] == 0, "window used up")
        for _ in range(50):  # give a misbehaving client every chance to send a third one
            await asyncio.sleep(0)
        assert srv.stats.received == 12 and not task.done()
        srv.release_acks()
        await task
        assert srv.stats.received == 20 and srv.stats.new == 20
        assert srv.stats.max_in_flight == 2  # never more than the window, and the window was used
        assert srv.stats.protocol_errors == 0 and t.credit_waits > 0
    finally:
        await t.close()
        await srv.stop()


async def test_ack_timeout_then_reconnect(tmp_path: Path) -> None:
    srv = await serve("127.0.0.1", 0, record=tmp_path / "seen.txt", print_alerts=False)
    # The 3 acks the consumer gives must each come within the timeout, also on a busy machine.
    t = GrpcTransport(f"127.0.0.1:{srv.port}", ack_timeout_s=5.0)
    envs = make_envelopes(1, 5)
    try:
        srv.hold_acks(after=3)
        with pytest.raises(DeliveryError) as ei:
            await t.send(envs)
        assert ei.value.delivered == 3 and "no ack" in ei.value.reason
        assert t.state()["last_error"] == ei.value.reason
        srv.release_acks()
        await t.send(envs[3:])
        assert t.connects == 2 and t.state()["last_error"] is None
        assert sorted(recorded(tmp_path / "seen.txt")) == sorted(e.event_id for e in envs)
    finally:
        await t.close()
        await srv.stop()


async def test_rejected_envelope_is_permanent(tmp_path: Path) -> None:
    srv = await serve("127.0.0.1", 0, record=tmp_path / "seen.txt", print_alerts=False)
    t = GrpcTransport(f"127.0.0.1:{srv.port}")
    envs = make_envelopes(1, 4)
    envs[2] = Envelope(3, "bad", "exam-1", "FACE_NOT_FOUND", b'{"no_event_id": 1}', time.time())
    try:
        with pytest.raises(DeliveryError) as ei:
            await t.send(envs)
        assert ei.value.permanent and ei.value.delivered == 2  # the dispatcher dead-letters seq 3
        await t.send(envs[3:])
        assert recorded(tmp_path / "seen.txt") == [envs[0].event_id, envs[1].event_id, envs[3].event_id]
        # A payload that is not UTF-8 never leaves the client.
        bad = Envelope(5, "x", "exam-1", "FACE_NOT_FOUND", b"\xff\xfe", time.time())
        with pytest.raises(DeliveryError) as ei:
            await t.send([bad])
        assert ei.value.permanent and ei.value.delivered == 0
    finally:
        await t.close()
        await srv.stop()


async def test_unreachable_peer(tmp_path: Path) -> None:
    srv = await serve("127.0.0.1", 0, print_alerts=False)
    port = srv.port
    await srv.stop()  # a port nobody listens on
    t = GrpcTransport(f"127.0.0.1:{port}", connect_timeout_s=5)
    await t.start()  # must not raise
    assert not t.state()["connected"] and t.state()["last_error"]
    with pytest.raises(DeliveryError) as ei:
        await t.send(make_envelopes(1, 2))
    assert ei.value.delivered == 0
    await t.close()


def test_typed_alert_mapping() -> None:
    env = make_envelopes(1, 1)[0]
    pb = alert_to_proto(env.alert())
    assert pb.incident_state == 1 and pb.metadata.extra["exam_id"] == "math-101"
    back = alert_from_proto(pb)
    assert back == env.alert() | {"evidence": {"face_count": 0.0, "frame_seq": 1.0, "face_scores": []}}


# -- mTLS -----------------------------------------------------------------------------------------------------


def _make_pki(d: Path) -> dict[str, Path]:
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        (d / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        (d / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        cn: str,
        issuer_key: ec.EllipticCurvePrivateKey | None,
        issuer: x509.Name | None,
        usage: x509.ObjectIdentifier | None = None,
        san: list[x509.GeneralName] | None = None,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer or name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
        )
        if issuer_key is None:  # the CA
            b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        else:
            b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            assert usage is not None  # a leaf certificate says what it is for
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            if san is not None:
                b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, b.sign(issuer_key or key, hashes.SHA256())

    ca_key, ca_cert = issue("test-ca", None, None)
    write("ca", ca_key, ca_cert)
    san: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    write("server", *issue("localhost", ca_key, ca_cert.subject, usage=ExtendedKeyUsageOID.SERVER_AUTH, san=san))
    write("client", *issue("dispatcher", ca_key, ca_cert.subject, usage=ExtendedKeyUsageOID.CLIENT_AUTH))
    return {k: d / k for k in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


async def test_mtls(tmp_path: Path) -> None:
    pki = _make_pki(tmp_path)
    srv = await serve(
        "127.0.0.1",
        0,
        record=tmp_path / "seen.txt",
        tls_cert=pki["server.crt"],
        tls_key=pki["server.key"],
        client_ca=pki["ca.crt"],
        print_alerts=False,
    )
    target = f"127.0.0.1:{srv.port}"
    no_cert = GrpcTransport(target, tls=True, ca_file=pki["ca.crt"], server_name="localhost", connect_timeout_s=10)
    with_cert = GrpcTransport(
        target,
        ca_file=pki["ca.crt"],
        cert_file=pki["client.crt"],
        key_file=pki["client.key"],
        server_name="localhost",
    )
    plain = GrpcTransport(target, connect_timeout_s=10)
    try:
        await no_cert.start()  # refused, but start() never raises
        with pytest.raises(DeliveryError) as ei:
            await no_cert.send(make_envelopes(1, 1))
        assert ei.value.delivered == 0 and not no_cert.state()["connected"]
        with pytest.raises(DeliveryError):
            await plain.send(make_envelopes(1, 1))
        envs = make_envelopes(1, 3)
        await with_cert.send(envs)
        assert with_cert.state()["tls"] and with_cert.state()["connected"]
        assert recorded(tmp_path / "seen.txt") == [e.event_id for e in envs]
        assert srv.stats.streams == 1
    finally:
        for t in (no_cert, with_cert, plain):
            await t.close()
        await srv.stop()


# -- the command-line consumer ---------------------------------------------------------------------------------


async def test_cli_consumer_dedups_and_reports(tmp_path: Path) -> None:
    record = tmp_path / "seen.txt"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "livekit_proctor.dispatcher.consumers.grpc_server",
        "--port",
        "0",
        "--record",
        str(record),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        port = None
        while port is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), WAIT_S)).decode()
            assert line, "consumer exited before listening"
            if "listening on" in line:
                port = int(line.rsplit(":", 1)[1])
        envs = make_envelopes(1, 3)
        for stream_id in ("a", "b"):  # two outboxes holding the same alerts: the second copy is a duplicate
            t = GrpcTransport(f"127.0.0.1:{port}", stream_id=stream_id)
            await t.send(envs)
            await t.close()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), WAIT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert stdout.decode().splitlines() == [e.payload.decode() for e in envs]
    assert "duplicates=3" in stderr.decode() and "new=3" in stderr.decode()
    assert recorded(record) == [e.event_id for e in envs]
    assert json.loads((tmp_path / "seen.txt.acks.json").read_text()) == {"a": 3, "b": 3}


# -- code generation -------------------------------------------------------------------------------------------


def _copy_protos(dst: Path) -> Path:
    """The .proto files alone, as a package `gentest` under dst (so the copy imports on its own)."""
    proto = dst / "gentest"
    shutil.copytree(REPO / "proto", proto, ignore=shutil.ignore_patterns("*_pb2*", ".protogen*", "__pycache__"))
    assert not list(proto.rglob("*_pb2.py"))
    return proto


def test_ensure_generated_from_clean(tmp_path: Path) -> None:
    proto = _copy_protos(tmp_path)
    out = ensure_generated(proto, package="gentest")
    assert out == proto / "proctoring" / "v1"
    for f in ("alerts_pb2.py", "delivery_pb2.py", "delivery_pb2_grpc.py", "__init__.py"):
        assert (out / f).is_file()
    # Importable on its own: the generated modules import each other through the package name given.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from gentest.proctoring.v1 import delivery_pb2, delivery_pb2_grpc;"
        "print(delivery_pb2_grpc.AlertDeliveryStub.__name__, delivery_pb2.ClientMessage.DESCRIPTOR.full_name)"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["AlertDeliveryStub", "proctoring.v1.ClientMessage"]
    assert "from gentest.proctoring.v1 import" in (out / "delivery_pb2_grpc.py").read_text()

    # Up to date: nothing rewritten. A changed .proto: regenerated.
    mtime = (out / "delivery_pb2.py").stat().st_mtime_ns
    ensure_generated(proto, package="gentest")
    assert (out / "delivery_pb2.py").stat().st_mtime_ns == mtime
    src = proto / "proctoring" / "v1" / "delivery.proto"
    src.write_text(src.read_text() + "\n// changed\n")
    ensure_generated(proto, package="gentest")
    assert (out / "delivery_pb2.py").stat().st_mtime_ns > mtime
    assert not list(proto.glob(".tmp-*"))  # temp dirs cleaned up


def test_ensure_generated_concurrent(tmp_path: Path) -> None:
    proto = _copy_protos(tmp_path)
    errors: list[BaseException] = []

    def gen() -> None:
        try:
            ensure_generated(proto, package="gentest")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=gen) for _ in range(4)]
    for th in threads:
        th.start()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "livekit_proctor.protogen", "--proto-dir", str(proto), "--package", "gentest"],
            cwd=REPO,
        )
        for _ in range(2)
    ]
    for th in threads:
        th.join()
    assert [p.wait() for p in procs] == [0, 0] and not errors
    assert (proto / "proctoring" / "v1" / "delivery_pb2_grpc.py").is_file()
