"""Bytes or a path -> a safe, fully decoded RGB PIL image.

This is the one decoding function behind every entry point (HTTP uploads, the batch indexer's worker
processes, the CLI), so a file that indexes is a file that searches. It treats every input as hostile:

* the format is decided from the bytes (never a filename or a declared content type) and must be in
  :data:`ALLOWED_FORMATS`; everything else is :class:`UnsupportedFormatError`;
* the pixel count, the side lengths and the frame count are checked from the header *before* any pixel
  is decoded, so a decompression bomb costs a header parse, not gigabytes of memory;
* truncated or damaged data is :class:`CorruptImageError` (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left
  at Pillow's default, ``False``);
* only :class:`ImageError` subclasses escape for bad input: Pillow's and the codecs' exceptions are
  caught at each Pillow call and re-raised with a message that says what was wrong.

Pillow's global settings (``MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES``) are never changed: the limits
live in :class:`ImageLimits` and are enforced here.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError

from deepfeat.models.errors import (
    CorruptImageError,
    ImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    InvalidOptionError,
    UnsupportedFormatError,
    unreadable_image_file,
)

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_LIMITS",
    "ImageLimits",
    "LoadedImage",
    "ProbedImage",
    "decode_jpegs",
    "load_image",
    "probe_image",
    "thumbnail_from_tensor",
    "make_thumbnail",
    "sniff_format",
    "to_rgb",
]

logger = logging.getLogger(__name__)

#: Pillow format names we decode. ``MPO`` (multi-picture JPEG from stereo/phone cameras) is produced by
#: Pillow's JPEG opener when the file carries an MP index; its first frame is a plain JPEG.
ALLOWED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "MPO"})

# The plugin ids handed to ``Image.open(formats=...)``. MPO has no opener of its own (the JPEG opener
# returns an MpoImageFile), and naming it there raises KeyError inside Pillow, so it is left out here and
# accepted afterwards through ``ALLOWED_FORMATS``.
_OPEN_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_ALLOWED_TEXT = ", ".join(sorted(ALLOWED_FORMATS))

# Everything a Pillow plugin or codec has been seen to raise on malformed input. ``UnidentifiedImageError``
# is an OSError; ``DecompressionBombError`` is handled separately because it means "too large".
# IndexError/KeyError/TypeError/ZeroDivisionError/OverflowError come from the pure-Python header parsers
# (GIF, BMP, PNG chunk and EXIF/TIFF parsing) on crafted input; zlib.error from PNG text chunks.
_DECODE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    zlib.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
)

# EXIF orientation -> the transpose that makes the image upright (the same table as
# ``ImageOps.exif_transpose``). 1 (upright) and unknown values mean "leave as is".
_ORIENTATION_FIX: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Orientations whose fix swaps width and height.
_SWAPS_AXES = frozenset({5, 6, 7, 8})

# Modes with more than 8 bits per sample, which Pillow's convert() would clip instead of scale.
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})


@dataclass(frozen=True)
class ImageLimits:
    """Input limits enforced by :func:`load_image` before any pixel is decoded.

    Attributes:
        max_pixels: Largest ``width * height`` accepted, read from the header. This is the
            decompression-bomb guard: a 50 kB PNG can declare 100k x 100k pixels. Note that Pillow
            refuses anything above ``2 * PIL.Image.MAX_IMAGE_PIXELS`` (about 179 M) on its own while
            parsing the header, and warns above ``MAX_IMAGE_PIXELS``; both are reported as too large,
            so raising this limit beyond Pillow's is not effective without changing Pillow's global.
        min_side: Shortest side accepted; smaller images (1x1 tracking pixels, icons) carry no features.
        max_frames: Most frames an animated GIF/WebP/APNG (or an MPO) may declare. Only the first frame
            is decoded, but counting is still work proportional to the frames walked, so it is bounded.
        max_bytes: Largest encoded input accepted. Paths are read with this bound, so a multi-gigabyte
            file in an indexed folder is refused without being read into memory.
    """

    max_pixels: int = 40_000_000
    min_side: int = 8
    max_frames: int = 1000
    max_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_pixels", "min_side", "max_frames", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidOptionError(f"ImageLimits.{name} must be a positive integer, got {value!r}")


DEFAULT_LIMITS = ImageLimits()


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image and the facts about its source that the store and the API report.

    Attributes:
        image: Mode ``"RGB"``, EXIF orientation applied, fully decoded, detached from any file, with an
            empty ``info`` dict (the orientation is already baked into the pixels; keeping the EXIF
            would invite a second rotation downstream).
        format: Pillow's format name as decided from the bytes, e.g. ``"JPEG"``.
        width: Width of :attr:`image` (after draft scaling and orientation).
        height: Height of :attr:`image`.
        original_size: ``(width, height)`` as stored in the file, before draft scaling and orientation.
        sha256: Hex SHA-256 of the raw input bytes; the store's dedup key.
        nbytes: Length of the raw input in bytes.
    """

    image: Image.Image
    format: str
    width: int
    height: int
    original_size: tuple[int, int]
    sha256: str
    nbytes: int

    @property
    def upright_size(self) -> tuple[int, int]:
        """The full-resolution ``(width, height)`` as people see it (orientation applied, no draft):
        what the store records, whatever size the decoder was asked for."""
        w, h = self.original_size
        turned = (self.width > self.height) != (w > h) and self.width != self.height and w != h
        return (h, w) if turned else (w, h)


