"""The sessions of this analyzer: start (idempotent), rebuild after a restart, end, expiry, periodic saves.

A session is created over REST, streamed to over one WebSocket (a reconnect replaces the previous
connection and keeps the rule state), and ended over REST or by expiry. Counters and rule state (open
incidents, calibration, risk) are saved with every alert and every state_flush_s; after an analyzer
restart every active session is rebuilt from its row and continues.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from sqlalchemy.orm import sessionmaker

from livekit_proctor.analyzer.metrics import Metrics
from livekit_proctor.analyzer.pipeline import InferencePool, ModelSet
from livekit_proctor.analyzer.rules.policy import effective_policy
from livekit_proctor.analyzer.sessions.counters import Counters
from livekit_proctor.analyzer.sessions.errors import SessionClosed, SessionConflict, SessionNotFound
from livekit_proctor.analyzer.sessions.live import LiveSession
from livekit_proctor.analyzer.sessions.store import SessionStore, aware
from livekit_proctor.contracts.api import EffectivePolicy, FaceVerification, SessionStartRequest, SessionState
from livekit_proctor.contracts.outbox import AlertSink
from livekit_proctor.contracts.wire import CloseCode, SessionEndedMessage
from livekit_proctor.db import SessionRow, utcnow
from livekit_proctor.identity_store import IdentityStore, SystemActor

log = logging.getLogger(__package__)  # livekit_proctor.analyzer.sessions, as docs/operations.md shows


def _saved_check(rule_state: dict[str, Any]) -> dict[str, Any] | None:
    """The latest face check of a session that is not live here, from its saved rule state."""
    last = ((rule_state.get("engine") or {}).get("verification") or {}).get("last")
    return {"at": last["at"], "similarity": round(last["similarity"], 4), "match": last["match"]} if last else None


def _face_check(d: dict[str, Any] | None) -> FaceVerification | None:
    return FaceVerification.model_validate(d) if d else None


class SessionManager:
    def __init__(
        self,
        settings: Any,
        sm: sessionmaker,
        models: ModelSet,
        pool: InferencePool,
        sink: AlertSink,
        metrics: Metrics,
        identity: IdentityStore | None = None,
    ) -> None:
        self.settings = settings
        self.identity = identity  # enrollments (face verification); None in tests that need none
        # Who the sessions' face checks are in the identity audit log as (IdentityAuditRow.key_id: 64 chars).
        self.auditor = SystemActor(key_id=f"analyzer:{settings.node_id}"[:64])
        self.sm = sm
        self.store = SessionStore(sm)
        self.models = models
        self.pool = pool
        self.sink = sink
        self.metrics = metrics
        self.worker_id = f"pid{os.getpid()}"
        self.live: dict[str, LiveSession] = {}
        self._lock = asyncio.Lock()

    async def row(self, sid: str) -> SessionRow | None:
        return await self.store.get(sid)

    # ---- lifecycle

    async def start(self, req: SessionStartRequest, actor: str) -> tuple[LiveSession, bool]:
        """Returns (session, created). Idempotent for the same candidate; SessionConflict otherwise."""
        policy = effective_policy(req, self.settings.video_fps)
        async with self._lock:
            row = await self.store.get(req.exam_session_id)
            if row is not None and row.state == "active" and aware(row.expires_at) > utcnow():
                if row.candidate_id != req.candidate_id:
                    raise SessionConflict(f"session {req.exam_session_id} is active for another candidate")
                return self._live(row), False
            if row is not None and row.state == "active":
                await self._expire(row.id)
            row = await self.store.create(req, policy, actor, self.settings.session_ttl_s)
            if self.identity is not None:  # the enrollment's retention counts from the candidate's last session
                await asyncio.to_thread(self.identity.touch_session, req.candidate_id)
            return self._live(row), True

    def _live(self, row: SessionRow) -> LiveSession:
        live = self.live.get(row.id)
        if live is None:  # new, or rebuilt from its row after an analyzer restart
            live = LiveSession(row, self)
            self.live[row.id] = live
            self.metrics.active_sessions.set(len(self.live))
        return live

    async def get_live(self, sid: str) -> LiveSession:
        """The active session, rebuilt from its row when needed; SessionNotFound / SessionClosed."""
        live = self.live.get(sid)
        if live is not None:
            return live
        row = await self.store.get(sid)
        if row is None:
            raise SessionNotFound(sid)
        if row.state != "active":
            raise SessionClosed(row.state)
        if aware(row.expires_at) <= utcnow():
            await self._expire(sid)
            raise SessionClosed("expired")
        async with self._lock:
            return self._live(row)

    async def restore_active(self) -> int:
        """At startup: rebuilds every active session from its row, so that its open incidents, watchdog and
        expiry go on without waiting for its client to reconnect. Sessions that expired meanwhile are ended
        (their open incidents get their end alerts)."""
        rows = await self.store.active()
        now = utcnow()
        for row in rows:
            if aware(row.expires_at) <= now:
                await self._expire(row.id)
            else:
                self._live(row)
        restored = [s for s in self.live.values() if s.restored]
        if rows:
            log.info("restored %d active session(s), %d with open incidents", len(self.live), len(restored))
        return len(self.live)

    async def end(self, sid: str, actor: str, reason: str = "ended_by_api", state: str = "ended") -> SessionRow:
        live = self.live.pop(sid, None)
        self.metrics.active_sessions.set(len(self.live))
        if live is None:
            row = await self.store.get(sid)
            saved = (row.rule_state or {}) if row is not None else {}
            if row is not None and row.state == "active" and (saved.get("open") or saved.get("face_checks")):
                # Rebuilt only to end its saved open incidents with their alerts, and to write the summary of
                # its face checks in the identity audit log.
                live = LiveSession(row, self)
        if live is not None:
            await live.close(reason)  # its last messages tell connected clients; their senders then close
            await self._disconnect(live, state)
        last = (live.counters.to_json(), live.state_json()) if live is not None else None
        return await self.store.finish(sid, state, actor, reason, last)

    # ---- enrollments changing under live sessions (face verification)

    def on_enrollment_changed(self, candidate_id: str) -> None:
        """A candidate's enrollment changed through this analyzer (the composition root hands IdentityStore's
        enrollment_listeners on to here, on the event loop): their live sessions read it again now."""
        for live in list(self.live.values()):
            if live.candidate_id == candidate_id:
                live.enrollment_changed("notified")

    async def watch_enrollments(self) -> None:
        """Every enrollment_recheck_s: one query (in a thread) for the enrollment ids of the candidates that live
        sessions verify; a session whose id changed (a re-enrollment or deletion through another analyzer
        sharing the database) reads it again. 0 turns it off."""
        last = time.monotonic()
        while True:
            every = self.settings.enrollment_recheck_s
            await asyncio.sleep(min(1.0, every) if every > 0 else 1.0)  # a changed setting applies within 1 s
            if every <= 0 or self.identity is None or time.monotonic() - last < every:
                continue
            last = time.monotonic()
            verifying = [s for s in self.live.values() if s.engine.verifier.wanted and s.state == "active"]
            if not verifying:
                continue
            try:
                ids = await asyncio.to_thread(self.identity.enrollment_ids, sorted({s.candidate_id for s in verifying}))
            except Exception:
                log.exception("enrollment re-check failed")
                continue
            for live in verifying:
                if not live.enrollment_known or ids.get(live.candidate_id) != live.enrollment_id:
                    live.enrollment_changed("recheck")

    @staticmethod
    async def _disconnect(live: LiveSession, state: str) -> None:
        """Waits for the client's sender to close after session_ended, else closes the connection."""
        for _ in range(50):
            if live.connection is None:
                break
            await asyncio.sleep(0.02)
        if live.connection is not None:
            with contextlib.suppress(Exception):
                await live.connection.close(code=int(CloseCode.SESSION_ENDED), reason=f"session {state}")

    @staticmethod
    async def _silence(live: LiveSession) -> None:
        """Stops a session's work with no further append: the emitter's lock is taken before anything is
        cancelled, so an append under way commits first (a cancelled one's thread would commit later); the work
        waiting for the lock is cancelled."""
        async with live.emitter.lock:
            live.stop()
            for task in live.workers.background():
                task.cancel()

    async def drop_ended_elsewhere(self) -> list[str]:
        """Stops the live sessions here whose row another node ended, restarted or deleted (several nodes on one
        database: a privacy deletion on any node ends the candidate's sessions on all of them). No end alerts:
        the other node ended their incidents, and a deleted candidate gets none; what this node wrote for a
        deleted session since the deletion (outbox alerts, identity audit records of its face checks) is removed."""
        snapshot = dict(self.live)
        why = await self.store.ended_elsewhere({sid: s.sitting for sid, s in snapshot.items()})
        dropped = [sid for sid in why if self.live.get(sid) is snapshot[sid]]  # not ended / restarted here meanwhile
        for sid in dropped:
            live = self.live.pop(sid)
            await self._silence(live)
            live.state = "ended"
            live.barrier.close()
            reason = "privacy_deletion" if why[sid] == "deleted" else why[sid]
            live.broadcast(SessionEndedMessage(reason=reason))
            await self._disconnect(live, "ended")
            await self._silence(live)  # what the last frames before the disconnect started
            await live.flushed()  # and the identity audit records it made
            log.info("session %s: stopped here, %s on another node", sid, why[sid])
        self.metrics.active_sessions.set(len(self.live))
        if dropped:  # asked now, after the last write: a row ended first may have been deleted since
            gone = await self.store.ended_elsewhere({sid: snapshot[sid].sitting for sid in dropped})
            if deleted := [sid for sid, w in gone.items() if w == "deleted"]:
                await self.sink.delete_sessions(deleted)
                if self.identity is not None:
                    for sid in deleted:
                        cid = snapshot[sid].candidate_id
                        await asyncio.to_thread(self.identity.erase_after_deletion, cid, [sid])
        return dropped

    async def _expire(self, sid: str) -> None:
        with contextlib.suppress(SessionNotFound):
            await self.end(sid, "system:expiry", reason="expired", state="expired")

    async def save_state(self) -> None:
        """Saves counters and rule state of every live session (a restart continues from here)."""
        await self.store.save([s.writer() for s in self.live.values()])

    async def housekeeping(self) -> None:
        """Saves live sessions' state every state_flush_s; every expiry_sweep_s ends sessions past their TTL
        (live or only in the database) and prunes ended ones. (Data retention of alerts, audit and outbox is
        wired beside the app by the composition root: livekit_proctor.wiring.)"""
        s = self.settings
        last_save = last_sweep = time.monotonic()
        while True:
            await asyncio.sleep(min(s.state_flush_s, s.expiry_sweep_s))
            try:
                if time.monotonic() - last_save >= s.state_flush_s:
                    last_save = time.monotonic()
                    await self.save_state()
                if time.monotonic() - last_sweep < s.expiry_sweep_s:
                    continue
                last_sweep = time.monotonic()
                now = utcnow()
                await self.drop_ended_elsewhere()
                expired = {sid for sid, live in self.live.items() if live.expires_at <= now}
                expired.update(await self.store.expired_ids())
                for sid in expired:
                    await self._expire(sid)
                await self.store.prune_ended(s.ended_session_retention_s)
                self.metrics.expiry_sweeps.inc()  # a sweep that began after a session's expiry has ended it
            except Exception:
                log.exception("housekeeping failed")

    async def shutdown(self) -> None:
        """Stops every session's workers and saves its state; open incidents stay open for the restart."""
        for s in list(self.live.values()):
            s.stop()
        for s in list(self.live.values()):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await s.flushed()  # an append in progress finishes first
        await self.save_state()

    # ---- views

    def state_of(self, row: SessionRow) -> SessionState:
        live = self.live.get(row.id)
        counters = live.counters.public() if live else Counters.from_json(row.counters or {}).public()
        saved = row.rule_state or {}
        return SessionState(
            exam_session_id=row.id,
            candidate_id=row.candidate_id,
            exam_id=row.exam_id,
            frontend_instance_id=row.frontend_instance_id,
            state=row.state,  # type: ignore[arg-type]
            created_at=aware(row.created_at).isoformat(),
            ended_at=aware(row.ended_at).isoformat() if row.ended_at else None,
            expires_at=aware(row.expires_at).isoformat(),
            connected=bool(live and live.connection is not None),
            counters=counters,
            open_incidents=live.engine.open_incidents()
            if live
            else ([] if row.state != "active" else saved.get("open", [])),
            risk=live.engine.risk_summary() if live else {},
            last_verification_at=aware(row.last_verification_at).isoformat() if row.last_verification_at else None,
            last_face_verification=_face_check(live.last_face_verification() if live else _saved_check(saved)),
            policy=EffectivePolicy.model_validate(row.policy),
            metadata=row.metadata_ or {},
        )

    async def list_rows(self, state: str | None = None, limit: int = 100) -> list[SessionRow]:
        return await self.store.recent(state, limit)
