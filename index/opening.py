"""Opening a store: refuse a foreign one, agree on its identity, load FAISS and reconcile it.

The steps :func:`open_store` (behind :meth:`index.store.ImageStore.open`) runs, in order:

1. :func:`check_open_args` and :func:`prepare_open`: bad arguments, or a store made by a different
   embedder, are refused before anything is created or written. A replica verifies and maps its
   generation here, before the lock (:func:`index.replica.open_generation`).
2. Under the data directory's lock, :func:`open_catalog`: the catalog is opened and integrity-checked,
   and :func:`reconcile_identity` makes the manifest and the catalog's copy of the identity agree
   (creating a new store, or regenerating a lost manifest).
3. :func:`load_index`: the FAISS snapshot is loaded if its checksum matches (otherwise moved aside
   and rebuilt from the catalog), then reconciled with the catalog by set difference
   (:func:`reconcile_snapshot`; :mod:`index.sync` explains why that misses nothing). A replica with a
   usable generation gets a delta of the rows after it instead.
4. The store is assembled; a rebuilt index is snapshotted at once, still under the lock. Then, outside
   it, a store under the ``auto`` index policy picks its index type (:mod:`index.relayout`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepfeat.index._fs import (
    FileLock,
    check_writable,
    quarantine,
    remove_stale_temps,
    sha256_file,
    was_pending,
)
from deepfeat.index.catalog import Catalog, CatalogIdentity
from deepfeat.index.errors import (
    CorruptStoreError,
    IncompatibleIndexError,
    InvalidArgumentError,
    StoreError,
)
from deepfeat.index.files import CATALOG_FILE, LOCK_FILE, MANIFEST_FILE, SNAPSHOT_FILE
from deepfeat.index.generations import Generation
from deepfeat.index.manifest import GenerationInfo, Manifest, check_compatible, normalize_fingerprint
from deepfeat.index.relayout import train_and_fill
from deepfeat.index.replica import open_generation, replay_after
from deepfeat.index.sync import REPLAY_BATCH, load_whitening
from deepfeat.index.vectors import VectorIndex
from deepfeat.index.whitening import Whitening

if TYPE_CHECKING:
    from deepfeat.index.store import ImageStore

__all__ = [
    "LoadedIndex",
    "adopt_semantic",
    "check_manifest",
    "check_open_args",
    "load_index",
    "open_catalog",
    "open_store",
    "prepare_open",
    "reconcile_identity",
    "reconcile_snapshot",
]

logger = logging.getLogger(f"{__package__}.store")


def open_store(
    cls: type[ImageStore],
    data_dir: Path,
    *,
    fingerprint: dict[str, Any],
    dim: int,
    index_factory: str | None,
    read_only: bool,
    snapshot_every: int,
    embedder_config: dict[str, Any] | None,
    semantic_dim: int | None = None,
) -> ImageStore:
    """Open (or create) the store in ``data_dir``: the steps in the module docstring.

    The arguments, the result and the errors are those of :meth:`index.store.ImageStore.open`.
    """
    given_fp = check_open_args(
        fingerprint, dim=dim, snapshot_every=snapshot_every, index_factory=index_factory
    )
    auto = index_factory == "auto"
    base = prepare_open(data_dir, given_fp, dim, read_only=read_only)
    lock = FileLock(data_dir / LOCK_FILE, optional=read_only)
    catalog: Catalog | None = None
    try:
        with lock.hold(shared=read_only):
            if not read_only:
                remove_stale_temps(data_dir)  # a crashed writer's half-written files (whitening too)
            catalog, manifest = open_catalog(
                data_dir,
                given_fp,
                dim,
                index_factory=None if auto else index_factory,
                read_only=read_only,
                embedder_config=embedder_config,
            )
            loaded = load_index(data_dir, catalog, manifest, base=base, read_only=read_only)
            store = cls(
                data_dir=data_dir,
                catalog=catalog,
                manifest=manifest,
                lock=lock,
                read_only=read_only,
                snapshot_every=snapshot_every,
                loaded=loaded,
                semantic_dim=semantic_dim,
            )
            if loaded.persist_now and not read_only:
                store.snapshot()  # a rebuild is expensive: persist it now rather than at close
    except BaseException:
        if catalog is not None:
            catalog.close()
        lock.close()
        raise
    if not read_only and (auto or store.manifest.extra.get("index_policy") == "auto"):
        store.apply_auto_index()
    logger.info(
        "opened store %s: %d images, dim %d, factory %s%s",
        data_dir,
        store.count,
        dim,
        manifest.index_factory,
        " (read-only)" if read_only else "",
    )
    return store


def adopt_semantic(data_dir: Path, *, fingerprint: dict[str, Any], embedder_config: dict[str, Any]) -> bool:
    """Record in an existing store that it keeps semantic vectors (``deepfeat add-semantic``).

    A store written before semantic vectors has a fingerprint without the ``"semantic"`` key; the
    same fingerprint with it (and nothing else changed) is adopted in the catalog's ``meta`` and the
    manifest, under the store's file lock, so the store then opens with ``semantic_dim``. The visual
    vectors are untouched. (A crash between the two writes leaves them disagreeing, which the next
    open reports as ``corrupt_store``; re-running this command makes them agree.)

    Args:
        data_dir: The store's directory.
        fingerprint: The embedder's fingerprint, with its ``"semantic"`` key.
        embedder_config: The embedder's options, recorded in the manifest.

    Returns:
        Whether anything changed (False: the store already records this fingerprint).

    Raises:
        InvalidArgumentError: ``fingerprint`` has no ``"semantic"`` key.
        IncompatibleIndexError: The store was made by another embedder, or with another semantic layer.
        StoreError: No store in ``data_dir``.
    """
    given = normalize_fingerprint(fingerprint)
    if "semantic" not in given:
        raise InvalidArgumentError("the fingerprint has no semantic layer; nothing to adopt")
    lock = FileLock(data_dir / LOCK_FILE)
    try:
        with lock.hold():
            manifest = Manifest.load(data_dir / MANIFEST_FILE)
            if manifest is None:
                raise StoreError(f"no store in {data_dir}")
            stored = normalize_fingerprint(manifest.fingerprint)
            catalog = Catalog(data_dir / CATALOG_FILE, dim=manifest.dim)
            try:
                identity = catalog.identity()
                in_catalog = None if identity is None else normalize_fingerprint(identity.fingerprint)
                if stored == given and in_catalog == given:
                    return False
                without = {k: v for k, v in given.items() if k != "semantic"}
                if stored != given and ("semantic" in stored or stored != without):
                    check_compatible(manifest.fingerprint, given)  # raises, naming the differences
                catalog.set_identity(
                    fingerprint=given,
                    dim=(identity.dim if identity is not None else None) or manifest.dim,
                    index_factory=(identity.index_factory if identity is not None else None)
                    or manifest.index_factory,
                )
            finally:
                catalog.close()
            replace(
                manifest,
                fingerprint=given,
                embedder=normalize_fingerprint(embedder_config),
                updated_at=time.time(),
            ).save(data_dir / MANIFEST_FILE)
    finally:
        lock.close()
    logger.info("store %s now keeps semantic vectors (%s)", data_dir, given["semantic"])
    return True


def check_open_args(
    fingerprint: dict[str, Any], *, dim: int, snapshot_every: int, index_factory: str | None
) -> dict[str, Any]:
    """Validate :meth:`~index.store.ImageStore.open`'s arguments; returns the normalised fingerprint.

    Raises:
        InvalidArgumentError: Bad ``dim``, ``snapshot_every``, fingerprint or factory string.
    """
    given_fp = normalize_fingerprint(fingerprint)
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise InvalidArgumentError(f"dim must be a positive integer, got {dim!r}")
    if not isinstance(snapshot_every, int) or isinstance(snapshot_every, bool) or snapshot_every < 0:
        raise InvalidArgumentError(f"snapshot_every must be an integer >= 0, got {snapshot_every!r}")
    if index_factory is not None and (not isinstance(index_factory, str) or not index_factory.strip()):
        raise InvalidArgumentError(f"index_factory must be a non-empty string, got {index_factory!r}")
    return given_fp


def check_manifest(manifest: Manifest, given_fp: dict[str, Any], dim: int) -> None:
    """Refuse a store made by another embedder, of another dimension, or with a metric other than ip.

    Raises:
        IncompatibleIndexError: The message and ``differences`` name the keys that differ.
    """
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


def prepare_open(data_dir: Path, given_fp: dict[str, Any], dim: int, *, read_only: bool) -> Generation | None:
    """Everything an open does before taking the lock; nothing is written to a foreign store.

    Refuses a store made by another embedder, and a read-only open where there is no store; creates
    the directory for a writer; and for a replica, verifies and maps the published generation (its
    files are immutable, and a long checksum must not hold off the writer's snapshots).

    Returns:
        The replica's generation, or None.

    Raises:
        IncompatibleIndexError: See :func:`check_manifest`.
        StoreError: Read-only and there is no store in ``data_dir``.
        CorruptStoreError: The manifest is unreadable.
    """
    manifest = Manifest.load(data_dir / MANIFEST_FILE)
    if manifest is not None:
        check_manifest(manifest, given_fp, dim)
    if read_only and manifest is None and not (data_dir / CATALOG_FILE).exists():
        raise StoreError(f"no store in {data_dir} (read-only open needs an existing store)")
    if not read_only:
        check_writable(data_dir)
    return open_generation(data_dir, manifest) if read_only and manifest is not None else None


def open_catalog(
    data_dir: Path,
    given_fp: dict[str, Any],
    dim: int,
    *,
    index_factory: str | None,
    read_only: bool,
    embedder_config: dict[str, Any] | None,
) -> tuple[Catalog, Manifest]:
    """Open and check the catalog and settle the store's identity; run under the open-time lock.

    Returns:
        The open catalog (the caller closes it) and the manifest.

    Raises:
        IncompatibleIndexError: Another process made the store meanwhile, with another embedder.
        CorruptStoreError: The catalog fails ``quick_check``, or it and the manifest disagree.
    """
    # Re-read under the lock: another process may have just created or snapshotted it.
    manifest = Manifest.load(data_dir / MANIFEST_FILE)
    if manifest is not None:
        check_manifest(manifest, given_fp, dim)
    catalog = Catalog(data_dir / CATALOG_FILE, dim=dim, read_only=read_only)
    try:
        catalog.quick_check()
        manifest = reconcile_identity(
            catalog,
            manifest,
            given_fp,
            dim,
            index_factory,
            data_dir=data_dir,
            read_only=read_only,
            embedder_config=embedder_config,
        )
    except BaseException:
        catalog.close()
        raise
    return catalog, manifest


def reconcile_identity(
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

    Args:
        index_factory: The factory asked for (None: the store's own, or "Flat" for a new one).
        embedder_config: The options that made the fingerprint; recorded in a new manifest, and added
            to an existing one that lacks them when opened for writing.
    """
    stored = catalog.identity()
    embedder = None if embedder_config is None else normalize_fingerprint(embedder_config)
    if manifest is not None:
        return _agree_with_manifest(
            catalog,
            manifest,
            stored,
            index_factory,
            data_dir=data_dir,
            read_only=read_only,
            embedder=embedder,
        )
    if stored is not None:
        manifest = _regenerate_manifest(catalog, stored, given_fp, dim, data_dir=data_dir, embedder=embedder)
    elif read_only:
        raise StoreError(f"no store in {data_dir}: the catalog has no identity and the store is read-only")
    else:
        manifest = _create_identity(
            catalog, given_fp, dim, index_factory, data_dir=data_dir, embedder=embedder
        )
    if not read_only:
        manifest.save(data_dir / MANIFEST_FILE)
    return manifest


def _agree_with_manifest(
    catalog: Catalog,
    manifest: Manifest,
    stored: CatalogIdentity | None,
    index_factory: str | None,
    *,
    data_dir: Path,
    read_only: bool,
    embedder: dict[str, Any] | None,
) -> Manifest:
    """A store with a manifest: check the catalog's copy (or record it) and the requested factory."""
    if stored is not None and normalize_fingerprint(stored.fingerprint) != normalize_fingerprint(
        manifest.fingerprint
    ):
        raise CorruptStoreError("manifest.json and the catalog disagree on the embedder fingerprint")
    if stored is None and not read_only:
        catalog.set_identity(
            fingerprint=manifest.fingerprint, dim=manifest.dim, index_factory=manifest.index_factory
        )
    if index_factory is not None and index_factory != manifest.index_factory:
        logger.warning(
            "store %s was built with index_factory %r; ignoring the requested %r (rebuild to change it)",
            data_dir,
            manifest.index_factory,
            index_factory,
        )
    if manifest.embedder is None and embedder is not None and not read_only:
        manifest = replace(manifest, embedder=embedder)
        manifest.save(data_dir / MANIFEST_FILE)
        logger.info("recorded the embedder options in the manifest of %s", data_dir)
    return manifest


def _regenerate_manifest(
    catalog: Catalog,
    stored: CatalogIdentity,
    given_fp: dict[str, Any],
    dim: int,
    *,
    data_dir: Path,
    embedder: dict[str, Any] | None,
) -> Manifest:
    """A catalog without a manifest: verify against the catalog's copy, then rebuild the manifest."""
    now = time.time()
    manifest = Manifest(
        fingerprint=stored.fingerprint,
        dim=stored.dim or dim,
        index_factory=stored.index_factory or "Flat",
        embedder=embedder,
        created_at=now,
        updated_at=now,
        count=catalog.count(),
    )
    check_manifest(manifest, given_fp, dim)
    logger.warning("manifest missing in %s; regenerating it from the catalog", data_dir)
    return manifest


def _create_identity(
    catalog: Catalog,
    given_fp: dict[str, Any],
    dim: int,
    index_factory: str | None,
    *,
    data_dir: Path,
    embedder: dict[str, Any] | None,
) -> Manifest:
    """A new store: record the identity in the catalog and return its first manifest."""
    factory = index_factory or "Flat"
    VectorIndex.create(dim, factory)  # validate the factory string before persisting it
    catalog.set_identity(fingerprint=given_fp, dim=dim, index_factory=factory)
    now = time.time()
    logger.info("created a new store in %s (dim %d, factory %s)", data_dir, dim, factory)
    return Manifest(
        fingerprint=given_fp,
        dim=dim,
        index_factory=factory,
        embedder=embedder,
        created_at=now,
        updated_at=now,
        count=0,
    )


@dataclass(frozen=True)
class LoadedIndex:
    """What :func:`load_index` hands the store: its FAISS side, in step with the catalog.

    Attributes:
        vectors: The index the store mutates (a replica's delta when ``base`` is set).
        whitening: The whitening the manifest names.
        base: A replica's generation, with the rows deleted since hidden.
        seq_mark: Highest catalog seq applied.
        del_mark: Highest tombstone rowid applied.
        pending: Changes applied since the snapshot that was loaded.
        persist_now: The index was rebuilt from the catalog (expensive): write a snapshot now.
        failed_generations: ``(number, sha256)`` of the published generation when a replica could not
            use it (verified and logged by :func:`prepare_open`; retried once the manifest names another).
    """

    vectors: VectorIndex
    whitening: Whitening | None
    base: Generation | None
    seq_mark: int
    del_mark: int
    pending: int
    persist_now: bool
    failed_generations: frozenset[tuple[int, str]] = frozenset()


def load_index(
    data_dir: Path, catalog: Catalog, manifest: Manifest, *, base: Generation | None, read_only: bool
) -> LoadedIndex:
    """Load (or rebuild) FAISS and reconcile it with the catalog; run under the open-time lock.

    Args:
        base: A replica's generation (from :func:`prepare_open`); used when it was built with the
            store's current whitening, else the replica serves from the snapshot like any other.

    Raises:
        CorruptStoreError: The whitening file is missing or damaged.
    """
    whitening = load_whitening(data_dir, manifest)
    index_dim = whitening.d_out if whitening is not None else manifest.dim
    published = manifest.generation
    if base is not None and base.info.whitening == manifest.extra.get("whitening"):
        delta = VectorIndex.create(index_dim, "Flat")
        base, seq_mark, del_mark = replay_after(catalog, base, delta, whitening)
        return LoadedIndex(
            delta,
            whitening,
            base,
            seq_mark,
            del_mark,
            pending=0,
            persist_now=False,
            failed_generations=_refused(published, base, read_only=read_only),
        )
    vectors = _load_snapshot(data_dir, manifest, index_dim, read_only=read_only)
    rebuilt = vectors is None and manifest.snapshot is not None
    if vectors is None:
        vectors = VectorIndex.create(index_dim, manifest.index_factory)
    seq_mark, del_mark, changes = reconcile_snapshot(
        vectors, catalog, whitening.apply if whitening is not None else None
    )
    return LoadedIndex(
        vectors,
        whitening,
        None,
        seq_mark,
        del_mark,
        pending=changes,
        persist_now=rebuilt or (manifest.snapshot is None and vectors.ntotal > 0),
        failed_generations=_refused(published, None, read_only=read_only),
    )


def _refused(
    published: GenerationInfo | None, serving: Generation | None, *, read_only: bool
) -> frozenset[tuple[int, str]]:
    """The published generation when a replica is not serving it: :func:`prepare_open` verified and
    refused it (logged), and a refresh retries only once the manifest names another."""
    if not read_only or published is None or (serving is not None and serving.info == published):
        return frozenset()
    return frozenset({(published.number, published.sha256)})


def _load_snapshot(
    data_dir: Path, manifest: Manifest, index_dim: int, *, read_only: bool
) -> VectorIndex | None:
    """The snapshot the manifest records, checked against its checksum and the index dimension.

    Returns:
        The loaded index, or None when there is no snapshot or it is unusable (logged). A writer
        deletes a snapshot that a pending marker names (an interrupted write, see
        :data:`index.files.PENDING_MARKER`) and quarantines any other (:func:`index._fs.quarantine`).
    """
    if manifest.snapshot is None:
        return None
    if manifest.snapshot.file != SNAPSHOT_FILE:
        # Never follow a path from the manifest: the snapshot has one fixed name.
        logger.warning("manifest names snapshot %r; using %s", manifest.snapshot.file, SNAPSHOT_FILE)
    snap_path = data_dir / SNAPSHOT_FILE
    try:
        vectors = VectorIndex.load(
            snap_path, expected_sha256=manifest.snapshot.sha256, factory=manifest.index_factory
        )
        if vectors.dim != index_dim:
            raise CorruptStoreError(f"snapshot has dim {vectors.dim}, the index needs {index_dim}")
        return vectors
    except CorruptStoreError as exc:
        if read_only or not snap_path.exists():
            logger.warning("snapshot unusable (%s); rebuilding the index from the catalog", exc)
            return None
        if was_pending(data_dir, sha256_file(snap_path)):
            # A complete newer snapshot whose manifest write never happened: nothing is damaged.
            logger.warning(
                "snapshot unusable (a write was interrupted before the manifest recorded it); "
                "rebuilding the index from the catalog"
            )
            snap_path.unlink()
        else:
            logger.warning("snapshot unusable (%s); rebuilding the index from the catalog", exc)
            aside = quarantine(snap_path)
            logger.warning("moved the damaged snapshot to %s", aside.relative_to(data_dir))
        return None


def reconcile_snapshot(
    vectors: VectorIndex, catalog: Catalog, project: Callable[[np.ndarray], np.ndarray] | None = None
) -> tuple[int, int, int]:
    """Make ``vectors`` hold exactly the catalog's live rows, by set difference.

    FAISS ids not in the catalog are removed and catalog rows missing from FAISS are added; the
    watermarks come from the same consistent read, so the replay after them neither misses nor repeats
    a row. An index that still needs training is empty (a new IVF store, or a snapshot being rebuilt):
    it is trained on a uniform sample and filled like any rebuild (:func:`index.relayout.train_and_fill`).

    Args:
        project: Raw vectors -> the index's (the whitening's ``apply``), or None.

    Returns:
        ``(seq_mark, del_mark, vectors removed + added)``.
    """
    max_seq, del_rowid, live = catalog.state()
    if not vectors.is_trained:
        filled = train_and_fill(vectors, catalog, max_seq=max_seq, n_live=int(live.size), project=project)
        removed, added = 0, filled.added
    else:
        held = vectors.seqs()
        extra = np.setdiff1d(held, live, assume_unique=True)
        missing = np.setdiff1d(live, held, assume_unique=True)
        if extra.size:
            vectors.remove(extra)
        for seqs, vecs in catalog.vectors_for_seqs(missing.tolist(), batch=REPLAY_BATCH):
            vectors.add(seqs, project(vecs) if project is not None else vecs)
        removed, added = int(extra.size), int(missing.size)
    if removed or added:
        logger.info("reconciled the index with the catalog: removed %d, added %d", removed, added)
    return max_seq, del_rowid, removed + added
