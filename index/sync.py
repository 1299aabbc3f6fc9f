"""How a store's FAISS side stays equal to the catalog, and how it is saved (a snapshot).

SQLite is the source of truth; FAISS is derived from it and always rebuildable from it. Two
watermarks tie them together: ``seq_mark``, the highest catalog ``seq`` applied to FAISS, and
``del_mark``, the highest tombstone rowid applied. Both only grow (seqs and tombstone rowids are never
reused, and rows become visible in seq order: :mod:`index.catalog`).

* Every FAISS mutation after open happens in :meth:`SyncedIndex._sync`, which replays the catalog
  after the two watermarks: tombstones with rowid > ``del_mark`` are removed, rows with seq >
  ``seq_mark`` are added (read back from SQLite, so a row deleted before it was indexed can never come
  back). :meth:`~index.store.ImageStore.add` and :meth:`~index.store.ImageStore.delete` write SQLite
  then call it; :meth:`~index.store.ImageStore.refresh` calls it to pick up other processes' changes.
* The semantic index (:mod:`index.semantic`), when the store has one, is caught up in the same
  :meth:`SyncedIndex._sync`, under the same locks, after its own watermarks (a relayout or a replica's
  generation switch moves the visual ones); it is rebuilt from the catalog at open, never snapshotted.
* At open, the snapshot is reconciled with the catalog by set difference (FAISS ids not in the
  catalog are removed, catalog rows missing from FAISS are added) and the watermarks are taken from
  the same consistent read, so nothing is missed or applied twice
  (:func:`index.opening.reconcile_snapshot`).
* A replica's generation is caught up the same way, after the watermarks the build recorded in it
  (:func:`index.replica.replay_after`); a rebuild from the catalog takes its watermarks from the read
  it fills from (:meth:`index.relayout.RelayoutMixin._rebuild`).
* A snapshot (``vectors.faiss``, :meth:`SyncedIndex._write_snapshot`) is written with
  write-to-temp, fsync and rename, under the store's file lock, and its checksum and watermarks go
  into the manifest once it is in place. It is only a restart cache: a missing or damaged one is
  rebuilt from the catalog at open.

The locks that make this safe between threads are described in :mod:`index.store`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from deepfeat.index._fs import FileLock, clear_pending, mark_pending, remove_stale_temps
from deepfeat.index.catalog import Catalog
from deepfeat.index.errors import ReadOnlyStoreError, StoreError
from deepfeat.index.files import MANIFEST_FILE, SNAPSHOT_FILE
from deepfeat.index.generations import Generation
from deepfeat.index.manifest import Manifest, SnapshotInfo
from deepfeat.index.semantic import SemanticIndex
from deepfeat.index.vectors import VectorIndex
from deepfeat.index.whitening import Whitening

__all__ = ["REPLAY_BATCH", "SyncedIndex", "layout", "load_whitening"]

# The store's parts log under the store's name: one logger to configure, as before they were split.
logger = logging.getLogger(f"{__package__}.store")

REPLAY_BATCH = 10_000
"""Catalog rows read per chunk when replaying or rebuilding (bounded memory for a big catch-up)."""


def _images_in(seqs: np.ndarray) -> int:
    """Images in a per-vector seqs array (an image's seq repeats contiguously, once per vector)."""
    return int(np.count_nonzero(np.diff(seqs))) + 1 if seqs.size else 0


def layout(manifest: Manifest) -> tuple[Any, str]:
    """What the vectors in FAISS are: the whitening applied and the index type."""
    return manifest.extra.get("whitening"), manifest.index_factory


def load_whitening(data_dir: Path, manifest: Manifest) -> Whitening | None:
    """The whitening the manifest names, verified against its checksum (never a path from the file)."""
    return Whitening.load_recorded(data_dir, manifest.extra.get("whitening"))


class SyncedIndex:
    """The state every part of :class:`index.store.ImageStore` shares, and the catalog replay.

    The attributes are set once by ``ImageStore.__init__``; they are declared here so the parts
    (:mod:`index.replica`, :mod:`index.relayout`) type-check against the same names.
    """

    _data_dir: Path
    _catalog: Catalog
    _lock: FileLock  # the data directory's ``.lock`` (between processes)
    _read_only: bool
    _snapshot_every: int
    _closed: bool
    _sync_lock: threading.RLock  # serialises every change to the attributes below
    _index_lock: threading.RLock  # also held for each change to, and each search of, _vectors/_base
    _manifest: Manifest
    _vectors: VectorIndex  # the writer's whole index, or a replica's delta next to _base
    _base: Generation | None  # a replica's published generation (immutable; replaced, never mutated)
    _whitening: Whitening | None
    _semantic: SemanticIndex | None  # the semantic vectors, exact, in memory (None: no semantic layer)
    _seq_mark: int
    _del_mark: int
    _added_since_snapshot: int
    _changes_since_snapshot: int

    # ------------------------------------------------------------------ guards

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the store is closed")

    def _check_writable(self, action: str) -> None:
        self._check_open()
        if self._read_only:
            raise ReadOnlyStoreError(f"cannot {action}: the store at {self._data_dir} is open read-only")

    def _project(self, vectors: np.ndarray) -> np.ndarray:
        """Raw (dim) vectors -> what FAISS holds (the whitening's output, else unchanged)."""
        return self._whitening.apply(vectors) if self._whitening is not None else vectors

    # ------------------------------------------------------------------ the replay

    def _sync(self, *, atomic: bool) -> int:
        """Apply catalog changes after the watermarks to FAISS; the only place FAISS is mutated.

        Args:
            atomic: Apply all new rows in one locked FAISS add (used after an add, so a search never
                sees part of the batch); otherwise chunk by chunk (bounded memory for a big catch-up).

        Returns:
            Number of (visual) vectors added plus removed.
        """
        with self._sync_lock:
            all_marks = self._catalog.sync_marks()
            semantic = self._semantic
            if semantic is not None and semantic.pending(all_marks):
                semantic.catch_up(self._catalog, all_marks, self._index_lock)
            marks = all_marks[:2]
            if marks == (self._seq_mark, self._del_mark):
                return 0
            removed = self._apply_deletions()
            added = self._apply_additions(atomic=atomic)
            # Every row with seq <= marks[0] was either read above or deleted before it could be, so the
            # watermark may jump past rows deleted unseen (seqs are never reused).
            self._seq_mark = max(self._seq_mark, marks[0])
            self._added_since_snapshot += added
            self._changes_since_snapshot += added + removed
            if added or removed:
                logger.debug("synced with the catalog: +%d -%d", added, removed)
            return added + removed

    def _apply_deletions(self) -> int:
        """Remove the rows tombstoned after ``del_mark`` (hide them in a replica's generation)."""
        removed = 0
        deleted, new_del_mark = self._catalog.deleted_since(self._del_mark)
        if deleted:
            with self._index_lock:
                removed = self._vectors.remove(np.asarray(deleted, dtype=np.int64))
                if self._base is not None:
                    hidden = self._base.hide(deleted)
                    removed += self._base.visible - hidden.visible
                    self._base = hidden
        self._del_mark = new_del_mark
        return removed

    def _apply_additions(self, *, atomic: bool) -> int:
        """Add the rows after ``seq_mark``, all in one locked add when ``atomic``."""
        added = 0
        chunks = self._catalog.iter_vectors(after_seq=self._seq_mark, batch=REPLAY_BATCH)
        if atomic:
            parts = list(chunks)
            if parts:
                seqs = np.concatenate([p[0] for p in parts])
                vecs = np.concatenate([p[1] for p in parts])
                with self._index_lock:
                    self._vectors.add(seqs, self._project(vecs))
                self._seq_mark = int(seqs[-1])
                added = _images_in(seqs)
            return added
        for seqs, vecs in chunks:
            with self._index_lock:
                self._vectors.add(seqs, self._project(vecs))
            self._seq_mark = int(seqs[-1])
            added += _images_in(seqs)
        return added

    # ------------------------------------------------------------------ the snapshot

    def _write_snapshot(self, *, whitening_changed: bool = False) -> None:
        """Write ``vectors.faiss`` and the manifest atomically, under the sync lock and the file lock.

        Args:
            whitening_changed: This process just changed what the vectors in FAISS are (whitening or
                index type), so its manifest is authoritative; otherwise the manifest on disk is the
                base, and a layout changed on disk by another process means our vectors are stale:
                nothing is written (``refresh`` rebuilds).
        """
        with self._sync_lock, self._lock.hold():
            on_disk = Manifest.load(self._data_dir / MANIFEST_FILE)
            if not whitening_changed and on_disk is not None and layout(on_disk) != layout(self._manifest):
                logger.info(
                    "skipping snapshot: the index layout changed on disk since this process loaded it"
                )
                return
            remove_stale_temps(self._data_dir)
            path = self._data_dir / SNAPSHOT_FILE
            # No index lock: nothing mutates FAISS without the sync lock, and searches only read it.
            sha = self._vectors.save(path, before_replace=lambda digest: mark_pending(self._data_dir, digest))
            info = SnapshotInfo(
                file=SNAPSHOT_FILE,
                sha256=sha,
                size=path.stat().st_size,
                max_seq=self._seq_mark,
                deletions_rowid=self._del_mark,
                count=self._vectors.ntotal,
            )
            # Base the update on the file on disk so fields another process wrote survive.
            current = self._manifest if whitening_changed else (on_disk or self._manifest)
            manifest = replace(
                current,
                updated_at=time.time(),
                count=self._catalog.count(),
                snapshot=info,
                # Generations are published by build-index under this same lock: keep what is on disk.
                generation=on_disk.generation if on_disk is not None else current.generation,
                extra={**current.extra, **self._manifest.extra}
                if not whitening_changed
                else self._manifest.extra,
            )
            manifest.save(self._data_dir / MANIFEST_FILE)
            clear_pending(self._data_dir)
            self._manifest = manifest
            self._added_since_snapshot = 0
            self._changes_since_snapshot = 0
            logger.info("snapshot written: %d vectors, sha256 %s", info.count, sha[:12])
