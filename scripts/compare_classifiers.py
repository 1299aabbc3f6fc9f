"""``deepfeat compare-classifiers``: linear probe vs kNN vs fine-tuning vs the ImageNet head mapped to your
classes, on the same held-out split(s) of a folder with one sub-folder per class.

Methods (``--methods``):

- ``linear``: the linear probe ``train-classifier`` trains, on the features of the store's embedder
  (layer, pooling, resize mode and scales as ``DATA_DIR``'s manifest or the settings say).
- ``knn``: similarity-weighted vote of the ``--neighbours`` nearest training images, same features.
- ``linear-crop``: a linear probe on the penultimate layer of the 224 px centre crop, i.e. exactly the
  features fine-tuning starts from (its linear-probe initialisation).
- ``finetune``: ``train-classifier --method finetune``.
- ``imagenet``: the weights' own ImageNet head, no training. Each class is a set of ImageNet indices
  (``--imagenet-map``: ``auto`` uses a built-in mapping when every class has one, or a JSON file
  ``{"class": [index, "lo-hi", ...]}``; see ``IMAGENET_MAPS``); a class scores the probability of its
  best ImageNet class, so the prediction is the class of the highest-ranked ImageNet class the mapping
  covers (summing would favour classes with many indices: "mammals" has 280).

Writes ``comparison.md`` (the table), ``comparison.json`` (every metric, per repeat) and one
``confusion-<method>.png`` per method (summed over the repeats) into ``--out``; prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from deepfeat.models.embedder import Embedder, resolve_device
from deepfeat.models.heads import (
    FineTuneConfig,
    LinearConfig,
    TrainingDataError,
    evaluate,
    knn_vote,
    stratified_split,
    train_linear,
)
from deepfeat.runtime import build_embedder, image_limits
from deepfeat.scripts.classifier_args import COMPARE_METHODS
from deepfeat.scripts.classifier_args import add_compare_arguments as add_arguments
from deepfeat.scripts.cli_common import echo, settings_from_args
from deepfeat.scripts.train_classifier import (
    Dataset,
    check_class_sizes,
    dataset_features,
    dataset_images,
    finetune_on_split,
    render_confusion_png,
    scan_class_folders,
)

__all__ = ["IMAGENET_MAPS", "METHODS", "imagenet_groups", "compare", "add_arguments", "run", "main"]

log = logging.getLogger(__name__)

METHODS = COMPARE_METHODS

# ImageNet-1k indices per class, by WordNet meaning (not tuned on any data):
#   birds:    7-24 (cock ... great grey owl), 80-100 (black grouse ... black swan), 127-146 (white stork ... albatross)
#   mammals:  101-106 (tusker, echidna, platypus, wallaby, koala, wombat), 147-150 (whales, dugong, sea lion),
#             151-268 (dogs), 269-299 (wolves, foxes, cats, bears, mongoose, meerkat),
#             330-388 (rabbits, rodents, hoofed animals, weasels, primates, elephants, pandas)
#   flowers:  738 (pot, flowerpot), 984 (rapeseed), 985 (daisy), 986 (yellow lady's slipper)
#   fruit_vegetables: 936-957 (cabbage ... pomegranate), 987 (corn), 989 (hip), 998 (ear of corn)
IMAGENET_MAPS: dict[str, dict[str, list[tuple[int, int]]]] = {
    "tuxpaint": {
        "birds": [(7, 24), (80, 100), (127, 146)],
        "mammals": [(101, 106), (147, 150), (151, 268), (269, 299), (330, 388)],
        "flowers": [(738, 738), (984, 986)],
        "fruit_vegetables": [(936, 957), (987, 987), (989, 989), (998, 998)],
    }
}


def _parse_map(data: Any, where: str) -> dict[str, list[int]]:
    if not isinstance(data, dict):
        raise TrainingDataError(f"{where}: expected a JSON object {{class: [indices]}}")
    out: dict[str, list[int]] = {}
    for name, items in data.items():
        indices: list[int] = []
        for item in items:
            if isinstance(item, (list, tuple)) and len(item) == 2:
                lo, hi = int(item[0]), int(item[1])
            elif isinstance(item, str) and "-" in item:
                lo, hi = (int(x) for x in item.split("-", 1))
            else:
                lo = hi = int(item)
            if not 0 <= lo <= hi < 1000:
                raise TrainingDataError(f"{where}: ImageNet indices must be in 0-999, got {item!r}")
            indices.extend(range(lo, hi + 1))
        out[str(name)] = sorted(set(indices))
    return out


def imagenet_groups(spec: str, classes: Sequence[str]) -> dict[str, list[int]] | None:
    """ImageNet indices per class, or None when no mapping applies (``auto`` and no built-in fits).

    Raises:
        TrainingDataError: A mapping file that does not cover every class or is malformed.
    """
    if spec == "none":
        return None
    if spec == "auto":
        for name, mapping in IMAGENET_MAPS.items():
            if set(classes) <= set(mapping):
                log.info("using the built-in ImageNet mapping %r", name)
                return _parse_map({c: mapping[c] for c in classes}, name)
        return None
    if spec in IMAGENET_MAPS:
        groups = _parse_map(IMAGENET_MAPS[spec], spec)
    else:
        try:
            groups = _parse_map(json.loads(Path(spec).read_text(encoding="utf-8")), spec)
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainingDataError(f"cannot read the ImageNet mapping {spec}: {exc}") from exc
    missing = [c for c in classes if c not in groups]
    if missing:
        raise TrainingDataError(f"the ImageNet mapping {spec} has no entry for class(es) {missing}")
    return {c: groups[c] for c in classes}


def _imagenet_scores(
    embedder: Embedder, images: Sequence[Image.Image], groups: dict[str, list[int]], classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(n, C) probability of each class's best ImageNet class, and (n,) whether the image's top-1
    ImageNet class is covered by the mapping at all."""
    probs = []
    for start in range(0, len(images), 32):
        logits = embedder.logits(embedder.classify_inputs(images[start : start + 32]))
        probs.append(logits.softmax(dim=1).numpy())
    p = np.concatenate(probs)  # (n, 1000)
    scores = np.stack([p[:, groups[c]].max(axis=1) for c in classes], axis=1)  # (n, C)
    mapped = np.zeros(p.shape[1], dtype=bool)
    for indices in groups.values():
        mapped[indices] = True
    return scores, mapped[p.argmax(axis=1)]


