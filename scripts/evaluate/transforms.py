"""Seeded copy-detection transforms: how copy-mode queries are made from their originals.

Strong enough to separate configurations (a mild copy is found by every one of them):

``crop_quarter``      an off-centre crop keeping a quarter of the area (each side about half)
``jpeg_q10_quarter``  a copy downscaled to a quarter of each side, saved as JPEG at quality 10
``rotate15``          a rotation by 15 degrees, either way (black corners, same size)
``contrast_desat``    contrast x1.8-2.2 and saturation x0.1-0.3
``blur_flip``         a Gaussian blur (1.5% of the short side) and a horizontal mirror
``combined``          an off-centre crop keeping half the area, a colour change (saturation, hue,
                      brightness) and a JPEG at quality 30 of a half-size copy, in that order

Each query draws from its own generator, seeded by (seed, the original's id, the transform's name):
a query does not depend on which other originals or transforms are in the run, nor on their order.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from deepfeat.scripts.evaluate.errors import EvalError

__all__ = [
    "TRANSFORMS",
    "HARD_TRANSFORMS",
    "apply_transform",
    "make_queries",
    "check_transforms",
    "query_rng",
]

TRANSFORMS = ("crop_quarter", "jpeg_q10_quarter", "rotate15", "contrast_desat", "blur_flip", "combined")
HARD_TRANSFORMS = ("crop_quarter", "jpeg_q10_quarter")
"""Reported separately: the quarter-area off-centre crop, and the quality-10 JPEG of a 1/4 downscale."""


def check_transforms(names: Sequence[str]) -> None:
    """Refuse an unknown name before any image is decoded, not after minutes of embedding."""
    if not names:
        raise EvalError(f"no transform given; choose from: {', '.join(TRANSFORMS)}")
    for name in names:
        if name not in TRANSFORMS:
            raise EvalError(f"unknown transform {name!r}; choose from: {', '.join(TRANSFORMS)}")


def _off_centre_crop(img: Image.Image, rng: np.random.Generator, *, area: float) -> Image.Image:
    """Keep ``area`` of the pixels, the crop's aspect within x0.8-1.25 of the image's, placed away
    from the centre (a centred crop keeps what a centre-crop preprocessing sees anyway, and would
    flatter it): along each axis the offset lies in the outer quarters of its range."""
    w, h = img.size
    jitter = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    cw = max(1, min(w, round(w * math.sqrt(area * jitter))))
    ch = max(1, min(h, round(h * math.sqrt(area / jitter))))
    fx, fy = (float(rng.choice([rng.uniform(0.0, 0.25), rng.uniform(0.75, 1.0)])) for _ in range(2))
    x0, y0 = round((w - cw) * fx), round((h - ch) * fy)
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def _rotate(img: Image.Image, rng: np.random.Generator, *, degrees: float = 15.0) -> Image.Image:
    angle = degrees if rng.random() < 0.5 else -degrees
    return img.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=(0, 0, 0))


def _jpeg(img: Image.Image, *, factor: int, quality: int) -> Image.Image:
    """A copy ``factor`` times smaller on each side, through a JPEG of ``quality``."""
    small = img.resize(
        (max(8, img.width // factor), max(8, img.height // factor)), resample=Image.Resampling.LANCZOS
    )
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def _contrast_desat(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    out = ImageEnhance.Color(img).enhance(float(rng.uniform(0.1, 0.3)))
    return ImageEnhance.Contrast(out).enhance(float(rng.uniform(1.8, 2.2)))


def _colour(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Saturation x[0.3, 0.7] or x[1.4, 1.8], hue shifted by 15-40/255, brightness x[0.65, 0.8] or x[1.2, 1.4]."""
    sat = float(rng.choice([rng.uniform(0.3, 0.7), rng.uniform(1.4, 1.8)]))
    bright = float(rng.choice([rng.uniform(0.65, 0.8), rng.uniform(1.2, 1.4)]))
    shift = int(rng.integers(15, 41)) * (1 if rng.random() < 0.5 else -1)
    out = ImageEnhance.Color(img).enhance(sat)
    hsv = np.array(out.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
    out = Image.fromarray(hsv, mode="HSV").convert("RGB")
    return ImageEnhance.Brightness(out).enhance(bright)


def _blur(img: Image.Image, *, relative_radius: float = 0.015) -> Image.Image:
    """Gaussian blur whose radius scales with the image (1.5% of the short side: ~3 px once at 224 px)."""
    return img.filter(ImageFilter.GaussianBlur(radius=max(1.0, relative_radius * min(img.size))))


def apply_transform(img: Image.Image, name: str, rng: np.random.Generator) -> Image.Image:
    """One named copy transform of an RGB image (deterministic given ``rng``'s state)."""
    if name == "crop_quarter":
        return _off_centre_crop(img, rng, area=0.25)
    if name == "jpeg_q10_quarter":
        return _jpeg(img, factor=4, quality=10)
    if name == "rotate15":
        return _rotate(img, rng)
    if name == "contrast_desat":
        return _contrast_desat(img, rng)
    if name == "blur_flip":
        return ImageOps.mirror(_blur(img))
    if name == "combined":
        out = _off_centre_crop(img, rng, area=0.5)
        return _jpeg(_colour(out, rng), factor=2, quality=30)
    raise EvalError(f"unknown transform {name!r}; choose from: {', '.join(TRANSFORMS)}")


def query_rng(seed: int, original_id: int, transform: str) -> np.random.Generator:
    """The generator of one query: (seed, original, transform name), nothing else."""
    return np.random.default_rng([seed, original_id, zlib.crc32(transform.encode())])


def make_queries(
    originals: Sequence[Image.Image],
    transforms: Sequence[str],
    *,
    seed: int = 0,
    ids: Sequence[int] | None = None,
) -> list[tuple[int, str, Image.Image]]:
    """(original index, transform, image) for every original x transform.

    Args:
        ids: a non-negative integer per original that seeds its queries (the evaluation passes one
            derived from the file's content, so a query is the same whatever the listing order or
            the split); default: the original's index.
    """
    check_transforms(transforms)
    if ids is None:
        ids = range(len(originals))
    if len(ids) != len(originals):
        raise EvalError(f"{len(ids)} ids for {len(originals)} originals")
    out = []
    for i, (img, oid) in enumerate(zip(originals, ids, strict=True)):
        for name in transforms:
            out.append((i, name, apply_transform(img, name, query_rng(seed, int(oid), name))))
    return out
