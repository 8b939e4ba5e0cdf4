"""FastAPI application factory: storage, keys, models, pipeline, sessions and routes.

What alerts go into (the outbox) and what runs beside the analyzer (an embedded dispatcher, data
retention) come from the caller: the composition root, livekit_proctor.wiring. The analyzer imports
nothing of the dispatcher (tests/test_layers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import sessionmaker
from starlette.exceptions import HTTPException

from livekit_proctor import __version__
from livekit_proctor.analyzer.api import identity, ops, privacy, sessions
from livekit_proctor.analyzer.api.errors import ERROR_MODELS
from livekit_proctor.analyzer.auth import KeyStore
from livekit_proctor.analyzer.body_limit import BodyLimit
from livekit_proctor.analyzer.metrics import Metrics
from livekit_proctor.analyzer.pipeline import InferencePool, ModelSet
from livekit_proctor.analyzer.sessions import SessionManager
from livekit_proctor.analyzer.stream import router as stream_router
from livekit_proctor.contracts.identity import CandidateData
from livekit_proctor.contracts.outbox import AlertSink
from livekit_proctor.crypto import load_keyring
from livekit_proctor.datadir import prepare_data_dir
from livekit_proctor.db import make_engine, make_sessionmaker
from livekit_proctor.identity_store import IdentityStore
from livekit_proctor.settings import Settings

log = logging.getLogger("proctor")
_REF = "#/components/schemas/{model}"
_UNPARSEABLE = {RecursionError: "nested too deeply", UnicodeDecodeError: "not UTF-8"}


def _stream_secret(settings: Settings) -> bytes:
    if settings.stream_secret:
        return settings.stream_secret.encode()
    path = settings.data_dir / "stream-secret"
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def _announce_bootstrap_key(settings: Settings, key: str) -> None:
    path: Path = settings.data_dir / "bootstrap-admin.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    banner = (
        "\n" + "=" * 72 + "\n"
        "First start: generated an admin API key (shown once; also saved to\n"
        f"{path} with mode 0600):\n\n    {key}\n\n"
        "Create keys for your exam backend with: proctor keys create --role system\n" + "=" * 72 + "\n"
    )
    print(banner, flush=True)


class RedactTokens(logging.Filter):
    """Keeps stream tokens and keys passed as ?token= out of access logs."""

    _pattern = re.compile(r"([?&](?:token|api_key)=)[^&\s\"]+")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._pattern.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        return True


def _install_redaction() -> None:
    for name in ("uvicorn.access", "uvicorn.error"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in lg.filters):
            lg.addFilter(RedactTokens())


# The outbox the analyzer appends alerts to, built once the database is open.
OutboxFactory = Callable[[Settings, sessionmaker], AlertSink]


@dataclass
class Host:
    """What a lifespan hook gets: the app's settings and database, and where what it runs shows itself."""

    settings: Settings
    sm: sessionmaker
    delivery: Callable[[], dict[str, Any]] | None = None  # readiness "delivery" (an embedded dispatcher's lanes)
    registries: list[CollectorRegistry] = field(default_factory=list)  # appended to /metrics
    candidate_data: list[CandidateData] = field(default_factory=list)  # privacy export / delete beyond the database


