"""The SQLite catalog: the source of truth for every acknowledged image, its metadata and its vector.

One row per distinct image content (sha256). ``seq`` (INTEGER PRIMARY KEY AUTOINCREMENT) is the int64
id FAISS uses and is never exposed; ``id`` (uuid4 hex) is the public, stable id. AUTOINCREMENT
guarantees a ``seq`` is never reused, and because SQLite has one writer at a time, rows become visible
in ``seq`` order: "every row with seq <= N" is a valid watermark for catching up incrementally.
Deletions leave a tombstone in ``deletions`` so other processes can replay them the same way.

Connections: one per thread (``threading.local``), all in WAL mode with ``synchronous=FULL``, so reads
in one thread run concurrently with a write in another (and with other processes). Writes use
``BEGIN IMMEDIATE`` (SQLite's own cross-process writer lock, with a busy timeout) and are also
serialised inside the process by a thread lock so threads queue instead of spinning on SQLITE_BUSY.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from deepfeat.index._fs import is_disk_full
from deepfeat.index.errors import (
    CorruptStoreError,
    IncompatibleIndexError,
    InvalidArgumentError,
    InvalidVectorError,
    ReadOnlyStoreError,
    StoreError,
    StoreFullError,
)

__all__ = ["SCHEMA_VERSION", "Catalog", "CatalogRow", "ImageRecord", "InsertResult"]

logger = logging.getLogger(__name__)

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_IN_CHUNK = 900  # under SQLite's historical 999 host-parameter limit
_VECTOR_DTYPE = np.dtype("<f4")

# Each migration is a list of statements applied in one transaction together with the user_version bump.
_MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE images (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT UNIQUE NOT NULL,
            sha256 TEXT UNIQUE NOT NULL,
            source TEXT,
            width INTEGER,
            height INTEGER,
            nbytes INTEGER,
            metadata TEXT NOT NULL DEFAULT '{}',
            added_at REAL NOT NULL,
            vector BLOB NOT NULL
        )""",
        """CREATE TABLE thumbnails (
            seq INTEGER PRIMARY KEY REFERENCES images(seq) ON DELETE CASCADE,
            data BLOB NOT NULL
        )""",
        """CREATE TABLE deletions (
            rowid INTEGER PRIMARY KEY AUTOINCREMENT,
            seq INTEGER NOT NULL,
            deleted_at REAL NOT NULL
        )""",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ],
]
SCHEMA_VERSION = len(_MIGRATIONS)

_RECORD_COLUMNS = "id, sha256, source, width, height, nbytes, metadata, added_at"


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
class CatalogRow:
    """One image to insert: its content hash, descriptive fields, vector and optional thumbnail."""

    sha256: str
    source: str | None
    width: int | None
    height: int | None
    nbytes: int | None
    vector: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    thumbnail: bytes | None = None


class InsertResult(NamedTuple):
    """Outcome of inserting one row: its public id, its internal seq, and whether it is new."""

    id: str
    seq: int
    created: bool


class _ThreadConnection:
    """Holds one thread's connection; lives exactly as long as that thread's ``threading.local``."""

    __slots__ = ("conn", "__weakref__")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn


