"""The semantic index: each image's semantic vector in an exact in-memory FAISS index (ids = seqs).

Kept beside the visual index (``similarity=semantic`` searches it) and equal to the catalog by the
same replay (:meth:`index.sync.SyncedIndex._sync`, under the same locks): rows added after its
``seq_mark``, tombstones after its ``del_mark``, and semantic vectors set on existing rows
(``deepfeat add-semantic``) after its ``upd_mark``. It keeps its own watermarks rather than sharing
the visual ones because a relayout or a replica's generation switch moves those (a generation holds
visual vectors only; generations stay visual-only).

It is never snapshotted: it is rebuilt from the catalog at every open (one sequential read of the
``semantic`` column) and holds n x d_s x 4 bytes in memory (the default 2280-d vectors: 9.1 kB per
image, 9.1 GB for a million images). Exact inner product, so a search is O(n d_s) per query.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import Any

import faiss
import numpy as np

from deepfeat.index.catalog import Catalog
from deepfeat.index.errors import InvalidVectorError
from deepfeat.index.vectors import id_selector

__all__ = ["SemanticIndex"]

logger = logging.getLogger(f"{__package__}.store")

REPLAY_BATCH = 10_000


QUERY_EXPANSION = 5
"""Stored neighbours each semantic query is expanded with (alpha-QE); 0 searches the query as it is."""

RERANK_SHORTLIST = 100
"""Hits of the expanded query re-ranked with database-side augmentation inside the shortlist
(:func:`rerank_dba`); 0 returns the expanded query's ranking as it is."""
DBA_NEIGHBOURS = 5
"""Neighbours each vector is augmented with (the query among the stored vectors, a hit among the
shortlist)."""
DBA_POWER = 3.0
"""Neighbours weigh their similarity to this power: near ones count, loose ones barely."""


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def rerank_dba(
    query: np.ndarray,
    query_scores: np.ndarray,
    query_neighbours: np.ndarray,
    shortlist: np.ndarray,
    *,
    neighbours: int = DBA_NEIGHBOURS,
    power: float = DBA_POWER,
    expansion: int = QUERY_EXPANSION,
) -> tuple[np.ndarray, np.ndarray]:
    """Database-side augmentation, computed at query time inside a shortlist: the order and scores
    of ``shortlist`` for one query.

    Classic DBA replaces every stored vector by a weighted sum of itself and its nearest stored
    neighbours, then searches with an expanded query. An incremental store cannot rewrite vectors as
    images arrive, so the same sums are formed where they matter, per query: the query from its
    nearest stored vectors (``query_neighbours``, (n, d), with their ``query_scores``), each
    shortlisted vector from its nearest fellows in the shortlist ((m, d), ranked by the expanded
    query). The augmented query is then expanded over the ``expansion - 1`` augmented hits nearest
    to it (the query itself counted twice, as the expansion of an indexed query counts its own
    match), and the shortlist is re-ranked by cosine to that. On the category collections' tuning
    parts this lifted P@10 of the default semantic vector from 0.788 (expansion alone) to 0.837,
    against 0.841 for DBA over the whole store (docs/quality.md). The cost is an m x m product per
    query, whatever the store's size.

    Returns:
        (scores, order): cosines of the re-ranked shortlist, best first, and their positions in
        ``shortlist``.
    """
    m = shortlist.shape[0]
    w = np.clip(query_scores[:neighbours], 0, None) ** power
    q = _l2(query + w @ query_neighbours[:neighbours])
    within = shortlist @ shortlist.T
    np.fill_diagonal(within, -np.inf)
    k = min(neighbours, m - 1)
    if k > 0:
        nearest = np.argpartition(-within, k - 1, axis=1)[:, :k]
        sims = np.take_along_axis(within, nearest, 1)
        augmented = _l2(
            shortlist + np.einsum("ij,ijd->id", np.clip(sims, 0, None) ** power, shortlist[nearest])
        )
    else:
        augmented = _l2(shortlist)
    to_query = augmented @ q
    top = np.argsort(-to_query, kind="stable")[: max(expansion - 1, 0)]
    expanded = _l2(2 * q + np.clip(to_query[top], 0, None) @ augmented[top])
    scores = augmented @ expanded
    order = np.argsort(-scores, kind="stable")
    return scores[order].astype(np.float32), order


