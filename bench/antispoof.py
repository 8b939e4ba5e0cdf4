"""Presentation-attack heuristics on the shared data: the two human-models CNNs and the still-face tracker
(analyzer/detectors/antispoof.py).

Usage: python bench/antispoof.py [DATA_DIR] [--json]   (default: ../shared/data beside the repo)

Sets, each scored as a whole (every face, not a sample):
  oep      real faces: every OEP exam-webcam frame with a face (faces/webcam_oep), the largest face.
  photos   real faces (bona fide captures, not attacks): faces/identity, faces/head_pose, faces/multi_face
           (every face found).
  attacks  anything in the shared data labelled spoof / print / screen / replay (manifest.csv). There is none at
           the time of writing: the script says so, and no separation figure can be claimed.
Per set and model: the score distribution (min, 5/25/50/75/95 percentiles, max; higher = "live"), then the
false-alarm rate on the OEP frames (share of real faces scored below the threshold) at candidate thresholds.
Cost: ms per face crop (crop + both models) beside one BlazeFace full-range detection in the same run, and the ratio.
Still face: the tracker over the shared videos (real people; "center_left_center" keeps the head still while the
eyes move), as a false-alarm check: its longest still run and whether it fired; then a synthetic attack made from
the same videos (a frozen face region over a moving scene, with camera noise): when it first fires.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from livekit_proctor.analyzer.detectors.antispoof import (  # noqa: E402
    AntiSpoofModels,
    StillFaceTracker,
    face_crop,
)
from livekit_proctor.analyzer.detectors.base import Face  # noqa: E402
from livekit_proctor.analyzer.detectors.blazeface import BlazeFaceDetector  # noqa: E402
from livekit_proctor.analyzer.detectors.facemesh import MediapipeFaceMesh  # noqa: E402

THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
ATTACK_WORDS = ("spoof", "print", "screen", "replay", "attack", "fake")
PHOTO_DIRS = ("faces/identity", "faces/head_pose", "faces/multi_face")
VIDEO_FPS = 5.0


def load_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot read {path}")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def distribution(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"n": 0}
    a = np.asarray(xs)
    q = np.percentile(a, [0, 5, 25, 50, 75, 95, 100])
    return {
        "n": len(xs),
        **{k: round(float(v), 4) for k, v in zip(("min", "p5", "p25", "p50", "p75", "p95", "max"), q, strict=True)},
    }


def attack_files(data: Path) -> list[str]:
    with (data / "manifest.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        text = " ".join(str(v) for v in r.values()).lower()
        if any(w in text for w in ATTACK_WORDS) and str(r.get("file", "")).lower().endswith((".jpg", ".jpeg", ".png")):
            out.append(str(r["file"]))
    return out


def score_sets(data: Path, det: BlazeFaceDetector, models: AntiSpoofModels) -> dict[str, dict[str, list[float]]]:
    sets: dict[str, list[tuple[np.ndarray, list[Face]]]] = {"oep": [], "photos": [], "attacks": []}
    with (data / "faces/webcam_oep/labels.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            rgb = load_rgb(data / r["file"])
            faces = det.detect(rgb)
            if faces:
                sets["oep"].append((rgb, [max(faces, key=lambda x: x.box.w * x.box.h)]))
    for d in PHOTO_DIRS:
        for p in sorted((data / d).rglob("*")):
            if p.suffix.lower() in (".jpg", ".jpeg", ".png"):
                rgb = load_rgb(p)
                if faces := det.detect(rgb):
                    sets["photos"].append((rgb, faces))
    for name in attack_files(data):
        rgb = load_rgb(data / name)
        if faces := det.detect(rgb):
            sets["attacks"].append((rgb, faces))
    out: dict[str, dict[str, list[float]]] = {}
    for name, items in sets.items():
        real, live = [], []
        for rgb, faces in items:
            for s in models.score(rgb, faces):
                real.append(s.real)
                live.append(s.live)
        out[name] = {"real": real, "live": live}
    return out


def cost(data: Path, det: BlazeFaceDetector, models: AntiSpoofModels, n: int = 30, repeat: int = 5) -> dict[str, float]:
    with (data / "faces/webcam_oep/labels.csv").open(newline="") as f:
        files = [r["file"] for r in csv.DictReader(f)][:n]
    frames = [load_rgb(data / x) for x in files]
    found = [(rgb, fs[0]) for rgb in frames if (fs := det.detect(rgb))]
    det_ms, crop_ms = [], []
    for _ in range(repeat):
        for rgb, face in found:
            t = time.perf_counter()
            det.detect(rgb)
            det_ms.append(1e3 * (time.perf_counter() - t))
            t = time.perf_counter()
            models.score_crops([face_crop(rgb, face)])
            crop_ms.append(1e3 * (time.perf_counter() - t))
    d, c = statistics.median(det_ms), statistics.median(crop_ms)
    return {
        "blazeface_ms": round(d, 3),
        "antispoof_per_crop_ms": round(c, 3),
        "ratio": round(c / d, 3),
        "faces": len(found),
    }


def still_face_videos(data: Path, det: BlazeFaceDetector, mesh: MediapipeFaceMesh) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for p in sorted((data / "video").glob("*.mp4")):
        tracker = StillFaceTracker()
        cap = cv2.VideoCapture(str(p))
        fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
        step, i, fired, longest = max(1, round(fps / VIDEO_FPS)), 0, 0, 0.0
        frames, prev, steps = 0, None, []  # steps: landmark motion between analysed frames / face size
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            i += 1
            if (i - 1) % step:
                continue
            frames += 1
            ts = (i - 1) / fps
            rgb = np.ascontiguousarray(bgr[:, :, ::-1])
            faces = det.detect(rgb)
            face = max(faces, key=lambda x: x.box.w * x.box.h) if faces else None
            m = mesh.estimate(rgb, face) if face else None
            thumb = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (64, 48), interpolation=cv2.INTER_AREA)
            box = face.box if face else None
            pts = m.landmarks[:, :2] if m else None
            if pts is not None and prev is not None and box is not None:
                steps.append(float(np.median(np.linalg.norm(pts - prev, axis=1))) / max(box.w, box.h))
            prev = pts
            hit = tracker.update(ts, thumb, (rgb.shape[1], rgb.shape[0]), box, m.landmarks if m else None)
            t0 = tracker._t0  # the start of the current still run (bench only)
            if t0 is not None:
                longest = max(longest, ts - t0)
            fired += hit is not None
        cap.release()
        out[p.name] = {
            "frames": frames,
            "longest_still_s": round(longest, 2),
            "frames_fired": fired,
            "step_motion": distribution(steps),
        }
    return out


def synthetic_photo_attack(
    data: Path, det: BlazeFaceDetector, mesh: MediapipeFaceMesh, seconds: float = 15.0, noise: float = 3.0
) -> dict[str, Any]:
    """A still photo in front of a moving scene, made from the shared data: the face region (box widened by half
    its size) of the first frame of proctoring_ai__center_focus.mp4 pasted, unchanged, onto the frames of
    face_recognition__short_hamilton_clip.mp4 (a moving scene, looped), with camera noise (Gaussian, sigma `noise`
    grey levels) on every frame. Reports when the tracker first fires and the detector's landmark jitter."""
    cap = cv2.VideoCapture(str(data / "video/proctoring_ai__center_focus.mp4"))
    ok, bgr = cap.read()
    cap.release()
    if not ok:
        return {}
    photo = np.ascontiguousarray(bgr[:, :, ::-1])
    h, w = photo.shape[:2]
    face0 = max(det.detect(photo), key=lambda x: x.box.w * x.box.h)
    b = face0.box
    x0, y0 = max(0, int(b.x - b.w / 2)), max(0, int(b.y - b.h / 2))
    x1, y1 = min(w, int(b.x + b.w * 1.5)), min(h, int(b.y + b.h * 1.5))
    cap = cv2.VideoCapture(str(data / "video/face_recognition__short_hamilton_clip.mp4"))
    scene_frames = []
    while True:
        ok, sb = cap.read()
        if not ok:
            break
        scene_frames.append(cv2.resize(sb[:, :, ::-1], (w, h), interpolation=cv2.INTER_AREA))
    cap.release()
    rng = np.random.default_rng(0)
    tracker = StillFaceTracker()
    first, steps, prev = None, [], None
    n = int(seconds * VIDEO_FPS)
    for k in range(n):
        ts = k / VIDEO_FPS
        frame = scene_frames[(k * 5) % len(scene_frames)].copy()
        frame[y0:y1, x0:x1] = photo[y0:y1, x0:x1]
        frame = np.clip(frame.astype(np.float32) + rng.normal(0, noise, frame.shape), 0, 255).astype(np.uint8)
        faces = det.detect(frame)
        face = max(faces, key=lambda x: x.box.w * x.box.h) if faces else None
        m = mesh.estimate(frame, face) if face else None
        pts = m.landmarks[:, :2] if m else None
        if pts is not None and prev is not None and face is not None:
            steps.append(float(np.median(np.linalg.norm(pts - prev, axis=1))) / max(face.box.w, face.box.h))
        prev = pts
        thumb = cv2.resize(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), (64, 48), interpolation=cv2.INTER_AREA)
        hit = tracker.update(ts, thumb, (w, h), face.box if face else None, m.landmarks if m else None)
        if hit is not None and first is None:
            first = {"at_s": ts, **hit.to_dict()}
    return {"frames": n, "first_fired": first, "step_motion": distribution(steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("data", nargs="?", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    data: Path = args.data
    if not (data / "manifest.csv").exists():
        raise SystemExit(f"no shared data at {data}")

    det = BlazeFaceDetector(variant="full", score_threshold=0.4)
    models = AntiSpoofModels()
    scores = score_sets(data, det, models)
    report: dict[str, Any] = {"models_verified": models.verified, "distributions": {}, "oep_false_alarm": {}}
    for set_name, by_model in scores.items():
        for model, xs in by_model.items():
            report["distributions"][f"{set_name}.{model}"] = distribution(xs)
    for model, xs in scores["oep"].items():
        report["oep_false_alarm"][model] = {str(t): round(float(np.mean(np.asarray(xs) < t)), 4) for t in THRESHOLDS}
    # A rule that needs both models to agree: real < t and live < t.
    real_oep, live_oep = np.asarray(scores["oep"]["real"]), np.asarray(scores["oep"]["live"])
    report["oep_false_alarm"]["both"] = {
        str(t): round(float(np.mean((real_oep < t) & (live_oep < t))), 4) for t in THRESHOLDS
    }
    report["attack_faces"] = len(scores["attacks"]["real"])
    report["cost"] = cost(data, det, models)
    mesh = MediapipeFaceMesh()
    report["still_face_videos"] = still_face_videos(data, det, mesh)
    report["still_face_synthetic_attack"] = synthetic_photo_attack(data, det, mesh)

    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"models verified against the manifest: {report['models_verified']}")
    print("score distributions (higher = 'live'):")
    for k, d in report["distributions"].items():
        print(f"  {k:16s} {d}")
    print("false alarms on OEP real faces (share scored below the threshold):")
    for model, rates in report["oep_false_alarm"].items():
        print(f"  {model:5s} " + "  ".join(f"<{t}: {100 * r:5.1f}%" for t, r in rates.items()))
    if report["attack_faces"] == 0:
        print("attacks: the shared data has NO image labelled spoof/print/screen/replay: no separation can be claimed")
    c = report["cost"]
    per, bf = c["antispoof_per_crop_ms"], c["blazeface_ms"]
    print(f"cost: {per} ms per face (crop + both models) vs BlazeFace full {bf} ms -> {c['ratio']} x one detection")
    print("still-face tracker on the shared videos (real people; any firing is a false alarm):")
    for name, v in report["still_face_videos"].items():
        print(f"  {name:45s} {v}")
    print("still-face tracker on a synthetic photo (still face region, moving scene, camera noise sigma 3):")
    print(f"  {report['still_face_synthetic_attack']}")


if __name__ == "__main__":
    main()
