"""EXIF orientation: every tag comes out upright, in JPEG, PNG and WebP."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deepfeat.models.images import load_image
from tests.models.image_helpers import (
    _decode_plain,
    _encode,
    _exif_with_orientation,
    _mean_abs_diff,
    _pixels,
)

# For each orientation tag, how a camera would have stored an upright scene (the inverse of the fix).
_STORE_AS = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", sorted(_STORE_AS))
def test_all_eight_exif_orientations_come_out_upright(chelsea: Image.Image, orientation: int) -> None:
    transpose = _STORE_AS[orientation]
    stored = chelsea if transpose is None else chelsea.transpose(transpose)
    data = _encode(stored, "JPEG", quality=95, exif=_exif_with_orientation(orientation))
    result = load_image(data)
    upright = _decode_plain(_encode(chelsea, "JPEG", quality=95))
    assert (result.width, result.height) == chelsea.size
    assert result.original_size == stored.size
    assert _mean_abs_diff(_pixels(result), upright) < 2.5
    assert result.image.info == {}  # no orientation tag left to be applied twice


@pytest.mark.parametrize(("fmt", "params"), [("PNG", {}), ("WEBP", {"lossless": True})])
def test_exif_orientation_in_png_and_webp(chelsea: Image.Image, fmt: str, params: dict[str, object]) -> None:
    stored = chelsea.transpose(Image.Transpose.ROTATE_90)
    data = _encode(stored, fmt, exif=_exif_with_orientation(6), **params)
    assert np.array_equal(_pixels(load_image(data)), np.asarray(chelsea))
