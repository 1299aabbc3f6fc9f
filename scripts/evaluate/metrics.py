"""Retrieval metrics from exact-search scores: AP/mAP, precision@k and recall@k, and the copy-mode summary.

Pure numpy on whole (queries x database) score blocks: the collections evaluated here are small enough
for brute force, and brute force is the ground truth an approximate index would be judged against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from deepfeat.scripts.evaluate.errors import EvalError

__all__ = ["average_precision", "ranking_metrics", "copy_metrics", "chance_map"]


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
    # an excluded item (-inf) is never a hit, not even one at the bottom of the list
    rel_sorted &= np.isfinite(np.take_along_axis(scores, order, axis=1))
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


def copy_metrics(
    first_rank: np.ndarray,
    ap: np.ndarray,
    transform_of: np.ndarray,
    transforms: Sequence[str],
    hard: Sequence[str],
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Copy-detection summary and per-transform rows from ``ranking_metrics``' per-query output.

    Each query has exactly one relevant image (its original), so AP is the reciprocal rank and
    recall@k is the share of queries whose original ranks within k. ``hard`` is reported on its own
    because averaging it with the easy transforms hides what separates the configurations.
    """

    def recall_at(k: int, mask: np.ndarray) -> float:
        ranks = first_rank[mask]
        return float(((ranks >= 1) & (ranks <= k)).mean())

    per_transform = {
        t: {
            "recall@1": recall_at(1, transform_of == t),
            "recall@10": recall_at(10, transform_of == t),
            "mAP": float(ap[transform_of == t].mean()),
        }
        for t in transforms
    }
    is_hard = np.isin(transform_of, list(hard))
    everything = np.ones(len(first_rank), dtype=bool)
    summary = {
        "recall@1": recall_at(1, everything),
        "recall@10": recall_at(10, everything),
        "mAP": float(ap.mean()),
        "hard_recall@1": recall_at(1, is_hard) if is_hard.any() else 0.0,
        "median_rank": float(np.median(first_rank)),
    }
    return summary, per_transform


def chance_map(class_sizes: Sequence[int]) -> float:
    """The floor a category table is read against: a query of a class of c images among n has
    (c - 1) relevant items in n - 1, and a random ranking's AP is about that share."""
    n = sum(class_sizes)
    return float(np.mean([(c - 1) / (n - 1) for c in class_sizes for _ in range(c)]))
