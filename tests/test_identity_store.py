"""The identity store: enrollments with encrypted embeddings, key rotation, privacy delete / export, retention."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from livekit_proctor import crypto
from livekit_proctor.crypto import DecryptError, KeyRing, load_keyring
from livekit_proctor.db import (
    AuditRow,
    CursorRow,
    DeadLetterRow,
    EmbeddingRow,
    EnrollmentRow,
    IdentityAuditRow,
    OutboxRow,
    SessionRow,
    make_engine,
    make_sessionmaker,
)
from livekit_proctor.dispatcher.outbox import SqlOutbox
from livekit_proctor.dispatcher.retention import purge
from livekit_proctor.identity_store import DeleteReport, EmbeddingIn, IdentityStore, SystemActor, rotate
from livekit_proctor.settings import Settings
from tests.test_postgres import pg_url  # noqa: F401  (the fixture: one PostgreSQL server for this module)

K1, K2 = os.urandom(32), os.urandom(32)
DIM = 1024


@dataclass(frozen=True)
class Who:
    role: str = "admin"
    key_id: str = "ab12cd34"


ADMIN = Who()


def vectors(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(DIM).astype(np.float32) for _ in range(n)]


def images(vs: list[np.ndarray], selected: int = 3) -> list[EmbeddingIn]:
    return [EmbeddingIn(vector=v, quality_score=0.9 - i / 10, face_bbox=[10.0, 20.0, 120.0, 130.0],
                        pose_angles={"yaw": 3.0, "pitch": -2.0, "roll": 1.0}, sharpness_score=150.0 + i,
                        selected=i < selected) for i, v in enumerate(vs)]  # fmt: skip


@pytest.fixture(params=["sqlite", "postgresql"])
def sm(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker]:
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'proctor.db'}")
        yield make_sessionmaker(engine)
        engine.dispose()
        return
    server = request.getfixturevalue("pg_url")
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine = make_engine(make_url(server).set(database=name).render_as_string(hide_password=False))
    yield make_sessionmaker(engine)
    engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


def test_enrollment_round_trip_keeps_vectors_encrypted(sm: sessionmaker) -> None:
    store = IdentityStore(sm, KeyRing.of(K1))
    vs = vectors(5, seed=1)
    enr = store.replace_enrollment("cand-1", "exam-1", images(vs), ADMIN, metadata={"source": "webcam"}, model="m")
    got = store.get_enrollment("cand-1")
    assert got is not None and got.enrollment_id == enr.enrollment_id and got.exam_id == "exam-1"
    assert [e.position for e in got.embeddings] == [0, 1, 2, 3, 4]
    assert [e.selected for e in got.embeddings] == [True, True, True, False, False]
    for e, v in zip(got.embeddings, vs, strict=True):
        assert e.vector is not None and np.array_equal(e.vector, v) and e.key_id == crypto.key_id(K1)
    unit = [v / np.linalg.norm(v) for v in vs[:3]]
    want = np.mean(unit, axis=0)
    assert got.template is not None and np.allclose(got.template, want / np.linalg.norm(want), atol=1e-6)
    assert (got.metadata, got.model, got.replaced_at) == ({"source": "webcam"}, "m", None)
    with sm() as db:  # what an attacker with the database sees: no plaintext vector
        for row in db.scalars(select(EmbeddingRow)):
            assert row.vector.startswith(b"pe1") and vs[row.position].tobytes() not in row.vector
    assert [(a["action"], a["role"], a["key_id"]) for a in store.audit_entries("cand-1")] == [
        ("enroll", "admin", "ab12cd34")
    ]
    assert "vector" not in json.dumps(store.audit_entries("cand-1"))
    assert store.get_enrollment("nobody") is None


def test_re_enrollment_replaces_the_template_and_is_audited(sm: sessionmaker) -> None:
    store = IdentityStore(sm, KeyRing.of(K1))
    first = store.replace_enrollment("cand-1", "exam-1", images(vectors(3, seed=1)), ADMIN)
    new = vectors(4, seed=2)
    second = store.replace_enrollment("cand-1", "exam-2", images(new, selected=2), Who("system", "ffff0000"))
    assert second.enrollment_id != first.enrollment_id
    assert second.created_at == first.created_at and second.replaced_at is not None
    assert second.exam_id == "exam-2" and len(second.embeddings) == 4
    assert all(
        e.vector is not None and np.array_equal(e.vector, v) for e, v in zip(second.embeddings, new, strict=True)
    )
    with sm() as db:
        assert db.scalar(select(EnrollmentRow).where(EnrollmentRow.enrollment_id == first.enrollment_id)) is None
        assert len(db.scalars(select(EmbeddingRow)).all()) == 4
    log = store.audit_entries("cand-1")
    assert [a["action"] for a in log] == ["enroll", "re-enroll"]
    assert log[1]["result"]["replaced_enrollment_id"] == first.enrollment_id and log[1]["role"] == "system"


def test_rotation_old_rows_stay_readable_then_re_encrypt_retires_the_old_key(sm: sessionmaker) -> None:
    IdentityStore(sm, KeyRing.of(K1)).replace_enrollment("cand-1", None, images(vectors(3, seed=1)), ADMIN)
    ring2 = KeyRing.of(K2, K1)  # K2 current, K1 still readable
    store2 = IdentityStore(sm, ring2)
    store2.replace_enrollment("cand-2", None, images(vectors(3, seed=2)), ADMIN)  # written under K2
    old = store2.get_enrollment("cand-1")
    assert old is not None and {e.key_id for e in old.embeddings} == {crypto.key_id(K1)}
    with pytest.raises(DecryptError, match="not configured"):
        IdentityStore(sm, KeyRing.of(K2)).get_enrollment("cand-1")  # K1 is still needed here
    rep = rotate(sm, ring2)
    assert rep.rows == 4 and rep.before == {crypto.key_id(K1): 4, crypto.key_id(K2): 4}  # 3 vectors + template each
    only_k2 = IdentityStore(sm, KeyRing.of(K2))
    for cid, seed in (("cand-1", 1), ("cand-2", 2)):
        got = only_k2.get_enrollment(cid)
        assert got is not None and got.template is not None
        assert all(
            e.vector is not None and np.array_equal(e.vector, v)
            for e, v in zip(got.embeddings, vectors(3, seed), strict=True)
        )
        assert {e.key_id for e in got.embeddings} == {crypto.key_id(K2)}
    assert rotate(sm, ring2).rows == 0  # idempotent


def test_a_tampered_or_misplaced_ciphertext_fails_loudly(sm: sessionmaker) -> None:
    store = IdentityStore(sm, KeyRing.of(K1))
    store.replace_enrollment("cand-1", None, images(vectors(2, seed=1)), ADMIN)
    with sm.begin() as db:
        a, b = db.scalars(select(EmbeddingRow).order_by(EmbeddingRow.position)).all()
        flipped = bytearray(a.vector)
        flipped[40] ^= 0x01
        a.vector = bytes(flipped)
    with pytest.raises(DecryptError, match="failed authentication"):
        store.get_enrollment("cand-1")
    with sm.begin() as db:
        a, b = db.scalars(select(EmbeddingRow).order_by(EmbeddingRow.position)).all()
        a.vector = b.vector  # an intact ciphertext moved to another row
    with pytest.raises(DecryptError, match="failed authentication"):
        store.get_enrollment("cand-1")


def test_the_key_file_is_created_private_once_and_the_key_setting_is_secret(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path / "data")
    ring = load_keyring(s)
    path = tmp_path / "data" / "embedding-keys"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_keyring(s) == ring  # the same key on the next start
    key = base64.b64encode(K1).decode()
    s2 = Settings(data_dir=tmp_path / "data", embedding_key=key, embedding_old_keys=base64.b64encode(K2).decode())
    ring2 = load_keyring(s2)
    assert ring2.current == crypto.key_id(K1)
    assert set(ring2.keys) == {crypto.key_id(K1), crypto.key_id(K2), ring.current}
    shown = s2.redacted()
    assert shown["embedding_key"] == "***" and shown["embedding_old_keys"] == "***" and key not in json.dumps(shown)
    with pytest.raises(ValueError, match="32 bytes"):
        load_keyring(Settings(data_dir=tmp_path, embedding_key=base64.b64encode(b"short").decode()))


def test_cli_rotate_embeddings_with_a_new_key_file_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    s = Settings(data_dir=data)
    engine = make_engine(s.resolved_database_url())
    sm = make_sessionmaker(engine)
    ring1 = load_keyring(s)
    vs = vectors(3, seed=7)
    IdentityStore(sm, ring1).replace_enrollment("cand-1", None, images(vs), ADMIN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCTOR_")} | {"PROCTOR_DATA_DIR": str(data)}
    r = subprocess.run([sys.executable, "-m", "livekit_proctor.cli", "keys", "rotate-embeddings", "--new-key"],
                       env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    ring2 = load_keyring(s)
    assert ring2.current != ring1.current and list(ring2.keys) == [ring2.current]  # the old key is gone
    assert r.stdout.startswith(f"re-encrypted 4 ciphertexts with key {ring2.current}")
    got = IdentityStore(sm, ring2).get_enrollment("cand-1")
    assert got is not None and all(
        e.vector is not None and np.array_equal(e.vector, v) for e, v in zip(got.embeddings, vs, strict=True)
    )
    engine.dispose()


def _alert(session_id: str) -> str:
    return json.dumps({"exam_session_id": session_id, "thumbnail": {"data": "aGVsbG8="}})


def _candidate_data(sm: sessionmaker, cid: str, sid: str, ended_at: datetime | None = None) -> None:
    """What the service holds about a candidate besides the enrollment: a session, its alerts, audit rows."""
    now = datetime.now(UTC)
    with sm.begin() as db:
        db.add(SessionRow(id=sid, candidate_id=cid, exam_id="e", state="ended", policy={}, metadata_={},
                          counters={}, created_at=now, expires_at=now, ended_at=ended_at or now))  # fmt: skip
        db.add(AuditRow(actor="system:x", action="session.start", target=sid, detail={"candidate_id": cid}))
        for delivered in (1.0, None):
            db.add(OutboxRow(event_id=str(uuid.uuid4()), exam_session_id=sid, event_type="FACE_MISSING",
                             payload=_alert(sid), created_at=1.0, delivered_at=delivered))  # fmt: skip
        db.add(DeadLetterRow(lane="webhook", seq=1, event_id=str(uuid.uuid4()), exam_session_id=sid,
                             event_type="FACE_MISSING", payload=_alert(sid), created_at=1.0, dead_at=2.0,
                             attempts=3, error="500"))  # fmt: skip


def _delete(store: IdentityStore, sm: sessionmaker, cid: str) -> tuple[DeleteReport, dict[str, int]]:
    """As the privacy route does it: the candidate's alerts in the (SQL) outbox first, then the database."""
    outbox = asyncio.run(SqlOutbox(sm, None).delete_sessions(store.session_ids(cid)))
    return store.delete_candidate(cid, ADMIN, outbox), outbox


