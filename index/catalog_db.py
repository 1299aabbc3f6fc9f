"""The catalog's database: its schema and migrations, per-thread connections, transactions, errors.

Connections: one per thread (``threading.local``), all in WAL mode with ``synchronous=FULL``, so reads
in one thread run concurrently with a write in another (and with other processes). Writes use
``BEGIN IMMEDIATE`` (SQLite's own cross-process writer lock, with a busy timeout) and are also
serialised inside the process by a thread lock so threads queue instead of spinning on SQLITE_BUSY.
SQLite errors surface as the ``StoreError`` tree (:func:`translated`).

What the tables hold and every query on them: :mod:`index.catalog`.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deepfeat.index._fs import is_disk_full, network_mount
from deepfeat.index.errors import (
    CorruptStoreError,
    IncompatibleIndexError,
    ReadOnlyStoreError,
    StoreError,
    StoreFullError,
)

__all__ = [
    "IN_CHUNK",
    "READABLE_SINCE",
    "SCHEMA_VERSION",
    "Database",
    "chunks",
    "is_corruption",
    "translated",
]

logger = logging.getLogger(f"{__package__}.catalog")  # the catalog's logger, as before the split

IN_CHUNK = 900  # under SQLite's historical 999 host-parameter limit

_KIND = """CASE {t}.type WHEN 'integer' THEN 'n' WHEN 'real' THEN 'n' WHEN 'text' THEN 's'
    WHEN 'true' THEN 'b' WHEN 'false' THEN 'b' WHEN 'null' THEN 'z' WHEN 'array' THEN 'a' ELSE 'o' END"""
_META_ROWS = (
    "SELECT {seq}, t.key, "
    + _KIND.format(t="t")
    + ", CASE WHEN t.type IN ('array', 'object', 'null') THEN NULL ELSE t.atom END"
    + " FROM {rows}json_each({metadata}) AS t"
    + " UNION ALL SELECT {seq}, t.key, "
    + _KIND.format(t="e")
    + ", e.atom FROM {rows}json_each({metadata}) AS t, json_each(t.value) AS e"
    + " WHERE t.type = 'array' AND e.type NOT IN ('array', 'object')"
)
"""The metadata table's rows: of one image in the trigger, of every image in the migration."""

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
    [
        # Each image's semantic vector ((d_s,) float32, NULL in rows written before them or without
        # them), and a log of semantic vectors set on existing rows (``deepfeat add-semantic``) so other
        # processes replay those updates as they replay tombstones.
        "ALTER TABLE images ADD COLUMN semantic BLOB",
        """CREATE TABLE semantic_updates (
            rowid INTEGER PRIMARY KEY AUTOINCREMENT,
            seq INTEGER NOT NULL
        )""",
    ],
    [
        # Metadata filters (index.filters): one row per top-level metadata key of each image, and one
        # per scalar element of an array value, kept by a trigger from the JSON (SQLite's JSON1) and
        # removed with the image. ``value`` has no type affinity, so numbers stay numbers and strings
        # strings, and the index (key, kind, value) answers equality, ranges, $in and prefixes of any
        # key without a per-key index. kind: n(umber) s(tring) b(oolean) z (null) a(rray) o(bject).
        """CREATE TABLE image_meta (
            seq INTEGER NOT NULL REFERENCES images(seq) ON DELETE CASCADE,
            key TEXT NOT NULL,
            kind TEXT NOT NULL,
            value
        )""",
        "CREATE INDEX image_meta_by_value ON image_meta(key, kind, value, seq)",
        "CREATE INDEX image_meta_by_seq ON image_meta(seq)",
        "CREATE INDEX images_by_source ON images(source)",
        f"""CREATE TRIGGER image_meta_on_insert AFTER INSERT ON images BEGIN
            INSERT INTO image_meta(seq, key, kind, value) {_META_ROWS.format(seq="new.seq", metadata="new.metadata", rows="")};
        END""",
        f"INSERT INTO image_meta(seq, key, kind, value) {_META_ROWS.format(seq='images.seq', metadata='images.metadata', rows='images, ')}",
    ],
]
SCHEMA_VERSION = len(_MIGRATIONS)
READABLE_SINCE = 1
"""The oldest schema a read-only open reads as it is (the migrations after it only add a column and a
table; :class:`index.catalog.Catalog` answers "no semantic vectors" for them), so a replica of a store
whose writer has not migrated yet still serves visual search."""


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


