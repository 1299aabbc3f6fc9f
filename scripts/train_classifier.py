"""``deepfeat train-classifier``: your own classes from a folder with one sub-folder per class.

``linear`` trains a logistic-regression head on frozen features of the chosen layer; the features are
cached by content hash (``DATA_DIR/features-cache.sqlite3``, keyed by the embedder's fingerprint) and taken
from the store itself for files it already indexed, so re-training and the index share the work.
``finetune`` trains the top block(s) of the backbone with augmentation (see :mod:`models.heads`).

Both hold out a stratified test split, report accuracy, top-k, per-class precision/recall and a
confusion-matrix PNG on it, and save the head atomically to ``DATA_DIR/classifiers/NAME/`` (with
``report.json`` and ``confusion.png`` beside the weights), where a running server picks it up.

This module trains and is the command; its parts live beside it: :mod:`scripts.train_dataset` reads and
decodes the folder, :mod:`scripts.train_features` gets the linear probe's features (store, cache, or
embedded), :mod:`scripts.train_report` writes the held-out metrics, the confusion PNG and the summary.
Their public names are re-exported here.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from deepfeat.models.embedder import Embedder
from deepfeat.models.heads import (
    FINETUNE_COMPATIBLE_KEYS,
    METHODS,
    FineTuneConfig,
    FineTunedNet,
    HeadExistsError,
    HeadManifest,
    IncompatibleHeadError,
    LinearConfig,
    TrainingDataError,
    TrainingLog,
    check_compatible,
    check_head_name,
    fine_tune,
    finetune_bytes,
    finetune_state,
    finetuned_probabilities,
    linear_bytes,
    save_head,
    stratified_split,
    train_linear,
)
from deepfeat.runtime import build_embedder, image_limits, read_manifest
from deepfeat.scripts.classifier_args import add_train_arguments as add_arguments
from deepfeat.scripts.cli_common import echo, echo_json, settings_from_args
from deepfeat.scripts.train_dataset import Dataset, check_class_sizes, dataset_images, scan_class_folders
from deepfeat.scripts.train_features import CACHE_FILE, FeatureCache, dataset_features
from deepfeat.scripts.train_features import FeatureStats as FeatureStats
from deepfeat.scripts.train_features import fingerprint_key as fingerprint_key
from deepfeat.scripts.train_report import confusion_png, held_out_metrics, render_confusion_png, summary_lines
from deepfeat.settings import Settings

# Every name public here before the parts moved out stays importable from here (the two ``X as X``
# imports above re-export names that were public but never in ``__all__``).
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
    report["counts"] = dataset.counts()  # what it trained and tested on: --skip-bad's files left out
    report["training"] = fitted.training.to_dict()
    report["skipped"] = dataset.skipped
    metrics = held_out_metrics(dataset, y, test_idx, fitted.probabilities, report)
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
    store = read_manifest(settings)
    if store is not None:
        # Saved all the same (it serves a server started with these flags), but said now rather than
        # as a 409 from the server on this data dir.
        try:
            check_compatible(manifest, store.fingerprint)
        except IncompatibleHeadError as exc:
            report["warning"] = (
                f"the store in {settings.data_dir} was made with other features, so a server on it refuses "
                f"this classifier: {exc}"
            )
            echo_fn(f"warning: {report['warning']}")
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


def _to_stderr(line: str) -> None:
    sys.stderr.write(line + "\n")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    options = options_from_args(args)
    # With --json, stdout is the report alone; progress lines go to stderr.
    report = train(args.folder, args.name, settings, options, echo_fn=_to_stderr if args.json else echo)
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
        for line in summary_lines(report["test"]):
            echo(line)
        echo(f"confusion matrix: {Path(report['path']) / 'confusion.png'}")
    echo(f"saved {report['path']}  (serve it: POST /v1/classify?classifier={report['name']})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deepfeat.scripts.train_classifier ...`` = ``deepfeat train-classifier ...``."""
    from deepfeat.scripts.cli import main as cli_main

    return cli_main(["train-classifier", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
