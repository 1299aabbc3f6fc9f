"""From class scores to answers: the evaluation report a training run saves, top-k predictions and the
similarity-weighted kNN vote, shared by the training scripts and the service."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from deepfeat.models.embedder import Prediction
from deepfeat.models.heads.errors import HeadError

__all__ = ["evaluate", "predictions_from_probabilities", "knn_vote"]


def evaluate(
    y_true: Sequence[int] | np.ndarray, probabilities: np.ndarray, classes: Sequence[str], *, top_k: int = 2
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, top-k accuracy, per-class precision/recall/F1 and the confusion matrix.

    Args:
        y_true: (n,) true class indices.
        probabilities: (n, C) scores (any monotone score works; argmax is the prediction).
        classes: Class names (C).
        top_k: k for the top-k accuracy (capped at C).

    Returns:
        A JSON-ready dict; ``confusion[i][j]`` counts images of class i predicted as j.

    Raises:
        HeadError: ``probabilities`` is not (n, C).
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    num_classes = len(classes)
    if p.ndim != 2 or p.shape != (len(y), num_classes):
        raise HeadError(f"expected ({len(y)}, {num_classes}) scores, got {p.shape}")
    pred = p.argmax(axis=1) if len(y) else np.zeros(0, dtype=np.int64)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    k = max(1, min(top_k, num_classes))
    topk = np.argsort(-p, axis=1)[:, :k] if len(y) else np.zeros((0, k), dtype=np.int64)
    per_class, recalls = _per_class(confusion, classes)
    n = len(y)
    return {
        "n": n,
        "accuracy": round(float((pred == y).mean()), 4) if n else 0.0,
        "balanced_accuracy": round(float(np.mean(recalls)), 4) if recalls else 0.0,
        f"top{k}_accuracy": round(float((topk == y[:, None]).any(axis=1).mean()), 4) if n else 0.0,
        "chance": round(1.0 / num_classes, 4),
        "per_class": per_class,
        "classes": list(classes),
        "confusion": confusion.tolist(),
    }


def _per_class(
    confusion: np.ndarray, classes: Sequence[str]
) -> tuple[dict[str, dict[str, float | int]], list[float]]:
    """Precision/recall/F1/support per class, and the recalls of the classes that have examples (a class
    absent from the evaluation set would pull the balanced accuracy down for nothing)."""
    per_class: dict[str, dict[str, float | int]] = {}
    recalls = []
    for c, name in enumerate(classes):
        tp = int(confusion[c, c])
        support = int(confusion[c].sum())
        predicted = int(confusion[:, c].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        if support:
            recalls.append(recall)
        per_class[name] = {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "support": support,
        }
    return per_class, recalls


def predictions_from_probabilities(
    probabilities: np.ndarray, classes: Sequence[str], *, k: int
) -> list[list[Prediction]]:
    """(n, C) probabilities -> top-k :class:`Prediction` per row, best first (class_index = position in classes).

    Raises:
        HeadError: ``k`` < 1.
    """
    if k < 1:
        raise HeadError(f"k must be >= 1, got {k}")
    out = []
    for row in np.asarray(probabilities, dtype=np.float64):
        order = np.argsort(-row, kind="stable")[: min(k, len(classes))]
        out.append(
            [Prediction(label=classes[i], class_index=int(i), probability=float(row[i])) for i in order]
        )
    return out


def knn_vote(labels: Sequence[str], similarities: Sequence[float]) -> list[tuple[str, float]]:
    """Similarity-weighted vote of neighbours: ``(label, share of the total weight)``, best first.

    Weights are the cosine similarities clipped at a small positive floor, so a dissimilar neighbour
    counts for almost nothing and an all-negative neighbourhood still votes by count.

    Raises:
        HeadError: As many labels as similarities are needed.
    """
    if len(labels) != len(similarities):
        raise HeadError(f"got {len(labels)} labels for {len(similarities)} similarities")
    totals: dict[str, float] = {}
    for label, sim in zip(labels, similarities, strict=True):
        totals[label] = totals.get(label, 0.0) + max(float(sim), 1e-3)
    mass = sum(totals.values())
    if not mass:
        return []
    return sorted(((lab, w / mass) for lab, w in totals.items()), key=lambda t: (-t[1], t[0]))
