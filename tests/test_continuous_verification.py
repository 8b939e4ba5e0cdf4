"""Continuous face verification (analyzer/rules/verification.py): FACE_MISMATCH, IDENTITY_UNVERIFIED and
last_face_verification, end to end over the WebSocket with enrolled shared photos, and the check's rules
(tracked face, low quality, restart) on the rule engine.

Identity A (angelina_jolie, 8 photos) is enrolled from 3 photos straight into the identity store
(`app.state.identity.replace_enrollment`; the REST enrollment route is tested on its own); identity B is
mark_zuckerberg (5 photos)."""

from __future__ import annotations

import time
from collections.abc import Iterator
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
from livekit_proctor.identity_store import EmbeddingIn, SystemActor
from tests.conftest import LiveServer, StreamClient, jpeg_of, load_rgb, shared_data, stream_url

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
    s = LiveServer(tmp_path_factory.mktemp("verify")).start()
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


async def _stream(c: StreamClient, jpegs: list[bytes], seconds: float) -> dict[int, float]:
    """Streams the photos in turn, two frames a second of media time, each analysed before the next is sent;
    returns seq -> media time."""
    sent: dict[int, float] = {}
    t0 = time.time()  # capture times are Unix seconds near the server's clock (the protocol checks)
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


async def test_a_candidate_without_enrollment_is_told_once(srv: LiveServer) -> None:
    # Said at session start, before any media connection: it reaches the outbox (and the counters, and the
    # open incidents), not a WebSocket that was not open yet.
    cfg = srv.start_session("verify-none", candidate="cand-never-enrolled", calibration_s=0, verification_policy=VERIFY)
    a = [jpeg_of(p) for p in _photos(A, A_OTHERS)]
    for _ in range(2):  # a reconnect does not say it again
        async with StreamClient.connect(stream_url(cfg)) as c:
            await c.sync()
            await _stream(c, a, 3.0)
            assert not _started(c, "FACE_MISMATCH") and not _started(c, "IDENTITY_UNVERIFIED")
            hb = await c.wait_for(lambda m: m["type"] == "heartbeat")
            assert hb["stats"]["last_face_verification"] is None  # no checks without an enrollment
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
