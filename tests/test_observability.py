"""Logs and traces: the JSON / text log formats, and the spans of a real session from frame to webhook.

Spans are collected with the OpenTelemetry SDK's InMemorySpanExporter, installed as this package's tracer
provider (proctor.observability.install_tracer_provider), not as the process-global one.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from livekit_proctor import observability
from livekit_proctor.dispatcher.consumers.webhook import build_app
from tests.conftest import REPO, LiveServer, StreamClient, black_jpeg, eventually, stream_url
from tests.servers import wait_serving
from tests.test_transport_webhook import NEW, Served


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observability.install_tracer_provider(provider)
    yield exporter
    observability.install_tracer_provider(None)
    provider.shutdown()


class Logs:
    """The process's logging, configured by proctor.observability into a buffer; restored afterwards."""

    def __init__(self) -> None:
        self.buf = io.StringIO()
        self.root_level = logging.getLogger().level
        self.handler: logging.Handler | None = None

    def configure(self, fmt: str) -> None:
        self.handler = observability.configure_logging(fmt, "INFO", stream=self.buf)

    def lines(self) -> list[str]:
        return self.buf.getvalue().splitlines()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines()]


@pytest.fixture
def logs() -> Iterator[Logs]:
    lg = Logs()
    yield lg
    root = logging.getLogger()
    if lg.handler is not None:
        root.removeHandler(lg.handler)
    root.setLevel(lg.root_level)
    structlog.reset_defaults()


def test_json_records_carry_session_event_and_trace_ids(logs: Logs, spans: InMemorySpanExporter) -> None:
    logs.configure("json")
    log = logging.getLogger("proctor.test")
    with observability.bound(session_id="sess-1"), observability.span("work") as sp:
        log.info("frame %d analysed", 7, extra={"event_id": "ev-1"})
        try:
            raise ValueError("bad thing")
        except ValueError:
            log.exception("it failed")
    log.warning("outside")
    first, failed, outside = logs.records()
    ctx = sp.get_span_context()
    assert first["message"] == "frame 7 analysed" and first["level"] == "info" and first["logger"] == "proctor.test"
    assert first["session_id"] == "sess-1" and first["event_id"] == "ev-1"
    assert first["trace_id"] == format(ctx.trace_id, "032x") and first["span_id"] == format(ctx.span_id, "016x")
    assert first["timestamp"].endswith("Z")
    assert failed["level"] == "error" and "ValueError: bad thing" in failed["exception"]
    # Unbound outside the block; no span, no trace id.
    assert {"session_id", "event_id", "trace_id"}.isdisjoint(outside) and outside["message"] == "outside"


def test_text_format_for_development(logs: Logs) -> None:
    logs.configure("text")
    with observability.bound(session_id="sess-2"):
        logging.getLogger("proctor.test").warning("camera %s", "muted")
    (line,) = logs.lines()
    assert "camera muted" in line and "warning" in line and "session_id=sess-2" in line and "[proctor.test]" in line
    with pytest.raises(ValueError):
        json.loads(line)


