"""The identity data of candidates: enrollments, their embeddings (encrypted at rest), the identity audit log.

What the enrollment, verification and privacy routes call; synchronous like the rest of livekit_proctor.db
(async callers use asyncio.to_thread). Vectors are float32 and encrypted with the key ring's current key
(livekit_proctor.crypto), bound to their row id; nothing here logs or returns a vector unless asked.

- replace_enrollment: a candidate has one enrollment; enrolling again replaces it (embeddings and template)
  and records "re-enroll" in the identity audit log.
- delete_candidate: everything held about a candidate in the database (see DeleteReport); the audit log keeps
  only the deletion record. The outbox (SQL table or Redis Stream: AlertSink.delete_sessions), files and
  in-memory state (alerts.jsonl lines, frame buffers) are the caller's: the privacy route's.
- export_candidate: everything held, as JSON-ready dicts. Embedding vectors are left out unless asked for
  (include_vectors=True): they are derived biometric data nobody can read, and an export file is copied around;
  their metadata (ids, quality, box, pose, selection, key id) is always in.
- purge_identity: retention (identity_retention_s after the candidate's last session), from `proctor purge`.
- rotate: re-encrypts every vector and template with the current key.
- enrollment_listeners: told the candidate id after each committed change of an enrollment here (enroll,
  delete, privacy deletion), so that live sessions of this process reload it at once; other processes
  sharing the database, and retention (purge_identity tells no one), are seen through enrollment_ids (the
  sessions' cheap re-check).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import numpy as np
from sqlalchemy import delete, func, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from livekit_proctor.crypto import KeyRing
from livekit_proctor.db import (
    AuditRow,
    DeadLetterRow,
    EmbeddingRow,
    EnrollmentRow,
    IdentityAuditRow,
    SessionRow,
    utcnow,
)

ACTIONS = (
    "enroll",
    "re-enroll",
    "verify",
    "delete",
    "export",
    # A live session's continuous face checks (the analyzer, role "system"; docs/identity.md):
    "first-check",  # the session's first conclusive check
    "mismatch-started",  # a FACE_MISMATCH incident started / ended
    "mismatch-ended",
    "reload",  # the session reloaded the candidate's enrollment (re-enrolled or deleted meanwhile)
    "session-summary",  # at the session's end: checks, matches, mismatches, skipped for quality
)  # at most 16 characters (IdentityAuditRow.action)

log = logging.getLogger(__name__)


class Actor(Protocol):
    """Who acts: an API key's id and role (the analyzer's Principal has both)."""

    @property
    def role(self) -> str: ...
    @property
    def key_id(self) -> str: ...


@dataclass(frozen=True)
class SystemActor:
    role: str = "system"
    key_id: str = "retention"


@dataclass
class EmbeddingIn:
    """One enrollment image's embedding and quality figures, as the enrollment route measured them."""

    vector: Sequence[float] | np.ndarray
    quality_score: float
    face_bbox: list[float]
    pose_angles: dict[str, float]
    sharpness_score: float
    selected: bool
    embedding_id: str | None = None  # default: a new uuid4


@dataclass
class StoredEmbedding:
    embedding_id: str
    position: int
    quality_score: float
    face_bbox: list[float]
    pose_angles: dict[str, float]
    sharpness_score: float
    selected: bool
    key_id: str
    created_at: datetime
    vector: np.ndarray | None  # float32; None where not decrypted

    def summary(self) -> dict[str, Any]:
        return {
            "embedding_id": self.embedding_id,
            "position": self.position,
            "quality_score": self.quality_score,
            "face_bbox": self.face_bbox,
            "pose_angles": self.pose_angles,
            "sharpness_score": self.sharpness_score,
            "selected": self.selected,
            "key_id": self.key_id,
            "created_at": self.created_at.isoformat(),
        }


@dataclass
class Enrollment:
    enrollment_id: str
    candidate_id: str
    exam_id: str | None
    created_at: datetime
    replaced_at: datetime | None
    last_session_at: datetime | None
    model: str
    metadata: dict[str, Any]
    template: np.ndarray | None  # the mean of the selected embeddings (L2-normalised), float32
    embeddings: list[StoredEmbedding]

    @property
    def selected(self) -> list[StoredEmbedding]:
        return [e for e in self.embeddings if e.selected]


