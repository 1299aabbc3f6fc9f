"""``ImageStore``: the facade the API and the batch indexer use (add / get / delete / search).

A data directory holds (names in :mod:`index.files`):

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

The store is assembled from parts, each in its own module:

* :mod:`index.opening`: open, identity checks, loading and reconciling the snapshot;
* :mod:`index.sync`: how FAISS stays equal to the catalog (the watermark replay) and the snapshot;
* :mod:`index.replica`: a replica's generation + delta, the exact re-rank, switching generations;
* :mod:`index.relayout`: whitening and ``auto`` index-type changes, rebuilt from the catalog;
* :mod:`index.duplicates`: near-duplicate groups;
* :mod:`index.semantic`: the semantic vectors (``similarity="semantic"``), an exact in-memory index
  rebuilt from the catalog at open (n x d_s x 4 bytes), caught up by the same replay.

Locks inside a process: ``_sync_lock`` (RLock) serialises everything that mutates FAISS or the
watermarks; ``_index_lock`` (RLock) is held for each FAISS mutation and each FAISS search, so a search
never sees half of an added batch. Catalog reads for a search happen outside both locks; a hit whose
record was deleted in between is dropped (never returned without its record). A replica's generation
is immutable and searched outside the index lock, through the reference taken with the delta under it.
Order: ``_sync_lock``, then ``_index_lock`` or the file lock (``.lock``, which guards snapshot and
manifest writes between processes); only :meth:`ImageStore.open` takes the file lock first, before any
other thread can see the store.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from deepfeat.index import duplicates
from deepfeat.index._fs import FileLock, check_local_filesystem, lock_timeout
from deepfeat.index.catalog import Catalog, ExportedImage, ImageRecord, NewImage
from deepfeat.index.errors import (
    IncompatibleIndexError,
    InvalidArgumentError,
    InvalidIdError,
    InvalidVectorError,
    NotFoundError,
    SemanticUnavailableError,
    StoreError,
    StoreLockedError,
)
from deepfeat.index.files import CATALOG_FILE, LOCK_FILE, MANIFEST_FILE, SNAPSHOT_FILE
from deepfeat.index.filters import Filter
from deepfeat.index.generations import merge_top_k
from deepfeat.index.ids import MAX_VECTORS_PER_IMAGE, aggregate, all_vector_ids, vector_ids
from deepfeat.index.manifest import GenerationInfo, Manifest, normalize_fingerprint
from deepfeat.index.opening import LoadedIndex, adopt_semantic, open_store
from deepfeat.index.relayout import RelayoutMixin
from deepfeat.index.replica import ReplicaMixin
from deepfeat.index.semantic import SemanticIndex
from deepfeat.index.vectors import check_k

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
    "SIMILARITIES",
    "lock_timeout",
]

logger = logging.getLogger(__name__)

_ID_RE = re.compile(r"[0-9a-f]{32}")
EXACT_SCAN_BYTES = 4 << 20
"""On an approximate index, a filter whose matching vectors fit in this many bytes is answered by an
exact scan of them, read from the catalog (about 3 us a vector: 8k vectors of 128 floats in ~25 ms),
rather than by the index with its selector (``deepfeat bench filter``)."""
_SCAN_CHUNK = 4096
"""Images read from the catalog per step of an exact scan."""

SIMILARITIES = ("visual", "semantic")
"""What :meth:`ImageStore.search` compares: the visual vectors or the semantic ones."""

_ADD_SEMANTIC_HINT = (
    "run `deepfeat add-semantic` on this data dir to compute them for the stored images "
    "(then restart the service)"
)


def _check_id(value: object) -> str:
    """Return a well-formed id or raise; hostile strings never reach SQLite or the filesystem."""
    if isinstance(value, str) and _ID_RE.fullmatch(value):
        return value
    shown = repr(value) if not isinstance(value, str) or len(value) <= 48 else repr(value[:45] + "...")
    raise InvalidIdError(f"invalid image id {shown}: expected 32 lowercase hex characters")


@dataclass(frozen=True)
class AddResult:
    """The id an added image got (or already had: ``created=False`` for known content)."""

    id: str
    created: bool


def _pad(scores: np.ndarray, ids: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Result arrays widened to ``width`` columns with empty slots (-inf, -1)."""
    extra = width - scores.shape[1]
    if extra <= 0:
        return scores, ids
    m = scores.shape[0]
    return (
        np.concatenate([scores, np.full((m, extra), -np.inf, np.float32)], axis=1),
        np.concatenate([ids, np.full((m, extra), -1, np.int64)], axis=1),
    )


