"""Running configurations over image sets: decode once, embed through a ``FeatureBank``, whiten, score.

The ``*_set`` functions evaluate one loaded set (one part of one collection); ``protocol`` runs them
on the tuning and the validation parts. ``evaluate_category`` / ``evaluate_copy`` evaluate a whole
folder without any split, for a quick grid on one's own images (nothing chosen there is validated).

Whitening is learned and applied on the bank's cached vectors, on the evaluated database itself
(category: every image, queries included, as a store learns it from what it indexes; copy: originals
+ distractors, never the queries), or on the images of ``--whiten-on DIR``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from deepfeat.scripts.evaluate.bank import FeatureBank
from deepfeat.scripts.evaluate.errors import EvalError
from deepfeat.scripts.evaluate.grid import Config
from deepfeat.scripts.evaluate.metrics import chance_map, copy_metrics, ranking_metrics
from deepfeat.scripts.evaluate.report import build_report
from deepfeat.scripts.evaluate.split import file_sha256
from deepfeat.scripts.evaluate.transforms import HARD_TRANSFORMS, TRANSFORMS, check_transforms, make_queries

__all__ = [
    "CategorySet",
    "CopySet",
    "class_files",
    "content_id",
    "evaluate_category",
    "evaluate_category_set",
    "evaluate_copy",
    "evaluate_copy_set",
    "list_images",
    "load_category_set",
    "load_images",
    "make_copy_set",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
WORKING_SIDE = 1024
"""Images are decoded and kept at most this long (side): queries are made from it, and it covers what
every preprocessing here needs (crop: 256 px; full: max_side x the largest scale)."""


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (any depth, hidden entries skipped), sorted."""
    if not Path(folder).is_dir():
        raise EvalError(f"{folder} is not a folder")
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


def content_id(sha256: str) -> int:
    """A non-negative integer from a file's content hash: what seeds an original's copy queries."""
    return int(sha256[:15], 16)


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


def _regional(
    bank: FeatureBank, cfg: Config, parts: Sequence[tuple[str, Sequence[Image.Image]]]
) -> np.ndarray | None:
    """The database's other vectors for ``cfg`` (its low-pass one, then its regional ones), (n, r, d)
    over the named image lists in order; None when ``cfg`` keeps none."""
    if not cfg.regions and not cfg.lowpass:
        return None
    blocks = []
    for name, images in parts:
        if not images:
            continue
        own = []
        if cfg.lowpass:
            own.append(bank.lowpass_vectors(name, images, cfg)[:, None])
        if cfg.regions:
            own.append(bank.region_vectors(name, images, cfg))
        blocks.append(np.concatenate(own, axis=1))
    return np.concatenate(blocks)


def _scores(queries: np.ndarray, database: np.ndarray, regions: np.ndarray | None) -> np.ndarray:
    """(m, n) query-image scores as a store ranks them: each database image scores its best vector,
    the global one or a regional one."""
    scores = queries @ database.T
    if regions is not None:
        best_region = np.einsum("md,nrd->mnr", queries, regions, optimize=True).max(axis=2)
        scores = np.maximum(scores, best_region)
    return scores


def _whitened_regions(cfg: Config, train: np.ndarray, regions: np.ndarray | None) -> np.ndarray | None:
    """Regional vectors whitened like the global ones (a store projects every vector it holds)."""
    if regions is None or cfg.whitening == "none":
        return regions
    n, r, d = regions.shape
    (flat,), _ = _apply_whitening(cfg, train, regions.reshape(n * r, d))
    return flat.reshape(n, r, -1)


def _finite(x: float) -> float | None:
    return round(x, 2) if math.isfinite(x) else None


def whiten_images(whiten_on: str | os.PathLike[str] | None) -> list[Image.Image] | None:
    return load_images(list_images(Path(whiten_on)))[0] if whiten_on else None


# ---------------------------------------------------------------------------------------------------
# category retrieval


