"""What both training methods share: stratified splits, label checks, class-balanced loss weights and
the training log that goes into a head's manifest."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from deepfeat.models.heads.errors import TrainingDataError

__all__ = ["TrainingLog", "stratified_split", "check_labels", "class_weights"]

_MAX_CLASSES = 10_000


@dataclass
class TrainingLog:
    """What training did, recorded in the head's manifest."""

    method: str
    train_size: int
    val_size: int
    best_step: float = 0
    """linear: the chosen L2 strength; finetune: the best epoch (0 = the linear-probe initialisation)."""
    steps_run: int = 0
    val_accuracy: float | None = None
    val_loss: float | None = None
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("extra"))
        return data


def stratified_split(
    labels: Sequence[int] | np.ndarray, fraction: float, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices per class: ``round(n_c * fraction)`` to the second part, at least one when the class
    has two or more members, and always at least one left in the first part.

    Args:
        labels: Class index of each item.
        fraction: Share of each class that goes to the second part, in [0, 1).
        seed: Shuffle seed (the split is reproducible).

    Returns:
        ``(first, second)`` sorted index arrays.

    Raises:
        TrainingDataError: ``fraction`` outside [0, 1).
    """
    if not 0.0 <= fraction < 1.0:
        raise TrainingDataError(f"split fraction must be in [0, 1), got {fraction}")
    y = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    first: list[int] = []
    second: list[int] = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        rng.shuffle(members)
        n_second = 0
        if fraction > 0 and len(members) >= 2:
            n_second = min(len(members) - 1, max(1, round(len(members) * fraction)))
        second.extend(members[:n_second].tolist())
        first.extend(members[n_second:].tolist())
    return np.array(sorted(first), dtype=np.int64), np.array(sorted(second), dtype=np.int64)


def check_labels(y: np.ndarray, classes: Sequence[str], what: str) -> None:
    """Refuse labels no classifier can learn from, naming ``what`` (the data set) in the message.

    Raises:
        TrainingDataError: Fewer than 2 or too many classes, duplicate names, labels out of range,
            or a class without examples.
    """
    if len(classes) < 2:
        raise TrainingDataError(f"a classifier needs at least 2 classes, got {len(classes)}: {list(classes)}")
    if len(classes) > _MAX_CLASSES:
        raise TrainingDataError(f"at most {_MAX_CLASSES} classes, got {len(classes)}")
    if len(set(classes)) != len(classes):
        raise TrainingDataError(f"class names must be unique, got {list(classes)}")
    if y.ndim != 1 or (y.size and (y.min() < 0 or y.max() >= len(classes))):
        raise TrainingDataError(f"{what}: labels must be class indices in [0, {len(classes)})")
    missing = [classes[c] for c in range(len(classes)) if not np.any(y == c)]
    if missing:
        raise TrainingDataError(f"{what}: no examples of class(es) {missing}; every class needs at least one")


def class_weights(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Balanced weights n / (C * n_c): every class counts the same in the loss, whatever its size."""
    counts = torch.bincount(y, minlength=num_classes).float().clamp(min=1)
    return (len(y) / (num_classes * counts)).float()