def _knn_probabilities(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, classes: Sequence[str], k: int
) -> np.ndarray:
    sims = test_x @ train_x.T  # (n_test, n_train) cosine: the features are L2-normalised
    order = np.argsort(-sims, axis=1)[:, :k]
    out = np.zeros((len(test_x), len(classes)), dtype=np.float32)
    for row, idx in enumerate(order):
        for label, share in knn_vote([classes[train_y[i]] for i in idx], sims[row, idx].tolist()):
            out[row, classes.index(label)] = share
    return out


def compare(
    folder: str | Path,
    *,
    settings: Any,
    methods: Sequence[str] = METHODS,
    test_fraction: float = 0.3,
    repeats: int = 1,
    seed: int = 0,
    neighbours: int = 10,
    imagenet_map: str = "auto",
    finetune: FineTuneConfig | None = None,
    progress: bool = False,
    embedder: Embedder | None = None,
) -> dict[str, Any]:
    """Run every method on the same stratified held-out split(s).

    Returns:
        ``{"methods": {name: {"runs": [metrics per repeat], "accuracy_mean", "accuracy_std", ...}}, ...}``;
        each method's ``confusion`` is summed over the repeats.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise TrainingDataError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    finetune = finetune or FineTuneConfig()
    dataset = scan_class_folders(folder, min_per_class=2)
    embedder = embedder or build_embedder(settings)
    inputs = _prepare(
        dataset, embedder, settings, methods=methods, imagenet_map=imagenet_map, progress=progress
    )
    classes, y = inputs.dataset.classes, inputs.y
    device = resolve_device(settings.device)

    results: dict[str, dict[str, Any]] = {
        m: {"runs": []} for m in methods if m != "imagenet" or inputs.groups
    }
    skipped: dict[str, str] = {}
    if "imagenet" in methods and not inputs.groups:
        skipped["imagenet"] = (
            "--imagenet-map none"
            if imagenet_map == "none"
            else f"no built-in ImageNet mapping ({', '.join(IMAGENET_MAPS)}) names every class "
            f"({', '.join(classes)}); give one with --imagenet-map FILE"
        )
    for r in range(repeats):
        split_seed = seed + r
        train_idx, test_idx = stratified_split(y, test_fraction, seed=split_seed)
        for method in results:
            started = time.perf_counter()
            probs, extra = _run_method(
                method, inputs, train_idx, test_idx, split=r, seed=split_seed, embedder=embedder,
                neighbours=neighbours, finetune=finetune, device=device, progress=progress,
            )  # fmt: skip
            metrics = evaluate(y[test_idx], probs, classes)
            metrics.update(extra, seconds=round(time.perf_counter() - started, 2), seed=split_seed)
            results[method]["runs"].append(metrics)
            log.info("split %d %s: accuracy %.4f", r + 1, method, metrics["accuracy"])
    _summarise_runs(results)
    return {
        "data": str(Path(folder).resolve()),
        "classes": classes,
        "counts": inputs.dataset.counts(),
        "test_fraction": test_fraction,
        "repeats": repeats,
        "seed": seed,
        "test_images_per_split": int(len(stratified_split(y, test_fraction, seed=seed)[1])),
        "embedder": embedder.fingerprint,
        "imagenet_map": inputs.groups,
        "finetune": finetune.__dict__,
        "methods": results,
        "skipped": skipped,
    }


@dataclass
class _Inputs:
    """What every method runs on: the usable files (decoded once, so every method sees the same ones),
    their labels, and what each requested method needs prepared for all of them."""

    dataset: Dataset
    pictures: list[Image.Image]
    y: np.ndarray
    features: np.ndarray | None = None
    """The store's embedder's features (linear, knn)."""
    crop_features: np.ndarray | None = None
    """Penultimate layer of the 224 px centre crop (linear-crop)."""
    groups: dict[str, list[int]] | None = None
    """ImageNet indices per class (imagenet; None when no mapping applies)."""
    imagenet: tuple[np.ndarray, np.ndarray] | None = None
    """:func:`_imagenet_scores` of every image."""


def _prepare(
    dataset: Dataset,
    embedder: Embedder,
    settings: Any,
    *,
    methods: Sequence[str],
    imagenet_map: str,
    progress: bool,
) -> _Inputs:
    limits = image_limits(settings)
    # Decode first so every method sees exactly the same usable files.
    dataset, pictures = dataset_images(dataset, limits=limits, draft=embedder.decode_size, skip_bad=True)
    check_class_sizes(dataset, 2)
    inputs = _Inputs(dataset, pictures, np.asarray(dataset.labels, dtype=np.int64))
    data_dir = Path(settings.data_dir)
    if "linear" in methods or "knn" in methods:
        inputs.dataset, inputs.features, _stats = dataset_features(
            dataset, embedder, data_dir=data_dir, limits=limits, progress=progress
        )
    if "imagenet" in methods:
        inputs.groups = imagenet_groups(imagenet_map, dataset.classes)
    if inputs.groups is not None:
        inputs.imagenet = _imagenet_scores(embedder, pictures, inputs.groups, dataset.classes)
    if "linear-crop" in methods:
        # Layer k=1 (penultimate) of the 224 px centre crop: what FineTunedNet's head sees.
        crop = embedder.variant(layer=1, pooling="none", resize_mode="crop", scales=(1.0,))
        _, inputs.crop_features, _ = dataset_features(
            inputs.dataset, crop, data_dir=data_dir, limits=limits, progress=progress
        )
    return inputs


def _run_method(
    method: str,
    inputs: _Inputs,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    *,
    split: int,
    seed: int,
    embedder: Embedder,
    neighbours: int,
    finetune: FineTuneConfig,
    device: Any,
    progress: bool,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Train ``method`` on one split (``split``-th, seeded ``seed``); its held-out probabilities and the
    figures it adds to the metrics."""
    classes, y = inputs.dataset.classes, inputs.y
    features = {"linear": inputs.features, "linear-crop": inputs.crop_features}.get(method)
    if features is not None:
        head, log_ = train_linear(features[train_idx], y[train_idx], classes, LinearConfig(seed=seed))
        return head.probabilities(features[test_idx]), {"l2_strength": log_.best_step}
    if method == "knn" and inputs.features is not None:
        probs = _knn_probabilities(
            inputs.features[train_idx], y[train_idx], inputs.features[test_idx], classes, neighbours
        )
        return probs, {"neighbours": neighbours}
    if method == "finetune":

        def bar(epoch: int, n: int) -> Any:
            return tqdm(total=n, desc=f"fine-tune split {split + 1} epoch {epoch}", disable=not progress)

        _net, log_, scored = finetune_on_split(
            embedder, inputs.pictures, y, classes, train_idx, test_idx,
            config=FineTuneConfig(**{**finetune.__dict__, "seed": seed}), device=device, progress=bar,
        )  # fmt: skip
        if scored is None:
            raise TrainingDataError("no held-out images to score: --test-fraction must be above 0")
        return scored, {"best_epoch": log_.best_step, "unfrozen": log_.extra["unfrozen"]}
    if method == "imagenet" and inputs.imagenet is not None:  # nothing to train
        scores, mapped = inputs.imagenet
        return scores[test_idx], {"top1_in_mapping": round(float(mapped[test_idx].mean()), 4)}
    raise TrainingDataError(f"method {method!r} has no inputs")  # pragma: no cover - _prepare made them


