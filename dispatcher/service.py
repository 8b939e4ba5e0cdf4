"""Builds a Dispatcher from settings; `proctor dispatcher` runs it as its own process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from sqlalchemy.orm import sessionmaker

from livekit_proctor.datadir import prepare_data_dir
from livekit_proctor.db import make_engine, make_sessionmaker
from livekit_proctor.dispatcher.engine import Dispatcher, FallbackChain
from livekit_proctor.dispatcher.metrics import DispatchMetrics
from livekit_proctor.dispatcher.source import OutboxSource, RedisSource, SqlSource
from livekit_proctor.dispatcher.transports.base import DISPATCH, Transport
from livekit_proctor.settings import Settings

log = logging.getLogger("proctor.dispatcher")


def build_transports(s: Settings) -> list[Transport]:
    retry = replace(DISPATCH, max_attempts=s.dispatch_max_attempts)
    out: dict[str, Transport] = {}
    if s.grpc_target:
        from livekit_proctor.dispatcher.transports.grpc import GrpcTransport

        out["grpc"] = GrpcTransport(
            s.grpc_target, tls=s.grpc_tls, ca_file=s.grpc_ca_file, cert_file=s.grpc_cert_file,
            key_file=s.grpc_key_file, client_id=dispatcher_id(s), retry=retry,
        )  # fmt: skip
    if s.kafka_bootstrap:
        from livekit_proctor.dispatcher.transports.kafka import KafkaTransport

        idem: bool | str = {"true": True, "false": False}.get(s.kafka_idempotence.lower(), "auto")
        out["kafka"] = KafkaTransport(
            s.kafka_bootstrap, topic=s.kafka_topic, dlq_topic=s.kafka_dlq_topic, idempotence=idem, retry=retry
        )
    if s.webhook_url:
        from livekit_proctor.dispatcher.transports.webhook import WebhookTransport

        secrets = [x.strip() for x in s.webhook_secrets.split(",") if x.strip()]
        if not secrets:
            raise ValueError("PROCTOR_WEBHOOK_URL needs PROCTOR_WEBHOOK_SECRETS (whsec_...)")
        out["webhook"] = WebhookTransport(
            s.webhook_url, secrets, timeout_s=s.webhook_timeout_s, retry=retry, concurrency=s.webhook_concurrency
        )
    if s.redis_publish_stream:
        from livekit_proctor.dispatcher.transports.redis_stream import RedisStreamTransport

        out["redis"] = RedisStreamTransport(s.redis_url, s.redis_publish_stream, retry=retry)
    if s.room_transport:
        if not (s.livekit_url and s.livekit_api_key and s.livekit_api_secret):
            raise ValueError("PROCTOR_ROOM_TRANSPORT needs PROCTOR_LIVEKIT_URL, _API_KEY and _API_SECRET")
        from livekit_proctor.dispatcher.transports.livekit_room import LiveKitRoomTransport

        out["livekit"] = LiveKitRoomTransport(s.livekit_url, s.livekit_api_key, s.livekit_api_secret, retry=retry)
    order = [n.strip() for n in s.dispatch_order.split(",")]
    return [out[n] for n in order if n in out] + [t for n, t in out.items() if n not in order]


def lane_names(s: Settings) -> list[str]:
    """The lanes build_dispatcher runs for these settings, without building transports (for retention)."""
    on = {"grpc": bool(s.grpc_target), "kafka": bool(s.kafka_bootstrap), "webhook": bool(s.webhook_url),
          "redis": bool(s.redis_publish_stream), "livekit": s.room_transport}  # fmt: skip
    names = [n for n, enabled in on.items() if enabled]
    return ["fallback"] if s.dispatch_mode == "fallback" and len(names) > 1 else names


def dispatcher_id(s: Settings) -> str:
    return s.dispatcher_id or f"{socket.gethostname()}-{os.getpid()}"


def redis_client(s: Settings) -> Any:
    import redis.asyncio as redis

    return redis.from_url(s.redis_url)


def build_dispatcher(s: Settings, sm: sessionmaker, metrics: DispatchMetrics | None = None) -> Dispatcher:
    transports = build_transports(s)
    if s.dispatch_mode == "fallback" and len(transports) > 1:
        lanes: list[Transport] = [FallbackChain(transports, replace(DISPATCH, max_attempts=s.dispatch_max_attempts))]
    elif s.dispatch_mode in ("fanout", "fallback"):
        lanes = transports
    else:
        raise ValueError(f"PROCTOR_DISPATCH_MODE must be fanout or fallback, not {s.dispatch_mode!r}")
    source: OutboxSource
    if s.outbox == "redis":
        source = RedisSource(redis_client(s), dispatcher_id(s), s.outbox_stream, s.claim_idle_s)
    elif s.outbox == "sql":
        source = SqlSource(sm, dispatcher_id(s))
    else:
        raise ValueError(f"PROCTOR_OUTBOX must be sql or redis, not {s.outbox!r}")
    dlq = next((t for t in transports if t.name == "kafka"), None)
    return Dispatcher(source, lanes, sm, metrics=metrics, dlq_producer=dlq)


async def run_standalone(s: Settings) -> None:
    """`proctor dispatcher`: the dispatcher plus /metrics and /.well-known/health on dispatcher_port."""
    import uvicorn
    from fastapi import FastAPI, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    prepare_data_dir(s)
    engine = make_engine(s.resolved_database_url())
    sm = make_sessionmaker(engine)
    d = build_dispatcher(s, sm)
    if not d.lanes:
        log.warning("no transport configured (PROCTOR_GRPC_TARGET, _KAFKA_BOOTSTRAP, _WEBHOOK_URL, ...): idle")
    app = FastAPI(title="proctor dispatcher")

    @app.get("/.well-known/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "id": dispatcher_id(s), **d.state()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(d.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    class _Server(uvicorn.Server):
        # SIGINT / SIGTERM are the loop's (below): the lanes drain before the web side stops. (uvicorn >= 0.29
        # installs its handlers here; the install_signal_handlers it had before is gone.)
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    # log_config=None: uvicorn keeps to the process's logging setup (proctor.observability).
    server = _Server(
        uvicorn.Config(app, host=s.dispatcher_host, port=s.dispatcher_port, log_level="warning", log_config=None)
    )
    await d.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    web = asyncio.create_task(server.serve())
    log.info("dispatcher %s: lanes %s, outbox %s", dispatcher_id(s), [t.name for t in d.lanes], s.outbox)
    await stop.wait()
    server.should_exit = True
    await d.stop()
    with contextlib.suppress(Exception):
        await web
    engine.dispose()
