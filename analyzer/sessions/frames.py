"""The recent frames of a session, kept for POST /api/v1/session/{id}/verify-frame (docs/identity.md).

The JPEG bytes as received (checked at the door: size, header, dimensions) with their seq and capture time, not
decoded pixels: a decoded 640x480 RGB frame is 0.9 MB, a webcam JPEG of it some 30-60 kB, so 5 s of frames
costs a few hundred kB per session instead of tens of MB. Only the frame asked for is decoded, in the
inference pool. Two bounds, whichever bites first: `window_s` of media time behind the newest frame, and
`max_bytes` of JPEG in all (large frames at a high rate keep less than the window).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class RecentFrame:
    seq: int  # the frame id of the wire protocol (docs/protocol.md)
    ts: float  # capture time, Unix seconds
    jpeg: bytes


class FrameBuffer:
    def __init__(self, window_s: float, max_bytes: int) -> None:
        self.window_s = window_s
        self.max_bytes = max_bytes
        self._frames: deque[RecentFrame] = deque()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._frames)

    def add(self, seq: int, ts: float, jpeg: bytes) -> None:
        if len(jpeg) > self.max_bytes:
            return  # larger than the whole budget: not kept (the default budget is above max_frame_bytes)
        self._frames.append(RecentFrame(seq, ts, jpeg))
        self.bytes += len(jpeg)
        # Media time: a client's clock, so a frame stamped earlier than the window (or a reset clock) goes too.
        newest = ts
        while self._frames and (self.bytes > self.max_bytes or self._frames[0].ts < newest - self.window_s):
            self.bytes -= len(self._frames.popleft().jpeg)

    def latest(self) -> RecentFrame | None:
        return self._frames[-1] if self._frames else None

    def get(self, seq: int) -> RecentFrame | None:
        """The newest frame with this seq (seq wraps at 2**32, so the newest is the one meant)."""
        for f in reversed(self._frames):
            if f.seq == seq:
                return f
        return None

    def span(self) -> tuple[int, int] | None:
        """The seqs of the oldest and newest frames held."""
        return (self._frames[0].seq, self._frames[-1].seq) if self._frames else None

    def clear(self) -> None:
        self._frames.clear()
        self.bytes = 0
