"""Running configurations over collections: decode once, embed through a ``FeatureBank``, whiten, score.

Whitening is learned and applied on the bank's cached vectors, on the evaluated database itself
(category: every image, queries included, as a store learns it from what it indexes; copy: originals
+ distractors, never the queries), or on ``--whiten-on DIR``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from deepfeat.scripts.evaluate.bank import FeatureBank
from deepfeat.scripts.evaluate.errors import EvalError
from deepfeat.scripts.evaluate.grid import Config
from deepfeat.scripts.evaluate.metrics import chance_map, copy_metrics, ranking_metrics
from deepfeat.scripts.evaluate.report import build_report
from deepfeat.scripts.evaluate.transforms import HARD_TRANSFORMS, TRANSFORMS, check_transforms, make_queries

__all__ = ["evaluate_category", "evaluate_copy", "list_images", "load_images"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
WORKING_SIDE = 1024
"""Images are decoded and kept at most this long (side): queries are made from it, and it covers what
every preprocessing here needs (crop: 256 px; full: max_side x the largest scale)."""


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


def _finite(x: float) -> float | None:
    return round(x, 2) if math.isfinite(x) else None


def _whiten_images(whiten_on: str | os.PathLike[str] | None) -> list[Image.Image] | None:
    return load_images(list_images(Path(whiten_on)))[0] if whiten_on else None


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


def _load_classes(
    folder: Path, limit_per_class: int | None
) -> tuple[list[Image.Image], np.ndarray, list[str], list[str]]:
    """(images, their class indices, class names, unreadable files); every class keeps >= 2 images."""
    paths, labels, class_names = _class_folders(folder)
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
    return images, labels, class_names, failed


def evaluate_category(
    folder: str | os.PathLike[str],
    configs: Sequence[Config],
    *,
    ks: Sequence[int] = (1, 5, 10),
    bank: FeatureBank | None = None,
    whiten_on: str | os.PathLike[str] | None = None,
    limit_per_class: int | None = None,
) -> dict[str, Any]:
    """Every image queries all the others; relevant = same class (see the package docstring)."""
    images, labels, class_names, failed = _load_classes(Path(folder), limit_per_class)
    bank = bank or FeatureBank()
    bank.register(configs)
    white_imgs = _whiten_images(whiten_on)
    relevant = labels[:, None] == labels[None, :]
    np.fill_diagonal(relevant, False)
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
                **cfg.fields(),
                "whitening_dim": dim,
                "dim": int(x.shape[1]),
                "metrics": {k: v for k, v in m.items() if k not in ("AP", "first_rank")},
                "per_class_mAP": per_class,
                "images_per_s": _finite(bank.images_per_second(cfg)),
            }
        )
    counts = {name: int((labels == i).sum()) for i, name in enumerate(class_names)}
    info = {
        "images": len(images),
        "classes": counts,
        "chance_mAP": chance_map(list(counts.values())),
        "skipped": failed,
        "ks": list(ks),
        "whiten_on": str(whiten_on) if whiten_on else "database",
    }
    return build_report("category", folder, results, "mAP", info)


@dataclass
class _CopySet:
    originals: int
    database: list[Image.Image]  # originals first, then distractors
    queries: list[Image.Image]
    original_of: np.ndarray  # (q,) index of each query's original in the database
    transform_of: np.ndarray  # (q,) each query's transform name
    failed: list[str]


def _load_copy_set(
    folder: str | os.PathLike[str],
    distractors: str | os.PathLike[str] | None,
    transforms: Sequence[str],
    seed: int,
) -> _CopySet:
    originals, _, failed = load_images(list_images(Path(folder)))
    if len(originals) < 2:
        raise EvalError(f"copy mode needs at least 2 readable originals in {folder}, found {len(originals)}")
    extra: list[Image.Image] = []
    if distractors:
        extra, _, failed_d = load_images(list_images(Path(distractors)))
        failed += failed_d
    queries = make_queries(originals, transforms, seed=seed)
    return _CopySet(
        originals=len(originals),
        database=originals + extra,
        queries=[q[2] for q in queries],
        original_of=np.array([q[0] for q in queries]),
        transform_of=np.array([q[1] for q in queries]),
        failed=failed,
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
    """Transformed copies of each original query the originals (+ distractors); see the package docstring."""
    check_transforms(transforms)
    data = _load_copy_set(folder, distractors, transforms, seed)
    relevant = np.zeros((len(data.queries), len(data.database)), dtype=bool)
    relevant[np.arange(len(data.queries)), data.original_of] = True
    bank = bank or FeatureBank()
    bank.register(configs)
    white_imgs = _whiten_images(whiten_on)
    results = []
    for cfg in configs:
        d = bank.vectors("database", data.database, cfg)
        q = bank.vectors("queries", data.queries, cfg)
        train = bank.vectors("whiten-on", white_imgs, cfg) if white_imgs else d
        (d, q), dim = _apply_whitening(cfg, train, d, q)
        m = ranking_metrics(q @ d.T, relevant, ks)
        summary, per_transform = copy_metrics(
            np.array(m["first_rank"]), np.array(m["AP"]), data.transform_of, transforms, HARD_TRANSFORMS
        )
        results.append(
            {
                "config": cfg.name,
                **cfg.fields(),
                "whitening_dim": dim,
                "dim": int(d.shape[1]),
                "metrics": summary,
                "per_transform": per_transform,
                "images_per_s": _finite(bank.images_per_second(cfg)),
            }
        )
    info = {
        "originals": data.originals,
        "distractors": len(data.database) - data.originals,
        "queries": len(data.queries),
        "transforms": list(transforms),
        "hard_transforms": list(HARD_TRANSFORMS),
        "seed": seed,
        "chance_recall@1": 1 / len(data.database),
        "skipped": data.failed,
        "whiten_on": str(whiten_on) if whiten_on else "database (originals + distractors)",
    }
    return build_report("copy", folder, results, "recall@1", info)
