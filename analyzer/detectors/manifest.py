"""Checks model files against models/manifest.json (source, license, sha256)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)
# The package data of livekit_proctor.models (the repository's models/ folder in a checkout).
PACKAGED_MODELS = Path(str(resources.files("livekit_proctor.models")))
MANIFEST = PACKAGED_MODELS / "manifest.json"


@lru_cache
def _entries() -> dict[str, dict[str, str]]:
    if not MANIFEST.exists():
        return {}
    return {m["name"]: m for m in json.loads(MANIFEST.read_text())["models"]}


def verify(name: str, data: bytes) -> bool:
    """True when the bytes match the manifest's sha256; logs why not otherwise."""
    entry = _entries().get(name)
    if entry is None:
        log.warning("model %s is not listed in %s", name, MANIFEST)
        return False
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        log.warning("model %s: sha256 %s differs from the manifest's %s", name, digest, entry["sha256"])
        return False
    return True


def models_dir() -> Path:
    """Where model files live: PROCTOR_MODELS_DIR, else the models shipped in the package."""
    env = os.environ.get("PROCTOR_MODELS_DIR")
    return Path(env) if env else PACKAGED_MODELS


def mediapipe_model(relative: str) -> Path:
    """A mediapipe tflite (e.g. "face_detection/face_detection_short_range.tflite") from models/mediapipe/.

    Copied there from the mediapipe wheel by models/mediapipe/extract.py: the mediapipe Python package
    itself is not needed at run time.
    """
    path = models_dir() / "mediapipe" / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: run python models/mediapipe/extract.py")
    return path