def test_delete_leaves_nothing_about_the_candidate_but_the_deletion_record(sm: sessionmaker) -> None:
    store = IdentityStore(sm, KeyRing.of(K1))
    for cid, sid in (("cand-1", "sess-1"), ("cand-2", "sess-2")):
        store.replace_enrollment(cid, None, images(vectors(3, seed=1)), ADMIN)
        _candidate_data(sm, cid, sid)
        store.record("verify", cid, Who("proctor", "99990000"), {"match": True, "similarity_score": 0.8})
    # A session whose row is gone (ended_session_retention_s): found through its session.start audit record.
    with sm.begin() as db:
        db.add(AuditRow(actor="system:x", action="session.start", target="sess-old", detail={"candidate_id": "cand-1"}))
        db.add(OutboxRow(event_id=str(uuid.uuid4()), exam_session_id="sess-old", event_type="FACE_MISSING",
                         payload=_alert("sess-old"), created_at=1.0))  # fmt: skip
        db.add(
            OutboxRow(
                event_id=str(uuid.uuid4()),
                exam_session_id="sess-2",
                event_type="FACE_MISSING",
                payload=_alert("sess-2"),
                created_at=1.0,
            )
        )  # the newest row: another candidate's
    rep, outbox = _delete(store, sm, "cand-1")
    assert rep.session_ids == ["sess-1", "sess-old"]
    assert outbox == {"outbox": 3, "outbox_redacted": 0}
    assert (rep.enrollments, rep.embeddings, rep.identity_audit, rep.sessions, rep.dead_letters,
            rep.audit) == (1, 3, 2, 1, 1, 2)  # fmt: skip
    with sm() as db:
        for model, col, ids in ((EnrollmentRow, EnrollmentRow.candidate_id, ["cand-1"]),
                                (EmbeddingRow, EmbeddingRow.candidate_id, ["cand-1"]),
                                (SessionRow, SessionRow.candidate_id, ["cand-1"]),
                                (OutboxRow, OutboxRow.exam_session_id, rep.session_ids),
                                (DeadLetterRow, DeadLetterRow.exam_session_id, rep.session_ids),
                                (AuditRow, AuditRow.target, rep.session_ids)):  # fmt: skip
            assert db.scalars(select(model).where(col.in_(ids))).all() == [], model.__tablename__
        left = db.scalars(select(IdentityAuditRow).where(IdentityAuditRow.candidate_id == "cand-1")).all()
        assert [(a.action, a.role) for a in left] == [("delete", "admin")]
        assert left[0].result["deleted"]["embeddings"] == 3 and left[0].result["deleted"]["outbox"] == 3
        assert "aGVsbG8" not in json.dumps(left[0].result)
        # The other candidate keeps everything.
        assert len(db.scalars(select(EmbeddingRow).where(EmbeddingRow.candidate_id == "cand-2")).all()) == 3
        assert len(db.scalars(select(OutboxRow).where(OutboxRow.exam_session_id == "sess-2")).all()) == 3
    export = store.export_candidate("cand-1", ADMIN, alerts=[])
    assert export["enrollment"] is None and export["sessions"] == [] and export["alerts"] == []
    assert [a["action"] for a in export["identity_audit"]] == ["delete"]


