"""Body pose (BlazePose full): mediapipe's tflite models run with LiteRT, decoded here.

Same route as blazeface.py: the two models from the mediapipe wheel (in models/mediapipe/)
are run with ``ai_edge_litert`` and the graph around them is re-implemented,
following mediapipe's ``pose_landmark_cpu.pbtxt`` in static-image mode:

1. ``pose_detection.tflite`` (PoseDetectionCpu): letterbox to 224x224, [-1, 1],
   zero border; 2254 SSD anchors (strides 8, 16, 32, 32, 32, fixed size);
   12 values per anchor = box + 4 keypoints (0: mid-hip, 1: full-body circle
   point, 2: mid-shoulder, 3: upper-body circle point); sigmoid score >= 0.5;
   weighted NMS at IoU 0.3.
2. PoseDetectionToRoi: centre = keypoint 0, side = 2 x |kp1 - kp0| x 1.25,
   rotated so that kp0 -> kp1 points up (target angle 90 degrees).
3. ``pose_landmark_full.tflite`` (PoseLandmarkByRoiCpu): the rotated square ROI
   warped corner-to-corner onto 256x256, [0, 1], replicated border; 39 x 5
   values (x, y, z, visibility, presence) of which the first 33 are the pose;
   pose flag >= 0.5 or no pose; x, y refined from the 64x64 heatmap (kernel 7,
   min confidence 0.5); visibility = sigmoid; projected back through the ROI.

Differences from mediapipe, on purpose: mediapipe keeps the detection with the
best score; we keep the *main* person (largest body circle, discounted when
far from the image centre), which is the candidate in an exam webcam even when
a peer behind them scores higher. Smoothing / tracking across frames is not
done: every call is an independent static image.

Upper-body webcam framing works because the detector extrapolates the hip
centre below the image; the ROI then extends past the bottom edge and is
filled with replicated border, as in mediapipe.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from ai_edge_litert.interpreter import Interpreter

from livekit_proctor.analyzer.detectors.base import BodyPose, check_rgb
from livekit_proctor.analyzer.detectors.blazeface import ssd_anchors, weighted_nms
from livekit_proctor.analyzer.detectors.manifest import mediapipe_model, verify
from livekit_proctor.analyzer.signals import Signals
from livekit_proctor.analyzer.stages import Due, Stage, StageSettings, service_setting

# mediapipe.solutions.pose.PoseLandmark, lower case, in model output order.
KEYPOINT_NAMES: tuple[str, ...] = (
    "nose",
    "left_eye_inner",
    "left_eye",
    "left_eye_outer",
    "right_eye_inner",
    "right_eye",
    "right_eye_outer",
    "left_ear",
    "right_ear",
    "mouth_left",
    "mouth_right",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_pinky",
    "right_pinky",
    "left_index",
    "right_index",
    "left_thumb",
    "right_thumb",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
    "left_heel",
    "right_heel",
    "left_foot_index",
    "right_foot_index",
)

DETECTOR_FILE = "modules/pose_detection/pose_detection.tflite"
LANDMARK_FILE = "modules/pose_landmark/pose_landmark_full.tflite"

# pose_detection_cpu.pbtxt
_DET_SIZE = 224
_DET_STRIDES = (8, 16, 32, 32, 32)
_DET_ANCHORS = 2254
_DET_COORDS = 12  # box (4) + 4 keypoints x 2
_SCORE_CLIP = 100.0
# pose_detection_to_roi.pbtxt
_ROI_SCALE = 1.25
# pose_landmark_by_roi_cpu.pbtxt / tensors_to_pose_landmarks_and_segmentation.pbtxt
_LM_SIZE = 256
_LM_ALL = 39  # 33 pose + 6 auxiliary (ROI for tracking)
_HEATMAP_KERNEL = 7
_HEATMAP_MIN_CONF = 0.5


@dataclass(frozen=True, slots=True)
class _Interpreters:
    """One thread's interpreters and tensor indices."""

    det: Interpreter
    det_in: int
    det_boxes: int
    det_scores: int
    lm: Interpreter
    lm_in: int
    lm_landmarks: int
    lm_flag: int
    lm_heatmap: int


def model_file(relative: str) -> Path:
    """Path of a pose tflite; `relative` as inside the mediapipe wheel ("modules/pose_detection/...")."""
    return mediapipe_model(relative.removeprefix("modules/"))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # float64 + clip: no overflow warnings for large negative logits.
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(x, np.float64), -_SCORE_CLIP, _SCORE_CLIP)))


