"""Face-count accuracy and speed of the BlazeFace backend on the shared face data.

Usage: python bench/face_accuracy.py [DATA_DIR]   (default: ../shared/data beside the repo)

Prints, per variant and score threshold, the share of frames whose detected face
count equals the label: over the webcam OEP frames (overall and per condition)
and over the multi-face photos, then the median ms per detect() at 640x480.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from livekit_proctor.analyzer.detectors.blazeface import BlazeFaceDetector  # noqa: E402

CONFIGS: list[tuple[str, float]] = [
    ("full", 0.3),
    ("full", 0.4),
    ("full", 0.5),
    ("full", 0.6),
    ("short", 0.5),
    ("short", 0.6),
]


def load(data: Path, labels: str) -> list[tuple[np.ndarray, int, str]]:
    rows = []
    with (data / labels).open(newline="") as f:
        for r in csv.DictReader(f):
            bgr = cv2.imread(str(data / r["file"]))
            if bgr is None:
                raise FileNotFoundError(data / r["file"])
            rows.append((cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), int(r["face_count"]), r.get("condition", "")))
    return rows


def pct(hits: int, n: int) -> str:
    return f"{100.0 * hits / n:.0f}% ({hits}/{n})" if n else "-"


def median_ms(det: BlazeFaceDetector, rgb: np.ndarray, runs: int = 50) -> float:
    for _ in range(5):  # warm-up: first invokes allocate and pack weights
        det.detect(rgb)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        det.detect(rgb)
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="?", type=Path, default=REPO.parent / "shared" / "data")
    args = ap.parse_args()

    oep = load(args.data, "faces/webcam_oep/labels.csv")
    multi = load(args.data, "faces/multi_face/face_counts.csv")
    conditions = sorted({c for _, _, c in oep})
    counts: defaultdict[str, int] = defaultdict(int)
    for _, _, c in oep:
        counts[c] += 1

    header = ["model", "thr", "OEP all", *[f"{c} (n={counts[c]})" for c in conditions], "multi_face"]
    lines = [header]
    for variant, thr in CONFIGS:
        det = BlazeFaceDetector(variant, score_threshold=thr)
        hits: dict[str, int] = defaultdict(int)
        for rgb, n, cond in oep:
            ok = len(det.detect(rgb)) == n
            hits["all"] += ok
            hits[cond] += ok
        multi_hits = sum(len(det.detect(rgb)) == n for rgb, n, _ in multi)
        lines.append(
            [
                variant,
                f"{thr:.1f}",
                pct(hits["all"], len(oep)),
                *[f"{100.0 * hits[c] / counts[c]:.0f}%" for c in conditions],
                pct(multi_hits, len(multi)),
            ]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    for row in lines:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))

    frame = cv2.resize(oep[0][0], (640, 480)) if oep else np.zeros((480, 640, 3), np.uint8)
    print()
    for variant in ("full", "short"):
        det = BlazeFaceDetector(variant, score_threshold=0.5)
        print(f"{det.name}: median {median_ms(det, frame):.2f} ms per detect() at 640x480 (1 thread)")


if __name__ == "__main__":
    main()