def test_delete_keeps_the_newest_outbox_row_in_place_when_every_lane_delivered_it(sm: sessionmaker) -> None:
    """SQLite reuses the newest seq once its row is gone: the row stays, emptied, so no later alert is skipped."""
    store = IdentityStore(sm, KeyRing.of(K1))
    _candidate_data(sm, "cand-1", "sess-1")
    with sm.begin() as db:
        top = db.scalar(select(OutboxRow.seq).order_by(OutboxRow.seq.desc()).limit(1))
        db.add(CursorRow(lane="grpc", last_seq=top, updated_at=1.0))
    _, outbox = _delete(store, sm, "cand-1")
    assert outbox == {"outbox": 1, "outbox_redacted": 1}
    with sm() as db:
        kept = db.scalars(select(OutboxRow)).all()
        assert [(o.seq, o.exam_session_id, json.loads(o.payload)) for o in kept] == [
            (top, "redacted", {"redacted": "privacy deletion"})
        ]


def test_export_returns_everything_held_and_is_audited(sm: sessionmaker) -> None:
    store = IdentityStore(sm, KeyRing.of(K1))
    vs = vectors(3, seed=3)
    enr = store.replace_enrollment("cand-1", "exam-1", images(vs), ADMIN, metadata={"device": "cam"})
    _candidate_data(sm, "cand-1", "sess-1")
    store.record("verify", "cand-1", Who("proctor", "99990000"), {"match": False, "similarity_score": 0.1})
    alerts = asyncio.run(SqlOutbox(sm, None).export_sessions(store.session_ids("cand-1")))
    out = store.export_candidate("cand-1", ADMIN, alerts=alerts)
    json.dumps(out)  # JSON-ready
    e = out["enrollment"]
    assert e["enrollment_id"] == enr.enrollment_id and e["metadata"] == {"device": "cam"}
    assert e["vectors_included"] is False and "template" not in e
    assert [x["embedding_id"] for x in e["embeddings"]] == [x.embedding_id for x in enr.embeddings]
    assert all("vector" not in x for x in e["embeddings"])
    assert [s["id"] for s in out["sessions"]] == ["sess-1"]
    assert len(out["alerts"]) == 2 and out["alerts"][0]["alert"]["thumbnail"] == {"data": "aGVsbG8="}
    assert len(out["dead_letters"]) == 1 and [a["action"] for a in out["session_audit"]] == ["session.start"]
    assert [a["action"] for a in out["identity_audit"]] == ["enroll", "verify"]
    full = store.export_candidate("cand-1", ADMIN, alerts=[], include_vectors=True)
    assert np.allclose(full["enrollment"]["embeddings"][0]["vector"], vs[0]) and "template" in full["enrollment"]
    assert [a["action"] for a in store.audit_entries("cand-1")] == ["enroll", "verify", "export", "export"]
    assert store.audit_entries("cand-1")[-1]["result"]["vectors_included"] is True