@dataclass
class DeleteReport:
    enrollments: int = 0
    embeddings: int = 0
    identity_audit: int = 0
    sessions: int = 0
    session_ids: list[str] = field(default_factory=list)  # for the caller's outbox, files and caches
    dead_letters: int = 0
    audit: int = 0

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, int)}


def _lock_candidate(db: Session, candidate_id: str) -> None:
    """Serialises the writers of one candidate's identity data until the transaction ends."""
    conn = db.connection()
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:c, 7))"), {"c": candidate_id})
    elif conn.dialect.name == "sqlite":
        # pysqlite would begin the transaction only at the first write, after our reads: take the write lock now.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _aad(kind: str, row_id: str) -> bytes:
    return f"{kind}:{row_id}".encode()


def _vec(v: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(v, dtype="<f4").reshape(-1)
    if a.size == 0 or not np.all(np.isfinite(a)):
        raise ValueError("an embedding must be a non-empty vector of finite numbers")
    return a


def mean_template(vectors: Sequence[np.ndarray]) -> np.ndarray | None:
    """The L2-normalised mean of L2-normalised vectors (None for none)."""
    if not vectors:
        return None
    m = np.mean([v / (np.linalg.norm(v) or 1.0) for v in vectors], axis=0)
    return (m / (np.linalg.norm(m) or 1.0)).astype("<f4")


def _iso(t: datetime | None) -> str | None:
    if t is None:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).isoformat()


