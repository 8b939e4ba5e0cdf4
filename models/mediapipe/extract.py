"""Copies the tflite models the analyzer runs out of the mediapipe 0.10.21 wheel into this folder.

    python models/mediapipe/extract.py            # pip download the wheel, extract, verify sha256

The analyzer runs these files with LiteRT and decodes them itself, so the mediapipe Python package is not
a runtime dependency (its protobuf<5 pin conflicts with livekit's protobuf>=5). Apache-2.0, as the wheel.
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
WHEEL = "mediapipe==0.10.21"


def main() -> int:
    entries = [m for m in json.loads(MANIFEST.read_text())["models"] if m["file"].startswith("models/mediapipe/")]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--only-binary=:all:", "-d", tmp, "-q"],
            check=True,
        )
        wheel = next(Path(tmp).glob("mediapipe-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            for m in entries:
                rel = m["file"].removeprefix("models/mediapipe/")
                data = z.read(f"mediapipe/modules/{rel}")
                digest = hashlib.sha256(data).hexdigest()
                if digest != m["sha256"]:
                    print(f"{rel}: sha256 {digest} differs from the manifest", file=sys.stderr)
                    return 1
                out = HERE / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(data)
                print(f"{rel}: {len(data)} bytes, sha256 ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
