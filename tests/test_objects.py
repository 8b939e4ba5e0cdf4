"""COCO object detectors (analyzer/detectors/objects.py): shipped NanoDet ONNX model, YOLO-format decoding."""

from __future__ import annotations

import csv
import hashlib
import itertools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("onnxruntime")

from livekit_proctor.analyzer.detectors.base import Detection  # noqa: E402
from livekit_proctor.analyzer.detectors.objects import (  # noqa: E402
    COCO_CLASSES,
    NanoDetDetector,
    UltralyticsDetector,
    YoloOnnxDetector,
    load_object_detector,
    nanodet_model,
    nms_classwise,
)
from tests.conftest import load_rgb, oep_frames, shared_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NANODET_MODEL = nanodet_model()
NANODET_SRC = REPO / "models" / "nanodet"  # convert.py and README.md are not package data
data_dir = shared_data  # None when ../shared/data is absent
ROLAND = "faces/multi_face/proctoring_ai__roland-samuel-9COZH5kDJOg-unsplash.jpg"


def face_counts() -> list[tuple[str, int]]:
    """(file, number of people whose face is visible) for the multi-person photos."""
    d = data_dir()
    labels = d / "faces" / "multi_face" / "face_counts.csv" if d else None
    if labels is None or not labels.is_file():
        pytest.skip("shared multi_face photos not available")
    with labels.open(newline="") as f:
        return [(r["file"], int(r["face_count"])) for r in csv.DictReader(f)]


def persons(dets: list[Detection]) -> list[Detection]:
    return [d for d in dets if d.label == "person"]


@pytest.fixture(scope="module")
def nanodet() -> NanoDetDetector:
    return NanoDetDetector()


# ---- the shipped model --------------------------------------------------------------------------------


def test_model_ships_in_repo(nanodet: NanoDetDetector) -> None:
    assert NANODET_MODEL.is_file() and NANODET_MODEL.suffix == ".onnx"
    assert NANODET_MODEL.stat().st_size < 20 * 1024 * 1024
    assert (NANODET_SRC / "convert.py").is_file()
    assert (nanodet.input_h, nanodet.input_w) == (416, 416)
    assert [stride for *_, stride in nanodet._levels] == [8, 16, 32]
    assert nanodet.name == "nanodet.onnx"


def test_readme_documents_the_sha256() -> None:
    digest = hashlib.sha256(NANODET_MODEL.read_bytes()).hexdigest()
    assert digest in (NANODET_SRC / "README.md").read_text()


def test_manifest_verification(nanodet: NanoDetDetector) -> None:
    import json

    from livekit_proctor.analyzer.detectors.manifest import MANIFEST

    manifest = json.loads(MANIFEST.read_text())
    if "nanodet" not in {m["name"] for m in manifest["models"]}:
        pytest.skip("models/manifest.json has no 'nanodet' entry yet")
    assert nanodet.verified


def test_coco_classes() -> None:
    assert len(COCO_CLASSES) == 80 and len(set(COCO_CLASSES)) == 80
    assert COCO_CLASSES[0] == "person"
    assert COCO_CLASSES[63] == "laptop"
    assert COCO_CLASSES[67] == "cell phone"
    assert COCO_CLASSES[73] == "book"


# ---- NanoDet on images --------------------------------------------------------------------------------


def test_black_image_has_no_detection(nanodet: NanoDetDetector) -> None:
    assert nanodet.detect(np.zeros((480, 640, 3), np.uint8)) == []
    low = NanoDetDetector(score_threshold=0.2)
    assert low.detect(np.zeros((480, 640, 3), np.uint8)) == []


def test_bad_input(nanodet: NanoDetDetector) -> None:
    with pytest.raises(ValueError):
        nanodet.detect(np.zeros((48, 64), np.uint8))
    with pytest.raises(ValueError):
        nanodet.detect(np.zeros((48, 64, 3), np.float32))
    with pytest.raises(ValueError):
        nanodet.detect(np.zeros((0, 64, 3), np.uint8))
    with pytest.raises(ValueError):
        NanoDetDetector(score_threshold=1.5)


