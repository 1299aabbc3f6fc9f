"""Re-layout: rebuilding FAISS from the raw vectors in the catalog when what it holds changes.

Two things change what the vectors in FAISS are (the store's *layout*): a whitening (fitted, set or
removed: every stored vector is re-projected) and the ``auto`` index policy moving the collection to
another index type as it grows (:func:`index.choose.choose_factory`). Neither re-embeds anything: the
catalog keeps every raw vector. A process that sees another one changed the layout rebuilds too
(``refresh``); until then it writes no snapshot over the new one (:mod:`index.sync`).

Every build from the catalog goes through one routine, :func:`train_and_fill`: train the index on a
sample drawn uniformly at random over the catalog (by seq), then stream the catalog into it. The
rebuilds here, the rebuild of a damaged snapshot at open and ``build-index`` (:mod:`index.build`, which
streams into on-disk shards) all use it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from deepfeat.index.catalog import Catalog
from deepfeat.index.choose import choose_factory
from deepfeat.index.errors import InvalidArgumentError
from deepfeat.index.manifest import Manifest
from deepfeat.index.sync import REPLAY_BATCH, SyncedIndex, layout, load_whitening
from deepfeat.index.vectors import VectorIndex
from deepfeat.index.whitening import Whitening

__all__ = ["FillReport", "RelayoutMixin", "sample_catalog", "train_and_fill"]

logger = logging.getLogger(f"{__package__}.store")

_SAMPLE_ROUNDS = 8


def sample_catalog(catalog: Catalog, *, max_seq: int, n_live: int, want: int, seed: int = 0) -> np.ndarray:
    """Up to ``want`` catalog vectors with seq <= ``max_seq``, drawn uniformly (seeded), as (n, dim).

    Draws seq numbers rather than listing the live ones (8 bytes a row would not fit a memory budget
    at a billion rows); seqs of deleted rows are simply absent, so a few rounds top the sample up.
    When ``want`` covers every live row, all of them are read, in seq order.

    Args:
        catalog: The catalog to read.
        max_seq: Highest seq to consider (the watermark the caller read).
        n_live: How many rows the catalog holds (at that watermark).
        want: Vectors wanted.
        seed: Sampling seed.

    Returns:
        (n, dim) float32 raw vectors, n <= ``want``.
    """
    want = min(want, n_live)  # the buffer below is allocated whole
    out = np.empty((want, catalog.dim), dtype=np.float32)
    filled = 0
    if want == n_live:
        for seqs, vecs in catalog.iter_vectors(batch=REPLAY_BATCH):
            take = vecs[seqs <= max_seq][: want - filled]
            out[filled : filled + len(take)] = take
            filled += len(take)
            if filled >= want or seqs[-1] >= max_seq:
                break
        return out[:filled]
    rng = np.random.default_rng(seed)
    tried = np.empty(0, dtype=np.int64)
    for _ in range(_SAMPLE_ROUNDS):
        need = want - filled
        draw = rng.choice(max_seq, size=min(max_seq, tried.size + int(need * 1.2) + 64), replace=False) + 1
        fresh = np.setdiff1d(draw, tried)[: int(need * 1.2) + 64]
        tried = np.union1d(tried, fresh)
        for _, vecs in catalog.vectors_for_seqs(fresh.tolist()):
            take = vecs[: want - filled]
            out[filled : filled + len(take)] = take
            filled += len(take)
        if filled >= want or tried.size >= max_seq:
            break
    return out[:filled]


@dataclass(frozen=True)
class FillReport:
    """What :func:`train_and_fill` did: vectors trained on and added, and seconds spent on each."""

    trained_on: int
    added: int
    train_s: float
    add_s: float


def train_and_fill(
    index: VectorIndex,
    catalog: Catalog,
    *,
    max_seq: int,
    n_live: int,
    sample: int | None = None,
    seed: int = 0,
    project: Callable[[np.ndarray], np.ndarray] | None = None,
    add: Callable[[np.ndarray, np.ndarray], None] | None = None,
    batch: int = REPLAY_BATCH,
    progress: Callable[[str, int, int], None] | None = None,
) -> FillReport:
    """Train ``index`` on a uniform sample of the catalog, then stream every row with seq <= ``max_seq``.

    Rows added after ``max_seq`` are left to the next replay, and rows deleted while this runs to the
    tombstones after the deletion watermark read with ``max_seq`` (:mod:`index.sync`).

    Args:
        index: An empty index (trained already, e.g. Flat, or not).
        catalog: The catalog to read.
        max_seq: Highest seq to add.
        n_live: Rows the catalog holds at ``max_seq`` (it sizes the sample and the progress total).
        sample: Training vectors (None: the index's default, ``max(100_000, 40 * nlist)``).
        seed: Sampling seed.
        project: Raw vectors -> the index's vectors (a whitening); None for none.
        add: Where each chunk goes, as ``add(seqs, vectors)`` (None: ``index.add``); ``build-index``
            adds to shards it writes to disk.
        batch: Rows read per chunk.
        progress: Called as ``progress(stage, done, total)`` with stage ``train`` then ``add``.

    Returns:
        The counts and timings.

    Raises:
        StoreError: Too few vectors to train this index type.
    """
    report = progress or (lambda stage, done, total: None)
    apply = project or (lambda x: x)
    started = time.monotonic()
    trained_on = 0
    if not index.is_trained and n_live:
        want = index.default_train_size if sample is None else sample
        report("train", 0, want)
        vectors = sample_catalog(catalog, max_seq=max_seq, n_live=n_live, want=want, seed=seed)
        if vectors.size:
            index.train(apply(vectors), max_vectors=want)
        trained_on = int(vectors.shape[0])
        del vectors  # free the sample before the add phase
        report("train", trained_on, want)
    train_s = time.monotonic() - started

    started = time.monotonic()
    sink = add or index.add
    added = 0
    for seqs, vecs in catalog.iter_vectors(batch=batch):
        keep = seqs <= max_seq
        done = not keep.all()
        if done:
            seqs, vecs = seqs[keep], vecs[keep]
        if seqs.size:
            sink(seqs, apply(vecs))
            added += int(seqs.size)
        report("add", added, n_live)
        if done:
            break
    return FillReport(trained_on=trained_on, added=added, train_s=train_s, add_s=time.monotonic() - started)


class RelayoutMixin(SyncedIndex):
    """Whitening and index-type changes, each a rebuild of FAISS from the catalog."""

    @property
    def whitening(self) -> Whitening | None:
        """The PCA-whitening applied to stored vectors and queries, if any."""
        return self._whitening

    @property
    def index_dim(self) -> int:
        """Dimension of the vectors in FAISS (the whitening's output, else ``dim``)."""
        return self._whitening.d_out if self._whitening is not None else self._manifest.dim

    def _rebuild(self, whitening: Whitening | None) -> None:
        """Rebuild FAISS from the raw vectors in the catalog through ``whitening`` (no re-embedding).

        The new index is filled aside and swapped in under the index lock; a replica's generation is
        dropped (it was built with the previous layout).
        """
        with self._sync_lock:
            max_seq, del_rowid, live = self._catalog.state()
            fresh = VectorIndex.create(
                whitening.d_out if whitening is not None else self._manifest.dim,
                self._manifest.index_factory,
            )
            filled = train_and_fill(
                fresh,
                self._catalog,
                max_seq=max_seq,
                n_live=int(live.size),
                project=whitening.apply if whitening is not None else None,
            )
            with self._index_lock:
                self._vectors = fresh
                self._whitening = whitening
                self._base = None
                self._seq_mark, self._del_mark = max_seq, del_rowid
            self._changes_since_snapshot += filled.added

    def _layout_stale(self, on_disk: Manifest) -> bool:
        """Whether another process changed what FAISS should hold (its manifest says so).

        A replica on a generation only cares about the whitening: the writer's index type does not
        matter to it.
        """
        if self._base is not None:
            return bool(on_disk.extra.get("whitening") != self._base.info.whitening)
        return layout(on_disk) != layout(self._manifest)

    def _adopt_layout(self, on_disk: Manifest) -> None:
        """Take on the layout another process recorded in ``on_disk``: rebuild from the catalog."""
        with self._sync_lock:
            if self._base is not None:
                logger.warning(
                    "generation %d was built with another whitening; serving from memory until the "
                    "next build-index",
                    self._base.info.number,
                )
            self._manifest = on_disk
            self._rebuild(load_whitening(self._data_dir, on_disk))

    def apply_auto_index(self, *, memory_budget_bytes: int | None = None) -> str:
        """``index_factory="auto"``: pick the index type for the current collection size
        (:func:`index.choose.choose_factory`) and rebuild from the catalog when it changed.

        Called at open for stores created with "auto"; as a collection grows past a threshold, the next
        open (or an explicit call) moves it from Flat to HNSW to IVF. Returns the factory in use.
        """
        self._check_writable("change the index type")
        n_vectors = self._catalog.count() * self._catalog.vectors_per_image()
        desired = choose_factory(max(1, n_vectors), self.index_dim, memory_budget_bytes=memory_budget_bytes)
        if desired == self._manifest.index_factory and self._manifest.extra.get("index_policy") == "auto":
            return desired
        with self._sync_lock:
            extra = {**self._manifest.extra, "index_policy": "auto"}
            self._manifest = replace(self._manifest, index_factory=desired, extra=extra)
            if desired != self._vectors.factory:
                logger.info(
                    "auto index: %d vectors -> %s (rebuilding from the catalog)",
                    n_vectors,
                    desired,
                )
                self._rebuild(self._whitening)
            self._write_snapshot(whitening_changed=True)
        return desired

    def record_writer(self, info: dict[str, Any]) -> None:
        """Note in the manifest what computes the vectors this process adds (backend, precision,
        device: what the fingerprint leaves out where vectors mix); written with the next snapshot.

        Raises:
            ReadOnlyStoreError: Opened read-only.
        """
        self._check_writable("record its writer")
        with self._sync_lock:
            extra = {**self._manifest.extra, "written_by": dict(info)}
            self._manifest = replace(self._manifest, extra=extra)

    def set_whitening(self, whitening: Whitening | None) -> None:
        """Apply (or with None remove) a whitening: re-projects every stored vector from the raw ones
        kept in the catalog, then writes the whitening, the snapshot and the manifest.

        Crash-safe: the whitening file is content-addressed and the manifest, written last, is the
        commit point; until then the previous whitening and manifest stay valid.

        Raises:
            ReadOnlyStoreError: Opened read-only.
            InvalidArgumentError: The whitening's input dimension is not the store's.
        """
        self._check_writable("change the whitening")
        if whitening is not None and whitening.d_in != self._manifest.dim:
            raise InvalidArgumentError(
                f"whitening expects {whitening.d_in}-d vectors, the store holds {self._manifest.dim}-d"
            )
        with self._sync_lock, self._lock.hold():
            entry: dict[str, Any] | None = None
            if whitening is not None:
                entry = whitening.save_recorded(self._data_dir)
            self._rebuild(whitening)
            extra = {k: v for k, v in self._manifest.extra.items() if k != "whitening"}
            if entry is not None:
                extra["whitening"] = entry
            self._manifest = replace(self._manifest, extra=extra)
            self._write_snapshot(whitening_changed=True)
            Whitening.remove_unrecorded(self._data_dir, entry)
        logger.info("whitening %s", f"set: {entry['d_in']} -> {entry['d_out']}" if entry else "removed")

    def fit_whitening(self, *, dim: int | None = None, sample: int = 100_000, seed: int = 0) -> Whitening:
        """Learn PCA-whitening from (a sample of) the stored raw vectors and apply it.

        Args:
            dim: Output dimension (None: as many as the data allows, up to the input dimension).
            sample: At most this many vectors are used to fit (drawn uniformly, seeded).
            seed: Sampling seed.
        Returns:
            The fitted whitening.
        Raises:
            InvalidArgumentError: Too few stored vectors for ``dim``.
        """
        self._check_writable("fit a whitening")
        max_seq, _, live = self._catalog.state()
        vectors = sample_catalog(
            self._catalog, max_seq=max_seq, n_live=int(live.size), want=sample, seed=seed
        )
        if not vectors.size:
            raise InvalidArgumentError("cannot fit a whitening on an empty store")
        whitening = Whitening.fit(vectors, dim=dim)
        self.set_whitening(whitening)
        return whitening
