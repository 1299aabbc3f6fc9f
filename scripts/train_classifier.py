"""``deepfeat train-classifier``: your own classes from a folder with one sub-folder per class.

``linear`` trains a logistic-regression head on frozen features of the chosen layer; the features are
cached by content hash (``DATA_DIR/features-cache.sqlite3``, keyed by the embedder's fingerprint) and taken
from the store itself for files it already indexed, so re-training and the index share the work.
``finetune`` trains the top block(s) of the backbone with augmentation (see :mod:`models.heads`).

Both hold out a stratified test split, report accuracy, top-k, per-class precision/recall and a
confusion-matrix PNG on it, and save the head atomically to ``DATA_DIR/classifiers/NAME/`` (with
``report.json`` and ``confusion.png`` beside the weights), where a running server picks it up.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from deepfeat.index.store import ImageStore
from deepfeat.models.embedder import Embedder
from deepfeat.models.errors import ImageError
from deepfeat.models.heads import (
    FINETUNE_COMPATIBLE_KEYS,
    METHODS,
    FineTuneConfig,
    FineTunedNet,
    HeadExistsError,
    HeadManifest,
    LinearConfig,
    TrainingDataError,
    TrainingLog,
    check_head_name,
    evaluate,
    fine_tune,
    finetune_bytes,
    finetune_state,
    finetuned_probabilities,
    fingerprint_differences,
    linear_bytes,
    save_head,
    stratified_split,
    train_linear,
)
from deepfeat.models.images import ImageLimits, load_image
from deepfeat.runtime import build_embedder, image_limits
from deepfeat.scripts.cli_common import add_common_arguments, echo, echo_json, settings_from_args
from deepfeat.scripts.index_images import DEFAULT_EXTENSIONS, iter_image_files
from deepfeat.settings import Settings

__all__ = [
    "CACHE_FILE",
    "CLASSIFIERS_DIR",
    "Dataset",
    "FeatureCache",
    "scan_class_folders",
    "dataset_features",
    "dataset_images",
    "render_confusion_png",
    "confusion_png",
    "finetune_on_split",
    "train",
    "add_arguments",
    "run",
    "main",
]

log = logging.getLogger(__name__)

CLASSIFIERS_DIR = "classifiers"
CACHE_FILE = "features-cache.sqlite3"
_MAX_LISTED = 10


# ================================================================================================ data


@dataclass
class Dataset:
    """Labelled files: ``files[i]`` (content ``sha256[i]``) belongs to ``classes[labels[i]]``."""

    root: Path
    classes: list[str]
    files: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    data: list[bytes] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    duplicates: int = 0

    def counts(self) -> dict[str, int]:
        return {name: self.labels.count(c) for c, name in enumerate(self.classes)}

    def subset(self, keep: Sequence[int]) -> Dataset:
        return Dataset(
            root=self.root,
            classes=self.classes,
            files=[self.files[i] for i in keep],
            labels=[self.labels[i] for i in keep],
            sha256=[self.sha256[i] for i in keep],
            data=[self.data[i] for i in keep],
            skipped=self.skipped,
            duplicates=self.duplicates,
        )


def scan_class_folders(
    root: str | Path, *, extensions: frozenset[str] = DEFAULT_EXTENSIONS, min_per_class: int = 1
) -> Dataset:
    """Read a training folder: one (non-hidden) sub-folder per class, image files anywhere below it.
    Files directly in ``root`` (a README, a manifest) are ignored. Identical contents are kept once.

    Raises:
        TrainingDataError: Not a folder, fewer than 2 classes, a class folder without image files,
            a class with fewer than ``min_per_class`` images, or unreadable files (each named).
    """
    root = Path(root)
    if not root.is_dir():
        raise TrainingDataError(f"training folder {root} does not exist or is not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        found = f"only {class_dirs[0].name!r}" if class_dirs else "none"
        raise TrainingDataError(
            f"{root} must hold one sub-folder per class and a classifier needs at least 2 classes; found {found}"
        )
    dataset = Dataset(root=root, classes=[p.name for p in class_dirs])
    empty: list[str] = []
    unreadable: list[str] = []
    seen: dict[str, int] = {}
    for label, class_dir in enumerate(class_dirs):
        files = list(iter_image_files([class_dir], extensions=extensions))
        if not files:
            empty.append(str(class_dir))
        for path in files:
            try:
                data = path.read_bytes()
            except OSError as exc:
                unreadable.append(f"{path}: {exc.strerror or exc}")
                continue
            sha = hashlib.sha256(data).hexdigest()
            if sha in seen:
                dataset.duplicates += 1
                if seen[sha] != label:
                    log.warning(
                        "%s has the same content as a file of class %r; kept in that class only",
                        path,
                        dataset.classes[seen[sha]],
                    )
                continue
            seen[sha] = label
            dataset.files.append(path)
            dataset.labels.append(label)
            dataset.sha256.append(sha)
            dataset.data.append(data)
    if empty:
        raise TrainingDataError(
            f"class folder(s) without image files ({', '.join(sorted(extensions))}): {', '.join(empty)}"
        )
    if unreadable:
        raise TrainingDataError(f"{len(unreadable)} file(s) cannot be read: " + _listing(unreadable))
    check_class_sizes(dataset, min_per_class)
    return dataset


def check_class_sizes(dataset: Dataset, min_per_class: int) -> None:
    small = {name: n for name, n in dataset.counts().items() if n < min_per_class}
    if small:
        raise TrainingDataError(
            f"every class needs at least {min_per_class} usable images (training + held-out split); "
            f"too few in: {', '.join(f'{k} ({v})' for k, v in small.items())}"
        )


def _listing(items: Sequence[str]) -> str:
    shown = "; ".join(items[:_MAX_LISTED])
    return shown + (f"; ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _bad_files_error(failures: list[dict[str, str]]) -> TrainingDataError:
    return TrainingDataError(
        f"{len(failures)} file(s) are not usable images (fix or remove them, or pass --skip-bad): "
        + _listing([f"{f['path']}: {f['code']}: {f['reason']}" for f in failures])
    )


# ================================================================================================ features


def fingerprint_key(fingerprint: dict[str, Any]) -> str:
    """A short stable hash of an embedder fingerprint (the cache's namespace)."""
    text = json.dumps(fingerprint, sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class FeatureCache:
    """SQLite cache of embeddings keyed by (embedder fingerprint hash, content sha256).

    A cache, not a store: losing it costs only recomputation, so it runs with ``synchronous=NORMAL``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=30)
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS features (fp TEXT NOT NULL, sha256 TEXT NOT NULL, "
            "vector BLOB NOT NULL, PRIMARY KEY (fp, sha256)) WITHOUT ROWID"
        )
        self._conn.commit()

    def get_many(self, fingerprint: dict[str, Any], shas: Sequence[str], dim: int) -> dict[str, np.ndarray]:
        key = fingerprint_key(fingerprint)
        out: dict[str, np.ndarray] = {}
        wanted = list(dict.fromkeys(shas))
        for start in range(0, len(wanted), 900):
            chunk = wanted[start : start + 900]
            marks = ",".join("?" * len(chunk))
            for sha, blob in self._conn.execute(
                f"SELECT sha256, vector FROM features WHERE fp = ? AND sha256 IN ({marks})", (key, *chunk)
            ):
                vector = np.frombuffer(blob, dtype="<f4")
                if vector.shape == (dim,):
                    out[str(sha)] = vector.astype(np.float32)
        return out

    def put_many(self, fingerprint: dict[str, Any], vectors: dict[str, np.ndarray]) -> None:
        key = fingerprint_key(fingerprint)
        with self._conn:
            self._conn.executemany(
                "INSERT OR REPLACE INTO features (fp, sha256, vector) VALUES (?, ?, ?)",
                [(key, sha, np.asarray(v, dtype="<f4").tobytes()) for sha, v in vectors.items()],
            )

    def close(self) -> None:
        self._conn.close()


@contextmanager
def _store_for(data_dir: Path, embedder: Embedder) -> Iterator[ImageStore | None]:
    """The store in ``data_dir`` when it holds vectors of this very embedder, else None."""
    try:
        manifest = ImageStore.read_manifest(data_dir)
    except Exception as exc:  # a damaged store must not stop training: it is only a shortcut here
        log.warning("not reusing the store's vectors: %s", exc)
        yield None
        return
    if manifest is None or fingerprint_differences(manifest.fingerprint, embedder.fingerprint):
        yield None
        return
    store = ImageStore.open(data_dir, fingerprint=embedder.fingerprint, dim=embedder.dim, read_only=True)
    try:
        yield store
    finally:
        store.close()


@dataclass
class FeatureStats:
    from_store: int = 0
    from_cache: int = 0
    embedded: int = 0
    failed: int = 0
    seconds: float = 0.0


def _decode_all(
    dataset: Dataset, indices: Sequence[int], limits: ImageLimits, draft: tuple[int, int]
) -> tuple[dict[int, Image.Image], list[dict[str, str]]]:
    images: dict[int, Image.Image] = {}
    failures: list[dict[str, str]] = []
    for i in indices:
        try:
            images[i] = load_image(dataset.data[i], limits=limits, draft_size=draft).image
        except ImageError as exc:
            failures.append({"path": str(dataset.files[i]), "code": exc.code, "reason": str(exc)})
    return images, failures


def dataset_features(
    dataset: Dataset,
    embedder: Embedder,
    *,
    data_dir: Path,
    limits: ImageLimits,
    batch_size: int = 32,
    skip_bad: bool = False,
    progress: bool = False,
) -> tuple[Dataset, np.ndarray, FeatureStats]:
    """Embeddings of every file: from the store, then the cache, else decoded and embedded (and cached).

    Returns:
        The dataset without unusable files (only with ``skip_bad``), its (n, d) features, and counts.

    Raises:
        TrainingDataError: Unusable files and not ``skip_bad``.
    """
    started = time.perf_counter()
    stats = FeatureStats()
    found: dict[str, np.ndarray] = {}
    with _store_for(data_dir, embedder) as store:
        if store is not None:
            found = store.vectors_by_sha256(dataset.sha256)
            stats.from_store = len(found)
    cache = FeatureCache(data_dir / CACHE_FILE)
    try:
        missing = [s for s in dataset.sha256 if s not in found]
        cached = cache.get_many(embedder.fingerprint, missing, embedder.dim)
        stats.from_cache = len(cached)
        found.update(cached)
        todo = [i for i, sha in enumerate(dataset.sha256) if sha not in found]
        failures: list[dict[str, str]] = []
        bar = tqdm(total=len(todo), desc="embedding", unit="img", disable=not progress or not todo)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images, bad = _decode_all(dataset, chunk, limits, embedder.decode_size)
            failures.extend(bad)
            ok = [i for i in chunk if i in images]
            if ok:
                vectors = embedder.embed([images[i] for i in ok])
                fresh = {dataset.sha256[i]: vectors[j] for j, i in enumerate(ok)}
                cache.put_many(embedder.fingerprint, fresh)
                found.update(fresh)
                stats.embedded += len(ok)
            bar.update(len(chunk))
        bar.close()
    finally:
        cache.close()
    stats.failed = len(failures)
    if failures and not skip_bad:
        raise _bad_files_error(failures)
    keep = [i for i, sha in enumerate(dataset.sha256) if sha in found]
    kept = dataset.subset(keep)
    kept.skipped = dataset.skipped + failures
    features = np.stack([found[s] for s in kept.sha256]) if keep else np.zeros((0, embedder.dim), np.float32)
    stats.seconds = round(time.perf_counter() - started, 3)
    return kept, features, stats


def dataset_images(
    dataset: Dataset, *, limits: ImageLimits, draft: tuple[int, int], skip_bad: bool = False
) -> tuple[Dataset, list[Image.Image]]:
    """Decoded RGB images of every file (for fine-tuning and the ImageNet head).

    Raises:
        TrainingDataError: Unusable files and not ``skip_bad``.
    """
    images, failures = _decode_all(dataset, range(len(dataset.files)), limits, draft)
    if failures and not skip_bad:
        raise _bad_files_error(failures)
    keep = sorted(images)
    kept = dataset.subset(keep)
    kept.skipped = dataset.skipped + failures
    return kept, [images[i] for i in keep]


# ================================================================================================ report


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render_confusion_png(
    confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path, *, title: str = ""
) -> Path:
    """Write :func:`confusion_png` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(confusion_png(confusion, classes, title=title))
    return path


def confusion_png(confusion: Sequence[Sequence[int]], classes: Sequence[str], *, title: str = "") -> bytes:
    """A confusion matrix as PNG bytes: rows = true class, columns = predicted, counts in the cells,
    shaded by the share of the row (blue on the diagonal, red off it)."""
    cm = np.asarray(confusion, dtype=np.int64)
    n = len(classes)
    cell = 64
    font, small = _font(15), _font(13)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max(measure.textlength(str(c), font=font) for c in classes)) + 16
    top = label_w + 40
    left = label_w + 28
    width, height = left + n * cell + 16, top + n * cell + 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 6), title, fill="black", font=font)
    row_sums = cm.sum(axis=1, keepdims=True).clip(min=1)
    share = cm / row_sums
    for i in range(n):
        for j in range(n):
            x0, y0 = left + j * cell, top + i * cell
            value = float(share[i, j])
            shade = (
                (int(255 - 205 * value), int(255 - 160 * value), 255)
                if i == j
                else (255, int(255 - 180 * value), int(255 - 180 * value))
            )
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=shade, outline=(200, 200, 200))
            text = str(int(cm[i, j]))
            tw = measure.textlength(text, font=font)
            draw.text(
                (x0 + (cell - tw) / 2, y0 + cell / 2 - 9),
                text,
                fill="white" if value > 0.6 else "black",
                font=font,
            )
        draw.text((8, top + i * cell + cell / 2 - 9), str(classes[i]), fill="black", font=font)
    for j, name in enumerate(classes):
        # Column labels, rotated so long class names fit over narrow columns.
        tw = int(measure.textlength(str(name), font=font)) + 4
        label = Image.new("RGB", (tw, 20), "white")
        ImageDraw.Draw(label).text((2, 1), str(name), fill="black", font=font)
        rotated = label.rotate(90, expand=True)
        img.paste(rotated, (left + j * cell + cell // 2 - 10, top - 8 - rotated.height))
    draw.text((left, top + n * cell + 8), "predicted (columns) vs true (rows)", fill=(90, 90, 90), font=small)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _summary_lines(metrics: dict[str, Any]) -> list[str]:
    topk = next((k for k in metrics if k.startswith("top") and k.endswith("_accuracy")), None)
    lines = [
        f"held-out accuracy {metrics['accuracy']:.2%} on {metrics['n']} images "
        f"(balanced {metrics['balanced_accuracy']:.2%}"
        + (f", {topk.removesuffix('_accuracy')} {metrics[topk]:.2%}" if topk else "")
        + f", chance {metrics['chance']:.2%})",
        f"  {'class':<20} {'precision':>9} {'recall':>7} {'f1':>6} {'n':>4}",
    ]
    for name, row in metrics["per_class"].items():
        lines.append(
            f"  {name:<20} {row['precision']:>9.2%} {row['recall']:>7.2%} {row['f1']:>6.2f} {row['support']:>4}"
        )
    return lines


# ================================================================================================ training


@dataclass(frozen=True)
class TrainOptions:
    method: str = "linear"
    test_fraction: float = 0.2
    seed: int = 0
    skip_bad: bool = False
    overwrite: bool = False
    progress: bool = False
    linear: LinearConfig = field(default_factory=LinearConfig)
    finetune: FineTuneConfig = field(default_factory=FineTuneConfig)


def train(
    folder: str | Path,
    name: str,
    settings: Settings,
    options: TrainOptions,
    *,
    embedder: Embedder | None = None,
    echo_fn: Callable[[str], None] = lambda _line: None,
) -> dict[str, Any]:
    """Train, evaluate on a held-out split, and save a head in ``settings.data_dir/classifiers/NAME``.

    Returns:
        The report (also saved as ``report.json`` in the head's directory).

    Raises:
        TrainingDataError: Bad training folder or files (nothing is saved).
        HeadError: Bad name, name taken (without overwrite), bad options.
    """
    root = Path(settings.data_dir) / CLASSIFIERS_DIR
    _check_request(name, options, root)
    started = time.perf_counter()
    min_per_class = 2 if options.test_fraction > 0 else 1
    dataset = scan_class_folders(folder, min_per_class=min_per_class)
    embedder = embedder or build_embedder(settings)
    limits = image_limits(settings)
    report: dict[str, Any] = {
        "name": name,
        "method": options.method,
        "data": str(Path(folder).resolve()),
        "classes": dataset.classes,
        "counts": dataset.counts(),
        "duplicates_dropped": dataset.duplicates,
    }
    if options.method == "linear":
        dataset, features, stats = dataset_features(
            dataset,
            embedder,
            data_dir=Path(settings.data_dir),
            limits=limits,
            batch_size=settings.batch_size,
            skip_bad=options.skip_bad,
            progress=options.progress,
        )
        report["features"] = asdict(stats)
        echo_fn(
            f"features of {len(dataset.files)} images from layer {embedder.layer.name} ({embedder.pooling_id}): "
            f"{stats.from_store} from the store, {stats.from_cache} from the cache, {stats.embedded} embedded"
        )
        y, train_idx, test_idx = _split(dataset, min_per_class, options, report)
        fitted = _fit_linear(features, y, dataset.classes, train_idx, test_idx, options.linear)
    else:
        dataset, pictures = dataset_images(
            dataset, limits=limits, draft=embedder.decode_size, skip_bad=options.skip_bad
        )
        y, train_idx, test_idx = _split(dataset, min_per_class, options, report)
        fitted = _fit_finetune(embedder, pictures, y, dataset.classes, train_idx, test_idx, options, settings)
    report["training"] = fitted.training.to_dict()
    report["skipped"] = dataset.skipped
    metrics = _held_out_metrics(dataset, y, test_idx, fitted.probabilities, report)
    report["seconds"] = round(time.perf_counter() - started, 2)
    if metrics:
        fitted.files["confusion.png"] = confusion_png(
            metrics["confusion"],
            dataset.classes,
            title=f"{name} ({options.method}): accuracy {metrics['accuracy']:.1%} on {metrics['n']} held-out",
        )
    fitted.files["report.json"] = (json.dumps(report, indent=2, default=str) + "\n").encode("utf-8")
    manifest = _head_manifest(report, fitted, classes=dataset.classes, embedder=embedder, metrics=metrics)
    path = save_head(root, manifest, fitted.files, overwrite=options.overwrite)
    report["path"] = str(path)
    return report


def _check_request(name: str, options: TrainOptions, root: Path) -> None:
    """Refuse a bad name, method or split, or a taken name, before any work."""
    check_head_name(name)
    if options.method not in METHODS:
        raise TrainingDataError(f"unknown method {options.method!r}; choose one of: {', '.join(METHODS)}")
    if not 0.0 <= options.test_fraction < 1.0:
        raise TrainingDataError(f"--test-fraction must be in [0, 1), got {options.test_fraction}")
    if (root / name).exists() and not options.overwrite:
        # Refused before any work; save_head checks again (another run may have saved meanwhile).
        raise HeadExistsError(
            f"a classifier named {name!r} already exists in {root}; pass --overwrite to replace it"
        )


def _split(
    dataset: Dataset, min_per_class: int, options: TrainOptions, report: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, training indices, held-out indices) of the usable files, recorded in ``report``."""
    check_class_sizes(dataset, min_per_class)
    y = np.asarray(dataset.labels, dtype=np.int64)
    train_idx, test_idx = stratified_split(y, options.test_fraction, seed=options.seed)
    report["split"] = {"train": len(train_idx), "test": len(test_idx), "seed": options.seed}
    return y, train_idx, test_idx


@dataclass
class _Fitted:
    """A trained head: the files that hold it, its training log, its held-out probabilities (None
    without a held-out split) and the fingerprint keys it tolerates differences in."""

    files: dict[str, bytes]
    training: TrainingLog
    probabilities: np.ndarray | None
    compatible_on: tuple[str, ...] | None = None


def _fit_linear(
    features: np.ndarray,
    y: np.ndarray,
    classes: list[str],
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    config: LinearConfig,
) -> _Fitted:
    head, training = train_linear(features[train_idx], y[train_idx], classes, config)
    probabilities = head.probabilities(features[test_idx]) if len(test_idx) else None
    return _Fitted({"linear.npz": linear_bytes(head)}, training, probabilities)


def _fit_finetune(
    embedder: Embedder,
    pictures: list[Image.Image],
    y: np.ndarray,
    classes: list[str],
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    options: TrainOptions,
    settings: Settings,
) -> _Fitted:
    from deepfeat.models.embedder import resolve_device

    def bar(epoch: int, n_batches: int) -> Any:
        return tqdm(
            total=n_batches,
            desc=f"epoch {epoch}/{options.finetune.epochs}",
            unit="batch",
            disable=not options.progress,
            leave=True,
        )

    net, training, probabilities = finetune_on_split(
        embedder,
        pictures,
        y,
        classes,
        train_idx,
        test_idx,
        config=options.finetune,
        device=resolve_device(settings.device),
        progress=bar,
        on_epoch=lambda row: log.info("epoch %s", row),
    )
    state = finetune_bytes(finetune_state(net, training.extra["unfrozen"]))
    return _Fitted({"finetune.pt": state}, training, probabilities, FINETUNE_COMPATIBLE_KEYS)


def finetune_on_split(
    embedder: Embedder,
    pictures: Sequence[Image.Image],
    y: np.ndarray,
    classes: Sequence[str],
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    *,
    config: FineTuneConfig,
    device: Any,
    progress: Callable[[int, int], Any],
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> tuple[FineTunedNet, TrainingLog, np.ndarray | None]:
    """Fine-tune a copy of the embedder's backbone on the training part of ``pictures`` and score the
    held-out part (for ``train-classifier --method finetune`` and ``compare-classifiers``).

    Returns:
        The network, its training log, and (n_test, C) probabilities (None when ``test_idx`` is empty).
    """
    net, training = fine_tune(
        embedder.spec,
        embedder.backbone,  # the loaded pretrained backbone; fine_tune trains a copy
        [pictures[i] for i in train_idx],
        y[train_idx],
        classes,
        config=config,
        device=device,
        progress=progress,
        on_epoch=on_epoch,
    )
    probabilities = None
    if len(test_idx):
        probabilities = finetuned_probabilities(
            net, [pictures[i] for i in test_idx], embedder.classify_transform, device=device
        )
    return net, training, probabilities


def _held_out_metrics(
    dataset: Dataset,
    y: np.ndarray,
    test_idx: np.ndarray,
    probabilities: np.ndarray | None,
    report: dict[str, Any],
) -> dict[str, Any]:
    """Metrics on the held-out split ({} without one), recorded in ``report["test"]`` with the files
    predicted wrong."""
    if probabilities is None:
        return {}
    metrics = evaluate(y[test_idx], probabilities, dataset.classes)
    report["test"] = {**metrics, "errors": _misclassified(dataset, y, test_idx, probabilities)}
    return metrics


def _misclassified(
    dataset: Dataset, y: np.ndarray, test_idx: np.ndarray, probabilities: np.ndarray
) -> list[dict[str, str]]:
    """The held-out files predicted wrong: file (relative to the training folder), true, predicted."""
    return [
        {
            "file": str(dataset.files[i].relative_to(dataset.root)),
            "true": dataset.classes[y[i]],
            "predicted": dataset.classes[int(np.argmax(probabilities[j]))],
        }
        for j, i in enumerate(test_idx)
        if int(np.argmax(probabilities[j])) != y[i]
    ]


def _head_manifest(
    report: dict[str, Any],
    fitted: _Fitted,
    *,
    classes: list[str],
    embedder: Embedder,
    metrics: dict[str, Any],
) -> HeadManifest:
    training = fitted.training
    return HeadManifest(
        name=report["name"],
        method=report["method"],
        classes=tuple(classes),
        fingerprint=embedder.fingerprint,
        compatible_on=fitted.compatible_on,
        metrics={k: v for k, v in metrics.items() if k not in ("confusion", "classes")},
        training={
            "data": report["data"],
            "counts": report["counts"],
            "split": report["split"],
            "train_size": training.train_size,
            "val_size": training.val_size,
            "val_accuracy": training.val_accuracy,
            "best_step": training.best_step,
            "seconds": report["seconds"],
            "config": training.extra.get("config"),
        },
    )


# ================================================================================================ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("folder", metavar="TRAIN_DIR", help="folder with one sub-folder of images per class")
    parser.add_argument(
        "--name", required=True, help="the classifier's name (POST /v1/classify?classifier=NAME)"
    )
    parser.add_argument("--method", choices=METHODS, default="linear", help="linear probe or fine-tuning")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="held-out share per class (0.2)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="validation share of the rest (0.2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (10)")
    parser.add_argument("--unfreeze", type=int, default=1, help="top blocks fine-tuning trains (1)")
    parser.add_argument(
        "--lr", type=float, help="fine-tuning learning rate of the unfrozen blocks (1e-4; the new head: 10x)"
    )
    parser.add_argument("--train-batch-size", type=int, default=16, help="fine-tuning batch size (16)")
    parser.add_argument("--no-augment", action="store_true", help="fine-tune without augmentation")
    parser.add_argument(
        "--skip-bad", action="store_true", help="train without unusable files instead of failing"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a classifier of the same name")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    linear = LinearConfig(val_fraction=args.val_fraction, seed=args.seed)
    finetune = FineTuneConfig(
        epochs=args.epochs,
        unfreeze=args.unfreeze,
        batch_size=args.train_batch_size,
        val_fraction=args.val_fraction,
        augment=not args.no_augment,
        seed=args.seed,
    )
    if args.lr is not None:
        finetune = FineTuneConfig(**{**asdict(finetune), "lr": args.lr, "head_lr": 10 * args.lr})
    return TrainOptions(
        method=args.method,
        test_fraction=args.test_fraction,
        seed=args.seed,
        skip_bad=args.skip_bad,
        overwrite=args.overwrite,
        progress=not args.no_progress and sys.stderr.isatty(),
        linear=linear,
        finetune=finetune,
    )


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    options = options_from_args(args)
    report = train(args.folder, args.name, settings, options, echo_fn=echo)
    if args.json:
        echo_json(report)
        return 0
    counts = ", ".join(f"{k} {v}" for k, v in report["counts"].items())
    echo(
        f"trained {report['method']} classifier {report['name']!r}: {len(report['classes'])} classes ({counts}); "
        f"{report['split']['train']} training / {report['split']['test']} held-out images, {report['seconds']:.1f}s"
    )
    if report.get("skipped"):
        echo(f"skipped {len(report['skipped'])} unusable file(s) (listed in report.json)")
    if "test" in report:
        for line in _summary_lines(report["test"]):
            echo(line)
        echo(f"confusion matrix: {Path(report['path']) / 'confusion.png'}")
    echo(f"saved {report['path']}  (serve it: POST /v1/classify?classifier={report['name']})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scripts.train_classifier ...`` = ``deepfeat train-classifier ...``."""
    from deepfeat.scripts.cli import main as cli_main

    return cli_main(["train-classifier", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
