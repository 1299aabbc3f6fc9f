"""Seeded copy-detection transforms: how copy-mode queries are made from their originals.

Strong enough to separate configurations (a mild copy is found by every one of them): a heavy
off-centre crop, a rotation, a low-quality JPEG of a downscale, a colour change, a blur, a mirror,
and several of them combined.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from deepfeat.scripts.evaluate.errors import EvalError

__all__ = ["TRANSFORMS", "HARD_TRANSFORMS", "apply_transform", "make_queries", "check_transforms"]

TRANSFORMS = ("crop", "rotate", "jpeg", "color", "blur", "flip", "combined")
HARD_TRANSFORMS = ("crop", "jpeg")
"""Reported separately: a heavy off-centre crop, and a low-quality JPEG of a 1/4 downscale."""


def check_transforms(names: Sequence[str]) -> None:
    """Refuse an unknown name before any image is decoded, not after minutes of embedding."""
    for name in names:
        if name not in TRANSFORMS:
            raise EvalError(f"unknown transform {name!r}; choose from: {', '.join(TRANSFORMS)}")


def _heavy_crop(img: Image.Image, rng: np.random.Generator, *, area: float = 0.5) -> Image.Image:
    """Keep ``area`` of the pixels, aspect jittered, placed away from the centre (a centred crop
    keeps what a centre-crop preprocessing sees anyway, and would flatter it)."""
    w, h = img.size
    aspect = float(np.exp(rng.uniform(np.log(0.75), np.log(1.33))))
    cw = min(w, round(math.sqrt(area * w * h * aspect)))
    ch = min(h, round(area * w * h / max(cw, 1)))
    # off-centre: the crop's offset along each axis is in the outer quarters of its range
    fx, fy = (float(rng.choice([rng.uniform(0.0, 0.25), rng.uniform(0.75, 1.0)])) for _ in range(2))
    x0, y0 = round((w - cw) * fx), round((h - ch) * fy)
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def _rotate(
    img: Image.Image, rng: np.random.Generator, *, low: float = 8.0, high: float = 15.0
) -> Image.Image:
    angle = float(rng.uniform(low, high)) * (1 if rng.random() < 0.5 else -1)
    return img.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=(0, 0, 0))


def _jpeg(img: Image.Image, *, factor: int = 4, quality: int = 20) -> Image.Image:
    small = img.resize(
        (max(8, img.width // factor), max(8, img.height // factor)), resample=Image.Resampling.LANCZOS
    )
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


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


def _combined(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Crop 65% + rotation 4-10 deg + colour + JPEG q30 of a 1/2 downscale, in that order: each milder
    than on its own, as real re-posted copies are."""
    out = _heavy_crop(img, rng, area=0.65)
    out = _rotate(out, rng, low=4.0, high=10.0)
    out = _colour(out, rng)
    return _jpeg(out, factor=2, quality=30)


def apply_transform(img: Image.Image, name: str, rng: np.random.Generator) -> Image.Image:
    """One named copy transform of an RGB image (deterministic given ``rng``'s state)."""
    if name == "crop":
        return _heavy_crop(img, rng)
    if name == "rotate":
        return _rotate(img, rng)
    if name == "jpeg":
        return _jpeg(img)
    if name == "color":
        return _colour(img, rng)
    if name == "blur":
        return _blur(img)
    if name == "flip":
        return ImageOps.mirror(img)
    if name == "combined":
        return _combined(img, rng)
    raise EvalError(f"unknown transform {name!r}; choose from: {', '.join(TRANSFORMS)}")


def make_queries(
    originals: Sequence[Image.Image], transforms: Sequence[str], *, seed: int = 0
) -> list[tuple[int, str, Image.Image]]:
    """(original index, transform, image) for every original x transform.

    Each query has its own generator seeded by (seed, original index, transform index), so a query
    does not depend on which other originals or transforms are in the run.
    """
    out = []
    for i, img in enumerate(originals):
        for name in transforms:
            t = TRANSFORMS.index(name) if name in TRANSFORMS else -1
            rng = np.random.default_rng([seed, i, t + 1])
            out.append((i, name, apply_transform(img, name, rng)))
    return out
