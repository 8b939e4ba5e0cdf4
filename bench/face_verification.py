"""Face verification accuracy and cost of the FaceRes embedder (analyzer/detectors/faceembed.py) on the shared data.

Usage: python bench/face_verification.py [DATA_DIR] [--json]   (default: ../shared/data beside the repo)

Sets, each scored as a whole (every pair, not a sample):
  photos   faces/identity/pairs.csv: file_a vs file_b, same_person 1 / 0 (93 + 93 pairs).
  webcam   OEP webcam frames (faces/webcam_oep/labels.csv): every pair of frames with a face; same OEP subject =
           genuine, different subjects = impostor. The largest face of a frame is taken as the subject's. Frames
           labelled peer_present (two people in view) are left out of this set: which face is the subject is not
           labelled, and the largest one is often the peer; they are scored separately ("webcam+peer").
  template webcam, enrolled the way the routes will: the first 3 frames (by time) of a subject are enrolled,
           every other frame of every subject is a probe; score = the mean of the 3 cosine similarities
           ("mean": faceembed.match_score, what the routes and continuous verification use), the best of the 3
           ("max") or the cosine with the renormalised mean embedding ("template").
  verifiable the webcam sets restricted to faces faceembed.verification_problem lets through (landmarks found,
           detector score >= VERIFY_MIN_DETECTOR_SCORE): the faces the service scores at all.

Per set: ROC AUC, EER, the threshold at the EER, and TAR at FAR 1% (and the threshold giving it), for each
alignment choice (face-mesh landmarks / BlazeFace keypoints / box only), crop margin and input preprocessing;
then per OEP subject and per frame condition for the default configuration, and the cost per embedding
(alignment + model) in ms beside the cost of one BlazeFace detection in the same run.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from livekit_proctor.analyzer.detectors.base import Face, FaceMesh  # noqa: E402
from livekit_proctor.analyzer.detectors.blazeface import BlazeFaceDetector  # noqa: E402
from livekit_proctor.analyzer.detectors.faceembed import (  # noqa: E402
    DEFAULT_MARGIN,
    MATCH_THRESHOLD,
    Alignment,
    FaceEmbedder,
    FaceEmbedding,
    Preprocess,
    align,
    alignment_matrix,
    face_quality,
    match_score,
    verification_problem,
)
from livekit_proctor.analyzer.detectors.facemesh import MediapipeFaceMesh  # noqa: E402

ALIGNMENTS: tuple[Alignment, ...] = ("mesh", "keypoints", "box")
MARGINS = (0.0, 0.1, 0.2, 0.3)
PREPROCESS: tuple[Preprocess, ...] = ("bgr", "bgr_mean")
ENROLL_FRAMES = 3


# ---- metrics --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Roc:
    auc: float
    eer: float
    eer_threshold: float
    tar_at_far1: float
    far1_threshold: float
    genuine: int
    impostor: int

    def row(self) -> str:
        return (
            f"AUC {self.auc:.4f}  EER {100 * self.eer:5.1f}% @ {self.eer_threshold:.3f}  "
            f"TAR@FAR1% {100 * self.tar_at_far1:5.1f}% @ {self.far1_threshold:.3f}  "
            f"({self.genuine} genuine / {self.impostor} impostor)"
        )


def roc(genuine: list[float], impostor: list[float]) -> Roc:
    """AUC = P(genuine score > impostor score) (ties count half); EER where FAR and FRR cross (threshold
    at the score where |FAR - FRR| is smallest, EER their mean there; the middle of the gap when the sets do not
    overlap); TAR at the lowest threshold whose FAR <= 1%."""
    g = np.sort(np.asarray(genuine, np.float64))
    i = np.sort(np.asarray(impostor, np.float64))
    if not len(g) or not len(i):
        return Roc(float("nan"), float("nan"), float("nan"), float("nan"), float("nan"), len(g), len(i))
    below = np.searchsorted(i, g, side="left")  # impostors strictly below each genuine score
    ties = np.searchsorted(i, g, side="right") - below
    auc = float((below + 0.5 * ties).sum()) / (len(g) * len(i))
    thresholds = np.unique(np.concatenate([g, i, [np.inf]]))
    # A pair is accepted when score >= threshold.
    far = 1.0 - np.searchsorted(i, thresholds, side="left") / len(i)
    frr = np.searchsorted(g, thresholds, side="left") / len(g)
    gap = np.abs(far - frr)
    ties = np.nonzero(gap == gap.min())[0]
    k = int(ties[0])
    eer = float((far[k] + frr[k]) / 2.0)
    # Perfectly separated (or a flat stretch): the middle of the tied thresholds, not its lower edge.
    eer_thr = float(thresholds[k]) if len(ties) == 1 else float((thresholds[ties[0]] + thresholds[ties[-1]]) / 2.0)
    ok = np.nonzero(far <= 0.01)[0]
    j = int(ok[0])
    return Roc(auc, eer, eer_thr, float(1.0 - frr[j]), float(thresholds[j]), len(g), len(i))


# ---- data -----------------------------------------------------------------------------------------------


@dataclass
class Image:
    rel: str
    rgb: np.ndarray
    face: Face | None
    mesh: FaceMesh | None
    subject: str = ""
    condition: str = ""
    time_s: float = 0.0


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path))
    if bgr is None:
        raise FileNotFoundError(path)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def prepare(data: Path, rel: str, det: BlazeFaceDetector, mesher: MediapipeFaceMesh) -> Image:
    rgb = read_rgb(data / rel)
    faces = det.detect(rgb)
    face = max(faces, key=lambda f: f.box.w * f.box.h) if faces else None
    mesh = mesher.estimate(rgb, face) if face is not None else None
    return Image(rel, rgb, face, mesh)


def embed_all(images: list[Image], emb: FaceEmbedder, use: Alignment) -> dict[str, np.ndarray]:
    out = {}
    for im in images:
        if im.face is None:
            continue
        m, _ = alignment_matrix(im.face, im.mesh, emb.margin, use)
        out[im.rel] = emb.embed_aligned([align(im.rgb, m)])[0]
    return out


def score(e: dict[str, np.ndarray], a: str, b: str) -> float | None:
    if a not in e or b not in e:
        return None
    return float(e[a] @ e[b])


def photo_scores(pairs: list[tuple[str, str, int]], e: dict[str, np.ndarray]) -> tuple[list[float], list[float], int]:
    gen: list[float] = []
    imp: list[float] = []
    missing = 0
    for a, b, same in pairs:
        s = score(e, a, b)
        if s is None:
            missing += 1
            continue
        (gen if same else imp).append(s)
    return gen, imp, missing


def webcam_pairs(frames: list[Image], e: dict[str, np.ndarray]) -> list[tuple[Image, Image, float]]:
    usable = [f for f in frames if f.rel in e]
    return [(a, b, float(e[a.rel] @ e[b.rel])) for a, b in itertools.combinations(usable, 2)]


def split(pairs: list[tuple[Image, Image, float]]) -> tuple[list[float], list[float]]:
    gen = [s for a, b, s in pairs if a.subject == b.subject]
    imp = [s for a, b, s in pairs if a.subject != b.subject]
    return gen, imp


def template_scores(frames: list[Image], e: dict[str, np.ndarray], how: str) -> tuple[list[float], list[float]]:
    by_subject: dict[str, list[Image]] = defaultdict(list)
    for f in frames:
        if f.rel in e:
            by_subject[f.subject].append(f)
    enrolled: dict[str, list[str]] = {}
    for subj, fs in by_subject.items():
        fs.sort(key=lambda f: f.time_s)
        enrolled[subj] = [f.rel for f in fs[:ENROLL_FRAMES]]
    enrolled_files = {r for rs in enrolled.values() for r in rs}
    gen: list[float] = []
    imp: list[float] = []
    for subj, rels in enrolled.items():
        embs = np.stack([e[r] for r in rels])
        mean = embs.mean(axis=0)
        mean /= np.linalg.norm(mean)
        for f in frames:
            if f.rel not in e or f.rel in enrolled_files:
                continue
            if how == "mean":
                s = match_score(embs, e[f.rel])[0]
            elif how == "max":
                s = float((embs @ e[f.rel]).max())
            else:
                s = float(mean @ e[f.rel])
            (gen if f.subject == subj else imp).append(s)
    return gen, imp


def median_ms(fn: Any, runs: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


# ---- main -----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("data", nargs="?", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--json", action="store_true", help="also print one JSON line with the default config's figures")
    args = ap.parse_args()
    data: Path = args.data
    if not (data / "faces" / "identity" / "pairs.csv").exists():
        raise SystemExit(f"shared data not found under {data}")

    det = BlazeFaceDetector("full", score_threshold=0.4)
    mesher = MediapipeFaceMesh()

    with (data / "faces/identity/pairs.csv").open(newline="") as f:
        pairs = [(r["file_a"], r["file_b"], int(r["same_person"])) for r in csv.DictReader(f)]
    photo_files = sorted({p for a, b, _ in pairs for p in (a, b)})
    photos = [prepare(data, rel, det, mesher) for rel in photo_files]

    frames: list[Image] = []
    with (data / "faces/webcam_oep/labels.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            im = prepare(data, r["file"], det, mesher)
            im.subject, im.condition, im.time_s = r["oep_subject"], r["condition"], float(r["time_s"])
            frames.append(im)

    print(
        f"photos: {len(photos)} images, face found in {sum(p.face is not None for p in photos)}, "
        f"mesh in {sum(p.mesh is not None for p in photos)}"
    )
    print(
        f"webcam: {len(frames)} OEP frames, face found in {sum(p.face is not None for p in frames)}, "
        f"mesh in {sum(p.mesh is not None for p in frames)}; subjects "
        f"{', '.join(f'{s} x{n}' for s, n in sorted(_count(f.subject for f in frames if f.face).items()))}"
    )

    single = [f for f in frames if "peer_present" not in f.condition]
    results: dict[tuple[str, float, str], dict[str, Roc]] = {}
    print("\n== alignment x margin x preprocessing: EER and AUC on")
    print("   photos | webcam pairs | webcam pairs incl. peer_present frames | webcam template mean | max")
    for pre in PREPROCESS:
        for use in ALIGNMENTS:
            for margin in MARGINS:
                emb = FaceEmbedder(margin=margin, preprocess=pre)
                e_ph = embed_all(photos, emb, use)
                e_wc = embed_all(frames, emb, use)
                g, i, _ = photo_scores(pairs, e_ph)
                rocs = {
                    "photos": roc(g, i),
                    "webcam": roc(*split(webcam_pairs(single, e_wc))),
                    "webcam+peer": roc(*split(webcam_pairs(frames, e_wc))),
                    "template_mean": roc(*template_scores(single, e_wc, "mean")),
                    "template_max": roc(*template_scores(single, e_wc, "max")),
                }
                results[(use, margin, pre)] = rocs
                print(
                    f"{pre:8s} {use:9s} margin {margin:.1f}: "
                    + " | ".join(f"{100 * x.eer:4.1f}% {x.auc:.3f}" for x in rocs.values())
                )

    default = ("mesh", DEFAULT_MARGIN, "bgr_mean")
    print(f"\n== default: {default[0]} alignment, margin {default[1]}, {default[2]}")
    for name, rc in results[default].items():
        print(f"{name:14s} {rc.row()}")

    emb = FaceEmbedder()
    e_ph = embed_all(photos, emb, "mesh")
    e_wc = embed_all(frames, emb, "mesh")
    g, i, missing = photo_scores(pairs, e_ph)
    print(f"photos: {missing} pair(s) without a face in one image (left out)")

    # The verifiability gate (faceembed.verification_problem) and the scoring (match_score) the service uses.
    def problem(f: Image) -> str | None:
        if f.face is None or f.rel not in e_wc:
            return "no_face"
        _, used = alignment_matrix(f.face, f.mesh, emb.margin, "mesh")
        fe = FaceEmbedding(f.face, e_wc[f.rel], face_quality(f.rgb, f.face, f.mesh), used)
        p = verification_problem(fe)
        return p[0] if p else None

    problems = {f.rel: problem(f) for f in single}
    landmarks = [f for f in single if problems[f.rel] not in ("no_face", "no_landmarks")]
    verifiable = [f for f in single if problems[f.rel] is None]
    with_face = [f for f in single if problems[f.rel] != "no_face"]
    print("\n== webcam, the verifiability gate (faces the service scores at all; others are refused / skipped)")
    for name, fs in (("every face", with_face), ("landmarks found", landmarks), ("+ detector >= 0.5", verifiable)):
        print(f"{name:18s} {len(fs):2d} of {len(with_face)} faces  {roc(*split(webcam_pairs(fs, e_wc))).row()}")
    for how in ("mean", "max", "template"):
        print(f"3-frame {how:10s} {roc(*template_scores(verifiable, e_wc, how)).row()}")

    thr = MATCH_THRESHOLD
    print(f"\nat MATCH_THRESHOLD {thr:.2f}: photos FRR {_rate(g, thr, below=True)}, FAR {_rate(i, thr)}")
    wp = webcam_pairs(verifiable, e_wc)
    wg, wi = split(wp)
    print(f"          verifiable webcam pairs FRR {_rate(wg, thr, below=True)}, FAR {_rate(wi, thr)}")
    for how in ("mean", "max"):
        tg, ti = template_scores(verifiable, e_wc, how)
        print(f"          3-frame enrollment, {how:4s} FRR {_rate(tg, thr, below=True)}, FAR {_rate(ti, thr)}")
    wp = webcam_pairs(single, e_wc)  # the per-subject and per-condition tables below: every face, ungated

    print("\n== webcam, per OEP subject (its genuine pairs vs its impostor pairs)")
    for subj in sorted({f.subject for f in single if f.face}):
        sg = [s for a, b, s in wp if a.subject == b.subject == subj]
        si = [s for a, b, s in wp if a.subject != b.subject and subj in (a.subject, b.subject)]
        print(f"{subj:10s} {roc(sg, si).row()}")

    print("\n== webcam, genuine pairs by condition (both frames of the condition) vs all impostor pairs")
    wpp = webcam_pairs(frames, e_wc)
    for cond in sorted({f.condition for f in frames if f.face}):
        cg = [s for a, b, s in wpp if a.subject == b.subject and a.condition == b.condition == cond]
        print(f"{cond:18s} {roc(cg, wi).row()}")
    clean = {"normal", "glasses"}
    cg = [s for a, b, s in wp if a.subject == b.subject and a.condition in clean and b.condition in clean]
    ci = [s for a, b, s in wp if a.subject != b.subject and a.condition in clean and b.condition in clean]
    print(f"{'normal+glasses':18s} {roc(cg, ci).row()}")

    # Quality gating: a check is skipped (not counted) when either frame's quality score is below the gate.
    print("\n== webcam pairs, quality-gated (both frames' FaceQuality.score >= gate; others skipped)")
    qual = {f.rel: face_quality(f.rgb, f.face, f.mesh).score for f in single if f.face is not None}
    for gate in (0.0, 0.3, 0.5, 0.7):
        kept = [(a, b, s) for a, b, s in wp if min(qual[a.rel], qual[b.rel]) >= gate]
        n_frames = sum(1 for q in qual.values() if q >= gate)
        print(f"gate {gate:.1f} ({n_frames:2d} of {len(qual)} frames) {roc(*split(kept)).row()}")

    # Cost: alignment + model per face, single thread, beside one BlazeFace detection of the same frame.
    frame = next(f for f in frames if f.mesh is not None)
    assert frame.face is not None
    face, mesh = frame.face, frame.mesh
    t_embed = median_ms(lambda: emb.embed(frame.rgb, [face], [mesh]), 50)
    t_model = median_ms(lambda: emb.embed_aligned([align(frame.rgb, alignment_matrix(face, mesh)[0])]), 50)
    t_det = median_ms(lambda: det.detect(frame.rgb), 50)
    t_mesh = median_ms(lambda: mesher.estimate(frame.rgb, face), 50)
    h, w = frame.rgb.shape[:2]
    print(f"\n== cost ({w}x{h} frame, 1 thread, median of 50)")
    print(
        f"embedding (align + model + quality): {t_embed:.1f} ms = {t_embed / t_det:.1f} x BlazeFace detect "
        f"({t_det:.1f} ms); align + model only {t_model:.1f} ms; face mesh {t_mesh:.1f} ms"
    )
    print(
        f"a verification from a frame (detect + mesh + embed): {t_det + t_mesh + t_embed:.1f} ms "
        f"= {(t_det + t_mesh + t_embed) / t_det:.1f} x BlazeFace detect"
    )

    if args.json:
        out = {k: vars(v) for k, v in results[default].items()}
        out["cost_ms"] = {"embed": t_embed, "blazeface": t_det, "mesh": t_mesh}
        print(json.dumps(out))


def _count(items: Any) -> dict[str, int]:
    c: dict[str, int] = defaultdict(int)
    for x in items:
        c[x] += 1
    return dict(c)


def _rate(scores: list[float], thr: float, below: bool = False) -> str:
    n = sum(1 for s in scores if (s < thr if below else s >= thr))
    return f"{100.0 * n / len(scores):.1f}% ({n}/{len(scores)})" if scores else "-"


if __name__ == "__main__":
    main()
