"""JPEG frame header (and PNG / WebP ones): the image size, read without decoding.

A few hundred bytes can declare a 16000x16000 image; decoding it would take 732 MiB and seconds of CPU.
The size is read from the first SOF (start-of-frame) segment, so frames are refused before any decoder
sees them. The walk is bounded by the data: each step advances, and nothing is allocated.
"""

from __future__ import annotations

# SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not frames.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0..7: markers without a segment
_SOS, _EOI = 0xDA, 0xD9


class JpegHeaderError(ValueError):
    pass


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the JPEG's frame header; JpegHeaderError when there is none to read."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise JpegHeaderError("payload is not a JPEG (missing SOI marker)")
    i = 2
    while i < n:
        if data[i] != 0xFF:
            raise JpegHeaderError(f"JPEG marker expected at byte {i}")
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker in _NO_LENGTH:
            continue
        if marker in (_SOS, _EOI):
            raise JpegHeaderError("JPEG has no frame header before its image data")
        if i + 2 > n:
            break
        length = int.from_bytes(data[i : i + 2], "big")
        if length < 2:
            raise JpegHeaderError(f"JPEG segment with invalid length {length}")
        if marker in _SOF:
            if length < 7 or i + 7 > n:
                break
            height = int.from_bytes(data[i + 3 : i + 5], "big")
            width = int.from_bytes(data[i + 5 : i + 7], "big")
            if width == 0 or height == 0:
                raise JpegHeaderError(f"JPEG declares an empty image ({width}x{height})")
            return width, height
        i += length
    raise JpegHeaderError("JPEG is truncated before its frame header")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, which the format requires first; JpegHeaderError otherwise."""
    if len(data) < 24 or data[:8] != _PNG_SIGNATURE:
        raise JpegHeaderError("payload is not a PNG (missing signature)")
    if data[12:16] != b"IHDR":
        raise JpegHeaderError("PNG does not start with its IHDR chunk")
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    if width == 0 or height == 0:
        raise JpegHeaderError(f"PNG declares an empty image ({width}x{height})")
    return width, height


def webp_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a WebP's first chunk (VP8 lossy, VP8L lossless or VP8X extended)."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise JpegHeaderError("payload is not a WebP (missing RIFF/WEBP header)")
    kind = data[12:16]
    if kind == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise JpegHeaderError("WebP VP8 frame has no start code")
        width = int.from_bytes(data[26:28], "little") & 0x3FFF
        height = int.from_bytes(data[28:30], "little") & 0x3FFF
    elif kind == b"VP8L":
        if data[20] != 0x2F:
            raise JpegHeaderError("WebP VP8L frame has no signature")
        bits = int.from_bytes(data[21:25], "little")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif kind == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
    else:
        raise JpegHeaderError(f"WebP with unknown first chunk {kind!r}")
    if width == 0 or height == 0:
        raise JpegHeaderError(f"WebP declares an empty image ({width}x{height})")
    return width, height


def image_size(data: bytes) -> tuple[str, int, int]:
    """("jpeg" | "png" | "webp", width, height) of a still image from its header only; JpegHeaderError for
    any other format."""
    if data[:8] == _PNG_SIGNATURE:
        return ("png", *png_size(data))
    if data[:2] == b"\xff\xd8":
        return ("jpeg", *jpeg_size(data))
    if data[:4] == b"RIFF":
        return ("webp", *webp_size(data))
    raise JpegHeaderError("not a JPEG, PNG or WebP image")