def test_purge_deletes_embeddings_after_the_candidates_last_session(sm: sessionmaker, tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path / "data", identity_retention_s=90 * 86400)
    store = IdentityStore(sm, KeyRing.of(K1))
    now = datetime.now(UTC)
    for cid in ("stale", "recent-session", "recent-row", "recent-audit", "fresh"):
        store.replace_enrollment(cid, None, images(vectors(3, seed=1)), ADMIN)
    with sm.begin() as db:  # enrolled long ago
        db.execute(update(EnrollmentRow).where(EnrollmentRow.candidate_id != "fresh")
                   .values(created_at=now - timedelta(days=200)))  # fmt: skip
    store.touch_session("stale", now - timedelta(days=91))
    store.touch_session("recent-session", now - timedelta(days=89))
    store.touch_session("recent-row", now - timedelta(days=120))
    _candidate_data(sm, "recent-row", "sess-r", ended_at=now - timedelta(days=10))  # a session row still held
    with sm.begin() as db:  # a session whose row is gone; its start is in the audit log
        db.add(AuditRow(at=now - timedelta(days=30), actor="system:x", action="session.start", target="sess-a",
                        detail={"candidate_id": "recent-audit"}))  # fmt: skip
    assert purge(s, sm, dry_run=True).enrollments == 1
    rep = purge(s, sm)
    assert rep.enrollments == 1 and "1 enrollments" in rep.line()
    assert store.get_enrollment("stale") is None
    assert all(store.get_enrollment(c) is not None for c in ("recent-session", "recent-row", "recent-audit", "fresh"))
    with sm() as db:
        assert db.scalars(select(EmbeddingRow).where(EmbeddingRow.candidate_id == "stale")).all() == []
    last = store.audit_entries("stale")[-1]
    assert (last["action"], last["role"], last["key_id"], last["result"]["reason"]) == (
        "delete", "system", "retention", "retention")  # fmt: skip
    assert purge(s, sm).enrollments == 0  # idempotent (cron)
    assert purge(Settings(data_dir=tmp_path / "data", identity_retention_s=0), sm).enrollments == 0  # 0: forever


