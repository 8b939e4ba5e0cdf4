"""Enrollment, verification and privacy export / delete through the real server, with the shared photos."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from tests.conftest import (
    ADMIN_KEY,
    PROCTOR_KEY,
    SYSTEM_KEY,
    LiveServer,
    StreamClient,
    black_jpeg,
    load_rgb,
    stream_url,
)

A = [f"faces/identity/angelina_jolie/deepface__img{i}.jpg" for i in (1, 2, 4, 5)]
B = "faces/identity/scarlett_johansson/deepface__img47.jpg"
TWO = "faces/identity/matt_damon/deepface__img29.jpg"  # a second person for the two-face image
TWO_PEOPLE = "faces/multi_face/face_recognition__obama_and_biden.jpg"
TURNED = "faces/head_pose/insightface__pose_left_face.jpeg"
# Exam-webcam frames of a candidate looking down and away (OEP subject 1, labelled "angle"): a face is found, but
# no landmarks (520 s) or only a weak detection (471 s).
UNVERIFIABLE = {
    "faces/webcam_oep/oep_subject1_00520s.jpg": "no_landmarks",
    "faces/webcam_oep/oep_subject1_00471s.jpg": "low_confidence",
}


def jpeg(rgb: np.ndarray, long_side: int = 800) -> bytes:
    h, w = rgb.shape[:2]
    s = long_side / max(h, w)
    if s < 1:
        rgb = cv2.resize(rgb, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    return cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def photo(rel: str, long_side: int = 800) -> str:
    return b64(jpeg(load_rgb(rel), long_side))


def codes(check: dict[str, Any]) -> set[str]:
    return {r["code"] for r in check["reasons"]}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    s = LiveServer(tmp_path_factory.mktemp("identity")).start()
    yield s
    s.stop()


def test_enroll_then_verify_same_and_other_person(srv: LiveServer) -> None:
    images = [{"image_base64": photo(p), "capture_timestamp": "2026-12-03T10:00:00Z"} for p in A[:3]]
    with srv.http(SYSTEM_KEY) as c:
        r = c.post("/api/v1/enroll", json={"candidate_id": "alice", "exam_id": "e1", "images": images})
        assert r.status_code == 200, r.text
        enr = r.json()
        assert enr["status"] == "enrolled" and enr["average_embedding_stored"] is True
        assert len(enr["embeddings"]) == 3 and sum(e["selected"] for e in enr["embeddings"]) == 3
        e0 = enr["embeddings"][0]
        assert {"embedding_id", "quality_score", "face_bbox", "pose_angles", "sharpness_score"} <= e0.keys()
        assert set(e0["pose_angles"]) == {"yaw", "pitch", "roll"} and len(e0["face_bbox"]) == 4
        assert enr["recommendations"] == []

        got = c.get("/api/v1/enroll/alice").json()
        assert got["enrollment_id"] == enr["enrollment_id"] and len(got["embeddings"]) == 3
        assert '"vector"' not in json.dumps(got)

    with srv.http(PROCTOR_KEY) as c:  # proctors verify
        same = c.post("/api/v1/verify", json={"candidate_id": "alice", "image_base64": photo(A[3])})
        assert same.status_code == 200, same.text
        other = c.post("/api/v1/verify", json={"candidate_id": "alice", "image_base64": photo(B)})
        assert other.status_code == 200, other.text
    s, o = same.json(), other.json()
    assert s["match"] is True and o["match"] is False, (s["similarity_score"], o["similarity_score"])
    assert s["similarity_score"] > s["threshold_used"] > o["similarity_score"]
    assert s["embedding_source"] == "selected_embeddings" and s["embeddings_compared"] == 3
    assert s["enrollment_id"] == enr["enrollment_id"]
    assert {"sharpness", "pose_deviation", "lighting_quality"} <= s["face_quality"].keys()
    assert s["timestamp"]

    audit = srv.app.state.identity.audit_entries("alice")
    assert [a["action"] for a in audit] == ["enroll", "verify", "verify"]
    assert audit[0]["role"] == "system" and audit[1]["role"] == "proctor" and audit[1]["key_id"]
    assert audit[1]["result"]["match"] is True and audit[2]["result"]["match"] is False


def _bad_images() -> list[tuple[str, str]]:
    """(expected reason, base64) for each kind of bad enrollment image."""
    a = load_rgb(A[0])
    a = cv2.resize(a, (600, round(600 * a.shape[0] / a.shape[1])), interpolation=cv2.INTER_AREA)
    other = load_rgb(TWO)
    other = cv2.resize(other, (round(other.shape[1] * a.shape[0] / other.shape[0]), a.shape[0]))
    two = np.hstack([a, other])
    tiny = cv2.resize(a, (a.shape[1] // 8, a.shape[0] // 8), interpolation=cv2.INTER_AREA)
    canvas = np.full((480, 640, 3), 128, np.uint8)  # a small face in a normal-sized frame
    canvas[100 : 100 + tiny.shape[0], 200 : 200 + tiny.shape[1]] = tiny
    blurred = cv2.GaussianBlur(a, (0, 0), 6)
    dark = (a.astype(np.float32) * 0.15).astype(np.uint8)
    return [
        ("multiple_faces", b64(jpeg(two, 1600))),
        ("face_too_small", b64(jpeg(canvas))),
        ("blurred", b64(jpeg(blurred))),
        ("too_dark", b64(jpeg(dark))),
        ("pose", photo(TURNED)),
    ]


def test_enrollment_rejects_each_bad_image_with_its_reason(srv: LiveServer) -> None:
    bad = _bad_images()
    with srv.http(ADMIN_KEY) as c:
        r = c.post("/api/v1/enroll", json={"candidate_id": "bad", "images": [{"image_base64": b} for _, b in bad]})
        assert r.status_code == 422, r.text
        body = r.json()
        for (want, _), check in zip(bad, body["images"], strict=True):
            assert not check["accepted"] and want in codes(check), (want, check)
        assert len(body["detail"]) == len(bad)
        assert "Move closer to the camera" in body["recommendations"]
        assert any("More light" in t for t in body["recommendations"])
        assert c.get("/api/v1/enroll/bad").status_code == 404  # nothing stored

        # One good image among them: enrolled, the others reported.
        r = c.post(
            "/api/v1/enroll",
            json={"candidate_id": "partial", "images": [{"image_base64": photo(A[0])}, {"image_base64": bad[3][1]}]},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "partial" and len(body["embeddings"]) == 1 and body["embeddings"][0]["selected"]
        assert body["images"][0]["accepted"] and "too_dark" in codes(body["images"][1])
        assert any(t.startswith("Add more photos") for t in body["recommendations"])


def test_multipart_upload_and_re_enrollment(srv: LiveServer) -> None:
    files = [("images", (f"{i}.jpg", jpeg(load_rgb(p)), "image/jpeg")) for i, p in enumerate(A[:2])]
    with srv.http(SYSTEM_KEY) as c:
        first = c.post("/api/v1/enroll", data={"candidate_id": "multi", "metadata": '{"k": 1}'}, files=files)
        assert first.status_code == 200, first.text
        again = c.post("/api/v1/enroll", json={"candidate_id": "multi", "image_base64": photo(A[3])})
        assert again.status_code == 200, again.text
        assert again.json()["replaced"] is True and len(c.get("/api/v1/enroll/multi").json()["embeddings"]) == 1
    assert [a["action"] for a in srv.app.state.identity.audit_entries("multi")] == ["enroll", "re-enroll"]


def test_verify_refuses_no_face_several_faces_and_unknown_candidates(srv: LiveServer) -> None:
    with srv.http(SYSTEM_KEY) as c:
        r = c.post("/api/v1/enroll", json={"candidate_id": "bob", "image_base64": photo(A[0])})
        assert r.status_code == 200, r.text
        none = c.post(
            "/api/v1/verify", json={"candidate_id": "bob", "image_base64": photo("faces/no_face/insightface__view.jpg")}
        )
        many = c.post(
            "/api/v1/verify",
            json={"candidate_id": "bob", "image_base64": photo(TWO_PEOPLE)},
        )
        unknown = c.post("/api/v1/verify", json={"candidate_id": "nobody", "image_base64": photo(A[0])})
        garbage = c.post("/api/v1/verify", json={"candidate_id": "bob", "image_base64": "not base64!"})
        assert c.get("/api/v1/enroll/nobody").status_code == 404
        assert "no enrollment" in c.delete("/api/v1/enroll/nobody").json()["error"]
    assert none.status_code == 422 and codes(none.json()["images"][0]) == {"no_face"}
    assert many.status_code == 422 and codes(many.json()["images"][0]) == {"multiple_faces"}
    assert unknown.status_code == 404 and "nobody has no enrollment" in unknown.json()["error"]
    assert garbage.status_code == 422 and codes(garbage.json()["images"][0]) == {"invalid_image"}


def test_verify_refuses_faces_it_cannot_verify_instead_of_scoring_them(srv: LiveServer) -> None:
    with srv.http(SYSTEM_KEY) as c:
        r = c.post("/api/v1/enroll", json={"candidate_id": "erin", "image_base64": photo(A[0])})
        assert r.status_code == 200, r.text
        for rel, reason in UNVERIFIABLE.items():
            out = c.post("/api/v1/verify", json={"candidate_id": "erin", "image_base64": photo(rel)})
            assert out.status_code == 422, out.text
            body = out.json()
            assert body["error"] == "the face cannot be verified" and codes(body["images"][0]) == {reason}, body
            assert "similarity_score" not in body and "match" not in body  # refused: no score to misread
    refused = [a["result"] for a in srv.app.state.identity.audit_entries("erin") if a["action"] == "verify"]
    assert [r["refused"] for r in refused] == [[r] for r in UNVERIFIABLE.values()]


def test_checks_at_the_door(srv: LiveServer) -> None:
    # A PNG whose header declares 20000 x 20000: refused from the header, never decoded.
    huge = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + (20000).to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00" * 4
    eleven = [{"image_base64": b64(black_jpeg(8, 8))}] * 11
    with srv.http(ADMIN_KEY) as c:
        r = c.post("/api/v1/enroll", json={"candidate_id": "door", "image_base64": b64(huge)})
        assert r.status_code == 422 and codes(r.json()["images"][0]) == {"image_too_large"}
        r = c.post("/api/v1/enroll", json={"candidate_id": "door", "images": eleven})
        assert r.status_code == 422 and r.json()["error"] == "invalid request"
        r = c.post("/api/v1/enroll", json={"candidate_id": "door"})
        assert r.status_code == 422 and "exactly one of" in r.text
        r = c.post("/api/v1/enroll", json={"candidate_id": "door", "image_base64": "A" * (6 * 2**20)})
        assert r.status_code == 422  # longer than the base64 of the largest image allowed


def test_roles(srv: LiveServer) -> None:
    body = {"candidate_id": "roles", "image_base64": photo(A[0])}
    with srv.http(PROCTOR_KEY) as p, srv.http(None) as anon:
        for r in (
            p.post("/api/v1/enroll", json=body),
            p.get("/api/v1/enroll/roles"),
            p.delete("/api/v1/enroll/roles"),
            p.get("/api/v1/privacy/export", params={"candidate_id": "roles"}),
            p.post("/api/v1/privacy/delete", json={"candidate_id": "roles"}),
        ):
            assert r.status_code == 403 and "role 'proctor' may not" in r.json()["error"], r.text
        assert anon.post("/api/v1/verify", json=body).status_code == 401
        # A candidate holds only a stream token for their session, which is no API key.
        token = srv.start_session("roles-1", candidate="roles")["stream_token"]
        for path in ("/api/v1/verify", "/api/v1/enroll"):
            r = anon.post(path, json=body, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 401 and r.json()["error"] == "invalid API key"


async def test_privacy_export_then_delete_leaves_nothing(srv: LiveServer) -> None:
    cid, sid = "carol", "priv-1"
    with srv.http(SYSTEM_KEY) as c:
        assert c.post("/api/v1/enroll", json={"candidate_id": cid, "image_base64": photo(A[0])}).status_code == 200
        assert c.post("/api/v1/enroll", json={"candidate_id": "dave", "image_base64": photo(B)}).status_code == 200
        assert c.post("/api/v1/verify", json={"candidate_id": cid, "image_base64": photo(A[1])}).status_code == 200
    cfg = srv.start_session(sid, candidate=cid)
    base = time.time() - 30
    async with StreamClient.connect(stream_url(cfg)) as s:  # 6 s without a face: FACE_NOT_FOUND
        for i in range(30):
            await s.video(black_jpeg(), base + i * 0.2)
        await s.sync()
        await s.wait_for(lambda m: m["type"] == "alert")
    jsonl = Path(srv.settings.resolved_outbox_jsonl())

    def lines() -> list[str]:
        return [x for x in jsonl.read_text().splitlines() if x.strip()]

    def lines_of(who: str) -> list[dict[str, Any]]:
        rows = [json.loads(x) for x in lines()]
        return [r for r in rows if r.get("candidate_id") == who]

    assert lines_of(cid)

    with srv.http(ADMIN_KEY) as c:
        ex = c.get("/api/v1/privacy/export", params={"candidate_id": cid})
        assert ex.status_code == 200, ex.text
        data = ex.json()
        assert data["enrollment"]["embeddings"] and '"vector"' not in json.dumps(data["enrollment"])
        assert {a["action"] for a in data["identity_audit"]} == {"enroll", "verify"}
        assert [s["id"] for s in data["sessions"]] == [sid]
        assert data["alerts"] and data["session_audit"]
        assert len(data["files"]["alerts_jsonl"]) == len(lines_of(cid))

        d = c.post("/api/v1/privacy/delete", json={"candidate_id": cid})
        assert d.status_code == 200, d.text
        rep = d.json()
    assert rep["sessions_ended"] == [sid] and rep["session_ids"] == [sid]
    assert rep["deleted"]["enrollments"] == 1 and rep["deleted"]["embeddings"] == 1
    assert rep["deleted"]["sessions"] == 1 and rep["deleted"]["alerts_jsonl"] >= 1
    assert rep["deleted"]["outbox"] + rep["deleted"]["outbox_redacted"] >= 1

    store = srv.app.state.identity
    assert store.get_enrollment(cid) is None
    assert [a["action"] for a in store.audit_entries(cid)] == ["delete"]  # only the deletion record
    assert lines_of(cid) == []
    assert not any(sid in x for x in lines())
    assert store.get_enrollment("dave") is not None  # another candidate's data stays
    with srv.http(ADMIN_KEY) as c:
        assert c.get(f"/api/v1/session/{sid}").status_code == 404
        left = c.get("/api/v1/privacy/export", params={"candidate_id": cid}).json()
    assert left["enrollment"] is None and left["sessions"] == [] and left["alerts"] == []
    assert left["session_audit"] == [] and left["files"]["alerts_jsonl"] == []
    assert [a["action"] for a in left["identity_audit"]] == ["delete"]


def test_image_headers_give_the_size_without_decoding() -> None:
    from livekit_proctor.analyzer.jpeg import JpegHeaderError, image_size

    img = np.zeros((37, 53, 3), np.uint8)
    lossless = [cv2.IMWRITE_WEBP_QUALITY, 101]
    for ext, fmt, args in (
        (".jpg", "jpeg", []),
        (".png", "png", []),
        (".webp", "webp", []),
        (".webp", "webp", lossless),
    ):
        assert image_size(cv2.imencode(ext, img, args)[1].tobytes()) == (fmt, 53, 37)
    with pytest.raises(JpegHeaderError):
        image_size(b"GIF89a" + b"\0" * 40)


def test_alerts_jsonl_hook_exports_and_removes_only_the_candidates_lines(tmp_path: Path) -> None:
    from livekit_proctor.dispatcher import jsonl
    from livekit_proctor.wiring import AlertsJsonl

    path = tmp_path / "alerts.jsonl"
    rows = [
        {"candidate_id": "x", "exam_session_id": "s1", "n": 0},
        {"candidate_id": "y", "exam_session_id": "s2", "n": 1},
        {"candidate_id": "other", "exam_session_id": "s1", "n": 2},  # one of x's sessions
        {"candidate_id": "y", "exam_session_id": "s3", "n": 3},
    ]
    jsonl.append(path, [json.dumps(r) for r in rows] + ["not json"])
    hook = AlertsJsonl(path)
    assert [r["n"] for r in hook.export("x", ["s1"])] == [0, 2]
    inode = path.stat().st_ino
    assert hook.erase("nobody", []) == 0 and path.stat().st_ino == inode  # nothing to remove: not rewritten
    assert hook.erase("x", ["s1"]) == 2
    assert path.read_text().splitlines() == [json.dumps(rows[1]), json.dumps(rows[3]), "not json"]
    assert hook.export("x", ["s1"]) == []
