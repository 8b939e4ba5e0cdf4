"""Presentation-attack heuristics (analyzer/detectors/antispoof.py): the two shipped CNNs, the model-free still-face
tracker, and the stage that is registered but off by default."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

pytest.importorskip("cv2")
pytest.importorskip("onnxruntime")
pytest.importorskip("ai_edge_litert")

from livekit_proctor.analyzer.detectors.antispoof import (
    CROP_SIZE,
    AntiSpoofModels,
    AntiSpoofSettings,
    AntiSpoofStage,
    StillFaceTracker,
)
from livekit_proctor.analyzer.detectors.base import Box
from livekit_proctor.analyzer.detectors.manifest import MANIFEST
from livekit_proctor.analyzer.pipeline import ModelSet
from livekit_proctor.analyzer.stages import registered_stages
from livekit_proctor.settings import Settings
from tests.conftest import load_rgb


@pytest.fixture(scope="module")
def models() -> AntiSpoofModels:
    return AntiSpoofModels()


@pytest.mark.parametrize("name", ["antispoof", "liveness"])
def test_model_files_match_the_manifest(name: str, models: AntiSpoofModels) -> None:
    entry = next(m for m in json.loads(MANIFEST.read_text())["models"] if m["name"] == name)
    path = MANIFEST.parent / entry["file"].removeprefix("models/")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    assert models.verified is True


def test_scores_are_finite_and_in_range_on_a_shared_photo(models: AntiSpoofModels) -> None:
    rgb = load_rgb("faces/identity/angelina_jolie/deepface__img1.jpg")
    models_set = ModelSet.load(antispoof=True, objects_model="none", body_pose=False, segmentation=False)
    sig = models_set.analyze_rgb(rgb, 0, 0.0)
    s = sig.values["antispoof"]
    assert s is not None
    for v in (s.real, s.live):
        assert np.isfinite(v) and 0.0 <= v <= 1.0
    assert s.to_dict()["method"].startswith("heuristic:")  # labelled as what it is
    # A batch of crops gives one score pair per crop.
    real, live = models.score_crops([np.full((CROP_SIZE, CROP_SIZE, 3), 128, np.uint8)] * 3)
    assert real.shape == live.shape == (3,)


def _scene(rng: np.random.Generator, moving: bool, t: int) -> np.ndarray:
    """A 48 x 64 grey thumbnail: a textured background that changes every frame when `moving`."""
    base = np.random.default_rng(1).uniform(0, 255, (48, 64))
    return base if not moving else np.roll(base, 3 * t, axis=1) * 0.6 + rng.uniform(0, 100, (48, 64))


def _run(face_moves: bool, scene_moves: bool, seconds: float = 15.0, fps: float = 5.0) -> list[bool]:
    rng = np.random.default_rng(0)
    tracker = StillFaceTracker(still_s=10.0)
    lm0 = np.random.default_rng(2).uniform(280, 360, (478, 2))
    fired = []
    for t in range(int(seconds * fps)):
        shift = np.array([4.0 * np.sin(t / 3.0), 3.0 * np.cos(t / 4.0)]) if face_moves else np.zeros(2)
        lm = lm0 + shift + rng.normal(0, 0.05, lm0.shape)  # sub-pixel jitter of a detector on a still image
        box = Box(280.0 + shift[0], 280.0 + shift[1], 80.0, 80.0)
        hit = tracker.update(t / fps, _scene(rng, scene_moves, t), (640, 480), box, lm)
        fired.append(hit is not None)
    return fired


def test_still_face_tracker_fires_on_a_still_face_over_a_changing_scene() -> None:
    fired = _run(face_moves=False, scene_moves=True)
    assert not any(fired[: int(9.8 * 5)])  # not before still_s
    assert all(fired[int(10.2 * 5) :])


def test_still_face_tracker_stays_quiet_on_a_moving_face_or_a_static_scene() -> None:
    assert not any(_run(face_moves=True, scene_moves=True))
    assert not any(_run(face_moves=False, scene_moves=False))  # someone sitting very still in a quiet room


def test_still_face_tracker_uses_the_box_without_landmarks_and_resets_without_a_face() -> None:
    tracker = StillFaceTracker(still_s=1.0)
    rng = np.random.default_rng(0)
    box = Box(100.0, 100.0, 80.0, 80.0)
    hits = [tracker.update(t / 5, _scene(rng, True, t), (640, 480), box) for t in range(10)]
    assert hits[-1] is not None and hits[-1].points == "box"
    assert tracker.update(2.0, _scene(rng, True, 10), (640, 480), None) is None
    assert tracker.update(2.2, _scene(rng, True, 11), (640, 480), box) is None  # a new run starts


def test_stage_is_registered_and_off_by_default() -> None:
    assert AntiSpoofStage in registered_stages()
    assert Settings().antispoof is False
    assert AntiSpoofStage.enabled(AntiSpoofSettings()) is False
    models = ModelSet.load(objects_model="none", body_pose=False, segmentation=False)
    assert models.stage("antispoof") is None and "antispoof" in models.off