def load_image(
    source: bytes | str | os.PathLike[str],
    *,
    limits: ImageLimits = DEFAULT_LIMITS,
    draft_size: tuple[int, int] | None = None,
    sha256: str | None = None,
) -> LoadedImage:
    """Decode untrusted bytes (or a file) into an upright RGB image, enforcing ``limits``.

    Steps, each guarded: read the bytes once and hash them; identify the format from the bytes with
    only the allowed Pillow openers; check size and frame count from the header; optionally set up
    JPEG DCT scaling (``draft_size``); decode the first frame completely; apply the EXIF orientation;
    convert to RGB compositing any alpha onto white.

    Args:
        source: The encoded image (``bytes``), or a path to a file holding it. A ``str`` is always a
            path. The filename's extension is ignored; only the bytes decide the format.
        limits: Pixel, side, frame and byte limits; see :class:`ImageLimits`.
        draft_size: ``(width, height)`` in the upright orientation. For JPEG/MPO only, libjpeg decodes
            at the smallest 1/2, 1/4 or 1/8 scale that is still at least this size on both sides (the
            result is never smaller than ``draft_size`` unless the original is). Used by the batch
            indexer: a 24 MP photo decodes several times faster and the model resizes to ~224 anyway.
            Other formats ignore it.

    Returns:
        The decoded image with its format, sizes, SHA-256 and byte count.

    Raises:
        ImageError: ``source`` is a path that cannot be read (missing, a directory, no permission); code
            ``invalid_image`` because nothing is known about the content. The message names the path.
        CorruptImageError: Empty input; bytes whose magic says an allowed format but whose header or
            data cannot be decoded completely (truncated, damaged, zero width or height, which every
            allowed format's header forbids and Pillow refuses while parsing).
        UnsupportedFormatError: Bytes that no allowed opener recognises (text, ZIP, PDF, SVG, TIFF, PSD,
            ICO, ... and inputs too short to carry any signature, such as a single byte). The message
            names the format when Pillow recognises it and lists the allowed ones.
        ImageTooLargeError: More than ``limits.max_pixels`` pixels, more than ``limits.max_frames``
            frames, or more than ``limits.max_bytes`` bytes.
        ImageTooSmallError: A side shorter than ``limits.min_side`` (1x1 included).
        InvalidOptionError: ``draft_size`` is not two positive integers (a caller bug, not bad input).
    """
    if draft_size is not None:
        _check_draft_size(draft_size)
    data = _read_source(source, max_bytes=limits.max_bytes)
    if not data:
        raise CorruptImageError("empty input: 0 bytes is not an image")
    sha256 = sha256 or hashlib.sha256(data).hexdigest()

    img, fmt, original_size = _open_checked(data, limits)
    with img:
        if draft_size is not None and fmt in ("JPEG", "MPO"):
            # The caller asks in upright terms; libjpeg scales the stored raster, so swap for 90-degree
            # orientations or the "never smaller than draft_size" promise breaks on portrait photos.
            request = draft_size
            if _read_orientation(img) in _SWAPS_AXES:
                request = (draft_size[1], draft_size[0])
            with _decoding(fmt):
                img.draft("RGB", request)

        with _decoding(fmt):
            img.load()
        orientation = _read_orientation(img)
        with _decoding(fmt):
            oriented = img.transpose(_ORIENTATION_FIX[orientation]) if orientation != 1 else img
            rgb = to_rgb(oriented)
            if rgb is img:
                rgb = img.copy()  # detach from the ImageFile (and its BytesIO) for RGB passthrough
    # Pixels are upright now; an EXIF orientation tag left in ``info`` would be applied twice by anyone
    # who calls exif_transpose later. Fresh images get their own info dict, so this mutates nothing shared.
    rgb.info = {}
    logger.debug("decoded %s %dx%d -> %dx%d", fmt, *original_size, rgb.width, rgb.height)
    return LoadedImage(
        image=rgb,
        format=fmt,
        width=rgb.width,
        height=rgb.height,
        original_size=original_size,
        sha256=sha256,
        nbytes=len(data),
    )


