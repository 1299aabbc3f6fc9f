"""Unreadable paths, the stable error codes, and Pillow's globals left alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageFile

from deepfeat.models.errors import (
    CorruptImageError,
    ImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    UnsupportedFormatError,
)
from deepfeat.models.images import load_image


def test_missing_or_unreadable_path_is_an_invalid_image(tmp_path: Path) -> None:
    for path in (tmp_path / "nope.jpg", tmp_path):
        with pytest.raises(ImageError) as caught:
            load_image(path)
        assert type(caught.value) is ImageError
        assert caught.value.code == "invalid_image"
        assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ImageError, "invalid_image"),
        (UnsupportedFormatError, "unsupported_format"),
        (CorruptImageError, "corrupt_image"),
        (ImageTooLargeError, "image_too_large"),
        (ImageTooSmallError, "image_too_small"),
    ],
)
def test_error_codes_are_stable(error: type[ImageError], code: str) -> None:
    assert error.code == code
    assert issubclass(error, ImageError)


def test_pillow_globals_are_left_alone(grace_bytes: bytes) -> None:
    load_image(grace_bytes)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    pillow_default = 1024 * 1024 * 1024 // 4 // 3
    assert pillow_default == Image.MAX_IMAGE_PIXELS  # our limits never touch Pillow's global
