"""Face embeddings for enrollment and verification: HSE FaceRes (models/faceres/faceres.onnx) on aligned faces.

* Alignment: five points (the two eye centres, the nose tip, the two mouth corners) are mapped onto the
  ArcFace 112 x 112 template, scaled to the model's 224 x 224 input with a margin, by a least-squares similarity
  transform (rotation, uniform scale, shift). The points come from the face-mesh landmarks when there is a mesh
  (facemesh.py), else from BlazeFace's keypoints (eyes, nose tip, mouth centre: four points, the mouth centre
  matched to the middle of the template's mouth corners), else from the box alone.
* Model input: 224 x 224 NHWC BGR with the Caffe channel means subtracted, as upstream's Keras code fed it
  (measured better than plain 0-255 on every set, models/faceres/README.md); output 1024-d, L2-normalised here,
  so `similarity` (cosine) is a dot product.
* `embed_image(rgb)`: every face of a still image (detection, mesh, alignment, embedding, quality figures), for the
  enrollment / verify routes. `FaceEmbeddingStage`: the same in a live session, for continuous verification
  (analyzer/rules/verification.py); loaded unless the `face_embedding` setting is off, run only in sessions that
  verify an enrolled candidate, at their policy's interval (the session sets ModelClock.off / intervals).

`MATCH_THRESHOLD` was chosen from the ROC of bench/face_verification.py (models/faceres/README.md).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from livekit_proctor.analyzer.detectors.base import Box, Face, FaceMesh, HeadPose, check_rgb
from livekit_proctor.analyzer.detectors.manifest import models_dir, verify
from livekit_proctor.analyzer.detectors.objects import _read_model, _session  # the shared onnxruntime setup
from livekit_proctor.analyzer.signals import Signals
from livekit_proctor.analyzer.stages import Due, Stage, StageSettings, service_setting

MODEL_NAME = "faceres"
INPUT_SIZE = 224
EMBEDDING_DIM = 1024

# Cosine similarity (match_score) at or above which a face is taken as the enrolled person, chosen from the ROCs
# of bench/face_verification.py (models/faceres/README.md): the equal-error point of single webcam frame pairs
# among verifiable faces (0.604: FRR 2.4%, FAR 2.3% at 0.60), also the photo pairs' (0.599); with three enrolled
# frames the mean score keeps that operating point (FRR 1.7%, FAR 2.4%), where the best-of-3 would not (FAR 5.2%).
MATCH_THRESHOLD = 0.60

# What makes a face verifiable at all (verification_problem), from the same ROCs: without face-mesh landmarks
# (the face is turned away or covered, and alignment falls back to the detector's keypoints) or with a weak
# detection, single webcam pairs had an EER of 4.9%; keeping only faces with landmarks and a detector score of
# at least 0.5 brought it to 2.3% while keeping 47 of 52 faces. Such a face is reported, never scored.
VERIFY_MIN_DETECTOR_SCORE = 0.5

# Sharpness is the Laplacian variance of the face box resized to this many pixels a side, so that it measures
# blur rather than resolution: at the face's own size, 7 of 38 sharp shared photos read below 100 (large faces
# score low) while a blur of sigma 1 px at this size (a genuine-score loss of 0.02) already falls below 100.
SHARPNESS_SIZE = 112

# ArcFace's 5-point template for 112 x 112 crops (insightface): image-left eye, image-right eye, nose tip,
# image-left mouth corner, image-right mouth corner.
_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
# Extra border around the template face, as a fraction of the 112 px crop on each side (0: ArcFace's tight
# crop). Chosen with bench/face_verification.py (0.1: photo EER 0%, 0.2: 1.1%; webcam pairs within noise).
DEFAULT_MARGIN = 0.1

# Face-mesh landmarks of the five points: eye corners (centre = their mean), nose tip, mouth corners.
_MESH_EYES = ((33, 133), (362, 263))  # subject's right eye (image-left in a frontal face), left eye
_MESH_NOSE = 1
_MESH_MOUTH = (61, 291)

Alignment = Literal["mesh", "keypoints", "box"]
Preprocess = Literal["bgr", "bgr_mean"]
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)  # upstream's Keras preprocessing


def model_file() -> Path:
    """The bundled FaceRes ONNX file (under PROCTOR_MODELS_DIR when that is set)."""
    return models_dir() / "faceres" / "faceres.onnx"


def template(margin: float = DEFAULT_MARGIN, size: int = INPUT_SIZE) -> np.ndarray:
    """The 5 template points (5, 2) in pixels of a size x size crop with `margin` border."""
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    scale = size / (112.0 * (1.0 + 2.0 * margin))
    return (_TEMPLATE_112 - 56.0) * scale + size / 2.0


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama 1991, no reflection) mapping src (N, 2) onto dst (N, 2); 2 x 3 matrix."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - mu_s, dst - mu_d
    var_s = float((s**2).sum()) / len(src)
    if var_s <= 1e-12:
        raise ValueError("alignment points coincide")
    u, sig, vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.diag([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) >= 0 else -1.0])
    rot = u @ sign @ vt
    scale = float(np.trace(np.diag(sig) @ sign)) / var_s
    shift = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, shift[:, None]])


def mesh_points(landmarks: np.ndarray) -> np.ndarray:
    """The 5 alignment points (5, 2) from face-mesh landmarks (468 or 478 x 2/3, image pixels), template order."""
    lm = np.asarray(landmarks, np.float64)[:, :2]
    return np.array(
        [
            lm[list(_MESH_EYES[0])].mean(axis=0),
            lm[list(_MESH_EYES[1])].mean(axis=0),
            lm[_MESH_NOSE],
            lm[_MESH_MOUTH[0]],
            lm[_MESH_MOUTH[1]],
        ]
    )


def keypoint_points(face: Face) -> tuple[np.ndarray, np.ndarray] | None:
    """BlazeFace's eyes, nose tip and mouth centre (4, 2) and the matching template rows' indices, or None."""
    kp = face.keypoints
    names = ("right_eye", "left_eye", "nose_tip", "mouth_center")
    if not all(n in kp for n in names):
        return None
    # BlazeFace's "right_eye" is the subject's right eye: image-left in a frontal face, like template row 0.
    return np.array([kp[n] for n in names], np.float64), np.array([0, 1, 2, 3])


def alignment_matrix(
    face: Face, mesh: FaceMesh | None, margin: float = DEFAULT_MARGIN, use: Alignment = "mesh"
) -> tuple[np.ndarray, Alignment]:
    """The 2 x 3 matrix warping the image onto the 224 x 224 model input, and which points it used
    (`use` is the best source wanted: mesh, then keypoints, then box)."""
    tpl = template(margin)
    if use == "mesh" and mesh is not None and len(mesh.landmarks) >= 468:
        return similarity_transform(mesh_points(mesh.landmarks), tpl), "mesh"
    if use in ("mesh", "keypoints"):
        kp = keypoint_points(face)
        if kp is not None:
            pts, _ = kp
            dst = np.vstack([tpl[:3], tpl[3:].mean(axis=0)])  # mouth centre: middle of the mouth corners
            return similarity_transform(pts, dst), "keypoints"
    # The box alone: its centre and width onto the template's (eyes-to-mouth centre, 2 x inter-eye span).
    b = face.box
    src = np.array([[b.x, b.y], [b.x + b.w, b.y], [b.x, b.y + b.h], [b.x + b.w, b.y + b.h]])
    cx, cy = tpl[:, 0].mean(), tpl[:, 1].mean()
    half = (tpl[1, 0] - tpl[0, 0]) * 1.1  # a BlazeFace box is about 2.2 inter-eye spans wide
    dst = np.array([[cx - half, cy - half], [cx + half, cy - half], [cx - half, cy + half], [cx + half, cy + half]])
    return similarity_transform(src, dst), "box"


def align(rgb: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The aligned 224 x 224 x 3 RGB uint8 face."""
    return cv2.warpAffine(
        rgb, matrix, (INPUT_SIZE, INPUT_SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings (-1..1; FaceRes features are non-negative, so in practice 0..1)."""
    a = np.asarray(a, np.float64).reshape(-1)
    b = np.asarray(b, np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"embeddings differ in size: {a.shape} vs {b.shape}")
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(a @ b) / (na * nb)


def match_score(enrolled: Sequence[np.ndarray] | np.ndarray, probe: np.ndarray) -> tuple[float, int]:
    """The score every verification compares with MATCH_THRESHOLD (the /verify and verify-frame routes and
    continuous verification alike): the mean of the cosine similarities between the probe and each enrolled
    embedding, and the index of the most similar one (for the evidence). The mean, not the best: its operating
    point does not move with the number of enrolled images (bench/face_verification.py)."""
    refs = np.asarray(enrolled, np.float64)
    if refs.ndim == 1:
        refs = refs[None, :]
    if refs.shape[0] == 0:
        raise ValueError("no enrolled embedding to compare with")
    p = np.asarray(probe, np.float64).reshape(-1)
    if refs.shape[1] != p.shape[0]:
        raise ValueError(f"embeddings differ in size: {refs.shape[1]} vs {p.shape[0]}")
    norms = np.linalg.norm(refs, axis=1) * float(np.linalg.norm(p))
    sims = np.where(norms > 0.0, refs @ p / np.maximum(norms, 1e-12), 0.0)
    return float(sims.mean()), int(np.argmax(sims))


# ---- quality ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FaceQuality:
    """What the enrollment checks read (thresholds live with the routes, not here).

    sharpness: variance of the Laplacian of the grey face box resized to SHARPNESS_SIZE px (higher = sharper);
    brightness: mean grey level of the face box (0-255); pose: head pose from the mesh (None without one);
    face_px: the shorter side of the face box; score: 0-1 summary used to rank images of one candidate.
    """

    detector_score: float
    face_px: float
    sharpness: float
    brightness: float
    pose: HeadPose | None
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "detector_score": round(self.detector_score, 3),
            "face_px": round(self.face_px, 1),
            "sharpness": round(self.sharpness, 1),
            "brightness": round(self.brightness, 1),
            "pose": self.pose.to_dict() if self.pose else None,
            "score": round(self.score, 3),
        }


def face_quality(rgb: np.ndarray, face: Face, mesh: FaceMesh | None) -> FaceQuality:
    h, w = rgb.shape[:2]
    b = face.box
    x0, y0 = max(0, int(b.x)), max(0, int(b.y))
    x1, y1 = min(w, math.ceil(b.x + b.w)), min(h, math.ceil(b.y + b.h))
    grey = cv2.cvtColor(rgb[y0:y1, x0:x1], cv2.COLOR_RGB2GRAY) if x1 > x0 and y1 > y0 else np.zeros((1, 1), np.uint8)
    bright = float(grey.mean())
    # INTER_AREA: a large face is averaged down (what a blur would leave), a small one interpolated up.
    fixed = cv2.resize(grey, (SHARPNESS_SIZE, SHARPNESS_SIZE), interpolation=cv2.INTER_AREA)
    sharp = float(cv2.Laplacian(fixed, cv2.CV_64F).var())
    pose = mesh.head_pose if mesh is not None else None
    face_px = float(min(b.w, b.h))
    # Each factor 1 when comfortably good: face >= 112 px, sharpness >= 100, grey 60-200, |yaw|, |pitch| <= 30
    # (verification held up to about 45 deg in bench/face_verification.py; exam webcams see pitch -20 to -35).
    size_f = min(1.0, face_px / 112.0)
    sharp_f = min(1.0, sharp / 100.0)
    light_f = max(0.0, 1.0 - max(0.0, 60.0 - bright, bright - 200.0) / 60.0)
    pose_f = 1.0 if pose is None else max(0.0, 1.0 - max(0.0, max(abs(pose.yaw), abs(pose.pitch)) - 30.0) / 30.0)
    score = float(face.score) * size_f * sharp_f * light_f * pose_f
    return FaceQuality(float(face.score), face_px, sharp, bright, pose, score)


# ---- the embedder ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FaceEmbedding:
    """One face of an image: where it is, its L2-normalised embedding, its quality and how it was aligned."""

    face: Face
    embedding: np.ndarray  # (1024,) float32, unit length
    quality: FaceQuality
    alignment: Alignment

    @property
    def box(self) -> Box:
        return self.face.box

    def to_dict(self) -> dict[str, Any]:
        """For signals and debugging: never the embedding itself (biometric data stays out of logs)."""
        return {"box": self.box.to_dict(), "quality": self.quality.to_dict(), "alignment": self.alignment}


def confidence_problem(q: FaceQuality) -> tuple[str, str] | None:
    """("low_confidence", message) when the detection is too weak to verify the face (VERIFY_MIN_DETECTOR_SCORE),
    else None: the part of verification_problem that an enrollment image's quality alone can tell."""
    if q.detector_score < VERIFY_MIN_DETECTOR_SCORE:
        return (
            "low_confidence",
            f"the face was detected with confidence {q.detector_score:.2f}; "
            f"at least {VERIFY_MIN_DETECTOR_SCORE:.2f} needed to verify it",
        )
    return None


def verification_problem(e: FaceEmbedding) -> tuple[str, str] | None:
    """Why this face cannot be verified, as (reason code, message), or None when it can: one gate for every
    verification path (see VERIFY_MIN_DETECTOR_SCORE for how it was chosen)."""
    if e.alignment != "mesh":
        return "no_landmarks", "the face's landmarks were not found (turned away or covered), so it cannot be aligned"
    return confidence_problem(e.quality)


class FaceEmbedder:
    """HSE FaceRes with onnxruntime. Thread-safe: one InferenceSession (its run() is thread-safe), per-call buffers."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        margin: float = DEFAULT_MARGIN,
        preprocess: Preprocess = "bgr_mean",
        num_threads: int = 1,
    ) -> None:
        self.margin = float(margin)
        template(self.margin)  # validates
        if preprocess not in ("bgr", "bgr_mean"):
            raise ValueError(f"preprocess must be 'bgr' or 'bgr_mean', got {preprocess!r}")
        self.preprocess = preprocess
        path = Path(model_path) if model_path else model_file()
        self.name: str = "faceres.onnx" if model_path is None else f"faceres:{path.name}"
        data = _read_model(path, "FaceRes")
        self.verified = verify(MODEL_NAME, data) if model_path is None else False
        self._session = _session(data, num_threads)
        inp = self._session.get_inputs()[0]
        if list(inp.shape[1:]) != [INPUT_SIZE, INPUT_SIZE, 3]:
            raise ValueError(f"FaceRes model input {inp.shape} is not N x 224 x 224 x 3")
        self._input = inp.name
        self._output = self._session.get_outputs()[0].name

    def _tensor(self, faces: list[np.ndarray]) -> np.ndarray:
        x = np.stack([f[:, :, ::-1] for f in faces]).astype(np.float32)  # RGB -> BGR, 0-255
        if self.preprocess == "bgr_mean":
            x -= _CAFFE_MEAN_BGR
        return x

    def embed_aligned(self, aligned: list[np.ndarray]) -> np.ndarray:
        """Embeddings (N, 1024), unit length, of aligned 224 x 224 RGB uint8 faces."""
        if not aligned:
            return np.zeros((0, EMBEDDING_DIM), np.float32)
        for a in aligned:
            if a.shape != (INPUT_SIZE, INPUT_SIZE, 3) or a.dtype != np.uint8:
                raise ValueError(f"aligned faces must be 224 x 224 x 3 uint8, got {a.shape} {a.dtype}")
        out = np.asarray(self._session.run([self._output], {self._input: self._tensor(aligned)})[0], np.float32)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def embed(
        self, rgb: np.ndarray, faces: list[Face], meshes: list[FaceMesh | None] | None = None, use: Alignment = "mesh"
    ) -> list[FaceEmbedding]:
        """One FaceEmbedding per face (same order); meshes[i] (optional) belongs to faces[i]."""
        rgb = check_rgb(rgb)
        meshes = meshes if meshes is not None else [None] * len(faces)
        if len(meshes) != len(faces):
            raise ValueError(f"{len(faces)} faces but {len(meshes)} meshes")
        aligned, how = [], []
        for face, mesh in zip(faces, meshes, strict=True):
            m, used = alignment_matrix(face, mesh, self.margin, use)
            aligned.append(align(rgb, m))
            how.append(used)
        embs = self.embed_aligned(aligned)
        return [FaceEmbedding(face, embs[i], face_quality(rgb, face, meshes[i]), how[i]) for i in range(len(faces))]


# ---- still images (enrollment / verify routes) ----------------------------------------------------------

_shared: dict[str, Any] = {}
_shared_lock = threading.Lock()


def _models() -> tuple[Any, Any, FaceEmbedder]:
    """Detector, mesh and embedder shared by embed_image callers (loaded once, all thread-safe)."""
    with _shared_lock:
        if not _shared:
            from livekit_proctor.analyzer.detectors.blazeface import BlazeFaceDetector
            from livekit_proctor.analyzer.detectors.facemesh import MediapipeFaceMesh
            from livekit_proctor.settings import Settings

            s = Settings()
            _shared["detector"] = BlazeFaceDetector(variant=s.face_model, score_threshold=s.face_score_threshold)
            _shared["mesh"] = MediapipeFaceMesh()
            _shared["embedder"] = FaceEmbedder()
        return _shared["detector"], _shared["mesh"], _shared["embedder"]


def embed_image(rgb: np.ndarray) -> list[FaceEmbedding]:
    """Every face in one RGB image, largest first: its box, embedding (mesh-aligned where the mesh finds the
    face) and quality. An empty list when no face is found; the caller decides about several faces."""
    detector, mesher, embedder = _models()
    rgb = check_rgb(rgb)
    faces = sorted(detector.detect(rgb), key=lambda f: f.box.w * f.box.h, reverse=True)
    meshes = [mesher.estimate(rgb, f) for f in faces]
    result: list[FaceEmbedding] = embedder.embed(rgb, faces, meshes)
    return result


# ---- the stage (analyzer/stages.py)


class FaceEmbeddingSettings(StageSettings):
    face_embedding: bool = service_setting("face_embedding")


class FaceEmbeddingStage(Stage):
    """Embeddings of the faces in view (largest first, at most MAX_FACES) every INTERVAL_S of video (a session's
    verification_policy.interval_s overrides it). Each session switches it on only while it verifies an enrolled
    candidate (LiveSession, ModelClock.off): the model costs nothing in the others."""

    name = "face_embedding"
    writes = "face_embeddings"
    reads = ("faces",)  # and the mesh of the largest face when the face_mesh stage ran (optional)
    settings_model = FaceEmbeddingSettings
    INTERVAL_S = 2.0  # the default verification period (VerificationPolicy.interval_s)
    MAX_FACES = 2

    def __init__(self, settings: FaceEmbeddingSettings) -> None:
        super().__init__(settings)
        self.embedder = FaceEmbedder()
        self.model, self.verified = self.embedder.name, self.embedder.verified
        self._mesher: Any = None  # for the faces the mesh stage did not mesh (loaded on first need)
        self._mesher_lock = threading.Lock()

    @classmethod
    def enabled(cls, settings: FaceEmbeddingSettings) -> bool:
        return settings.face_embedding

    def due(self) -> Due:
        return Due(interval_s=self.INTERVAL_S, if_face=True)

    def _mesh(self, media: np.ndarray, face: Face) -> FaceMesh | None:
        with self._mesher_lock:
            if self._mesher is None:
                from livekit_proctor.analyzer.detectors.facemesh import MediapipeFaceMesh

                self._mesher = MediapipeFaceMesh()  # thread-safe: one pair of interpreters per thread
        mesh: FaceMesh | None = self._mesher.estimate(media, face)
        return mesh

    def run(self, media: np.ndarray, signals: Signals) -> list[FaceEmbedding]:
        faces: list[Face] = sorted(signals.values["faces"], key=lambda f: f.box.w * f.box.h, reverse=True)
        faces = faces[: self.MAX_FACES]
        mesh: FaceMesh | None = signals.values.get("mesh")
        # The mesh stage meshes the largest face only (when it ran on this frame); the others are meshed here, a
        # few ms every check, because a face without landmarks cannot be verified (verification_problem): the
        # candidate beside a larger stranger would go unchecked.
        meshes: list[FaceMesh | None] = [
            mesh if i == 0 and mesh is not None else self._mesh(media, f) for i, f in enumerate(faces)
        ]
        return self.embedder.embed(media, faces, meshes)
