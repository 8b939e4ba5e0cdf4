"""Webhook transport + reference receiver over a real loopback HTTP server (uvicorn in a thread)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response

from livekit_proctor.contracts.alerts import Alert, AlertMetadata, EventType
from livekit_proctor.dispatcher.consumers.webhook import build_app
from livekit_proctor.dispatcher.transports.base import DeliveryError, Envelope
from livekit_proctor.dispatcher.transports.webhook import WebhookTransport, parse_retry_after
from livekit_proctor.dispatcher.webhook_signing import (
    WebhookSecretError,
    WebhookVerificationError,
    generate_secret,
    sign,
    signature_header,
    verify,
    webhook_headers,
)

OLD = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the Standard Webhooks spec's example secret
NEW = generate_secret()
WAIT_S = 60.0  # upper bound for loopback requests and server start: generous, never a speed test


def transport(url: str, secrets: list[str], **kw: Any) -> WebhookTransport:
    """A WebhookTransport whose request timeout (default 5 s) a busy machine cannot hit on loopback."""
    return WebhookTransport(url, secrets, **{"timeout_s": WAIT_S, **kw})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """Any ASGI app on a loopback port, served by uvicorn in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.time() + WAIT_S
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def stats(self) -> dict[str, int]:
        return httpx.get(f"http://127.0.0.1:{self.port}/stats", timeout=WAIT_S).json()


class Stub:
    """A scripted peer: answers POSTs with the next (status, headers, delay_s), then 204; records requests."""

    def __init__(self, script: list[tuple[int, dict[str, str], float]] | None = None) -> None:
        self.script = list(script or [])
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.app = FastAPI()

        @self.app.post("/{path:path}")
        async def hook(request: Request) -> Response:
            self.requests.append((dict(request.headers), await request.body()))
            status, headers, delay = self.script.pop(0) if self.script else (204, {}, 0.0)
            if delay:
                await asyncio.sleep(delay)
            return Response(status_code=status, headers=headers, content=b"" if status == 204 else b"stub says no")


def make_env(seq: int, session: str = "sess-1") -> Envelope:
    a = Alert(
        exam_session_id=session,
        candidate_id="cand-1",
        event_type=EventType.FACE_NOT_FOUND,
        severity_score=0.5,
        ai_model_source="test",
        evidence={"seq": seq},
        metadata=AlertMetadata(node_id="node-t", worker_id="w1"),
    )
    return Envelope(seq, a.event_id, session, "FACE_NOT_FOUND", a.to_json().encode(), time.time())


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Served]:
    with Served(build_app([NEW], record=tmp_path / "seen.txt", print_alerts=False)) as srv:
        yield srv


# --- signing -------------------------------------------------------------------------------------------


