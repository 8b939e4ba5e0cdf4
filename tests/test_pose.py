"""Body pose backend: mediapipe's BlazePose tflite models (models/mediapipe/), run with LiteRT."""

from __future__ import annotations

import csv
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("ai_edge_litert")

from livekit_proctor.analyzer.detectors.base import BodyPose  # noqa: E402
from livekit_proctor.analyzer.detectors.pose import (  # noqa: E402
    DETECTOR_FILE,
    KEYPOINT_NAMES,
    LANDMARK_FILE,
    MediapipePose,
    hand_near_ear,
    model_file,
    shoulders_visible,
)
from tests.conftest import legacy_mediapipe, load_rgb, shared_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
data_dir = shared_data  # None when ../shared/data is absent

# Single-person photos (mediapipe keeps the best-scored person, we keep the largest: same person here).
PHOTOS = (
    "faces/identity/barack_obama/face_recognition__obama.jpg",
    "faces/identity/joe_biden/face_recognition__biden.jpg",
    "faces/head_pose/insightface__pose_left_face.jpeg",
    "faces/head_pose/insightface__reaction_close_eyes.jpeg",
)


def oep_rows() -> list[dict[str, str]]:
    d = data_dir()
    labels = d / "faces" / "webcam_oep" / "labels.csv" if d else None
    if labels is None or not labels.is_file():
        pytest.skip("shared OEP frames not available")
    with labels.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def pose() -> MediapipePose:
    return MediapipePose()


def test_model_files_ship_with_mediapipe() -> None:
    for rel in (DETECTOR_FILE, LANDMARK_FILE):
        assert model_file(rel).is_file()


def test_keypoint_names_match_mediapipe_enum() -> None:
    mp = legacy_mediapipe()
    assert tuple(lm.name.lower() for lm in mp.solutions.pose.PoseLandmark) == KEYPOINT_NAMES


