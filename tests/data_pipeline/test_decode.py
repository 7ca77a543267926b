"""Robust decoding: odd formats become RGB uint8; broken inputs get a named reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from idforge.data_pipeline.decode import DecodeError, decode_image
from PIL import Image


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


RGB = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "img,fmt",
    [
        (RGB.convert("CMYK"), "JPEG"),
        (RGB.convert("L"), "PNG"),
        (RGB.convert("RGBA"), "PNG"),
        (RGB.convert("P"), "PNG"),
        (Image.fromarray(np.full((20, 30), 40000, np.uint16)), "PNG"),
    ],
)
def test_formats_decode_to_rgb_uint8(img, fmt):
    arr = decode_image(_bytes(img, fmt), "x")
    assert arr.dtype == np.uint8 and arr.shape == (20, 30, 3)


def test_sixteen_bit_values_are_rescaled_not_clipped():
    arr = decode_image(_bytes(Image.fromarray(np.full((4, 4), 32768, np.uint16)), "PNG"))
    assert 120 <= arr[0, 0, 0] <= 135


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    arr = decode_image(_bytes(RGB, "JPEG", exif=exif))
    assert arr.shape == (30, 20, 3)


def test_alpha_is_composited_on_white():
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert (decode_image(_bytes(transparent, "PNG")) == 255).all()


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (b"this is a text file, not a jpeg", "not_image"),
        (_bytes(RGB, "JPEG")[:200], "decode"),
    ],
)
def test_broken_inputs_are_refused_with_a_reason(data, reason):
    with pytest.raises(DecodeError) as err:
        decode_image(data, "f.jpg")
    assert err.value.reason == reason and "f.jpg" in str(err.value)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = _bytes(Image.new("1", (9000, 9000)), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(DecodeError) as err:
        decode_image(bomb, "bomb.png")
    assert err.value.reason == "decompression_bomb"