def _open_checked(data: bytes, limits: ImageLimits) -> tuple[Image.Image, str, tuple[int, int]]:
    """Identify the format and check every limit that the header alone can show (no pixel decoded)."""
    img = _open(data)
    try:
        fmt = img.format or "unknown"
        if fmt not in ALLOWED_FORMATS:  # defensive: only allowed openers were offered the bytes
            raise UnsupportedFormatError(
                f"image format {fmt} is not supported; allowed formats: {_ALLOWED_TEXT}"
            )
        original_size = (int(img.width), int(img.height))
        _check_dimensions(original_size, fmt=fmt, limits=limits)
        _check_frames(img, data, fmt=fmt, max_frames=limits.max_frames)
    except BaseException:
        img.close()
        raise
    return img, fmt, original_size


@dataclass(frozen=True)
class ProbedImage:
    """What the header of an image says, every limit checked, no pixel decoded.

    The batch indexer's workers probe instead of decoding when the GPU decodes (see
    :func:`decode_jpegs`): hashing and header checks stay on the CPU, the pixels go to the GPU.

    Attributes:
        data: The raw bytes (for the GPU decoder).
        format: Pillow's format name, from the bytes.
        upright_size: ``(width, height)`` with the EXIF orientation applied.
        sha256: Hex SHA-256 of ``data``.
        gpu_decodable: A complete baseline/progressive 8-bit JPEG in grey or YCbCr that nvJPEG decodes
            to the same picture Pillow would: JPEG (not MPO), mode ``L`` or ``RGB`` (CMYK and YCCK
            need Pillow's colour conversion), ending with the EOI marker (a truncated file must fail
            as :class:`CorruptImageError`, as it does on the CPU, not decode half-grey).
    """

    data: bytes
    format: str
    upright_size: tuple[int, int]
    sha256: str
    gpu_decodable: bool

    @property
    def nbytes(self) -> int:
        return len(self.data)


