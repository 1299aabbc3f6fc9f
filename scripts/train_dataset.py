"""The training folder of ``deepfeat train-classifier``: reading it (one sub-folder per class, identical
contents kept once) and decoding its files, with the unusable ones named."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from deepfeat.models.errors import ImageError
from deepfeat.models.heads import TrainingDataError
from deepfeat.models.images import ImageLimits, load_image
from deepfeat.scripts.index_command import DEFAULT_EXTENSIONS
from deepfeat.scripts.index_images import iter_image_files

__all__ = [
    "Dataset",
    "bad_files_error",
    "check_class_sizes",
    "dataset_images",
    "decode_all",
    "scan_class_folders",
]

# The command's parts log under the command's name: one logger to configure, as before they were split.
log = logging.getLogger(f"{__package__}.train_classifier")

_MAX_LISTED = 10


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


def bad_files_error(failures: list[dict[str, str]]) -> TrainingDataError:
    """The error that refuses a training set with unusable files, the first few of them named."""
    return TrainingDataError(
        f"{len(failures)} file(s) are not usable images (fix or remove them, or pass --skip-bad): "
        + _listing([f"{f['path']}: {f['code']}: {f['reason']}" for f in failures])
    )


def decode_all(
    dataset: Dataset, indices: Sequence[int], limits: ImageLimits, draft: tuple[int, int]
) -> tuple[dict[int, Image.Image], list[dict[str, str]]]:
    """The decoded images of ``dataset.data[i]`` for ``i`` in ``indices`` (by index), and a failure
    (path, code, reason) for each file that is not a usable image."""
    images: dict[int, Image.Image] = {}
    failures: list[dict[str, str]] = []
    for i in indices:
        try:
            images[i] = load_image(dataset.data[i], limits=limits, draft_size=draft).image
        except ImageError as exc:
            failures.append({"path": str(dataset.files[i]), "code": exc.code, "reason": str(exc)})
    return images, failures


def dataset_images(
    dataset: Dataset, *, limits: ImageLimits, draft: tuple[int, int], skip_bad: bool = False
) -> tuple[Dataset, list[Image.Image]]:
    """Decoded RGB images of every file (for fine-tuning and the ImageNet head).

    Raises:
        TrainingDataError: Unusable files and not ``skip_bad``.
    """
    images, failures = decode_all(dataset, range(len(dataset.files)), limits, draft)
    if failures and not skip_bad:
        raise bad_files_error(failures)
    keep = sorted(images)
    kept = dataset.subset(keep)
    kept.skipped = dataset.skipped + failures
    return kept, [images[i] for i in keep]
