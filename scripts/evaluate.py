"""``deepfeat eval``: measure retrieval quality, and sweep the choices that decide it.

Two modes:

``category DIR``
    DIR holds one sub-folder per class. Every image queries all the others (exact inner-product search
    on L2-normalised vectors); a hit is relevant when it has the query's class. Reports mAP (mean over
    queries of the average precision), precision@k and recall@k.

``copy DIR [--distractors DIR2]``
    DIR holds distinct originals (any depth). Queries are made from each original with seeded
    transforms (heavy off-centre crop, rotation, JPEG q20 of a 1/4 downscale, colour change, blur,
    horizontal flip, several combined) and searched among the originals plus optional distractors.
    Reports recall@1 and mAP (= mean reciprocal rank: each query has one relevant image) per transform
    and overall.

Both sweep models x layers x pooling x whitening x scales x resize mode in one run. A naive baseline
(penultimate layer, centre crop, single scale, no whitening) is always included. Output: a fixed-width
table, ``--json`` and a ``--plot`` PNG.

Work is shared, not repeated: the images are decoded once; for each (model, resize mode, scale) one
forward pass reads every requested layer and pools it every requested way; multi-scale descriptors are
the normalised sums of the single-scale ones (exactly what ``Embedder`` computes, checked against
``Embedder.variant(...).embed`` on a few images per configuration); whitening is learned and applied
on the cached vectors. Whitening is learned on the evaluated database itself (category: every image,
queries included, as a store learns it from what it indexes; copy: originals + distractors, never the
queries), or on ``--whiten-on DIR``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

__all__ = [
    "EvalError",
    "Config",
    "TRANSFORMS",
    "HARD_TRANSFORMS",
    "average_precision",
    "ranking_metrics",
    "apply_transform",
    "make_queries",
    "build_grid",
    "FeatureBank",
    "evaluate_category",
    "evaluate_copy",
    "format_table",
    "save_plot",
    "main",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
TRANSFORMS = ("crop", "rotate", "jpeg", "color", "blur", "flip", "combined")
HARD_TRANSFORMS = ("crop", "jpeg")
"""Reported separately: a heavy off-centre crop, and a low-quality JPEG of a 1/4 downscale."""
DEFAULT_MULTI_SCALE = (1.0, 1 / math.sqrt(2), 0.5)
WORKING_SIDE = 1024
"""Images are decoded and kept at most this long (side): queries are made from it, and it covers what
every preprocessing here needs (crop: 256 px; full: max_side x the largest scale)."""


class EvalError(Exception):
    """Bad evaluation input (a folder without classes, too few images, an impossible option)."""

    code = "invalid_eval"


# ---------------------------------------------------------------------------------------------------
# metrics


def average_precision(relevant_in_rank_order: np.ndarray, n_relevant: int | None = None) -> float:
    """AP of one ranking: the mean, over the relevant items, of the precision at each one's rank.

    Args:
        relevant_in_rank_order: booleans, best-ranked first (the whole ranking, so every relevant item
            appears; a truncated ranking with ``n_relevant`` given counts the missing ones as 0).
        n_relevant: total relevant items (default: those in the ranking).
    """
    rel = np.asarray(relevant_in_rank_order, dtype=bool)
    total = int(rel.sum()) if n_relevant is None else int(n_relevant)
    if total == 0:
        return 0.0
    hits = np.cumsum(rel)
    ranks = np.flatnonzero(rel) + 1
    return float((hits[rel] / ranks).sum() / total)


def ranking_metrics(scores: np.ndarray, relevant: np.ndarray, ks: Sequence[int]) -> dict[str, Any]:
    """Exact-search metrics for a block of queries.

    Args:
        scores: (q, n) similarities, higher is better; items a query must not retrieve (itself) are
            ``-inf``.
        relevant: (q, n) booleans.
        ks: cut-offs for precision@k and recall@k.
    Returns:
        ``{"mAP", "medAP", "P@k"..., "R@k"..., "AP": per-query list, "first_rank": per-query rank of
        the first relevant item (1-based)}``; means are over queries with at least one relevant item.
    """
    if scores.shape != relevant.shape:
        raise EvalError(f"scores {scores.shape} and relevance {relevant.shape} differ in shape")
    order = np.argsort(-scores, axis=1, kind="stable")  # (q, n), best first
    rel_sorted = np.take_along_axis(relevant, order, axis=1)
    valid = np.isfinite(np.take_along_axis(scores, order, axis=1))
    rel_sorted &= valid
    n_rel = relevant.sum(axis=1)
    keep = n_rel > 0
    aps = np.array([average_precision(row) for row in rel_sorted])
    first = np.where(rel_sorted.any(axis=1), rel_sorted.argmax(axis=1) + 1, 0)
    out: dict[str, Any] = {
        "mAP": float(aps[keep].mean()) if keep.any() else 0.0,
        "medAP": float(np.median(aps[keep])) if keep.any() else 0.0,
    }
    for k in ks:
        found = rel_sorted[:, :k].sum(axis=1)
        out[f"P@{k}"] = float((found[keep] / k).mean()) if keep.any() else 0.0
        out[f"R@{k}"] = float((found[keep] / n_rel[keep]).mean()) if keep.any() else 0.0
    out["AP"] = aps.tolist()
    out["first_rank"] = first.tolist()
    return out


# ---------------------------------------------------------------------------------------------------
# seeded copy transforms


def _heavy_crop(img: Image.Image, rng: np.random.Generator, *, area: float = 0.5) -> Image.Image:
    """Keep ``area`` of the pixels, aspect jittered, placed away from the centre."""
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
        # crop 65% + rotation 4-10 deg + colour + JPEG q30 of a 1/2 downscale, in that order
        out = _heavy_crop(img, rng, area=0.65)
        out = _rotate(out, rng, low=4.0, high=10.0)
        out = _colour(out, rng)
        return _jpeg(out, factor=2, quality=30)
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


# ---------------------------------------------------------------------------------------------------
# configurations


@dataclass(frozen=True)
class Config:
    """One point of the sweep."""

    model: str
    layer: str
    pooling: str  # "none" for vector layers
    whitening: str  # "none", "auto", or an output dimension
    scales: tuple[float, ...] = (1.0,)
    resize_mode: str = "crop"
    max_side: int = 512
    gem_p: float = 3.0
    baseline: bool = False

    @property
    def scales_label(self) -> str:
        return "+".join(f"{s:.2g}" for s in self.scales)

    @property
    def resize_label(self) -> str:
        return "crop" if self.resize_mode == "crop" else f"full{self.max_side}"

    @property
    def pooling_label(self) -> str:
        return f"gem{self.gem_p:g}" if self.pooling == "gem" else self.pooling

    @property
    def name(self) -> str:
        return (
            f"{self.model}/{self.layer}/{self.pooling_label}/{self.resize_label}/s{self.scales_label}"
            f"/w{self.whitening}"
        )

    def embed_key(self) -> tuple[str, str, str, str, int, tuple[float, ...]]:
        """What the raw (unwhitened) vectors depend on."""
        return (self.model, self.layer, self.pooling, self.resize_mode, self.max_side, self.scales)


def _parse_scales(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(eval_fraction(v)) for v in text.split(",") if v.strip())
    except ValueError:
        raise EvalError(f"bad scale set {text!r}: use comma-separated factors like 1,0.7071,0.5") from None
    if not values or any(not 0.1 <= v <= 2.0 for v in values):
        raise EvalError(f"bad scale set {text!r}: factors must be in [0.1, 2]")
    return values


def eval_fraction(text: str) -> float:
    """'0.7071', '1/sqrt2' or '1/2' -> float (only these simple forms, no eval())."""
    t = text.strip().lower().replace(" ", "")
    if t in ("1/sqrt2", "1/sqrt(2)", "1/√2"):
        return 1 / math.sqrt(2)
    if "/" in t:
        num, den = t.split("/", 1)
        return float(num) / float(den)
    return float(t)


def build_grid(
    *,
    models: Sequence[str],
    layers: Sequence[str] | None,
    poolings: Sequence[str],
    whitening: Sequence[str],
    scale_sets: Sequence[tuple[float, ...]],
    resize_modes: Sequence[str],
    max_side: int = 512,
    gem_p: float = 3.0,
) -> list[Config]:
    """Every combination (vector layers take no pooling), plus the naive baseline of each model first.

    ``layers`` None = the three conv layers nearest the top (a penultimate layer that is the
    avg-pooled top conv map, as in EfficientNet/ResNet, would repeat that layer's avg rows).
    """
    from deepfeat.models.registry import get_model

    grid: list[Config] = []
    for model in models:
        spec = get_model(model)
        # The naive baseline: the penultimate vector (k=1: pool5 / fc7), centre crop, one scale.
        naive = spec.get_layer(1)
        baseline = Config(
            model,
            naive.name,
            "none" if naive.kind == "vector" else "avg",
            "none",
            (1.0,),
            "crop",
            max_side,
            gem_p,
            True,
        )
        grid.append(baseline)
        if layers is None:
            chosen = [s for s in spec.layers if s.kind == "conv"][:3]
        else:
            chosen = [spec.get_layer(name) for name in layers]
        for layer in chosen:
            pools = ["none"] if layer.kind == "vector" else list(poolings)
            for pooling in pools:
                for resize in resize_modes:
                    for scales in scale_sets:
                        for white in whitening:
                            cfg = Config(
                                model, layer.name, pooling, white, tuple(scales), resize, max_side, gem_p
                            )
                            if _same_point(cfg, baseline):
                                continue
                            grid.append(cfg)
    return grid


def _same_point(a: Config, b: Config) -> bool:
    return a.embed_key() == b.embed_key() and a.whitening == b.whitening and a.gem_p == b.gem_p


# ---------------------------------------------------------------------------------------------------
# loading


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (any depth, hidden entries skipped), sorted."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [
            Path(root) / f
            for f in sorted(files)
            if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)
        ]
    return out


def load_images(
    paths: Sequence[Path], *, side: int = WORKING_SIDE
) -> tuple[list[Image.Image], list[Path], list[str]]:
    """Decode with the project's loader at most ``side`` long. Returns (images, their paths, failures)."""
    from deepfeat.models.errors import ModelError
    from deepfeat.models.images import load_image

    images: list[Image.Image] = []
    kept: list[Path] = []
    failed: list[str] = []
    for path in paths:
        try:
            img = load_image(path, draft_size=(side, side)).image
        except ModelError as exc:
            failed.append(f"{path}: [{exc.code}] {exc}")
            continue
        if max(img.size) > side:
            img.thumbnail((side, side), Image.Resampling.LANCZOS)
        images.append(img)
        kept.append(path)
    if failed:
        log.warning("skipped %d unreadable images, e.g. %s", len(failed), failed[0])
    return images, kept, failed


# ---------------------------------------------------------------------------------------------------
# shared feature extraction


@dataclass
class _PassTime:
    images: int = 0
    seconds: float = 0.0


@dataclass
class FeatureBank:
    """Per-scale descriptors of named image sets, computed once per (model, resize, scale) pass.

    ``register(configs)`` first, so each pass reads every layer and pooling the sweep needs.
    """

    device: str = "cpu"
    batch_size: int = 32
    verify: bool = True
    embedders: dict[str, Any] = field(default_factory=dict)
    _needs: dict[tuple[str, str, int, float], set[tuple[str, str]]] = field(default_factory=dict)
    _cache: dict[tuple[str, str, str, int, float], dict[tuple[str, str], np.ndarray]] = field(
        default_factory=dict
    )
    _times: dict[tuple[str, str, int, float], _PassTime] = field(default_factory=dict)
    _verified: set[tuple[str, tuple[str, str, str, str, int, tuple[float, ...]]]] = field(default_factory=set)

    def register(self, configs: Iterable[Config]) -> None:
        for cfg in configs:
            for scale in cfg.scales:
                self._needs.setdefault((cfg.model, cfg.resize_mode, cfg.max_side, scale), set()).add(
                    (cfg.layer, cfg.pooling)
                )

    def embedder(self, model: str, gem_p: float) -> Any:
        if model not in self.embedders:
            from deepfeat.models.embedder import Embedder

            log.info("loading %s on %s", model, self.device)
            self.embedders[model] = Embedder(model, device=self.device, precision="fp32", gem_p=gem_p)
        return self.embedders[model]

    def vectors(self, set_name: str, images: Sequence[Image.Image], cfg: Config) -> np.ndarray:
        """(n, d) unit vectors of ``images`` for ``cfg`` (before whitening)."""
        total: np.ndarray | None = None
        for scale in cfg.scales:
            per = self._per_scale(set_name, images, cfg, scale)[(cfg.layer, cfg.pooling)]
            total = per.copy() if total is None else total + per
        assert total is not None  # scales is never empty (checked when parsed)
        out = total / np.maximum(np.linalg.norm(total, axis=1, keepdims=True), 1e-12)
        if self.verify:
            self._verify(set_name, images, cfg, out)
        return out.astype(np.float32, copy=False)

    def images_per_second(self, cfg: Config) -> float:
        """Throughput of the forward passes this configuration needs (decode excluded; passes shared)."""
        n = secs = 0.0
        for scale in cfg.scales:
            t = self._times.get((cfg.model, cfg.resize_mode, cfg.max_side, scale))
            if t is None or t.seconds <= 0:
                return float("nan")
            n = max(n, t.images)
            secs += t.seconds
        return n / secs if secs else float("nan")

    def _per_scale(
        self, set_name: str, images: Sequence[Image.Image], cfg: Config, scale: float
    ) -> dict[tuple[str, str], np.ndarray]:
        key = (set_name, cfg.model, cfg.resize_mode, cfg.max_side, scale)
        if key in self._cache:
            return self._cache[key]
        import torch
        import torch.nn.functional as F

        from deepfeat.models.pooling import get_pooling

        needs = sorted(
            self._needs.get((cfg.model, cfg.resize_mode, cfg.max_side, scale), {(cfg.layer, cfg.pooling)})
        )
        emb = self.embedder(cfg.model, cfg.gem_p).variant(
            resize_mode=cfg.resize_mode, max_side=cfg.max_side, scales=(1.0,)
        )
        layers = {name: emb.spec.get_layer(name) for name, _ in needs}
        nodes = tuple(dict.fromkeys(spec.node for spec in layers.values()))
        pools = {
            (name, pooling): (get_pooling(pooling, gem_p=cfg.gem_p) if layers[name].kind == "conv" else None)
            for name, pooling in needs
        }
        out = {c: np.empty((len(images), layers[c[0]].dim), dtype=np.float32) for c in needs}
        start_t = time.perf_counter()
        for start in range(0, len(images), self.batch_size):
            tensors = emb.preprocess(list(images[start : start + self.batch_size]))
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, tensor in enumerate(tensors):
                groups.setdefault(tuple(tensor.shape), []).append(i)
            for idx in groups.values():
                batch = torch.stack([tensors[i] for i in idx])  # (b, 3, H, W)
                if scale != 1.0:
                    batch = F.interpolate(
                        batch, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False
                    )
                # One pass, every node; the same private forward Embedder.embed uses (device, precision,
                # channels-last, inference mode), so the vectors are the embedder's own.
                feats = emb._forward(batch, nodes)
                rows = [start + i for i in idx]
                for combo, pool in pools.items():
                    feat = feats[layers[combo[0]].node]
                    if pool is not None:
                        feat = pool(feat)  # (b, c, h, w) -> (b, c)
                    out[combo][rows] = F.normalize(feat.flatten(1), dim=1).cpu().numpy()
        elapsed = time.perf_counter() - start_t
        t = self._times.setdefault((cfg.model, cfg.resize_mode, cfg.max_side, scale), _PassTime())
        t.images += len(images)
        t.seconds += elapsed
        log.info(
            "%s: %s %s scale %.3g: %d images, %d layer/pooling outputs in %.1fs (%.1f img/s)",
            set_name, cfg.model, cfg.resize_label, scale, len(images), len(needs), elapsed, len(images) / max(elapsed, 1e-9),
        )  # fmt: skip
        self._cache[key] = out
        return out

    def _verify(self, set_name: str, images: Sequence[Image.Image], cfg: Config, vectors: np.ndarray) -> None:
        """The shared-pass vectors must be what ``Embedder.variant(...).embed`` returns."""
        key = (cfg.model, cfg.embed_key())
        if key in self._verified:
            return
        emb = self.embedder(cfg.model, cfg.gem_p).variant(
            layer=cfg.layer,
            pooling=None if cfg.pooling == "none" else cfg.pooling,
            gem_p=cfg.gem_p,
            resize_mode=cfg.resize_mode,
            max_side=cfg.max_side,
            scales=cfg.scales,
        )
        n = min(2, len(images))
        ref = emb.embed(list(images[:n]))
        cos = (ref * vectors[:n]).sum(axis=1)
        if float(cos.min()) < 0.999:
            raise EvalError(
                f"{cfg.name}: shared-pass vectors differ from Embedder.embed (cosine {cos.min():.4f}); "
                "the embedder's forward changed and evaluate.py must follow it"
            )
        self._verified.add(key)


def _whiten_dim(spec: str, n_train: int, d: int) -> int:
    """'auto' = a quarter of the training vectors (at least 16, at most d): learning all n-1 directions
    from n vectors would make them equidistant, and a collection of a few hundred supports few more."""
    max_dim = min(d, n_train - 1)
    dim = max(16, n_train // 4) if spec == "auto" else int(spec)
    return max(1, min(dim, max_dim))


def _apply_whitening(
    cfg: Config, train: np.ndarray, *blocks: np.ndarray
) -> tuple[list[np.ndarray], int | None]:
    if cfg.whitening == "none":
        return list(blocks), None
    from deepfeat.index.whitening import Whitening

    dim = _whiten_dim(cfg.whitening, train.shape[0], train.shape[1])
    w = Whitening.fit(train, dim=dim)
    return [w.apply(b) for b in blocks], dim


# ---------------------------------------------------------------------------------------------------
# the two evaluations


def _class_folders(folder: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    if not folder.is_dir():
        raise EvalError(f"{folder} is not a folder")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths: list[Path] = []
    labels: list[int] = []
    names: list[str] = []
    for c in classes:
        files = list_images(c)
        if not files:
            continue
        names.append(c.name)
        paths += files
        labels += [len(names) - 1] * len(files)
    if len(names) < 2:
        raise EvalError(
            f"category mode needs at least 2 class sub-folders with images in {folder}, found {len(names)}"
        )
    return paths, np.array(labels), names


def evaluate_category(
    folder: str | os.PathLike[str],
    configs: Sequence[Config],
    *,
    ks: Sequence[int] = (1, 5, 10),
    bank: FeatureBank | None = None,
    whiten_on: str | os.PathLike[str] | None = None,
    limit_per_class: int | None = None,
) -> dict[str, Any]:
    """Every image queries all the others; relevant = same class. See the module docstring."""
    paths, labels, class_names = _class_folders(Path(folder))
    if limit_per_class:
        keep = np.concatenate(
            [np.flatnonzero(labels == c)[:limit_per_class] for c in range(len(class_names))]
        )
        paths, labels = [paths[i] for i in keep], labels[keep]
    images, kept, failed = load_images(paths)
    label_of = {p: lab for p, lab in zip(paths, labels, strict=True)}
    labels = np.array([label_of[p] for p in kept])
    counts = {name: int((labels == i).sum()) for i, name in enumerate(class_names)}
    if min(counts.values()) < 2:
        raise EvalError(f"every class needs at least 2 readable images: {counts}")
    bank = bank or FeatureBank()
    bank.register(configs)
    white_imgs = load_images(list_images(Path(whiten_on)))[0] if whiten_on else None

    relevant = labels[:, None] == labels[None, :]
    np.fill_diagonal(relevant, False)
    n = len(images)
    results = []
    for cfg in configs:
        x = bank.vectors("database", images, cfg)
        train = bank.vectors("whiten-on", white_imgs, cfg) if white_imgs else x
        (x,), dim = _apply_whitening(cfg, train, x)
        scores = x @ x.T
        np.fill_diagonal(scores, -np.inf)  # a query never retrieves itself
        m = ranking_metrics(scores, relevant, ks)
        per_class = {
            name: float(np.mean([m["AP"][i] for i in np.flatnonzero(labels == c)]))
            for c, name in enumerate(class_names)
        }
        results.append(
            {
                "config": cfg.name,
                **_config_fields(cfg),
                "whitening_dim": dim,
                "dim": int(x.shape[1]),
                "metrics": {k: v for k, v in m.items() if k not in ("AP", "first_rank")},
                "per_class_mAP": per_class,
                "images_per_s": _finite(bank.images_per_second(cfg)),
            }
        )
    primary = "mAP"
    return _report(
        "category",
        folder,
        results,
        primary,
        {
            "images": n,
            "classes": counts,
            "chance_mAP": float(np.mean([(c - 1) / (n - 1) for c in counts.values() for _ in range(c)])),
            "skipped": failed,
            "ks": list(ks),
            "whiten_on": str(whiten_on) if whiten_on else "database",
        },
    )


def evaluate_copy(
    folder: str | os.PathLike[str],
    configs: Sequence[Config],
    *,
    distractors: str | os.PathLike[str] | None = None,
    transforms: Sequence[str] = TRANSFORMS,
    seed: int = 0,
    bank: FeatureBank | None = None,
    whiten_on: str | os.PathLike[str] | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, Any]:
    """Transformed copies of each original query the originals (+ distractors). See the module docstring."""
    for t in transforms:
        if t not in TRANSFORMS:
            raise EvalError(f"unknown transform {t!r}; choose from: {', '.join(TRANSFORMS)}")
    paths = list_images(Path(folder))
    originals, kept, failed = load_images(paths)
    if len(originals) < 2:
        raise EvalError(f"copy mode needs at least 2 readable originals in {folder}, found {len(originals)}")
    extra: list[Image.Image] = []
    if distractors:
        extra, _, failed_d = load_images(list_images(Path(distractors)))
        failed += failed_d
    queries = make_queries(originals, transforms, seed=seed)
    q_images = [q[2] for q in queries]
    q_orig = np.array([q[0] for q in queries])
    q_name = np.array([q[1] for q in queries])
    database = originals + extra
    relevant = np.zeros((len(queries), len(database)), dtype=bool)
    relevant[np.arange(len(queries)), q_orig] = True

    bank = bank or FeatureBank()
    bank.register(configs)
    white_imgs = load_images(list_images(Path(whiten_on)))[0] if whiten_on else None
    results = []
    for cfg in configs:
        d = bank.vectors("database", database, cfg)
        q = bank.vectors("queries", q_images, cfg)
        train = bank.vectors("whiten-on", white_imgs, cfg) if white_imgs else d
        (d, q), dim = _apply_whitening(cfg, train, d, q)
        m = ranking_metrics(q @ d.T, relevant, ks)
        first = np.array(m["first_rank"])
        aps = np.array(m["AP"])
        per_t = {
            t: {
                "recall@1": float((first[q_name == t] == 1).mean()),
                "recall@10": float(((first[q_name == t] >= 1) & (first[q_name == t] <= 10)).mean()),
                "mAP": float(aps[q_name == t].mean()),
            }
            for t in transforms
        }
        hard = np.isin(q_name, HARD_TRANSFORMS)
        summary = {
            "recall@1": float((first == 1).mean()),
            "recall@10": float(((first >= 1) & (first <= 10)).mean()),
            "mAP": float(aps.mean()),
            "hard_recall@1": float((first[hard] == 1).mean()) if hard.any() else 0.0,
            "median_rank": float(np.median(first)),
        }
        results.append(
            {
                "config": cfg.name,
                **_config_fields(cfg),
                "whitening_dim": dim,
                "dim": int(d.shape[1]),
                "metrics": summary,
                "per_transform": per_t,
                "images_per_s": _finite(bank.images_per_second(cfg)),
            }
        )
    return _report(
        "copy",
        folder,
        results,
        "recall@1",
        {
            "originals": len(originals),
            "distractors": len(extra),
            "queries": len(queries),
            "transforms": list(transforms),
            "hard_transforms": list(HARD_TRANSFORMS),
            "seed": seed,
            "chance_recall@1": 1 / len(database),
            "skipped": failed,
            "whiten_on": str(whiten_on) if whiten_on else "database (originals + distractors)",
        },
    )


def _finite(x: float) -> float | None:
    return round(x, 2) if math.isfinite(x) else None


def _config_fields(cfg: Config) -> dict[str, Any]:
    d = asdict(cfg)
    d["scales"] = list(cfg.scales)
    return d


def _report(
    mode: str, folder: Any, results: list[dict[str, Any]], primary: str, info: dict[str, Any]
) -> dict[str, Any]:
    ranked = sorted(results, key=lambda r: -r["metrics"][primary])
    baselines = [r for r in results if r["baseline"]]
    return {
        "mode": mode,
        "folder": str(folder),
        "primary_metric": primary,
        **info,
        "best": ranked[0]["config"],
        "baseline": baselines[0]["config"] if baselines else None,
        "marginals": _marginals(results, primary),
        "results": results,
    }


_AXES = ("model", "layer", "pooling", "whitening", "scales", "resize_mode")


def _marginals(results: list[dict[str, Any]], primary: str) -> dict[str, dict[str, dict[str, float]]]:
    """For each axis value: the mean and the best of the primary metric over every other axis."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for axis in _AXES:
        groups: dict[str, list[float]] = {}
        for r in results:
            if r["baseline"]:
                continue
            value = "+".join(f"{s:.2g}" for s in r[axis]) if axis == "scales" else str(r[axis])
            groups.setdefault(value, []).append(r["metrics"][primary])
        if len(groups) > 1:
            out[axis] = {
                v: {"mean": float(np.mean(x)), "best": float(np.max(x)), "n": len(x)}
                for v, x in groups.items()
            }
    return out


# ---------------------------------------------------------------------------------------------------
# output


def format_table(report: dict[str, Any], *, top: int | None = None) -> str:
    """Fixed-width text: one row per configuration, best first, the baseline marked."""
    mode = report["mode"]
    primary = report["primary_metric"]
    rows = sorted(report["results"], key=lambda r: -r["metrics"][primary])
    ranked = list(enumerate(rows, 1))
    if top is not None:  # the N best, and the baseline wherever it ranks
        ranked = [(i, r) for i, r in ranked if i <= top or r["baseline"]]
    if mode == "category":
        metric_cols = ["mAP"] + [f"P@{k}" for k in report["ks"]] + [f"R@{k}" for k in report["ks"]]
    else:
        metric_cols = ["recall@1", "mAP", "hard_recall@1"] + [f"{t}" for t in report["transforms"]]
    head = f"{'#':>3} {'model':<18} {'layer':<11} {'pool':<6} {'resize':<8} {'scales':<11} {'white':<6}"
    head += "".join(f" {c[:8]:>8}" for c in metric_cols) + f" {'img/s':>7}"
    lines = [head, "-" * len(head)]
    for i, r in ranked:
        cfg_cols = (
            f"{i:>3} {r['model'][:18]:<18} {r['layer'][:11]:<11} {_pool_label(r):<6} {_resize_label(r):<8} "
            f"{'+'.join(f'{s:.2g}' for s in r['scales'])[:11]:<11} {_white_label(r):<6}"
        )
        vals = []
        for c in metric_cols:
            v = (
                r["per_transform"][c]["recall@1"]
                if mode == "copy" and c in report["transforms"]
                else r["metrics"][c]
            )
            vals.append(f" {v:>8.3f}")
        ips = r["images_per_s"]
        lines.append(
            cfg_cols
            + "".join(vals)
            + (f" {ips:>7.1f}" if ips == ips else f" {'-':>7}")
            + ("  <- baseline" if r["baseline"] else "")
        )
    return "\n".join(lines)


def _pool_label(r: dict[str, Any]) -> str:
    return f"gem{r['gem_p']:g}" if r["pooling"] == "gem" else str(r["pooling"])


def _resize_label(r: dict[str, Any]) -> str:
    return "crop" if r["resize_mode"] == "crop" else f"full{r['max_side']}"


def _white_label(r: dict[str, Any]) -> str:
    return "-" if r["whitening"] == "none" else str(r["whitening_dim"])


def format_summary(report: dict[str, Any]) -> str:
    primary = report["primary_metric"]
    by_name = {r["config"]: r for r in report["results"]}
    best, base = by_name[report["best"]], by_name.get(report["baseline"] or "")
    lines = []
    if report["mode"] == "category":
        lines.append(
            f"category retrieval on {report['folder']}: {report['images']} images, classes {report['classes']}; "
            f"chance mAP {report['chance_mAP']:.3f}"
        )
        lines.append("mAP = mean over queries of average precision; P@k/R@k = mean over queries")
    else:
        lines.append(
            f"copy detection on {report['folder']}: {report['originals']} originals + {report['distractors']} "
            f"distractors, {report['queries']} queries ({', '.join(report['transforms'])}, seed {report['seed']})"
        )
        lines.append(
            "recall@1 = share of queries whose original ranks first; mAP = mean reciprocal rank of the original; "
            f"hard = {' + '.join(HARD_TRANSFORMS)}"
        )
    vals = [r["metrics"][primary] for r in report["results"]]
    lines.append(
        f"{primary} over {len(vals)} configurations: best {max(vals):.3f}, median {float(np.median(vals)):.3f}, "
        f"mean {float(np.mean(vals)):.3f}, worst {min(vals):.3f}"
    )
    lines.append(
        f"best:     {best['config']}  {primary}={best['metrics'][primary]:.3f}" + _hard(best, report)
    )
    if base:
        lines.append(
            f"baseline: {base['config']}  {primary}={base['metrics'][primary]:.3f}" + _hard(base, report)
        )
    for axis, values in report["marginals"].items():
        parts = ", ".join(
            f"{v}: mean {s['mean']:.3f} best {s['best']:.3f}"
            for v, s in sorted(values.items(), key=lambda kv: -kv[1]["mean"])
        )
        lines.append(f"  by {axis:<11} {parts}")
    return "\n".join(lines)


def _hard(r: dict[str, Any], report: dict[str, Any]) -> str:
    if report["mode"] != "copy":
        return f"  P@1={r['metrics']['P@1']:.3f}" if "P@1" in r["metrics"] else ""
    per = r["per_transform"]
    return "  " + "  ".join(f"{t} R@1={per[t]['recall@1']:.3f}" for t in HARD_TRANSFORMS if t in per)


def save_plot(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Category: horizontal bars of mAP per configuration. Copy: recall@1 heat map, configs x transforms."""
    try:
        import matplotlib
    except ImportError:
        raise EvalError("--plot needs matplotlib (pip install matplotlib)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = report["primary_metric"]
    # best at the top: bars count up from the bottom, heat-map rows down from the top
    rows = sorted(
        report["results"], key=lambda r: r["metrics"][primary], reverse=report["mode"] != "category"
    )
    labels = [
        f"{r['layer']}/{_pool_label(r)}/{_resize_label(r)}/s{'+'.join(f'{s:.2g}' for s in r['scales'])}/w{_white_label(r)}"
        + (" [baseline]" if r["baseline"] else "")
        for r in rows
    ]
    height = max(4.0, 0.2 * len(rows) + 1.5)
    if report["mode"] == "category":
        fig, ax = plt.subplots(figsize=(9, height))
        colours = ["tab:red" if r["baseline"] else "tab:blue" for r in rows]
        ax.barh(range(len(rows)), [r["metrics"][primary] for r in rows], color=colours)
        ax.axvline(
            report["chance_mAP"], color="grey", linestyle="--", label=f"chance {report['chance_mAP']:.2f}"
        )
        ax.set_xlabel("mAP (mean over queries)")
        ax.legend(loc="lower right")
        title = f"category retrieval: {report['images']} images, {len(report['classes'])} classes"
    else:
        cols = ["overall", *report["transforms"]]
        data = np.array(
            [
                [r["metrics"]["recall@1"]] + [r["per_transform"][t]["recall@1"] for t in report["transforms"]]
                for r in rows
            ]
        )
        fig, ax = plt.subplots(figsize=(4 + 0.9 * len(cols), height))
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                ax.text(
                    j,
                    i,
                    f"{data[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="w" if data[i, j] < 0.6 else "k",
                )
        fig.colorbar(im, ax=ax, label="recall@1")
        title = f"copy detection: {report['originals']} originals + {report['distractors']} distractors"
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    model_names = sorted({r["model"] for r in rows})
    ax.set_title(f"{title} ({', '.join(model_names)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# command line


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepfeat eval",
        description="Measure retrieval quality (category retrieval or copy detection) and sweep embedding choices.",
    )
    parser.add_argument("mode", choices=("category", "copy"))
    parser.add_argument(
        "folder", type=Path, help="category: one sub-folder per class; copy: distinct originals"
    )
    parser.add_argument(
        "--distractors", type=Path, default=None, help="copy mode: extra database images (any depth)"
    )
    parser.add_argument("--models", default="efficientnet_lite0", help="comma-separated model names")
    parser.add_argument(
        "--layers",
        default=None,
        help="comma-separated layer names or k (default: the top 3 conv layers)",
    )
    parser.add_argument("--poolings", default="avg,max,gem,rmac")
    parser.add_argument("--gem-p", type=float, default=3.0)
    parser.add_argument(
        "--whitening",
        default="none,auto",
        help="comma-separated: none, auto (a quarter of the training vectors), or a dim",
    )
    parser.add_argument(
        "--whiten-on", type=Path, default=None, help="learn whitening on this folder instead of the database"
    )
    parser.add_argument(
        "--scales",
        nargs="+",
        default=["1", "1,0.7071,0.5"],
        help="scale sets, each comma-separated (default: 1 and 1,0.7071,0.5)",
    )
    parser.add_argument("--resize-modes", default="crop,full", help="comma-separated: crop, full")
    parser.add_argument("--max-side", type=int, default=512, help="longest side in full mode")
    parser.add_argument("-k", "--ks", default="1,5,10", help="cut-offs for P@k / R@k")
    parser.add_argument(
        "--transforms", default=",".join(TRANSFORMS), help="copy mode: comma-separated transforms"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--limit-per-class", type=int, default=None, help="category mode: at most N images per class"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-verify", action="store_true", help="skip the check against Embedder.embed")
    parser.add_argument("--top", type=int, default=None, help="print only the N best rows (and the baseline)")
    parser.add_argument("--json", type=Path, default=None, help="write the full report here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def run(args: argparse.Namespace, *, bank: FeatureBank | None = None) -> dict[str, Any]:
    """Evaluate as the parsed command line says; ``bank`` may bring already-loaded embedders."""
    for mode in _csv(args.resize_modes):
        if mode not in ("crop", "full"):
            raise EvalError(f"unknown resize mode {mode!r}; choose crop or full")
    try:
        ks = [int(k) for k in _csv(args.ks)]
    except ValueError:
        raise EvalError(f"bad --ks {args.ks!r}: comma-separated positive integers") from None
    if not ks or min(ks) < 1:
        raise EvalError(f"bad --ks {args.ks!r}: comma-separated positive integers")
    for w in _csv(args.whitening):
        if w not in ("none", "auto") and not w.isdigit():
            raise EvalError(f"bad whitening {w!r}: none, auto or a dimension")
    configs = build_grid(
        models=_csv(args.models),
        layers=_csv(args.layers) if args.layers else None,
        poolings=_csv(args.poolings),
        whitening=_csv(args.whitening),
        scale_sets=[_parse_scales(s) for s in args.scales],
        resize_modes=_csv(args.resize_modes),
        max_side=args.max_side,
        gem_p=args.gem_p,
    )
    log.info("%d configurations", len(configs))
    if bank is None:
        bank = FeatureBank(device=args.device, batch_size=args.batch_size, verify=not args.no_verify)
    started = time.perf_counter()
    if args.mode == "category":
        report = evaluate_category(
            args.folder,
            configs,
            ks=ks,
            bank=bank,
            whiten_on=args.whiten_on,
            limit_per_class=args.limit_per_class,
        )
    else:
        report = evaluate_copy(
            args.folder,
            configs,
            distractors=args.distractors,
            transforms=_csv(args.transforms),
            seed=args.seed,
            bank=bank,
            whiten_on=args.whiten_on,
            ks=ks,
        )
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["device"] = args.device
    return report


def main(argv: Sequence[str] | None = None, *, bank: FeatureBank | None = None) -> int:
    """``deepfeat eval ...``: exit status 0, or 2 with one ``error [code]: message`` line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from deepfeat.index.errors import StoreError
    from deepfeat.models.errors import ModelError

    try:
        report = run(args, bank=bank)
        report["argv"] = argv
    except (EvalError, ModelError, StoreError) as exc:
        sys.stderr.write(f"error [{exc.code}]: {exc}\n")
        return 2
    out = sys.stdout
    out.write(format_table(report, top=args.top) + "\n\n" + format_summary(report) + "\n")
    out.write(f"({len(report['results'])} configurations in {report['seconds']}s)\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
        out.write(f"report: {args.json}\n")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        try:
            save_plot(report, args.plot)
        except EvalError as exc:
            sys.stderr.write(f"error [{exc.code}]: {exc}\n")
            return 2
        out.write(f"plot: {args.plot}\n")
    return 0


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


if __name__ == "__main__":
    raise SystemExit(main())
