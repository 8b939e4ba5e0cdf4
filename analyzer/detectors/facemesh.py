"""Face mesh with irises (478 landmarks), head pose and gaze: mediapipe's attention mesh run with LiteRT.

Why not mediapipe's own API: the legacy ``FaceMesh`` runs its own face detector on every image, and we
already have a BlazeFace detection. So, as blazeface.py does, we run the tflite from the
mediapipe wheel, in models/mediapipe/ (``face_landmark_with_attention.tflite``, what ``FaceMesh(refine_landmarks=True)``
uses) with ``ai_edge_litert`` and re-implement the graph around it, following mediapipe's
``face_detection_front_detection_to_roi.pbtxt``, ``face_landmark_cpu.pbtxt`` and
``tensors_to_face_landmarks_with_attention.pbtxt``:

* ROI: the detection box, rotated so the eye keypoints are level, made square on its long side and
  scaled by 1.5 (DetectionsToRects + RectTransformation);
* ImageToTensor: the rotated square warped onto 192 x 192 (corners onto corners), replicated border,
  RGB float in [0, 1];
* the landmark tensors projected back through the ROI (LandmarkProjection) and merged into 478
  points (LandmarksRefinement: mesh, then lips and eyes overwrite their points, irises appended with
  the mean depth of their eye's contour).

The model contains three mediapipe custom ops (Landmarks2TransformMatrix, TransformTensorBilinear,
TransformLandmarks) that LiteRT does not know: they crop the lips and eyes out of an intermediate
feature map at positions taken from the first-stage mesh. We cut the model in two at those ops
(graph surgery on the flatbuffer, done once at load time; weights untouched) and compute the three
ops in numpy between the two halves, following their reference kernels in
``mediapipe/util/tflite/operations``.

Head pose comes from solvePnP of a few stable landmarks against mediapipe's canonical face model;
gaze from the iris centre within the eye opening, added to the head pose.

Nothing is downloaded: the model file comes from the installed mediapipe package.
"""

from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as tfl
from ai_edge_litert.interpreter import Interpreter
from flatbuffers import flexbuffers

from livekit_proctor.analyzer.detectors.base import Face, FaceMesh, Gaze, HeadPose, check_rgb
from livekit_proctor.analyzer.detectors.manifest import mediapipe_model, verify
from livekit_proctor.analyzer.signals import Signals
from livekit_proctor.analyzer.stages import Due, Stage, StageSettings, service_setting

MODEL_NAME = "face_landmark_with_attention"
MODEL_FILE = "face_landmark_with_attention.tflite"

INPUT_SIZE = 192  # model input is 1 x 192 x 192 x 3 float32 RGB in [0, 1]
ROI_SCALE = 1.5  # RectTransformation scale_x / scale_y of face_detection_front_detection_to_roi
MIN_PRESENCE = 0.5  # sigmoid(face flag) below this: no face in the crop

# Iris points appended after the 468 mesh points (LandmarksRefinement): the iris of the eye whose
# contour starts at 33 (the subject's right eye, image-left in a frontal photo) is 468-472, the
# other 473-477; the first of each five is the centre.
_IRIS_FOR_EYE = {33: 468, 263: 473}
NUM_LANDMARKS = 478

# ---- head pose --------------------------------------------------------------------------------------

# 3D points of mediapipe's canonical face model (modules/face_geometry/data/canonical_face_model.obj,
# Apache-2.0), converted from cm to mm and to a head frame that matches the camera's for a face looking
# straight into it: x toward the image's right, y down, z away from the camera.
# landmark: nose tip 1, chin 152, below the lower lip 199, eye corners 33/133 and 362/263, mouth
# corners 61/291. Eye corners and mouth corners move little with expression, the chin a bit with
# speech; eyelids and lips (which move a lot) are left out.
_POSE_IDX = np.array([1, 152, 199, 33, 133, 362, 263, 61, 291])
_POSE_MODEL_MM = np.array(
    [
        [0.0, 11.27, -74.76],  # 1 nose tip
        [0.0, 94.03, -42.64],  # 152 chin
        [0.0, 79.42, -51.81],  # 199 below the lower lip
        [-44.46, -26.64, -31.73],  # 33 right eye, outer corner
        [-18.56, -25.85, -37.58],  # 133 right eye, inner corner
        [18.56, -25.85, -37.58],  # 362 left eye, inner corner
        [44.46, -26.64, -31.73],  # 263 left eye, outer corner
        [-24.56, 43.43, -42.84],  # 61 mouth, right corner
        [24.56, 43.43, -42.84],  # 291 mouth, left corner
    ],
    dtype=np.float64,
)

