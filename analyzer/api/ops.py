"""Health, readiness, metrics and admin views."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, Security
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from livekit_proctor import __version__
from livekit_proctor.analyzer.api.errors import AUTH, errors
from livekit_proctor.analyzer.auth import CAN_ADMIN, Principal, presented_key, require
from livekit_proctor.contracts.api import AdminSessions, AdminStats, Health, Readiness

router = APIRouter(tags=["operations"])
Admin = Annotated[Principal, Depends(require(CAN_ADMIN))]


@router.get("/.well-known/health", response_model=Health)
async def health(request: Request) -> dict[str, Any]:
    """Liveness: the process answers."""
    return {"status": "ok", "version": __version__, "uptime_s": round(time.time() - request.app.state.started_at, 1)}


@router.get(
    "/.well-known/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready: models not loaded or the outbox not accepting"}},
)
async def ready(request: Request) -> JSONResponse:
    """Readiness: models loaded and the outbox accepting alerts."""
    st = request.app.state
    models = st.models.describe() if getattr(st, "models", None) else None
    sink = st.sink.state() if getattr(st, "sink", None) else {"ok": False}
    ok = bool(models) and bool(sink.get("ok"))
    body = {"ready": ok, "models": models, "dispatcher": sink, "inference_workers": st.settings.inference_workers}
    host = getattr(st, "host", None)
    if host is not None and host.delivery is not None:
        body["delivery"] = host.delivery()
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={
        200: {"description": "Prometheus text exposition format"},
        **errors(*AUTH, e401="Missing or unknown API key (unless PROCTOR_METRICS_PUBLIC=true)"),
    },
)
async def metrics(request: Request, key: Annotated[str | None, Security(presented_key)]) -> Response:
    """Prometheus metrics; needs an admin key unless PROCTOR_METRICS_PUBLIC=true."""
    st = request.app.state
    if not st.settings.metrics_public:
        p = st.keys.lookup(key) if key else None
        if p is None:
            raise HTTPException(401, "metrics need an admin API key (or PROCTOR_METRICS_PUBLIC=true)")
        if p.role not in CAN_ADMIN:
            raise HTTPException(403, f"role '{p.role}' may not read metrics (needs admin)")
    st.metrics.queue_depth.labels("audio").set(sum(s.audio.bytes for s in st.sessions.live.values()))
    body = generate_latest(st.metrics.registry)
    for registry in st.host.registries:  # what runs beside the analyzer (an embedded dispatcher)
        body += generate_latest(registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/api/v1/admin/sessions", response_model=AdminSessions, responses=errors(*AUTH, 422))
async def admin_sessions(
    request: Request,
    who: Admin,
    state: str | None = Query(default=None, pattern="^(active|ended|expired)$"),
    limit: int = Query(default=100, ge=1, le=1000),
) -> dict[str, Any]:
    mgr = request.app.state.sessions
    rows = await mgr.list_rows(state, limit)
    return {"sessions": [mgr.state_of(r).model_dump(mode="json") for r in rows]}


@router.get("/api/v1/admin/stats", response_model=AdminStats, responses=errors(*AUTH))
async def admin_stats(request: Request, who: Admin) -> dict[str, Any]:
    st = request.app.state
    live = st.sessions.live.values()
    tot: dict[str, Any] = {"frames_received": 0, "frames_analysed": 0, "frames_dropped": 0, "audio_seconds": 0.0}
    alerts: dict[str, int] = {}
    for s in live:
        c = s.counters.public()
        tot["frames_received"] += c.frames_received
        tot["frames_analysed"] += c.frames_analysed
        tot["frames_dropped"] += c.frames_dropped
        tot["audio_seconds"] += c.audio_seconds
        for k, v in c.alerts_by_type.items():
            alerts[k] = alerts.get(k, 0) + v
    return {
        "node_id": st.settings.node_id,
        "active_sessions": len(st.sessions.live),
        "connected_streams": sum(1 for s in live if s.connection is not None),
        "inference_inflight": st.pool.inflight,
        "inference_workers": st.pool.workers,
        "totals": tot,
        "alerts_by_type": alerts,
        "dispatcher": st.sink.state(),
    }
