"""Face verification through the REST routes: a real analyzer on loopback, enrollment and verification over HTTP.

Usage: python bench/verify_api.py [DATA_DIR] [--webcam] [--json]   (default: ../shared/data beside the repo)

photos  faces/identity/pairs.csv: every distinct file_a is enrolled as a candidate (POST /api/v1/enroll with
        the file's own bytes), then every pair's file_b is verified against it (POST /api/v1/verify).
webcam  (--webcam) OEP frames (faces/webcam_oep/labels.csv, peer_present frames left out): every frame is
        offered for enrollment; each accepted one is enrolled as a candidate of its own and every other frame
        of every subject is verified against it (same subject = genuine).

Reported: ROC AUC, EER, TAR at FAR 1% of the similarity scores the route answers, the errors at the route's
threshold, the share of enrollments the quality checks rejected and why, verifications refused (422) and why,
and the cost of one verification (client-side wall time of the request, median) beside one BlazeFace detection
of the same images in this process.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import cv2
import httpx
import uvicorn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from face_verification import roc  # noqa: E402

from livekit_proctor.analyzer.detectors.blazeface import BlazeFaceDetector  # noqa: E402
from livekit_proctor.analyzer.detectors.faceembed import MATCH_THRESHOLD  # noqa: E402
from livekit_proctor.settings import Settings  # noqa: E402
from livekit_proctor.wiring import analyzer_app  # noqa: E402

KEY = "bench-admin-key"


class Server:
    def __init__(self, tmp: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        settings = Settings(
            host="127.0.0.1", port=self.port, data_dir=tmp, api_keys=f"{KEY}:admin", inference_workers=1
        )
        cfg = uvicorn.Config(analyzer_app(settings), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("analyzer did not start")
            time.sleep(0.05)
        self.client = httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}", headers={"Authorization": f"Bearer {KEY}"}, timeout=120
        )
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=15)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def enroll(c: httpx.Client, cid: str, path: Path, why: Counter[str]) -> bool:
    r = c.post("/api/v1/enroll", json={"candidate_id": cid, "image_base64": b64(path)})
    if r.status_code == 200:
        return True
    assert r.status_code == 422, r.text
    for code in {x["code"] for x in r.json()["images"][0]["reasons"]}:
        why[code] += 1
    return False


def verify(c: httpx.Client, cid: str, path: Path, refused: Counter[str], ms: list[float]) -> float | None:
    t0 = time.perf_counter()
    r = c.post("/api/v1/verify", json={"candidate_id": cid, "image_base64": b64(path)})
    ms.append((time.perf_counter() - t0) * 1000.0)
    if r.status_code == 200:
        return float(r.json()["similarity_score"])
    assert r.status_code == 422, r.text
    for code in {x["code"] for x in r.json()["images"][0]["reasons"]}:
        refused[code] += 1
    return None


def run_set(name: str, c: httpx.Client, enrolls: list[tuple[str, Path]], probes: list[tuple[str, Path, int]]) -> dict:
    why: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    ms: list[float] = []
    enrolled = {cid for cid, path in enrolls if enroll(c, cid, path, why)}
    if not enrolls:  # enrolled by the caller (webcam)
        enrolled = {cid for cid, _, _ in probes}
    genuine: list[float] = []
    impostor: list[float] = []
    scored: list[tuple[str, Path, int, float]] = []
    skipped = 0
    for cid, path, same in probes:
        if cid not in enrolled:
            skipped += 1
            continue
        s = verify(c, cid, path, refused, ms)
        if s is not None:
            (genuine if same else impostor).append(s)
            scored.append((cid, path, same, s))
    r = roc(genuine, impostor)
    thr = MATCH_THRESHOLD
    return {
        "set": name,
        "enrollments": len(enrolls),
        "enrollments_rejected": len(enrolls) - len(enrolled),
        "rejected_share": round((len(enrolls) - len(enrolled)) / max(1, len(enrolls)), 3),
        "rejected_why": dict(why),
        "pairs": len(probes),
        "pairs_skipped_no_enrollment": skipped,
        "verifications_refused": dict(refused),
        "genuine": r.genuine,
        "impostor": r.impostor,
        "auc": round(r.auc, 4),
        "eer": round(r.eer, 4),
        "eer_threshold": round(r.eer_threshold, 3),
        "tar_at_far1": round(r.tar_at_far1, 4),
        "far1_threshold": round(r.far1_threshold, 3),
        "threshold": thr,
        "frr_at_threshold": round(sum(g < thr for g in genuine) / max(1, len(genuine)), 4),
        "far_at_threshold": round(sum(i >= thr for i in impostor) / max(1, len(impostor)), 4),
        "verify_ms_median": round(statistics.median(ms), 1) if ms else None,
        "_probe_files": sorted({str(p) for _, p, _ in probes}),
        "_scored": scored,
    }


def photo_set(data: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, Path, int]]]:
    with (data / "faces/identity/pairs.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    ids = {a: f"photo-{i}" for i, a in enumerate(dict.fromkeys(r["file_a"] for r in rows))}
    enrolls = [(cid, data / a) for a, cid in ids.items()]
    probes = [(ids[r["file_a"]], data / r["file_b"], int(r["same_person"])) for r in rows]
    return enrolls, probes


def webcam(c: httpx.Client, data: Path) -> dict:
    """Every frame is offered for enrollment (as a candidate of its own); each frame enrollment accepts is then
    a reference: every other frame of every subject is verified against it (same subject = genuine). All
    enrollable frames are used, not only each subject's first, because the quality checks accept few exam-time
    frames and one reference per subject leaves too few genuine pairs to read an EER from."""
    with (data / "faces/webcam_oep/labels.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if "peer_present" not in r["condition"]]
    frames = [(r["oep_subject"], data / r["file"]) for r in sorted(rows, key=lambda r: r["file"])]
    why: Counter[str] = Counter()
    enrolled: list[tuple[str, str, Path]] = []  # (candidate id, subject, frame)
    for subject, p in frames:
        cid = f"oep-{p.stem}"
        if enroll(c, cid, p, why):
            enrolled.append((cid, subject, p))
    probes = [(cid, p, int(s == s2)) for cid, s, used in enrolled for s2, p in frames if p != used]
    out = run_set("webcam", c, [], probes)
    subject_of = {cid: s for cid, s, _ in enrolled}
    per: dict[str, str] = {}
    for subj in sorted(set(subject_of.values())):
        mine = [(same, x) for cid, _, same, x in out["_scored"] if subject_of[cid] == subj]
        g, i = [x for same, x in mine if same], [x for same, x in mine if not same]
        r, thr = roc(g, i), MATCH_THRESHOLD
        frr = 100 * sum(x < thr for x in g) / max(1, len(g))
        far = 100 * sum(x >= thr for x in i) / max(1, len(i))
        refs = sum(1 for cid in subject_of if subject_of[cid] == subj)
        per[subj] = (
            f"{refs} reference(s), {len(g)} genuine / {len(i)} impostor: EER {100 * r.eer:.1f}%, "
            f"FRR {frr:.1f}% FAR {far:.1f}% at {thr}"
        )
    out["per_subject"] = per
    subjects = {s for s, _ in frames}
    out.update(
        enrollments=len(frames),
        enrollments_rejected=len(frames) - len(enrolled),
        rejected_share=round((len(frames) - len(enrolled)) / max(1, len(frames)), 3),
        rejected_why=dict(why),
        subjects_enrolled=f"{len({s for _, s, _ in enrolled})} of {len(subjects)}",
        references=len(enrolled),
    )
    return out


def detection_ms(files: list[str]) -> float:
    det = BlazeFaceDetector(variant=Settings().face_model)
    times = []
    for f in files[:40]:
        bgr = cv2.imread(f)
        if bgr is None:
            continue
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        det.detect(rgb)
        t0 = time.perf_counter()
        det.detect(rgb)
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="?", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--webcam", action="store_true", help="also the OEP webcam frames")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    data = Path(a.data)
    if not (data / "faces/identity/pairs.csv").is_file():
        sys.exit(f"no shared data at {data}")
    results = []
    with tempfile.TemporaryDirectory() as tmp, Server(Path(tmp)) as c:
        results.append(run_set("photos", c, *photo_set(data)))
        if a.webcam:
            results.append(webcam(c, data))
    det = detection_ms(results[0]["_probe_files"])
    for r in results:
        r.pop("_probe_files", None)
        r.pop("_scored", None)
        if r.get("verify_ms_median"):
            r["blazeface_detect_ms_median"] = round(det, 2)
            r["verify_vs_detection"] = round(r["verify_ms_median"] / det, 1)
    if a.json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        print(f"== {r['set']} (through POST /api/v1/enroll and /api/v1/verify)")
        for k, v in r.items():
            if k != "set":
                print(f"  {k}: {v}")


if __name__ == "__main__":
    main()