# ---- gaze -------------------------------------------------------------------------------------------

# Per eye, in the order image-left corner, image-right corner, upper lid, lower lid, iris centre
# (for a frontal face): the subject's right eye, then the left.
_EYES = ((33, 133, 159, 145, 468), (362, 263, 386, 374, 473))
# 6-point eye aspect ratio (Soukupova & Cech 2016): p1..p6 = corner, upper, upper, corner, lower, lower.
_EAR_IDX = ((33, 160, 158, 133, 153, 144), (362, 385, 387, 263, 373, 380))
# Open eyes measure about 0.25-0.35 with this mesh, closed ones about 0.05-0.15.
BLINK_EAR = 0.18
# Iris offset from the middle of the eye opening, normalised so -1/+1 are the corners (horizontally)
# or the lids (vertically), to eye-in-head angles. Geometry: the iris sits ~11 mm in front of the
# eye's centre of rotation and the opening is ~30 mm wide, so a rotation by a moves the iris by
# 11 sin(a) mm, i.e. 11 sin(a) / 15 of the half width: ~70 deg per unit for moderate angles. The lids
# (~10 mm apart) partly follow the eye up and down, so the vertical offset is smaller and noisier;
# 40 deg per unit is a coarse estimate. Neither was fitted to our data; relative angles (against a
# calibration baseline) are what the rules should use.
EYE_YAW_GAIN_DEG = 70.0
EYE_PITCH_GAIN_DEG = 40.0


def model_file() -> Path:
    """Path of the attention face mesh tflite (models/mediapipe/face_landmark/)."""
    return mediapipe_model(f"face_landmark/{MODEL_FILE}")


# ---- model surgery ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Region:
    """One refined region (lips, an eye or an iris) and how to compute it between the two halves."""

    name: str  # graph output name, e.g. "output_left_eye"
    points: tuple[int, ...]  # landmark index each output point replaces / fills
    local: str  # model B output: landmarks in the 16 x 16 crop
    matrix: str  # model B output: crop -> 192 px input matrix (already multiplied by its constant)


@dataclass(frozen=True, slots=True)
class _Crop:
    """One Landmarks2TransformMatrix + TransformTensorBilinear pair (a feature crop around a region)."""

    landmarks: str  # model A output: the first-stage mesh, scaled to the feature map
    features: str  # model A output: the feature map that is cropped
    crop: str  # model B input: the cropped features
    matrix: str  # model B input: the crop matrix
    subset: np.ndarray  # landmark indices whose bounding box is the crop
    left: int  # the two landmarks that set the crop's rotation
    right: int
    target_rotation: float
    out_h: int
    out_w: int
    scale_x: float
    scale_y: float


@dataclass(frozen=True, slots=True)
class _Graph:
    first: bytes  # model A: image -> mesh, face flag, feature map, scaled mesh
    second: bytes  # model B: feature crops + crop matrices -> local landmarks + their matrices
    mesh: str
    flag: str
    crops: tuple[_Crop, ...]
    regions: tuple[_Region, ...]


def _opname(model: tfl.ModelT, op: tfl.OperatorT) -> str:
    code = model.operatorCodes[op.opcodeIndex]
    if code.customCode:
        return code.customCode.decode()
    return str(max(code.builtinCode, code.deprecatedBuiltinCode))