def test_sign_matches_spec_formula_and_published_vector() -> None:
    msg_id, ts, body = "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    # Independently from the spec: HMAC-SHA256(key=b64decode(secret minus "whsec_"), "{id}.{ts}.{body}").
    key = base64.b64decode(OLD.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    expected = "v1," + base64.b64encode(mac).decode()
    assert sign(OLD, msg_id, ts, body) == expected
    assert expected == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="  # the spec's example signature
    two = signature_header([OLD, NEW], msg_id, ts, body).split(" ")
    assert two[0] == expected and two[1] == sign(NEW, msg_id, ts, body) and len(two) == 2


def test_verify_unit() -> None:
    body = b'{"event_id": "e1"}'
    now = int(time.time())
    h = webhook_headers([NEW], "e1", body, timestamp=now - 100)
    verify([NEW], h, body)
    verify([OLD, NEW], {k.upper(): v for k, v in h.items()}, body)  # names case-insensitive, any secret matches
    h2 = {**h, "webhook-signature": "v1a,ignored " + h["webhook-signature"]}  # unknown versions skipped
    verify([NEW], h2, body)
    cases = [
        ({k: v for k, v in h.items() if k != "webhook-signature"}, body, "missing_headers"),
        ({**h, "webhook-timestamp": "yesterday"}, body, "bad_timestamp"),
        ({**h, "webhook-signature": "v1-no-comma"}, body, "bad_signature_header"),
        ({**h, "webhook-signature": "v2,abc"}, body, "no_matching_signature"),
        (h, body + b" ", "no_matching_signature"),
        (h, b"\xff", "no_matching_signature"),
        (webhook_headers([NEW], "e1", body, timestamp=now - 400), body, "timestamp_too_old"),
        (webhook_headers([NEW], "e1", body, timestamp=now + 400), body, "timestamp_too_new"),
    ]
    for headers, b, code in cases:
        with pytest.raises(WebhookVerificationError) as ei:
            verify([OLD, NEW], headers, b)
        assert ei.value.code == code and ei.value.reason, (code, str(ei.value))


def test_secret_validation() -> None:
    s = generate_secret()
    assert s.startswith("whsec_") and len(base64.b64decode(s[6:])) == 24
    for bad, why in [("MfKQ9r8G", "whsec_"), ("whsec_!!notbase64", "base64"), ("whsec_", "empty")]:
        with pytest.raises(WebhookSecretError, match=why):
            sign(bad, "m", 1, b"")
    with pytest.raises(WebhookSecretError, match="at least one"):
        WebhookTransport("http://127.0.0.1:1/", [])
    with pytest.raises(WebhookSecretError):
        build_app(["nope"])


def test_parse_retry_after() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = time.time()
    date = format_datetime(datetime.fromtimestamp(now, UTC) + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: retry now


# --- delivery to the reference receiver ----------------------------------------------------------------


async def test_signed_delivery_verified_and_deduplicated(receiver: Served, tmp_path: Path) -> None:
    t = transport(receiver.url, [NEW])
    batch = [make_env(i) for i in range(3)]
    try:
        await t.send(batch)
        await t.send(batch[:1])  # a redelivery (lost ack, replay): same webhook-id, acknowledged, not new
    finally:
        await t.close()
    assert receiver.stats() == {"received": 4, "unique": 3, "duplicates": 1, "rejected": 0}
    assert (tmp_path / "seen.txt").read_text().split() == [e.event_id for e in batch]
    st = t.state()
    assert st["delivered"] == 4 and st["failed_attempts"] == 0 and st["latency_p95_ms"] is not None
    # A restarted receiver loads its record and still treats the old ids as duplicates.
    with Served(build_app([NEW], record=tmp_path / "seen.txt", print_alerts=False)) as again:
        t2 = transport(again.url, [NEW])
        try:
            await t2.send(batch)
        finally:
            await t2.close()
        assert again.stats() == {"received": 3, "unique": 0, "duplicates": 3, "rejected": 0}


async def test_receiver_prints_new_alerts_as_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    env = make_env(1)
    with Served(build_app([NEW], record=None)) as srv:
        t = transport(srv.url, [NEW])
        try:
            await t.send([env, env])
        finally:
            await t.close()
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert lines == [env.alert()]


async def test_wire_format() -> None:
    stub = Stub()
    env = make_env(1)
    with Served(stub.app) as srv:
        t = transport(srv.url, [OLD, NEW], headers={"Authorization": "Bearer x"})
        before = int(time.time())
        try:
            await t.send([env])
        finally:
            await t.close()
        after = time.time()
    ((headers, body),) = stub.requests
    assert body == env.payload  # the canonical bytes, not a re-serialization
    assert headers["content-type"] == "application/json" and headers["authorization"] == "Bearer x"
    assert headers["webhook-id"] == env.event_id
    assert before <= int(headers["webhook-timestamp"]) <= after  # signed when sent
    sigs = headers["webhook-signature"].split(" ")
    assert sigs == [sign(s, env.event_id, int(headers["webhook-timestamp"]), body) for s in (OLD, NEW)]
    with pytest.raises(ValueError, match="override"):
        WebhookTransport(srv.url, [NEW], headers={"Webhook-Signature": "x"})


def _post(srv: Served, headers: dict[str, str], body: bytes) -> httpx.Response:
    return httpx.post(srv.url, content=body, headers={"content-type": "application/json", **headers}, timeout=WAIT_S)


def test_receiver_rejects_invalid_deliveries(receiver: Served) -> None:
    env = make_env(1)
    now = int(time.time())
    good = webhook_headers([NEW], env.event_id, env.payload)
    tampered = env.payload.replace(b'"severity_score":0.5', b'"severity_score":0.1')
    assert tampered != env.payload
    cases = [
        (good, tampered, 401, "no_matching_signature"),
        (webhook_headers([OLD], env.event_id, env.payload), env.payload, 401, "no_matching_signature"),
        (webhook_headers([NEW], env.event_id, env.payload, timestamp=now - 600), env.payload, 400, "too_old"),
        (webhook_headers([NEW], env.event_id, env.payload, timestamp=now + 600), env.payload, 400, "too_new"),
        ({"webhook-id": env.event_id}, env.payload, 400, "missing_headers"),
        ({**good, "webhook-timestamp": "yesterday"}, env.payload, 400, "bad_timestamp"),
        (webhook_headers([NEW], "other-id", env.payload), env.payload, 400, "id_mismatch"),
    ]
    for headers, body, status, code in cases:
        r = _post(receiver, headers, body)
        assert r.status_code == status, (code, r.text)
        assert code in r.json()["error"] and r.json()["reason"], r.text
    assert receiver.stats() == {"received": len(cases), "unique": 0, "duplicates": 0, "rejected": len(cases)}
    assert _post(receiver, good, env.payload).status_code == 204


async def test_transport_reports_rejection_as_permanent(receiver: Served) -> None:
    t = transport(receiver.url, [OLD])  # receiver knows only NEW
    try:
        with pytest.raises(DeliveryError) as ei:
            await t.send([make_env(1)])
    finally:
        await t.close()
    assert ei.value.permanent and ei.value.delivered == 0 and "401" in ei.value.reason
    assert "no_matching_signature" in ei.value.reason  # the receiver's reason reaches the DLQ entry


@pytest.mark.parametrize("receiver_secrets", [[NEW], [OLD]], ids=["receiver-new", "receiver-old"])
async def test_rotation_sender_signs_with_old_and_new(receiver_secrets: list[str]) -> None:
    with Served(build_app(receiver_secrets, print_alerts=False)) as srv:
        t = transport(srv.url, [OLD, NEW])
        try:
            await t.send([make_env(1), make_env(2)])
        finally:
            await t.close()
        assert srv.stats() == {"received": 2, "unique": 2, "duplicates": 0, "rejected": 0}


# --- failures and retries ------------------------------------------------------------------------------


async def test_retry_after_500_uses_same_webhook_id() -> None:
    env = make_env(1)
    with Served(build_app([NEW], print_alerts=False, fail_first=2)) as srv:
        t = transport(srv.url, [NEW])
        try:
            for _ in range(2):
                with pytest.raises(DeliveryError) as ei:
                    await t.send([env])
                assert not ei.value.permanent and ei.value.delivered == 0 and "500" in ei.value.reason
            await t.send([env])
        finally:
            await t.close()
        assert srv.stats() == {"received": 3, "unique": 1, "duplicates": 0, "rejected": 0}
    assert t.state()["failed_attempts"] == 2 and t.state()["delivered"] == 1
    # The same id on every attempt, each attempt freshly signed and valid:
    stub = Stub([(500, {}, 0.0)])
    with Served(stub.app) as srv:
        t = transport(srv.url, [NEW])
        try:
            with pytest.raises(DeliveryError):
                await t.send([env])
            await t.send([env])
        finally:
            await t.close()
    assert [h["webhook-id"] for h, _ in stub.requests] == [env.event_id, env.event_id]
    for h, b in stub.requests:
        verify([NEW], h, b)


async def test_failure_mid_batch_reports_delivered_prefix() -> None:
    stub = Stub([(204, {}, 0.0), (204, {}, 0.0), (502, {}, 0.0)])
    batch = [make_env(i) for i in range(5)]
    with Served(stub.app) as srv:
        t = transport(srv.url, [NEW])
        try:
            with pytest.raises(DeliveryError) as ei:
                await t.send(batch)
            await t.send(batch[ei.value.delivered :])  # what the dispatcher does next
        finally:
            await t.close()
    assert ei.value.delivered == 2 and not ei.value.permanent
    ids = [h["webhook-id"] for h, _ in stub.requests]
    assert ids == [e.event_id for e in batch[:3]] + [e.event_id for e in batch[2:]]


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    # Retry-After only on 429/503, capped at 600 s
    [(429, "7", 7.0), (503, "2", 2.0), (429, None, None), (500, "9", None), (429, "86400", 600.0)],
)
async def test_retry_after_is_honoured(status: int, retry_after: str | None, expected: float | None) -> None:
    stub = Stub([(status, {"Retry-After": retry_after} if retry_after else {}, 0.0)])
    with Served(stub.app) as srv:
        t = transport(srv.url, [NEW])
        try:
            with pytest.raises(DeliveryError) as ei:
                await t.send([make_env(1)])
        finally:
            await t.close()
    assert ei.value.retry_after == expected and not ei.value.permanent


async def test_retry_after_http_date() -> None:
    at = int(time.time()) + 60  # an HTTP-date has whole seconds
    when = format_datetime(datetime.fromtimestamp(at, UTC), usegmt=True)
    stub = Stub([(503, {"Retry-After": when}, 0.0)])
    with Served(stub.app) as srv:
        t = transport(srv.url, [NEW])
        try:
            before = time.time()
            with pytest.raises(DeliveryError) as ei:
                await t.send([make_env(1)])
            after = time.time()
        finally:
            await t.close()
    # Seconds from when the transport read the answer to `at`, whatever the machine's speed.
    assert ei.value.retry_after is not None and at - after <= ei.value.retry_after <= at - before


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_redirect_is_a_failure_and_not_followed(status: int) -> None:
    stub = Stub([(status, {"Location": "http://127.0.0.1:1/elsewhere"}, 0.0)])
    with Served(stub.app) as srv:
        t = transport(srv.url, [NEW])
        try:
            with pytest.raises(DeliveryError) as ei:
                await t.send([make_env(1)])
        finally:
            await t.close()
    assert str(status) in ei.value.reason and "elsewhere" in ei.value.reason and not ei.value.permanent
    assert len(stub.requests) == 1


async def test_timeout_is_a_failure() -> None:
    stub = Stub([(204, {}, 2.0)])  # acknowledges, but too late
    with Served(stub.app) as srv:
        t = WebhookTransport(srv.url, [NEW], timeout_s=0.2)
        try:
            with pytest.raises(DeliveryError) as ei:
                await t.send([make_env(1)])
        finally:
            await t.close()
    assert "timeout" in ei.value.reason and not ei.value.permanent and ei.value.delivered == 0


@pytest.mark.parametrize(
    ("status", "permanent"),
    [(400, True), (401, True), (403, True), (404, True), (410, True), (413, True), (422, True),
     (408, False), (409, False), (425, False), (429, False), (500, False), (502, False), (503, False)],
)  # fmt: skip
async def test_permanent_4xx(status: int, permanent: bool) -> None:
    stub = Stub([(status, {}, 0.0)])
    with Served(stub.app) as srv:
        t = transport(srv.url, [NEW])
        try:
            with pytest.raises(DeliveryError) as ei:
                await t.send([make_env(1)])
        finally:
            await t.close()
    assert ei.value.permanent is permanent and str(status) in ei.value.reason


async def test_unreachable_peer() -> None:
    t = WebhookTransport(f"http://127.0.0.1:{_free_port()}/hook", [NEW], timeout_s=2)
    await t.start()  # must not raise
    try:
        with pytest.raises(DeliveryError) as ei:
            await t.send([make_env(1)])
    finally:
        await t.close()
    assert not ei.value.permanent and "ConnectError" in ei.value.reason
    assert t.state()["connected"] is False and t.state()["last_error"]


async def test_concurrency_keeps_per_session_order() -> None:
    stub = Stub()
    batch = [make_env(i, session=f"s{i % 3}") for i in range(15)]
    with Served(stub.app) as srv:
        t = transport(srv.url, [NEW], concurrency=4)
        try:
            await t.send(batch)
        finally:
            await t.close()
    seq_of = {e.event_id: e.seq for e in batch}
    got = [(json.loads(b)["exam_session_id"], seq_of[h["webhook-id"]]) for h, b in stub.requests]
    assert sorted(s for _, s in got) == list(range(15))
    for sess in ("s0", "s1", "s2"):
        seqs = [s for x, s in got if x == sess]
        assert seqs == sorted(seqs)


async def test_concurrency_failure_reports_prefix() -> None:
    batch = [make_env(i, session=f"s{i % 2}") for i in range(6)]

    app = FastAPI()
    fail_id = batch[3].event_id

    @app.post("/{path:path}")
    async def hook(request: Request) -> Response:
        return Response(status_code=500 if request.headers["webhook-id"] == fail_id else 204)

    with Served(app) as srv:
        t = transport(srv.url, [NEW], concurrency=2)
        try:
            with pytest.raises(DeliveryError) as ei:
                await t.send(batch)
        finally:
            await t.close()
    assert ei.value.delivered == 3 and "500" in ei.value.reason
