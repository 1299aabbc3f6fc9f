"""Modes: every Pillow mode converts to 8-bit RGB (alpha on a background, wide modes scaled, not clipped)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from deepfeat.models.errors import (
    ImageError,
    InvalidOptionError,
)
from deepfeat.models.images import (
    load_image,
    to_rgb,
)
from tests.models.image_helpers import (
    _encode,
    _mean_abs_diff,
    _pixels,
)


def test_rgb_is_passed_through(chelsea: Image.Image) -> None:
    assert to_rgb(chelsea) is chelsea


def test_grayscale_and_bilevel(chelsea: Image.Image) -> None:
    gray = chelsea.convert("L")
    result = _pixels(load_image(_encode(gray, "PNG")))
    assert np.array_equal(result[..., 0], np.asarray(gray))
    assert np.array_equal(result[..., 0], result[..., 2])
    bilevel = _pixels(load_image(_encode(chelsea.convert("1"), "PNG")))
    assert set(np.unique(bilevel)) <= {0, 255}


def test_cmyk_jpeg(coffee: Image.Image) -> None:
    data = _encode(coffee.convert("CMYK"), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as probe:
        assert probe.mode == "CMYK"
    result = load_image(data)
    assert _mean_abs_diff(_pixels(result), np.asarray(coffee)) < 3.0


def test_rgba_is_composited_on_white_not_dropped() -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)  # black everywhere...
    rgba[:, :8, 3] = 0  # ...fully transparent on the left
    rgba[:, 8:12, 3] = 255  # opaque black
    rgba[:, 12:, 3] = 128  # half transparent black
    result = _pixels(load_image(_encode(Image.fromarray(rgba), "PNG")))
    assert (result[:, :8] == 255).all()
    assert (result[:, 8:12] == 0).all()
    assert np.abs(result[:, 12:].astype(int) - 127).max() <= 1


def test_custom_background() -> None:
    clear = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert to_rgb(clear, background=(0, 128, 0)).getpixel((0, 0)) == (0, 128, 0)
    with pytest.raises(InvalidOptionError):
        to_rgb(clear, background=(0, 0, 256))


def test_palette_with_transparency_goes_via_rgba() -> None:
    paletted = Image.new("P", (16, 16), 0)
    paletted.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 black, index 1 blue
    paletted.paste(1, (8, 0, 16, 16))
    for data in (_encode(paletted, "PNG", transparency=0), _encode(paletted, "GIF", transparency=0)):
        result = load_image(data).image
        assert result.getpixel((0, 0)) == (255, 255, 255)  # transparent black -> white
        assert result.getpixel((12, 0)) == (0, 0, 255)
    opaque = load_image(_encode(paletted, "PNG")).image
    assert opaque.getpixel((0, 0)) == (0, 0, 0)


def test_rgb_with_a_transparent_colour_key() -> None:
    image = Image.new("RGB", (16, 16), (1, 2, 3))
    image.paste((200, 100, 50), (8, 0, 16, 16))
    result = load_image(_encode(image, "PNG", transparency=(1, 2, 3))).image
    assert result.getpixel((0, 0)) == (255, 255, 255)
    assert result.getpixel((12, 0)) == (200, 100, 50)


def test_la_and_pa() -> None:
    gray = Image.new("L", (16, 16), 40)
    alpha = Image.new("L", (16, 16), 255)
    alpha.paste(0, (0, 0, 8, 16))
    la = Image.merge("LA", (gray, alpha))
    result = load_image(_encode(la, "PNG")).image
    assert result.getpixel((0, 0)) == (255, 255, 255)
    assert result.getpixel((12, 0)) == (40, 40, 40)

    pa = Image.new("PA", (16, 16))
    pa.putpalette([0, 0, 0, 250, 0, 0] + [0] * 762)
    pa.putdata([(1, 0)] * 128 + [(1, 255)] * 128)
    converted = to_rgb(pa)
    assert converted.getpixel((0, 0)) == (255, 255, 255)
    assert converted.getpixel((0, 15)) == (250, 0, 0)


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    ramp = np.array([[0, 257, 2000, 32768, 65535, 65535, 65535, 65535]] * 8, dtype=np.uint16)
    data = _encode(Image.fromarray(ramp), "PNG")
    with Image.open(io.BytesIO(data)) as probe:
        assert probe.mode.startswith("I")  # stored and decoded as 16-bit grey
    row = _pixels(load_image(data))[0, :5, 0]
    assert row.tolist() == [0, 1, 8, 128, 255]  # Pillow's convert would give [0, 255, 255, 255, 255]


def test_sixteen_bit_big_endian_and_wide_modes() -> None:
    ramp = np.array([[0, 257, 32768, 65535]] * 4, dtype=">u2")
    big = Image.frombytes("I;16B", (4, 4), ramp.tobytes())
    assert np.asarray(to_rgb(big))[0, :, 0].tolist() == [0, 1, 128, 255]

    as_int32 = Image.fromarray(ramp.astype(np.int32))
    assert as_int32.mode == "I"
    assert np.asarray(to_rgb(as_int32))[0, :, 0].tolist() == [0, 1, 128, 255]

    signed = Image.fromarray(np.array([[-1000, 0, 1000, 3000]] * 4, dtype=np.int32))
    assert np.asarray(to_rgb(signed))[0, :, 0].tolist() == [0, 64, 128, 255]  # stretched min..max

    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]] * 4, dtype=np.float32))
    assert np.asarray(to_rgb(unit))[0, :, 0].tolist() == [0, 128, 255, 0]

    wide = Image.fromarray(np.array([[-2.0, 0.0, 2.0, 6.0]] * 4, dtype=np.float32))
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 64, 128, 255]


@pytest.mark.parametrize("mode", ["YCbCr", "LAB", "HSV", "CMYK"])
def test_other_colour_spaces_convert(coffee: Image.Image, mode: str) -> None:
    converted = to_rgb(coffee.convert(mode))
    assert converted.mode == "RGB"
    assert _mean_abs_diff(np.asarray(converted), np.asarray(coffee)) < 4.0


def test_unconvertible_mode_is_an_image_error() -> None:
    la_premultiplied = Image.new("La", (8, 8))
    with pytest.raises(ImageError) as caught:
        to_rgb(la_premultiplied)
    assert caught.value.code == "invalid_image"
