"""Face embeddings (HSE FaceRes, models/faceres/faceres.onnx): the shipped file, alignment, verification on real
photo pairs, and the stage that is registered but off by default."""

from __future__ import annotations

import csv
import hashlib
import json

import cv2
import numpy as np
import pytest

pytest.importorskip("cv2")
pytest.importorskip("onnxruntime")
pytest.importorskip("ai_edge_litert")

from livekit_proctor.analyzer.detectors.base import Box, Face
from livekit_proctor.analyzer.detectors.faceembed import (
    EMBEDDING_DIM,
    INPUT_SIZE,
    MATCH_THRESHOLD,
    FaceEmbedder,
    FaceEmbeddingSettings,
    FaceEmbeddingStage,
    align,
    alignment_matrix,
    embed_image,
    match_score,
    similarity,
    similarity_transform,
    template,
)
from livekit_proctor.analyzer.detectors.manifest import MANIFEST
from livekit_proctor.analyzer.pipeline import ModelSet
from livekit_proctor.analyzer.stages import registered_stages
from livekit_proctor.settings import Settings
from tests.conftest import load_rgb, shared_data


@pytest.fixture(scope="module")
def embedder() -> FaceEmbedder:
    return FaceEmbedder()


def test_model_file_matches_the_manifest(embedder: FaceEmbedder) -> None:
    entry = next(m for m in json.loads(MANIFEST.read_text())["models"] if m["name"] == "faceres")
    path = MANIFEST.parent / entry["file"].removeprefix("models/")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    assert embedder.verified is True and embedder.name == "faceres.onnx"


def test_similarity_transform_recovers_a_known_warp() -> None:
    tpl = template(0.1)
    angle, scale, shift = np.deg2rad(12.0), 0.7, np.array([31.0, -8.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = (tpl - shift) @ np.linalg.inv(scale * rot).T  # points that the warp maps back onto the template
    m = similarity_transform(src, tpl)
    assert np.allclose(src @ m[:, :2].T + m[:, 2], tpl, atol=1e-6)


def test_alignment_gives_a_model_sized_face_and_a_unit_embedding(embedder: FaceEmbedder) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    kp = {"right_eye": (300.0, 200.0), "left_eye": (340.0, 202.0), "nose_tip": (320.0, 225.0),
          "mouth_center": (320.0, 250.0)}  # fmt: skip
    face = Face(Box(280.0, 170.0, 80.0, 100.0), 0.9, kp)
    m, used = alignment_matrix(face, None)
    assert used == "keypoints"
    crop = align(rgb, m)
    assert crop.shape == (INPUT_SIZE, INPUT_SIZE, 3) and crop.dtype == np.uint8
    # The eyes land on the template's eye points.
    eyes = np.array([kp["right_eye"], kp["left_eye"]]) @ m[:, :2].T + m[:, 2]
    assert np.abs(eyes - template()[:2]).max() < 3.0
    emb = embedder.embed_aligned([crop, crop])
    assert emb.shape == (2, EMBEDDING_DIM) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert alignment_matrix(Face(face.box, 0.9, {}), None)[1] == "box"
    with pytest.raises(ValueError):
        embedder.embed_aligned([rgb])


def _pairs(same: int, n: int) -> list[tuple[str, str]]:
    d = shared_data()
    if d is None:
        pytest.skip("shared data (../shared/data) not available")
    with (d / "faces/identity/pairs.csv").open(newline="") as f:
        rows = [(r["file_a"], r["file_b"]) for r in csv.DictReader(f) if int(r["same_person"]) == same]
    return rows[:: max(1, len(rows) // n)][:n]


def _embedding(rel: str) -> np.ndarray:
    faces = embed_image(load_rgb(rel))
    assert faces, f"no face found in {rel}"
    assert faces[0].alignment == "mesh"
    return faces[0].embedding


@pytest.mark.parametrize("same", [1, 0], ids=["same person", "different people"])
def test_verification_on_shared_photo_pairs(same: int) -> None:
    for a, b in _pairs(same, 4):
        s = similarity(_embedding(a), _embedding(b))
        if same:
            assert s >= MATCH_THRESHOLD, f"{a} vs {b}: {s:.3f} below {MATCH_THRESHOLD}"
        else:
            assert s < MATCH_THRESHOLD, f"{a} vs {b}: {s:.3f} not below {MATCH_THRESHOLD}"


def test_embed_image_reports_quality_and_no_faces_on_a_blank_image() -> None:
    assert embed_image(np.zeros((240, 320, 3), np.uint8)) == []
    (face,) = embed_image(load_rgb("faces/identity/angelina_jolie/deepface__img1.jpg"))
    q = face.quality
    assert q.face_px > 80 and q.sharpness > 0 and 0 < q.brightness < 255 and q.pose is not None
    assert 0.0 < q.score <= 1.0
    assert "embedding" not in json.dumps(face.to_dict())  # biometric data stays out of what gets logged


def test_stage_is_registered_loaded_by_default_and_can_be_switched_off() -> None:
    # Loaded by default for continuous verification; a session runs it only while it verifies (ModelClock.off).
    assert FaceEmbeddingStage in registered_stages()
    assert Settings().face_embedding is True
    assert FaceEmbeddingStage.enabled(FaceEmbeddingSettings(face_embedding=False)) is False
    models = ModelSet.load(face_embedding=False, objects_model="none", body_pose=False, segmentation=False)
    assert models.stage("face_embedding") is None and "face_embedding" in models.off


def test_stage_when_switched_on_embeds_the_face_in_view() -> None:
    rgb = load_rgb("faces/identity/angelina_jolie/deepface__img1.jpg")
    models = ModelSet.load(face_embedding=True, objects_model="none", body_pose=False, segmentation=False)
    stage = models.stage("face_embedding")
    assert stage is not None and stage.verified
    sig = models.analyze_rgb(rgb, 0, 0.0)
    (emb,) = sig.values["face_embeddings"]
    assert emb.alignment == "mesh"  # the face_mesh stage ran before it
    assert similarity(emb.embedding, _embedding("faces/identity/angelina_jolie/deepface__img1.jpg")) > 0.99


def test_match_score_is_the_mean_similarity_and_names_the_closest_embedding() -> None:
    e = np.eye(4, dtype=np.float32)
    probe = np.array([0.6, 0.8, 0.0, 0.0], np.float32)
    score, best = match_score(e[:3], probe)
    assert score == pytest.approx((0.6 + 0.8 + 0.0) / 3) and best == 1
    assert match_score(e[0], probe) == (pytest.approx(0.6), 0)  # one enrolled embedding: the plain cosine
    with pytest.raises(ValueError):
        match_score(np.zeros((0, 4)), probe)
    with pytest.raises(ValueError):
        match_score(e[:2], np.ones(3))


def test_sharpness_measures_blur_not_resolution() -> None:
    """The enrollment's sharpness check (>= 100) reads the face resized to 112 px: the same sharp photo passes
    at any size, and a blur that costs verification accuracy fails at any size."""
    rgb = load_rgb("faces/identity/angelina_jolie/deepface__img1.jpg")
    for side in (300, 600, 1200):
        s = side / max(rgb.shape[:2])
        img = cv2.resize(rgb, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        (sharp,) = embed_image(img)
        blurred_img = cv2.GaussianBlur(img, (0, 0), 1.5 * max(1.0, sharp.quality.face_px / 112.0))
        (blurred,) = embed_image(blurred_img)
        assert sharp.quality.sharpness >= 100 > blurred.quality.sharpness, (side, sharp.quality, blurred.quality)