def probe_image(
    source: bytes | str | os.PathLike[str], *, limits: ImageLimits = DEFAULT_LIMITS, sha256: str | None = None
) -> ProbedImage:
    """Read, hash and check an image like :func:`load_image`, without decoding its pixels.

    Raises:
        The same :class:`ImageError` subclasses as :func:`load_image` for everything a header shows
        (unreadable path, empty, unsupported format, too large, too small, too many frames). Damage
        inside the compressed data only shows when decoding; the GPU decoder's caller falls back to
        :func:`load_image` for any file nvJPEG refuses, so such a file fails with the same code.
    """
    data = _read_source(source, max_bytes=limits.max_bytes)
    if not data:
        raise CorruptImageError("empty input: 0 bytes is not an image")
    sha256 = sha256 or hashlib.sha256(data).hexdigest()
    img, fmt, (w, h) = _open_checked(data, limits)
    with img:
        orientation = _read_orientation(img)
        mode = img.mode
    upright = (h, w) if orientation in _SWAPS_AXES else (w, h)
    decodable = (
        fmt == "JPEG"
        and mode in ("L", "RGB")
        and data.rstrip(b"\0").endswith(b"\xff\xd9")
        and _plain_jpeg_markers(data)
    )
    return ProbedImage(data=data, format=fmt, upright_size=upright, sha256=sha256, gpu_decodable=decodable)


