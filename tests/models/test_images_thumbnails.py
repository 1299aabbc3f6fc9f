"""Thumbnails made from PIL images: small plain JPEGs, never enlarged, no metadata."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from deepfeat.models.errors import InvalidOptionError
from deepfeat.models.images import (
    load_image,
    make_thumbnail,
)
from tests.models.image_helpers import (
    _encode,
    _exif_with_orientation,
)


def test_thumbnail_is_a_small_plain_jpeg(chelsea: Image.Image) -> None:
    tagged = _encode(chelsea, "JPEG", exif=_exif_with_orientation(1), quality=95)
    loaded = load_image(tagged)
    source = Image.open(io.BytesIO(tagged))  # still carries EXIF in its info
    assert "exif" in source.info
    for image in (loaded.image, source):
        data = make_thumbnail(image, size=128)
        with Image.open(io.BytesIO(data)) as thumb:
            assert thumb.format == "JPEG"
            assert max(thumb.size) == 128 and thumb.size[0] > thumb.size[1]
            assert "exif" not in thumb.info and "icc_profile" not in thumb.info
            assert len(thumb.getexif()) == 0
    assert source.size == chelsea.size  # the caller's image is untouched
    source.close()


def test_thumbnail_never_enlarges_and_handles_alpha() -> None:
    clear = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    with Image.open(io.BytesIO(make_thumbnail(clear))) as thumb:
        assert thumb.size == (40, 20)
        assert thumb.convert("RGB").getpixel((5, 5)) == (255, 255, 255)


def test_thumbnail_options_are_checked(chelsea: Image.Image) -> None:
    for kwargs in ({"size": 0}, {"quality": 0}, {"quality": 101}):
        with pytest.raises(InvalidOptionError):
            make_thumbnail(chelsea, **kwargs)


def test_thumbnail_of_an_image_and_of_its_tensor_agree(chelsea: Image.Image) -> None:
    # The CPU indexer and the upload route thumbnail PIL images, the GPU indexer decoded tensors: a
    # store's previews must not depend on which path an image took.
    import numpy as np
    from torchvision.transforms.v2 import functional as TF

    from deepfeat.models.images import thumbnail_from_tensor

    with Image.open(io.BytesIO(make_thumbnail(chelsea, size=100))) as a:
        from_pil = np.asarray(a.convert("RGB"), dtype=np.float64)
    with Image.open(io.BytesIO(thumbnail_from_tensor(TF.pil_to_tensor(chelsea), size=100))) as b:
        from_tensor = np.asarray(b.convert("RGB"), dtype=np.float64)
    assert from_pil.shape == from_tensor.shape and max(from_pil.shape[:2]) == 100
    assert np.abs(from_pil - from_tensor).mean() < 2.0  # two JPEG encoders of the same pixels
