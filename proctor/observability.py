"""Logs and traces of the analyzer, the dispatcher and the agent (docs/operations.md, Logging and Tracing).

Logs: the code logs through the standard library (`logging.getLogger(...)`). configure_logging() gives the
root logger one handler whose structlog ProcessorFormatter renders every record, ours and the libraries'
(uvicorn, livekit), as one JSON object per line, or as plain text for development. A record carries the
fields bound in its context (session_id, event_id: bind(), bound(), session_context()) and the trace_id
and span_id of the current OpenTelemetry span.

Traces: OpenTelemetry, off unless the standard OTEL_* variables ask for an exporter (configure_tracing()).
Off, every span helper below returns one shared no-op context manager: no span object, no export, no
network. The alert's trace context travels in its metadata as a W3C `traceparent`, so the dispatcher (and
any consumer) continues the trace of the frame that raised it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import IO, Any, Protocol

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes
from structlog.typing import EventDict

from livekit_proctor import __version__
from livekit_proctor.contracts.alerts import Alert

LOG_FORMATS = ("json", "text")
_HANDLER_MARK = "_proctor_handler"
_W3C = TraceContextTextMapPropagator()
_OFF: AbstractContextManager[Any] = contextlib.nullcontext(trace.INVALID_SPAN)  # reusable, costs nothing
_tracer: trace.Tracer | None = None  # None: tracing off

# ---- logs


def _add_trace(_: Any, __: str, event_dict: EventDict) -> EventDict:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event_dict.setdefault("span_id", format(ctx.span_id, "016x"))
    return event_dict


def _drop_color_message(_: Any, __: str, event_dict: EventDict) -> EventDict:
    event_dict.pop("color_message", None)  # uvicorn's ANSI-coloured copy of the message, as an extra
    return event_dict


_FIRST = ("timestamp", "level", "logger", "message")


def _key_order(_: Any, __: str, event_dict: EventDict) -> EventDict:
    # timestamp, level, logger, message first: the lines read well before any tool parses them.
    head = {k: event_dict.pop(k) for k in _FIRST if k in event_dict}
    return {**head, **event_dict}


def configure_logging(fmt: str = "json", level: str | int = "INFO", stream: IO[str] | None = None) -> logging.Handler:
    """One root handler for every logger of the process, in `fmt` ("json" or "text"); returns it.

    Idempotent: a handler installed by an earlier call is replaced. uvicorn's loggers are reset to
    propagate to the root (uvicorn.Config installs its own handlers unless log_config=None).
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    stream = stream or sys.stderr
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace,
    ]
    renderer: list[Any]
    if fmt == "json":
        renderer = [
            structlog.processors.format_exc_info,
            structlog.processors.EventRenamer("message"),
            _key_order,
            structlog.processors.JSONRenderer(),
        ]
    else:
        colors = bool(getattr(stream, "isatty", lambda: False)())
        renderer = [structlog.dev.ConsoleRenderer(colors=colors)]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), _drop_color_message],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    # structlog's own loggers (structlog.get_logger) go through the same handler.
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _HANDLER_MARK, False):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    # httpx logs every request's full URL at INFO: a webhook URL may carry a secret in its query string.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    return handler


def bind(**fields: Any) -> None:
    """Adds fields to every record logged from the current context (task or thread) from now on."""
    structlog.contextvars.bind_contextvars(**fields)


def bound(**fields: Any) -> AbstractContextManager[None]:
    """Adds fields to every record logged from the current context inside the `with` block."""
    return structlog.contextvars.bound_contextvars(**fields)


def session_context(session_id: str) -> contextvars.Context:
    """A copy of the current context with session_id bound: for asyncio.create_task(..., context=)."""
    ctx = contextvars.copy_context()
    ctx.run(structlog.contextvars.bind_contextvars, session_id=session_id)
    return ctx


# ---- traces


