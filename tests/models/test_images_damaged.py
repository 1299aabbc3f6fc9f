"""Damaged input (empty, truncated, malformed, fuzzed) fails with an ``ImageError``, never anything else."""

from __future__ import annotations

import random

import pytest
from PIL import Image, ImageFile

from deepfeat.models.errors import (
    CorruptImageError,
    ImageError,
    UnsupportedFormatError,
)
from deepfeat.models.images import load_image
from tests.models.image_helpers import (
    _encode,
    _png_header_only,
)


def test_empty_input_is_corrupt() -> None:
    with pytest.raises(CorruptImageError) as caught:
        load_image(b"")
    assert caught.value.code == "corrupt_image"


def test_one_byte_is_unsupported() -> None:
    for data in (b"\xff", b"x", b"\x89"):
        with pytest.raises(UnsupportedFormatError) as caught:
            load_image(data)
        assert caught.value.code == "unsupported_format"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "WEBP"])
def test_truncated_files_are_corrupt(coffee: Image.Image, fmt: str) -> None:
    source = coffee.quantize(colors=64) if fmt == "GIF" else coffee
    data = _encode(source, fmt)
    with pytest.raises(CorruptImageError) as caught:
        load_image(data[: len(data) // 2])
    assert caught.value.code == "corrupt_image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_inside_the_header_is_corrupt(chelsea: Image.Image) -> None:
    for fmt in ("PNG", "JPEG"):
        data = _encode(chelsea, fmt)
        with pytest.raises(CorruptImageError):
            load_image(data[:12])


def test_zero_width_header_is_corrupt() -> None:
    # Every allowed format forbids a 0 side and Pillow refuses such headers while parsing them, so a
    # zero-size file is reported as corrupt (not as too small): the header is malformed.
    with pytest.raises(CorruptImageError):
        load_image(_png_header_only(0, 10))


def test_malformed_exif_does_not_cost_the_image(chelsea: Image.Image) -> None:
    data = _encode(chelsea, "JPEG", quality=95, exif=b"Exif\x00\x00garbage, not a TIFF header")
    result = load_image(data)
    assert (result.width, result.height) == chelsea.size


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
def test_fuzzed_inputs_raise_only_image_errors(coffee: Image.Image) -> None:
    rng = random.Random(1234)
    small = coffee.resize((48, 32))
    bases = [
        _encode(small, "JPEG", quality=90),
        _encode(small, "PNG"),
        _encode(small.quantize(colors=32), "GIF"),
        _encode(small, "BMP"),
        _encode(small, "WEBP", quality=80),
        _encode(small, "WEBP", lossless=True),
        _encode(small, "JPEG", quality=90, exif=Image.Exif().tobytes()),
    ]
    outcomes: dict[str, int] = {"ok": 0, "error": 0}
    for base in bases:
        for _ in range(60):
            data = bytearray(base)
            action = rng.randrange(3)
            if action == 0:  # truncate
                data = data[: rng.randrange(1, len(data))]
            elif action == 1:  # flip bytes, biased to the header where the parsers live
                for _ in range(rng.randrange(1, 6)):
                    at = rng.randrange(min(len(data), 80)) if rng.random() < 0.7 else rng.randrange(len(data))
                    data[at] = rng.randrange(256)
            else:  # splice junk in
                at = rng.randrange(len(data))
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
            try:
                load_image(bytes(data))
            except ImageError:
                outcomes["error"] += 1
            else:
                outcomes["ok"] += 1
    assert outcomes["error"] > 0 and outcomes["ok"] > 0
