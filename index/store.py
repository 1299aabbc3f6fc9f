"""``ImageStore``: the facade the API and the batch indexer use (add / get / delete / search).

A data directory holds:

* ``catalog.sqlite3``: the source of truth (see :mod:`index.catalog`). An add is acknowledged once its
  transaction commits; FAISS is updated right after, from the committed rows.
* ``vectors.faiss``: a FAISS snapshot, derived and always rebuildable from the catalog. Written
  atomically, its sha256 recorded in the manifest after it is in place.
* ``manifest.json``: the embedder fingerprint, dim, metric, factory, counts and the snapshot's checksum
  and watermarks (see :mod:`index.manifest`).
* ``.lock``: ``fcntl.flock``-ed while a snapshot + manifest is written (and shared while one is read),
  so the batch indexer and the server can share a directory.
* ``generations/``: published, immutable IVF indexes built by :mod:`index.build` for read replicas
  (:mod:`index.generations`: layout, publish protocol, retention, and why the writer keeps using its
  own snapshot).

Read replicas (``read_only=True``) on a store with a published generation search the generation
memory-mapped (the "base") plus an in-memory exact index of the rows added after it (the "delta"),
merged by score; rows deleted after it are hidden in the base. :meth:`refresh` catches up with the
catalog and swaps in a newer generation when the manifest names one: the new base and delta are built
aside and swapped under the index lock, so searches in flight finish on the old pair. A read-only open
never creates a file, takes only a shared lock, and never writes to SQLite (read-only connections do
not checkpoint).

How FAISS stays equal to the catalog. Every FAISS mutation happens in :meth:`ImageStore._sync`, which
replays the catalog after two watermarks: tombstones with rowid > ``del_mark`` are removed, rows with
seq > ``seq_mark`` are added (read back from SQLite, so a row deleted before it was indexed can never
come back). :meth:`add` and :meth:`delete` write SQLite then call it; :meth:`refresh` calls it to pick up
other processes' changes. At open, the snapshot is reconciled with the catalog by set difference
(FAISS ids not in the catalog are removed, catalog rows missing from FAISS are added) and the
watermarks are taken from the same consistent read, so nothing is missed or applied twice.

Locks inside a process: ``_sync_lock`` (RLock) serialises everything that mutates FAISS or the
watermarks; ``_index_lock`` (RLock) is held for each FAISS mutation and each FAISS search, so a search
never sees half of an added batch. Catalog reads for a search happen outside both locks; a hit whose
record was deleted in between is dropped (never returned without its record).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from deepfeat.index._fs import FileLock, remove_stale_temps
from deepfeat.index.catalog import Catalog, CatalogRow, ImageRecord
from deepfeat.index.errors import (
    CorruptStoreError,
    IncompatibleIndexError,
    InvalidArgumentError,
    InvalidIdError,
    InvalidVectorError,
    NotFoundError,
    ReadOnlyStoreError,
    StoreError,
)
from deepfeat.index.generations import Generation, load_generation, merge_top_k
from deepfeat.index.manifest import (
    GenerationInfo,
    Manifest,
    SnapshotInfo,
    check_compatible,
    normalize_fingerprint,
)
from deepfeat.index.vectors import VectorIndex
from deepfeat.index.whitening import Whitening

__all__ = [
    "CATALOG_FILE",
    "LOCK_FILE",
    "MANIFEST_FILE",
    "SNAPSHOT_FILE",
    "AddResult",
    "Hit",
    "ImageRecord",
    "ImageStore",
    "NewImage",
    "is_valid_id",
]

logger = logging.getLogger(__name__)

CATALOG_FILE = "catalog.sqlite3"
MANIFEST_FILE = "manifest.json"
SNAPSHOT_FILE = "vectors.faiss"
LOCK_FILE = ".lock"

_ID_RE = re.compile(r"[0-9a-f]{32}")
_TRAIN_SAMPLE = 100_000  # vectors drawn from the catalog to retrain an IVF/PQ index on rebuild
_REPLAY_BATCH = 10_000


def is_valid_id(value: object) -> bool:
    """Whether ``value`` is a well-formed image id (32 lowercase hex chars, as made by ``uuid4().hex``)."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def _check_id(value: object) -> str:
    """Return a well-formed id or raise; hostile strings never reach SQLite or the filesystem."""
    if isinstance(value, str) and _ID_RE.fullmatch(value):
        return value
    shown = repr(value) if not isinstance(value, str) or len(value) <= 48 else repr(value[:45] + "...")
    raise InvalidIdError(f"invalid image id {shown}: expected 32 lowercase hex characters")


@dataclass(frozen=True)
class NewImage:
    """An image to add, minus its vector (vectors travel as one (n, dim) array beside the list)."""

    sha256: str
    source: str | None
    width: int
    height: int
    nbytes: int
    metadata: dict[str, Any] = field(default_factory=dict)
    thumbnail: bytes | None = None


@dataclass(frozen=True)
class AddResult:
    """The id an added image got (or already had: ``created=False`` for known content)."""

    id: str
    created: bool


@dataclass(frozen=True)
class Hit:
    """One search result: the image id, its cosine score (inner product) and its record."""

    id: str
    score: float
    record: ImageRecord


