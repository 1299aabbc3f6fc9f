"""Draft decoding (JPEG DCT scaling) and the option checks on limits and draft sizes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deepfeat.models.errors import InvalidOptionError
from deepfeat.models.images import (
    ImageLimits,
    load_image,
)
from tests.models.image_helpers import (
    _encode,
    _exif_with_orientation,
    _mean_abs_diff,
    _pixels,
)


@pytest.fixture(scope="module")
def big_jpeg(coffee: Image.Image) -> bytes:
    return _encode(coffee.resize((2400, 1600)), "JPEG", quality=90)


def test_draft_size_shrinks_but_never_below_the_request(big_jpeg: bytes) -> None:
    full = load_image(big_jpeg)
    drafted = load_image(big_jpeg, draft_size=(224, 224))
    assert full.original_size == drafted.original_size == (2400, 1600)
    assert (full.width, full.height) == (2400, 1600)
    assert drafted.width < 2400 and drafted.height < 1600
    assert drafted.width >= 224 and drafted.height >= 224
    reference = np.asarray(full.image.resize(drafted.image.size, Image.Resampling.BOX))
    assert _mean_abs_diff(_pixels(drafted), reference) < 4.0  # same picture, just smaller


def test_draft_size_larger_than_the_image_keeps_it(big_jpeg: bytes, chelsea: Image.Image) -> None:
    assert load_image(big_jpeg, draft_size=(3000, 3000)).original_size == (2400, 1600)
    png = load_image(_encode(chelsea, "PNG"), draft_size=(16, 16))  # ignored for non-JPEG
    assert png.image.size == chelsea.size


def test_draft_size_is_in_upright_terms(coffee: Image.Image) -> None:
    stored = coffee.resize((2400, 1600))  # orientation 6: upright it is 1600 wide, 2400 high
    data = _encode(stored, "JPEG", quality=85, exif=_exif_with_orientation(6))
    result = load_image(data, draft_size=(1000, 200))
    assert result.width >= 1000 and result.height >= 200
    assert result.height > result.width


def test_invalid_options() -> None:
    with pytest.raises(InvalidOptionError):
        ImageLimits(max_pixels=0)
    with pytest.raises(InvalidOptionError):
        ImageLimits(min_side=-1)
    for bad in [(0, 10), (10,), (1.5, 2)]:
        with pytest.raises(InvalidOptionError):
            load_image(b"", draft_size=bad)  # type: ignore[arg-type]
