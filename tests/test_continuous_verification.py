"""Continuous face verification (analyzer/rules/verification.py): FACE_MISMATCH, IDENTITY_UNVERIFIED and
last_face_verification, end to end over the WebSocket with enrolled shared photos; enrollments changing under
a live session (re-enrollment, deletion, through this analyzer or another); the identity audit trail of the
checks; and the check's rules (tracked face, low quality, restart) on the rule engine.

Identity A (angelina_jolie, 8 photos) is enrolled from 3 photos straight into the identity store
(`app.state.identity.replace_enrollment`; the REST enrollment route is tested on its own); identity B is
mark_zuckerberg (5 photos)."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from livekit_proctor.analyzer.detectors.base import Box, Face
from livekit_proctor.analyzer.detectors.faceembed import (
    MATCH_THRESHOLD,
    Alignment,
    FaceEmbedding,
    FaceQuality,
    embed_image,
)
from livekit_proctor.analyzer.rules.engine import RuleEngine
from livekit_proctor.analyzer.rules.policy import effective_policy
from livekit_proctor.analyzer.rules.verification import Reference
from livekit_proctor.analyzer.signals import FrameSignals
from livekit_proctor.contracts.api import SessionStartRequest
from livekit_proctor.identity_store import EmbeddingIn, IdentityStore, SystemActor
from tests.conftest import LiveServer, StreamClient, black_jpeg, eventually, jpeg_of, load_rgb, shared_data, stream_url

A = "faces/identity/angelina_jolie"
B = "faces/identity/mark_zuckerberg"
A_ENROLL = ["deepface__img1.jpg", "deepface__img2.jpg", "deepface__img4.jpg"]
A_OTHERS = ["deepface__img5.jpg", "deepface__img6.jpg", "deepface__img7.jpg", "deepface__img10.jpg"]
VERIFY = {"mode": "periodic"}  # opt-in per session; interval_s defaults to 2 s
B_PHOTOS = ["deepface__img13.jpg", "deepface__img14.jpg", "deepface__img15.jpg", "deepface__img58.jpg"]


def _photos(folder: str, names: list[str]) -> list[Path]:
    d = shared_data()
    paths = [d / folder / n for n in names] if d else []
    if not paths or not all(p.is_file() for p in paths):
        pytest.skip(f"shared face photos not available: {folder}")
    return paths


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    _photos(A, A_ENROLL + A_OTHERS)
    _photos(B, B_PHOTOS)
    # No periodic re-check of enrollments unless a test asks for one (it sets the setting for its time).
    s = LiveServer(tmp_path_factory.mktemp("verify"), enrollment_recheck_s=3600).start()
    yield s
    s.stop()


def _enroll(srv: LiveServer, candidate: str) -> None:
    embeddings = []
    for name in A_ENROLL:
        (face,) = embed_image(load_rgb(f"{A}/{name}"))
        q = face.quality
        b = face.box
        embeddings.append(
            EmbeddingIn(
                vector=face.embedding, quality_score=q.score, face_bbox=[b.x, b.y, b.w, b.h],
                pose_angles=q.pose.to_dict() if q.pose else {}, sharpness_score=q.sharpness, selected=True,
            )
        )  # fmt: skip
    srv.app.state.identity.replace_enrollment(candidate, "exam-1", embeddings, SystemActor(key_id="test"))


def _enroll_rest(srv: LiveServer, candidate: str, photos: list[Path]) -> dict[str, Any]:
    """Enrolls through POST /api/v1/enroll (a re-enrollment replaces the candidate's enrollment)."""
    images = [{"image_base64": base64.b64encode(jpeg_of(p)).decode()} for p in photos]
    with srv.http() as h:
        r = h.post("/api/v1/enroll", json={"candidate_id": candidate, "exam_id": "exam-1", "images": images})
    assert r.status_code == 200, r.text
    return r.json()


async def _stream(
    c: StreamClient, jpegs: list[bytes], seconds: float, after: dict[int, float] | None = None
) -> dict[int, float]:
    """Streams the photos in turn, two frames a second of media time, each analysed before the next is sent;
    returns seq -> media time. `after`: what an earlier call sent, whose media time this one continues."""
    sent: dict[int, float] = {}
    # Capture times are Unix seconds near the server's clock (the protocol checks).
    t0 = max(after.values()) + 0.5 if after else time.time()
    for i in range(int(seconds * 2) + 1):
        ts = t0 + i / 2
        seq = await c.video(jpegs[i % len(jpegs)], ts)
        sent[seq] = ts
        await c.sync()
    return sent


def _started(c: StreamClient, event_type: str) -> list[dict[str, Any]]:
    return [a for a in c.alerts() if a["event_type"] == event_type and a["incident_state"] == "started"]


async def test_another_person_raises_face_mismatch_within_10_s(srv: LiveServer) -> None:
    _enroll(srv, "cand-a1")
    cfg = srv.start_session("verify-b", candidate="cand-a1", calibration_s=0, verification_policy=VERIFY)
    assert cfg["policy"]["verification"]["interval_s"] == 2.0  # the default: a check every 2 s of video
    b = [jpeg_of(p) for p in _photos(B, B_PHOTOS)]
    async with StreamClient.connect(stream_url(cfg)) as c:
        await c.sync()  # the enrollment is read at session start: the first ping waits for it
        sent = await _stream(c, b, 10.0)
        (alert,) = _started(c, "FACE_MISMATCH")
        alert_rx = next(m["_rx"] for m in c.of_type("alert") if m["alert"] is alert)
        ev = alert["evidence"]
        assert sent[ev["trigger_frame_seq"]] - min(sent.values()) <= 10.0
        assert ev["consecutive_mismatches"] == 3 and ev["current_similarity"] < ev["threshold"] == MATCH_THRESHOLD
        assert ev["frame_quality_score"] >= 0.3 and ev["enrolled_embedding_id"]
        assert "thumbnail_jpeg_b64" in ev
        # The heartbeats after it: the latest check failed, and FACE_MISMATCH weighs in the risk score.
        hb = await c.wait_for(lambda m: m["type"] == "heartbeat" and m["_rx"] > alert_rx and m["stats"]["risk_score"])
        assert hb["stats"]["last_face_verification"]["match"] is False
        assert not _started(c, "IDENTITY_UNVERIFIED")
    state = srv.session("verify-b")
    assert state["last_face_verification"]["match"] is False and state["last_verification_at"]
    assert any(i["event_type"] == "FACE_MISMATCH" for i in state["open_incidents"])


async def test_other_photos_of_the_enrolled_candidate_raise_nothing(srv: LiveServer) -> None:
    _enroll(srv, "cand-a2")
    cfg = srv.start_session("verify-a", candidate="cand-a2", calibration_s=0, verification_policy=VERIFY)
    a = [jpeg_of(p) for p in _photos(A, A_OTHERS)]
    async with StreamClient.connect(stream_url(cfg)) as c:
        await c.sync()
        await _stream(c, a, 10.0)
        assert not _started(c, "FACE_MISMATCH") and not _started(c, "IDENTITY_UNVERIFIED")
        hb = await c.wait_for(lambda m: m["type"] == "heartbeat" and m["stats"]["last_face_verification"])
        check = hb["stats"]["last_face_verification"]
        assert check["match"] is True and check["similarity"] >= MATCH_THRESHOLD and check["at"]
    assert srv.session("verify-a")["last_face_verification"]["match"] is True


async def _latest_check(c: StreamClient) -> dict[str, Any]:
    """The session's latest face check (`at`, `similarity`, `match`) in the first heartbeat from now on."""
    now = time.time()
    hb = await c.wait_for(lambda m: m["type"] == "heartbeat" and m["_rx"] > now)
    check: dict[str, Any] = hb["stats"]["last_face_verification"]
    return check


def _at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


async def test_a_candidate_without_enrollment_is_told_once(srv: LiveServer) -> None:
    # Said when the session's first frame is analysed, at that frame's capture time like every alert: the
    # client streaming it sees it (not only the outbox); a reconnect does not say it again.
    cfg = srv.start_session("verify-none", candidate="cand-never-enrolled", calibration_s=0, verification_policy=VERIFY)
    assert srv.session("verify-none")["counters"]["alerts_by_type"] == {}  # nothing before any media
    a = [jpeg_of(p) for p in _photos(A, A_OTHERS)]
    seen: list[list[dict[str, Any]]] = []
    sent: dict[int, float] = {}
    first_ts = 0.0
    for _ in range(2):
        async with StreamClient.connect(stream_url(cfg)) as c:
            await c.sync()
            sent = await _stream(c, a, 3.0, after=sent)
            first_ts = first_ts or min(sent.values())
            assert not _started(c, "FACE_MISMATCH")
            seen.append(_started(c, "IDENTITY_UNVERIFIED"))
            hb = await c.wait_for(lambda m: m["type"] == "heartbeat")
            assert hb["stats"]["last_face_verification"] is None  # no checks without an enrollment
    (alert,) = seen[0]
    assert seen[1] == []
    assert abs(_at(alert["timestamp"]) - first_ts) < 1e-3  # the first frame's capture time
    assert alert["evidence"]["reason"] == "no_enrollment"
    state = srv.session("verify-none")
    assert state["counters"]["alerts_by_type"] == {"IDENTITY_UNVERIFIED": 1}
    assert [i["event_type"] for i in state["open_incidents"]] == ["IDENTITY_UNVERIFIED"]
    assert state["last_face_verification"] is None


async def test_by_default_a_session_does_not_verify(srv: LiveServer) -> None:
    _enroll(srv, "cand-a3")
    cfg = srv.start_session("verify-off", candidate="cand-a3")
    assert cfg["policy"]["verification"]["mode"] == "none"
    async with StreamClient.connect(stream_url(cfg)) as c:
        await c.sync()
        await _stream(c, [jpeg_of(p) for p in _photos(B, B_PHOTOS)], 6.0)  # someone else, 4 checks' worth
        assert not _started(c, "IDENTITY_UNVERIFIED") and not _started(c, "FACE_MISMATCH")
    state = srv.session("verify-off")
    assert state["last_face_verification"] is None and state["counters"]["alerts_by_type"] == {}


async def test_unverified_is_said_once_across_an_analyzer_restart(tmp_path: Path) -> None:
    # Said at the first analysed frame; after a restart (its open incident restored) the session does not
    # say it again. Frames without a face do: the enrollment is what is missing.
    def url(cfg: dict[str, Any], port: int) -> str:
        return stream_url(cfg).replace(f":{first.port}/", f":{port}/")

    first = LiveServer(tmp_path).start()
    try:
        cfg = first.start_session(
            "unverified-restart", candidate="cand-none", calibration_s=0, verification_policy=VERIFY
        )
        async with StreamClient.connect(url(cfg, first.port)) as c:
            sent = await _stream(c, [black_jpeg()], 1.0)
            assert len(_started(c, "IDENTITY_UNVERIFIED")) == 1
    finally:
        first.stop()
    again = LiveServer(tmp_path).start()
    try:
        async with StreamClient.connect(url(cfg, again.port)) as c:
            await _stream(c, [black_jpeg()], 1.0, after=sent)
            assert not _started(c, "IDENTITY_UNVERIFIED")
        state = again.session("unverified-restart")
        assert state["counters"]["alerts_by_type"] == {"IDENTITY_UNVERIFIED": 1}
        assert [i["event_type"] for i in state["open_incidents"]] == ["IDENTITY_UNVERIFIED"]
    finally:
        again.stop()


async def test_a_reenrollment_reaches_the_live_session_without_a_restart(srv: LiveServer) -> None:
    _enroll(srv, "cand-re")
    cfg = srv.start_session("verify-re", candidate="cand-re", calibration_s=0, verification_policy=VERIFY)
    a = [jpeg_of(p) for p in _photos(A, A_OTHERS)]
    async with StreamClient.connect(stream_url(cfg)) as c:
        await c.sync()
        before = await _stream(c, a, 4.0)
        assert srv.session("verify-re")["last_face_verification"]["match"] is True
        # The candidate is enrolled again, as someone else, through the REST route (this analyzer's store).
        enrolled = _enroll_rest(srv, "cand-re", _photos(B, B_PHOTOS[:3]))
        assert enrolled["replaced"]
        sent = await _stream(c, a, 10.0, after=before)  # the same person as before: no longer the enrolled one
        (alert,) = _started(c, "FACE_MISMATCH")
        ev = alert["evidence"]
        assert sent[ev["trigger_frame_seq"]] - min(sent.values()) <= 10.0  # the count started afresh: 3 checks
        assert ev["consecutive_mismatches"] == 3
        assert ev["enrolled_embedding_id"] in {e["embedding_id"] for e in enrolled["embeddings"]}
    reloads = [e["result"] for e in srv.app.state.identity.audit_entries("cand-re") if e["action"] == "reload"]
    assert [(r["source"], r["enrollment_id"]) for r in reloads] == [("notified", enrolled["enrollment_id"])]


async def test_a_deletion_elsewhere_is_seen_by_the_recheck_and_an_enrollment_ends_unverified(
    srv: LiveServer,
) -> None:
    _enroll(srv, "cand-del")
    cfg = srv.start_session("verify-del", candidate="cand-del", calibration_s=0, verification_policy=VERIFY)
    # Another analyzer sharing the database: its store tells no session of this one.
    elsewhere = IdentityStore(srv.app.state.identity.sm, srv.app.state.identity.keyring)
    a = [jpeg_of(p) for p in _photos(A, A_OTHERS)]
    srv.settings.enrollment_recheck_s = 0.2
    try:
        async with StreamClient.connect(stream_url(cfg)) as c:
            await c.sync()
            sent = await _stream(c, a, 2.0)
            assert srv.session("verify-del")["last_face_verification"]["match"] is True
            elsewhere.delete_enrollment("cand-del", SystemActor(key_id="analyzer-2"))

            async def frame() -> list[dict[str, Any]]:
                nonlocal sent
                sent = await _stream(c, a, 0.0, after=sent)
                return _started(c, "IDENTITY_UNVERIFIED")

            (unverified,) = await eventually(frame, what="IDENTITY_UNVERIFIED after the deletion")
            assert unverified["evidence"]["reason"] == "enrollment_deleted"
            checked = await _latest_check(c)
            sent = await _stream(c, a, 4.0, after=sent)  # no checks without an enrollment; said once
            assert await _latest_check(c) == checked
            assert len(_started(c, "IDENTITY_UNVERIFIED")) == 1 and not _started(c, "FACE_MISMATCH")
            _enroll(srv, "cand-del")  # enrolled again: the open IDENTITY_UNVERIFIED ends, checks resume
            await _stream(c, a, 4.0, after=sent)
            (ended,) = [
                x for x in c.alerts() if x["event_type"] == "IDENTITY_UNVERIFIED" and x["incident_state"] == "ended"
            ]
            assert ended["evidence"]["end_reason"] == "enrolled"
            assert (await _latest_check(c))["at"] > checked["at"]
            assert not _started(c, "FACE_MISMATCH")
    finally:
        srv.settings.enrollment_recheck_s = 3600
    reloads = [e["result"] for e in srv.app.state.identity.audit_entries("cand-del") if e["action"] == "reload"]
    assert reloads[0]["source"] == "recheck" and reloads[0]["enrollment_id"] is None and len(reloads) == 2


async def test_the_checks_leave_an_audit_trail_that_privacy_export_and_delete_cover(srv: LiveServer) -> None:
    _enroll(srv, "cand-audit")
    cfg = srv.start_session("verify-audit", candidate="cand-audit", calibration_s=0, verification_policy=VERIFY)
    async with StreamClient.connect(stream_url(cfg)) as c:
        await c.sync()
        await _stream(c, [jpeg_of(p) for p in _photos(B, B_PHOTOS)], 12.0)  # someone else: a check every 2 s
        assert _started(c, "FACE_MISMATCH")
    with srv.http() as h:
        assert h.post("/api/v1/session/verify-audit/end").status_code == 200
        # Not a record per check: the first, the incident's start and end (here at the session's end), a summary.
        export = h.get("/api/v1/privacy/export", params={"candidate_id": "cand-audit"}).json()
        trail = [e for e in export["identity_audit"] if e["result"].get("exam_session_id") == "verify-audit"]
        assert [e["action"] for e in trail] == ["first-check", "mismatch-started", "mismatch-ended", "session-summary"]
        assert {(e["role"], e["key_id"]) for e in trail} == {("system", f"analyzer:{srv.settings.node_id}")}
        first, started, ended, summary = (e["result"] for e in trail)
        assert first["match"] is False and first["similarity"] < first["threshold"]
        assert started["consecutive_mismatches"] == 3 and started["incident_id"] == ended["incident_id"]
        assert ended["end_reason"] == "ended_by_api"
        assert summary["checks"] == summary["matches"] + summary["mismatches"] >= summary["mismatches"] >= 3
        assert summary["skipped_quality"] >= 0 and summary["reloads"] == 0
        assert h.post("/api/v1/privacy/delete", json={"candidate_id": "cand-audit"}).status_code == 200
        left = h.get("/api/v1/privacy/export", params={"candidate_id": "cand-audit"}).json()
    assert [e["action"] for e in left["identity_audit"]] == ["delete"]


async def test_a_privacy_deletion_during_a_session_leaves_nothing_of_its_audit_trail(srv: LiveServer) -> None:
    _enroll(srv, "cand-priv")
    cfg = srv.start_session("verify-priv", candidate="cand-priv", calibration_s=0, verification_policy=VERIFY)
    async with StreamClient.connect(stream_url(cfg)) as c:
        await c.sync()
        await _stream(c, [jpeg_of(p) for p in _photos(A, A_OTHERS)], 2.0)
    assert "first-check" in [a["action"] for a in srv.app.state.identity.audit_entries("cand-priv")]
    with srv.http() as h:  # the session is still live: the deletion ends it (its summary is written) first
        r = h.post("/api/v1/privacy/delete", json={"candidate_id": "cand-priv"})
    assert r.status_code == 200 and r.json()["sessions_ended"] == ["verify-priv"]
    assert [a["action"] for a in srv.app.state.identity.audit_entries("cand-priv")] == ["delete"]


# ---- the checks on the rule engine (synthetic embeddings: which face, quality, restart)


def _unit(i: int) -> np.ndarray:
    v = np.zeros(1024, np.float32)
    v[i] = 1.0
    return v


ENROLLED = _unit(0)
STRANGER = _unit(1)


def _emb(
    vec: np.ndarray, x: float, w: float, quality: float = 0.9, alignment: Alignment = "mesh", det: float = 0.9
) -> FaceEmbedding:
    face = Face(Box(x, 100.0, w, w), det)
    return FaceEmbedding(face, vec, FaceQuality(det, w, 200.0, 120.0, None, quality), alignment)


def _engine(restore: dict[str, Any] | None = None) -> RuleEngine:
    req = SessionStartRequest(exam_session_id="u", candidate_id="c", exam_id="e", calibration_s=0)
    engine = RuleEngine(effective_policy(req, 5.0))
    engine.verifier.enroll(Reference(("emb-1",), ENROLLED[None, :]))
    if restore is not None:
        engine.restore(restore)
    return engine


def _frame(engine: RuleEngine, seq: int, faces: list[FaceEmbedding] | None, ts: float | None = None) -> list[Any]:
    ts = 100.0 + seq if ts is None else ts
    sig = FrameSignals(seq=seq, ts=ts, width=1280, height=720, faces=[f.face for f in faces or []])
    if faces is not None:
        sig.put("face_embeddings", faces)
    return engine.observe(sig)


def test_the_candidate_is_the_face_verified_last_not_the_largest() -> None:
    engine = _engine()
    _frame(engine, 0, [_emb(ENROLLED, 100, 150)])  # verified: its position is followed from now on
    events = []
    for seq in range(1, 6):  # a larger stranger sits down beside the candidate (who stays where they were)
        events += _frame(engine, seq, [_emb(STRANGER, 600, 300), _emb(ENROLLED, 110, 150)])
    assert engine.verifier.last is not None and engine.verifier.last.match
    assert not [e for e in events if e.event_type == "FACE_MISMATCH"]
    events = []
    for seq in range(6, 9):  # the candidate's place is taken by someone else
        events += _frame(engine, seq, [_emb(STRANGER, 105, 150)])
    (ev,) = [e for e in events if e.event_type == "FACE_MISMATCH"]
    assert ev.evidence["consecutive_mismatches"] == 3 and ev.evidence["enrolled_embedding_id"] == "emb-1"


def test_low_quality_faces_are_skipped_not_counted_and_frames_without_a_check_say_nothing() -> None:
    engine = _engine()
    for seq in range(0, 2):
        _frame(engine, seq, [_emb(STRANGER, 100, 150)])
    for seq in range(2, 8):  # blurred / tiny / turned away: neither a mismatch nor a match
        _frame(engine, seq, [_emb(STRANGER, 100, 150, quality=0.1)])
        _frame(engine, seq + 100, None, ts=100.5 + seq)  # a frame where the stage was not due
    # Not verifiable (faceembed.verification_problem): no landmarks to align it, or a weak detection.
    _frame(engine, 20, [_emb(STRANGER, 100, 150, alignment="keypoints")])
    _frame(engine, 21, [_emb(STRANGER, 100, 150, det=0.45)])
    assert engine.verifier.consecutive == 2 and engine.verifier.skipped == 8
    events = _frame(engine, 22, [_emb(STRANGER, 100, 150)])
    assert [e.event_type for e in events] == ["FACE_MISMATCH"]


def test_the_mismatch_count_survives_a_restart() -> None:
    engine = _engine()
    for seq in range(2):
        _frame(engine, seq, [_emb(STRANGER, 100, 150)])
    saved = engine.snapshot()
    assert saved["verification"]["consecutive"] == 2
    restarted = _engine(restore=saved)  # the restarted analyzer reads the enrollment again and restores the rest
    assert restarted.verifier.last is not None and restarted.verifier.last.match is False
    events = _frame(restarted, 2, [_emb(STRANGER, 100, 150)])
    assert [e.event_type for e in events] == ["FACE_MISMATCH"]


def test_face_mismatch_is_strong_evidence_with_another_person() -> None:
    engine = _engine()
    events = []
    for seq in range(7):  # two strangers, neither the enrolled candidate
        events += _frame(engine, seq, [_emb(STRANGER, 100, 150), _emb(_unit(2), 600, 150)])
    started = [e.event_type for e in events if e.state == "started"]
    assert {"FACE_MISMATCH", "MULTIPLE_FACES", "HIGH_CONFIDENCE_CHEATING"} <= set(started)
    (hcc,) = [e for e in events if e.event_type == "HIGH_CONFIDENCE_CHEATING"]
    assert "FACE_MISMATCH" in hcc.evidence["strong_incidents"]
    assert engine.risk.score(107.0) > 0