def test_three_standing_people(nanodet: NanoDetDetector) -> None:
    rgb = load_rgb(ROLAND)
    h, w = rgb.shape[:2]
    people = persons(nanodet.detect(rgb))
    assert len(people) == 3
    for p in people:
        assert p.score >= 0.35
        # Standing people, shot down to the thighs at least: tall boxes covering most of the height.
        assert p.box.h > 1.5 * p.box.w
        assert p.box.h > 0.6 * h
    # Side by side: three different horizontal positions spread over the photo.
    xs = sorted(p.box.x + p.box.w / 2 for p in people)
    assert xs[0] < w / 3 and xs[-1] > 2 * w / 3
    assert min(b - a for a, b in itertools.pairwise(xs)) > 0.15 * w


def test_people_found_in_group_photos(nanodet: NanoDetDetector) -> None:
    """Every photo with people has at least one person; overall most visible people are found."""
    found = expected = 0
    for rel, n_faces in face_counts():
        n = len(persons(nanodet.detect(load_rgb(rel))))
        assert n >= 1, rel
        found += min(n, n_faces)
        expected += n_faces
    assert found >= 0.8 * expected, f"{found} of {expected} people found"


def test_two_people_photos(nanodet: NanoDetDetector) -> None:
    for rel in ("faces/multi_face/deepface__couple.jpg", "faces/multi_face/face_recognition__two_people.jpg"):
        assert len(persons(nanodet.detect(load_rgb(rel)))) == 2, rel


def test_detections_well_formed() -> None:
    det = NanoDetDetector(score_threshold=0.3)
    for rel in [*oep_frames(6), ROLAND, "faces/multi_face/dlib__2008_002079.jpg"]:
        rgb = load_rgb(rel)
        h, w = rgb.shape[:2]
        dets = det.detect(rgb)
        assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True), rel
        for d in dets:
            assert isinstance(d, Detection)
            assert COCO_CLASSES[d.class_id] == d.label
            assert 0.3 <= d.score <= 1.0
            b = d.box
            assert b.w > 0 and b.h > 0
            assert 0 <= b.x and b.x + b.w <= w + 1e-6, (rel, d)
            assert 0 <= b.y and b.y + b.h <= h + 1e-6, (rel, d)
            assert set(d.to_dict()) == {"label", "class_id", "score", "box"}


def test_threshold_filters() -> None:
    low = NanoDetDetector(score_threshold=0.25)
    high = NanoDetDetector(score_threshold=0.5)
    total_low = total_high = 0
    for rel in [*oep_frames(6), ROLAND]:
        rgb = load_rgb(rel)
        a, b = low.detect(rgb), high.detect(rgb)
        assert all(d.score >= 0.5 for d in b)
        # Greedy NMS: what survives at 0.5 also survives at 0.25.
        assert set(b) <= set(a), rel
        total_low += len(a)
        total_high += len(b)
    assert total_low > total_high


