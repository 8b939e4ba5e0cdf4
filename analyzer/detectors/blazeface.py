"""BlazeFace face detector: mediapipe's tflite models run with LiteRT, decoded here.

Why not mediapipe's own APIs: in mediapipe 0.10.21 the legacy
``FaceDetection(min_detection_confidence=...)`` ignores the threshold (the graph's
fixed 0.5 / 0.6 always applies) and the Tasks API cannot run the full-range model.
So we run the models (copied from the mediapipe wheel into models/mediapipe/) with
``ai_edge_litert`` and re-implement the graph around them, following mediapipe's
``face_detection.pbtxt``:

* ImageToTensorCalculator: keep aspect ratio, letterbox to the square input with
  zero (black) border, linear interpolation, float range [-1, 1];
* SsdAnchorsCalculator with the face detection options;
* TensorsToDetectionsCalculator (sigmoid score clipped at 100, boxes and
  keypoints relative to anchors, scales = input size);
* NonMaxSuppressionCalculator, WEIGHTED, IoU, min_suppression_threshold 0.3;
* DetectionProjectionCalculator: un-letterbox back to the image.

Nothing is downloaded: the model file comes from the installed mediapipe package.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from ai_edge_litert.interpreter import Interpreter

from livekit_proctor.analyzer.detectors.base import Box, Face, check_rgb
from livekit_proctor.analyzer.detectors.manifest import mediapipe_model, verify
from livekit_proctor.analyzer.signals import Signals
from livekit_proctor.analyzer.stages import Stage, StageSettings, service_setting

KEYPOINT_NAMES: tuple[str, ...] = (
    "right_eye",
    "left_eye",
    "nose_tip",
    "mouth_center",
    "right_ear_tragion",
    "left_ear_tragion",
)


@dataclass(frozen=True, slots=True)
class _Variant:
    file_name: str
    name: str
    input_size: int
    strides: tuple[int, ...]
    interpolated_scale_aspect_ratio: float


_VARIANTS: dict[str, _Variant] = {
    # Options from mediapipe/modules/face_detection/face_detection_{full,short}_range.pbtxt.
    "full": _Variant(
        file_name="face_detection_full_range_sparse.tflite",
        name="mediapipe.blazeface_full_range",
        input_size=192,
        strides=(4,),
        interpolated_scale_aspect_ratio=0.0,
    ),
    "short": _Variant(
        file_name="face_detection_short_range.tflite",
        name="mediapipe.blazeface_short_range",
        input_size=128,
        strides=(8, 16, 16, 16),
        interpolated_scale_aspect_ratio=1.0,
    ),
}

_SCORE_CLIP = 100.0  # TensorsToDetections score_clipping_thresh
_NUM_COORDS = 16  # 4 box values + 6 keypoints x 2


def _variant(variant: str) -> _Variant:
    try:
        return _VARIANTS[variant]
    except KeyError:
        known = sorted(_VARIANTS)
        raise ValueError(f"unknown BlazeFace variant {variant!r}; expected one of {known}") from None


def model_file(variant: str) -> Path:
    """Path of the BlazeFace tflite (models/mediapipe/face_detection/)."""
    return mediapipe_model(f"face_detection/{_variant(variant).file_name}")


def ssd_anchors(
    input_size: int,
    strides: tuple[int, ...],
    interpolated_scale_aspect_ratio: float,
    aspect_ratios: tuple[float, ...] = (1.0,),
    anchor_offset: float = 0.5,
) -> np.ndarray:
    """Anchor centres (N, 2) as x, y in [0, 1], like SsdAnchorsCalculator.

    With fixed_anchor_size every anchor is 1 x 1, so min/max scale only matter
    for how many anchors sit on each cell: one per aspect ratio, plus one for the
    interpolated scale when its aspect ratio is > 0, summed over consecutive
    layers that share a stride.
    """
    centres: list[np.ndarray] = []
    layer = 0
    while layer < len(strides):
        last = layer
        per_cell = 0
        while last < len(strides) and strides[last] == strides[layer]:
            per_cell += len(aspect_ratios) + (1 if interpolated_scale_aspect_ratio > 0.0 else 0)
            last += 1
        fm = int(np.ceil(input_size / strides[layer]))
        ys, xs = np.meshgrid(np.arange(fm), np.arange(fm), indexing="ij")
        grid = np.stack([(xs + anchor_offset) / fm, (ys + anchor_offset) / fm], axis=-1).reshape(-1, 2)
        # Order is y, x, anchor: each cell's anchors are consecutive.
        centres.append(np.repeat(grid, per_cell, axis=0))
        layer = last
    return np.concatenate(centres).astype(np.float32)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (xmin, ymin, xmax, ymax) box against many (mediapipe OverlapSimilarity)."""
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0.0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0.0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def weighted_nms(
    boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, iou_threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mediapipe's WEIGHTED non-max suppression.

    Take the best remaining detection; every remaining detection with IoU >
    threshold (itself included) is merged into it: box and keypoints become the
    score-weighted mean, the score stays the best one's. Repeat on the rest.
    boxes (N, 4) xyxy, keypoints (N, K, 2), scores (N,). Returns the kept ones,
    best first.
    """
    order = np.argsort(-scores, kind="stable")
    out_b: list[np.ndarray] = []
    out_k: list[np.ndarray] = []
    out_s: list[float] = []
    while order.size:
        top = order[0]
        sim = _iou(boxes[top], boxes[order])
        merged = order[sim > iou_threshold]
        if merged.size == 0:  # degenerate (zero-area) box: keep it as is
            merged = order[:1]
        w = scores[merged]
        total = float(w.sum())
        out_b.append((boxes[merged] * w[:, None]).sum(axis=0) / total)
        out_k.append((keypoints[merged] * w[:, None, None]).sum(axis=0) / total)
        out_s.append(float(scores[top]))
        order = order[(sim <= iou_threshold) & (order != top)]
    if not out_s:
        return np.zeros((0, 4), np.float32), np.zeros((0, keypoints.shape[1], 2), np.float32), np.zeros(0)
    return np.stack(out_b), np.stack(out_k), np.asarray(out_s)


class BlazeFaceDetector:
    """BlazeFace (full range: faces up to ~5 m; short range: within ~2 m, 128 px input)."""

    def __init__(
        self,
        variant: str = "full",
        score_threshold: float = 0.5,
        nms_iou: float = 0.3,
        model_path: str | None = None,
        num_threads: int = 1,
    ) -> None:
        self._v = _variant(variant)
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        self.name: str = self._v.name
        self.variant = variant
        self.score_threshold = float(score_threshold)
        self.nms_iou = float(nms_iou)
        self.num_threads = int(num_threads)
        path = Path(model_path) if model_path else model_file(variant)
        # Bytes are read once; each thread builds its own Interpreter from them
        # because a LiteRT Interpreter must not be invoked from two threads at once.
        self._model = path.read_bytes()
        self.verified = verify(self.name.removeprefix("mediapipe."), self._model) if not model_path else False
        self._local = threading.local()
        self._anchors = ssd_anchors(self._v.input_size, self._v.strides, self._v.interpolated_scale_aspect_ratio)
        # Build one interpreter now so a wrong model fails at construction, not mid-stream.
        self._interpreter()

    def _interpreter(self) -> tuple[Interpreter, int, int, int]:
        cached = getattr(self._local, "state", None)
        if cached is not None:
            return cached
        interp = Interpreter(model_content=self._model, num_threads=self.num_threads)
        interp.allocate_tensors()
        inp = interp.get_input_details()[0]
        size = self._v.input_size
        if tuple(inp["shape"]) != (1, size, size, 3) or inp["dtype"] != np.float32:
            raise ValueError(f"model input {inp['shape']} {inp['dtype']} is not float32 1x{size}x{size}x3")
        n = len(self._anchors)
        boxes_idx = scores_idx = -1
        # Output names differ between the two models ("regressors"/"Identity"), so go by shape.
        for out in interp.get_output_details():
            shape = tuple(out["shape"])
            if shape == (1, n, _NUM_COORDS):
                boxes_idx = out["index"]
            elif shape == (1, n, 1):
                scores_idx = out["index"]
        if boxes_idx < 0 or scores_idx < 0:
            shapes = [tuple(o["shape"]) for o in interp.get_output_details()]
            raise ValueError(f"model outputs {shapes} do not match {n} anchors x ({_NUM_COORDS}, 1)")
        state = (interp, inp["index"], boxes_idx, scores_idx)
        self._local.state = state
        return state

    def _letterbox(self, rgb: np.ndarray) -> tuple[np.ndarray, float, float, float]:
        """Image -> model tensor, plus (scale, pad_x, pad_y) mapping tensor px back to image px.

        Same transform as mediapipe's OpenCV ImageToTensor converter: the ROI is the
        whole image padded to a square of side max(h, w), centred, warped with its
        corners onto the tensor corners (no half-pixel shift), border 0.
        """
        h, w = rgb.shape[:2]
        size = self._v.input_size
        side = float(max(h, w))
        s = size / side
        pad_x = (side - w) / 2.0  # in image pixels
        pad_y = (side - h) / 2.0
        m = np.array([[s, 0.0, pad_x * s], [0.0, s, pad_y * s]], dtype=np.float64)
        warped = cv2.warpAffine(
            rgb, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )
        tensor = warped.astype(np.float32) * (2.0 / 255.0) - 1.0
        return tensor[None], side, pad_x, pad_y

    def detect(self, rgb: np.ndarray) -> list[Face]:
        rgb = check_rgb(rgb)
        h, w = rgb.shape[:2]

        interp, in_idx, boxes_idx, scores_idx = self._interpreter()
        tensor, side, pad_x, pad_y = self._letterbox(np.ascontiguousarray(rgb))
        interp.set_tensor(in_idx, tensor)
        interp.invoke()
        raw_boxes = interp.get_tensor(boxes_idx)[0]
        raw_scores = interp.get_tensor(scores_idx)[0, :, 0]

        # float64: exp(100) overflows float32 (harmless, but warns).
        logits = np.clip(raw_scores.astype(np.float64), -_SCORE_CLIP, _SCORE_CLIP)
        scores = 1.0 / (1.0 + np.exp(-logits))
        keep = scores >= self.score_threshold
        if not keep.any():
            return []
        raw = raw_boxes[keep].astype(np.float64)
        anchors = self._anchors[keep].astype(np.float64)
        scores = scores[keep]

        # Decode relative to anchors (all 1 x 1), in normalised tensor coordinates;
        # reverse_output_order: values come as x, y, w, h.
        size = float(self._v.input_size)
        cx = raw[:, 0] / size + anchors[:, 0]
        cy = raw[:, 1] / size + anchors[:, 1]
        bw = raw[:, 2] / size
        bh = raw[:, 3] / size
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
        kps = raw[:, 4:].reshape(-1, len(KEYPOINT_NAMES), 2) / size + anchors[:, None, :]
        # TensorsToDetections skips boxes with non-positive width or height.
        valid = (bw > 0) & (bh > 0)
        boxes, kps, scores = boxes[valid], kps[valid], scores[valid]

        boxes, kps, scores = weighted_nms(boxes, kps, scores, self.nms_iou)

        # Un-letterbox: tensor [0, 1] -> padded square of `side` px -> image px.
        offset = np.array([pad_x, pad_y])
        boxes_px = boxes * side - np.tile(offset, 2)
        kps_px = kps * side - offset
        # Clip boxes so callers can crop with them; keypoints stay unclipped
        # (ears of a face at the edge may legitimately fall outside).
        boxes_px[:, [0, 2]] = np.clip(boxes_px[:, [0, 2]], 0.0, w)
        boxes_px[:, [1, 3]] = np.clip(boxes_px[:, [1, 3]], 0.0, h)

        faces: list[Face] = []
        for b, k, sc in zip(boxes_px, kps_px, scores, strict=True):
            bw_px, bh_px = float(b[2] - b[0]), float(b[3] - b[1])
            if bw_px <= 0 or bh_px <= 0:  # entirely outside the image
                continue
            faces.append(
                Face(
                    box=Box(float(b[0]), float(b[1]), bw_px, bh_px),
                    score=float(sc),
                    keypoints={n: (float(p[0]), float(p[1])) for n, p in zip(KEYPOINT_NAMES, k, strict=True)},
                )
            )
        # weighted_nms already returns best first; sort again to make it a contract.
        faces.sort(key=lambda f: f.score, reverse=True)
        return faces


# ---- the stage (analyzer/stages.py)


class FaceSettings(StageSettings):
    face_model: str = service_setting("face_model")
    face_score_threshold: float = service_setting("face_score_threshold")


class FaceStage(Stage):
    """Faces on every analysed frame; the other stages and the rules build on it."""

    name = "face"
    writes = "faces"
    required = True
    settings_model = FaceSettings

    def __init__(self, settings: FaceSettings) -> None:
        super().__init__(settings)
        self.detector = BlazeFaceDetector(variant=settings.face_model, score_threshold=settings.face_score_threshold)
        self.model, self.verified = self.detector.name, self.detector.verified

    def run(self, media: np.ndarray, signals: Signals) -> list[Face]:
        return self.detector.detect(media)
