"""/api/v1/session/...: start, end, state, fresh stream token."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError

from livekit_proctor.analyzer.api.errors import AUTH, errors
from livekit_proctor.analyzer.auth import CAN_MANAGE_SESSIONS, CAN_READ_SESSIONS, Principal, require
from livekit_proctor.analyzer.sessions import (
    LiveSession,
    SessionClosed,
    SessionConflict,
    SessionManager,
    SessionNotFound,
)
from livekit_proctor.contracts.alerts import ts_to_iso
from livekit_proctor.contracts.api import CalibrationSettings, SessionConfig, SessionStartRequest, SessionState
from livekit_proctor.contracts.wire import PROTOCOL_VERSION
from livekit_proctor.tokens import mint

router = APIRouter(prefix="/api/v1/session", tags=["sessions"])
Manager = Annotated[Principal, Depends(require(CAN_MANAGE_SESSIONS))]
Reader = Annotated[Principal, Depends(require(CAN_READ_SESSIONS))]


def _mgr(request: Request) -> SessionManager:
    return request.app.state.sessions


def _ws_base(request: Request) -> str:
    base = request.app.state.settings.base_url()
    return base.replace("https://", "wss://", 1).replace("http://", "ws://", 1)


def _config(request: Request, live: LiveSession, created: bool) -> SessionConfig:
    st = request.app.state
    token, exp = mint(st.stream_secret, live.id, live.sitting, st.settings.stream_token_ttl_s)
    ws = _ws_base(request)
    return SessionConfig(
        exam_session_id=live.id,
        candidate_id=live.candidate_id,
        state=live.state,
        stream_url=f"{ws}/api/v1/session/{live.id}/stream",
        stream_token=token,
        stream_token_expires_at=ts_to_iso(exp),
        legacy_endpoints={k: f"{ws}/ws/proctor/{live.id}/{k}" for k in ("video", "audio", "events")},
        policy=live.policy,
        calibration=CalibrationSettings(),
        protocol_version=PROTOCOL_VERSION,
        expires_at=live.expires_at.isoformat(),
        created=created,
    )


@router.post(
    "/start",
    response_model=SessionConfig,
    responses=errors(400, *AUTH, 409, 413, 422, e409="The session is active for another candidate"),
)
async def start_session(body: SessionStartRequest, request: Request, who: Manager) -> SessionConfig:
    try:
        live, created = await _mgr(request).start(body, who.actor)
    except SessionConflict as e:
        raise HTTPException(409, str(e)) from None
    except ValueError as e:  # policy overrides that do not apply: the same 422 body as any invalid field
        raise RequestValidationError([{"loc": ("body",), "msg": str(e), "type": "value_error"}]) from None
    return _config(request, live, created)


@router.post(
    "/{session_id}/token",
    response_model=SessionConfig,
    responses=errors(*AUTH, 404, 409, e409="The session has ended or expired"),
)
async def refresh_token(session_id: str, request: Request, who: Manager) -> SessionConfig:
    """A fresh stream token for an active session (clients reconnecting after the first one expired)."""
    try:
        live = await _mgr(request).get_live(session_id)
    except SessionNotFound:
        raise HTTPException(404, f"unknown session {session_id}") from None
    except SessionClosed as e:
        raise HTTPException(409, f"session {session_id} is {e}") from None
    return _config(request, live, False)


@router.post("/{session_id}/end", response_model=SessionState, responses=errors(*AUTH, 404))
async def end_session(session_id: str, request: Request, who: Manager) -> SessionState:
    mgr = _mgr(request)
    try:
        row = await mgr.end(session_id, who.actor)
    except SessionNotFound:
        raise HTTPException(404, f"unknown session {session_id}") from None
    return mgr.state_of(row)


@router.get("/{session_id}", response_model=SessionState, responses=errors(*AUTH, 404))
async def get_session(session_id: str, request: Request, who: Reader) -> SessionState:
    mgr = _mgr(request)
    row = await mgr.row(session_id)
    if row is None:
        raise HTTPException(404, f"unknown session {session_id}")
    return mgr.state_of(row)