def _summarise_runs(results: dict[str, dict[str, Any]]) -> None:
    """Mean and spread of each method's metrics over the repeats; its confusion matrices summed."""
    for entry in results.values():
        runs = entry["runs"]
        for key in ("accuracy", "balanced_accuracy", "top2_accuracy"):
            values = [run[key] for run in runs if key in run]
            if values:
                entry[f"{key}_mean"] = round(float(np.mean(values)), 4)
                entry[f"{key}_std"] = round(float(np.std(values)), 4)
        entry["seconds_mean"] = round(float(np.mean([run["seconds"] for run in runs])), 2)
        entry["confusion"] = np.sum([run["confusion"] for run in runs], axis=0).tolist()


_DESCRIPTIONS = {
    "linear": "logistic regression on the frozen features of the store's embedder",
    "knn": "similarity-weighted vote of the nearest training images",
    "linear-crop": "linear probe on penultimate features of the 224 px centre crop (fine-tuning's start)",
    "finetune": "top block + new head trained from that start (augmentation, best epoch on validation)",
    "imagenet": "ImageNet head, best-ranked mapped ImageNet class decides (no training)",
}


def _preprocess_text(fp: dict[str, Any]) -> str:
    pre = fp.get("preprocess") or {}
    text = f", whole image at {pre.get('max_side')} px" if pre.get("mode") == "full" else ", centre crop"
    scales = fp.get("scales") or [1.0]
    return text + (f", scales {'/'.join(f'{x:g}' for x in scales)}" if len(scales) > 1 else "")


