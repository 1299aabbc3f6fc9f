"""Read replicas: a published generation (the "base") plus the rows added after it (the "delta").

Read replicas (``read_only=True``) on a store with a published generation search the generation
memory-mapped (the base) plus an in-memory exact index of the rows added after it (the delta), merged
by score; rows deleted after it are hidden in the base (:class:`index.generations.Generation`).
``refresh`` catches up with the catalog and swaps in a newer generation when the manifest names one:
the new base and delta are built aside and swapped under the index lock, so searches in flight finish
on the old pair. A read-only open never creates a file, takes only a shared lock, and never writes to
SQLite (read-only connections do not checkpoint).

A compressed generation (IVF-PQ) ranks coarsely, so a replica asks it for ``RERANK_FACTOR`` times the
candidates wanted and re-scores them exactly with the raw vectors the catalog keeps
(:meth:`ReplicaMixin._rerank`).

The writer never loads a generation; it keeps its own index and snapshot (:mod:`index.generations`
explains why). Without a generation, :meth:`ReplicaMixin._search_index` is just the locked search of
the in-memory index.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from deepfeat.index.catalog import Catalog
from deepfeat.index.errors import CorruptStoreError
from deepfeat.index.generations import Generation, load_generation, merge_top_k
from deepfeat.index.ids import seqs_of, vector_ids
from deepfeat.index.manifest import GenerationInfo, Manifest
from deepfeat.index.sync import REPLAY_BATCH, SyncedIndex, load_whitening
from deepfeat.index.vectors import VectorIndex
from deepfeat.index.whitening import Whitening

__all__ = ["RERANK_FACTOR", "ReplicaMixin", "open_generation", "replay_after"]

logger = logging.getLogger(f"{__package__}.store")

RERANK_FACTOR = 10
"""A replica asks a compressed generation for this many candidates per wanted hit and re-scores them
exactly (:meth:`ReplicaMixin._rerank`)."""


def open_generation(data_dir: Path, manifest: Manifest) -> Generation | None:
    """The generation a replica opens on: the published one, else the previous one, when it was built
    with the store's current whitening and its files check out; None (logged) when neither does, and
    the replica then serves from memory like any read-only store."""
    current = manifest.generation
    for info in (current, current.previous if current is not None else None):
        if info is None:
            continue
        if info.whitening != manifest.extra.get("whitening"):
            logger.warning("generation %d was built with another whitening; not using it", info.number)
            continue
        try:
            return Generation(info=info, index=load_generation(data_dir, info))
        except CorruptStoreError as exc:
            logger.error("cannot use generation %d: %s", info.number, exc)
    if current is not None:
        logger.warning(
            "no usable generation in %s; serving from the snapshot and the catalog in memory", data_dir
        )
    return None


def replay_after(
    catalog: Catalog, base: Generation, delta: VectorIndex, whitening: Whitening | None
) -> tuple[Generation, int, int]:
    """Fill a delta nobody searches yet with the catalog's rows after ``base``'s watermarks and hide
    the rows deleted after it; returns ``(base with hidden rows, seq_mark, del_mark)``.

    Same order as :meth:`index.sync.SyncedIndex._sync` (watermarks, then tombstones, then rows), so a
    row added or deleted meanwhile is picked up by the next sync, never lost nor applied twice.
    """
    marks = catalog.watermarks()
    deleted, del_mark = catalog.deleted_since(base.info.deletions_rowid)
    base = base.hide(deleted)
    seq_mark = base.info.max_seq
    for seqs, vecs in catalog.iter_vectors(after_seq=seq_mark, batch=REPLAY_BATCH):
        delta.add(seqs, whitening.apply(vecs) if whitening is not None else vecs)
        seq_mark = int(seqs[-1])
    return base, max(seq_mark, marks[0]), del_mark


class ReplicaMixin(SyncedIndex):
    """Searching base + delta, re-ranking a compressed base, and switching to a newer generation."""

    # Generations this replica could not load, as (number, sha256): not retried until the manifest
    # names another one (verifying a big generation is a full read of it).
    _failed_generations: set[tuple[int, str]]

    def _search_index(
        self, queries: np.ndarray, k: int, *, among: np.ndarray | None = None, share: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search of raw (unprojected) queries: the in-memory index, merged with the generation
        on a replica. The generation is immutable, so it is searched outside the index lock (searches
        run concurrently on it) through the reference taken with the delta, which keeps the pair
        consistent across a generation switch. ``among``/``share``: a filter (VectorIndex.search)."""
        with self._index_lock:
            q = self._project(queries)
            scores, ids = self._vectors.search(q, k, among=among, share=share)
            base = self._base
        if base is not None:
            if base.index.exact_scores:
                shortlist = base.search(
                    q, k, among=among, share=share
                )  # k counts vectors: the caller's fan-out
            else:
                shortlist = self._rerank(q, *base.search(q, k * RERANK_FACTOR, among=among, share=share), k)
            scores, ids = merge_top_k([(scores, ids), shortlist], k)
        return scores, ids

    def _rerank(
        self, queries: np.ndarray, scores: np.ndarray, ids: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Re-score a compressed index's shortlist with the exact vectors the catalog holds.

        PQ codes rank coarsely: at 1M vectors IVF4096,PQ64 stalls near recall@10 0.65 whatever nprobe
        (README, "Deployment"), while the true neighbours are almost always among its top 10k. The
        catalog already stores every raw vector, so the fix costs one indexed SQLite read per query
        batch, and the scores returned are exact inner products. Rows deleted meanwhile drop out.
        """
        wanted = np.unique(seqs_of(ids[ids >= 0]))
        if not wanted.size:
            return merge_top_k([(scores, ids)], k)
        id_parts, vec_parts = [], []
        for seqs, vectors in self._catalog.vectors_for_seqs(wanted.tolist()):
            id_parts.append(vector_ids(seqs))
            vec_parts.append(self._project(vectors))
        if not id_parts:
            return merge_top_k([(scores, np.full_like(ids, -1))], k)
        known, matrix = np.concatenate(id_parts), np.concatenate(vec_parts)
        order = np.argsort(known, kind="stable")  # regional ids sort after every global one
        known, matrix = known[order], matrix[order]
        pos = np.searchsorted(known, ids).clip(0, known.size - 1)
        valid = (ids >= 0) & (known[pos] == ids)
        exact = np.einsum("md,mkd->mk", queries, matrix[pos]).astype(np.float32)
        return merge_top_k([(exact, np.where(valid, ids, -1))], k)

    def _wants_generation(self, info: GenerationInfo | None) -> bool:
        """Whether the manifest names a generation this replica should switch to."""
        if info is None or (info.number, info.sha256) in self._failed_generations:
            return False
        return self._base is None or info.number != self._base.info.number

    def _switch_generation(self, on_disk: Manifest) -> int | None:
        """Load the generation ``on_disk`` names and swap it in with a fresh delta.

        The new pair is built aside (verifying and mapping the files, replaying the rows after it) while
        searches go on; only the swap takes the index lock, so searches in flight finish on the old
        pair, whose mapping goes when its last search drops it.

        Returns:
            Searchable vectors after the switch, or None when the generation cannot be used (logged and
            remembered, so the next refresh does not verify it again).
        """
        info = on_disk.generation
        if info is None:
            return None
        with self._sync_lock:
            if info.whitening != on_disk.extra.get("whitening"):
                logger.warning("generation %d was built with another whitening; not switching", info.number)
                self._failed_generations.add((info.number, info.sha256))
                return None
            try:
                base = Generation(info=info, index=load_generation(self._data_dir, info))
                whitening = load_whitening(self._data_dir, on_disk)
            except CorruptStoreError as exc:
                logger.error("cannot use generation %d: %s", info.number, exc)
                self._failed_generations.add((info.number, info.sha256))
                return None
            delta = VectorIndex.create(base.info.dim, "Flat")
            base, seq_mark, del_mark = replay_after(self._catalog, base, delta, whitening)
            with self._index_lock:
                old = self._base
                self._vectors, self._base, self._whitening = delta, base, whitening
                self._seq_mark, self._del_mark = seq_mark, del_mark
                self._manifest = on_disk
            logger.info(
                "now serving generation %d (%d images, %s) + %d newer images (was %s)",
                info.number,
                base.visible,
                info.factory,
                delta.images,
                f"generation {old.info.number}" if old is not None else "the in-memory index",
            )
            return base.visible + delta.images