def configure_tracing(service_name: str) -> bool:
    """Installs the OpenTelemetry SDK when the OTEL_* variables ask for traces; True when tracing is on.

    On when OTEL_TRACES_EXPORTER names an exporter (otlp, otlp_proto_grpc, otlp_proto_http, console), or
    an OTLP endpoint is set (then otlp); off when unset, "none", or OTEL_SDK_DISABLED=true. The exporter,
    sampler, batching and resource read their own standard variables. A process already instrumented
    (`opentelemetry-instrument proctor serve`) keeps its provider. ValueError for an unknown exporter.
    """
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    current = trace.get_tracer_provider()
    from opentelemetry.sdk.trace import TracerProvider

    if isinstance(current, TracerProvider):
        install_tracer_provider(current)
        return True
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names and (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        names = ["otlp"]
    names = [n for n in names if n != "none"]
    if not names:
        return False
    from importlib.metadata import entry_points

    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporters = []
    for name in names:
        if name == "otlp":
            proto = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
            name = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}.get(proto.strip(), "")
            if not name:
                raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL must be grpc or http/protobuf, not {proto!r}")
        eps = list(entry_points(group="opentelemetry_traces_exporter", name=name))
        if not eps:
            known = sorted({e.name for e in entry_points(group="opentelemetry_traces_exporter")} | {"otlp", "none"})
            raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (installed: {', '.join(known)})")
        exporters.append(eps[0].load()())
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER; flushed at exit
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    install_tracer_provider(provider)
    _flush_before_signal_exit(provider)
    return True


def _flush_before_signal_exit(provider: Any) -> None:
    """uvicorn re-raises SIGTERM / SIGINT after its graceful shutdown, so the process ends by the signal and
    the SDK's atexit flush never runs. The handler uvicorn restores and re-raises into is this one: it
    exports the spans still batched, then lets the signal act as before."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def flush_then_exit(signum: int, _: Any, previous: Any = previous) -> None:
            provider.force_flush(timeout_millis=5000)
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            signal.raise_signal(signum)

        signal.signal(sig, flush_then_exit)


def install_tracer_provider(provider: trace.TracerProvider | None) -> None:
    """Where this package's spans go; None turns tracing off. Tests install an SDK provider here."""
    global _tracer
    _tracer = None if provider is None else provider.get_tracer("proctor", __version__)


def tracing_enabled() -> bool:
    return _tracer is not None


def span(name: str, **kwargs: Any) -> AbstractContextManager[Any]:
    """A current span (start_as_current_span's arguments), or the shared no-op when tracing is off."""
    t = _tracer
    if t is None:
        return _OFF
    return t.start_as_current_span(name, **kwargs)


def frame_span(session_id: str, seq: int, arrived_perf: float) -> AbstractContextManager[Any]:
    """One analysed frame, from its arrival (a time.perf_counter() reading) to its rules' alerts."""
    t = _tracer
    if t is None:
        return _OFF
    start = time.time_ns() - int((time.perf_counter() - arrived_perf) * 1e9)
    attrs: Attributes = {"proctor.session_id": session_id, "proctor.frame.seq": seq}
    return t.start_as_current_span("analyze frame", kind=trace.SpanKind.CONSUMER, start_time=start, attributes=attrs)


def model_span(model: str) -> AbstractContextManager[Any]:
    """One model on one frame (in an inference thread: the caller carries the context there)."""
    t = _tracer
    if t is None:
        return _OFF
    return t.start_as_current_span(f"model {model}", attributes={"proctor.model": model})


def rules_span() -> AbstractContextManager[Any]:
    t = _tracer
    if t is None:
        return _OFF
    return t.start_as_current_span("evaluate rules")