def test_letterbox_is_undone(nanodet: NanoDetDetector) -> None:
    # The same people padded to portrait or landscape must map back to the same place.
    rgb = load_rgb(ROLAND)
    h, w = rgb.shape[:2]
    base = sorted(persons(nanodet.detect(rgb)), key=lambda d: d.box.x)
    assert base
    for pad in (((0, h // 2), (0, 0), (0, 0)), ((0, 0), (w // 2, 0), (0, 0))):
        padded = np.pad(rgb, pad)
        got = sorted(persons(nanodet.detect(padded)), key=lambda d: d.box.x)
        assert len(got) == len(base)
        dx = pad[1][0]
        for a, b in zip(base, got, strict=True):
            assert abs(a.box.x - (b.box.x - dx)) < 0.1 * a.box.w
            assert abs(a.box.y - b.box.y) < 0.1 * a.box.h
            assert abs(a.box.w - b.box.w) < 0.15 * a.box.w


def test_classes_filter(nanodet: NanoDetDetector) -> None:
    rgb = load_rgb(ROLAND)
    everything = nanodet.detect(rgb)
    only_people = NanoDetDetector(classes={"person"}).detect(rgb)
    assert only_people and all(d.label == "person" for d in only_people)
    # Class-wise NMS: filtering classes does not change the detections of the classes kept.
    assert only_people == persons(everything)
    ties = NanoDetDetector(classes={"tie", "cell phone"}).detect(rgb)
    assert all(d.label in ("tie", "cell phone") for d in ties)
    with pytest.raises(ValueError, match="unknown class"):
        NanoDetDetector(classes={"phone"})


def test_concurrent_matches_sequential() -> None:
    det = NanoDetDetector(score_threshold=0.3)
    images = [load_rgb(rel) for rel in [*oep_frames(5), ROLAND]]
    sequential = [det.detect(img) for img in images]
    jobs = images * 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(det.detect, jobs))
    for i, got in enumerate(concurrent):
        assert got == sequential[i % len(images)]


# ---- errors and the factory ----------------------------------------------------------------------------


def test_missing_model_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(FileNotFoundError, match=r"nope\.onnx"):
        NanoDetDetector(model_path=missing)
    with pytest.raises(FileNotFoundError, match=r"nope\.onnx"):
        YoloOnnxDetector(missing)
    with pytest.raises(FileNotFoundError, match=r"nope\.onnx"):
        load_object_detector(f"yolo:{missing}")
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        load_object_detector(f"ultralytics:{tmp_path / 'nope.pt'}")


def test_factory(tmp_path: Path) -> None:
    det = load_object_detector("nanodet", score_threshold=0.5)
    assert isinstance(det, NanoDetDetector) and det.score_threshold == 0.5
    assert isinstance(load_object_detector(f"nanodet:{NANODET_MODEL}"), NanoDetDetector)
    with pytest.raises(ValueError, match="unknown object detector"):
        load_object_detector("detr")
    with pytest.raises(ValueError, match="needs a path"):
        load_object_detector("yolo:")
    model = tmp_path / "yolo.onnx"
    model.write_bytes(_yolo_model(np.zeros((1, 84, 4), np.float32)))
    yolo = load_object_detector(f"yolo:{model}")
    assert isinstance(yolo, YoloOnnxDetector) and yolo.name == "yolo:yolo.onnx"


def test_ultralytics_backend_is_optional(tmp_path: Path) -> None:
    try:
        import ultralytics  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("ultralytics is installed here")
    weights = tmp_path / "yolo11n.pt"
    weights.write_bytes(b"not really weights")
    with pytest.raises(RuntimeError, match="ultralytics"):
        UltralyticsDetector(weights)


# ---- YOLO-format decoding on a synthetic ONNX model ----------------------------------------------------


def _yolo_model(
    output: np.ndarray, size: int | str = 640, names: dict[int, str] | None = None, input_name: str = "images"
) -> bytes:
    """A graph that ignores its image input and returns a fixed [1, 4 + C, N] tensor."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    dims = [1, 3, size, size]
    inp = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, dims)
    out = helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(output.shape))
    node = helper.make_node("Constant", [], ["output0"], value=numpy_helper.from_array(output.astype(np.float32)))
    graph = helper.make_graph([node], "fixed_yolo", [inp], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if names is not None:
        model.metadata_props.append(onnx.StringStringEntryProto(key="names", value=repr(names)))
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _yolo_output(boxes: list[tuple[float, float, float, float, int, float]], num_classes: int = 80) -> np.ndarray:
    """[1, 4 + C, N] from (cx, cy, w, h, class, score) in model-input pixels."""
    out = np.zeros((1, 4 + num_classes, len(boxes)), np.float32)
    for j, (cx, cy, w, h, cls, score) in enumerate(boxes):
        out[0, :4, j] = (cx, cy, w, h)
        out[0, 4 + cls, j] = score
        out[0, 4 + (cls + 1) % num_classes, j] = score / 3  # a weaker second class must not win
    return out


PERSON, PHONE = COCO_CLASSES.index("person"), COCO_CLASSES.index("cell phone")


def test_yolo_decoding_and_letterbox(tmp_path: Path) -> None:
    # A 1280x960 image into 640x640: ratio 0.5, resized to 640x480, 80 px of grey above and below.
    output = _yolo_output(
        [
            (320, 320, 100, 200, PERSON, 0.9),  # -> image box (540, 280) 200 x 400
            (325, 322, 100, 200, PERSON, 0.8),  # same person, suppressed by NMS
            (330, 330, 40, 60, PHONE, 0.7),  # another class inside the person: kept
            (100, 200, 50, 50, PERSON, 0.2),  # below the threshold
            (620, 300, 80, 100, PERSON, 0.6),  # sticks out on the right: clipped to the image
            (320, 40, 60, 60, PERSON, 0.95),  # entirely in the grey band above the image: dropped
        ]
    )
    path = tmp_path / "fixed.onnx"
    path.write_bytes(_yolo_model(output))
    det = YoloOnnxDetector(path)
    assert (det.input_h, det.input_w) == (640, 640)
    dets = det.detect(np.zeros((960, 1280, 3), np.uint8))
    assert [(d.label, round(d.score, 2)) for d in dets] == [("person", 0.9), ("cell phone", 0.7), ("person", 0.6)]
    person, phone, edge = dets
    assert person.class_id == PERSON and phone.class_id == PHONE
    assert (person.box.x, person.box.y, person.box.w, person.box.h) == pytest.approx((540, 280, 200, 400), abs=1e-3)
    assert (phone.box.x, phone.box.y, phone.box.w, phone.box.h) == pytest.approx((620, 440, 80, 120), abs=1e-3)
    # cx 620, w 80 -> x 580..660 in input px -> 1160..1320 in the image, clipped at 1280.
    assert (edge.box.x, edge.box.x + edge.box.w) == pytest.approx((1160, 1280), abs=1e-3)
    assert (edge.box.y, edge.box.h) == pytest.approx((2 * (250 - 80), 200), abs=1e-3)

    only_phones = YoloOnnxDetector(path, classes={"cell phone"}).detect(np.zeros((960, 1280, 3), np.uint8))
    assert [d.label for d in only_phones] == ["cell phone"]
    assert YoloOnnxDetector(path, score_threshold=0.95).detect(np.zeros((960, 1280, 3), np.uint8)) == []


def test_yolo_letterbox_tensor(tmp_path: Path) -> None:
    path = tmp_path / "fixed.onnx"
    path.write_bytes(_yolo_model(np.zeros((1, 84, 1), np.float32)))
    det = YoloOnnxDetector(path)
    rgb = np.zeros((480, 320, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    tensor, r, px, py = det._letterbox(rgb)
    assert tensor.shape == (1, 3, 640, 640) and tensor.dtype == np.float32
    # Portrait 320x480 -> 427x640 (ratio 4/3), grey bands of 106 / 107 px left and right.
    assert r == pytest.approx(4 / 3) and (px, py) == (106, 0)
    assert tensor[0, :, 320, 0] == pytest.approx([114 / 255] * 3)
    assert tensor[0, :, 320, 639] == pytest.approx([114 / 255] * 3)
    assert tensor[0, :, 320, 320] == pytest.approx([1.0, 0.0, 0.0])  # RGB order kept


def test_yolo_dynamic_input_and_names(tmp_path: Path) -> None:
    names = {0: "phone", 1: "notes"}
    output = _yolo_output([(160, 160, 64, 64, 1, 0.8)], num_classes=2)
    path = tmp_path / "custom.onnx"
    path.write_bytes(_yolo_model(output, size="height", names=names))
    det = YoloOnnxDetector(path, input_size=320)
    assert det.class_names == ("phone", "notes")
    dets = det.detect(np.zeros((320, 320, 3), np.uint8))
    assert [(d.label, d.class_id) for d in dets] == [("notes", 1)]
    assert (dets[0].box.x, dets[0].box.w) == pytest.approx((128, 64))


def test_nms_classwise() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]], np.float64)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    classes = np.array([0, 0, 1, 0])
    assert nms_classwise(boxes, scores, classes, 0.5).tolist() == [0, 2, 3]
    assert nms_classwise(boxes[:0], scores[:0], classes[:0], 0.5).tolist() == []
    # Boxes partly outside the image (negative coordinates) of different classes still do not interact.
    boxes = np.array([[-100, -100, 50, 50], [-90, -95, 55, 50], [-100, -100, 50, 50]], np.float64)
    assert nms_classwise(boxes, np.array([0.9, 0.8, 0.7]), np.array([0, 0, 1]), 0.5).tolist() == [0, 2]
