"""/api/v1/privacy/...: export and delete everything held about a candidate (docs/identity.md).

The database part is IdentityStore's (enrollment, embeddings, identity audit, sessions, dead letters, session
audit). The alerts waiting in (or kept by) the outbox, thumbnails inside, are the outbox's own to remove
(AlertSink.delete_sessions: SQL table or Redis Stream, whichever is configured). Data kept elsewhere
(alerts.jsonl) is reached through the CandidateData hooks the composition root puts on
app.state.host.candidate_data. Before a deletion the candidate's live sessions are ended, so that nothing writes
about them while their data goes; a session live on another analyzer node ends there at that node's next
housekeeping sweep, which finds its row gone (docs/identity.md).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from livekit_proctor.analyzer.api.errors import AUTH, errors
from livekit_proctor.analyzer.auth import Principal, require
from livekit_proctor.analyzer.sessions import SessionManager, SessionNotFound
from livekit_proctor.contracts.identity import CandidateData, PrivacyDeleted, PrivacyDeleteRequest, PrivacyExport
from livekit_proctor.contracts.outbox import AlertSink
from livekit_proctor.identity_store import IdentityStore

router = APIRouter(prefix="/api/v1/privacy", tags=["privacy"])
CAN_PRIVACY = frozenset({"system", "admin"})
Privileged = Annotated[Principal, Depends(require(CAN_PRIVACY))]


def _hooks(request: Request) -> list[CandidateData]:
    host = getattr(request.app.state, "host", None)
    return list(getattr(host, "candidate_data", []))


@router.get("/export", response_model=PrivacyExport, responses=errors(*AUTH, 422))
async def export(
    request: Request, who: Privileged, candidate_id: Annotated[str, Query(min_length=1, max_length=128)]
) -> PrivacyExport:
    """Everything held about the candidate. Embedding vectors are left out (derived biometric data); their
    ids, quality figures and key ids are in. The export itself leaves an audit record."""
    store: IdentityStore = request.app.state.identity
    sink: AlertSink = request.app.state.sink
    # The alerts as the configured outbox holds them (SQL table or Redis Stream), read before the rest.
    alerts = await sink.export_sessions(await asyncio.to_thread(store.session_ids, candidate_id))
    out: dict[str, Any] = await asyncio.to_thread(store.export_candidate, candidate_id, who, alerts=alerts)
    sids = [s["id"] for s in out["sessions"]] + [
        a["target"] for a in out["session_audit"] if a["action"] == "session.start"
    ]
    sids = sorted(set(sids))
    out["files"] = {h.name: await asyncio.to_thread(h.export, candidate_id, sids) for h in _hooks(request)}
    return PrivacyExport.model_validate(out)


@router.post("/delete", response_model=PrivacyDeleted, responses=errors(400, *AUTH, 413, 422))
async def delete(body: PrivacyDeleteRequest, request: Request, who: Privileged) -> PrivacyDeleted:
    """Deletes everything held about the candidate: ends their live sessions first, then their alerts in the
    outbox, then the database rows, then their lines in alerts.jsonl. The identity audit keeps one record: this
    deletion (with its counts)."""
    cid = body.candidate_id
    mgr: SessionManager = request.app.state.sessions
    live = {sid for sid, s in mgr.live.items() if s.candidate_id == cid}
    live |= {r.id for r in await mgr.store.active() if r.candidate_id == cid}
    ended = []
    for sid in sorted(live):
        try:
            await mgr.end(sid, who.actor, reason="privacy_deletion")
            ended.append(sid)
        except SessionNotFound:
            pass
    store: IdentityStore = request.app.state.identity
    sink: AlertSink = request.app.state.sink
    # The outbox before the rows: should a later step fail, a retry still finds the session ids (sessions, audit
    # rows). Once more after them: what another node appended for a session it served until it saw the row end.
    sids = await asyncio.to_thread(store.session_ids, cid)
    outbox = await sink.delete_sessions(sids)
    rep = await asyncio.to_thread(store.delete_candidate, cid, who, outbox)
    for k, n in (await sink.delete_sessions(rep.session_ids)).items():
        outbox[k] = outbox.get(k, 0) + n
    counts = outbox | rep.counts()
    for h in _hooks(request):
        counts[h.name] = await asyncio.to_thread(h.erase, cid, rep.session_ids)
    return PrivacyDeleted(candidate_id=cid, sessions_ended=ended, deleted=counts, session_ids=rep.session_ids)