def _extract(model: tfl.ModelT, buf_size: int, inputs: list[int], outputs: list[int]) -> bytes:
    """A copy of the model whose graph runs only the ops between `inputs` and `outputs`."""
    g = model.subgraphs[0]
    producer = {int(t): i for i, op in enumerate(g.operators) for t in op.outputs}
    keep: set[int] = set()
    stack, seen, stop = list(outputs), set(), set(inputs)
    while stack:
        t = stack.pop()
        if t in seen or t in stop:
            continue
        seen.add(t)
        if t not in producer or producer[t] in keep:
            continue  # a constant, or already walked
        keep.add(producer[t])
        stack.extend(int(x) for x in g.operators[producer[t]].inputs if x >= 0)
    ops = [g.operators[i] for i in sorted(keep)]
    custom = {_opname(model, op) for op in ops if model.operatorCodes[op.opcodeIndex].customCode}
    if custom:
        raise ValueError(f"face mesh model: cut still contains custom ops {sorted(custom)}")
    sub = copy.copy(g)
    sub.operators = ops
    sub.inputs = np.asarray(inputs, dtype=np.int32)
    sub.outputs = np.asarray(outputs, dtype=np.int32)
    out = copy.copy(model)
    out.subgraphs = [sub]
    out.signatureDefs = None
    builder = flatbuffers.Builder(buf_size + 4096)
    builder.Finish(out.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _split(data: bytes) -> _Graph:
    """Cuts the attention mesh model at its custom ops (see the module docstring)."""
    model = tfl.ModelT.InitFromObj(tfl.Model.GetRootAsModel(data, 0))
    if len(model.subgraphs) != 1:
        raise ValueError(f"face mesh model: expected 1 subgraph, got {len(model.subgraphs)}")
    g = model.subgraphs[0]
    name = {i: t.name.decode() for i, t in enumerate(g.tensors)}
    size = {i: int(np.prod(t.shape)) for i, t in enumerate(g.tensors)}
    producer = {int(t): op for op in g.operators for t in op.outputs}
    consumers: dict[int, list[tfl.OperatorT]] = {}
    for op in g.operators:
        for t in op.inputs:
            consumers.setdefault(int(t), []).append(op)

    def ops(kind: str) -> list[tfl.OperatorT]:
        return [op for op in g.operators if _opname(model, op) == kind]

    def options(op: tfl.OperatorT) -> dict:
        return flexbuffers.Loads(bytes(op.customOptions)) if op.customOptions is not None else {}

    graph_out = [int(t) for t in g.outputs]
    # Identify the plain outputs by size: mesh 468 x 3, face flag a single logit.
    mesh = [t for t in graph_out if size[t] == 468 * 3]
    flag = [t for t in graph_out if size[t] == 1]
    l2tm, ttb, tl = ops("Landmarks2TransformMatrix"), ops("TransformTensorBilinear"), ops("TransformLandmarks")
    if len(mesh) != 1 or len(flag) != 1 or not l2tm or len(ttb) != len(l2tm) or not tl:
        shapes = {name[t]: size[t] for t in graph_out}
        raise ValueError(f"face mesh model: unexpected outputs {shapes} or custom ops")

    matrix_op = {int(op.outputs[0]): op for op in l2tm}
    crops = []
    for op in ttb:
        feat, mat = int(op.inputs[0]), int(op.inputs[1])
        src = matrix_op[mat]
        p, q = options(src), options(op)
        crops.append(
            _Crop(
                landmarks=name[int(src.inputs[0])],
                features=name[feat],
                crop=name[int(op.outputs[0])],
                matrix=name[mat],
                subset=np.asarray(p["subset_idxs"], dtype=np.int64),
                left=int(p["left_rotation_idx"]),
                right=int(p["right_rotation_idx"]),
                target_rotation=float(p.get("target_rotation_radians", 0.0)),
                out_h=int(q["output_height"]),
                out_w=int(q["output_width"]),
                scale_x=float(p["scale_x"]),
                scale_y=float(p["scale_y"]),
            )
        )

    def source_crop(matrix_tensor: int) -> _Crop:
        """The crop whose Landmarks2TransformMatrix feeds this matrix (possibly through a MUL)."""
        t = matrix_tensor
        while t not in matrix_op:
            t = int(producer[t].inputs[0])
        return next(c for c in crops if c.matrix == name[t])

    regions = []
    for op in tl:
        local, mat, out = int(op.inputs[0]), int(op.inputs[1]), int(op.outputs[0])
        crop = source_crop(mat)
        final = next((int(c.outputs[0]) for c in consumers.get(out, []) if int(c.outputs[0]) in graph_out), out)
        n = size[out] // 2
        if n == len(crop.subset):  # lips / eye contours: the points the crop was built from
            points = tuple(int(i) for i in crop.subset)
        elif n == 5:  # an iris: appended after the mesh, per eye
            eye = next((e for e in _IRIS_FOR_EYE if e in crop.subset), None)
            if eye is None:
                raise ValueError(f"face mesh model: iris output {name[final]} is not tied to a known eye")
            points = tuple(range(_IRIS_FOR_EYE[eye], _IRIS_FOR_EYE[eye] + 5))
        else:
            raise ValueError(f"face mesh model: cannot map output {name[final]} of {n} points")
        regions.append(_Region(name=name[final], points=points, local=name[local], matrix=name[mat]))

    covered = sorted(i for r in regions for i in r.points if i >= 468)
    if covered != list(range(468, NUM_LANDMARKS)):
        raise ValueError(f"face mesh model: iris outputs cover {covered}, expected 468-477")

    tid = {n_: i for i, n_ in name.items()}
    first_out = list(dict.fromkeys([mesh[0], flag[0]] + [tid[t] for c in crops for t in (c.features, c.landmarks)]))
    second_in = [tid[c.crop] for c in crops] + [tid[c.matrix] for c in crops]
    second_out = [tid[r.local] for r in regions] + list(dict.fromkeys(tid[r.matrix] for r in regions))
    return _Graph(
        first=_extract(model, len(data), [int(g.inputs[0])], first_out),
        second=_extract(model, len(data), second_in, second_out),
        mesh=name[mesh[0]],
        flag=name[flag[0]],
        crops=tuple(crops),
        regions=tuple(regions),
    )


# ---- the custom ops, in numpy -----------------------------------------------------------------------


def _rot2(r: float) -> np.ndarray:
    c, s = math.cos(r), math.sin(r)
    return np.array([[c, -s], [s, c]], dtype=np.float64)


def landmarks_to_transform_matrix(landmarks: np.ndarray, crop: _Crop) -> np.ndarray:
    """Landmarks2TransformMatrix v2: 4 x 4 matrix from crop pixels to feature-map pixels.

    The crop is the bounding box of `subset` in a frame rotated so that left -> right is level,
    scaled by scale_x / scale_y, sampled on out_w x out_h.
    """
    lm = landmarks.astype(np.float64)
    d = lm[crop.right, :2] - lm[crop.left, :2]
    rotation = crop.target_rotation - math.atan2(d[1], d[0])
    pts = lm[crop.subset, :2] @ _rot2(rotation).T
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    w, h = hi - lo
    centre = _rot2(-rotation) @ ((lo + hi) / 2.0)
    t = np.eye(4)
    t[:2, 3] = centre
    rot = np.eye(4)
    rot[:2, :2] = _rot2(-rotation)
    scale = np.diag([crop.scale_x * w / crop.out_w, crop.scale_y * h / crop.out_h, 1.0, 1.0])
    shift = np.eye(4)
    shift[:2, 3] = (-crop.out_w / 2.0, -crop.out_h / 2.0)
    return (t @ rot @ scale @ shift).astype(np.float32)


def transform_tensor_bilinear(features: np.ndarray, matrix: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TransformTensorBilinear v2: samples an out_h x out_w crop of an H x W x C feature map.

    Pixel centres (the v2 "align corners" correction), zero outside the map.
    """
    h, w, c = features.shape[-3:]
    feat = features.reshape(h, w, c)
    mx = matrix.astype(np.float64)
    ax, bx, cx = mx[0, 0], mx[0, 1], mx[0, 3] + mx[0, 0] * 0.5 + mx[0, 1] * 0.5 - 0.5
    ay, by, cy = mx[1, 0], mx[1, 1], mx[1, 3] + mx[1, 0] * 0.5 + mx[1, 1] * 0.5 - 0.5
    oy, ox = np.mgrid[0:out_h, 0:out_w].astype(np.float64)
    tx = ax * ox + bx * oy + cx
    ty = ay * ox + by * oy + cy
    inside = (tx >= 0) & (tx <= w - 1) & (ty >= 0) & (ty <= h - 1)
    x0, y0 = np.floor(tx).astype(np.int64), np.floor(ty).astype(np.int64)
    fx, fy = (tx - x0)[..., None], (ty - y0)[..., None]
    # One row / column of zeros so x0 + 1 == w (tx exactly w - 1) reads 0 like the kernel does.
    padded = np.zeros((h + 1, w + 1, c), dtype=np.float32)
    padded[:h, :w] = feat
    x0, y0 = np.clip(x0, 0, w), np.clip(y0, 0, h)
    x1, y1 = np.minimum(x0 + 1, w), np.minimum(y0 + 1, h)
    top = padded[y0, x0] * (1 - fx) + padded[y0, x1] * fx
    bottom = padded[y1, x0] * (1 - fx) + padded[y1, x1] * fx
    out = top * (1 - fy) + bottom * fy
    out[~inside] = 0.0
    return out[None].astype(np.float32)


def transform_landmarks(local: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """TransformLandmarks v2: 2D points through the first two rows of a 4 x 4 matrix."""
    pts = local.reshape(-1, 2).astype(np.float64)
    m = matrix.reshape(4, 4).astype(np.float64)
    return pts @ m[:2, :2].T + m[:2, 3]


# ---- ROI --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Roi:
    """Rotated square in image pixels; rotation in radians, positive = clockwise in the image."""

    cx: float
    cy: float
    size: float
    rotation: float

    def to_tensor(self) -> np.ndarray:
        """2 x 3 affine from image pixels to model-input pixels (square corners onto tensor corners)."""
        k = INPUT_SIZE / self.size
        r = _rot2(self.rotation).T * k  # inverse rotation, then scale
        t = INPUT_SIZE / 2.0 - r @ np.array([self.cx, self.cy])
        return np.hstack([r, t[:, None]])

    def to_image(self, pts: np.ndarray) -> np.ndarray:
        """Model-input pixels (N x 3: x, y, z) to image pixels; z scaled like x (LandmarkProjection)."""
        k = self.size / INPUT_SIZE
        xy = (pts[:, :2] - INPUT_SIZE / 2.0) * k @ _rot2(self.rotation).T + np.array([self.cx, self.cy])
        return np.hstack([xy, pts[:, 2:3] * k]).astype(np.float32)


def face_roi(face: Face) -> Roi:
    """DetectionsToRects (rotation from keypoint 0 -> 1, i.e. right_eye -> left_eye) + RectTransformation."""
    b = face.box
    rotation = 0.0
    kp = face.keypoints
    if "right_eye" in kp and "left_eye" in kp:
        (x0, y0), (x1, y1) = kp["right_eye"], kp["left_eye"]
        # mediapipe: target angle 0 - atan2(-(y1 - y0), x1 - x0), i.e. the eye line's clockwise angle.
        rotation = math.atan2(y1 - y0, x1 - x0)
    # NormalizeRadians: keep it in [-pi, pi).
    rotation = (rotation + math.pi) % (2 * math.pi) - math.pi
    return Roi(b.x + b.w / 2.0, b.y + b.h / 2.0, max(b.w, b.h) * ROI_SCALE, rotation)


# ---- head pose and gaze -----------------------------------------------------------------------------


def head_pose(landmarks: np.ndarray, width: int, height: int) -> HeadPose:
    """Head pose relative to the line of sight from the camera to the face.

    solvePnP of the canonical face points with a camera of focal length = image width, principal point
    at the centre, no distortion. The rotation is then expressed in a camera turned to look straight
    at the face (keeping its x axis level), as gaze-estimation data normalisation does: a face that
    looks into the camera reads yaw = pitch = 0 wherever it sits in the frame. Measured against the
    optical axis instead, a face near the top of a tall portrait photo looking into the camera would
    read up to -30 deg pitch (focal = width makes the vertical field of view wide).
    """
    img = landmarks[_POSE_IDX, :2].astype(np.float64)
    f = float(width)
    cam = np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])
    # Start from a frontal face at a plausible distance so the iterative solver stays on the branch
    # with the face toward the camera (the mirror solution behind it fits the 2D points too).
    span = float(np.linalg.norm(img[6] - img[3])) or 1.0
    tvec0 = np.array([[0.0], [0.0], [f * float(_POSE_MODEL_MM[6, 0] - _POSE_MODEL_MM[3, 0]) / span]])
    ok, rvec, tvec = cv2.solvePnP(
        _POSE_MODEL_MM, img, cam, None, np.zeros((3, 1)), tvec0, True, flags=cv2.SOLVEPNP_ITERATIVE
    )
    if not ok:
        return HeadPose(0.0, 0.0, 0.0)
    rot, _ = cv2.Rodrigues(rvec)
    centre = rot @ _POSE_MODEL_MM.mean(axis=0) + tvec.reshape(3)
    return pose_from_rotation(_look_at(centre) @ rot)


def _look_at(target: np.ndarray) -> np.ndarray:
    """Rotation from camera axes to axes whose z points at `target` and whose x stays level."""
    forward = target / (np.linalg.norm(target) or 1.0)
    if forward[2] <= 0:  # behind the camera: a failed fit, keep the optical axis
        return np.eye(3)
    right = np.cross([0.0, 1.0, 0.0], forward)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.stack([right, down, forward])


def pose_from_rotation(rot: np.ndarray) -> HeadPose:
    """HeadPose from a head-to-camera rotation (head frame = camera frame for a frontal face).

    Read from the direction the face points rather than by Euler decomposition of the matrix, so
    there is no +-180 wrap: yaw and pitch of the face normal, then roll of the head's x axis about it.
    """
    normal = rot @ np.array([0.0, 0.0, -1.0])  # out of the face, toward the camera when frontal
    yaw = math.atan2(normal[0], -normal[2])  # toward the image's right (camera x) is positive
    pitch = math.atan2(-normal[1], math.hypot(normal[0], normal[2]))  # camera y points down
    # Undo yaw and pitch; what is left is a rotation about the camera's z axis = roll.
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    r_yaw = np.array([[cy, 0.0, -sy], [0.0, 1.0, 0.0], [sy, 0.0, cy]])
    r_pitch = np.array([[1.0, 0.0, 0.0], [0.0, cp, sp], [0.0, -sp, cp]])
    rest = (r_yaw @ r_pitch).T @ rot
    # z into the scene, y down: (1, 0) -> (cos, sin) turns clockwise on screen.
    roll = math.atan2(rest[1, 0], rest[0, 0])
    return HeadPose(math.degrees(yaw), math.degrees(pitch), math.degrees(roll))


def eye_aspect_ratio(landmarks: np.ndarray, idx: tuple[int, int, int, int, int, int]) -> float:
    p = landmarks[list(idx), :2].astype(np.float64)
    horizontal = np.linalg.norm(p[0] - p[3])
    if horizontal < 1e-6:
        return 0.0
    return float((np.linalg.norm(p[1] - p[5]) + np.linalg.norm(p[2] - p[4])) / (2.0 * horizontal))


def iris_offset(landmarks: np.ndarray, eye: tuple[int, int, int, int, int]) -> tuple[float, float, float] | None:
    """Iris centre in the eye opening: (horizontal, vertical, eye width px).

    Horizontal: -1 at the image-left corner, +1 at the image-right one. Vertical: +1 at the upper lid,
    -1 at the lower. Measured along the corner line and its normal, so head roll does not leak in.
    """
    a, b, upper, lower, iris = (landmarks[i, :2].astype(np.float64) for i in eye)
    axis = b - a
    width = float(np.linalg.norm(axis))
    if width < 1.0:
        return None
    u = axis / width
    up = np.array([u[1], -u[0]])  # u turned a quarter counter-clockwise on screen (y down)
    horizontal = float(np.dot(iris - (a + b) / 2.0, u) / (width / 2.0))
    lid_mid = (upper + lower) / 2.0
    half_open = abs(float(np.dot(upper - lower, up))) / 2.0
    # Nearly shut: no vertical measure (EAR flags the blink).
    vertical = float(np.dot(iris - lid_mid, up) / half_open) if half_open > 0.5 else 0.0
    return float(np.clip(horizontal, -1.0, 1.0)), float(np.clip(vertical, -1.0, 1.0)), width


def gaze(landmarks: np.ndarray, pose: HeadPose) -> Gaze | None:
    """Eye-in-head angles from the irises (weighted by eye width: a foreshortened eye counts less)."""
    offsets = [o for o in (iris_offset(landmarks, e) for e in _EYES) if o is not None]
    if not offsets:
        return None
    weights = np.array([o[2] for o in offsets])
    horizontal = float(np.dot([o[0] for o in offsets], weights) / weights.sum())
    vertical = float(np.dot([o[1] for o in offsets], weights) / weights.sum())
    ear = float(np.mean([eye_aspect_ratio(landmarks, idx) for idx in _EAR_IDX]))
    blink = ear < BLINK_EAR
    # Shut eyes have no iris position: report the head direction alone.
    eye_yaw = 0.0 if blink else EYE_YAW_GAIN_DEG * horizontal
    eye_pitch = 0.0 if blink else EYE_PITCH_GAIN_DEG * vertical
    return Gaze(
        yaw=pose.yaw + eye_yaw,
        pitch=pose.pitch + eye_pitch,
        eye_yaw=eye_yaw,
        eye_pitch=eye_pitch,
        ear=ear,
        blink=blink,
    )


# ---- the estimator ----------------------------------------------------------------------------------


class MediapipeFaceMesh:
    """478 face landmarks (mesh + irises), head pose and gaze for a face found by BlazeFace."""

    def __init__(self, model_path: str | None = None, num_threads: int = 1, min_presence: float = MIN_PRESENCE):
        if not 0.0 <= min_presence <= 1.0:
            raise ValueError(f"min_presence must be in [0, 1], got {min_presence}")
        self.name: str = f"mediapipe.{MODEL_NAME}"
        self.min_presence = float(min_presence)
        self.num_threads = int(num_threads)
        data = Path(model_path).read_bytes() if model_path else model_file().read_bytes()
        self.verified = verify(MODEL_NAME, data) if not model_path else False
        # Cut once; each thread builds its own two interpreters from the bytes, because a LiteRT
        # Interpreter must not be invoked from two threads at once.
        self._graph = _split(data)
        self._local = threading.local()
        # Build now so a wrong model fails at construction, not mid-stream.
        self._interpreters()

    def _interpreters(self) -> tuple[Interpreter, Interpreter, dict[str, int], dict[str, int]]:
        cached = getattr(self._local, "state", None)
        if cached is not None:
            return cached
        first = Interpreter(model_content=self._graph.first, num_threads=self.num_threads)
        second = Interpreter(model_content=self._graph.second, num_threads=self.num_threads)
        first.allocate_tensors()
        second.allocate_tensors()
        inp = first.get_input_details()[0]
        if tuple(inp["shape"]) != (1, INPUT_SIZE, INPUT_SIZE, 3) or inp["dtype"] != np.float32:
            raise ValueError(f"model input {inp['shape']} {inp['dtype']} is not float32 1x192x192x3")
        idx = {d["name"]: d["index"] for d in first.get_output_details()}
        idx["input"] = inp["index"]
        idx2 = {d["name"]: d["index"] for d in second.get_input_details() + second.get_output_details()}
        state = (first, second, idx, idx2)
        self._local.state = state
        return state

    def _landmarks(self, rgb: np.ndarray, roi: Roi) -> tuple[np.ndarray, float]:
        """478 x 3 landmarks in model-input pixels, and the face presence score."""
        first, second, idx, idx2 = self._interpreters()
        g = self._graph
        crop = cv2.warpAffine(
            rgb, roi.to_tensor(), (INPUT_SIZE, INPUT_SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        first.set_tensor(idx["input"], (crop.astype(np.float32) * (1.0 / 255.0))[None])
        first.invoke()
        logit = float(first.get_tensor(idx[g.flag]).reshape(-1)[0])
        score = 1.0 / (1.0 + math.exp(-min(max(logit, -100.0), 100.0)))
        if score < self.min_presence:
            return np.zeros((0, 3), np.float32), score
        mesh = first.get_tensor(idx[g.mesh]).reshape(468, 3)
        for c in g.crops:
            lm = first.get_tensor(idx[c.landmarks]).reshape(-1, 3)
            matrix = landmarks_to_transform_matrix(lm, c)
            feats = first.get_tensor(idx[c.features])
            second.set_tensor(idx2[c.matrix], matrix[None])
            second.set_tensor(idx2[c.crop], transform_tensor_bilinear(feats, matrix, c.out_h, c.out_w))
        second.invoke()

        out = np.zeros((NUM_LANDMARKS, 3), np.float32)
        out[:468] = mesh  # z: copied from the mesh
        for r in g.regions:
            pts = transform_landmarks(second.get_tensor(idx2[r.local]), second.get_tensor(idx2[r.matrix]))
            out[list(r.points), :2] = pts  # z of lips and eye contours: kept from the mesh
        for eye, first_iris in _IRIS_FOR_EYE.items():
            contour = next(reg.points[:16] for reg in g.regions if len(reg.points) > 5 and reg.points[0] == eye)
            out[first_iris : first_iris + 5, 2] = out[list(contour), 2].mean()  # iris z: mean of its eye's contour
        return out, score

    def estimate(self, rgb: np.ndarray, face: Face) -> FaceMesh | None:
        rgb = check_rgb(rgb)
        h, w = rgb.shape[:2]
        if not isinstance(face, Face):
            raise ValueError(f"expected a Face, got {type(face).__name__}")
        b = face.box
        if not all(math.isfinite(v) for v in (b.x, b.y, b.w, b.h)) or b.w <= 0 or b.h <= 0:
            raise ValueError(f"face box must be finite with positive size, got {b}")

        roi = face_roi(face)
        local, score = self._landmarks(np.ascontiguousarray(rgb), roi)
        if score < self.min_presence:
            return None
        landmarks = roi.to_image(local)
        pose = head_pose(landmarks, w, h)
        return FaceMesh(landmarks=landmarks, score=score, head_pose=pose, gaze=gaze(landmarks, pose))


# ---- the stage (analyzer/stages.py)


class FaceMeshSettings(StageSettings):
    face_mesh: bool = service_setting("face_mesh")


class FaceMeshStage(Stage):
    """Landmarks, head pose and gaze of the largest face, on every analysed frame with a face."""

    name = "face_mesh"
    writes = "mesh"
    reads = ("faces",)
    settings_model = FaceMeshSettings

    def __init__(self, settings: FaceMeshSettings) -> None:
        super().__init__(settings)
        self.estimator = MediapipeFaceMesh()
        self.model, self.verified = self.estimator.name, self.estimator.verified

    @classmethod
    def enabled(cls, settings: FaceMeshSettings) -> bool:
        return settings.face_mesh

    def due(self) -> Due:
        return Due(if_face=True)

    def run(self, media: np.ndarray, signals: Signals) -> FaceMesh | None:
        faces: list[Face] = signals.values["faces"]
        return self.estimator.estimate(media, max(faces, key=lambda f: f.box.w * f.box.h))