class SemanticIndex:
    """An exact ``IndexIDMap(IndexFlatIP)`` of semantic vectors and its three catalog watermarks.

    Not thread-safe by itself: the store mutates it under its sync and index locks and searches it
    under the index lock.
    """

    def __init__(self, dim: int) -> None:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise InvalidVectorError(f"semantic dim must be a positive integer, got {dim!r}")
        self.dim = dim
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))  # IDMap2: a hit's vector by its id
        self.seq_mark = 0
        self.del_mark = 0
        self.upd_mark = 0

    @property
    def count(self) -> int:
        """Images held."""
        return int(self._index.ntotal)

    def _add(self, seqs: np.ndarray, vectors: np.ndarray) -> None:
        if vectors.shape[1] != self.dim:
            raise InvalidVectorError(
                f"the catalog holds semantic vectors of dim {vectors.shape[1]}, this store expects {self.dim}"
            )
        self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), seqs.astype(np.int64))

    def _remove(self, seqs: list[int] | np.ndarray) -> int:
        if not len(seqs):
            return 0
        return int(self._index.remove_ids(faiss.IDSelectorBatch(np.asarray(seqs, dtype=np.int64))))

    def fill(self, catalog: Catalog, *, upto_seq: int, del_mark: int) -> None:
        """Load every live row with seq <= ``upto_seq`` that has a semantic vector, and take the marks.

        Call with the watermarks the visual index was reconciled at (one consistent read): a row added
        after them is replayed by the next sync, a row deleted meanwhile is already absent from this
        read, and a semantic update logged before the fill is re-applied (idempotently) by the sync.
        """
        _, _, upd_mark = catalog.sync_marks()  # read before the fill: later updates are replayed
        for seqs, vectors in catalog.iter_semantic(upto_seq=upto_seq, batch=REPLAY_BATCH):
            self._add(seqs, vectors)
        self.seq_mark, self.del_mark, self.upd_mark = int(upto_seq), int(del_mark), int(upd_mark)
        if self.count:
            logger.info("semantic index: %d images (%d-d) from the catalog", self.count, self.dim)

    def pending(self, marks: tuple[int, int, int]) -> bool:
        """Whether the catalog's ``sync_marks`` are past this index's watermarks."""
        return marks != (self.seq_mark, self.del_mark, self.upd_mark)

    def catch_up(
        self, catalog: Catalog, marks: tuple[int, int, int], lock: AbstractContextManager[Any]
    ) -> int:
        """Replay tombstones, new rows up to ``marks[0]``, then updates; mutations under ``lock``.

        Returns:
            Vectors removed plus added.
        """
        changes = 0
        deleted, del_mark = catalog.deleted_since(self.del_mark)
        if deleted:
            with lock:
                changes += self._remove(deleted)
        self.del_mark = del_mark
        parts = list(catalog.iter_semantic(after_seq=self.seq_mark, upto_seq=marks[0], batch=REPLAY_BATCH))
        if parts:
            seqs = np.concatenate([p[0] for p in parts])
            vectors = np.concatenate([p[1] for p in parts])
            with lock:
                self._remove(seqs)  # a row an update already brought in
                self._add(seqs, vectors)
            changes += int(seqs.size)
        self.seq_mark = max(self.seq_mark, marks[0])
        updated, upd_mark = catalog.semantic_updates_since(self.upd_mark)
        # Only rows this index has passed: later ones arrive with their additions.
        updated = sorted({s for s in updated if s <= self.seq_mark})
        for seqs, vectors in catalog.semantic_for_seqs(updated):
            with lock:
                self._remove(seqs)
                self._add(seqs, vectors)
            changes += int(seqs.size)
        self.upd_mark = upd_mark
        return changes

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        expansion: int = QUERY_EXPANSION,
        among: np.ndarray | None = None,
        rerank: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(m, d_s) queries -> ``(scores, seqs)``, (m, min(k, count)) each, best first.

        With ``expansion`` n > 0 (alpha-query expansion, alpha = 1): each query is replaced by the
        normalised sum of itself and its n nearest stored vectors weighted by their similarity, then
        searched again; scores are against that expanded query. On the category collections' tuning
        parts n = 5 lifted semantic P@10 from 0.707 to 0.770 with the logits, and alpha = 1, n = 5 was
        also the best for ``gem-logits+penultimate`` (0.788; docs/quality.md); the second search
        costs what the first does.

        The expanded query's ``rerank`` best hits (default :data:`RERANK_SHORTLIST`; 0 skips it) are
        then re-ranked by :func:`rerank_dba`, and scores are cosines to its augmented query.

        ``among`` (a filter's seqs) restricts the hits, not the expansion: the query is the same
        whatever the filter, and the flat index scores exactly the images it allows.
        """
        if queries.shape[1] != self.dim:
            raise InvalidVectorError(f"semantic queries must have shape (m, {self.dim}), got {queries.shape}")
        raw = np.ascontiguousarray(queries, dtype=np.float32)
        q = raw
        shortlist = RERANK_SHORTLIST if rerank is None else int(rerank)
        first = max(int(expansion), DBA_NEIGHBOURS if shortlist > 0 else 0)
        # Each query's nearest stored vectors, read once: the expansion and the re-ranking share them.
        near: list[tuple[np.ndarray, np.ndarray]] = []
        if first > 0 and self.count:
            first_scores, first_ids = self._index.search(raw, min(first, self.count))  # (m, n)
            for row in range(raw.shape[0]):
                found = first_ids[row] >= 0
                vectors = np.stack([self._index.reconstruct(int(seq)) for seq in first_ids[row][found]])
                near.append((first_scores[row][found], vectors.reshape(-1, self.dim)))
            weights = [np.clip(scores[:expansion], 0, None) for scores, _ in near]
            q = _l2(
                raw + np.stack([w @ vectors[: w.size] for w, (_, vectors) in zip(weights, near, strict=True)])
            )
        kk = max(1, min(int(k), self.count))
        wanted = max(kk, min(shortlist, self.count)) if shortlist > 0 else kk
        if among is None:
            scores, ids = self._index.search(q, wanted)
        else:
            selector, bitmap = id_selector(among)
            params = faiss.SearchParameters()
            params.sel = selector
            scores, ids = self._index.search(q, wanted, params=params)
            del bitmap
        if shortlist <= 0 or not self.count:
            return scores, ids
        out_scores = np.full((q.shape[0], kk), np.finfo(np.float32).min, np.float32)
        out_ids = np.full((q.shape[0], kk), -1, np.int64)
        for row, (near_scores, near_vectors) in enumerate(near):
            hits = ids[row][ids[row] >= 0]
            if not hits.size:
                continue
            vectors = np.stack([self._index.reconstruct(int(seq)) for seq in hits])
            ranked, order = rerank_dba(raw[row], near_scores, near_vectors, vectors)
            n = min(kk, order.size)
            out_scores[row, :n] = ranked[:n]
            out_ids[row, :n] = hits[order[:n]]
        return out_scores, out_ids
