"""Filesystem helpers shared by the manifest and the FAISS snapshot: atomic writes, checksums, the lock.

Private to ``index``: the public surface is :mod:`index.store`.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from deepfeat.index.errors import PermissionDeniedError, ReadOnlyFilesystemError, StoreError, StoreFullError
from deepfeat.index.files import PENDING_MARKER, QUARANTINE_DIR, QUARANTINE_KEEP

logger = logging.getLogger(__name__)

TMP_MARKER = ".tmp-"
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename inside it survives a power cut.

    Args:
        path: The directory.
    """
    fsync_file(path)  # a directory is flushed through a read-only descriptor like a file


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk (``faiss.write_index`` does not fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(path: Path) -> Path:
    """A unique temporary sibling of ``path`` (same dir, so ``os.replace`` is atomic)."""
    return path.with_name(f"{path.name}{TMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write a file so readers see the old or the new version, never a torn one.

    Writes to a temporary file in the same directory, fsyncs it, ``os.replace``s it over ``path`` and
    fsyncs the directory. The temporary file is removed on any failure.

    Args:
        path: Final location.
        write: Callable that writes the whole content to the path it is given.

    Raises:
        StoreFullError: The disk is full (ENOSPC/EDQUOT), translated from the underlying error.
        OSError: Any other filesystem error.
    """
    tmp = temp_path_for(path)
    try:
        with disk_full_translated(f"writing {path.name}"):
            write(tmp)
            fsync_file(tmp)
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """:func:`atomic_write` for an in-memory payload."""

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()

    atomic_write(path, _write)


def remove_stale_temps(directory: Path, name: str = "") -> int:
    """Delete temporary files left by a crashed writer of ``directory/name`` (every file of
    ``directory`` when ``name`` is empty: snapshots, manifests, whitening files share one naming rule,
    ``<name>.tmp-<pid>-<random>``, see :func:`temp_path_for`).

    Only safe while holding the exclusive store lock (every writer holds it while its temp file exists).

    Returns:
        How many files were removed.
    """
    removed = 0
    for stale in directory.glob(f"{name or '*'}{TMP_MARKER}*"):
        try:
            stale.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    if removed:
        logger.info("removed %d stale temporary file(s) for %s", removed, name or directory)
    return removed


def mark_pending(directory: Path, sha256: str) -> None:
    """Record, durably, that a snapshot with this checksum is about to replace ``vectors.faiss``."""
    marker = directory / f"{PENDING_MARKER}{sha256}"
    marker.touch()
    fsync_dir(directory)


def clear_pending(directory: Path) -> None:
    """Forget every pending snapshot once the manifest records the current one."""
    for marker in directory.glob(f"{PENDING_MARKER}*"):
        marker.unlink(missing_ok=True)


def was_pending(directory: Path, sha256: str) -> bool:
    """Whether a file with this checksum was being put in place when a writer stopped."""
    return (directory / f"{PENDING_MARKER}{sha256}").exists()


def quarantine(path: Path, *, keep: int = QUARANTINE_KEEP) -> Path:
    """Move a damaged file to ``quarantine/<name>.<time>-<pid>-<random>`` beside it, keeping the
    ``keep`` newest (by modification time)."""
    folder = path.parent / QUARANTINE_DIR
    folder.mkdir(exist_ok=True)
    target = folder / f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    os.replace(path, target)
    fsync_dir(path.parent)
    for old in sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime)[:-keep]:
        old.unlink(missing_ok=True)
    return target


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    """Stream a file through sha256 (snapshots can be GBs; never read them whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_disk_full(exc: BaseException) -> bool:
    """Whether an exception from a write means "no space left" (OS, SQLite, or FAISS's C++ writer)."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    if isinstance(exc, sqlite3.Error):
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        return "database or disk is full" in str(exc)
    # faiss raises RuntimeError("write error in ...: (No space left on device)") from its FileIOWriter.
    return isinstance(exc, RuntimeError) and os.strerror(errno.ENOSPC) in str(exc)


@contextmanager
def disk_full_translated(action: str) -> Iterator[None]:
    """Re-raise disk-full errors as :class:`StoreFullError`, leave everything else alone."""
    try:
        yield
    except StoreFullError:
        raise
    except (OSError, sqlite3.Error, RuntimeError) as exc:
        if is_disk_full(exc):
            raise StoreFullError(f"no space left while {action}: {exc}") from exc
        raise


class FileLock:
    """A process-level lock (``fcntl.flock`` on a file) that is also safe between threads.

    ``flock`` locks belong to the open file description, so two threads sharing the fd would both
    "hold" it; a thread lock in front serialises them. Re-entrant within a thread: only the outermost
    acquisition takes or drops the ``flock`` (and decides shared vs exclusive).
    """

    def __init__(self, path: Path, *, optional: bool = False) -> None:
        """Create the lock object (the file is opened on first use).

        Args:
            path: The lock file (created when the directory is writable, unless ``optional``).
            optional: For read-only stores: open the file read-only and never create it (a replica
                must not create files in a directory it only reads; ``flock`` works on a read-only
                descriptor), and when it does not exist, proceed unlocked instead of failing: the
                writer creates it when it first opens the store, so without it there is no writer
                to race with.
        """
        self._path = path
        self._optional = optional
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    def _open(self) -> int | None:
        if self._fd is None:
            if not self._optional:
                try:
                    self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
                    return self._fd
                except OSError:
                    pass  # a read-only data dir: a lock file that exists can still be flocked read-only
            try:
                self._fd = os.open(self._path, os.O_RDONLY)
            except OSError:
                if not self._optional:
                    raise
                logger.warning("cannot open lock file %s; continuing without it", self._path)
        return self._fd

    @contextmanager
    def hold(self, *, shared: bool = False) -> Iterator[None]:
        """Hold the lock for the ``with`` block.

        Args:
            shared: Take a shared lock (readers of the snapshot) instead of an exclusive one (writers).
        """
        with self._thread_lock:
            if self._depth == 0:
                fd = self._open()
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the lock file (releases any flock held by this object)."""
        with self._thread_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def check_writable(data_dir: Path) -> None:
    """Create the data dir when missing and make sure this process can write in it, so a read-only
    mount or a permission problem is one clear error before SQLite's "unable to open database file".

    Raises:
        ReadOnlyFilesystemError, PermissionDeniedError, StoreFullError: What the filesystem said.
    """
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = temp_path_for(data_dir / ".write-check")
        probe.touch()
        probe.unlink()
    except OSError as exc:
        if exc.errno == errno.EROFS:
            raise ReadOnlyFilesystemError(
                f"{data_dir} is on a read-only filesystem; remount it writable, or serve it read-only "
                "(DEEPFEAT_READ_ONLY=true) without writing to it"
            ) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise PermissionDeniedError(
                f"no permission to write in {data_dir} ({exc.strerror}); run as its owner or fix its permissions"
            ) from None
        if is_disk_full(exc):
            raise StoreFullError(f"no space left for {data_dir}") from None
        raise StoreError(f"cannot use {data_dir} as a data dir: {exc.strerror or exc}") from None