def _close_connection(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error:  # pragma: no cover - closing a connection in use by another thread
        logger.warning("error closing a catalog connection", exc_info=True)


def _is_corruption(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return True
    text = str(exc)
    return "malformed" in text or "not a database" in text


@contextmanager
def _translated(action: str) -> Iterator[None]:
    """Map sqlite errors to the StoreError tree (disk full, corruption); re-raise anything else."""
    try:
        yield
    except StoreError:
        raise
    except sqlite3.Error as exc:
        if is_disk_full(exc):
            raise StoreFullError(f"no space left while {action}: {exc}") from exc
        if _is_corruption(exc):
            raise CorruptStoreError(f"catalog is corrupt ({action}): {exc}") from exc
        raise StoreError(f"catalog error while {action}: {exc}") from exc
    except OSError as exc:
        if is_disk_full(exc):
            raise StoreFullError(f"no space left while {action}: {exc}") from exc
        raise


def _chunks(items: Sequence[Any], size: int = _IN_CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Catalog:
    """SQLite wrapper; see the module docstring for the concurrency model."""

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
        self._path = Path(path)
        self._dim = dim
        self._read_only = read_only
        self._busy_ms = int(busy_timeout_s * 1000)
        self._local = threading.local()
        # One finalizer per thread's connection: it closes the connection when the thread's holder dies
        # (the thread ended: worker pools retire idle threads) or when close() calls it.
        self._conns: list[weakref.finalize[Any, Any]] = []
        self._conns_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        conn = self._conn()
        with _translated("opening the catalog"):
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise IncompatibleIndexError(
                    f"catalog schema version {version} is newer than the supported {SCHEMA_VERSION}; "
                    "upgrade deepfeat",
                    differences={"schema_version": (version, SCHEMA_VERSION)},
                )
            if version < SCHEMA_VERSION:
                if read_only:
                    raise StoreError(
                        f"catalog {self._path} has schema version {version}, needs {SCHEMA_VERSION}; "
                        "open it once read-write to migrate"
                    )
                self._migrate(conn)

    # ------------------------------------------------------------------ connections

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def read_only(self) -> bool:
        """Whether writes are refused."""
        return self._read_only

    def _connect(self) -> sqlite3.Connection:
        uri = self._path.resolve().as_uri() + ("?mode=ro" if self._read_only else "?mode=rwc")
        try:
            conn = sqlite3.connect(
                uri,
                uri=True,
                timeout=self._busy_ms / 1000,
                isolation_level=None,  # explicit BEGIN/COMMIT only
                check_same_thread=False,  # used by one thread, but close() may run in another
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open catalog {self._path}: {exc}") from exc
        try:
            with _translated("configuring the catalog connection"):
                conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
                conn.execute("PRAGMA foreign_keys = ON")
                conn.execute("PRAGMA synchronous = FULL")
                if not self._read_only:
                    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                    if str(mode).lower() != "wal":
                        logger.warning("catalog %s: journal_mode is %s, not wal", self._path, mode)
                # Touch the schema so a file that is not a database fails here, not on first use.
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except StoreError as exc:
            conn.close()
            if self._read_only and "readonly database" in str(exc):
                # A WAL database can only be read where its -wal and -shm files exist (they do while a
                # writer has it open) or where this process may create them.
                raise StoreError(
                    f"cannot read catalog {self._path} read-only: SQLite needs {self._path.name}-wal and "
                    f"{self._path.name}-shm beside it, which exist while a writer has the store open; start "
                    "the writer first, or let this user create files in the data dir"
                ) from exc
            raise
        except BaseException:
            conn.close()
            raise
        return conn

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError("catalog is closed")
        holder: _ThreadConnection | None = getattr(self._local, "holder", None)
        if holder is None:
            conn = self._connect()
            holder = _ThreadConnection(conn)
            self._local.holder = holder
            # The thread-local is the holder's only strong reference, so when the thread ends the holder
            # goes and the finalizer closes its connection: a server whose thread pool churns would
            # otherwise keep a connection (three open files and a page cache) per thread it ever had.
            with self._conns_lock:
                self._conns = [f for f in self._conns if f.alive]
                self._conns.append(weakref.finalize(holder, _close_connection, conn))
        return holder.conn

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (for tests and diagnostics; do not start transactions on it)."""
        return self._conn()

    def close(self) -> None:
        """Close every thread's connection. Idempotent."""
        self._closed = True
        with self._conns_lock:
            finalizers, self._conns = self._conns, []
        for finalize in finalizers:
            finalize()  # closes the connection now (once; a no-op if its thread already ended)

    @contextmanager
    def _write(self, action: str) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on any exception."""
        if self._read_only:
            raise ReadOnlyStoreError(f"cannot {action}: the catalog is open read-only")
        conn = self._conn()
        with self._write_lock, _translated(action):
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        logger.warning("rollback failed while %s", action, exc_info=True)
                raise

    @contextmanager
    def _read(self, action: str) -> Iterator[sqlite3.Connection]:
        """A consistent multi-statement read (one WAL snapshot)."""
        conn = self._conn()
        with _translated(action):
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        with self._write("migrating the catalog schema"):
            # Re-read inside the write lock: another process may have migrated meanwhile.
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            for target in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[target]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target + 1}")
                logger.info("catalog %s migrated to schema version %d", self._path, target + 1)

    # ------------------------------------------------------------------ meta

    def get_meta(self, key: str) -> str | None:
        """A value from the ``meta`` table, or None."""
        with _translated("reading meta"):
            row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Set a ``meta`` value (own transaction)."""
        with self._write("writing meta") as conn:
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # ------------------------------------------------------------------ writes

    def _encode(self, index: int, row: CatalogRow) -> tuple[Any, ...]:
        """Validate one row before the transaction starts and build its INSERT parameters."""
        if not isinstance(row.sha256, str) or not _SHA256_RE.fullmatch(row.sha256):
            raise InvalidArgumentError(
                f"row {index}: sha256 must be 64 lowercase hex characters, got {str(row.sha256)[:80]!r}"
            )
        vector = np.asarray(row.vector)
        if vector.shape != (self._dim,):
            raise InvalidVectorError(
                f"row {index}: vector must have shape ({self._dim},), got {vector.shape}"
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

    def insert_many(self, rows: Sequence[CatalogRow]) -> list[InsertResult]:
        """Insert images in ONE transaction, deduplicating on sha256.

        A sha256 already in the catalog, or repeated within ``rows``, is not inserted again: its result
        carries the existing id with ``created=False``. Either every new row is committed or none is.

        Args:
            rows: The images to insert.

        Returns:
            One result per input row, in input order.

        Raises:
            InvalidArgumentError / InvalidVectorError: A row is malformed (nothing is written).
            StoreFullError: The disk or database is full (the transaction is rolled back).
            ReadOnlyStoreError: The catalog is read-only.
        """
        encoded = [self._encode(i, row) for i, row in enumerate(rows)]
        if not encoded:
            return []
        results: list[InsertResult] = []
        with self._write("adding images") as conn:
            known = self._lookup_sha(conn, list(dict.fromkeys(params[0] for params in encoded)))
            now = time.time()
            for params, row in zip(encoded, rows, strict=True):
                sha = params[0]
                if sha in known:
                    image_id, seq = known[sha]
                    results.append(InsertResult(image_id, seq, False))
                    continue
                image_id = uuid.uuid4().hex
                cursor = conn.execute(
                    "INSERT INTO images(id, sha256, source, width, height, nbytes, metadata, vector, added_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (image_id, *params, now),
                )
                seq = int(cursor.lastrowid or 0)
                if row.thumbnail is not None:
                    conn.execute(
                        "INSERT INTO thumbnails(seq, data) VALUES (?, ?)", (seq, bytes(row.thumbnail))
                    )
                known[sha] = (image_id, seq)
                results.append(InsertResult(image_id, seq, True))
        return results

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
        with self._write("deleting an image") as conn:
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
        for chunk in _chunks(shas):
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
        with _translated("reading an image"):
            row = (
                self._conn()
                .execute(f"SELECT {_RECORD_COLUMNS} FROM images WHERE id = ?", (image_id,))
                .fetchone()
            )
        return None if row is None else self._record(row)

    def get_many_by_seq(self, seqs: Iterable[int]) -> dict[int, ImageRecord]:
        """Records for FAISS hits.

        Args:
            seqs: Internal ids; missing ones (deleted meanwhile) are simply absent from the result.

        Returns:
            ``{seq: record}``.
        """
        wanted = list(dict.fromkeys(int(s) for s in seqs))
        out: dict[int, ImageRecord] = {}
        with self._read("reading images") as conn:
            for chunk in _chunks(wanted):
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
        with self._read("looking up hashes") as conn:
            return {sha: image_id for sha, (image_id, _) in self._lookup_sha(conn, wanted).items()}

    def all_sha256(self) -> set[str]:
        """Every stored content hash (64 bytes each: a million images is ~100 MB of Python strings)."""
        with self._read("listing hashes") as conn:
            return {row[0] for row in conn.execute("SELECT sha256 FROM images")}

    def thumbnail(self, image_id: str) -> bytes | None:
        """The thumbnail bytes, or None when the image or its thumbnail does not exist."""
        with _translated("reading a thumbnail"):
            row = (
                self._conn()
                .execute(
                    "SELECT t.data FROM thumbnails t JOIN images i ON i.seq = t.seq WHERE i.id = ?",
                    (image_id,),
                )
                .fetchone()
            )
        return None if row is None else bytes(row[0])

    def count(self) -> int:
        """Number of images."""
        with _translated("counting images"):
            return int(self._conn().execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def watermarks(self) -> tuple[int, int]:
        """``(max_seq, max_deletion_rowid)`` ever assigned, in one read (cheap change detection).

        These come from ``sqlite_sequence``, so they count rows since deleted too: they only grow.
        """
        with _translated("reading watermarks"):
            rows = dict(
                self._conn().execute(
                    "SELECT name, seq FROM sqlite_sequence WHERE name IN ('images', 'deletions')"
                )
            )
        return int(rows.get("images", 0)), int(rows.get("deletions", 0))

    def max_seq(self) -> int:
        """Highest seq ever assigned (0 when none)."""
        return self.watermarks()[0]

    def max_deletion_rowid(self) -> int:
        """Highest tombstone rowid (0 when none)."""
        return self.watermarks()[1]

    def state(self) -> tuple[int, int, np.ndarray]:
        """Watermarks and every live seq, read in one consistent snapshot.

        Reconciling FAISS against this, then replaying changes after the watermarks, can neither miss
        nor double-apply a row.

        Returns:
            ``(max_seq, max_deletion_rowid, seqs)`` with seqs an int64 array.
        """
        with self._read("reading catalog state") as conn:
            rows = dict(
                conn.execute("SELECT name, seq FROM sqlite_sequence WHERE name IN ('images', 'deletions')")
            )
            seqs = np.fromiter((r[0] for r in conn.execute("SELECT seq FROM images")), dtype=np.int64)
        return int(rows.get("images", 0)), int(rows.get("deletions", 0)), seqs

    def _decode(self, blobs: Sequence[bytes]) -> np.ndarray:
        width = self._dim * _VECTOR_DTYPE.itemsize
        if any(len(b) != width for b in blobs):
            raise CorruptStoreError(f"catalog holds a vector whose size is not {self._dim} float32 values")
        flat = np.frombuffer(b"".join(blobs), dtype=_VECTOR_DTYPE)
        return flat.astype(np.float32).reshape(len(blobs), self._dim)  # (n, dim), native byte order

    def iter_vectors(
        self, *, after_seq: int = 0, batch: int = 10000
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream ``(seqs, vectors)`` for rows with seq > ``after_seq``, in seq order.

        Each chunk is its own short read, so a long rebuild never pins a WAL snapshot nor holds all
        vectors in memory.

        Args:
            after_seq: Exclusive lower bound.
            batch: Rows per chunk.

        Yields:
            ``(seqs (b,) int64, vectors (b, dim) float32)``.
        """
        last = int(after_seq)
        while True:
            with _translated("reading vectors"):
                rows = (
                    self._conn()
                    .execute(
                        "SELECT seq, vector FROM images WHERE seq > ? ORDER BY seq LIMIT ?",
                        (last, int(batch)),
                    )
                    .fetchall()
                )
            if not rows:
                return
            seqs = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            yield seqs, self._decode([r[1] for r in rows])
            last = int(seqs[-1])
            if len(rows) < batch:
                return

    def vectors_for_seqs(
        self, seqs: Sequence[int], *, batch: int = _IN_CHUNK
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream ``(seqs, vectors)`` for the given seqs (missing ones are skipped).

        Yields:
            ``(seqs (b,) int64, vectors (b, dim) float32)``.
        """
        for chunk in _chunks(list(seqs), batch):
            marks = ",".join("?" * len(chunk))
            with _translated("reading vectors"):
                rows = (
                    self._conn()
                    .execute(
                        f"SELECT seq, vector FROM images WHERE seq IN ({marks}) ORDER BY seq",
                        tuple(int(s) for s in chunk),
                    )
                    .fetchall()
                )
            if rows:
                yield (
                    np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)),
                    self._decode([r[1] for r in rows]),
                )

    def deleted_since(self, rowid: int) -> tuple[list[int], int]:
        """Tombstones after a watermark.

        Args:
            rowid: The last tombstone rowid already applied.

        Returns:
            ``(seqs deleted, new watermark)``; the watermark is unchanged when there is nothing new.
        """
        with _translated("reading deletions"):
            rows = (
                self._conn()
                .execute("SELECT rowid, seq FROM deletions WHERE rowid > ? ORDER BY rowid", (int(rowid),))
                .fetchall()
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
            rows = self._conn().execute("PRAGMA quick_check").fetchall()
        except sqlite3.DatabaseError as exc:
            raise CorruptStoreError(f"catalog {self._path} failed quick_check: {exc}") from exc
        problems = [str(r[0]) for r in rows if str(r[0]).lower() != "ok"]
        if problems:
            raise CorruptStoreError(f"catalog {self._path} failed quick_check: {'; '.join(problems[:5])}")
        # quick_check vouches for the file's structure, not for what the rows hold. A vector of the wrong
        # size would only surface on the next rebuild of the index, long after start-up said "ready".
        # length() of a BLOB reads no overflow pages, so this costs about what quick_check does.
        width = self._dim * _VECTOR_DTYPE.itemsize
        with _translated("checking vector sizes"):
            torn = (
                self._conn()
                .execute(
                    "SELECT seq FROM images WHERE typeof(vector) != 'blob' OR length(vector) != ? LIMIT 5",
                    (width,),
                )
                .fetchall()
            )
        if torn:
            seqs = ", ".join(str(r[0]) for r in torn)
            raise CorruptStoreError(
                f"catalog {self._path} holds vectors that are not {self._dim} float32 values (rows {seqs})"
            )
