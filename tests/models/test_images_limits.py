"""Size limits: pixels, sides, frames and bytes, refused from the header before decoding where possible."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from deepfeat.models.errors import (
    ImageTooLargeError,
    ImageTooSmallError,
)
from deepfeat.models.images import (
    ImageLimits,
    load_image,
)
from tests.models.image_helpers import (
    _encode,
    _gif_with_frames,
    _png_header_only,
    _with_jpeg_sof_size,
)


def test_small_real_png_against_a_tiny_pixel_limit(chelsea: Image.Image) -> None:
    data = _encode(chelsea, "PNG")
    pixels = chelsea.width * chelsea.height
    assert load_image(data, limits=ImageLimits(max_pixels=pixels)).width == chelsea.width  # exactly at
    with pytest.raises(ImageTooLargeError) as caught:
        load_image(data, limits=ImageLimits(max_pixels=pixels - 1))  # one pixel over
    assert caught.value.code == "image_too_large"
    assert str(pixels) in str(caught.value)


def test_header_claiming_twice_the_limit_is_refused_before_decoding() -> None:
    data = _png_header_only(8000, 10_000)  # 80 M pixels = 2 x the 40 M default, in 57 bytes
    with pytest.raises(ImageTooLargeError) as caught:
        load_image(data)
    assert caught.value.code == "image_too_large"
    assert "80000000" in str(caught.value)


def test_header_claiming_a_huge_size_hits_pillows_bomb_guard_too() -> None:
    for data in (_png_header_only(100_000, 100_000), _gif_with_frames(1, canvas=65_535)):
        with pytest.raises(ImageTooLargeError) as caught:
            load_image(data)
        assert caught.value.code == "image_too_large"


def test_jpeg_header_lying_about_its_size(coffee: Image.Image) -> None:
    data = _encode(coffee, "JPEG")
    for width, height in ((7000, 7000), (30_000, 30_000)):  # ours, then Pillow's own guard
        with pytest.raises(ImageTooLargeError):
            load_image(_with_jpeg_sof_size(data, width, height))


@pytest.mark.parametrize("size", [(1, 1), (7, 100), (100, 7)])
def test_too_small(size: tuple[int, int]) -> None:
    data = _encode(Image.new("RGB", size, "red"), "PNG")
    with pytest.raises(ImageTooSmallError) as caught:
        load_image(data)
    assert caught.value.code == "image_too_small"


def test_min_side_boundary_and_override() -> None:
    assert load_image(_encode(Image.new("RGB", (8, 8), "red"), "PNG")).width == 8
    tiny = _encode(Image.new("RGB", (1, 1), "red"), "PNG")
    assert load_image(tiny, limits=ImageLimits(min_side=1)).original_size == (1, 1)


def test_too_many_frames_in_a_crafted_gif() -> None:
    with pytest.raises(ImageTooLargeError) as caught:
        load_image(_gif_with_frames(1001))
    assert caught.value.code == "image_too_large"
    assert "1000" in str(caught.value)
    assert load_image(_gif_with_frames(1000)).original_size == (16, 16)  # exactly at the limit


@pytest.mark.parametrize(("fmt", "params"), [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})])
def test_too_many_frames_with_a_tight_limit(fmt: str, params: dict[str, object]) -> None:
    frames = [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(3)]
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], **params)
    with pytest.raises(ImageTooLargeError):
        load_image(data, limits=ImageLimits(max_frames=2))
    assert load_image(data, limits=ImageLimits(max_frames=3)).format == fmt


def test_input_over_max_bytes(chelsea: Image.Image, tmp_path: Path) -> None:
    data = _encode(chelsea, "PNG")
    path = tmp_path / "cat.png"
    path.write_bytes(data)
    limits = ImageLimits(max_bytes=len(data) - 1)
    for source in (data, path):
        with pytest.raises(ImageTooLargeError):
            load_image(source, limits=limits)
    assert load_image(path, limits=ImageLimits(max_bytes=len(data))).nbytes == len(data)