def refine_from_heatmap(xy: np.ndarray, heatmap: np.ndarray, kernel: int, min_conf: float) -> np.ndarray:
    """RefineLandmarksFromHeatmapCalculator: x, y (N, 2, normalised to the tensor) -> refined copy.

    For each landmark, the sigmoid heatmap in a kernel x kernel window around it
    (clipped at the edges) gives a confidence-weighted mean position, used when
    the window's max confidence reaches min_conf. Integer cell = truncation of
    x * width, like the C++ cast; points outside the heatmap stay as they are.
    """
    hm_h, hm_w, channels = heatmap.shape
    out = xy.copy()
    off = (kernel - 1) // 2
    for i in range(min(len(xy), channels)):
        col = int(xy[i, 0] * hm_w)  # int() truncates toward zero, as the C++ cast
        row = int(xy[i, 1] * hm_h)
        # Same test as the C++ (which checks col against the height and never row
        # against it; a row just below the map still refines from the clipped window).
        if col < 0 or col >= hm_w or row < 0 or col >= hm_h:
            continue
        r0, r1 = max(0, row - off), min(hm_h, row + off + 1)
        c0, c1 = max(0, col - off), min(hm_w, col + off + 1)
        conf = _sigmoid(heatmap[r0:r1, c0:c1, i])
        if conf.size == 0:
            continue
        total = float(conf.sum())
        if total <= 0.0 or float(conf.max()) < min_conf:
            continue
        rows, cols = np.mgrid[r0:r1, c0:c1]
        out[i, 0] = float((cols * conf).sum()) / hm_w / total
        out[i, 1] = float((rows * conf).sum()) / hm_h / total
    return out


