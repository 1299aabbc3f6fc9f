"""Builders for hostile and unusual inputs, shared by the bad-input, fuzz, load and durability tests.

Everything is made here from the real fixture photos or from bytes written by hand (multipart bodies,
PNG chunks), so each test states exactly what goes over the wire.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

BOUNDARY = "deepfeat-test-boundary-7MA4YWxkTrZu0gW"

# EXIF orientation -> the transpose a *camera* applied when it stored the pixels, i.e. the inverse of
# the fix a reader applies (models.images._ORIENTATION_FIX). Storing upright.transpose(inverse) with tag
# o means "apply fix(o) to get upright back".
ORIENTATION_STORE: dict[int, Image.Transpose | None] = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # reader rotates 270 (i.e. 90 clockwise) to undo it
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}
EXIF_ORIENTATION_TAG = 0x0112


# --------------------------------------------------------------------------------------------- multipart


def part(
    name: str | bytes,
    data: bytes,
    *,
    filename: str | bytes | None = None,
    content_type: str | bytes | None = None,
    extra_headers: bytes = b"",
) -> bytes:
    """One multipart/form-data part, byte for byte (names and filenames are put in as given)."""

    def raw(value: str | bytes) -> bytes:
        return value if isinstance(value, bytes) else value.encode("utf-8")

    disposition = b'Content-Disposition: form-data; name="' + raw(name) + b'"'
    if filename is not None:
        disposition += b'; filename="' + raw(filename) + b'"'
    head = b"--" + BOUNDARY.encode() + b"\r\n" + disposition + b"\r\n"
    if content_type is not None:
        head += b"Content-Type: " + raw(content_type) + b"\r\n"
    return head + extra_headers + b"\r\n" + data + b"\r\n"


def multipart(parts: Iterable[bytes], *, close: bool = True) -> bytes:
    """Join parts and (by default) the closing boundary."""
    body = b"".join(parts)
    return body + (b"--" + BOUNDARY.encode() + b"--\r\n" if close else b"")


def multipart_headers(body: bytes | None = None, **extra: str) -> dict[str, str]:
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", **extra}
    if body is not None:
        headers["Content-Length"] = str(len(body))
    return headers


def file_body(
    data: bytes, *, filename: str | bytes = "photo.jpg", content_type: str = "image/jpeg", **fields: str
) -> bytes:
    """A complete upload body: the image in ``file`` plus plain text fields."""
    parts = [part("file", data, filename=filename, content_type=content_type)]
    parts += [part(key, value.encode("utf-8")) for key, value in fields.items()]
    return multipart(parts)


def body_of_exact_size(image: bytes, total: int, **fields: str) -> bytes:
    """A valid upload body of exactly ``total`` bytes: the JPEG is padded after its EOI marker.

    Decoders stop at EOI, so the padding changes the content hash (a new image) but not the pixels.
    """
    empty = file_body(image, **fields)
    pad = total - len(empty)
    if pad < 0:
        raise ValueError(f"image alone makes a {len(empty)}-byte body, over {total}")
    body = file_body(image + b"\0" * pad, **fields)
    assert len(body) == total
    return body


# --------------------------------------------------------------------------------------------- images


def encode(image: Image.Image, fmt: str = "JPEG", **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def crop16(image: Image.Image) -> Image.Image:
    """Crop to multiples of 16 so JPEG blocks line up whichever way the image is transposed."""
    return image.crop((0, 0, image.width // 16 * 16, image.height // 16 * 16))


def exif_oriented_jpeg(upright: Image.Image, orientation: int, *, quality: int = 95) -> bytes:
    """A JPEG whose stored pixels need EXIF ``orientation`` applied to look like ``upright``."""
    transpose = ORIENTATION_STORE[orientation]
    stored = upright if transpose is None else upright.transpose(transpose)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    return encode(stored, "JPEG", quality=quality, exif=exif.tobytes())


def variant(image: Image.Image, i: int) -> Image.Image:
    """A distinct, still photographic image per ``i`` (a shifted crop): new content, new sha256."""
    dx, dy = (i * 7) % 40, (i * 13) % 40
    return image.crop((dx, dy, image.width - 40 + dx, image.height - 40 + dy))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_header_only(width: int, height: int, *, color_type: int = 0) -> bytes:
    """A tiny PNG whose header claims ``width x height`` (a decompression bomb, or a 0-size image)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def psd_header() -> bytes:
    """The first bytes of a Photoshop file (enough for a format sniffer)."""
    return b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 64, 64, 8, 3) + b"\x00" * 64


def animated(frames: Sequence[Image.Image], fmt: str) -> bytes:
    extra: dict[str, object] = {"lossless": True} if fmt == "WEBP" else {}
    return encode(
        frames[0], fmt, save_all=True, append_images=list(frames[1:]), duration=100, loop=0, **extra
    )


def many_frame_gif(n: int, size: int = 16) -> bytes:
    """An animated GIF of ``n`` distinct tiny frames (frame-count limit)."""
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    return animated(frames, "GIF")


def zip_payload(marker: bytes) -> bytes:
    """A ZIP archive holding ``marker`` uncompressed (so the marker's bytes appear verbatim)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("secret.txt", marker * 4)
    return buf.getvalue()


def cosine(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