def markdown_table(result: dict[str, Any]) -> str:
    repeats = result["repeats"]
    fp = result["embedder"]
    lines = [
        f"{len(result['classes'])} classes, {sum(result['counts'].values())} images, "
        f"{result['test_images_per_split']} held out per split ({result['test_fraction']:.0%} of each class), "
        f"{repeats} split(s). Features for linear and knn: {fp['model']} {fp['layer']}"
        + (f" {fp['pooling']}" if fp["pooling"] != "none" else "")
        + _preprocess_text(fp)
        + ".",
        "",
        "| method | what | held-out accuracy | balanced accuracy | top-2 | time per split |",
        "|---|---|---|---|---|---|",
    ]
    for method, entry in result["methods"].items():

        def cell(key: str, entry: dict[str, Any] = entry) -> str:
            if f"{key}_mean" not in entry:
                return "-"
            text = f"{entry[f'{key}_mean']:.1%}"
            return text + (f" ± {entry[f'{key}_std']:.1%}" if repeats > 1 else "")

        lines.append(
            f"| {method} | {_DESCRIPTIONS[method]} | {cell('accuracy')} | {cell('balanced_accuracy')} | "
            f"{cell('top2_accuracy')} | {entry['seconds_mean']:.1f} s |"
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.repeats < 1:
        raise TrainingDataError(f"--repeats must be >= 1, got {args.repeats}")
    result = compare(
        args.folder,
        settings=settings,
        methods=methods,
        test_fraction=args.test_fraction,
        repeats=args.repeats,
        seed=args.seed,
        neighbours=args.neighbours,
        imagenet_map=args.imagenet_map,
        finetune=FineTuneConfig(epochs=args.epochs, unfreeze=args.unfreeze),
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(result)
    (out / "comparison.md").write_text(table, encoding="utf-8")
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for method, entry in result["methods"].items():
        render_confusion_png(
            entry["confusion"],
            result["classes"],
            out / f"confusion-{method}.png",
            title=f"{method}: accuracy {entry['accuracy_mean']:.1%}"
            + (f" over {args.repeats} splits" if args.repeats > 1 else " held-out"),
        )
    echo(table)
    for method, why in result["skipped"].items():
        echo(f"{method} not run: {why}")
    echo(f"wrote {out / 'comparison.md'}, {out / 'comparison.json'} and confusion-<method>.png in {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deepfeat.scripts.compare_classifiers ...`` = ``deepfeat compare-classifiers ...``."""
    from deepfeat.scripts.cli import main as cli_main

    return cli_main(["compare-classifiers", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
