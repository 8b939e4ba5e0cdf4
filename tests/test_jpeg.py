"""The JPEG frame header is read without decoding, and no input makes the reader fail otherwise."""

from __future__ import annotations

import random

import cv2
import numpy as np
import pytest

from livekit_proctor.analyzer.jpeg import JpegHeaderError, jpeg_size


@pytest.mark.parametrize("shape", [(480, 640), (1, 1), (1080, 1920), (37, 1001)])
@pytest.mark.parametrize("progressive", [False, True])
def test_size_matches_the_encoder(shape: tuple[int, int], progressive: bool) -> None:
    img = np.zeros((*shape, 3), np.uint8)
    data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])[1].tobytes()
    assert jpeg_size(data) == (shape[1], shape[0])


def test_no_frame_header_is_an_error() -> None:
    for data in (b"", b"\xff\xd8", b"\xff\xd8\xff\xda\x00\x02", b"\xff\xd8\xff\xd9", b"GIF89a", b"\xff\xd8\x00"):
        with pytest.raises(JpegHeaderError):
            jpeg_size(data)


def test_mutated_jpegs_only_raise_jpeg_header_error() -> None:
    rng = random.Random(7)
    base = cv2.imencode(".jpg", np.zeros((48, 64, 3), np.uint8))[1].tobytes()
    for _ in range(20_000):
        data = bytearray(base[: rng.randrange(0, len(base) + 1)])
        for _ in range(rng.randrange(0, 6)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            w, h = jpeg_size(bytes(data))
        except JpegHeaderError:
            continue
        assert 0 < w < 65536 and 0 < h < 65536