def traceparent() -> str | None:
    """The W3C traceparent of the current span; None when there is none (tracing off)."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get("traceparent")


def context_of(traceparent_: str | None) -> trace.SpanContext | None:
    """The span context a traceparent names; None when absent or malformed."""
    if not traceparent_:
        return None
    ctx = trace.get_current_span(_W3C.extract({"traceparent": traceparent_})).get_span_context()
    return ctx if ctx.is_valid else None


@contextmanager
def alert_outbox_span(alert: Alert) -> Iterator[None]:
    """Around the outbox append of one alert: logs carry its session_id and event_id; with tracing on, a
    span (child of the frame's, if any) whose traceparent the alert carries in metadata.traceparent."""
    with bound(session_id=alert.exam_session_id, event_id=alert.event_id):
        t = _tracer
        if t is None:
            yield
            return
        attrs = {
            "proctor.session_id": alert.exam_session_id,
            "proctor.event_id": alert.event_id,
            "proctor.event_type": str(alert.event_type),
            "proctor.incident_state": str(alert.incident_state or ""),
        }
        with t.start_as_current_span("outbox append", kind=trace.SpanKind.PRODUCER, attributes=attrs):
            alert.metadata.traceparent = traceparent()
            yield


@contextmanager
def alerts_outbox_span(alerts: Sequence[Alert]) -> Iterator[None]:
    """alert_outbox_span for a batch appended together: one sibling span per alert (each alert's
    metadata.traceparent names its own), all ended when the batch is appended."""
    if len(alerts) == 1:
        with alert_outbox_span(alerts[0]):
            yield
        return
    t = _tracer
    if t is None or not alerts:
        yield
        return
    spans = []
    for alert in alerts:
        attrs = {
            "proctor.session_id": alert.exam_session_id,
            "proctor.event_id": alert.event_id,
            "proctor.event_type": str(alert.event_type),
            "proctor.incident_state": str(alert.incident_state or ""),
        }
        sp = t.start_span("outbox append", kind=trace.SpanKind.PRODUCER, attributes=attrs)
        with trace.use_span(sp, end_on_exit=False):
            alert.metadata.traceparent = traceparent()
        spans.append(sp)
    try:
        yield
    except Exception as ex:
        for sp in spans:
            sp.record_exception(ex)
            sp.set_status(trace.Status(trace.StatusCode.ERROR, str(ex)))
        raise
    finally:
        for sp in spans:
            sp.end()


class _Enveloped(Protocol):
    # Read-only (properties), so that frozen dataclasses such as dispatcher's Envelope match.
    @property
    def event_id(self) -> str: ...
    @property
    def payload(self) -> bytes: ...


def _payload_traceparent(payload: bytes) -> str | None:
    try:
        tp = (json.loads(payload).get("metadata") or {}).get("traceparent")
    except (ValueError, AttributeError):
        return None
    return tp if isinstance(tp, str) else None


# The dispatch spans of the envelopes being sent, by event_id: a FallbackChain's per-transport spans nest
# under the lane's.
_dispatching: contextvars.ContextVar[dict[str, trace.Span] | None] = contextvars.ContextVar(
    "proctor_dispatching", default=None
)


@contextmanager
def dispatch_span(transport: str, batch: Sequence[_Enveloped]) -> Iterator[None]:
    """Around one transport send of a batch of outbox envelopes.

    With tracing on: one span per envelope, a child of its alert's span (metadata.traceparent), so every
    alert's trace shows its delivery; an envelope the send did not get acknowledged (DeliveryError.delivered
    counts those that were) ends in error. A batch of one binds its event_id for the logs and makes its
    span current.
    """
    with bound(event_id=batch[0].event_id) if len(batch) == 1 else contextlib.nullcontext():
        t = _tracer
        if t is None or not batch:
            yield
            return
        outer = _dispatching.get() or {}
        spans = []
        for e in batch:
            if e.event_id in outer:
                parent = trace.set_span_in_context(outer[e.event_id])
            else:
                sc = context_of(_payload_traceparent(e.payload))
                parent = trace.set_span_in_context(trace.NonRecordingSpan(sc)) if sc else otel_context.Context()
            attrs: Attributes = {
                "proctor.transport": transport,
                "proctor.event_id": e.event_id,
                "proctor.batch_size": len(batch),
            }
            spans.append(t.start_span(f"dispatch {transport}", parent, trace.SpanKind.PRODUCER, attrs))
        token = _dispatching.set({e.event_id: sp for e, sp in zip(batch, spans, strict=True)})
        try:
            if len(spans) == 1:
                with trace.use_span(spans[0], record_exception=False, set_status_on_exception=False):
                    yield
            else:
                yield
        except Exception as ex:
            delivered = getattr(ex, "delivered", 0)
            for sp in spans[delivered if isinstance(delivered, int) else 0 :]:
                sp.record_exception(ex)
                sp.set_status(trace.Status(trace.StatusCode.ERROR, str(ex)))
            raise
        finally:
            _dispatching.reset(token)
            for sp in spans:
                sp.end()