class ImageStore:
    """SQLite catalog + FAISS index + manifest in one data directory. Use :meth:`open`."""

    def __init__(
        self,
        *,
        data_dir: Path,
        catalog: Catalog,
        vectors: VectorIndex,
        manifest: Manifest,
        lock: FileLock,
        read_only: bool,
        snapshot_every: int,
        seq_mark: int,
        del_mark: int,
        pending: int,
        whitening: Whitening | None = None,
        base: Generation | None = None,
    ) -> None:
        """Assemble an opened store (internal: call :meth:`open`)."""
        self._whitening = whitening
        self._base = base
        # Generations a replica could not load, as (number, sha256): not retried until the manifest names
        # another one (verifying a big generation is a full read of it).
        self._failed_generations: set[tuple[int, str]] = set()
        self._data_dir = data_dir
        self._catalog = catalog
        self._vectors = vectors
        self._manifest = manifest
        self._lock = lock
        self._read_only = read_only
        self._snapshot_every = snapshot_every
        self._seq_mark = seq_mark
        self._del_mark = del_mark
        self._added_since_snapshot = pending
        self._changes_since_snapshot = pending
        self._sync_lock = threading.RLock()
        self._index_lock = threading.RLock()
        self._closed = False

    # ================================================================== opening

    @staticmethod
    def read_manifest(data_dir: str | Path) -> Manifest | None:
        """Read a store's manifest without opening the store (e.g. to show or compare its fingerprint).

        Args:
            data_dir: The data directory.

        Returns:
            The manifest, or None when there is no store there yet.

        Raises:
            CorruptStoreError: The manifest exists but cannot be parsed.
        """
        return Manifest.load(Path(data_dir) / MANIFEST_FILE)

    @classmethod
    def open(
        cls,
        data_dir: str | Path,
        *,
        fingerprint: dict[str, Any],
        dim: int,
        index_factory: str | None = None,
        read_only: bool = False,
        snapshot_every: int = 1000,
        embedder_config: dict[str, Any] | None = None,
    ) -> ImageStore:
        """Open the store in ``data_dir``, creating it when absent.

        An existing store made by a different embedder is refused before anything is written. Then the
        catalog is integrity-checked, the FAISS snapshot loaded if its checksum matches (otherwise it is
        moved aside as ``vectors.faiss.corrupt-<ts>`` and rebuilt from the catalog) and reconciled with
        the catalog.

        Args:
            data_dir: Directory for the store (created when missing, unless read-only).
            fingerprint: The embedder's identity (JSON-able dict), compared with ``==`` to the stored one.
            dim: Vector dimension; must equal the stored one.
            index_factory: FAISS factory string for a new store (None means "Flat"). An existing store
                keeps the factory it was built with; a different value here only logs a warning, so the
                server and the indexer cannot fight over it.
            read_only: Refuse add/delete/snapshot; never write to the directory.
            snapshot_every: Write a snapshot automatically after this many vectors were added (0: only
                on :meth:`snapshot` and :meth:`close`).
            embedder_config: The options that made ``fingerprint`` (JSON-able), recorded in the
                manifest of a new store, and added atomically to the manifest of an older store that
                lacks them when opened for writing.

        Returns:
            The open store (also a context manager).

        Raises:
            IncompatibleIndexError: Different fingerprint or dim (the message names the keys).
            CorruptStoreError: The catalog fails ``quick_check`` or the manifest is unreadable.
            InvalidArgumentError: Bad ``dim``, ``snapshot_every``, fingerprint or factory string.
            StoreError: Read-only and there is no store in ``data_dir``.
        """
        data_dir = Path(data_dir)
        given_fp = normalize_fingerprint(fingerprint)
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise InvalidArgumentError(f"dim must be a positive integer, got {dim!r}")
        if not isinstance(snapshot_every, int) or isinstance(snapshot_every, bool) or snapshot_every < 0:
            raise InvalidArgumentError(f"snapshot_every must be an integer >= 0, got {snapshot_every!r}")
        if index_factory is not None and (not isinstance(index_factory, str) or not index_factory.strip()):
            raise InvalidArgumentError(f"index_factory must be a non-empty string, got {index_factory!r}")

        # Refuse a foreign store before creating or writing anything.
        manifest = cls.read_manifest(data_dir)
        if manifest is not None:
            _check_manifest(manifest, given_fp, dim)
        catalog_path = data_dir / CATALOG_FILE
        if read_only and manifest is None and not catalog_path.exists():
            raise StoreError(f"no store in {data_dir} (read-only open needs an existing store)")
        if not read_only:
            data_dir.mkdir(parents=True, exist_ok=True)
        # A replica verifies and maps the published generation before taking the lock: its files are
        # immutable, and a long checksum must not hold off the writer's snapshots.
        base = _open_generation(data_dir, manifest) if read_only and manifest is not None else None

        lock = FileLock(data_dir / LOCK_FILE, optional=read_only)
        catalog: Catalog | None = None
        try:
            with lock.hold(shared=read_only):
                # Re-read under the lock: another process may have just created or snapshotted it.
                manifest = cls.read_manifest(data_dir)
                if manifest is not None:
                    _check_manifest(manifest, given_fp, dim)
                catalog = Catalog(catalog_path, dim=dim, read_only=read_only)
                catalog.quick_check()
                auto = index_factory == "auto"
                manifest = _reconcile_identity(
                    catalog,
                    manifest,
                    given_fp,
                    dim,
                    None if auto else index_factory,
                    data_dir=data_dir,
                    read_only=read_only,
                    embedder_config=embedder_config,
                )
                store = cls._load_vectors(data_dir, catalog, manifest, lock, read_only, snapshot_every, base)
        except BaseException:
            if catalog is not None:
                catalog.close()
            lock.close()
            raise
        if not read_only and (index_factory == "auto" or store.manifest.extra.get("index_policy") == "auto"):
            store.apply_auto_index()
        published = store.manifest.generation
        if read_only and published is not None and store.generation != published:
            # Verified and refused above (logged): refresh() retries only once the manifest names another.
            store._failed_generations.add((published.number, published.sha256))
        logger.info(
            "opened store %s: %d vectors, dim %d, factory %s%s",
            data_dir,
            store.count,
            dim,
            manifest.index_factory,
            " (read-only)" if read_only else "",
        )
        return store

    @classmethod
    def _load_vectors(
        cls,
        data_dir: Path,
        catalog: Catalog,
        manifest: Manifest,
        lock: FileLock,
        read_only: bool,
        snapshot_every: int,
        base: Generation | None = None,
    ) -> ImageStore:
        """Load (or rebuild) FAISS and reconcile it with the catalog. Runs under the open-time lock."""
        factory = manifest.index_factory
        whitening = _load_whitening(data_dir, manifest)
        index_dim = whitening.d_out if whitening is not None else manifest.dim
        if base is not None and base.info.whitening == manifest.extra.get("whitening"):
            store = cls(
                data_dir=data_dir,
                catalog=catalog,
                vectors=VectorIndex.create(index_dim, "Flat"),
                manifest=manifest,
                lock=lock,
                read_only=read_only,
                snapshot_every=snapshot_every,
                seq_mark=0,
                del_mark=0,
                pending=0,
                whitening=whitening,
                base=base,
            )
            store._base, store._seq_mark, store._del_mark = store._replay_after(
                base, store._vectors, whitening
            )
            return store
        snap_path = data_dir / SNAPSHOT_FILE
        vectors: VectorIndex | None = None
        rebuilt = False
        if manifest.snapshot is not None:
            if manifest.snapshot.file != SNAPSHOT_FILE:
                # Never follow a path from the manifest: the snapshot has one fixed name.
                logger.warning("manifest names snapshot %r; using %s", manifest.snapshot.file, SNAPSHOT_FILE)
            try:
                vectors = VectorIndex.load(
                    snap_path, expected_sha256=manifest.snapshot.sha256, factory=factory
                )
                if vectors.dim != index_dim:
                    raise CorruptStoreError(f"snapshot has dim {vectors.dim}, the index needs {index_dim}")
            except CorruptStoreError as exc:
                vectors = None
                rebuilt = True
                logger.warning("snapshot unusable (%s); rebuilding the index from the catalog", exc)
                if not read_only and snap_path.exists():
                    aside = (
                        data_dir / f"{SNAPSHOT_FILE}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
                    )
                    os.replace(snap_path, aside)
                    logger.warning("moved the bad snapshot to %s", aside.name)
        if vectors is None:
            vectors = VectorIndex.create(index_dim, factory)

        def project(x: np.ndarray) -> np.ndarray:
            return whitening.apply(x) if whitening is not None else x

        # One consistent read: the live seqs and the watermarks they correspond to.
        max_seq, del_rowid, live = catalog.state()
        held = vectors.ids()
        extra = np.setdiff1d(held, live, assume_unique=True)
        missing = np.setdiff1d(live, held, assume_unique=True)
        if extra.size:
            vectors.remove(extra)
        if missing.size:
            if not vectors.is_trained:
                sample = [
                    v
                    for _, v in catalog.vectors_for_seqs(
                        missing[:_TRAIN_SAMPLE].tolist(), batch=_REPLAY_BATCH
                    )
                ]
                if sample:
                    vectors.train(project(np.concatenate(sample)))
            for seqs, vecs in catalog.vectors_for_seqs(missing.tolist(), batch=_REPLAY_BATCH):
                vectors.add(seqs, project(vecs))
        if extra.size or missing.size:
            logger.info(
                "reconciled the index with the catalog: removed %d, added %d",
                int(extra.size),
                int(missing.size),
            )
        store = cls(
            data_dir=data_dir,
            catalog=catalog,
            vectors=vectors,
            manifest=manifest,
            lock=lock,
            read_only=read_only,
            snapshot_every=snapshot_every,
            seq_mark=max_seq,
            del_mark=del_rowid,
            pending=int(extra.size + missing.size),
            whitening=whitening,
        )
        if not read_only and (rebuilt or (manifest.snapshot is None and vectors.ntotal)):
            # A rebuild is expensive: persist it now rather than at close.
            store._write_snapshot()
        return store

    # ================================================================== properties

    @property
    def data_dir(self) -> Path:
        """The data directory."""
        return self._data_dir

    @property
    def count(self) -> int:
        """Vectors searchable by this instance (the catalog count after :meth:`refresh`; on a replica
        serving a generation, short by the rows deleted while that generation was being built)."""
        base = self._base
        return self._vectors.ntotal + (base.visible if base is not None else 0)

    @property
    def generation(self) -> GenerationInfo | None:
        """The published generation this instance searches (replicas only; None otherwise)."""
        return self._base.info if self._base is not None else None

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return self._manifest.dim

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The embedder fingerprint this store was built with (a copy)."""
        return normalize_fingerprint(self._manifest.fingerprint)

    @property
    def index_factory(self) -> str:
        """The FAISS factory string in use."""
        return self._manifest.index_factory

    @property
    def manifest(self) -> Manifest:
        """The manifest as last read or written by this instance."""
        return self._manifest

    @property
    def read_only(self) -> bool:
        """Whether writes are refused."""
        return self._read_only

    # ================================================================== guards

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the store is closed")

    def _check_writable(self, action: str) -> None:
        self._check_open()
        if self._read_only:
            raise ReadOnlyStoreError(f"cannot {action}: the store at {self._data_dir} is open read-only")

    def _check_vectors(self, vectors: np.ndarray, what: str) -> np.ndarray:
        arr = np.asarray(vectors)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise InvalidVectorError(f"{what} must have shape (n, {self.dim}), got {arr.shape}")
        if arr.dtype not in (np.float32, np.float64):
            raise InvalidVectorError(f"{what} must be float32 (float64 is cast), got dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        finite = np.isfinite(arr).all(axis=1)
        if not finite.all():
            raise InvalidVectorError(
                f"{what} contain NaN or infinite values (row {int(np.flatnonzero(~finite)[0])})"
            )
        return arr

    # ================================================================== sync with the catalog

    def _sync(self, *, atomic: bool) -> int:
        """Apply catalog changes after the watermarks to FAISS; the only place FAISS is mutated.

        Args:
            atomic: Apply all new rows in one locked FAISS add (used after :meth:`add`, so a search
                never sees part of the batch); otherwise chunk by chunk (bounded memory for a big
                catch-up).

        Returns:
            Number of vectors added plus removed.
        """
        with self._sync_lock:
            marks = self._catalog.watermarks()
            if marks == (self._seq_mark, self._del_mark):
                return 0
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

            added = 0
            chunks = self._catalog.iter_vectors(after_seq=self._seq_mark, batch=_REPLAY_BATCH)
            if atomic:
                parts = list(chunks)
                if parts:
                    seqs = np.concatenate([p[0] for p in parts])
                    vecs = np.concatenate([p[1] for p in parts])
                    with self._index_lock:
                        self._vectors.add(seqs, self._project(vecs))
                    self._seq_mark = int(seqs[-1])
                    added = int(seqs.size)
            else:
                for seqs, vecs in chunks:
                    with self._index_lock:
                        self._vectors.add(seqs, self._project(vecs))
                    self._seq_mark = int(seqs[-1])
                    added += int(seqs.size)
            # Every row with seq <= marks[0] was either read above or deleted before it could be, so the
            # watermark may jump past rows deleted unseen (seqs are never reused).
            self._seq_mark = max(self._seq_mark, marks[0])
            self._added_since_snapshot += added
            self._changes_since_snapshot += added + removed
            if added or removed:
                logger.debug("synced with the catalog: +%d -%d", added, removed)
            return added + removed

    def refresh(self) -> int:
        """Catch up with rows added or deleted by other processes since the last sync.

        Cheap when nothing changed (one small query on ``sqlite_sequence``).

        Returns:
            Number of vectors added plus removed.

        Raises:
            StoreError: The store is closed.
        """
        self._check_open()
        on_disk = Manifest.load(self._data_dir / MANIFEST_FILE)
        if self._read_only and on_disk is not None and self._wants_generation(on_disk.generation):
            switched = self._switch_generation(on_disk)
            if switched is not None:
                return switched
        if self._base is not None:
            # A replica on a generation: only a whitening change makes it stale (the writer's index type
            # does not matter to it).
            changed = on_disk is not None and on_disk.extra.get("whitening") != self._base.info.whitening
        else:
            changed = on_disk is not None and _layout(on_disk) != _layout(self._manifest)
        if changed and on_disk is not None:
            # Another process changed the whitening or the index type: rebuild from the catalog.
            with self._sync_lock:
                if self._base is not None:
                    logger.warning(
                        "generation %d was built with another whitening; serving from memory until the "
                        "next build-index",
                        self._base.info.number,
                    )
                self._manifest = on_disk
                self._rebuild(_load_whitening(self._data_dir, on_disk))
            return self.count
        return self._sync(atomic=False)

    # ================================================================== generations (replicas)

    def _wants_generation(self, info: GenerationInfo | None) -> bool:
        """Whether the manifest names a generation this replica should switch to."""
        if info is None or (info.number, info.sha256) in self._failed_generations:
            return False
        return self._base is None or info.number != self._base.info.number

    def _replay_after(
        self, base: Generation, delta: VectorIndex, whitening: Whitening | None
    ) -> tuple[Generation, int, int]:
        """Fill a delta nobody searches yet with the catalog's rows after ``base``'s watermarks and hide
        the rows deleted after it; returns ``(base with hidden rows, seq_mark, del_mark)``.

        Same order as :meth:`_sync` (watermarks, then tombstones, then rows), so a row added or deleted
        meanwhile is picked up by the next sync, never lost nor applied twice.
        """
        marks = self._catalog.watermarks()
        deleted, del_mark = self._catalog.deleted_since(base.info.deletions_rowid)
        base = base.hide(deleted)
        seq_mark = base.info.max_seq
        for seqs, vecs in self._catalog.iter_vectors(after_seq=seq_mark, batch=_REPLAY_BATCH):
            delta.add(seqs, whitening.apply(vecs) if whitening is not None else vecs)
            seq_mark = int(seqs[-1])
        return base, max(seq_mark, marks[0]), del_mark

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
                whitening = _load_whitening(self._data_dir, on_disk)
            except CorruptStoreError as exc:
                logger.error("cannot use generation %d: %s", info.number, exc)
                self._failed_generations.add((info.number, info.sha256))
                return None
            delta = VectorIndex.create(base.info.dim, "Flat")
            base, seq_mark, del_mark = self._replay_after(base, delta, whitening)
            with self._index_lock:
                old = self._base
                self._vectors, self._base, self._whitening = delta, base, whitening
                self._seq_mark, self._del_mark = seq_mark, del_mark
                self._manifest = on_disk
            logger.info(
                "now serving generation %d (%d vectors, %s) + %d newer rows (was %s)",
                info.number,
                base.visible,
                info.factory,
                delta.ntotal,
                f"generation {old.info.number}" if old is not None else "the in-memory index",
            )
            return self.count

    # ================================================================== whitening

    def _project(self, vectors: np.ndarray) -> np.ndarray:
        return self._whitening.apply(vectors) if self._whitening is not None else vectors

    @property
    def whitening(self) -> Whitening | None:
        """The PCA-whitening applied to stored vectors and queries, if any."""
        return self._whitening

    @property
    def index_dim(self) -> int:
        """Dimension of the vectors in FAISS (the whitening's output, else ``dim``)."""
        return self._whitening.d_out if self._whitening is not None else self.dim

    def _rebuild(self, whitening: Whitening | None) -> None:
        """Rebuild FAISS from the raw vectors in the catalog through ``whitening`` (no re-embedding)."""
        with self._sync_lock:
            max_seq, del_rowid, live = self._catalog.state()
            fresh = VectorIndex.create(
                whitening.d_out if whitening is not None else self.dim, self.index_factory
            )
            project = whitening.apply if whitening is not None else (lambda x: x)
            if not fresh.is_trained and live.size:
                sample = [
                    v
                    for _, v in self._catalog.vectors_for_seqs(
                        live[:_TRAIN_SAMPLE].tolist(), batch=_REPLAY_BATCH
                    )
                ]
                fresh.train(project(np.concatenate(sample)))
            for seqs, vecs in self._catalog.vectors_for_seqs(live.tolist(), batch=_REPLAY_BATCH):
                fresh.add(seqs, project(vecs))
            with self._index_lock:
                self._vectors = fresh
                self._whitening = whitening
                self._base = None  # a replica's generation was built with the previous layout
                self._seq_mark, self._del_mark = max_seq, del_rowid
            self._changes_since_snapshot += int(live.size)

    def apply_auto_index(self, *, memory_budget_bytes: int | None = None) -> str:
        """``index_factory="auto"``: pick the index type for the current collection size
        (:func:`index.choose.choose_factory`) and rebuild from the catalog when it changed.

        Called at open for stores created with "auto"; as a collection grows past a threshold, the next
        open (or an explicit call) moves it from Flat to HNSW to IVF. Returns the factory in use.
        """
        self._check_writable("change the index type")
        from deepfeat.index.choose import choose_factory

        desired = choose_factory(
            max(1, self._catalog.count()), self.index_dim, memory_budget_bytes=memory_budget_bytes
        )
        if desired == self.index_factory and self._manifest.extra.get("index_policy") == "auto":
            return desired
        with self._sync_lock:
            extra = {**self._manifest.extra, "index_policy": "auto"}
            self._manifest = replace(self._manifest, index_factory=desired, extra=extra)
            if desired != self._vectors.factory:
                logger.info(
                    "auto index: %d vectors -> %s (rebuilding from the catalog)",
                    self._catalog.count(),
                    desired,
                )
                self._rebuild(self._whitening)
            self._write_snapshot(whitening_changed=True)
        return desired

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
        if whitening is not None and whitening.d_in != self.dim:
            raise InvalidArgumentError(
                f"whitening expects {whitening.d_in}-d vectors, the store holds {self.dim}-d"
            )
        with self._sync_lock, self._lock.hold():
            entry: dict[str, Any] | None = None
            if whitening is not None:
                data = whitening.to_bytes()
                sha = hashlib.sha256(data).hexdigest()
                name = f"whitening-{sha[:16]}.faiss"
                whitening.save(self._data_dir / name)
                entry = {"file": name, "sha256": sha, "d_in": whitening.d_in, "d_out": whitening.d_out}
            self._rebuild(whitening)
            extra = {k: v for k, v in self._manifest.extra.items() if k != "whitening"}
            if entry is not None:
                extra["whitening"] = entry
            self._manifest = replace(self._manifest, extra=extra)
            self._write_snapshot(whitening_changed=True)
            keep = entry["file"] if entry is not None else None
            for old in self._data_dir.glob("whitening-*.faiss"):
                if old.name != keep:
                    old.unlink(missing_ok=True)
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
        _, _, live = self._catalog.state()
        if live.size > sample:
            live = np.sort(np.random.default_rng(seed).choice(live, size=sample, replace=False))
        parts = [v for _, v in self._catalog.vectors_for_seqs(live.tolist(), batch=_REPLAY_BATCH)]
        if not parts:
            raise InvalidArgumentError("cannot fit a whitening on an empty store")
        whitening = Whitening.fit(np.concatenate(parts), dim=dim)
        self.set_whitening(whitening)
        return whitening

    # ================================================================== writes

    def find_existing(self, sha256s: Sequence[str]) -> dict[str, str]:
        """Which contents are already stored, so the indexer can skip embedding them.

        Args:
            sha256s: Content hashes (lowercase hex).

        Returns:
            ``{sha256: id}`` for the known ones.
        """
        self._check_open()
        return self._catalog.find_sha256(sha256s)

    def known_sha256(self) -> set[str]:
        """Every stored content hash, so a batch indexer can skip known files before decoding them."""
        self._check_open()
        return self._catalog.all_sha256()

    def add(self, vectors: np.ndarray, images: Sequence[NewImage]) -> list[AddResult]:
        """Add images with their vectors.

        The catalog transaction commits first (that is the acknowledgement), then FAISS gets the created
        rows under the index lock. Content already stored (same sha256, in the catalog or earlier in
        this batch) gets its existing id back with ``created=False`` and no new vector. If anything
        fails before the commit, nothing is stored anywhere.

        Args:
            vectors: (n, dim) float32 (float64 is cast), finite; row i belongs to ``images[i]``. The
                store never re-normalises: pass L2-normalised vectors to get cosine scores.
            images: n descriptions.

        Returns:
            One result per image, in order.

        Raises:
            InvalidVectorError: Wrong shape/dtype/dim, NaN/inf, or n != len(images).
            InvalidArgumentError: Malformed sha256, metadata not JSON, bad sizes.
            StoreFullError: No space left (rolled back).
            ReadOnlyStoreError: Opened read-only.
            StoreError: An untrained IVF/PQ index and too few vectors to train it.
        """
        self._check_writable("add images")
        x = self._check_vectors(vectors, "vectors")
        if x.shape[0] != len(images):
            raise InvalidVectorError(f"got {x.shape[0]} vectors for {len(images)} images; they must match")
        if not images:
            return []
        for i, image in enumerate(images):
            if not isinstance(image, NewImage):
                raise InvalidArgumentError(f"images[{i}] must be a NewImage, got {type(image).__name__}")
        rows = [
            CatalogRow(
                sha256=img.sha256,
                source=img.source,
                width=img.width,
                height=img.height,
                nbytes=img.nbytes,
                vector=x[i],
                metadata=img.metadata,
                thumbnail=img.thumbnail,
            )
            for i, img in enumerate(images)
        ]
        if not self._vectors.is_trained:
            # Train before the commit: a training failure must not leave committed-but-unindexable rows.
            with self._sync_lock, self._index_lock:
                if not self._vectors.is_trained:
                    self._vectors.train(x)
        results = self._catalog.insert_many(rows)
        if any(r.created for r in results):
            self._sync(atomic=True)
        self._maybe_auto_snapshot()
        return [AddResult(r.id, r.created) for r in results]

    def delete(self, id: str) -> None:
        """Delete an image: catalog row (with a tombstone for other processes) then its FAISS vector.

        Args:
            id: Public image id.

        Raises:
            InvalidIdError: Not a well-formed id (a subclass of NotFoundError).
            NotFoundError: No such image.
            ReadOnlyStoreError: Opened read-only.
            StoreFullError: No space for the tombstone (nothing deleted).
        """
        image_id = _check_id(id)
        self._check_writable("delete images")
        if self._catalog.delete(image_id) is None:
            raise NotFoundError(f"no image with id {image_id!r}")
        self._sync(atomic=False)

    def _maybe_auto_snapshot(self) -> None:
        if self._snapshot_every and self._added_since_snapshot >= self._snapshot_every:
            try:
                self.snapshot()
            except StoreError:
                # The add itself is committed and indexed; a snapshot is an optimisation for restart.
                logger.exception("automatic snapshot failed; will retry after more adds or at close")

    def snapshot(self) -> None:
        """Write ``vectors.faiss`` and the manifest atomically, under the process lock.

        Catches up with the catalog first, so a lagging process never replaces a newer snapshot with an
        older state.

        Raises:
            ReadOnlyStoreError: Opened read-only.
            StoreFullError: No space left (the previous snapshot and manifest stay in place).
        """
        self._check_writable("write a snapshot")
        with self._sync_lock:
            self._sync(atomic=False)
            self._write_snapshot()

    def _write_snapshot(self, *, whitening_changed: bool = False) -> None:
        """``whitening_changed``: this process just changed what the vectors in FAISS are (whitening or
        index type), so its manifest is authoritative; otherwise the manifest on disk is the base."""
        with self._sync_lock, self._lock.hold():
            on_disk = Manifest.load(self._data_dir / MANIFEST_FILE)
            if not whitening_changed and on_disk is not None and _layout(on_disk) != _layout(self._manifest):
                # Another process re-whitened or re-indexed the store; our vectors are stale. refresh() rebuilds.
                logger.info(
                    "skipping snapshot: the index layout changed on disk since this process loaded it"
                )
                return
            remove_stale_temps(self._data_dir, SNAPSHOT_FILE)
            remove_stale_temps(self._data_dir, MANIFEST_FILE)
            path = self._data_dir / SNAPSHOT_FILE
            # No index lock: nothing mutates FAISS without the sync lock, and searches only read it.
            sha = self._vectors.save(path)
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
            self._manifest = manifest
            self._added_since_snapshot = 0
            self._changes_since_snapshot = 0
            logger.info("snapshot written: %d vectors, sha256 %s", info.count, sha[:12])

    # ================================================================== reads

    def get(self, id: str) -> ImageRecord:
        """One image's record.

        Args:
            id: Public image id.

        Returns:
            The record.

        Raises:
            InvalidIdError: Not a well-formed id (a subclass of NotFoundError; never reaches SQLite).
            NotFoundError: No such image.
        """
        image_id = _check_id(id)
        self._check_open()
        record = self._catalog.get(image_id)
        if record is None:
            raise NotFoundError(f"no image with id {image_id!r}")
        return record

    def thumbnail(self, id: str) -> bytes:
        """The JPEG thumbnail given at add time.

        Args:
            id: Public image id.

        Returns:
            The bytes as given.

        Raises:
            InvalidIdError: Not a well-formed id.
            NotFoundError: No such image, or it was added without a thumbnail.
        """
        image_id = _check_id(id)
        self._check_open()
        data = self._catalog.thumbnail(image_id)
        if data is None:
            if self._catalog.get(image_id) is None:
                raise NotFoundError(f"no image with id {image_id!r}")
            raise NotFoundError(f"image {image_id!r} has no thumbnail")
        return data

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Nearest images by inner product (cosine for L2-normalised vectors), best first.

        Args:
            queries: (m, dim) float32 (float64 is cast), finite. Not re-normalised.
            k: Hits per query, >= 1; more than the store holds just returns fewer.

        Returns:
            m lists of hits (empty lists for an empty store).

        Raises:
            InvalidArgumentError: ``k`` is not an integer >= 1.
            InvalidVectorError: Bad query shape/dtype/values.
        """
        self._check_open()
        if not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 1:
            raise InvalidArgumentError(f"k must be an integer >= 1, got {k!r}")
        q = self._check_vectors(queries, "queries")
        scores, ids = self._search_index(q, int(k))  # (m, k') each, k' <= k
        found = ids[ids >= 0]
        records = self._catalog.get_many_by_seq(np.unique(found).tolist()) if found.size else {}
        results: list[list[Hit]] = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            hits: list[Hit] = []
            for score, seq in zip(row_scores.tolist(), row_ids.tolist(), strict=True):
                if seq < 0:
                    continue
                record = records.get(seq)
                if record is None:
                    logger.debug("dropping hit seq %d: deleted after the FAISS search", seq)
                    continue
                hits.append(Hit(id=record.id, score=float(score), record=record))
            results.append(hits)
        return results

    def _search_index(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search of raw (unprojected) queries: the in-memory index, merged with the generation
        on a replica. The generation is immutable, so it is searched outside the index lock (searches
        run concurrently on it) through the reference taken with the delta, which keeps the pair
        consistent across a generation switch."""
        with self._index_lock:
            q = self._project(queries)
            scores, ids = self._vectors.search(q, k)
            base = self._base
        if base is not None:
            if base.index.exact_scores:
                shortlist = base.search(q, k)
            else:
                shortlist = self._rerank(q, *base.search(q, k * RERANK_FACTOR), k)
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
        wanted = np.unique(ids[ids >= 0])
        if not wanted.size:
            return merge_top_k([(scores, ids)], k)
        seq_parts, vec_parts = [], []
        for seqs, vectors in self._catalog.vectors_for_seqs(wanted.tolist()):
            seq_parts.append(seqs)
            vec_parts.append(self._project(vectors))
        if not seq_parts:
            return merge_top_k([(scores, np.full_like(ids, -1))], k)
        # Sorted already: ``wanted`` is sorted and each chunk comes back ORDER BY seq.
        known, matrix = np.concatenate(seq_parts), np.concatenate(vec_parts)
        pos = np.searchsorted(known, ids).clip(0, known.size - 1)
        valid = (ids >= 0) & (known[pos] == ids)
        exact = np.einsum("md,mkd->mk", queries, matrix[pos]).astype(np.float32)
        return merge_top_k([(exact, np.where(valid, ids, -1))], k)

    def vectors_by_sha256(self, sha256s: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored vectors of known contents, as they were added (before any whitening), so other
        tools (training a classifier) reuse the index's work instead of embedding the files again.

        Args:
            sha256s: Content hashes (lowercase hex); unknown ones are simply absent from the result.

        Returns:
            ``{sha256: (dim,) float32 vector}``.
        """
        self._check_open()
        wanted = list(dict.fromkeys(s for s in sha256s if isinstance(s, str)))
        with self._catalog._read("looking up hashes") as conn:
            found = self._catalog._lookup_sha(conn, wanted)
        sha_by_seq = {seq: sha for sha, (_, seq) in found.items()}
        out: dict[str, np.ndarray] = {}
        for seqs, vectors in self._catalog.vectors_for_seqs(list(sha_by_seq)):
            for seq, vector in zip(seqs.tolist(), vectors, strict=True):
                out[sha_by_seq[int(seq)]] = vector
        return out

    def metadata_value_counts(self, key: str) -> dict[str, int]:
        """How many images carry each value of a top-level metadata key (e.g. ``label`` for kNN
        classification); images without it, or with a non-string value, are not counted.

        Args:
            key: A metadata key (letters, digits, ``_`` and ``-``).

        Returns:
            ``{value: count}``.

        Raises:
            InvalidArgumentError: A key with other characters.
        """
        self._check_open()
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", key):
            raise InvalidArgumentError(f"metadata key must be 1-64 of [A-Za-z0-9_-], got {key!r}")
        path = f'$."{key}"'
        with self._catalog._read("counting metadata values") as conn:
            rows = conn.execute(
                "SELECT json_extract(metadata, ?) AS v, count(*) FROM images "
                "WHERE json_type(metadata, ?) = 'text' GROUP BY v",
                (path, path),
            ).fetchall()
        return {str(value): int(count) for value, count in rows}

    def stats(self) -> dict[str, Any]:
        """A summary for health checks and the CLI.

        Returns:
            ``count`` (catalog rows), ``indexed`` (searchable vectors), ``dim``, ``metric``,
            ``index_factory``, ``fingerprint``, ``snapshot`` (manifest snapshot info or None),
            ``unsnapshotted_changes``, ``read_only``, ``data_dir``, and ``generation``: on a replica
            serving one, its ``number``, ``factory``, ``count``, ``max_seq``, ``hidden`` (rows deleted
            since) and ``delta`` (rows added since, searched exactly), else None.
        """
        self._check_open()
        snap = self._manifest.snapshot
        base = self._base
        return {
            "count": self._catalog.count(),
            "indexed": self._vectors.ntotal,
            "dim": self.dim,
            "metric": self._manifest.metric,
            "index_factory": self.index_factory if base is None else base.info.factory,
            "fingerprint": self.fingerprint,
            "snapshot": None if snap is None else asdict(snap),
            "unsnapshotted_changes": self._changes_since_snapshot,
            "whitening": self._manifest.extra.get("whitening"),
            "index_dim": self.index_dim,
            "read_only": self._read_only,
            "data_dir": str(self._data_dir),
            "generation": None
            if base is None
            else {
                "number": base.info.number,
                "factory": base.info.factory,
                "count": base.info.count,
                "max_seq": base.info.max_seq,
                "hidden": int(base.hidden.size),
                "delta": self._vectors.ntotal,
            },
        }

    def near_duplicates(self, threshold: float, *, k: int = 10, batch: int = 1024) -> list[list[ImageRecord]]:
        """Groups of near-identical images, found with the index itself (k-NN per stored vector),
        never an all-pairs matrix: cost n * one search, memory O(n).

        Two images are linked when either is among the other's k nearest with cosine >= ``threshold``;
        groups are the connected components (so A~B~C groups all three), largest first.

        Args:
            threshold: Cosine similarity in (0, 1]; 0.95+ finds re-encodes and resizes.
            k: Neighbours examined per image (bounds the size a group can be discovered at).
            batch: Vectors searched per call.
        """
        self._check_open()
        if not 0.0 < threshold <= 1.0:
            raise InvalidArgumentError(f"threshold must be in (0, 1], got {threshold}")
        parent: dict[int, int] = {}

        def find(a: int) -> int:
            parent.setdefault(a, a)
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        for seqs, vecs in self._catalog.iter_vectors(batch=batch):
            scores, ids = self._search_index(vecs, k + 1)
            for seq, row_scores, row_ids in zip(seqs.tolist(), scores, ids, strict=True):
                for score, other in zip(row_scores.tolist(), row_ids.tolist(), strict=True):
                    if other >= 0 and other != seq and score >= threshold:
                        parent[find(seq)] = find(other)
        groups: dict[int, list[int]] = {}
        for seq in parent:
            groups.setdefault(find(seq), []).append(seq)
        members = [sorted(g) for g in groups.values() if len(g) > 1]
        records = self._catalog.get_many_by_seq([seq for g in members for seq in g]) if members else {}
        out = [[records[seq] for seq in g if seq in records] for g in members]
        return sorted((g for g in out if len(g) > 1), key=lambda g: (-len(g), g[0].added_at))

    # ================================================================== lifecycle

    def close(self) -> None:
        """Snapshot if there are unsaved changes, then close connections and the lock file. Idempotent.

        A failing final snapshot is logged, not raised: every change is already committed in SQLite
        and the next open replays it.
        """
        if self._closed:
            return
        try:
            if not self._read_only and self._changes_since_snapshot:
                try:
                    self.snapshot()
                except (StoreError, OSError):
                    logger.exception("final snapshot failed; the next open will replay from the catalog")
        finally:
            self._closed = True
            self._base = None  # unmaps the generation once no search holds it
            self._catalog.close()
            self._lock.close()

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ImageStore({str(self._data_dir)!r}, count={self.count}, factory={self.index_factory!r})"


# ====================================================================== helpers for open()


RERANK_FACTOR = 10
"""A replica asks a compressed generation for this many candidates per wanted hit and re-scores them
exactly (:meth:`ImageStore._rerank`)."""


def _check_manifest(manifest: Manifest, given_fp: dict[str, Any], dim: int) -> None:
    check_compatible(manifest.fingerprint, given_fp)
    if manifest.dim != dim:
        raise IncompatibleIndexError(
            f"dimension mismatch: stored dim={manifest.dim} given dim={dim}",
            differences={"dim": (manifest.dim, dim)},
        )
    if manifest.metric != "ip":
        raise IncompatibleIndexError(
            f"unsupported metric {manifest.metric!r} (only 'ip')",
            differences={"metric": (manifest.metric, "ip")},
        )


def _reconcile_identity(
    catalog: Catalog,
    manifest: Manifest | None,
    given_fp: dict[str, Any],
    dim: int,
    index_factory: str | None,
    *,
    data_dir: Path,
    read_only: bool,
    embedder_config: dict[str, Any] | None,
) -> Manifest:
    """Make the manifest and the catalog's ``meta`` agree on the store's identity; create a new store.

    The identity is kept in both places so a lost manifest (crash between creating the catalog and
    writing it) can be regenerated instead of leaving an unverifiable catalog.
    """
    stored_fp_text = catalog.get_meta("fingerprint")
    stored_fp = json.loads(stored_fp_text) if stored_fp_text else None
    if manifest is not None:
        if stored_fp is not None and normalize_fingerprint(stored_fp) != normalize_fingerprint(
            manifest.fingerprint
        ):
            raise CorruptStoreError("manifest.json and the catalog disagree on the embedder fingerprint")
        if stored_fp is None and not read_only:
            catalog.set_meta("fingerprint", json.dumps(manifest.fingerprint, sort_keys=True))
            catalog.set_meta("dim", str(manifest.dim))
            catalog.set_meta("index_factory", manifest.index_factory)
        if index_factory is not None and index_factory != manifest.index_factory:
            logger.warning(
                "store %s was built with index_factory %r; ignoring the requested %r (rebuild to change it)",
                data_dir,
                manifest.index_factory,
                index_factory,
            )
        if manifest.embedder is None and embedder_config is not None and not read_only:
            manifest = replace(manifest, embedder=normalize_fingerprint(embedder_config))
            manifest.save(data_dir / MANIFEST_FILE)
            logger.info("recorded the embedder options in the manifest of %s", data_dir)
        return manifest

    now = time.time()
    if stored_fp is not None:
        # Catalog without manifest: verify against the catalog's copy, then regenerate the manifest.
        stored_dim = int(catalog.get_meta("dim") or dim)
        manifest = Manifest(
            fingerprint=stored_fp,
            dim=stored_dim,
            index_factory=catalog.get_meta("index_factory") or "Flat",
            embedder=None if embedder_config is None else normalize_fingerprint(embedder_config),
            created_at=now,
            updated_at=now,
            count=catalog.count(),
        )
        _check_manifest(manifest, given_fp, dim)
        logger.warning("manifest missing in %s; regenerating it from the catalog", data_dir)
    else:
        if read_only:
            raise StoreError(
                f"no store in {data_dir}: the catalog has no identity and the store is read-only"
            )
        factory = index_factory or "Flat"
        VectorIndex.create(dim, factory)  # validate the factory string before persisting it
        catalog.set_meta("fingerprint", json.dumps(given_fp, sort_keys=True))
        catalog.set_meta("dim", str(dim))
        catalog.set_meta("index_factory", factory)
        manifest = Manifest(
            fingerprint=given_fp,
            dim=dim,
            index_factory=factory,
            embedder=None if embedder_config is None else normalize_fingerprint(embedder_config),
            created_at=now,
            updated_at=now,
            count=0,
        )
        logger.info("created a new store in %s (dim %d, factory %s)", data_dir, dim, factory)
    if not read_only:
        manifest.save(data_dir / MANIFEST_FILE)
    return manifest


def _open_generation(data_dir: Path, manifest: Manifest) -> Generation | None:
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


def _load_whitening(data_dir: Path, manifest: Manifest) -> Whitening | None:
    """The whitening the manifest names, verified against its checksum (never a path from the file)."""
    return Whitening.load_recorded(data_dir, manifest.extra.get("whitening"))


def _layout(manifest: Manifest) -> tuple[Any, str]:
    """What the vectors in FAISS are: the whitening applied and the index type."""
    return manifest.extra.get("whitening"), manifest.index_factory