class MediapipePose:
    """Main person's 33 BlazePose keypoints (pixels, visibility 0-1) from one RGB image."""

    name: str = "mediapipe.pose_landmark_full"

    def __init__(
        self,
        detection_threshold: float = 0.5,
        presence_threshold: float = 0.5,
        nms_iou: float = 0.3,
        num_threads: int = 1,
        detector_path: str | None = None,
        landmark_path: str | None = None,
    ) -> None:
        for label, value in (("detection_threshold", detection_threshold), ("presence_threshold", presence_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{label} must be in [0, 1], got {value}")
        if not 0.0 < nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1], got {nms_iou}")
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.detection_threshold = float(detection_threshold)
        self.presence_threshold = float(presence_threshold)
        self.nms_iou = float(nms_iou)
        self.num_threads = int(num_threads)
        # Bytes are read once; each thread builds its own Interpreters from them
        # because a LiteRT Interpreter must not be invoked from two threads at once.
        self._det_model = (Path(detector_path) if detector_path else model_file(DETECTOR_FILE)).read_bytes()
        self._lm_model = (Path(landmark_path) if landmark_path else model_file(LANDMARK_FILE)).read_bytes()
        self.verified = (
            not detector_path
            and not landmark_path
            and verify("pose_detection", self._det_model)
            and verify("pose_landmark_full", self._lm_model)
        )
        self._anchors = ssd_anchors(_DET_SIZE, _DET_STRIDES, 1.0).astype(np.float64)
        if len(self._anchors) != _DET_ANCHORS:  # guards the anchor options above
            raise RuntimeError(f"{len(self._anchors)} anchors, expected {_DET_ANCHORS}")
        self._local = threading.local()
        # Build the interpreters now so a wrong model fails at construction, not mid-stream.
        self._interpreters()

    # ---- interpreters -----------------------------------------------------------------------------------

    def _interpreters(self) -> _Interpreters:
        state = getattr(self._local, "state", None)
        if state is not None:
            return state
        det = Interpreter(model_content=self._det_model, num_threads=self.num_threads)
        det.allocate_tensors()
        lm = Interpreter(model_content=self._lm_model, num_threads=self.num_threads)
        lm.allocate_tensors()
        for interp, size in ((det, _DET_SIZE), (lm, _LM_SIZE)):
            inp = interp.get_input_details()[0]
            if tuple(inp["shape"]) != (1, size, size, 3) or inp["dtype"] != np.float32:
                raise ValueError(f"model input {inp['shape']} {inp['dtype']} is not float32 1x{size}x{size}x3")
        # Output names are not stable between model versions, so go by shape.
        det_out = {tuple(o["shape"]): o["index"] for o in det.get_output_details()}
        lm_out = {tuple(o["shape"]): o["index"] for o in lm.get_output_details()}
        try:
            state = _Interpreters(
                det=det,
                det_in=det.get_input_details()[0]["index"],
                det_boxes=det_out[(1, _DET_ANCHORS, _DET_COORDS)],
                det_scores=det_out[(1, _DET_ANCHORS, 1)],
                lm=lm,
                lm_in=lm.get_input_details()[0]["index"],
                lm_landmarks=lm_out[(1, _LM_ALL * 5)],
                lm_flag=lm_out[(1, 1)],
                lm_heatmap=lm_out[(1, _LM_SIZE // 4, _LM_SIZE // 4, _LM_ALL)],
            )
        except KeyError as exc:
            raise ValueError(f"pose model outputs {sorted(det_out)} / {sorted(lm_out)} are not BlazePose") from exc
        self._local.state = state
        return state

    # ---- stage 1: detector ------------------------------------------------------------------------------

    def detect(self, rgb: np.ndarray) -> list[tuple[float, np.ndarray]]:
        """Pose detections as (score, keypoints (4, 2) in image pixels), best score first."""
        rgb = check_rgb(rgb)
        st = self._interpreters()
        h, w = rgb.shape[:2]
        # Letterbox like ImageToTensorCalculator (keep aspect, centred, corners to corners, zero border).
        side = float(max(h, w))
        s = _DET_SIZE / side
        pad_x, pad_y = (side - w) / 2.0, (side - h) / 2.0
        m = np.array([[s, 0.0, pad_x * s], [0.0, s, pad_y * s]])
        warped = cv2.warpAffine(rgb, m, (_DET_SIZE, _DET_SIZE), flags=cv2.INTER_LINEAR, borderValue=0)
        tensor = warped.astype(np.float32) * (2.0 / 255.0) - 1.0
        det = st.det
        det.set_tensor(st.det_in, tensor[None])
        det.invoke()
        raw = det.get_tensor(st.det_boxes)[0].astype(np.float64)
        scores = _sigmoid(det.get_tensor(st.det_scores)[0, :, 0])
        keep = scores >= self.detection_threshold
        if not keep.any():
            return []
        raw, anchors, scores = raw[keep], self._anchors[keep], scores[keep]
        # reverse_output_order: x, y, w, h relative to 1x1 anchors, scaled by the input size.
        cx = raw[:, 0] / _DET_SIZE + anchors[:, 0]
        cy = raw[:, 1] / _DET_SIZE + anchors[:, 1]
        bw, bh = raw[:, 2] / _DET_SIZE, raw[:, 3] / _DET_SIZE
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
        kps = raw[:, 4:].reshape(-1, 4, 2) / _DET_SIZE + anchors[:, None, :]
        valid = (bw > 0) & (bh > 0)
        if not valid.any():
            return []
        _, kps, scores = weighted_nms(boxes[valid], kps[valid], scores[valid], self.nms_iou)
        kps_px = kps * side - np.array([pad_x, pad_y])
        return [(float(sc), k) for sc, k in zip(scores, kps_px, strict=True)]

    @staticmethod
    def _main_person(dets: list[tuple[float, np.ndarray]], w: int, h: int) -> np.ndarray:
        """Keypoints of the main person: the largest body circle, discounted by distance from the centre."""
        centre = np.array([w / 2.0, h / 2.0])
        half_diag = math.hypot(w, h) / 2.0

        def weight(det: tuple[float, np.ndarray]) -> float:
            kp = det[1]
            size = float(np.linalg.norm(kp[1] - kp[0]))
            # Mid-shoulder, not mid-hip: with webcam framing the hips are extrapolated off-image.
            off = float(np.linalg.norm(kp[2] - centre)) / half_diag
            return size * (1.0 - 0.5 * min(off, 1.0))

        return max(dets, key=weight)[1]

    # ---- stage 2: landmarks -----------------------------------------------------------------------------

    def estimate(self, rgb: np.ndarray) -> BodyPose | None:
        rgb = check_rgb(rgb)
        h, w = rgb.shape[:2]
        dets = self.detect(rgb)
        if not dets:
            return None
        kp = self._main_person(dets, w, h)

        # PoseDetectionToRoi (AlignmentPointsRects + RectTransformation, square_long, scale 1.25).
        (x0, y0), (x1, y1) = kp[0], kp[1]
        side = 2.0 * math.hypot(x1 - x0, y1 - y0) * _ROI_SCALE
        if side < 1.0:
            return None
        angle = math.pi / 2 - math.atan2(-(y1 - y0), x1 - x0)
        angle -= 2 * math.pi * math.floor((angle + math.pi) / (2 * math.pi))  # NormalizeRadians
        cos_a, sin_a = math.cos(angle), math.sin(angle)

        # Tensor pixel p -> image: centre + R(angle) (p - 128) * side / 256 (ROI corners onto tensor corners).
        k = side / _LM_SIZE
        half = _LM_SIZE / 2.0
        to_image = np.array(
            [
                [cos_a * k, -sin_a * k, x0 - k * half * (cos_a - sin_a)],
                [sin_a * k, cos_a * k, y0 - k * half * (sin_a + cos_a)],
            ]
        )
        crop = cv2.warpAffine(
            rgb,
            to_image,
            (_LM_SIZE, _LM_SIZE),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )
        st = self._interpreters()
        lm = st.lm
        lm.set_tensor(st.lm_in, (crop.astype(np.float32) * (1.0 / 255.0))[None])
        lm.invoke()
        # The model's pose flag is already a probability (TensorsToFloats, no activation, in the graph).
        presence = float(lm.get_tensor(st.lm_flag)[0, 0])
        if presence < self.presence_threshold:
            return None
        raw = lm.get_tensor(st.lm_landmarks)[0].reshape(_LM_ALL, 5).astype(np.float64)
        heatmap = lm.get_tensor(st.lm_heatmap)[0]
        xy = refine_from_heatmap(raw[:, :2] / _LM_SIZE, heatmap, _HEATMAP_KERNEL, _HEATMAP_MIN_CONF)
        visibility = _sigmoid(raw[:, 3])

        # LandmarkProjectionCalculator: rotate about the ROI centre, scale by the ROI side.
        u, v = xy[:, 0] - 0.5, xy[:, 1] - 0.5
        px = (cos_a * u - sin_a * v) * side + x0
        py = (sin_a * u + cos_a * v) * side + y0
        keypoints = {name: (float(px[i]), float(py[i]), float(visibility[i])) for i, name in enumerate(KEYPOINT_NAMES)}
        return BodyPose(keypoints=keypoints, score=presence)


# ---- helpers for the rule engine ----------------------------------------------------------------------


def shoulders_visible(pose: BodyPose | None, min_visibility: float = 0.5) -> bool:
    """True when both shoulders are in view (visibility >= min_visibility).

    Webcam framing normally shows the head and shoulders; both missing usually
    means the candidate leaned out of frame or is too close to the camera.
    """
    return (
        pose is not None
        and pose.visible("left_shoulder", min_visibility)
        and pose.visible("right_shoulder", min_visibility)
    )


_EARS = ("left_ear", "right_ear")
_HAND_POINTS = ("left_wrist", "right_wrist", "left_index", "right_index")


def hand_near_ear(
    pose: BodyPose | None, max_dist_ratio: float = 0.6, min_visibility: float = 0.5
) -> tuple[bool, float]:
    """Is a hand held at an ear (phone call, earpiece)?

    Measures the smallest distance between any visible wrist or index finger tip
    and any visible ear (either side: a hand reaching across counts too),
    divided by the shoulder width so the figure does not depend on how far the
    candidate sits from the camera. Returns (ratio <= max_dist_ratio, ratio).
    The ratio is ``math.inf`` when it cannot be measured: no pose, a shoulder
    or both ears or all hand points below min_visibility, or zero shoulder width.
    """
    if max_dist_ratio < 0:
        raise ValueError(f"max_dist_ratio must be >= 0, got {max_dist_ratio}")
    if pose is None or not shoulders_visible(pose, min_visibility):
        return False, math.inf
    ls, rs = pose.keypoints["left_shoulder"], pose.keypoints["right_shoulder"]
    width = math.hypot(ls[0] - rs[0], ls[1] - rs[1])
    if width <= 1e-6:
        return False, math.inf
    ears = [pose.keypoints[n] for n in _EARS if pose.visible(n, min_visibility)]
    hands = [pose.keypoints[n] for n in _HAND_POINTS if pose.visible(n, min_visibility)]
    if not ears or not hands:
        return False, math.inf
    ratio = min(math.hypot(e[0] - p[0], e[1] - p[1]) for e in ears for p in hands) / width
    return ratio <= max_dist_ratio, ratio


# ---- the stage (analyzer/stages.py)


class PoseSettings(StageSettings):
    body_pose: bool = service_setting("body_pose")
    pose_fps: float = service_setting("pose_fps")


class PoseStage(Stage):
    """The candidate's body pose at pose_fps (None when no body is found)."""

    name = "pose"
    writes = "pose"
    settings_model = PoseSettings

    def __init__(self, settings: PoseSettings) -> None:
        super().__init__(settings)
        self.estimator = MediapipePose()
        self.model, self.verified = self.estimator.name, self.estimator.verified

    @classmethod
    def enabled(cls, settings: PoseSettings) -> bool:
        return settings.body_pose

    def due(self) -> Due:
        return Due(interval_s=1.0 / self.settings.pose_fps)

    def run(self, media: np.ndarray, signals: Signals) -> BodyPose | None:
        return self.estimator.estimate(media)