def class_files(folder: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """(image files, their class indices, class names): one class per sub-folder with images."""
    folder = Path(folder)
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


@dataclass
class CategorySet:
    """The decoded images of one category set, their class indices and the class names."""

    images: list[Image.Image]
    labels: np.ndarray
    class_names: list[str]
    failed: list[str] = field(default_factory=list)


def load_category_set(
    paths: Sequence[Path],
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    limit_per_class: int | None = None,
    where: str = "",
) -> CategorySet:
    """Decode ``paths``; every class must keep at least 2 readable images (a query needs a relevant one)."""
    labels = np.asarray(labels)
    if limit_per_class:
        keep = np.concatenate(
            [np.flatnonzero(labels == c)[:limit_per_class] for c in range(len(class_names))]
        )
        paths, labels = [paths[i] for i in keep], labels[keep]
    images, kept, failed = load_images(paths)
    label_of = {p: lab for p, lab in zip(paths, labels, strict=True)}
    kept_labels = np.array([label_of[p] for p in kept], dtype=int)
    counts = {name: int((kept_labels == i).sum()) for i, name in enumerate(class_names)}
    if min(counts.values()) < 2:
        raise EvalError(f"every class needs at least 2 readable images{where}: {counts}")
    return CategorySet(images, kept_labels, list(class_names), failed)


def evaluate_category_set(
    data: CategorySet,
    configs: Sequence[Config],
    *,
    ks: Sequence[int] = (1, 5, 10),
    bank: FeatureBank,
    set_name: str = "database",
    whiten_on: list[Image.Image] | None = None,
    whiten_label: str = "database",
    folder: Any = "",
) -> dict[str, Any]:
    """Every image queries all the others; relevant = same class. Returns the report of ``configs``."""
    labels = data.labels
    relevant = labels[:, None] == labels[None, :]
    np.fill_diagonal(relevant, False)
    results = []
    for cfg in configs:
        x = bank.vectors(set_name, data.images, cfg)
        train = bank.vectors("whiten-on", whiten_on, cfg) if whiten_on else x
        regions = _whitened_regions(cfg, train, _regional(bank, cfg, [(set_name, data.images)]))
        (x,), dim = _apply_whitening(cfg, train, x)
        scores = _scores(x, x, regions)
        np.fill_diagonal(scores, -np.inf)  # a query never retrieves itself
        m = ranking_metrics(scores, relevant, ks)
        per_class = {
            name: float(np.mean([m["AP"][i] for i in np.flatnonzero(labels == c)]))
            for c, name in enumerate(data.class_names)
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
    counts = {name: int((labels == i).sum()) for i, name in enumerate(data.class_names)}
    info = {
        "images": len(data.images),
        "classes": counts,
        "chance_mAP": chance_map(list(counts.values())),
        "skipped": data.failed,
        "ks": list(ks),
        "whiten_on": whiten_label,
    }
    return build_report("category", folder, results, "mAP", info)


def evaluate_category(
    folder: str | os.PathLike[str],
    configs: Sequence[Config],
    *,
    ks: Sequence[int] = (1, 5, 10),
    bank: FeatureBank | None = None,
    whiten_on: str | os.PathLike[str] | None = None,
    limit_per_class: int | None = None,
) -> dict[str, Any]:
    """The whole folder, no split (see the module docstring); one sub-folder per class."""
    paths, labels, names = class_files(Path(folder))
    data = load_category_set(paths, labels, names, limit_per_class=limit_per_class)
    bank = bank or FeatureBank()
    bank.register(configs)
    return evaluate_category_set(
        data,
        configs,
        ks=ks,
        bank=bank,
        whiten_on=whiten_images(whiten_on),
        whiten_label=str(whiten_on) if whiten_on else "database",
        folder=folder,
    )


# ---------------------------------------------------------------------------------------------------
# copy detection


@dataclass
class CopySet:
    """Originals, distractors and the seeded queries made from the originals."""

    originals: list[Image.Image]
    distractors: list[Image.Image]
    queries: list[Image.Image]
    original_of: np.ndarray  # (q,) index of each query's original among the originals
    transform_of: np.ndarray  # (q,) each query's transform name
    transforms: list[str]
    seed: int
    failed: list[str] = field(default_factory=list)


def make_copy_set(
    originals: list[Image.Image],
    distractors: list[Image.Image],
    *,
    transforms: Sequence[str],
    seed: int,
    ids: Sequence[int] | None = None,
    failed: Sequence[str] = (),
    where: str = "",
) -> CopySet:
    if len(originals) < 2:
        raise EvalError(f"copy mode needs at least 2 readable originals{where}, found {len(originals)}")
    queries = make_queries(originals, transforms, seed=seed, ids=ids)
    return CopySet(
        originals=originals,
        distractors=distractors,
        queries=[q[2] for q in queries],
        original_of=np.array([q[0] for q in queries]),
        transform_of=np.array([q[1] for q in queries]),
        transforms=list(transforms),
        seed=seed,
        failed=list(failed),
    )


def evaluate_copy_set(
    data: CopySet,
    configs: Sequence[Config],
    *,
    ks: Sequence[int] = (1, 5, 10),
    bank: FeatureBank,
    set_names: tuple[str, str, str] = ("originals", "distractors", "queries"),
    whiten_on: list[Image.Image] | None = None,
    whiten_label: str = "database (originals + distractors)",
    folder: Any = "",
) -> dict[str, Any]:
    """Each query searches originals + distractors; its one relevant image is its original.

    ``set_names`` name the three image lists in the bank (distractors shared by several collections
    keep one name, so they are embedded once).
    """
    n_db = len(data.originals) + len(data.distractors)
    relevant = np.zeros((len(data.queries), n_db), dtype=bool)
    relevant[np.arange(len(data.queries)), data.original_of] = True
    results = []
    for cfg in configs:
        d = bank.vectors(set_names[0], data.originals, cfg)
        if data.distractors:
            d = np.concatenate([d, bank.vectors(set_names[1], data.distractors, cfg)])
        q = bank.vectors(set_names[2], data.queries, cfg)
        train = bank.vectors("whiten-on", whiten_on, cfg) if whiten_on else d
        regions = _whitened_regions(
            cfg,
            train,
            _regional(bank, cfg, [(set_names[0], data.originals), (set_names[1], data.distractors)]),
        )
        (d, q), dim = _apply_whitening(cfg, train, d, q)
        m = ranking_metrics(_scores(q, d, regions), relevant, ks)
        summary, per_transform = copy_metrics(
            np.array(m["first_rank"]), np.array(m["AP"]), data.transform_of, data.transforms, HARD_TRANSFORMS
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
        "originals": len(data.originals),
        "distractors": len(data.distractors),
        "queries": len(data.queries),
        "transforms": list(data.transforms),
        "hard_transforms": [t for t in HARD_TRANSFORMS if t in data.transforms],
        "seed": data.seed,
        "chance_recall@1": 1 / n_db,
        "skipped": data.failed,
        "whiten_on": whiten_label,
    }
    return build_report("copy", folder, results, "recall@1", info)


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
    """The whole folder, no split (see the module docstring): its images are the originals."""
    check_transforms(transforms)
    paths = list_images(Path(folder))
    originals, kept, failed = load_images(paths)
    extra: list[Image.Image] = []
    if distractors:
        extra, _, failed_d = load_images(list_images(Path(distractors)))
        failed += failed_d
    data = make_copy_set(
        originals,
        extra,
        transforms=transforms,
        seed=seed,
        ids=[content_id(file_sha256(p)) for p in kept],
        failed=failed,
        where=f" in {folder}",
    )
    bank = bank or FeatureBank()
    bank.register(configs)
    return evaluate_copy_set(
        data,
        configs,
        ks=ks,
        bank=bank,
        whiten_on=whiten_images(whiten_on),
        whiten_label=str(whiten_on) if whiten_on else "database (originals + distractors)",
        folder=folder,
    )
