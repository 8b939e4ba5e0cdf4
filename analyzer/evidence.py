"""Evidence attachments and candidate feedback pacing."""

from __future__ import annotations

import base64

import cv2
import numpy as np

MAX_THUMBNAIL_BYTES = 10 * 1024


def thumbnail_b64(rgb: np.ndarray, max_bytes: int = MAX_THUMBNAIL_BYTES) -> str | None:
    """A small JPEG of the frame (base64), at most max_bytes: lower quality, then smaller, until it fits."""
    img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    for _ in range(4):
        for q in (70, 50, 35):
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])
            if ok and len(buf) <= max_bytes:
                return base64.b64encode(buf.tobytes()).decode()
        img = cv2.resize(img, (max(1, img.shape[1] // 2), max(1, img.shape[0] // 2)), interpolation=cv2.INTER_AREA)
    return None


class FeedbackLimiter:
    """Candidate feedback is rate-limited: one message per kind per per_code_s, and none closer than min_gap_s."""

    def __init__(self, per_code_s: float = 30.0, min_gap_s: float = 10.0) -> None:
        self.per_code_s = per_code_s
        self.min_gap_s = min_gap_s
        self._last: dict[str, float] = {}
        self._last_any = -1e18

    def allow(self, code: str, now: float) -> bool:
        if now - self._last_any < self.min_gap_s or now - self._last.get(code, -1e18) < self.per_code_s:
            return False
        self._last[code] = self._last_any = now
        return True