def test_bad_arguments(pose: MediapipePose) -> None:
    for bad in (
        np.zeros((48, 64), np.uint8),
        np.zeros((48, 64, 3), np.float32),
        np.zeros((48, 64, 4), np.uint8),
        np.zeros((0, 64, 3), np.uint8),
        [[0, 0, 0]],
    ):
        with pytest.raises(ValueError):
            pose.estimate(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        MediapipePose(detection_threshold=1.5)
    with pytest.raises(ValueError):
        MediapipePose(num_threads=0)


def test_black_image_has_no_pose(pose: MediapipePose) -> None:
    assert pose.estimate(np.zeros((480, 640, 3), np.uint8)) is None


@pytest.mark.parametrize("rel", PHOTOS)
def test_agrees_with_legacy_solution(pose: MediapipePose, rel: str) -> None:
    mp = legacy_mediapipe()
    rgb = load_rgb(rel)
    h, w = rgb.shape[:2]
    with mp.solutions.pose.Pose(static_image_mode=True, model_complexity=1) as legacy:
        ref = legacy.process(rgb).pose_landmarks
    ours = pose.estimate(rgb)
    assert ref is not None and ours is not None
    assert list(ours.keypoints) == list(KEYPOINT_NAMES)
    a = np.array([ours.keypoints[n] for n in KEYPOINT_NAMES])
    b = np.array([[lm.x * w, lm.y * h, lm.visibility] for lm in ref.landmark])
    dist = np.hypot(a[:, 0] - b[:, 0], a[:, 1] - b[:, 1]) / max(h, w)
    seen = b[:, 2] >= 0.5
    # Measured: median 0.02 %, worst visible keypoint < 1 % of the image size.
    assert np.median(dist) < 0.01
    assert dist[seen].max() < 0.03
    assert np.abs(a[:, 2] - b[:, 2]).max() < 0.05
    assert 0.5 <= ours.score <= 1.0


def test_oep_normal_frames_show_both_shoulders(pose: MediapipePose) -> None:
    rows = [r for r in oep_rows() if r["condition"] == "normal"]
    assert rows
    seen = sum(shoulders_visible(pose.estimate(load_rgb(r["file"]))) for r in rows)
    # Measured: 17 / 17 (upper-body webcam framing, hips out of frame).
    assert seen / len(rows) >= 0.85, f"{seen}/{len(rows)}"


def test_oep_absent_frame_has_no_pose(pose: MediapipePose) -> None:
    rows = [r for r in oep_rows() if r["condition"] == "absent"]
    for r in rows:
        assert pose.estimate(load_rgb(r["file"])) is None


def test_keypoints_are_plausible_on_webcam_frame(pose: MediapipePose) -> None:
    rel = next(r["file"] for r in oep_rows() if r["condition"] == "normal")
    rgb = load_rgb(rel)
    p = pose.estimate(rgb)
    assert p is not None
    kp = p.keypoints
    h, w = rgb.shape[:2]
    assert 0 <= kp["nose"][0] <= w and 0 <= kp["nose"][1] <= h
    # Shoulders below the nose; the subject's left shoulder on the image's right (camera view).
    assert kp["left_shoulder"][1] > kp["nose"][1] and kp["right_shoulder"][1] > kp["nose"][1]
    assert kp["left_shoulder"][0] > kp["right_shoulder"][0]


def test_main_person_is_the_largest() -> None:
    small = (0.99, np.array([[100.0, 100.0], [100.0, 50.0], [100.0, 60.0], [100.0, 40.0]]))
    large = (0.60, np.array([[320.0, 400.0], [320.0, 100.0], [320.0, 200.0], [320.0, 120.0]]))
    chosen = MediapipePose._main_person([small, large], 640, 480)
    assert np.array_equal(chosen, large[1])


def test_concurrent_matches_sequential(pose: MediapipePose) -> None:
    images = [load_rgb(r["file"]) for r in oep_rows()[::15]] + [load_rgb(PHOTOS[0])]
    sequential = [pose.estimate(img) for img in images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(pose.estimate, images * 4))
    for i, got in enumerate(concurrent):
        assert got == sequential[i % len(images)]


# ---- rule-engine helpers on synthetic poses ---------------------------------------------------------


def synthetic(**overrides: tuple[float, float, float]) -> BodyPose:
    """Frontal upper body, 200 px shoulder width; every other keypoint invisible unless overridden."""
    kp = {n: (0.0, 0.0, 0.0) for n in KEYPOINT_NAMES}
    kp.update(
        nose=(320.0, 200.0, 0.99),
        left_ear=(370.0, 190.0, 0.95),
        right_ear=(270.0, 190.0, 0.95),
        left_shoulder=(420.0, 330.0, 0.98),
        right_shoulder=(220.0, 330.0, 0.98),
    )
    kp.update(overrides)
    return BodyPose(keypoints=kp, score=0.99)


def test_shoulders_visible() -> None:
    assert shoulders_visible(synthetic())
    assert not shoulders_visible(synthetic(left_shoulder=(420.0, 330.0, 0.2)))
    assert shoulders_visible(synthetic(left_shoulder=(420.0, 330.0, 0.2)), min_visibility=0.1)
    assert not shoulders_visible(None)


def test_hand_near_ear_near() -> None:
    # Right wrist 40 px from the right ear: 40 / 200 = 0.2.
    near, ratio = hand_near_ear(synthetic(right_wrist=(250.0, 225.0, 0.9)))
    assert near and ratio == pytest.approx(math.hypot(20, 35) / 200)
    # Index finger tip counts as well, and reaching across to the other ear too.
    near, ratio = hand_near_ear(synthetic(right_index=(380.0, 200.0, 0.9)))
    assert near and ratio == pytest.approx(math.hypot(10, 10) / 200)


def test_hand_near_ear_far() -> None:
    # Hands resting low on the desk: 250+ px below the ears.
    far = synthetic(left_wrist=(400.0, 470.0, 0.9), right_wrist=(240.0, 470.0, 0.9))
    near, ratio = hand_near_ear(far)
    assert not near and ratio > 1.0
    # The threshold is the caller's.
    assert hand_near_ear(far, max_dist_ratio=ratio + 0.01)[0]


def test_hand_near_ear_unmeasurable() -> None:
    # An invisible wrist at the ear does not count.
    assert hand_near_ear(synthetic(right_wrist=(270.0, 190.0, 0.1))) == (False, math.inf)
    # No shoulder width to scale by.
    no_shoulder = synthetic(right_wrist=(270.0, 190.0, 0.9), left_shoulder=(0.0, 0.0, 0.1))
    assert hand_near_ear(no_shoulder) == (False, math.inf)
    assert hand_near_ear(None) == (False, math.inf)
    with pytest.raises(ValueError):
        hand_near_ear(synthetic(), max_dist_ratio=-1.0)
