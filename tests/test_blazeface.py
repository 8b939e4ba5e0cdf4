"""BlazeFace backend: runs mediapipe's tflite models from models/mediapipe/ (no downloads)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("ai_edge_litert")

from livekit_proctor.analyzer.detectors.base import Face  # noqa: E402
from livekit_proctor.analyzer.detectors.blazeface import BlazeFaceDetector, model_file, ssd_anchors  # noqa: E402
from tests.conftest import load_rgb, oep_frames, shared_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
data_dir = shared_data  # None when ../shared/data is absent


@pytest.fixture(scope="module")
def full() -> BlazeFaceDetector:
    return BlazeFaceDetector("full", score_threshold=0.5)


@pytest.fixture(scope="module")
def short() -> BlazeFaceDetector:
    return BlazeFaceDetector("short", score_threshold=0.5)


def test_model_files_ship_with_mediapipe() -> None:
    for variant in ("full", "short"):
        path = model_file(variant)
        assert path.is_file() and path.suffix == ".tflite"


def test_anchor_counts_match_mediapipe() -> None:
    assert len(ssd_anchors(128, (8, 16, 16, 16), 1.0)) == 896
    assert len(ssd_anchors(192, (4,), 0.0)) == 2304


def test_names(full: BlazeFaceDetector, short: BlazeFaceDetector) -> None:
    assert full.name == "mediapipe.blazeface_full_range"
    assert short.name == "mediapipe.blazeface_short_range"


def test_bad_arguments(full: BlazeFaceDetector) -> None:
    with pytest.raises(ValueError):
        BlazeFaceDetector("medium")
    with pytest.raises(ValueError):
        full.detect(np.zeros((48, 64), np.uint8))
    with pytest.raises(ValueError):
        full.detect(np.zeros((48, 64, 3), np.float32))
    with pytest.raises(ValueError):
        full.detect(np.zeros((48, 64, 4), np.uint8))


@pytest.mark.parametrize("variant", ["full", "short"])
def test_black_image_has_no_face(variant: str) -> None:
    det = BlazeFaceDetector(variant, score_threshold=0.3)
    assert det.detect(np.zeros((480, 640, 3), np.uint8)) == []


def test_couple_has_two_faces(full: BlazeFaceDetector) -> None:
    rgb = load_rgb("faces/multi_face/deepface__couple.jpg")
    faces = full.detect(rgb)
    assert len(faces) == 2
    w = rgb.shape[1]
    for face in faces:
        assert isinstance(face, Face)
        assert set(face.keypoints) == {
            "right_eye",
            "left_eye",
            "nose_tip",
            "mouth_center",
            "right_ear_tragion",
            "left_ear_tragion",
        }
        # Eyes and nose lie inside the face box.
        b = face.box
        for name in ("right_eye", "left_eye", "nose_tip"):
            x, y = face.keypoints[name]
            assert b.x <= x <= b.x + b.w and b.y <= y <= b.y + b.h
        assert 0.5 <= face.score <= 1.0
    # The two faces are side by side, not the same face twice.
    xs = sorted(f.box.x + f.box.w / 2 for f in faces)
    assert xs[1] - xs[0] > 0.1 * w


def test_sorted_by_score(full: BlazeFaceDetector) -> None:
    faces = full.detect(load_rgb("faces/multi_face/deepface__selfie-many-people.jpg"))
    assert len(faces) >= 2
    scores = [f.score for f in faces]
    assert scores == sorted(scores, reverse=True)


def test_threshold_really_filters() -> None:
    low = BlazeFaceDetector("full", score_threshold=0.2)
    high = BlazeFaceDetector("full", score_threshold=0.8)
    total_low = total_high = 0
    for rel in [*oep_frames(8), "faces/multi_face/deepface__selfie-many-people.jpg"]:
        rgb = load_rgb(rel)
        n_low, faces_high = len(low.detect(rgb)), high.detect(rgb)
        assert n_low >= len(faces_high), rel
        assert all(f.score >= 0.8 for f in faces_high)
        total_low += n_low
        total_high += len(faces_high)
    # The threshold must change results somewhere (mediapipe's legacy API ignores it).
    assert total_low > total_high


@pytest.mark.parametrize("variant", ["full", "short"])
def test_boxes_inside_image(variant: str) -> None:
    det = BlazeFaceDetector(variant, score_threshold=0.3)
    for rel in [*oep_frames(4), "faces/multi_face/deepface__selfie-many-people.jpg"]:
        rgb = load_rgb(rel)
        h, w = rgb.shape[:2]
        for face in det.detect(rgb):
            b = face.box
            assert b.w > 0 and b.h > 0
            assert 0 <= b.x and b.x + b.w <= w + 1e-6
            assert 0 <= b.y and b.y + b.h <= h + 1e-6


def test_letterbox_is_undone_for_portrait_and_landscape(full: BlazeFaceDetector) -> None:
    # The same face padded to portrait or landscape must map back to the same place.
    rgb = load_rgb("faces/multi_face/deepface__couple.jpg")
    h, w = rgb.shape[:2]
    base = full.detect(rgb)
    for pad in (((0, h // 2), (0, 0), (0, 0)), ((0, 0), (0, w // 2), (0, 0))):
        padded = np.pad(rgb, pad)
        faces = full.detect(padded)
        assert len(faces) == len(base)
        by_x = sorted(faces, key=lambda f: f.box.x)
        for a, b in zip(sorted(base, key=lambda f: f.box.x), by_x, strict=True):
            assert abs(a.box.x - b.box.x) < 0.05 * a.box.w
            assert abs(a.box.y - b.box.y) < 0.05 * a.box.h


def test_concurrent_matches_sequential() -> None:
    det = BlazeFaceDetector("full", score_threshold=0.4)
    images = [load_rgb(rel) for rel in [*oep_frames(6), "faces/multi_face/deepface__couple.jpg"]]
    sequential = [det.detect(img) for img in images]
    jobs = images * 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(det.detect, jobs))
    for i, got in enumerate(concurrent):
        assert got == sequential[i % len(images)]