def _aware(t: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes for DateTime(timezone=True) columns: they were written in UTC.
    if t is None or t.tzinfo is not None:
        return t
    return t.replace(tzinfo=UTC)


class IdentityStore:
    def __init__(self, sm: sessionmaker, keyring: KeyRing) -> None:
        self.sm = sm
        self.keyring = keyring
        # Called with the candidate id after a committed change of their enrollment, from the calling thread
        # (the composition root hands them on to the sessions' event loop). A failing listener is logged.
        self.enrollment_listeners: list[Callable[[str], None]] = []

    def _changed(self, candidate_id: str) -> None:
        for fn in list(self.enrollment_listeners):
            try:
                fn(candidate_id)
            except Exception:
                log.exception("enrollment listener failed for a change of candidate %s", candidate_id)

    # --- audit

    @staticmethod
    def _audit(db: Session, action: str, candidate_id: str, who: Actor, result: dict[str, Any]) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown identity audit action {action!r}")
        db.add(
            IdentityAuditRow(
                action=action, candidate_id=candidate_id, key_id=who.key_id, role=who.role, result=result, at=utcnow()
            )
        )

    def record(self, action: str, candidate_id: str, who: Actor, result: dict[str, Any]) -> None:
        """An audit entry for an action whose data lives elsewhere (verify: match, score, threshold)."""
        with self.sm.begin() as db:
            self._audit(db, action, candidate_id, who, result)

    def audit_entries(self, candidate_id: str) -> list[dict[str, Any]]:
        with self.sm() as db:
            rows = db.scalars(
                select(IdentityAuditRow)
                .where(IdentityAuditRow.candidate_id == candidate_id)
                .order_by(IdentityAuditRow.id)
            ).all()
            return [
                {
                    "id": r.id,
                    "at": _iso(r.at),
                    "action": r.action,
                    "candidate_id": r.candidate_id,
                    "key_id": r.key_id,
                    "role": r.role,
                    "result": r.result,
                }
                for r in rows
            ]

    # --- enrollment

    def replace_enrollment(
        self,
        candidate_id: str,
        exam_id: str | None,
        embeddings: Sequence[EmbeddingIn],
        who: Actor,
        *,
        metadata: dict[str, Any] | None = None,
        model: str = "",
        template: Sequence[float] | np.ndarray | None = None,
    ) -> Enrollment:
        """Stores a candidate's enrollment, replacing any earlier one; template: default the selected mean."""
        vectors = [_vec(e.vector) for e in embeddings]
        if len({v.size for v in vectors}) > 1:
            raise ValueError("embeddings of one enrollment must have one dimension")
        tmpl = (
            _vec(template)
            if template is not None
            else mean_template([v for v, e in zip(vectors, embeddings, strict=True) if e.selected])
        )
        now = utcnow()
        enrollment_id = str(uuid.uuid4())
        with self.sm.begin() as db:
            _lock_candidate(db, candidate_id)  # two enrollments of one candidate at once: one after the other
            old = db.scalar(select(EnrollmentRow).where(EnrollmentRow.candidate_id == candidate_id).with_for_update())
            created, last_session = now, None
            if old is not None:
                created, last_session = _aware(old.created_at) or now, _aware(old.last_session_at)
                db.execute(delete(EmbeddingRow).where(EmbeddingRow.enrollment_id == old.enrollment_id))
                db.delete(old)
                db.flush()  # the unique candidate_id is free before the new row goes in
            row = EnrollmentRow(
                enrollment_id=enrollment_id,
                candidate_id=candidate_id,
                exam_id=exam_id,
                created_at=created,
                replaced_at=now if old is not None else None,
                last_session_at=last_session,
                model=model,
                metadata_=metadata or {},
                template=None
                if tmpl is None
                else self.keyring.encrypt(tmpl.tobytes(), _aad("template", enrollment_id)),
            )
            db.add(row)
            db.flush()
            for i, (e, v) in enumerate(zip(embeddings, vectors, strict=True)):
                eid = e.embedding_id or str(uuid.uuid4())
                db.add(
                    EmbeddingRow(
                        embedding_id=eid,
                        enrollment_id=enrollment_id,
                        candidate_id=candidate_id,
                        position=i,
                        quality_score=float(e.quality_score),
                        face_bbox=[float(x) for x in e.face_bbox],
                        pose_angles={k: float(x) for k, x in e.pose_angles.items()},
                        sharpness_score=float(e.sharpness_score),
                        selected=bool(e.selected),
                        vector=self.keyring.encrypt(v.tobytes(), _aad("embedding", eid)),
                        created_at=now,
                    )
                )
            result = {
                "enrollment_id": enrollment_id,
                "exam_id": exam_id,
                "embeddings": len(vectors),
                "selected": sum(1 for e in embeddings if e.selected),
                "template_stored": tmpl is not None,
            }
            if old is not None:
                result["replaced_enrollment_id"] = old.enrollment_id
            self._audit(db, "re-enroll" if old is not None else "enroll", candidate_id, who, result)
        self._changed(candidate_id)
        got = self.get_enrollment(candidate_id)
        assert got is not None
        return got

    def get_enrollment(self, candidate_id: str, *, decrypt: bool = True) -> Enrollment | None:
        """The candidate's enrollment with its vectors decrypted (DecryptError if one fails), or None."""
        with self.sm() as db:
            row = db.scalar(select(EnrollmentRow).where(EnrollmentRow.candidate_id == candidate_id))
            if row is None:
                return None
            embs = db.scalars(
                select(EmbeddingRow)
                .where(EmbeddingRow.enrollment_id == row.enrollment_id)
                .order_by(EmbeddingRow.position)
            ).all()
            template = None
            if row.template is not None and decrypt:
                raw = self.keyring.decrypt(row.template, _aad("template", row.enrollment_id))
                template = np.frombuffer(raw, dtype="<f4").copy()
            return Enrollment(
                enrollment_id=row.enrollment_id,
                candidate_id=row.candidate_id,
                exam_id=row.exam_id,
                created_at=_aware(row.created_at) or utcnow(),
                replaced_at=_aware(row.replaced_at),
                last_session_at=_aware(row.last_session_at),
                model=row.model,
                metadata=dict(row.metadata_ or {}),
                template=template,
                embeddings=[
                    StoredEmbedding(
                        embedding_id=e.embedding_id,
                        position=e.position,
                        quality_score=e.quality_score,
                        face_bbox=list(e.face_bbox),
                        pose_angles=dict(e.pose_angles),
                        sharpness_score=e.sharpness_score,
                        selected=e.selected,
                        key_id=KeyRing.key_id_of(e.vector),
                        created_at=_aware(e.created_at) or utcnow(),
                        vector=np.frombuffer(
                            self.keyring.decrypt(e.vector, _aad("embedding", e.embedding_id)), dtype="<f4"
                        ).copy()
                        if decrypt
                        else None,
                    )
                    for e in embs
                ],
            )

    def enrollment_ids(self, candidate_ids: Sequence[str]) -> dict[str, str]:
        """candidate id -> their enrollment's id, for those enrolled: one indexed query, no decryption (the
        sessions' re-check of whether an enrollment changed under them)."""
        if not candidate_ids:
            return {}
        with self.sm() as db:
            rows = db.execute(
                select(EnrollmentRow.candidate_id, EnrollmentRow.enrollment_id).where(
                    EnrollmentRow.candidate_id.in_(list(candidate_ids))
                )
            )
            return {c: e for c, e in rows.tuples()}

    def touch_session(self, candidate_id: str, at: datetime | None = None) -> None:
        """Notes a session of the candidate (identity retention counts from the latest one)."""
        with self.sm.begin() as db:
            db.execute(
                update(EnrollmentRow)
                .where(EnrollmentRow.candidate_id == candidate_id)
                .values(last_session_at=at or utcnow())
            )

    def delete_enrollment(self, candidate_id: str, who: Actor) -> tuple[str, int] | None:
        """Deletes the candidate's enrollment (embeddings, template), leaving a "delete" audit record;
        (enrollment id, embeddings deleted), or None when there is none. The rest: delete_candidate."""
        with self.sm.begin() as db:
            _lock_candidate(db, candidate_id)
            row = db.scalar(select(EnrollmentRow).where(EnrollmentRow.candidate_id == candidate_id).with_for_update())
            if row is None:
                return None
            enrollment_id = row.enrollment_id
            n = db.execute(delete(EmbeddingRow).where(EmbeddingRow.enrollment_id == enrollment_id)).rowcount
            db.delete(row)
            self._audit(db, "delete", candidate_id, who, {"enrollment_id": enrollment_id, "embeddings": n})
        self._changed(candidate_id)
        return enrollment_id, n

    # --- privacy

    @staticmethod
    def _session_ids(db: Session, candidate_id: str) -> list[str]:
        ids = set(db.scalars(select(SessionRow.id).where(SessionRow.candidate_id == candidate_id)))
        # Sessions whose rows are gone (ended_session_retention_s) still have their start in the audit log.
        for target, detail in db.execute(
            select(AuditRow.target, AuditRow.detail).where(AuditRow.action == "session.start")
        ):
            if isinstance(detail, dict) and detail.get("candidate_id") == candidate_id:
                ids.add(target)
        return sorted(ids)

    def session_ids(self, candidate_id: str) -> list[str]:
        """The candidate's sessions: rows still held, and sessions whose start the audit log still records."""
        with self.sm() as db:
            return self._session_ids(db, candidate_id)

    def delete_candidate(
        self, candidate_id: str, who: Actor, also_deleted: dict[str, int] | None = None
    ) -> DeleteReport:
        """Deletes everything the database holds about a candidate; returns what went (and the session ids).
        also_deleted: what the caller removed elsewhere first (the outbox), for the deletion's audit record."""
        rep = DeleteReport()
        with self.sm.begin() as db:
            _lock_candidate(db, candidate_id)
            sids = self._session_ids(db, candidate_id)
            rep.session_ids = sids
            rep.embeddings = db.execute(delete(EmbeddingRow).where(EmbeddingRow.candidate_id == candidate_id)).rowcount
            rep.enrollments = db.execute(
                delete(EnrollmentRow).where(EnrollmentRow.candidate_id == candidate_id)
            ).rowcount
            rep.identity_audit = db.execute(
                delete(IdentityAuditRow).where(IdentityAuditRow.candidate_id == candidate_id)
            ).rowcount
            if sids:
                rep.sessions = db.execute(delete(SessionRow).where(SessionRow.id.in_(sids))).rowcount
                rep.dead_letters = db.execute(
                    delete(DeadLetterRow).where(DeadLetterRow.exam_session_id.in_(sids))
                ).rowcount
            rep.audit = db.execute(
                delete(AuditRow).where(or_(AuditRow.target == candidate_id, AuditRow.target.in_(sids)))
            ).rowcount
            self._audit(db, "delete", candidate_id, who, {"deleted": (also_deleted or {}) | rep.counts()})
        if rep.enrollments:
            self._changed(candidate_id)
        return rep

    def erase_after_deletion(self, candidate_id: str, session_ids: Sequence[str]) -> int:
        """Removes the identity audit records these sessions made about the candidate after the candidate's latest
        deletion (another analyzer node served them until its sweep saw their rows gone): the deletion record
        stays the only one. Returns how many went."""
        sids = set(session_ids)
        with self.sm.begin() as db:
            _lock_candidate(db, candidate_id)
            last = db.scalar(
                select(func.max(IdentityAuditRow.id)).where(
                    IdentityAuditRow.candidate_id == candidate_id, IdentityAuditRow.action == "delete"
                )
            )
            if last is None:
                return 0
            later = db.scalars(
                select(IdentityAuditRow).where(
                    IdentityAuditRow.candidate_id == candidate_id, IdentityAuditRow.id > last
                )
            ).all()
            gone = [r for r in later if isinstance(r.result, dict) and r.result.get("exam_session_id") in sids]
            for r in gone:
                db.delete(r)
            return len(gone)

    def export_candidate(
        self,
        candidate_id: str,
        who: Actor,
        *,
        alerts: list[dict[str, Any]],
        include_vectors: bool = False,
    ) -> dict[str, Any]:
        """Everything held about the candidate as JSON-ready dicts (see the module docstring on vectors).
        `alerts`: the candidate's alerts as the configured outbox holds them (AlertSink.export_sessions of
        session_ids(), read by the caller: the outbox may be a SQL table or a Redis Stream)."""
        enr = self.get_enrollment(candidate_id, decrypt=include_vectors)
        out: dict[str, Any] = {"candidate_id": candidate_id, "exported_at": _iso(utcnow()), "enrollment": None}
        if enr is not None:
            out["enrollment"] = {
                "enrollment_id": enr.enrollment_id,
                "exam_id": enr.exam_id,
                "created_at": _iso(enr.created_at),
                "replaced_at": _iso(enr.replaced_at),
                "last_session_at": _iso(enr.last_session_at),
                "model": enr.model,
                "metadata": enr.metadata,
                "vectors_included": include_vectors,
                "embeddings": [
                    e.summary() | ({"vector": e.vector.tolist()} if include_vectors and e.vector is not None else {})
                    for e in enr.embeddings
                ],
            }
            if include_vectors and enr.template is not None:
                out["enrollment"]["template"] = enr.template.tolist()
        out["identity_audit"] = self.audit_entries(candidate_id)
        with self.sm() as db:
            sids = self._session_ids(db, candidate_id)
            out["sessions"] = [
                {
                    "id": s.id,
                    "exam_id": s.exam_id,
                    "state": s.state,
                    "policy": s.policy,
                    "metadata": s.metadata_,
                    "counters": s.counters,
                    "created_at": _iso(s.created_at),
                    "expires_at": _iso(s.expires_at),
                    "ended_at": _iso(s.ended_at),
                    "last_verification_at": _iso(s.last_verification_at),
                }
                for s in db.scalars(select(SessionRow).where(SessionRow.id.in_(sids)).order_by(SessionRow.created_at))
            ]
            out["session_audit"] = [
                {"at": _iso(a.at), "actor": a.actor, "action": a.action, "target": a.target, "detail": a.detail}
                for a in db.scalars(
                    select(AuditRow)
                    .where(or_(AuditRow.target == candidate_id, AuditRow.target.in_(sids)))
                    .order_by(AuditRow.id)
                )
            ]
            out["alerts"] = alerts
            out["dead_letters"] = [
                {"id": d.id, "lane": d.lane, "event_id": d.event_id, "alert": _json(d.payload)}
                for d in db.scalars(select(DeadLetterRow).where(DeadLetterRow.exam_session_id.in_(sids)))
            ]

        self.record(
            "export",
            candidate_id,
            who,
            {
                "enrollment": enr is not None,
                "embeddings": len(enr.embeddings) if enr else 0,
                "vectors_included": include_vectors,
                "sessions": len(out["sessions"]),
                "alerts": len(out["alerts"]),
            },
        )
        return out


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


# --- retention and rotation


def purge_identity(sm: sessionmaker, retention_s: int, *, now: datetime | None = None, dry_run: bool = False) -> int:
    """Deletes the enrollments whose candidate's last session (else their enrollment) is past retention_s.

    The last session is the latest of the enrollment's last_session_at (touch_session), the candidate's
    sessions still in the database and their session.start audit records. Each deletion leaves a "delete"
    audit record by the system ("retention"). Returns how many enrollments went (or, dry_run, would go).
    Idempotent; safe to run concurrently with the server.
    """
    if retention_s <= 0:
        return 0
    now = now or utcnow()
    cutoff = now - timedelta(seconds=retention_s)
    due: list[str] = []
    with sm() as db:
        latest = dict(
            db.execute(
                select(
                    SessionRow.candidate_id, func.max(func.coalesce(SessionRow.ended_at, SessionRow.created_at))
                ).group_by(SessionRow.candidate_id)
            )
            .tuples()
            .all()
        )
        # Session rows go an hour after the session ends; their session.start audit records stay longer.
        for at, detail in db.execute(select(AuditRow.at, AuditRow.detail).where(AuditRow.action == "session.start")):
            cid = detail.get("candidate_id") if isinstance(detail, dict) else None
            started, known = _aware(at), _aware(latest.get(cid))
            if cid and started and (known is None or known < started):
                latest[cid] = started
        for cid, created, replaced, last in db.execute(
            select(
                EnrollmentRow.candidate_id,
                EnrollmentRow.created_at,
                EnrollmentRow.replaced_at,
                EnrollmentRow.last_session_at,
            )
        ):
            times = [t for t in (_aware(created), _aware(replaced), _aware(last), _aware(latest.get(cid))) if t]
            if max(times) < cutoff:
                due.append(cid)
    if dry_run:
        return len(due)
    n = 0
    for cid in due:
        with sm.begin() as db:
            row = db.scalar(select(EnrollmentRow).where(EnrollmentRow.candidate_id == cid).with_for_update())
            if row is None:  # another purge got there first
                continue
            embs = db.execute(delete(EmbeddingRow).where(EmbeddingRow.enrollment_id == row.enrollment_id)).rowcount
            db.delete(row)
            IdentityStore._audit(
                db,
                "delete",
                cid,
                SystemActor(),
                {
                    "reason": "retention",
                    "enrollment_id": row.enrollment_id,
                    "embeddings": embs,
                    "retention_s": retention_s,
                },
            )
            n += 1
    return n


@dataclass
class RotateReport:
    rows: int = 0  # ciphertexts re-encrypted
    current: str = ""
    before: dict[str, int] = field(default_factory=dict)  # key id -> ciphertexts under it, before

    def line(self) -> str:
        was = ", ".join(f"{k}: {v}" for k, v in sorted(self.before.items())) or "none"
        return (
            f"re-encrypted {self.rows} ciphertexts with key {self.current} (before: {was}); "
            f"keys other than {self.current} are no longer needed"
        )


def rotate(sm: sessionmaker, keyring: KeyRing, *, batch: int = 200) -> RotateReport:
    """Re-encrypts every embedding and template with the key ring's current key (idempotent, resumable)."""
    rep = RotateReport(current=keyring.current)

    def current(blob: bytes, kind: str, row_id: str) -> bytes:
        """The ciphertext under the current key (counted by the key it was under)."""
        kid = KeyRing.key_id_of(blob)
        rep.before[kid] = rep.before.get(kid, 0) + 1
        if kid == keyring.current:
            return blob
        rep.rows += 1
        aad = _aad(kind, row_id)
        return keyring.encrypt(keyring.decrypt(blob, aad), aad)

    last = ""
    while True:  # embeddings, a batch per transaction (by primary key)
        with sm.begin() as db:
            rows = db.scalars(
                select(EmbeddingRow)
                .where(EmbeddingRow.embedding_id > last)
                .order_by(EmbeddingRow.embedding_id)
                .limit(batch)
                .with_for_update()
            ).all()
            for r in rows:
                r.vector = current(r.vector, "embedding", r.embedding_id)
        if len(rows) < batch:
            break
        last = rows[-1].embedding_id
    with sm.begin() as db:
        for e in db.scalars(select(EnrollmentRow).where(EnrollmentRow.template.is_not(None)).with_for_update()):
            assert e.template is not None
            e.template = current(e.template, "template", e.enrollment_id)
    return rep
