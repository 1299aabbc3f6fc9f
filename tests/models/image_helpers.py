"""Plain helpers for the ``models.images`` tests: encode pictures, craft headers, compare pixels."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

from deepfeat.models.images import LoadedImage

GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


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


def _exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


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
