"""The SQLite catalog: the source of truth for every acknowledged image, its metadata and its vector.

One row per distinct image content (sha256), with its vectors: the image's global descriptor first,
then any regional descriptors, as one (m, dim) little-endian float32 BLOB (m = 1 in stores written
before regional descriptors), and optionally its semantic vector, a (d_s,) float32 BLOB in the
``semantic`` column (NULL in rows written before semantic vectors; ``meta.semantic_dim`` records d_s).
Semantic vectors set later on existing rows are logged in ``semantic_updates`` (like tombstones), so
other processes replay them. ``seq`` (INTEGER PRIMARY KEY AUTOINCREMENT) is the int64
id FAISS uses and is never exposed; ``id`` (uuid4 hex) is the public, stable id. AUTOINCREMENT
guarantees a ``seq`` is never reused, and because SQLite has one writer at a time, rows become visible
in ``seq`` order: "every row with seq <= N" is a valid watermark for catching up incrementally.
Deletions leave a tombstone in ``deletions`` so other processes can replay them the same way. The
``meta`` table keeps a copy of the store's identity (:class:`CatalogIdentity`).

Every query the store runs is a method here; the schema, the connections (one per thread, WAL) and the
transactions are in :mod:`index.catalog_db`.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from deepfeat.index.catalog_db import IN_CHUNK, SCHEMA_VERSION, Database, chunks
from deepfeat.index.errors import (
    CorruptStoreError,
    InvalidArgumentError,
    InvalidFilterError,
    InvalidVectorError,
    ReadOnlyStoreError,
)
from deepfeat.index.filters import Filter
from deepfeat.index.ids import MAX_VECTORS_PER_IMAGE

__all__ = [
    "SCHEMA_VERSION",
    "Catalog",
    "CatalogIdentity",
    "ExportedImage",
    "NewImage",
    "ImageRecord",
    "InsertResult",
]

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_ID_RE = re.compile(r"[0-9a-f]{32}")
_MATCH_CACHE_SIZE = 8
"""Filters whose matching seqs are kept (at most 8 MB each per million matches)."""
_META_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_VECTOR_DTYPE = np.dtype("<f4")

_RECORD_COLUMNS = "id, sha256, source, width, height, nbytes, metadata, added_at"
_WATERMARKS_SQL = "SELECT name, seq FROM sqlite_sequence WHERE name IN ('images', 'deletions')"
_SYNC_MARKS_SQL = (
    "SELECT name, seq FROM sqlite_sequence WHERE name IN ('images', 'deletions', 'semantic_updates')"
)


@dataclass(frozen=True)
class ImageRecord:
    """What the catalog knows about one image (everything but its vector and thumbnail)."""

    id: str
    sha256: str
    source: str | None
    width: int | None
    height: int | None
    nbytes: int | None
    metadata: dict[str, Any] = field(default_factory=dict)
    added_at: float = 0.0


@dataclass(frozen=True)
class NewImage:
    """An image to add: its content hash, descriptive fields and optional thumbnail. Its vector
    travels beside it, one (n, dim) array for a batch, from the embedder through the store to here."""

    sha256: str
    source: str | None
    width: int | None
    height: int | None
    nbytes: int | None
    metadata: dict[str, Any] = field(default_factory=dict)
    thumbnail: bytes | None = None
    id: str | None = None
    """The id to give it (``deepfeat import`` keeps an export's ids); None: a new random one."""
    added_at: float | None = None
    """When it was first added (an import keeps the original time); None: now."""


@dataclass(frozen=True)
class ExportedImage:
    """One image as ``deepfeat export`` writes it: its record, all its vectors (global first, then
    regional) and its semantic vector when it has one."""

    record: ImageRecord
    vectors: np.ndarray
    semantic: np.ndarray | None


@dataclass(frozen=True)
class CatalogIdentity:
    """The store's identity as the catalog's ``meta`` table keeps it: a copy of the manifest's, so a
    lost manifest can be regenerated instead of leaving an unverifiable catalog."""

    fingerprint: dict[str, Any]
    dim: int | None
    index_factory: str | None


class InsertResult(NamedTuple):
    """Outcome of inserting one row: its public id, its internal seq, and whether it is new."""

    id: str
    seq: int
    created: bool


class Catalog:
    """The catalog's queries; see the module docstring, and :mod:`index.catalog_db` for concurrency."""

    def __init__(
        self, path: str | Path, *, dim: int, read_only: bool = False, busy_timeout_s: float = 30.0
    ) -> None:
        """Open (and when writable, create and migrate) the catalog.

        Args:
            path: The ``catalog.sqlite3`` file.
            dim: Vector dimension; every stored vector is checked against it.
            read_only: Open with ``mode=ro``: no migrations, every write raises ReadOnlyStoreError.
            busy_timeout_s: How long a write waits for another process's write transaction.

        Raises:
            CorruptStoreError: The file is not a SQLite database.
            IncompatibleIndexError: The schema is newer than this code.
            StoreError: Read-only and the file is missing or needs a migration.
        """
        self._dim = dim
        self._match_cache: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self._match_lock = threading.Lock()
        self._count_cache: tuple[tuple[int, int], int] | None = None
        self._db = Database(Path(path), read_only=read_only, busy_timeout_s=busy_timeout_s)

    # ------------------------------------------------------------------ connections

    @property
    def path(self) -> Path:
        """The database file."""
        return self._db.path

    @property
    def read_only(self) -> bool:
        """Whether writes are refused."""
        return self._db.read_only

    @property
    def dim(self) -> int:
        """Dimension of the stored vectors."""
        return self._dim

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (for tests and diagnostics; do not start transactions on it)."""
        return self._db.conn()

    def close(self) -> None:
        """Close every thread's connection. Idempotent."""
        self._db.close()

    # ------------------------------------------------------------------ identity

    def identity(self) -> CatalogIdentity | None:
        """The store identity recorded in the ``meta`` table.

        Returns:
            The identity, or None when no fingerprint is recorded yet (a new store).

        Raises:
            CorruptStoreError: The recorded fingerprint is not a JSON object, or the dim not an integer.
        """
        with self._db.read("reading the store identity") as conn:
            meta = {
                str(key): str(value)
                for key, value in conn.execute(
                    "SELECT key, value FROM meta WHERE key IN ('fingerprint', 'dim', 'index_factory')"
                )
            }
        if not meta.get("fingerprint"):
            return None
        try:
            fingerprint = json.loads(meta["fingerprint"])
            dim = int(meta["dim"]) if meta.get("dim") else None
        except ValueError as exc:
            raise CorruptStoreError(
                f"catalog {self.path}: the recorded identity is unreadable: {exc}"
            ) from exc
        if not isinstance(fingerprint, dict):
            raise CorruptStoreError(f"catalog {self.path}: the recorded fingerprint is not a JSON object")
        return CatalogIdentity(
            fingerprint=fingerprint, dim=dim, index_factory=meta.get("index_factory") or None
        )

    def set_identity(self, *, fingerprint: dict[str, Any], dim: int, index_factory: str) -> None:
        """Record the store identity in the ``meta`` table, all three values in one transaction.

        Args:
            fingerprint: The embedder fingerprint (JSON-able).
            dim: Vector dimension.
            index_factory: The FAISS factory string.

        Raises:
            ReadOnlyStoreError: The catalog is read-only.
            StoreFullError: No space left (nothing is written).
        """
        values = [
            ("fingerprint", json.dumps(fingerprint, sort_keys=True)),
            ("dim", str(int(dim))),
            ("index_factory", str(index_factory)),
        ]
        with self._db.write("recording the store identity") as conn:
            conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", values)

    # ------------------------------------------------------------------ writes

    def _encode(self, index: int, row: NewImage, vector: np.ndarray) -> tuple[Any, ...]:
        """Validate one row before the transaction starts and build its INSERT parameters."""
        if not isinstance(row.sha256, str) or not _SHA256_RE.fullmatch(row.sha256):
            raise InvalidArgumentError(
                f"row {index}: sha256 must be 64 lowercase hex characters, got {str(row.sha256)[:80]!r}"
            )
        if row.id is not None and not (isinstance(row.id, str) and _ID_RE.fullmatch(row.id)):
            raise InvalidArgumentError(
                f"row {index}: id must be 32 lowercase hex characters, got {str(row.id)[:80]!r}"
            )
        vector = np.asarray(vector)
        if vector.ndim == 1:
            vector = vector[None, :]
        if vector.ndim != 2 or vector.shape[1] != self._dim or not 1 <= len(vector) <= MAX_VECTORS_PER_IMAGE:
            raise InvalidVectorError(
                f"row {index}: vectors must have shape ({self._dim},) or (m, {self._dim}) with "
                f"1 <= m <= {MAX_VECTORS_PER_IMAGE}, got {vector.shape}"
            )
        if vector.dtype not in (np.float32, np.float64) or not np.isfinite(vector).all():
            raise InvalidVectorError(f"row {index}: vector must be finite float32, got dtype {vector.dtype}")
        if not isinstance(row.metadata, dict):
            raise InvalidArgumentError(
                f"row {index}: metadata must be a dict, got {type(row.metadata).__name__}"
            )
        try:
            metadata = json.dumps(row.metadata, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"row {index}: metadata is not JSON-serialisable: {exc}") from exc
        for name in ("width", "height", "nbytes"):
            value = getattr(row, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise InvalidArgumentError(f"row {index}: {name} must be a non-negative int, got {value!r}")
        if row.source is not None and not isinstance(row.source, str):
            raise InvalidArgumentError(
                f"row {index}: source must be a string, got {type(row.source).__name__}"
            )
        if row.thumbnail is not None and not isinstance(row.thumbnail, bytes | bytearray | memoryview):
            raise InvalidArgumentError(
                f"row {index}: thumbnail must be bytes, got {type(row.thumbnail).__name__}"
            )
        blob = np.ascontiguousarray(vector, dtype=_VECTOR_DTYPE).tobytes()
        return (row.sha256, row.source, row.width, row.height, row.nbytes, metadata, blob)

    def _check_semantic(self, semantic: np.ndarray | None, n: int) -> np.ndarray | None:
        """(n, d_s) finite float semantic vectors -> float32, or None; d_s must match the recorded one."""
        if semantic is None:
            return None
        arr = np.asarray(semantic)
        if arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] < 1:
            raise InvalidVectorError(f"semantic vectors must have shape ({n}, d_s), got {arr.shape}")
        if arr.dtype not in (np.float32, np.float64) or not np.isfinite(arr).all():
            raise InvalidVectorError(f"semantic vectors must be finite float32, got dtype {arr.dtype}")
        recorded = self.semantic_dim()
        if recorded is not None and arr.shape[1] != recorded:
            raise InvalidVectorError(
                f"semantic vectors have dim {arr.shape[1]}, the catalog holds dim {recorded}"
            )
        return np.ascontiguousarray(arr, dtype=_VECTOR_DTYPE)

    @staticmethod
    def _record_semantic_dim(conn: sqlite3.Connection, dim: int) -> None:
        conn.execute(
            "INSERT INTO meta(key, value) VALUES ('semantic_dim', ?) ON CONFLICT(key) DO NOTHING",
            (str(int(dim)),),
        )

    def insert_many(
        self, rows: Sequence[NewImage], vectors: np.ndarray, semantic: np.ndarray | None = None
    ) -> list[InsertResult]:
        """Insert images in ONE transaction, deduplicating on sha256.

        A sha256 already in the catalog, or repeated within ``rows``, is not inserted again: its result
        carries the existing id with ``created=False`` (with ``semantic`` given, a known row that has no
        semantic vector gets this one). Either every new row is committed or none is.

        Args:
            rows: The images to insert.
            vectors: (len(rows), dim) raw vectors, row i for image i; or (len(rows), m, dim), image i's
                global vector first, then its regional ones.
            semantic: Optional (len(rows), d_s) semantic vectors, stored in the same transaction.

        Returns:
            One result per input row, in input order.

        Raises:
            InvalidArgumentError / InvalidVectorError: A row is malformed (nothing is written).
            StoreFullError: The disk or database is full (the transaction is rolled back).
            ReadOnlyStoreError: The catalog is read-only.
        """
        if len(vectors) != len(rows):
            raise InvalidVectorError(f"got {len(vectors)} vectors for {len(rows)} rows; they must match")
        encoded = [self._encode(i, row, vectors[i]) for i, row in enumerate(rows)]
        sem = self._check_semantic(semantic, len(rows))
        if not encoded:
            return []
        per_image = max(len(params[-1]) for params in encoded) // (self._dim * _VECTOR_DTYPE.itemsize)
        results: list[InsertResult] = []
        with self._db.write("adding images") as conn:
            if per_image > 1:
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES ('vectors_per_image', ?) ON CONFLICT(key) "
                    "DO UPDATE SET value = max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
                    (str(per_image),),
                )
            if sem is not None:
                self._record_semantic_dim(conn, sem.shape[1])
            known = self._lookup_sha(conn, list(dict.fromkeys(params[0] for params in encoded)))
            now = time.time()
            for i, (params, row) in enumerate(zip(encoded, rows, strict=True)):
                sha = params[0]
                if sha in known:
                    image_id, seq = known[sha]
                    results.append(InsertResult(image_id, seq, False))
                    if sem is not None:  # known content stored before semantic vectors gets one now
                        cursor = conn.execute(
                            "UPDATE images SET semantic = ? WHERE seq = ? AND semantic IS NULL",
                            (sem[i].tobytes(), seq),
                        )
                        if cursor.rowcount:
                            conn.execute("INSERT INTO semantic_updates(seq) VALUES (?)", (seq,))
                    continue
                image_id = row.id or uuid.uuid4().hex
                added_at = now if row.added_at is None else float(row.added_at)
                try:
                    cursor = conn.execute(
                        "INSERT INTO images(id, sha256, source, width, height, nbytes, metadata, vector,"
                        " added_at, semantic) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (image_id, *params, added_at, None if sem is None else sem[i].tobytes()),
                    )
                except sqlite3.IntegrityError as exc:  # only a given id can collide
                    raise InvalidArgumentError(
                        f"row {i}: id {image_id} is already taken by other content"
                    ) from exc
                seq = int(cursor.lastrowid or 0)
                if row.thumbnail is not None:
                    conn.execute(
                        "INSERT INTO thumbnails(seq, data) VALUES (?, ?)", (seq, bytes(row.thumbnail))
                    )
                known[sha] = (image_id, seq)
                results.append(InsertResult(image_id, seq, True))
        return results

    def set_semantic(self, seqs: Sequence[int], semantic: np.ndarray) -> int:
        """Store semantic vectors on existing rows (one transaction), logging each update so other
        processes replay it (:meth:`semantic_updates_since`).

        Args:
            seqs: Internal ids; rows deleted meanwhile are skipped.
            semantic: (len(seqs), d_s) vectors.

        Returns:
            Rows updated.

        Raises:
            InvalidVectorError: Bad shape, values, or a d_s other than the recorded one.
            ReadOnlyStoreError: The catalog is read-only.
        """
        sem = self._check_semantic(semantic, len(seqs))
        if sem is None or not len(seqs):
            return 0
        updated = 0
        with self._db.write("storing semantic vectors") as conn:
            self._record_semantic_dim(conn, sem.shape[1])
            for seq, vector in zip(seqs, sem, strict=True):
                cursor = conn.execute(
                    "UPDATE images SET semantic = ? WHERE seq = ?", (vector.tobytes(), int(seq))
                )
                if cursor.rowcount:
                    conn.execute("INSERT INTO semantic_updates(seq) VALUES (?)", (int(seq),))
                    updated += 1
        return updated

    def delete(self, image_id: str) -> int | None:
        """Delete an image (its thumbnail cascades) and log a tombstone for other processes.

        Args:
            image_id: Public id.

        Returns:
            The deleted row's seq, or None if there was no such image.

        Raises:
            StoreFullError: No space for the tombstone (nothing is deleted).
            ReadOnlyStoreError: The catalog is read-only.
        """
        with self._db.write("deleting an image") as conn:
            row = conn.execute("SELECT seq FROM images WHERE id = ?", (image_id,)).fetchone()
            if row is None:
                return None
            seq = int(row[0])
            conn.execute("DELETE FROM images WHERE seq = ?", (seq,))
            conn.execute("INSERT INTO deletions(seq, deleted_at) VALUES (?, ?)", (seq, time.time()))
        return seq

    # ------------------------------------------------------------------ reads

    @staticmethod
    def _lookup_sha(conn: sqlite3.Connection, shas: Sequence[str]) -> dict[str, tuple[str, int]]:
        found: dict[str, tuple[str, int]] = {}
        for chunk in chunks(shas):
            marks = ",".join("?" * len(chunk))
            for sha, image_id, seq in conn.execute(
                f"SELECT sha256, id, seq FROM images WHERE sha256 IN ({marks})", tuple(chunk)
            ):
                found[str(sha)] = (str(image_id), int(seq))
        return found

    @staticmethod
    def _record(row: Sequence[Any]) -> ImageRecord:
        image_id, sha, source, width, height, nbytes, metadata, added_at = row
        try:
            meta = json.loads(metadata) if metadata else {}
        except json.JSONDecodeError as exc:
            raise CorruptStoreError(f"image {image_id}: metadata is not valid JSON") from exc
        if not isinstance(meta, dict):
            raise CorruptStoreError(f"image {image_id}: metadata is not a JSON object")
        return ImageRecord(
            id=image_id,
            sha256=sha,
            source=source,
            width=width,
            height=height,
            nbytes=nbytes,
            metadata=meta,
            added_at=float(added_at),
        )

    def get(self, image_id: str) -> ImageRecord | None:
        """One image's record by public id, or None."""
        rows = self._db.fetchall(
            "reading an image", f"SELECT {_RECORD_COLUMNS} FROM images WHERE id = ?", (image_id,)
        )
        return self._record(rows[0]) if rows else None

    def seq_of(self, image_id: str) -> int | None:
        """An image's internal sequence number by public id, or None."""
        rows = self._db.fetchall("reading an image", "SELECT seq FROM images WHERE id = ?", (image_id,))
        return int(rows[0][0]) if rows else None

    def page(
        self, *, after_seq: int, limit: int, where: Filter | None = None
    ) -> list[tuple[int, ImageRecord]]:
        """Up to ``limit`` records with seq > ``after_seq``, in seq order (the primary key: no scan),
        only those matching ``where`` when given.

        Seqs only grow and are never reused, so paging by the last seq seen never repeats an image
        and never skips one that existed throughout, whatever is added or deleted between pages.
        """
        rows = self._page_rows("listing images", _RECORD_COLUMNS, after_seq, limit, where)
        return [(int(row[0]), self._record(row[1:])) for row in rows]

    def export_page(
        self, *, after_seq: int, limit: int, where: Filter | None = None
    ) -> list[tuple[int, ExportedImage]]:
        """Up to ``limit`` images with seq > ``after_seq`` (matching ``where``), in seq order, each
        with every vector it holds: one bounded page of ``deepfeat export``."""
        columns = f"{_RECORD_COLUMNS}, vector, {self._semantic_column}"
        rows = self._page_rows("exporting images", columns, after_seq, limit, where)
        width = self._dim * _VECTOR_DTYPE.itemsize
        out = []
        for row in rows:
            blob, semantic = row[-2], row[-1]
            if not blob or len(blob) % width:
                raise CorruptStoreError(
                    f"catalog holds a vector whose size is not {self._dim} float32 values"
                )
            vectors = np.frombuffer(blob, dtype=_VECTOR_DTYPE).astype(np.float32).reshape(-1, self._dim)
            sem = (
                None if semantic is None else np.frombuffer(semantic, dtype=_VECTOR_DTYPE).astype(np.float32)
            )
            out.append((int(row[0]), ExportedImage(self._record(row[1:-2]), vectors, sem)))
        return out

    def _page_rows(
        self, action: str, columns: str, after_seq: int, limit: int, where: Filter | None
    ) -> list[Any]:
        """``seq, columns`` of up to ``limit`` rows after ``after_seq`` (matching ``where``), in seq order."""
        sql = f"SELECT seq, {columns} FROM images WHERE seq > ?"
        params: tuple[Any, ...] = (int(after_seq),)
        if where is not None and not where.matches_all:
            self._check_filterable()
            sql += f" AND seq IN ({where.sql})"
            params += where.params
        return self._db.fetchall(action, sql + " ORDER BY seq LIMIT ?", (*params, int(limit)))

    @property
    def _semantic_column(self) -> str:
        return "semantic" if self.has_semantic_column else "NULL"

    def match(self, where: Filter) -> np.ndarray:
        """The seqs of the images matching a filter, sorted (int64), answered from SQLite's indexes."""
        if not where.matches_all:
            self._check_filterable()
        sql, params = where.sql, where.params
        # The same filter is typically asked again (an album, paging, a batch of queries): the set is
        # kept until the catalog changes (a new row or a deletion moves the watermarks).
        key = (sql, params, self.watermarks())
        with self._match_lock:
            cached = self._match_cache.get(key)
            if cached is not None:
                self._match_cache.move_to_end(key)
                return cached
        with self._db.read("filtering images") as conn:
            # One string built by SQLite and parsed by numpy: 3.5x faster than a Python tuple per row
            # (500k matches: 46 ms against 162).
            text = conn.execute(f"SELECT group_concat(seq) FROM ({sql})", params).fetchone()[0]
        seqs = np.fromstring(text, dtype=np.int64, sep=",") if text else np.empty(0, np.int64)
        seqs.sort()
        seqs.setflags(write=False)
        with self._match_lock:
            self._match_cache[key] = seqs
            while len(self._match_cache) > _MATCH_CACHE_SIZE:
                self._match_cache.popitem(last=False)
        return seqs

    def _check_filterable(self) -> None:
        if not self.has_metadata_table:
            raise InvalidFilterError(
                f"the catalog {self.path} predates metadata filters; open the store once read-write "
                "(any deepfeat command on it) to index its metadata"
            )

    @property
    def has_metadata_table(self) -> bool:
        """False for a catalog older than schema version 3 opened read-only (not migrated yet)."""
        return self._db.version >= 3

    def get_many_by_seq(self, seqs: Iterable[int]) -> dict[int, ImageRecord]:
        """Records for FAISS hits.

        Args:
            seqs: Internal ids; missing ones (deleted meanwhile) are simply absent from the result.

        Returns:
            ``{seq: record}``.
        """
        wanted = list(dict.fromkeys(int(s) for s in seqs))
        out: dict[int, ImageRecord] = {}
        with self._db.read("reading images") as conn:
            for chunk in chunks(wanted):
                marks = ",".join("?" * len(chunk))
                for row in conn.execute(
                    f"SELECT seq, {_RECORD_COLUMNS} FROM images WHERE seq IN ({marks})", tuple(chunk)
                ):
                    out[int(row[0])] = self._record(row[1:])
        return out

    def find_sha256(self, shas: Iterable[str]) -> dict[str, str]:
        """Which content hashes are already stored.

        Args:
            shas: sha256 hex digests.

        Returns:
            ``{sha256: id}`` for those found.
        """
        wanted = list(dict.fromkeys(s for s in shas if isinstance(s, str)))
        with self._db.read("looking up hashes") as conn:
            return {sha: image_id for sha, (image_id, _) in self._lookup_sha(conn, wanted).items()}

    def vectors_by_sha256(self, shas: Iterable[str]) -> dict[str, np.ndarray]:
        """The stored vectors of known contents.

        Args:
            shas: sha256 hex digests; unknown ones are simply absent from the result.

        Returns:
            ``{sha256: (dim,) float32 global vector}``.
        """
        wanted = list(dict.fromkeys(s for s in shas if isinstance(s, str)))
        with self._db.read("looking up hashes") as conn:
            found = self._lookup_sha(conn, wanted)
        sha_by_seq = {seq: sha for sha, (_, seq) in found.items()}
        out: dict[str, np.ndarray] = {}
        for seqs, vectors in self.vectors_for_seqs(list(sha_by_seq), global_only=True):
            for seq, vector in zip(seqs.tolist(), vectors, strict=True):
                out[sha_by_seq[int(seq)]] = vector
        return out

    def metadata_value_counts(self, key: str) -> dict[str, int]:
        """How many images carry each string value of a top-level metadata key.

        Args:
            key: A metadata key (1-64 letters, digits, ``_`` and ``-``).

        Returns:
            ``{value: count}``; images without the key, or with a non-string value, are not counted.

        Raises:
            InvalidArgumentError: A key with other characters.
        """
        if not isinstance(key, str) or not _META_KEY_RE.fullmatch(key):
            raise InvalidArgumentError(f"metadata key must be 1-64 of [A-Za-z0-9_-], got {key!r}")
        path = f'$."{key}"'
        with self._db.read("counting metadata values") as conn:
            rows = conn.execute(
                "SELECT json_extract(metadata, ?) AS v, count(*) FROM images "
                "WHERE json_type(metadata, ?) = 'text' GROUP BY v",
                (path, path),
            ).fetchall()
        return {str(value): int(count) for value, count in rows}

    def all_sha256(self, *, with_semantic: bool = False) -> set[str]:
        """Every stored content hash (64 bytes each: a million images is ~100 MB of Python strings);
        with ``with_semantic``, only those of images that have a semantic vector."""
        where = " WHERE semantic IS NOT NULL" if with_semantic and self.has_semantic_column else ""
        with self._db.read("listing hashes") as conn:
            return {row[0] for row in conn.execute("SELECT sha256 FROM images" + where)}

    def thumbnail(self, image_id: str) -> bytes | None:
        """The thumbnail bytes, or None when the image or its thumbnail does not exist."""
        rows = self._db.fetchall(
            "reading a thumbnail",
            "SELECT t.data FROM thumbnails t JOIN images i ON i.seq = t.seq WHERE i.id = ?",
            (image_id,),
        )
        return bytes(rows[0][0]) if rows else None

    def vectors_per_image(self) -> int:
        """The most vectors any image was stored with (1 for global descriptors only)."""
        rows = self._db.fetchall(
            "reading vectors per image", "SELECT value FROM meta WHERE key = 'vectors_per_image'"
        )
        return max(1, int(rows[0][0])) if rows else 1

    def count(self) -> int:
        """Number of images."""
        return int(self._db.fetchall("counting images", "SELECT COUNT(*) FROM images")[0][0])

    def count_now(self) -> int:
        """:meth:`count`, remembered until the watermarks move (COUNT(*) reads the whole table:
        ~4 ms at a million rows; the watermarks are two indexed reads)."""
        marks = self.watermarks()
        cached = self._count_cache
        if cached is not None and cached[0] == marks:
            return cached[1]
        count = self.count()
        self._count_cache = (marks, count)
        return count

    def watermarks(self) -> tuple[int, int]:
        """``(max_seq, max_deletion_rowid)`` ever assigned, in one read (cheap change detection).

        These come from ``sqlite_sequence``, so they count rows since deleted too: they only grow.
        """
        rows = dict(self._db.fetchall("reading watermarks", _WATERMARKS_SQL))
        return int(rows.get("images", 0)), int(rows.get("deletions", 0))

    def max_seq(self) -> int:
        """Highest seq ever assigned (0 when none)."""
        return self.watermarks()[0]

    def state(self) -> tuple[int, int, np.ndarray]:
        """Watermarks and every live seq, read in one consistent snapshot.

        Reconciling FAISS against this, then replaying changes after the watermarks, can neither miss
        nor double-apply a row.

        Returns:
            ``(max_seq, max_deletion_rowid, seqs)`` with seqs an int64 array.
        """
        with self._db.read("reading catalog state") as conn:
            rows = dict(conn.execute(_WATERMARKS_SQL))
            seqs = np.fromiter((r[0] for r in conn.execute("SELECT seq FROM images")), dtype=np.int64)
        return int(rows.get("images", 0)), int(rows.get("deletions", 0)), seqs

    def _decode(
        self, rows: Sequence[tuple[int, bytes]], *, global_only: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(seq, blob)`` rows -> ``(seqs, vectors)``, one entry per vector: an image's seq repeated
        once per vector (its global one first), or only the global vectors."""
        width = self._dim * _VECTOR_DTYPE.itemsize
        counts = np.fromiter((len(r[1]) // width for r in rows), dtype=np.int64, count=len(rows))
        if any(len(r[1]) % width or not len(r[1]) for r in rows):
            raise CorruptStoreError(f"catalog holds a vector whose size is not {self._dim} float32 values")
        seqs = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        if global_only:
            blob = b"".join(bytes(r[1][:width]) for r in rows)
            counts = np.ones_like(counts)
        else:
            blob = b"".join(r[1] for r in rows)
        flat = np.frombuffer(blob, dtype=_VECTOR_DTYPE)
        # (total vectors, dim), native byte order
        return np.repeat(seqs, counts), flat.astype(np.float32).reshape(-1, self._dim)

    def iter_vectors(
        self, *, after_seq: int = 0, batch: int = 10000, global_only: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream ``(seqs, vectors)`` for rows with seq > ``after_seq``, in seq order.

        Each chunk is its own short read, so a long rebuild never pins a WAL snapshot nor holds all
        vectors in memory. An image's vectors are never split between chunks.

        Args:
            after_seq: Exclusive lower bound.
            batch: Images per chunk.
            global_only: Only each image's global vector (the first), not its regional ones.

        Yields:
            ``(seqs (v,) int64, vectors (v, dim) float32)``, one entry per vector: an image's seq
            repeats once per vector (:func:`index.ids.vector_ids` names them for FAISS).
        """
        last = int(after_seq)
        while True:
            rows = self._db.fetchall(
                "reading vectors",
                "SELECT seq, vector FROM images WHERE seq > ? ORDER BY seq LIMIT ?",
                (last, int(batch)),
            )
            if not rows:
                return
            yield self._decode(rows, global_only=global_only)
            last = int(rows[-1][0])
            if len(rows) < batch:
                return

    def vectors_for_seqs(
        self, seqs: Sequence[int], *, batch: int = IN_CHUNK, global_only: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream ``(seqs, vectors)`` for the given seqs (missing ones are skipped), in seq order, as
        :meth:`iter_vectors` does.

        Yields:
            ``(seqs (v,) int64, vectors (v, dim) float32)``, one entry per vector.
        """
        for chunk in chunks(list(seqs), batch):
            marks = ",".join("?" * len(chunk))
            rows = self._db.fetchall(
                "reading vectors",
                f"SELECT seq, vector FROM images WHERE seq IN ({marks}) ORDER BY seq",
                tuple(int(s) for s in chunk),
            )
            if rows:
                yield self._decode(rows, global_only=global_only)

    def semantic_dim(self) -> int | None:
        """The dimension of the stored semantic vectors, None while none was ever stored."""
        rows = self._db.fetchall(
            "reading the semantic dim", "SELECT value FROM meta WHERE key = 'semantic_dim'"
        )
        return int(rows[0][0]) if rows else None

    @property
    def has_semantic_column(self) -> bool:
        """False for a catalog of schema version 1 opened read-only (not migrated yet): no semantic
        vectors, and every semantic read answers "none"."""
        return self._db.version >= 2

    def semantic_count(self) -> int:
        """Images that have a semantic vector."""
        if not self.has_semantic_column:
            return 0
        return int(
            self._db.fetchall(
                "counting semantic vectors", "SELECT COUNT(*) FROM images WHERE semantic IS NOT NULL"
            )[0][0]
        )

    @staticmethod
    def _decode_semantic(rows: Sequence[tuple[int, bytes]]) -> tuple[np.ndarray, np.ndarray]:
        seqs = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        sizes = {len(r[1]) for r in rows}
        if len(sizes) != 1 or not sizes.pop() or any(len(r[1]) % _VECTOR_DTYPE.itemsize for r in rows):
            raise CorruptStoreError("catalog holds semantic vectors of different or invalid sizes")
        flat = np.frombuffer(b"".join(r[1] for r in rows), dtype=_VECTOR_DTYPE)
        return seqs, flat.astype(np.float32).reshape(len(rows), -1)  # (n, d_s)

    def iter_semantic(
        self, *, after_seq: int = 0, upto_seq: int | None = None, batch: int = 10000
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream ``(seqs (n,) int64, semantic (n, d_s) float32)`` for rows with ``after_seq`` < seq
        <= ``upto_seq`` that have a semantic vector, in seq order, each chunk its own short read."""
        if not self.has_semantic_column:
            return
        last = int(after_seq)
        upper = np.iinfo(np.int64).max if upto_seq is None else int(upto_seq)
        while True:
            rows = self._db.fetchall(
                "reading semantic vectors",
                "SELECT seq, semantic FROM images WHERE seq > ? AND seq <= ? AND semantic IS NOT NULL "
                "ORDER BY seq LIMIT ?",
                (last, upper, int(batch)),
            )
            if not rows:
                return
            yield self._decode_semantic(rows)
            last = int(rows[-1][0])
            if len(rows) < batch:
                return

    def semantic_for_seqs(
        self, seqs: Sequence[int], *, batch: int = IN_CHUNK
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(seqs, (n, d_s))`` for those of ``seqs`` that exist and have a semantic vector, in seq order."""
        if not self.has_semantic_column:
            return
        for chunk in chunks(list(seqs), batch):
            marks = ",".join("?" * len(chunk))
            rows = self._db.fetchall(
                "reading semantic vectors",
                f"SELECT seq, semantic FROM images WHERE seq IN ({marks}) AND semantic IS NOT NULL "
                "ORDER BY seq",
                tuple(int(s) for s in chunk),
            )
            if rows:
                yield self._decode_semantic(rows)

    def iter_missing_semantic(
        self, *, after_seq: int = 0, batch: int = 1000
    ) -> Iterator[list[tuple[int, str, str | None]]]:
        """Rows without a semantic vector, as ``[(seq, sha256, source)]`` chunks in seq order."""
        if not self.has_semantic_column:
            raise ReadOnlyStoreError("this catalog predates semantic vectors; open it read-write to migrate")
        last = int(after_seq)
        while True:
            rows = self._db.fetchall(
                "listing images without semantic vectors",
                "SELECT seq, sha256, source FROM images WHERE seq > ? AND semantic IS NULL "
                "ORDER BY seq LIMIT ?",
                (last, int(batch)),
            )
            if not rows:
                return
            yield [(int(seq), str(sha), source) for seq, sha, source in rows]
            last = int(rows[-1][0])
            if len(rows) < batch:
                return

    def sync_marks(self) -> tuple[int, int, int]:
        """``(max_seq, max_deletion_rowid, max_semantic_update_rowid)`` in one read: the watermarks,
        plus the log of semantic vectors set on existing rows."""
        rows = dict(self._db.fetchall("reading watermarks", _SYNC_MARKS_SQL))
        return int(rows.get("images", 0)), int(rows.get("deletions", 0)), int(rows.get("semantic_updates", 0))

    def semantic_updates_since(self, rowid: int) -> tuple[list[int], int]:
        """Semantic vectors set on existing rows after a watermark: ``(seqs, new watermark)``."""
        if not self.has_semantic_column:
            return [], int(rowid)
        rows = self._db.fetchall(
            "reading semantic updates",
            "SELECT rowid, seq FROM semantic_updates WHERE rowid > ? ORDER BY rowid",
            (int(rowid),),
        )
        if not rows:
            return [], int(rowid)
        return [int(r[1]) for r in rows], int(rows[-1][0])

    def deleted_since(self, rowid: int) -> tuple[list[int], int]:
        """Tombstones after a watermark.

        Args:
            rowid: The last tombstone rowid already applied.

        Returns:
            ``(seqs deleted, new watermark)``; the watermark is unchanged when there is nothing new.
        """
        rows = self._db.fetchall(
            "reading deletions",
            "SELECT rowid, seq FROM deletions WHERE rowid > ? ORDER BY rowid",
            (int(rowid),),
        )
        if not rows:
            return [], int(rowid)
        return [int(r[1]) for r in rows], int(rows[-1][0])

    def quick_check(self) -> None:
        """Run ``PRAGMA quick_check``, then check that every stored vector has the catalog's dimension.

        Raises:
            CorruptStoreError: SQLite reports any problem (the first lines are in the message), or a row
                holds a vector of the wrong size.
        """
        try:
            rows = self._db.conn().execute("PRAGMA quick_check").fetchall()
        except sqlite3.DatabaseError as exc:
            raise CorruptStoreError(f"catalog {self.path} failed quick_check: {exc}") from exc
        problems = [str(r[0]) for r in rows if str(r[0]).lower() != "ok"]
        if problems:
            raise CorruptStoreError(f"catalog {self.path} failed quick_check: {'; '.join(problems[:5])}")
        # quick_check vouches for the file's structure, not for what the rows hold. A vector of the wrong
        # size would only surface on the next rebuild of the index, long after start-up said "ready".
        # length() of a BLOB reads no overflow pages, so this costs about what quick_check does.
        width = self._dim * _VECTOR_DTYPE.itemsize
        torn = self._db.fetchall(
            "checking vector sizes",
            "SELECT seq FROM images WHERE typeof(vector) != 'blob' OR length(vector) = 0 "
            "OR length(vector) % ? != 0 OR length(vector) > ? LIMIT 5",
            (width, width * MAX_VECTORS_PER_IMAGE),
        )
        if torn:
            seqs = ", ".join(str(r[0]) for r in torn)
            raise CorruptStoreError(
                f"catalog {self.path} holds vectors that are not {self._dim} float32 values (rows {seqs})"
            )
