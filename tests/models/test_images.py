"""Contract tests for ``models.images``: the one hostile-input-safe decoder behind every entry point."""

from __future__ import annotations

import hashlib
import io
import random
import struct
import zipfile
import zlib
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from skimage import data as skdata

from deepfeat.models.errors import (
    CorruptImageError,
    ImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    InvalidOptionError,
    UnsupportedFormatError,
)
from deepfeat.models.images import (
    ALLOWED_FORMATS,
    ImageLimits,
    LoadedImage,
    decode_jpegs,
    load_image,
    make_thumbnail,
    probe_image,
    sniff_format,
    thumbnail_from_tensor,
    to_rgb,
)

GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


# ------------------------------------------------------------------------------------------------
# helpers


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _decode_plain(data: bytes) -> np.ndarray:
    """Reference decode with Pillow, no checks: what the bytes contain."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _pixels(result: LoadedImage) -> np.ndarray:
    return np.asarray(result.image)


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR (correct CRC) declaring any size, with an empty IDAT: costs 57 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )


def _gif_with_frames(n_frames: int, *, canvas: int = 16) -> bytes:
    """A GIF with ``n_frames`` tiny 1x1 frames, written by hand so thousands of frames cost ~15 bytes each."""
    header = b"GIF89a" + struct.pack("<HHBBB", canvas, canvas, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x4c\x01\x00"
    return header + frame * n_frames + b";"


def _with_jpeg_sof_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the SOF0 frame size of a baseline JPEG (the header lies; the scan data stays small)."""
    out = bytearray(data)
    at = out.index(b"\xff\xc0")
    out[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(out)


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    return Image.fromarray(skdata.chelsea())  # 451x300 RGB cat


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    return Image.fromarray(skdata.coffee())  # 600x400 RGB


@pytest.fixture(scope="module")
def rocket() -> Image.Image:
    return Image.fromarray(skdata.rocket())  # 640x427 RGB


@pytest.fixture(scope="module")
def grace_bytes() -> bytes:
    return GRACE_HOPPER.read_bytes()


# ------------------------------------------------------------------------------------------------
# formats round-trip


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


# ------------------------------------------------------------------------------------------------
# format decided from the bytes


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


# ------------------------------------------------------------------------------------------------
# damaged input


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


# ------------------------------------------------------------------------------------------------
# size limits


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


# ------------------------------------------------------------------------------------------------
# EXIF orientation

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


def _exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


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


# ------------------------------------------------------------------------------------------------
# modes


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


# ------------------------------------------------------------------------------------------------
# draft (JPEG DCT scaling)


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


# ------------------------------------------------------------------------------------------------
# paths


def test_missing_or_unreadable_path_is_an_invalid_image(tmp_path: Path) -> None:
    for path in (tmp_path / "nope.jpg", tmp_path):
        with pytest.raises(ImageError) as caught:
            load_image(path)
        assert type(caught.value) is ImageError
        assert caught.value.code == "invalid_image"
        assert str(path) in str(caught.value)


# ------------------------------------------------------------------------------------------------
# thumbnails


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


# ------------------------------------------------------------------------------------------------
# stable codes and globals


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


# ------------------------------------------------------------------------------------------------
# probing and device decoding (the batch indexer's GPU path; torchvision decodes on the CPU here,
# nvJPEG on CUDA: the gpu-marked test below)


def without_jpeg_segment(data: bytes, marker: int) -> bytes:
    """The JPEG with every segment of one kind removed (0xDB: the quantisation tables). Headers still
    parse, decoding fails: damage only a decoder can find."""
    out, i = bytearray(data[:2]), 2
    while i < len(data):
        kind = data[i + 1]
        if kind == 0xDA:  # start of scan: the rest is entropy-coded data
            out += data[i:]
            break
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if kind != marker:
            out += data[i : i + 2 + length]
        i += 2 + length
    return bytes(out)


NOT_A_SCAN = b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9"
"""JPEG start and end markers around bytes no decoder can read."""


def test_probe_agrees_with_load_without_decoding(chelsea: Image.Image, grace_bytes: bytes) -> None:
    rotated = _encode(chelsea.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=_exif_with_orientation(6))
    for data in (grace_bytes, rotated, _encode(chelsea, "PNG")):
        probed = probe_image(data)
        loaded = load_image(data)
        assert probed.upright_size == loaded.upright_size == (loaded.width, loaded.height)
        assert (probed.sha256, probed.nbytes, probed.format) == (loaded.sha256, loaded.nbytes, loaded.format)
        assert probed.data == data


def test_probe_says_which_files_the_gpu_decoder_may_take(chelsea: Image.Image) -> None:
    jpeg = _encode(chelsea, "JPEG", quality=90)
    assert probe_image(jpeg).gpu_decodable
    assert probe_image(_encode(chelsea.convert("L"), "JPEG")).gpu_decodable
    assert not probe_image(
        _encode(chelsea.convert("CMYK"), "JPEG")
    ).gpu_decodable  # needs Pillow's colour maths
    assert not probe_image(jpeg[: len(jpeg) // 2]).gpu_decodable  # truncated: the CPU path fails it
    assert not probe_image(_encode(chelsea, "PNG")).gpu_decodable
    # nvJPEG decodes a file without quantisation tables; Pillow calls it corrupt: not for the GPU
    assert not probe_image(without_jpeg_segment(jpeg, 0xDB)).gpu_decodable
    assert probe_image(without_jpeg_segment(jpeg, 0xC4)).gpu_decodable  # default Huffman tables: both decode


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", CorruptImageError),
        (b"just some text, not an image", UnsupportedFormatError),
        (_png_header_only(30_000, 30_000), ImageTooLargeError),
        (_png_header_only(4, 4), ImageTooSmallError),
    ],
)
def test_probe_refuses_what_the_header_shows(data: bytes, error: type[ImageError]) -> None:
    with pytest.raises(error) as probed:
        probe_image(data)
    with pytest.raises(error) as loaded:
        load_image(data)
    assert probed.value.code == loaded.value.code


def test_decode_jpegs_gives_upright_pixels_and_isolates_a_bad_file(
    chelsea: Image.Image, coffee: Image.Image
) -> None:
    upright = _encode(coffee, "JPEG", quality=95)
    stored = coffee.transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back
    rotated = _encode(stored, "JPEG", quality=95, exif=_exif_with_orientation(6))
    broken = NOT_A_SCAN
    out = decode_jpegs([upright, broken, rotated], "cpu")
    assert out[1] is None  # the caller hands it to load_image, which names the damage
    for data, tensor in ((upright, out[0]), (rotated, out[2])):
        assert tensor is not None and tensor.dtype == torch.uint8
        reference = _pixels(load_image(data))
        assert _mean_abs_diff(tensor.permute(1, 2, 0).numpy(), reference) < 2.0
    assert decode_jpegs([], "cpu") == []


def test_thumbnail_from_tensor_fits_the_box_and_never_enlarges(coffee: Image.Image) -> None:
    pixels = torch.from_numpy(np.asarray(coffee)).permute(2, 0, 1).contiguous()
    for size, expected in ((256, (256, 171)), (1000, coffee.size)):
        thumb = thumbnail_from_tensor(pixels, size=size)
        with Image.open(io.BytesIO(thumb)) as img:
            assert img.format == "JPEG" and img.size == expected
            assert not img.getexif()
            small = np.asarray(coffee.resize(img.size, Image.Resampling.BILINEAR))
            assert _mean_abs_diff(np.asarray(img.convert("RGB")), small) < 8.0


@pytest.mark.gpu
def test_nvjpeg_decode_matches_the_cpu_decoder(coffee: Image.Image, chelsea: Image.Image) -> None:
    datas = [_encode(img, "JPEG", quality=q) for img in (coffee, chelsea) for q in (75, 95)]
    datas.append(NOT_A_SCAN)
    out = decode_jpegs(datas, "cuda")
    assert out[-1] is None
    for data, tensor in zip(datas[:-1], out[:-1], strict=True):
        assert tensor is not None and tensor.device.type == "cuda"
        assert _mean_abs_diff(tensor.permute(1, 2, 0).cpu().numpy(), _pixels(load_image(data))) < 2.0
        thumb = thumbnail_from_tensor(tensor)
        assert Image.open(io.BytesIO(thumb)).format == "JPEG"
