"""Near-duplicate groups found with the index itself: k-NN per stored vector, then union-find.

Never an all-pairs matrix: the cost is one search per stored vector (in batches) and the memory is
O(n). Two images are linked when either is among the other's k nearest with cosine >= the threshold;
groups are the connected components (so A~B~C groups all three), largest first.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from deepfeat.index.catalog import Catalog, ImageRecord
from deepfeat.index.errors import InvalidArgumentError

__all__ = ["near_duplicates"]

Search = Callable[[np.ndarray, int, np.ndarray | None], tuple[np.ndarray, np.ndarray]]
"""``search(raw queries (m, dim), k, among) -> (scores (m, k), seqs (m, k))``, -1 for no hit."""


class _DisjointSets:
    """Union-find over seqs, with path halving."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        parent = self.parent
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)

    def groups(self) -> list[list[int]]:
        """Every set with more than one member, each sorted."""
        by_root: dict[int, list[int]] = {}
        for seq in self.parent:
            by_root.setdefault(self.find(seq), []).append(seq)
        return [sorted(g) for g in by_root.values() if len(g) > 1]


def near_duplicates(
    catalog: Catalog,
    search: Search,
    threshold: float,
    *,
    k: int = 10,
    batch: int = 1024,
    among: np.ndarray | None = None,
) -> list[list[ImageRecord]]:
    """Groups of near-identical images among every vector the catalog holds.

    Args:
        catalog: Where the vectors and the records come from.
        search: The store's search of raw vectors over the whole collection, restricted to ``among``.
        among: Only these images (a filter's sorted seqs), on both sides of every pair.
        threshold: Cosine similarity in (0, 1]; 0.95+ finds re-encodes and resizes.
        k: Neighbours examined per image (bounds the size a group can be discovered at).
        batch: Vectors searched per call.

    Returns:
        The groups' records (each group sorted by seq), largest group first, then oldest first.

    Raises:
        InvalidArgumentError: ``threshold`` outside (0, 1].
    """
    if not 0.0 < threshold <= 1.0:
        raise InvalidArgumentError(f"threshold must be in (0, 1], got {threshold}")
    sets = _DisjointSets()
    if among is None:
        batches = catalog.iter_vectors(batch=batch, global_only=True)
    else:
        batches = catalog.vectors_for_seqs(among.tolist(), batch=batch, global_only=True)
    for seqs, vecs in batches:
        scores, ids = search(vecs, k + 1, among)  # (b, <= k + 1) image hits
        for seq, row_scores, row_ids in zip(seqs.tolist(), scores, ids, strict=True):
            for score, other in zip(row_scores.tolist(), row_ids.tolist(), strict=True):
                if other >= 0 and other != seq and score >= threshold:
                    sets.union(seq, other)
    members = sets.groups()
    records = catalog.get_many_by_seq([seq for g in members for seq in g]) if members else {}
    out = [[records[seq] for seq in g if seq in records] for g in members]
    return sorted((g for g in out if len(g) > 1), key=lambda g: (-len(g), g[0].added_at))
