"""PCM s16le mono at a client's sample rate -> the analyzer's 16 kHz, chunk by chunk.

Old clients send whatever their capture gives them (LiveKit's AudioStream defaults to 48 kHz). The
conversion is LiveKit's resampler (soxr inside the livekit FFI library, a dependency already): it keeps
state between chunks, so a stream cut into arbitrary chunks comes out as one continuous signal.
"""

from __future__ import annotations

from typing import Any

from livekit_proctor.contracts.wire import AUDIO_SAMPLE_RATE, AUDIO_SAMPLE_WIDTH

MIN_RATE = 8_000
MAX_RATE = 192_000


def parse_rate(text: str | None, default: int) -> int:
    """A sample rate from a query parameter; ValueError (a message for the client) when it is not one."""
    if text is None or text == "":
        return default
    try:
        rate = int(text)
    except ValueError:
        raise ValueError(f"sample_rate must be an integer number of Hz, not {text[:20]!r}") from None
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"sample_rate must be between {MIN_RATE} and {MAX_RATE} Hz, not {rate}")
    return rate


class PcmResampler:
    """Streams mono s16le PCM from in_rate to out_rate; holds back a few milliseconds until flush()."""

    def __init__(self, in_rate: int, out_rate: int = AUDIO_SAMPLE_RATE) -> None:
        # Imported here: the analyzer loads the FFI library only when a client needs a conversion.
        from livekit import rtc

        self._rtc = rtc
        self.in_rate = in_rate
        self._r = rtc.AudioResampler(in_rate, out_rate, num_channels=1, quality=rtc.AudioResamplerQuality.HIGH)

    def push(self, pcm: bytes) -> bytes:
        """The converted samples that are ready; pcm must hold whole samples."""
        n = len(pcm) // AUDIO_SAMPLE_WIDTH
        if n == 0:
            return b""
        return _join(self._r.push(self._rtc.AudioFrame(pcm, self.in_rate, 1, n)))

    def flush(self) -> bytes:
        """What is held back, at the end of the stream."""
        return _join(self._r.flush())


def _join(frames: list[Any]) -> bytes:
    return b"".join(bytes(f.data) for f in frames)
