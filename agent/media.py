"""The media path from LiveKit tracks to protocol payloads: frames to JPEG, audio to 100 ms PCM chunks.

Video is latest-wins at every step (the SDK stream keeps one frame, a slot before the encoder keeps one,
the analyzer connection keeps one): a slow encoder or network never makes the analysis lag behind.
Audio is lossless here; the only place it can be dropped is the bounded buffer of the analyzer connection
(agent.analyzer_client).

Frame conversion goes through the SDK where it is safe. Measured on livekit 1.1.21: I420 -> RGB24 works;
RGBA, BGRA, ARGB, RGB24, I420A, I422, I444 and NV12 -> I420 work; most other pairs raise, and some abort the
whole process from Rust (ABGR as a source, I010) instead of raising. So the pairs used are an allow-list
and ABGR is reordered with numpy without ever reaching the SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from typing import Any, Generic, Protocol, TypeVar

import cv2
import numpy as np
from livekit import rtc

from livekit_proctor.contracts.wire import AUDIO_SAMPLE_RATE, AUDIO_SAMPLE_WIDTH

CHUNK_SAMPLES = 1600  # 100 ms at 16 kHz
CHUNK_BYTES = CHUNK_SAMPLES * AUDIO_SAMPLE_WIDTH

_T = rtc.VideoBufferType
# Source types that the SDK converts to I420 (then I420 -> RGB24); see the module docstring.
_VIA_I420 = frozenset({_T.RGBA, _T.BGRA, _T.ARGB, _T.I420A, _T.I422, _T.I444, _T.NV12})
# Keyed by plain int: rotations arrive as ints (VideoFrameEvent.rotation, the agent's frame slot).
_ROTATE: dict[int, int] = {
    rtc.VideoRotation.VIDEO_ROTATION_90: cv2.ROTATE_90_CLOCKWISE,
    rtc.VideoRotation.VIDEO_ROTATION_180: cv2.ROTATE_180,
    rtc.VideoRotation.VIDEO_ROTATION_270: cv2.ROTATE_90_COUNTERCLOCKWISE,
}


class FrameConversionError(Exception):
    """A frame type this agent does not convert (counted and skipped by the caller)."""


def buffer_type_name(t: rtc.VideoBufferType.ValueType) -> str:
    try:
        return _T.Name(t)
    except ValueError:
        return str(t)


def _packed(data: Any, w: int, h: int, channels: int) -> np.ndarray:
    arr = np.frombuffer(data, np.uint8)
    if arr.size < w * h * channels:
        raise FrameConversionError(f"frame buffer of {arr.size} bytes is too small for {w}x{h}x{channels}")
    stride = arr.size // h  # rows may be padded
    return arr[: stride * h].reshape(h, stride)[:, : w * channels].reshape(h, w, channels)


def frame_to_rgb(frame: rtc.VideoFrame) -> np.ndarray:
    """An HxWx3 RGB array of the frame (blocking: call it in a thread)."""
    t, w, h = frame.type, frame.width, frame.height
    if w <= 0 or h <= 0:
        raise FrameConversionError(f"empty frame {w}x{h}")
    if t == _T.RGB24:
        return _packed(frame.data, w, h, 3)
    if t == _T.ABGR:
        # Never frame.convert() an ABGR frame: the Rust side aborts the process. Bytes are A, B, G, R.
        return np.ascontiguousarray(_packed(frame.data, w, h, 4)[:, :, [3, 2, 1]])
    if t == _T.I420:
        rgb = frame.convert(_T.RGB24)
    elif t in _VIA_I420:
        rgb = frame.convert(_T.I420).convert(_T.RGB24)
    else:
        raise FrameConversionError(f"unsupported frame type {buffer_type_name(t)}")
    return _packed(rgb.data, rgb.width, rgb.height, 3)


def encode_jpeg(rgb: np.ndarray, long_side: int, quality: int, rotation: int = 0) -> bytes:
    if rotation in _ROTATE:
        rgb = cv2.rotate(rgb, _ROTATE[rotation])
    h, w = rgb.shape[:2]
    s = long_side / max(h, w)
    if s < 1:
        rgb = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise FrameConversionError("JPEG encoding failed")
    return buf.tobytes()


def frame_to_jpeg(frame: rtc.VideoFrame, long_side: int, quality: int, rotation: int = 0) -> bytes:
    """Convert, rotate upright, downscale, JPEG-encode (blocking: call it in a thread)."""
    return encode_jpeg(frame_to_rgb(frame), long_side, quality, rotation)


class CaptureClock:
    """Frame timestamps as Unix seconds, strictly increasing (the protocol's capture_ts must increase).

    timestamp_us is used when set; a value far from Unix time (a monotonic clock) is anchored to
    the wall clock once, so the media time it carries is kept. Unset (0): time.time().
    """

    def __init__(self) -> None:
        self._offset: float | None = None
        self._last = 0.0

    def __call__(self, timestamp_us: int, now: float | None = None) -> float:
        now = time.time() if now is None else now
        if timestamp_us > 0:
            t = timestamp_us / 1e6
            if abs(t - now) > 86_400:
                if self._offset is None:
                    self._offset = now - t
                t += self._offset
        else:
            t = now
        t = max(t, self._last + 1e-6)
        self._last = t
        return t


class FrameSampler:
    """Picks frames at video_fps by capture time on a fixed grid: the analyzer's own sampling rule
    (analyzer.pipeline.Sampler), so every frame sent is one the analyzer analyses."""

    def __init__(self, fps: float) -> None:
        self.fps = fps
        self._next: float | None = None

    def due(self, ts: float) -> bool:
        interval = 1.0 / self.fps
        nxt = self._next
        if nxt is None or ts - nxt > interval or ts < nxt - interval - 1.0:
            self._next = ts + interval
            return True
        if ts >= nxt - 1e-3:
            self._next = nxt + interval
            return True
        return False


_I = TypeVar("_I")


class LatestSlot(Generic[_I]):
    """A one-item queue where a new item replaces the waiting one (latest-wins)."""

    def __init__(self) -> None:
        self._item: _I | None = None
        self._ready = asyncio.Event()
        self.replaced = 0

    def put(self, item: _I) -> None:
        if self._item is not None:
            self.replaced += 1
        self._item = item
        self._ready.set()

    def take(self) -> _I | None:
        item, self._item = self._item, None
        self._ready.clear()
        return item

    async def get(self) -> _I:
        while True:
            await self._ready.wait()
            item = self.take()
            if item is not None:
                return item


class AudioChunker:
    """Turns audio frames into 100 ms chunks of s16le 16 kHz mono PCM.

    rtc.AudioStream(sample_rate=16000, num_channels=1) already delivers that format; other frames are
    down-mixed and resampled (rtc.AudioResampler) so the analyzer always gets what the protocol says.
    """

    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.chunk_bytes = chunk_bytes
        self._buf = bytearray()
        self._resampler: rtc.AudioResampler | None = None
        self._in_rate = 0

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

    def push(self, frame: rtc.AudioFrame) -> list[bytes]:
        for pcm in self._normalise(frame):
            self._buf += pcm
        out = []
        while len(self._buf) >= self.chunk_bytes:
            out.append(bytes(self._buf[: self.chunk_bytes]))
            del self._buf[: self.chunk_bytes]
        return out

    def flush(self) -> bytes | None:
        """What is left (shorter than a chunk), e.g. when the track ends."""
        if self._resampler is not None:
            for f in self._resampler.flush():
                self._buf += bytes(f.data)
        n = len(self._buf) - len(self._buf) % AUDIO_SAMPLE_WIDTH
        out, self._buf = bytes(self._buf[:n]), bytearray()
        return out or None

    def _normalise(self, frame: rtc.AudioFrame) -> list[bytes]:
        samples = np.frombuffer(frame.data, np.int16)
        if frame.num_channels > 1:
            samples = samples.reshape(-1, frame.num_channels).mean(axis=1).astype(np.int16)
        if frame.sample_rate == AUDIO_SAMPLE_RATE:
            return [samples.tobytes()]
        if self._resampler is None or self._in_rate != frame.sample_rate:
            self._resampler = rtc.AudioResampler(frame.sample_rate, AUDIO_SAMPLE_RATE, num_channels=1)
            self._in_rate = frame.sample_rate
        mono = rtc.AudioFrame(samples.tobytes(), frame.sample_rate, 1, samples.size)
        return [bytes(f.data) for f in self._resampler.push(mono)]


class AudioClock:
    """Capture times of consecutive audio chunks: a media clock (start + samples / rate), anchored to the
    wall clock at the first chunk and again after a gap (e.g. a muted microphone); it never steps back."""

    def __init__(self) -> None:
        self._next: float | None = None

    def stamp(self, n_bytes: int, pending_after: int = 0, now: float | None = None) -> float:
        now = time.time() if now is None else now
        rate_bytes = AUDIO_SAMPLE_RATE * AUDIO_SAMPLE_WIDTH
        start_wall = now - (n_bytes + pending_after) / rate_bytes
        if self._next is None or start_wall - self._next > 2.0:
            self._next = start_wall if self._next is None else max(start_wall, self._next)
        ts = self._next
        self._next = ts + n_bytes / rate_bytes
        return ts


class MediaStreams(Protocol):
    """Where frames of a subscribed track come from: the SDK in production (SdkStreams)."""

    def video(self, track: Any) -> AsyncIterator[rtc.VideoFrameEvent]: ...

    def audio(self, track: Any) -> AsyncIterator[rtc.AudioFrameEvent]: ...


class SdkStreams:
    def video(self, track: Any) -> AsyncIterator[rtc.VideoFrameEvent]:
        # capacity=1: the SDK keeps only the newest decoded frame while we are busy.
        return rtc.VideoStream(track, capacity=1)

    def audio(self, track: Any) -> AsyncIterator[rtc.AudioFrameEvent]:
        # Unbounded on purpose: audio must not be lost here, and our reader never waits (it only appends
        # to the connection's bounded buffer), so this queue stays a few frames long.
        return rtc.AudioStream(track, sample_rate=AUDIO_SAMPLE_RATE, num_channels=1)


async def close_stream(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):  # the track may already be gone
            await aclose()


def is_finite_fps(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v) and 0 < v <= 30