@dataclass(frozen=True)
class Hit:
    """One search result: the image id, its cosine score (inner product) and its record."""

    id: str
    score: float
    record: ImageRecord


class ImageStore(ReplicaMixin, RelayoutMixin):
    """SQLite catalog + FAISS index + manifest in one data directory. Use :meth:`open`."""

    def __init__(
        self,
        *,
        data_dir: Path,
        catalog: Catalog,
        manifest: Manifest,
        lock: FileLock,
        read_only: bool,
        snapshot_every: int,
        loaded: LoadedIndex,
        semantic_dim: int | None = None,
    ) -> None:
        """Assemble an opened store (internal: call :meth:`open`)."""
        self._data_dir = data_dir
        self._catalog = catalog
        self._manifest = manifest
        self._lock = lock
        self._read_only = read_only
        self._snapshot_every = snapshot_every
        self._vectors = loaded.vectors
        self._base = loaded.base
        self._whitening = loaded.whitening
        self._seq_mark = loaded.seq_mark
        self._del_mark = loaded.del_mark
        self._added_since_snapshot = loaded.pending
        self._changes_since_snapshot = loaded.pending
        self._failed_generations = set(loaded.failed_generations)
        self._sync_lock = threading.RLock()
        self._index_lock = threading.RLock()
        self._closed = False
        self._semantic: SemanticIndex | None = None
        if semantic_dim is not None:
            recorded = catalog.semantic_dim()
            if recorded is not None and recorded != semantic_dim:
                raise IncompatibleIndexError(
                    f"semantic dimension mismatch: stored {recorded}, given {semantic_dim}",
                    differences={"semantic_dim": (recorded, semantic_dim)},
                )
            semantic = SemanticIndex(semantic_dim)
            # After the visual index is loaded and reconciled, at the same watermarks.
            semantic.fill(catalog, upto_seq=loaded.seq_mark, del_mark=loaded.del_mark)
            self._semantic = semantic

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
        semantic_dim: int | None = None,
        lock_timeout_s: float | None = None,
    ) -> ImageStore:
        """Open the store in ``data_dir``, creating it when absent.

        An existing store made by a different embedder is refused before anything is written. Then the
        catalog is integrity-checked, the FAISS snapshot loaded if its checksum matches (otherwise it is
        rebuilt from the catalog: an interrupted write is replaced, a damaged file quarantined) and
        reconciled with the catalog (the steps: :func:`index.opening.open_store`).

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
            semantic_dim: The embedder's semantic vector dimension (None: no semantic layer). With it,
                the store keeps an exact in-memory index of the semantic vectors (filled from the
                catalog now, n x semantic_dim x 4 bytes) for ``search(similarity="semantic")``.
            lock_timeout_s: How long this store waits for the data dir's lock while another process
                holds it, at this open and later (default 30 s, or the enclosing
                ``index._fs.lock_timeout``).

        Returns:
            The open store (also a context manager).

        Raises:
            IncompatibleIndexError: Different fingerprint or dim (the message names the keys).
            CorruptStoreError: The catalog fails ``quick_check`` or the manifest is unreadable.
            InvalidArgumentError: Bad ``dim``, ``snapshot_every``, fingerprint or factory string.
            NetworkFilesystemError: The data dir is on NFS, SMB or similar (a read-only open only while a
                writer has the store open: ``index._fs.check_local_filesystem``).
            StoreLockedError: Another process held the lock for longer than ``lock_timeout_s``.
            ReadOnlyFilesystemError, PermissionDeniedError: A writable open where this process cannot write.
            StoreError: Read-only and there is no store in ``data_dir``.
        """
        data_dir = Path(data_dir)
        if read_only:  # a writer's open checks this with the rest of the filesystem (check_writable)
            check_local_filesystem(data_dir, read_only=True)
        scope = contextlib.nullcontext() if lock_timeout_s is None else lock_timeout(lock_timeout_s)
        with scope:  # the open creates the store's FileLock, which keeps this timeout
            return open_store(
                cls,
                data_dir,
                fingerprint=fingerprint,
                dim=dim,
                index_factory=index_factory,
                read_only=read_only,
                snapshot_every=snapshot_every,
                embedder_config=embedder_config,
                semantic_dim=semantic_dim,
            )

    @staticmethod
    def adopt_semantic(
        data_dir: str | Path, *, fingerprint: dict[str, Any], embedder_config: dict[str, Any]
    ) -> bool:
        """Make a store written before semantic vectors keep them from now on (its fingerprint gains
        the ``"semantic"`` key); see :func:`index.opening.adopt_semantic`. Rows without one are then
        filled with :meth:`iter_missing_semantic` and :meth:`set_semantic`.

        Returns:
            Whether the store's identity changed.
        """
        return adopt_semantic(Path(data_dir), fingerprint=fingerprint, embedder_config=embedder_config)

    # ================================================================== properties

    @property
    def data_dir(self) -> Path:
        """The data directory."""
        return self._data_dir

    @property
    def count(self) -> int:
        """Images searchable by this instance (the catalog count after :meth:`refresh`; on a replica
        serving a generation, short by the rows deleted while that generation was being built)."""
        base = self._base
        return self._vectors.images + (base.visible if base is not None else 0)

    def committed_count(self) -> int:
        """Images the catalog holds: what survives a crash. An interrupt between an add's catalog
        commit and its index update leaves :attr:`count` short until the next open reconciles."""
        return self._catalog.count()

    @property
    def generation(self) -> GenerationInfo | None:
        """The published generation this instance searches (replicas only; None otherwise)."""
        return self._base.info if self._base is not None else None

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return self._manifest.dim

    @property
    def semantic_dim(self) -> int | None:
        """Dimension of the semantic vectors this instance keeps (None: opened without them)."""
        return None if self._semantic is None else self._semantic.dim

    @property
    def stored_semantic_dim(self) -> int | None:
        """Dimension of the semantic vectors the catalog holds (None: none), whatever this instance
        was opened with."""
        return self._catalog.semantic_dim()

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

    def _check_vectors(self, vectors: np.ndarray, what: str, *, per_image: bool = False) -> np.ndarray:
        arr = np.asarray(vectors)
        if (
            per_image
            and arr.ndim == 3
            and arr.shape[2] == self.dim
            and 1 <= arr.shape[1] <= MAX_VECTORS_PER_IMAGE
        ):
            pass  # (n, m, dim): each image's global vector, then its regional ones
        elif arr.ndim != 2 or arr.shape[1] != self.dim:
            shapes = f"(n, {self.dim}) or (n, m, {self.dim})" if per_image else f"(n, {self.dim})"
            raise InvalidVectorError(f"{what} must have shape {shapes}, got {arr.shape}")
        if arr.dtype not in (np.float32, np.float64):
            raise InvalidVectorError(f"{what} must be float32 (float64 is cast), got dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        finite = np.isfinite(arr).all(axis=tuple(range(1, arr.ndim)))
        if not finite.all():
            raise InvalidVectorError(
                f"{what} contain NaN or infinite values (row {int(np.flatnonzero(~finite)[0])})"
            )
        return arr

    def _check_semantic(self, vectors: np.ndarray, n: int) -> np.ndarray:
        dim = self.semantic_dim
        if dim is None:
            raise InvalidVectorError(
                "this store was opened without semantic vectors (semantic_dim=None); cannot store them"
            )
        arr = np.asarray(vectors)
        if arr.ndim != 2 or arr.shape != (n, dim):
            raise InvalidVectorError(f"semantic vectors must have shape ({n}, {dim}), got {arr.shape}")
        if arr.dtype not in (np.float32, np.float64) or not np.isfinite(arr).all():
            raise InvalidVectorError(f"semantic vectors must be finite float32, got dtype {arr.dtype}")
        return np.ascontiguousarray(arr, dtype=np.float32)

    # ================================================================== catching up

    def refresh(self) -> int:
        """Catch up with rows added or deleted by other processes since the last sync.

        Cheap when nothing changed (one small query on ``sqlite_sequence``). A replica switches to a
        newer published generation (:mod:`index.replica`); a store whose whitening or index type was
        changed by another process rebuilds from the catalog (:mod:`index.relayout`).

        Returns:
            Number of vectors added plus removed (after a rebuild: the vectors now searchable).

        Raises:
            StoreError: The store is closed.
        """
        self._check_open()
        on_disk = Manifest.load(self._data_dir / MANIFEST_FILE)
        if on_disk is not None:
            if self._read_only and self._wants_generation(on_disk.generation):
                switched = self._switch_generation(on_disk)
                if switched is not None:
                    return switched
            if self._layout_stale(on_disk):
                self._adopt_layout(on_disk)
                return self.count
        return self._sync(atomic=False)

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

    def known_sha256(self, *, with_semantic: bool = False) -> set[str]:
        """Every stored content hash, so a batch indexer can skip known files before decoding them.

        Args:
            with_semantic: Only images that have a semantic vector: an indexer that stores semantic
                vectors embeds the others again, and :meth:`add` gives them theirs.
        """
        self._check_open()
        return self._catalog.all_sha256(with_semantic=with_semantic)

    def add(
        self, vectors: np.ndarray, images: Sequence[NewImage], semantic: np.ndarray | None = None
    ) -> list[AddResult]:
        """Add images with their vectors.

        The catalog transaction commits first (that is the acknowledgement), then FAISS gets the created
        rows under the index lock. Content already stored (same sha256, in the catalog or earlier in
        this batch) gets its existing id back with ``created=False`` and no new vector. If anything
        fails before the commit, nothing is stored anywhere.

        Args:
            vectors: (n, dim) float32 (float64 is cast), finite; row i belongs to ``images[i]``. Or
                (n, m, dim): image i's global vector, then m - 1 regional ones (a search scores each
                image by its best vector). The store never re-normalises: pass L2-normalised vectors
                to get cosine scores.
            images: n descriptions.
            semantic: Optional (n, semantic_dim) semantic vectors (from the same forward pass),
                stored in the same transaction; refused when the store was opened without them. Known
                content stored without one gets it (so re-indexing a folder fills older images).

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
        x = self._check_vectors(vectors, "vectors", per_image=True)
        if x.shape[0] != len(images):
            raise InvalidVectorError(f"got {x.shape[0]} vectors for {len(images)} images; they must match")
        if not images:
            return []
        for i, image in enumerate(images):
            if not isinstance(image, NewImage):
                raise InvalidArgumentError(f"images[{i}] must be a NewImage, got {type(image).__name__}")
        if not self._vectors.is_trained:
            # Train before the commit: a training failure must not leave committed-but-unindexable rows.
            with self._sync_lock, self._index_lock:
                if not self._vectors.is_trained:
                    self._vectors.train(x.reshape(-1, self.dim))
        sem = self._check_semantic(semantic, len(images)) if semantic is not None else None
        results = self._catalog.insert_many(images, x, sem)
        if sem is not None or any(r.created for r in results):
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
            # The add itself is committed and indexed; a snapshot is an optimisation for restart. So it
            # never waits for another process's lock (the add would wait with it): the next add retries.
            try:
                with self._sync_lock, self._lock.hold(timeout_s=0):
                    self.snapshot()
            except StoreLockedError:
                logger.debug("automatic snapshot skipped: another process holds the lock")
            except StoreError as exc:
                logger.warning(
                    "automatic snapshot failed (%s); will retry after more adds or at close",
                    exc,
                    exc_info=logger.isEnabledFor(logging.DEBUG),
                )

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

    def search(
        self, queries: np.ndarray, k: int, *, similarity: str = "visual", where: Filter | None = None
    ) -> list[list[Hit]]:
        """Nearest images by inner product (cosine for L2-normalised vectors), best first.

        Args:
            queries: (m, dim) float32 (float64 is cast), finite. Not re-normalised. With
                ``similarity="semantic"``: (m, semantic_dim) semantic vectors.
            k: Hits per query, >= 1; more than the store holds just returns fewer.
            similarity: ``visual`` (the stored visual vectors, global and regional) or ``semantic``
                (the semantic vectors; images stored without one are not among the hits).
            where: Only images matching this metadata filter (:func:`index.filters.parse_filter`).
                The hits are the best ``k`` of the matching images whenever ``k`` of them exist: the
                filter is applied inside the search, never to a shortlist afterwards.

        Returns:
            m lists of hits (empty lists for an empty store).

        Raises:
            InvalidArgumentError: ``k`` is not an integer >= 1, or an unknown ``similarity``.
            InvalidFilterError: A filter on a catalog that predates filters, opened read-only.
            InvalidVectorError: Bad query shape/dtype/values.
            SemanticUnavailableError: ``semantic`` on a store without semantic vectors.
        """
        self._check_open()
        k = check_k(k)
        among = self._matching(where)
        if similarity == "visual":
            q = self._check_vectors(queries, "queries")
            scores, ids = self._search_images(q, k, among)  # (m, k') each, k' <= k
        elif similarity == "semantic":
            scores, ids = self._search_semantic(queries, k, among)
        else:
            raise InvalidArgumentError(
                f"unknown similarity {similarity!r}; choose one of: {', '.join(SIMILARITIES)}"
            )
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

    def similar(
        self, id: str, k: int, *, similarity: str = "visual", where: Filter | None = None
    ) -> list[Hit]:
        """The images most like a stored one, searched with its stored vector (no re-decoding); the
        image itself is never among the hits.

        Args:
            id: Public image id.
            k: Hits wanted, >= 1.
            similarity: ``visual`` (its global vector against every stored vector) or ``semantic``.
            where: Only images matching this metadata filter, as in :meth:`search`.

        Returns:
            Up to ``k`` hits, best first.

        Raises:
            InvalidIdError, NotFoundError: No such image.
            SemanticUnavailableError: ``semantic`` on a store without semantic vectors, or for an
                image stored without one.
            InvalidArgumentError: Bad ``k`` or ``similarity``.
        """
        image_id = _check_id(id)
        self._check_open()
        seq = self._seq_of(image_id)
        if similarity == "semantic":
            self.semantic_index()  # raises when the store keeps no semantic vectors
        query = self._stored_vector(image_id, seq, semantic=similarity == "semantic")
        k = check_k(k)
        hits = self.search(query[None], k + 1, similarity=similarity, where=where)[0]
        return [hit for hit in hits if hit.id != image_id][:k]

    def vector(self, id: str) -> np.ndarray:
        """An image's stored global vector, (dim,) float32, as the embedder computed it (before any
        whitening the store applies at search time).

        Raises:
            InvalidIdError, NotFoundError: No such image.
        """
        image_id = _check_id(id)
        self._check_open()
        return self._stored_vector(image_id, self._seq_of(image_id))

    def _seq_of(self, image_id: str) -> int:
        seq = self._catalog.seq_of(image_id)
        if seq is None:
            raise NotFoundError(f"no image with id {image_id!r}")
        return seq

    def _stored_vector(self, image_id: str, seq: int, *, semantic: bool = False) -> np.ndarray:
        """The catalog's global (or semantic) vector of an image, (d,) float32."""
        if semantic:
            rows = self._catalog.semantic_for_seqs([seq])
        else:
            rows = self._catalog.vectors_for_seqs([seq], global_only=True)
        found = next(iter(rows), None)
        if found is not None:
            return found[1][0]
        if semantic:
            raise SemanticUnavailableError(
                f"image {image_id!r} has no semantic vector; run `deepfeat add-semantic` to compute it"
            )
        raise NotFoundError(f"no image with id {image_id!r}")  # deleted between the two reads

    def list_images(
        self, *, limit: int, after_seq: int = 0, where: Filter | None = None
    ) -> tuple[list[ImageRecord], int | None]:
        """One page of the catalog in insertion order, and where the next page starts.

        Args:
            limit: Records per page, >= 1.
            after_seq: The position returned with the previous page (0: from the start).
            where: Only images matching this metadata filter.

        Returns:
            ``(records, next_after_seq)``; ``next_after_seq`` is None on the last page.

        Raises:
            InvalidArgumentError: ``limit`` < 1 or a negative ``after_seq``.
        """
        self._check_open()
        if limit < 1 or after_seq < 0:
            raise InvalidArgumentError(f"limit must be >= 1 and after_seq >= 0, got {limit}, {after_seq}")
        rows = self._catalog.page(after_seq=after_seq, limit=limit + 1, where=where)
        more = len(rows) > limit
        rows = rows[:limit]
        return [record for _, record in rows], (rows[-1][0] if more else None)

    def export(self, *, where: Filter | None = None, batch: int = 1000) -> Iterator[list[ExportedImage]]:
        """Every image (matching ``where``) with all its stored vectors, in insertion order, ``batch``
        at a time: memory stays bounded by one batch whatever the store's size. Images added while
        it runs may be included; none that existed throughout is skipped or repeated.
        """
        self._check_open()
        after = 0
        while True:
            page = self._catalog.export_page(after_seq=after, limit=batch, where=where)
            if not page:
                return
            yield [image for _, image in page]
            after = page[-1][0]

    def semantic_index(self) -> SemanticIndex:
        """The semantic index, or :class:`SemanticUnavailableError` saying how to get one."""
        semantic = self._semantic
        if semantic is None:
            raise SemanticUnavailableError(
                f"the store at {self._data_dir} has no semantic vectors (it was written before them, or "
                f"the embedder has semantic_layer=none); {_ADD_SEMANTIC_HINT}"
            )
        if semantic.count == 0 and self.count > 0:
            raise SemanticUnavailableError(
                f"none of the {self.count} images in {self._data_dir} has a semantic vector yet; "
                f"{_ADD_SEMANTIC_HINT}"
            )
        return semantic

    def _search_semantic(
        self, queries: np.ndarray, k: int, among: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        semantic = self.semantic_index()
        arr = np.asarray(queries)
        if arr.ndim != 2 or arr.shape[1] != semantic.dim:
            raise InvalidVectorError(f"semantic queries must have shape (m, {semantic.dim}), got {arr.shape}")
        if arr.dtype not in (np.float32, np.float64) or not np.isfinite(arr).all():
            raise InvalidVectorError(f"semantic queries must be finite float32, got dtype {arr.dtype}")
        if among is not None and not among.size:
            return np.empty((arr.shape[0], 0), np.float32), np.empty((arr.shape[0], 0), np.int64)
        with self._index_lock:
            return semantic.search(np.ascontiguousarray(arr, dtype=np.float32), k, among=among)

    def set_semantic(self, seqs: Sequence[int], semantic: np.ndarray) -> int:
        """Store semantic vectors on existing images (``deepfeat add-semantic``), then index them.

        Args:
            seqs: Internal ids from :meth:`iter_missing_semantic`; deleted ones are skipped.
            semantic: (len(seqs), semantic_dim) vectors.

        Returns:
            Images updated.

        Raises:
            InvalidVectorError: Bad shape or values, or the store was opened without semantic vectors.
            ReadOnlyStoreError: Opened read-only.
        """
        self._check_writable("store semantic vectors")
        sem = self._check_semantic(semantic, len(seqs))
        updated = self._catalog.set_semantic(list(seqs), sem)
        self._sync(atomic=False)
        return updated

    def iter_missing_semantic(self, *, batch: int = 1000) -> Iterator[list[tuple[int, str, str | None]]]:
        """Images without a semantic vector, as ``[(seq, sha256, source)]`` chunks in seq order."""
        self._check_open()
        return self._catalog.iter_missing_semantic(batch=batch)

    def _matching(self, where: Filter | None) -> np.ndarray | None:
        """The sorted seqs ``where`` matches, or None when it restricts nothing (no filter, or every
        image matches)."""
        if where is None or where.matches_all:
            return None
        among = self._catalog.match(where)
        if among.size >= max(1, self.count) and among.size >= self._catalog.count_now():
            return None
        return among

    def _search_images(
        self, queries: np.ndarray, k: int, among: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` images per query: each image scores its best vector (global or regional), so
        ``k`` counts images whatever the number of vectors each holds.

        ``among``, the sorted seqs a filter matched, is searched by FAISS's ID selector on each index
        (exact on a flat one, with IVF's nprobe and HNSW's efSearch widened by the filter's share on
        an approximate one). On an approximate index a filter too selective for that (its vectors
        fit :data:`EXACT_SCAN_BYTES`), or a query that still comes back short of ``k`` hits when
        ``k`` images match, gets an exact scan of the matching images' stored vectors instead.

        Returns:
            ``(scores, seqs)``, (m, k') each, best first, -1 seqs past the last hit.
        """
        base = self._base
        per_image = max(self._vectors.per_image, base.index.per_image if base is not None else 1)
        m = queries.shape[0]
        if among is not None:
            if not among.size:
                return np.empty((m, 0), np.float32), np.empty((m, 0), np.int64)
            indexes = [self._vectors] + ([base.index] if base is not None else [])
            exact = all(index.exhaustive for index in indexes)
            small = among.size * per_image * self.dim * 4 <= EXACT_SCAN_BYTES
            if not all(index.can_select for index in indexes) or (small and not exact):
                return self._scan_exact(queries, k, among, per_image)
        # Among the top k * per_image vectors are the best vectors of at least k distinct images.
        if among is None:
            scores, ids = self._search_index(queries, k * per_image)
        else:
            selected = all_vector_ids(among, per_image) if per_image > 1 else among
            share = among.size / max(1, self.count)
            scores, ids = self._search_index(queries, k * per_image, among=selected, share=share)
        if per_image > 1:
            scores, ids = aggregate(scores, ids, k)
        if among is not None and not exact:
            short = np.flatnonzero((ids >= 0).sum(axis=1) < min(k, among.size))
            if short.size:
                fill = self._scan_exact(queries[short], k, among, per_image)
                scores, ids = _pad(scores, ids, fill[0].shape[1])
                scores[short], ids[short] = _pad(*fill, scores.shape[1])
        return scores, ids

    def _scan_exact(
        self, queries: np.ndarray, k: int, seqs: np.ndarray, per_image: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` images among ``seqs`` by their stored vectors (the catalog's, projected like the
        index's), streamed in chunks: exact, with memory bounded by one chunk."""
        q = self._project(queries)
        best = (np.empty((q.shape[0], 0), np.float32), np.empty((q.shape[0], 0), np.int64))
        for chunk_seqs, vectors in self._catalog.vectors_for_seqs(seqs.tolist(), batch=_SCAN_CHUNK):
            scores = q @ self._project(vectors).T  # (m, v)
            ids = np.broadcast_to(vector_ids(chunk_seqs), scores.shape)
            keep = min(k * per_image, scores.shape[1])
            top = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
            part = (np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1))
            best = merge_top_k([best, part], k * per_image)
        if per_image > 1:
            return aggregate(*best, k)
        return best

    def vectors_by_sha256(self, sha256s: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored vectors of known contents, as they were added (before any whitening), so other
        tools (training a classifier) reuse the index's work instead of embedding the files again.

        Args:
            sha256s: Content hashes (lowercase hex); unknown ones are simply absent from the result.

        Returns:
            ``{sha256: (dim,) float32 vector}``.
        """
        self._check_open()
        return self._catalog.vectors_by_sha256(sha256s)

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
        return self._catalog.metadata_value_counts(key)

    def near_duplicates(
        self, threshold: float, *, k: int = 10, batch: int = 1024, where: Filter | None = None
    ) -> list[list[ImageRecord]]:
        """Groups of near-identical images, found with the index itself (k-NN per stored vector),
        never an all-pairs matrix: cost n * one search, memory O(n) (:mod:`index.duplicates`).

        Two images are linked when either is among the other's k nearest with cosine >= ``threshold``;
        groups are the connected components (so A~B~C groups all three), largest first.

        Args:
            threshold: Cosine similarity in (0, 1]; 0.95+ finds re-encodes and resizes.
            k: Neighbours examined per image (bounds the size a group can be discovered at).
            batch: Vectors searched per call.
            where: Only images matching this metadata filter (both images of every pair).

        Raises:
            InvalidArgumentError: ``threshold`` outside (0, 1].
        """
        self._check_open()
        among = self._matching(where)
        return duplicates.near_duplicates(
            self._catalog, self._search_images, threshold, k=k, batch=batch, among=among
        )

    def stats(self) -> dict[str, Any]:
        """A summary for health checks and the CLI.

        Returns:
            ``count`` (catalog rows), ``indexed`` (searchable vectors), ``dim``, ``metric``,
            ``index_factory``, ``fingerprint``, ``snapshot`` (manifest snapshot info or None),
            ``unsnapshotted_changes``, ``semantic_dim`` (None: opened without semantic vectors),
            ``semantic_count`` (catalog rows with a semantic vector), ``semantic_indexed`` (in the
            semantic index), ``read_only``, ``data_dir``, and ``generation``: on a replica
            serving one, its ``number``, ``factory``, ``count``, ``max_seq``, ``hidden`` (rows deleted
            since) and ``delta`` (rows added since, searched exactly), else None.
        """
        self._check_open()
        snap = self._manifest.snapshot
        base = self._base
        return {
            "count": self._catalog.count(),
            "indexed": self._vectors.images,
            "vectors": self._vectors.ntotal + (base.index.ntotal if base is not None else 0),
            "vectors_per_image": self._vectors.per_image if base is None else base.index.per_image,
            "dim": self.dim,
            "metric": self._manifest.metric,
            "index_factory": self.index_factory if base is None else base.info.factory,
            "fingerprint": self.fingerprint,
            "snapshot": None if snap is None else asdict(snap),
            "unsnapshotted_changes": self._changes_since_snapshot,
            "whitening": self._manifest.extra.get("whitening"),
            "index_dim": self.index_dim,
            "semantic_dim": self.semantic_dim,
            "semantic_count": self._catalog.semantic_count(),
            "semantic_indexed": None if self._semantic is None else self._semantic.count,
            "read_only": self._read_only,
            "data_dir": str(self._data_dir),
            "generation": None
            if base is None
            else {
                "number": base.info.number,
                "factory": base.info.factory,
                "count": base.index.images,  # images (the generation holds vectors_per_image each)
                "max_seq": base.info.max_seq,
                "hidden": int(base.hidden.size),
                "delta": self._vectors.images,
            },
        }

    # ================================================================== lifecycle

    def close(self, *, snapshot: bool = True) -> None:
        """Snapshot if there are unsaved changes, then close connections and the lock file. Idempotent.

        A failing final snapshot is logged, not raised: every change is already committed in SQLite
        and the next open replays it. ``snapshot=False`` skips it, for a caller that has just seen a
        snapshot fail and reported it (a full disk would only fail again).
        """
        if self._closed:
            return
        try:
            if snapshot and not self._read_only and self._changes_since_snapshot:
                try:
                    self.snapshot()
                except (StoreError, OSError) as exc:
                    logger.warning(
                        "final snapshot failed (%s); the next open will replay from the catalog",
                        exc,
                        exc_info=logger.isEnabledFor(logging.DEBUG),
                    )
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