# Work that runs beside the analyzer while the app is up: entered after the sessions are restored, left
# before they are saved at shutdown, in reverse order.
LifespanHook = Callable[[Host], AbstractAsyncContextManager[object]]


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(
    settings: Settings | None = None,
    models: ModelSet | None = None,
    *,
    outbox: OutboxFactory,
    hooks: Sequence[LifespanHook] = (),
) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _install_redaction()
        prepare_data_dir(settings)  # 0700 / 0600, tightened from older installs
        async with contextlib.AsyncExitStack() as stack:  # left in reverse: hooks, sessions, pool, database
            engine = make_engine(settings.resolved_database_url())
            stack.callback(engine.dispose)
            sm = make_sessionmaker(engine)
            st = app.state
            st.settings = settings
            st.started_at = time.time()
            st.metrics = metrics = Metrics()
            st.keys = KeyStore(sm, settings.api_keys)
            key = st.keys.bootstrap()
            if key:
                _announce_bootstrap_key(settings, key)
            st.stream_secret = _stream_secret(settings)
            st.models = models or await asyncio.to_thread(ModelSet.from_settings, settings)
            st.pool = pool = InferencePool(settings.inference_workers, metrics)
            stack.callback(pool.shutdown)
            st.sink = outbox(settings, sm)
            # Creates the embedding key file (0600) on first start when no key is configured.
            st.identity = IdentityStore(sm, await asyncio.to_thread(load_keyring, settings))
            st.sessions = mgr = SessionManager(settings, sm, st.models, pool, st.sink, metrics, st.identity)
            # A change of an enrollment through this analyzer reaches its live sessions at once (the store calls
            # its listeners from the thread it runs in); one through another analyzer, by the re-check below.
            loop = asyncio.get_running_loop()

            def enrollment_changed(candidate_id: str) -> None:
                loop.call_soon_threadsafe(mgr.on_enrollment_changed, candidate_id)

            st.identity.enrollment_listeners.append(enrollment_changed)
            stack.callback(st.identity.enrollment_listeners.remove, enrollment_changed)
            await mgr.restore_active()  # sessions active before a restart go on (open incidents included)
            stack.push_async_callback(mgr.shutdown)
            st.host = host = Host(settings, sm)
            for hook in hooks:
                await stack.enter_async_context(hook(host))
            stack.push_async_callback(_cancel, asyncio.create_task(mgr.housekeeping()))
            stack.push_async_callback(_cancel, asyncio.create_task(mgr.watch_enrollments()))
            log.info("analyzer ready on node %s with models %s", settings.node_id, st.models.describe())
            yield

    app = FastAPI(title="LiveKit proctoring analyzer", version=__version__, lifespan=lifespan)
    app.add_middleware(BodyLimit, default=settings.max_request_bytes)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail
        if exc.status_code == 400 and type(exc.__cause__) in _UNPARSEABLE:  # FastAPI's "error parsing the body"
            detail = f"the body is not parseable JSON: {_UNPARSEABLE[type(exc.__cause__)]}"
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", "")} for e in exc.errors()]
        return JSONResponse({"error": "invalid request", "detail": detail}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse({"error": "internal error"}, status_code=500)

    app.include_router(sessions.router)
    app.include_router(ops.router)
    app.include_router(identity.router)
    app.include_router(privacy.router)
    app.include_router(stream_router)
    _declare_only_real_errors(app)
    return app


def _declare_only_real_errors(app: FastAPI) -> None:
    """FastAPI declares a 422 in its own body shape on every route with a parameter. Our handler answers
    ValidationErrorBody: the generated 422 is given that shape, or dropped where nothing can fail validation
    (only unconstrained string path parameters, no body)."""
    generate = app.openapi

    def can_fail(op: dict) -> bool:
        plain = {"type": "string"}
        return "requestBody" in op or any(
            p["in"] != "path" or {k: v for k, v in p["schema"].items() if k != "title"} != plain
            for p in op.get("parameters", [])
        )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = generate()  # FastAPI's: stores the document in app.openapi_schema and returns it
            ours = {"$ref": "#/components/schemas/ValidationErrorBody"}
            for path_item in doc.get("paths", {}).values():
                for op in path_item.values():
                    r422 = op.get("responses", {}).get("422", {}).get("content", {}).get("application/json", {})
                    if r422.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                        if can_fail(op):
                            r422["schema"] = ours
                        else:
                            del op["responses"]["422"]
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            for model in ERROR_MODELS:
                schemas.setdefault(model.__name__, model.model_json_schema(ref_template=_REF))
            return doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