def _on_read_only_filesystem(path: Path) -> bool:
    try:
        return bool(os.statvfs(path.parent).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def is_corruption(exc: sqlite3.Error) -> bool:
    """Whether SQLite says the file is damaged or not a database."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return True
    text = str(exc)
    return "malformed" in text or "not a database" in text


@contextmanager
def translated(action: str) -> Iterator[None]:
    """Map sqlite errors to the StoreError tree (disk full, corruption); re-raise anything else."""
    try:
        yield
    except StoreError:
        raise
    except sqlite3.Error as exc:
        if is_disk_full(exc):
            raise StoreFullError(f"no space left while {action}: {exc}") from exc
        if is_corruption(exc):
            raise CorruptStoreError(f"catalog is corrupt ({action}): {exc}") from exc
        raise StoreError(f"catalog error while {action}: {exc}") from exc
    except OSError as exc:
        if is_disk_full(exc):
            raise StoreFullError(f"no space left while {action}: {exc}") from exc
        raise


def chunks(items: Sequence[Any], size: int = IN_CHUNK) -> Iterator[Sequence[Any]]:
    """``items`` in slices of ``size`` (for ``IN (?, ?, ...)`` lists under the parameter limit)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Database:
    """One SQLite file: a connection per thread, read and write transactions, the schema version."""

    def __init__(self, path: Path, *, read_only: bool, busy_timeout_s: float) -> None:
        """Open the file (and when writable, create and migrate it).

        Args:
            path: The database file.
            read_only: Open with ``mode=ro``: no migrations, every write raises ReadOnlyStoreError.
            busy_timeout_s: How long a write waits for another process's write transaction.

        Raises:
            CorruptStoreError: The file is not a SQLite database.
            IncompatibleIndexError: The schema is newer than this code.
            StoreError: Read-only and the file is missing or needs a migration.
        """
        self.path = path
        self.read_only = read_only
        self._busy_ms = int(busy_timeout_s * 1000)
        self._local = threading.local()
        # One finalizer per thread's connection: it closes the connection when the thread's holder dies
        # (the thread ended: worker pools retire idle threads) or when close() calls it.
        self._conns: list[weakref.finalize[Any, Any]] = []
        self._conns_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        self.version = 0  # the schema version of the file (below SCHEMA_VERSION only when read-only)
        conn = self.conn()
        with translated("opening the catalog"):
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise IncompatibleIndexError(
                    f"catalog schema version {version} is newer than the supported {SCHEMA_VERSION}; "
                    "upgrade deepfeat",
                    differences={"schema_version": (version, SCHEMA_VERSION)},
                )
            self.version = version
            if version < SCHEMA_VERSION:
                if read_only and version >= READABLE_SINCE:
                    return
                if read_only:
                    raise StoreError(
                        f"catalog {self.path} has schema version {version}, needs {SCHEMA_VERSION}; "
                        "open it once read-write to migrate"
                    )
                self._migrate(conn)
                self.version = SCHEMA_VERSION

    def _connect(self) -> sqlite3.Connection:
        uri = self.path.resolve().as_uri() + ("?mode=ro" if self.read_only else "?mode=rwc")
        if self.read_only and (_on_read_only_filesystem(self.path) or network_mount(self.path) is not None):
            # A WAL database needs its -shm file even to read, which nobody can create on a read-only
            # mount, and which a network filesystem does not share between machines; on a read-only
            # mount nothing can change the file, and on a network one the open was refused while a
            # writer had it (check_local_filesystem), so SQLite may read it as immutable.
            uri += "&immutable=1"
        try:
            conn = sqlite3.connect(
                uri,
                uri=True,
                timeout=self._busy_ms / 1000,
                isolation_level=None,  # explicit BEGIN/COMMIT only
                check_same_thread=False,  # used by one thread, but close() may run in another
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open catalog {self.path}: {exc}") from exc
        try:
            with translated("configuring the catalog connection"):
                conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
                conn.execute("PRAGMA foreign_keys = ON")
                conn.execute("PRAGMA synchronous = FULL")
                if not self.read_only:
                    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                    if str(mode).lower() != "wal":
                        logger.warning("catalog %s: journal_mode is %s, not wal", self.path, mode)
                # Touch the schema so a file that is not a database fails here, not on first use.
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except StoreError as exc:
            conn.close()
            if self.read_only and "readonly database" in str(exc):
                # A WAL database can only be read where its -wal and -shm files exist (they do while a
                # writer has it open) or where this process may create them.
                raise StoreError(
                    f"cannot read catalog {self.path} read-only: SQLite needs {self.path.name}-wal and "
                    f"{self.path.name}-shm beside it, which exist while a writer has the store open; start "
                    "the writer first, or let this user create files in the data dir"
                ) from exc
            raise
        except BaseException:
            conn.close()
            raise
        return conn

    def conn(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
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

    def close(self) -> None:
        """Close every thread's connection. Idempotent."""
        self._closed = True
        with self._conns_lock:
            finalizers, self._conns = self._conns, []
        for finalize in finalizers:
            finalize()  # closes the connection now (once; a no-op if its thread already ended)

    @contextmanager
    def write(self, action: str) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on any exception."""
        if self.read_only:
            raise ReadOnlyStoreError(f"cannot {action}: the catalog is open read-only")
        conn = self.conn()
        with self._write_lock, translated(action):
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
    def read(self, action: str) -> Iterator[sqlite3.Connection]:
        """A consistent multi-statement read (one WAL snapshot)."""
        conn = self.conn()
        with translated(action):
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

    def fetchall(self, action: str, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run one statement on this thread's connection (its own implicit transaction); all its rows."""
        with translated(action):
            return self.conn().execute(sql, params).fetchall()

    def _migrate(self, conn: sqlite3.Connection) -> None:
        with self.write("migrating the catalog schema"):
            # Re-read inside the write lock: another process may have migrated meanwhile.
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            for target in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[target]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target + 1}")
                logger.info("catalog %s migrated to schema version %d", self.path, target + 1)