def test_concurrent_first_enrollments_of_one_candidate_leave_one(sm: sessionmaker) -> None:
    store = IdentityStore(sm, KeyRing.of(K1))
    errors: list[BaseException] = []

    def enroll(seed: int) -> None:
        try:
            store.replace_enrollment("cand-1", None, images(vectors(3, seed)), ADMIN)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=enroll, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with sm() as db:
        assert len(db.scalars(select(EnrollmentRow)).all()) == 1 and len(db.scalars(select(EmbeddingRow)).all()) == 3
    actions = sorted(a["action"] for a in store.audit_entries("cand-1"))
    assert actions == ["enroll", "re-enroll", "re-enroll", "re-enroll"]


def test_listeners_hear_each_committed_change_and_ids_are_read_without_keys(sm: sessionmaker) -> None:
    # What lets live sessions of this analyzer reload an enrollment at once (SessionManager), and the cheap
    # re-check by which those of another analyzer see it.
    store = IdentityStore(sm, KeyRing.of(K1))
    heard: list[str] = []

    def failing(cid: str) -> None:
        raise ZeroDivisionError(cid)

    store.enrollment_listeners.append(failing)  # a failing listener is logged; the change stands
    store.enrollment_listeners.append(heard.append)
    store.replace_enrollment("cand-1", None, images(vectors(3, seed=1)), ADMIN)
    again = store.replace_enrollment("cand-1", None, images(vectors(3, seed=2)), ADMIN)
    other = store.replace_enrollment("cand-2", None, images(vectors(3, seed=3)), ADMIN)
    elsewhere = IdentityStore(sm, KeyRing.of(K2))  # another key: ids need no decryption
    assert elsewhere.enrollment_ids(["cand-1", "cand-2", "nobody"]) == {
        "cand-1": again.enrollment_id,
        "cand-2": other.enrollment_id,
    }
    assert store.delete_enrollment("cand-1", ADMIN) is not None
    assert store.delete_enrollment("cand-1", ADMIN) is None  # nothing changed: nobody is told
    store.delete_candidate("cand-2", ADMIN)
    store.delete_candidate("nobody", ADMIN)
    assert heard == ["cand-1", "cand-1", "cand-2", "cand-1", "cand-2"]
    assert elsewhere.enrollment_ids(["cand-1", "cand-2"]) == {}


def test_the_sessions_audit_actions_fit_the_audit_table(sm: sessionmaker) -> None:
    store = IdentityStore(sm, KeyRing.of(K1))
    analyzer = SystemActor(key_id=f"analyzer:{'n' * 80}"[:64])  # as SessionManager builds it
    actions = ["first-check", "mismatch-started", "mismatch-ended", "reload", "session-summary"]
    for action in actions:
        store.record(action, "cand-1", analyzer, {"exam_session_id": "s-1"})
    assert [(a["action"], a["role"]) for a in store.audit_entries("cand-1")] == [(a, "system") for a in actions]
    with pytest.raises(ValueError, match="unknown identity audit action"):
        store.record("every-check", "cand-1", analyzer, {})
