"""Media for tests and benches built from the shared data: SYNTHETIC ones, labelled as such (a presentation attack
the shared data does not hold), and the shared videos sampled at the analysis rate. Shared by
tests/test_presentation_attack.py and bench/antispoof.py so that both measure the same frames."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from livekit_proctor.analyzer.offline import read_audio
from tests.conftest import shared_data

FPS = 5.0  # the sessions' default analysis rate


def photo_attack(photo: np.ndarray, seconds: float, size: tuple[int, int] = (640, 480)) -> Iterator[np.ndarray]:
    """SYNTHETIC presentation attack, FPS frames a second: the photo (300 px tall), pasted unchanged in the middle
    of a coarse colour texture that scrolls 12 px a frame (something moving behind a propped-up print), with
    camera noise (Gaussian, sigma 3 grey levels) on every frame."""
    w, h = size
    rng = np.random.default_rng(0)
    ph = 300
    pw = round(photo.shape[1] * ph / photo.shape[0])
    pasted = cv2.resize(photo, (pw, ph), interpolation=cv2.INTER_AREA).astype(np.float32)
    texture = rng.uniform(0, 255, (h // 40, 3 * w // 40, 3)).astype(np.float32)
    background = cv2.resize(texture, (3 * w, h), interpolation=cv2.INTER_CUBIC)
    x0, y0 = (w - pw) // 2, (h - ph) // 2
    for k in range(int(seconds * FPS)):
        off = (12 * k) % (2 * w)
        frame = background[:, off : off + w].copy()
        frame[y0 : y0 + ph, x0 : x0 + pw] = pasted
        yield np.clip(frame + rng.normal(0, 3.0, frame.shape), 0, 255).astype(np.uint8)


def video_frames(path: Path, fps: float = FPS) -> Iterator[tuple[float, np.ndarray]]:
    """(offset s, RGB) of a video file at about `fps` frames a second."""
    cap = cv2.VideoCapture(str(path))
    native = cap.get(cv2.CAP_PROP_FPS) or 25.0
    step, i = max(1, round(native / fps)), 0
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        if i % step == 0:
            yield i / native, np.ascontiguousarray(bgr[:, :, ::-1])
        i += 1
    cap.release()


def read_16k(rel: str) -> np.ndarray:
    """A shared audio file as int16 mono 16 kHz, read as `proctor audio` reads files; skips without the shared
    data."""
    d = shared_data()
    if d is None or not (d / rel).is_file():
        pytest.skip(f"shared data not available: {rel}")
    return read_audio(d / rel)
