"""Formats that round-trip through ``load_image``, and the format decided from the bytes, never the name."""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from deepfeat.models.errors import UnsupportedFormatError
from deepfeat.models.images import (
    ALLOWED_FORMATS,
    load_image,
    sniff_format,
)
from tests.models.image_helpers import (
    GRACE_HOPPER,
    _decode_plain,
    _encode,
    _mean_abs_diff,
    _pixels,
)


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("PNG", {}), ("BMP", {}), ("WEBP", {"lossless": True})],
)
def test_lossless_formats_round_trip_exactly(
    chelsea: Image.Image, fmt: str, params: dict[str, object]
) -> None:
    data = _encode(chelsea, fmt, **params)
    result = load_image(data)
    assert result.format == fmt
    assert result.image.mode == "RGB"
    assert (result.width, result.height) == chelsea.size == result.original_size
    assert np.array_equal(_pixels(result), np.asarray(chelsea))


def test_jpeg_round_trip_matches_plain_decode(coffee: Image.Image) -> None:
    data = _encode(coffee, "JPEG", quality=95)
    result = load_image(data)
    assert result.format == "JPEG"
    assert (result.width, result.height) == coffee.size
    assert np.array_equal(_pixels(result), _decode_plain(data))
    assert _mean_abs_diff(_pixels(result), np.asarray(coffee)) < 3.0


def test_gif_round_trip(rocket: Image.Image) -> None:
    paletted = rocket.quantize(colors=256)
    data = _encode(paletted, "GIF")
    result = load_image(data)
    assert result.format == "GIF"
    assert np.array_equal(_pixels(result), np.asarray(paletted.convert("RGB")))


def test_real_photo_from_path_str_and_pathlike(grace_bytes: bytes) -> None:
    by_str = load_image(str(GRACE_HOPPER))
    by_path = load_image(GRACE_HOPPER)
    by_bytes = load_image(grace_bytes)
    for result in (by_str, by_path, by_bytes):
        assert result.format == "JPEG"
        assert result.sha256 == hashlib.sha256(grace_bytes).hexdigest()
        assert result.nbytes == len(grace_bytes)
        assert (result.width, result.height) == (512, 600)
    assert np.array_equal(_pixels(by_str), _pixels(by_bytes))


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})],  # PNG with several frames is APNG
)
def test_animated_first_frame_only(fmt: str, params: dict[str, object]) -> None:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    frames = [Image.new("RGB", (32, 24), c) for c in colours]
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **params)
    with Image.open(io.BytesIO(data)) as probe:
        assert getattr(probe, "n_frames", 1) == 3  # the fixture really is animated
    result = load_image(data)
    assert result.format == fmt
    assert (result.width, result.height) == (32, 24)
    assert {tuple(p) for p in _pixels(result).reshape(-1, 3)} == {colours[0]}


def test_mpo_is_allowed_and_gives_first_frame(coffee: Image.Image) -> None:
    second = coffee.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    data = _encode(coffee, "MPO", save_all=True, append_images=[second], quality=95)
    assert sniff_format(data) == "JPEG"  # same signature; the decoder tells them apart
    result = load_image(data)
    assert result.format == "MPO"
    assert _mean_abs_diff(_pixels(result), np.asarray(coffee)) < 3.0


def test_sha256_and_nbytes_are_of_the_raw_bytes(chelsea: Image.Image, tmp_path: Path) -> None:
    data = _encode(chelsea, "PNG")
    path = tmp_path / "cat.png"
    path.write_bytes(data)
    assert load_image(data).sha256 == hashlib.sha256(data).hexdigest()
    assert load_image(path).sha256 == hashlib.sha256(data).hexdigest()
    assert load_image(path).nbytes == len(data)


def test_jpeg_with_zip_appended_decodes_the_same_pixels(grace_bytes: bytes) -> None:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("payload.txt", "not part of the picture" * 100)
    polyglot = grace_bytes + archive.getvalue()
    plain, mixed = load_image(grace_bytes), load_image(polyglot)
    assert mixed.format == "JPEG"
    assert np.array_equal(_pixels(mixed), _pixels(plain))
    assert mixed.sha256 != plain.sha256  # different bytes, different dedup key


def test_returned_image_is_decoded_and_detached(chelsea: Image.Image, tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(_encode(chelsea, "PNG"))
    result = load_image(path)
    path.unlink()  # no handle is left open on the file
    image = result.image
    assert not isinstance(image, ImageFile.ImageFile)
    assert getattr(image, "fp", None) is None
    assert image.info == {}
    assert np.array_equal(np.asarray(image), np.asarray(chelsea))


def _tiff() -> bytes:
    return _encode(Image.new("RGB", (32, 32), "red"), "TIFF")


def _ico() -> bytes:
    return _encode(Image.new("RGB", (32, 32), "red"), "ICO")


def _ppm() -> bytes:
    return _encode(Image.new("RGB", (32, 32), "red"), "PPM")


def _pdf() -> bytes:
    return _encode(Image.new("RGB", (32, 32), "red"), "PDF")


def _zip() -> bytes:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.jpg", b"\xff\xd8\xff")
    return archive.getvalue()


def _psd_header() -> bytes:
    # signature, version 1, 6 reserved, 3 channels, 32x32, depth 8, colour mode RGB, empty sections
    return b"8BPS" + struct.pack(">H6sHIIHH", 1, b"\0" * 6, 3, 32, 32, 8, 3) + b"\0" * 12


UNSUPPORTED = {
    "text": (lambda: b"just some text, certainly not a picture\n", None),
    "zip": (_zip, None),
    "pdf": (_pdf, None),
    "svg": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', None),
    "tiff": (_tiff, "TIFF"),
    "psd": (_psd_header, "PSD"),
    "ico": (_ico, "ICO"),
    "ppm": (_ppm, "PPM"),
    "one_byte": (lambda: b"\xff", None),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_formats_are_refused_even_when_named_jpg(case: str, tmp_path: Path) -> None:
    make, pil_name = UNSUPPORTED[case]
    data = make()
    path = tmp_path / "holiday.jpg"
    path.write_bytes(data)
    for source in (data, path):
        with pytest.raises(UnsupportedFormatError) as caught:
            load_image(source)
        assert caught.value.code == "unsupported_format"
        message = str(caught.value)
        assert "JPEG" in message and "PNG" in message and "WEBP" in message  # lists the allowed ones
        if pil_name is not None:
            assert pil_name in message
    assert sniff_format(data) == pil_name


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\xff\xd8\xff\xe0" + b"\0" * 12, "JPEG"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 8, "PNG"),
        (b"GIF89a" + b"\0" * 10, "GIF"),
        (b"RIFF\0\0\0\0WEBPVP8 ", "WEBP"),
        (b"BM" + b"\0" * 14, "BMP"),
        (b"II*\x00\x08\x00\x00\x00", "TIFF"),
        (b"", None),
        (b"%PDF-1.7", None),
    ],
)
def test_sniff_format(data: bytes, expected: str | None) -> None:
    assert sniff_format(data) == expected


def test_allowed_formats_constant() -> None:
    assert frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "MPO"}) == ALLOWED_FORMATS