_SOF_HUFFMAN = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended, progressive (Huffman-coded)
_SOF_OTHER = frozenset({0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _plain_jpeg_markers(data: bytes) -> bool:
    """Walk the header segments up to the scan: quantisation tables present, one Huffman-coded frame,
    every length in bounds. nvJPEG is more lenient than libjpeg (it decodes a file without its
    quantisation tables that Pillow rightly calls corrupt), so a file takes the GPU path only when
    its structure is one both decoders read the same way; anything else goes to Pillow."""
    pos, seen_dqt, frames = 2, False, 0
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2 or pos + 2 + length > len(data):
            return False
        if marker == 0xDA:  # start of scan: the header is complete
            return seen_dqt and frames == 1
        seen_dqt |= marker == 0xDB
        if marker in _SOF_OTHER:
            return False
        frames += marker in _SOF_HUFFMAN
        pos += 2 + length
    return False


def decode_jpegs(datas: Sequence[bytes], device: torch.device | str) -> list[torch.Tensor | None]:
    """Decode JPEGs on a CUDA device with nvJPEG (torchvision), upright, as (3, H, W) uint8 tensors.

    One batched call for the whole list; when it fails (one bad file fails the batch) each file is
    retried alone so one bad file costs only itself. ``None`` marks a file nvJPEG could not decode: the
    caller decodes that one with :func:`load_image`, which raises the proper :class:`ImageError`.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    def as_tensor(data: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def decode(batch: list[torch.Tensor]) -> list[torch.Tensor]:
        out = decode_jpeg(batch, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    encoded = [as_tensor(d) for d in datas]
    if not encoded:
        return []
    try:
        return list(decode(encoded))
    except RuntimeError as exc:
        logger.debug("batched GPU decode failed (%s); decoding one by one", exc)
    results: list[torch.Tensor | None] = []
    for one in encoded:
        try:
            results.append(decode([one])[0])
        except RuntimeError as exc:
            logger.debug("GPU decode failed, the CPU decoder takes this one: %s", exc)
            results.append(None)
    return results


def _shrink_for_thumbnail(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> the same, longest side at most ``size``: torch's antialiased bicubic resize,
    on the tensor's device (a few times cheaper on CPU than Pillow's Lanczos, and as sharp)."""
    from torchvision.transforms.v2 import functional as TF

    h, w = int(image.shape[-2]), int(image.shape[-1])
    scale = min(1.0, size / max(h, w))
    if scale >= 1.0:
        return image
    return TF.resize(
        image,
        [max(1, round(h * scale)), max(1, round(w * scale))],
        interpolation=TF.InterpolationMode.BICUBIC,
        antialias=True,
    )


def thumbnail_from_tensor(image: torch.Tensor, *, size: int = 256, quality: int = 85) -> bytes:
    """:func:`make_thumbnail` for a (3, H, W) uint8 tensor, on the tensor's device (nvJPEG encodes on
    CUDA): the GPU path of the batch indexer never brings full-size pixels back to the host."""
    from torchvision.io import encode_jpeg

    encoded = encode_jpeg(_shrink_for_thumbnail(image, size).contiguous(), quality=quality)
    assert isinstance(encoded, torch.Tensor)
    return bytes(encoded.cpu().numpy().tobytes())


def sniff_format(data: bytes) -> str | None:
    """Name the format of ``data`` from its magic bytes alone, as Pillow would identify it.

    Runs each Pillow plugin's signature check (``accept``) over the first 16 bytes without parsing any
    header, so it is cheap and safe on hostile input. Formats whose plugins have no signature check
    (TGA, IM, ...) cannot be named this way and give ``None``. JPEG and MPO share a signature; this says
    ``"JPEG"`` for both.

    Args:
        data: The encoded bytes (only the first 16 are looked at).

    Returns:
        The Pillow format name (``"PNG"``, ``"TIFF"``, ``"PSD"``, ...) or ``None`` if none matches.
    """
    Image.init()  # registers every plugin; idempotent, and what Image.open itself does on a miss
    prefix = bytes(data[:16])
    for name in Image.ID:
        _factory, accept = Image.OPEN[name]
        if accept is None:
            continue
        try:
            result = accept(prefix)
        except _DECODE_ERRORS:  # some checks unpack fixed-size fields and fail on short prefixes
            continue
        # A str result means "this is the format, but its codec is not installed".
        if result:
            return name
    return None


def to_rgb(image: Image.Image, *, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without losing the picture.

    * ``RGB`` without transparency is returned as is (the same object).
    * Alpha (``LA``, ``PA``, ``RGBA``, ``RGBa``, ``P``/``L``/``RGB`` with a ``transparency`` key) is
      composited onto ``background``: dropping alpha would turn transparent regions into whatever colour
      the encoder left behind them (often black), which changes the features.
    * 16-bit and wider modes are scaled to 8 bits rather than clipped (Pillow's convert clips, which
      turns a 16-bit photo white): ``I;16*`` divides by 257 (65535 -> 255); ``I`` holding values in
      ``[0, 65535]`` (how 16-bit data arrives in a 32-bit container) is scaled the same way, any other
      range is stretched min..max; ``F`` in ``[0, 1]`` is multiplied by 255, any other range stretched
      min..max (non-finite values count as 0).
    * ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` and the rest go through ``convert``.

    Args:
        image: Any decoded Pillow image.
        background: RGB colour that transparent pixels are composited onto (white by default, the
            same for every entry point so an image always gives the same vector).

    Returns:
        An ``RGB`` image (a new one unless ``image`` already was plain RGB).

    Raises:
        ImageError: The mode has no conversion to RGB (e.g. ``La``).
        InvalidOptionError: ``background`` is not three integers in ``0..255``.
    """
    if len(background) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in background):
        raise InvalidOptionError(f"background must be three integers in 0..255, got {background!r}")
    mode = image.mode
    try:
        if mode in _HIGH_DEPTH_MODES:
            return _high_depth_to_rgb(image, background)
        if _has_alpha(image):
            return _composite(image.convert("RGBA"), background)
        if mode == "RGB":
            return image
        return image.convert("RGB")
    except ValueError as exc:  # Pillow: "conversion from X to Y not supported"
        raise ImageError(f"cannot convert image mode {mode!r} to RGB: {exc}") from exc


def make_thumbnail(image: Image.Image, *, size: int = 256, quality: int = 85) -> bytes:
    """Encode a small JPEG preview of ``image`` with no metadata.

    The image is converted with :func:`to_rgb` (alpha onto white), shrunk to fit in a ``size`` x
    ``size`` box keeping its aspect ratio (never enlarged), and re-encoded as a plain baseline JPEG. No
    EXIF, ICC or comment is written: thumbnails are served to browsers and must not leak the uploader's
    GPS position or camera serial number.

    Args:
        image: Any decoded Pillow image (typically :attr:`LoadedImage.image`).
        size: Longest side of the thumbnail, in pixels.
        quality: JPEG quality, 1..100.

    Returns:
        The JPEG bytes.

    Raises:
        InvalidOptionError: ``size`` < 1 or ``quality`` outside 1..100.
        ImageError: The image's mode cannot be converted to RGB.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidOptionError(f"thumbnail size must be a positive integer, got {size!r}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise InvalidOptionError(f"thumbnail quality must be an integer in 1..100, got {quality!r}")
    from torchvision.transforms.v2 import functional as TF

    # The resize is torch's, as on the GPU path: Pillow's Lanczos took about half of the decode
    # threads' time on 0.2 MP photos, this about a sixth of that. A fresh tensor, so the caller's image
    # is never touched; the encoder gets bare pixels, so no metadata can ride along.
    pixels = _shrink_for_thumbnail(TF.pil_to_tensor(to_rgb(image)), size)
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# helpers


def _read_source(source: bytes | str | os.PathLike[str], *, max_bytes: int) -> bytes:
    """Return the raw bytes of ``source``, reading a path at most once and at most ``max_bytes + 1``."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    elif isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        try:
            with open(path, "rb") as fh:
                data = fh.read(max_bytes + 1)
        except OSError as exc:
            raise unreadable_image_file(path, exc) from exc
    else:
        raise TypeError(f"source must be bytes or a path, got {type(source).__name__}")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"input is larger than the limit of {max_bytes} bytes")
    return data


def _check_draft_size(draft_size: tuple[int, int]) -> None:
    ok = (
        isinstance(draft_size, tuple)
        and len(draft_size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in draft_size)
    )
    if not ok:
        raise InvalidOptionError(f"draft_size must be (width, height) positive integers, got {draft_size!r}")


@contextmanager
def _decoding(fmt: str) -> Iterator[None]:
    """Translate Pillow/codec exceptions raised while decoding into :class:`ImageError` subclasses."""
    try:
        yield
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{fmt} image is too large: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise CorruptImageError(f"{fmt} image data could not be decoded: {exc}") from exc


def _open(data: bytes) -> Image.Image:
    """Identify and parse the header with only the allowed openers; nothing is decoded yet."""
    try:
        # Pillow parses the header only; the BytesIO is owned by the returned image and closed with it.
        return Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except Image.DecompressionBombError as exc:
        # Pillow's own guard (2 x MAX_IMAGE_PIXELS) fires inside open(), before our check can.
        raise ImageTooLargeError(f"image declares too many pixels: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise _unidentified(data) from exc
    except _DECODE_ERRORS as exc:
        detected = sniff_format(data) or "image"
        raise CorruptImageError(f"{detected} header could not be parsed: {exc}") from exc


def _unidentified(data: bytes) -> ImageError:
    """Choose the error for bytes no allowed opener would take: corrupt if the magic says allowed."""
    detected = sniff_format(data)
    if detected in ALLOWED_FORMATS:
        return CorruptImageError(
            f"data starts like a {detected} file but its header could not be parsed "
            "(truncated, damaged, or a zero width/height)"
        )
    if detected is not None:
        what = f"image format {detected} is not supported"
    else:
        what = f"not a recognised image format (starts with {bytes(data[:8])!r})"
    return UnsupportedFormatError(f"{what}; allowed formats: {_ALLOWED_TEXT}")


def _check_dimensions(size: tuple[int, int], *, fmt: str, limits: ImageLimits) -> None:
    """Enforce the pixel and side limits on the header's size, before any decoding."""
    width, height = size
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(
            f"{fmt} image is {width}x{height} = {width * height} pixels, "
            f"over the limit of {limits.max_pixels} pixels"
        )
    if min(width, height) < limits.min_side:
        raise ImageTooSmallError(
            f"{fmt} image is {width}x{height}; both sides must be at least {limits.min_side} pixels"
        )


def _check_frames(img: Image.Image, data: bytes, *, fmt: str, max_frames: int) -> None:
    """Reject animations with more than ``max_frames`` frames without decoding them."""
    if fmt == "GIF":
        # Pillow's GIF n_frames walks every block of the whole file in Python (~2 s for a crafted
        # 15 MB file of a million 1x1 frames); this walk stops one frame past the limit.
        frames = _count_gif_frames(data, stop_after=max_frames + 1)
    else:
        # WebP, APNG and MPO declare their frame count in the header (demuxer info, acTL, MP index).
        with _decoding(fmt):
            frames = int(getattr(img, "n_frames", 1))
    if frames > max_frames:
        raise ImageTooLargeError(f"animated {fmt} has more than {max_frames} frames")


def _count_gif_frames(data: bytes, *, stop_after: int) -> int:
    """Count GIF image descriptors, stopping at ``stop_after``.

    Follows the block structure the way Pillow's reader does (stray bytes between blocks are skipped);
    a malformed tail just ends the count, since decoding the first frame will judge the data anyway.
    """
    n = len(data)
    if n < 13:
        return 1
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # logical screen + global colour table
    frames = 0
    while pos < n and frames < stop_after:
        block = data[pos]
        pos += 1
        if block == 0x3B:  # trailer
            break
        if block == 0x21:  # extension: label byte, then data sub-blocks
            pos = _skip_gif_sub_blocks(data, pos + 1)
        elif block == 0x2C:  # image descriptor: 9 bytes, optional local colour table, LZW size, data
            if pos + 9 > n:
                break
            local = data[pos + 8]
            pos += 9 + (3 << ((local & 7) + 1) if local & 0x80 else 0)
            pos = _skip_gif_sub_blocks(data, pos + 1)
            frames += 1
    return max(frames, 1)


def _skip_gif_sub_blocks(data: bytes, pos: int) -> int:
    """Return the position after a chain of GIF data sub-blocks (length-prefixed, 0-terminated)."""
    n = len(data)
    while pos < n:
        length = data[pos]
        pos += 1 + length
        if length == 0:
            break
    return pos


def _read_orientation(img: Image.Image) -> int:
    """Return the EXIF orientation (1..8), treating a missing, odd or unreadable EXIF block as upright.

    A damaged EXIF block (common with some phone and editing software) says nothing about the pixels,
    so it must not cost the image; it is logged at debug level and ignored.
    """
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODE_ERRORS as exc:
        logger.debug("ignoring unreadable EXIF block in %s image: %s", img.format, exc)
        return 1
    return value if isinstance(value, int) and value in _ORIENTATION_FIX else 1


def _has_alpha(image: Image.Image) -> bool:
    """Whether the image carries transparency in any of Pillow's forms."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return True
    # A palette with an alpha column but no ``transparency`` key (e.g. built in memory).
    return image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"


def _composite(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Alpha-composite an RGBA image onto an opaque ``background`` colour; return RGB."""
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _high_depth_to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Scale a 16-bit, 32-bit integer or float image to 8 bits (see :func:`to_rgb`), then to RGB."""
    mode = image.mode
    values = np.asarray(image)  # (h, w): uint16 (either byte order), int32 or float32
    if mode == "F":
        data = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        in_unit = data.size == 0 or (data.min() >= 0.0 and data.max() <= 1.0)
        scaled = data * 255.0 if in_unit else _stretch(data)
    else:
        data = values.astype(np.float64)
        in_16bit = mode.startswith("I;16") or data.size == 0 or (data.min() >= 0 and data.max() <= 65535)
        scaled = data / 257.0 if in_16bit else _stretch(data)
    gray = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))  # mode "L"
    key = image.info.get("transparency")
    if isinstance(key, int) and mode != "F":
        # PNG tRNS on 16-bit grey: one sample value is fully transparent.
        alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8))
        return _composite(Image.merge("LA", (gray, alpha)).convert("RGBA"), background)
    return gray.convert("RGB")


def _stretch(data: np.ndarray) -> np.ndarray:
    """Map ``data``'s own min..max linearly onto 0..255 (all zeros when the image is flat)."""
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        return np.zeros_like(data)
    return (data - lo) * (255.0 / (hi - lo))