def test_tracing_is_off_unless_the_otel_variables_ask(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("OTEL_"):
            monkeypatch.delenv(k)
    assert observability.configure_tracing("proctor-test") is False
    assert not observability.tracing_enabled() and observability.traceparent() is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert observability.configure_tracing("proctor-test") is False
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin-typo")
    with pytest.raises(ValueError, match="unknown exporter 'zipkin-typo'"):
        observability.configure_tracing("proctor-test")


def test_cli_reports_a_bad_exporter_in_one_plain_line(tmp_path: Path) -> None:
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "zipkin-typo", "PROCTOR_DATA_DIR": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-m", "livekit_proctor.cli", "dispatcher"], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 2
    assert r.stderr.startswith("proctor: OTEL_TRACES_EXPORTER: unknown exporter 'zipkin-typo'")
    assert len(r.stderr.strip().splitlines()) == 1


def _by_name(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def _attr(s: ReadableSpan, key: str) -> object:
    """A finished span's attribute (the SDK types attributes as optional; a finished span always has them)."""
    assert s.attributes is not None, s.name
    return s.attributes[key]


async def test_a_frame_alert_is_one_trace_from_frame_to_webhook(
    tmp_path: Path, spans: InMemorySpanExporter, logs: Logs
) -> None:
    with Served(build_app([NEW], print_alerts=False)) as receiver:
        srv = LiveServer(tmp_path, webhook_url=receiver.url, webhook_secrets=NEW)
        logs.configure("json")  # after the uvicorn configs, which install their own handlers
        logging.getLogger("uvicorn.error").setLevel(logging.INFO)  # the WebSocket access lines
        srv.start()
        try:
            cfg = srv.start_session("trace-1")
            base = time.time() - 60
            black = black_jpeg()
            async with StreamClient.connect(stream_url(cfg)) as c:
                await c.wait_for(lambda m: m["type"] == "hello")
                t = 0.0

                def face_not_found() -> dict[str, Any] | None:
                    return next((a for a in c.alerts() if a["event_type"] == "FACE_NOT_FOUND"), None)

                # An empty seat, 5 frames a second of media time, until the rule fires (5 s of media).
                while face_not_found() is None:
                    assert t < 120, "no FACE_NOT_FOUND after 120 s of media"
                    await c.video(black, base + t)
                    t += 0.2
                    await asyncio.sleep(0.05)
                alert = face_not_found()
            assert alert is not None
            await eventually(lambda: _by_name(spans.get_finished_spans(), "dispatch webhook"), what="the webhook span")
        finally:
            srv.stop()
        assert receiver.stats()["unique"] >= 1

    finished = list(spans.get_finished_spans())
    tp = alert["metadata"]["traceparent"]
    assert tp, alert["metadata"]
    _, trace_hex, span_hex, _ = tp.split("-")

    # The alert's traceparent names its outbox append span, a child of the frame span that raised it.
    (append,) = [s for s in _by_name(finished, "outbox append") if format(s.context.span_id, "016x") == span_hex]
    assert format(append.context.trace_id, "032x") == trace_hex
    assert _attr(append, "proctor.event_id") == alert["event_id"]
    assert append.parent is not None
    (frame,) = [s for s in _by_name(finished, "analyze frame") if s.context.span_id == append.parent.span_id]
    assert frame.context.trace_id == append.context.trace_id
    assert _attr(frame, "proctor.session_id") == "trace-1"

    # Within that frame: JPEG decode, each model that ran (in an inference thread), the rules.
    children = [s for s in finished if s.parent is not None and s.parent.span_id == frame.context.span_id]
    names = {s.name for s in children}
    assert {"decode jpeg", "evaluate rules", "outbox append"} <= names, names
    models = [s for s in children if s.name.startswith("model ")]
    assert any(
        isinstance(m := _attr(s, "proctor.model"), str) and m.startswith("mediapipe.blazeface") for s in models
    ), names
    assert frame.start_time is not None and frame.end_time is not None
    assert all(
        s.start_time is not None
        and s.end_time is not None
        and frame.start_time <= s.start_time
        and s.end_time <= frame.end_time
        for s in children
    )

    # Every analysed frame has its span and its models; a frame without an alert has no outbox span.
    frames = _by_name(finished, "analyze frame")
    assert len(frames) >= 5 and len(_by_name(finished, "evaluate rules")) >= len(frames)

    # The webhook delivery continues the alert's trace, under the outbox append.
    webhook = _by_name(finished, "dispatch webhook")
    deliveries = [s for s in webhook if _attr(s, "proctor.event_id") == alert["event_id"]]
    assert deliveries, [s.attributes for s in webhook]
    d = deliveries[0]
    assert d.parent is not None
    assert d.context.trace_id == append.context.trace_id and d.parent.span_id == append.context.span_id
    assert _attr(d, "proctor.transport") == "webhook"

    # Logs of the session carry its id; uvicorn's WebSocket line too, with the stream token redacted.
    records = logs.records()
    accepted = [r for r in records if "WebSocket" in r["message"] and "[accepted]" in r["message"]]
    assert accepted and accepted[0]["session_id"] == "trace-1", accepted
    assert "token=***" in accepted[0]["message"] and cfg["stream_token"] not in logs.buf.getvalue()


def test_agent_records_share_the_format(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`proctor agent start`: livekit-agents' runner sets up logging itself; our handler takes its place.

    The runner is a stand-in (no LiveKit server here) that does what livekit's _run_worker does first:
    setup_logging(level, devmode=..., console=False), then a livekit logger writes a record with an extra.
    """
    from livekit.agents.cli import cli as lk_cli

    from livekit_proctor.agent import worker

    seen: dict[str, Any] = {}

    def run_worker_stand_in(server: Any, args: Any) -> None:
        lk_cli.setup_logging(args.log_level, devmode=args.dev or args.log_format == "colored", console=False)
        seen["handlers"] = list(logging.getLogger().handlers)
        with observability.bound(session_id="room-sess"):
            logging.getLogger("livekit.agents").warning("job started", extra={"job_id": "AJ_1"})

    monkeypatch.setattr(lk_cli, "setup_logging", lk_cli.setup_logging)  # restored after the test
    monkeypatch.setattr(lk_cli, "_run_worker", run_worker_stand_in)
    monkeypatch.setenv("PROCTOR_ANALYZER_API_KEY", "k")
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        assert worker.main(["start", "--url", "ws://127.0.0.1:1", "--api-key", "k", "--api-secret", "s"]) == 0
    finally:
        for h in root.handlers:
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
        structlog.reset_defaults()
    ours = [h for h in seen["handlers"] if h not in handlers]
    assert len(ours) == 1 and isinstance(ours[0].formatter, structlog.stdlib.ProcessorFormatter)
    out = capsys.readouterr()
    (line,) = [x for x in out.err.splitlines() if "job started" in x]
    rec = json.loads(line)
    assert rec["logger"] == "livekit.agents" and rec["level"] == "warning"
    assert rec["job_id"] == "AJ_1" and rec["session_id"] == "room-sess"
    assert "job started" not in out.out  # livekit's own handler (stdout) is gone


def test_serve_logs_json_and_flushes_its_spans_on_sigterm(tmp_path: Path) -> None:
    """`proctor serve` as operators run it: every record (uvicorn's too) one JSON line on stderr; with
    OTEL_TRACES_EXPORTER=console a frame's spans reach the exporter (stdout) although uvicorn ends the
    process by re-raising SIGTERM, which skips atexit."""
    import httpx

    from livekit_proctor.client import StreamConnection
    from tests.conftest import _free_port

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "console", "PROCTOR_DATA_DIR": str(tmp_path),
           "PROCTOR_API_KEYS": "k1:admin", "PROCTOR_LOG_FORMAT": "json", "PROCTOR_FACE_MESH": "false",
           "PROCTOR_OBJECTS_MODEL": "none", "PROCTOR_BODY_POSE": "false", "PROCTOR_SEGMENTATION": "false"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "livekit_proctor.cli", "serve", "--port", str(port)],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # Both pipes are read while the server runs (a full pipe would block its logging), each into a list.
    streams: dict[str, list[str]] = {"out": [], "err": []}
    readers = [
        threading.Thread(target=lambda f=f, buf=buf: buf.extend(f), daemon=True)
        for f, buf in ((proc.stdout, streams["out"]), (proc.stderr, streams["err"]))
    ]
    for t in readers:
        t.start()

    async def one_frame(cfg: dict[str, Any]) -> None:
        async with StreamConnection.connect(stream_url(cfg)) as conn:
            await conn.send_video(black_jpeg(), time.time())
            await eventually(
                lambda: c.get("/api/v1/session/cli-1").json()["counters"]["frames_analysed"], what="a frame"
            )

    try:
        wait_serving(proc, lambda: "".join(streams["err"]))
        with httpx.Client(base_url=base, headers={"Authorization": "Bearer k1"}) as c:
            r = c.post("/api/v1/session/start", json={"exam_session_id": "cli-1", "candidate_id": "c", "exam_id": "e"})
            cfg = r.json()
            asyncio.run(one_frame(cfg))
        proc.terminate()
        proc.wait(60)
        for t in readers:
            t.join(60)  # the pipes reach EOF once the process is gone
        out, err = "".join(streams["out"]), "".join(streams["err"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # TensorFlow Lite's native code prints one line of its own; everything else is ours.
    lines = [x for x in err.splitlines() if x and not x.startswith("INFO: Created TensorFlow Lite")]
    records = [json.loads(x) for x in lines]
    assert any(r["logger"] == "proctor" and r["message"].startswith("analyzer ready") for r in records)
    (accepted,) = [r for r in records if r["logger"] == "uvicorn.error" and "[accepted]" in r["message"]]
    assert "token=***" in accepted["message"] and cfg["stream_token"] not in err
    assert accepted["session_id"] == "cli-1" and accepted["level"] == "info"
    assert any(r["logger"] == "uvicorn.access" and "/api/v1/session/start" in r["message"] for r in records)
    assert '"name": "analyze frame"' in out and '"name": "model mediapipe.blazeface_full_range"' in out
