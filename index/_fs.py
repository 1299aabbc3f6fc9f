"""Filesystem helpers shared by the manifest and the FAISS snapshot: atomic writes, checksums, the lock,
and the checks that a data dir's filesystem can hold a store.

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
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from deepfeat.index.errors import (
    NetworkFilesystemError,
    PermissionDeniedError,
    ReadOnlyFilesystemError,
    StoreError,
    StoreFullError,
    StoreLockedError,
)
from deepfeat.index.files import CATALOG_FILE, PENDING_MARKER, QUARANTINE_DIR, QUARANTINE_KEEP

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


DEFAULT_LOCK_TIMEOUT_S = 30.0
"""How long a process waits for the store's lock while another process holds it. Every legitimate
hold is short at the sizes a single writer serves (a snapshot, a manifest write, an open's catch-up),
so a wait this long means a holder that is stopped (SIGSTOP, Ctrl-Z, a debugger) or hung."""

_lock_timeout: ContextVar[float] = ContextVar("deepfeat_lock_timeout_s", default=DEFAULT_LOCK_TIMEOUT_S)


@contextmanager
def lock_timeout(seconds: float) -> Iterator[None]:
    """Let every :class:`FileLock` created inside the block wait at most ``seconds`` for another process.

    The locks are created deep inside an open or a publish; a scoped value reaches them there without
    passing the setting through every step's signature.
    """
    if seconds < 0:
        raise ValueError(f"a lock timeout must be >= 0 seconds, got {seconds!r}")
    token = _lock_timeout.set(float(seconds))
    try:
        yield
    finally:
        _lock_timeout.reset(token)


class FileLock:
    """A process-level lock (``fcntl.flock`` on a file) that is also safe between threads.

    ``flock`` locks belong to the open file description, so two threads sharing the fd would both
    "hold" it; a thread lock in front serialises them. Re-entrant within a thread: only the outermost
    acquisition takes or drops the ``flock`` (and decides shared vs exclusive).

    Waiting for another process is bounded: ``flock`` itself would block forever behind a holder that
    was stopped (SIGSTOP) or hangs, so the lock is polled without blocking until ``timeout_s`` passes,
    then :class:`StoreLockedError` names the holder (from ``/proc/locks``) and what it is doing.
    """

    def __init__(self, path: Path, *, optional: bool = False, timeout_s: float | None = None) -> None:
        """Create the lock object (the file is opened on first use).

        Args:
            path: The lock file (created when the directory is writable, unless ``optional``).
            optional: For read-only stores: open the file read-only and never create it (a replica
                must not create files in a directory it only reads; ``flock`` works on a read-only
                descriptor), and when it does not exist, proceed unlocked instead of failing: the
                writer creates it when it first opens the store, so without it there is no writer
                to race with.
            timeout_s: Seconds to wait for another process's lock (default: the value of the
                enclosing :func:`lock_timeout`, else :data:`DEFAULT_LOCK_TIMEOUT_S`).
        """
        self._path = path
        self._optional = optional
        self.timeout_s = _lock_timeout.get() if timeout_s is None else timeout_s
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
    def hold(self, *, shared: bool = False, timeout_s: float | None = None) -> Iterator[None]:
        """Hold the lock for the ``with`` block.

        Args:
            shared: Take a shared lock (readers of the snapshot) instead of an exclusive one (writers).
            timeout_s: Wait at most this long for another process (default: the lock's ``timeout_s``);
                0 tries once.

        Raises:
            StoreLockedError: Another process held the lock for the whole wait.
        """
        with self._thread_lock:
            if self._depth == 0:
                fd = self._open()
                if fd is not None:
                    wait = self.timeout_s if timeout_s is None else timeout_s
                    self._acquire(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, wait)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _acquire(self, fd: int, operation: int, wait: float) -> None:
        deadline = time.monotonic() + wait
        pause = 0.005
        while True:
            try:
                fcntl.flock(fd, operation | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                raise _locked_error(self._path, fd, wait)
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.1)  # a short hold (a snapshot) is caught within 0.1 s of its end

    def close(self) -> None:
        """Close the lock file (releases any flock held by this object)."""
        with self._thread_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


@dataclass(frozen=True)
class LockHolder:
    """A process that holds a lock, as ``/proc`` describes it."""

    pid: int
    command: str | None  # its command line, shortened; None when /proc does not show it
    stopped: bool  # SIGSTOP, Ctrl-Z or a debugger: it will not release the lock by itself

    def __str__(self) -> str:
        """``pid 1234 (deepfeat index photos; stopped)``."""
        notes = [note for note in (self.command, "stopped" if self.stopped else None) if note]
        return f"pid {self.pid}" + (f" ({'; '.join(notes)})" if notes else "")


def lock_holders(fd: int, *, proc_locks: str | None = None) -> list[LockHolder]:
    """The processes holding a lock on the file open as ``fd`` (Linux ``/proc/locks``; [] elsewhere).

    Args:
        fd: An open descriptor of the lock file.
        proc_locks: The text of ``/proc/locks`` (read when None).
    """
    st = os.fstat(fd)
    if proc_locks is None:
        try:
            proc_locks = Path("/proc/locks").read_text()
        except OSError:
            return []
    exact = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids: list[int] = []
    same_inode: list[int] = []
    for line in proc_locks.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; waiters have "->" after the number
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->":
            continue
        try:
            pid = int(fields[4])
        except ValueError:
            continue
        if pid <= 0:  # a holder in another pid namespace: not nameable from here
            continue
        if fields[5] == exact:
            pids.append(pid)
        elif fields[5].rsplit(":", 1)[-1] == str(st.st_ino):  # overlay filesystems report another device
            same_inode.append(pid)
    return [_describe(pid) for pid in dict.fromkeys(pids or same_inode)]


def _describe(pid: int) -> LockHolder:
    command: str | None = None
    stopped = False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        words = [os.fsdecode(a) for a in argv if a]
        if words:
            words[0] = Path(words[0]).name
            command = " ".join(" ".join(words).split())  # one line, whatever the arguments hold
            command = command if len(command) <= 100 else command[:97] + "..."
        stat = Path(f"/proc/{pid}/stat").read_text()
        stopped = stat[stat.rindex(")") + 2 :].split()[0] in ("T", "t")
    except (OSError, ValueError, IndexError):
        pass
    return LockHolder(pid=pid, command=command, stopped=stopped)


def _locked_error(path: Path, fd: int, wait: float) -> StoreLockedError:
    holders = lock_holders(fd)
    data_dir = path.parent
    longer = "or wait longer (DEEPFEAT_LOCK_TIMEOUT_S)"
    if not holders:
        return StoreLockedError(
            f"the store in {data_dir} is locked by another process, which did not let go within {wait:g} s; "
            f"wait for it to finish or end it, {longer}"
        )
    who = ", ".join(str(h) for h in holders)
    first = holders[0]
    if first.stopped:
        advice = f"it is stopped: resume it (kill -CONT {first.pid}) or end it"
    else:
        advice = f"wait for it to finish or end it, {longer}"
    return StoreLockedError(
        f"the store in {data_dir} is locked by {who}, which did not let go within {wait:g} s; {advice}",
        holder_pid=first.pid,
    )


# ====================================================================================== filesystems

NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ncpfs",
        "afs",
        "coda",
        "9p",
        "fuse.sshfs",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "fuse.rclone",
        "fuse.goofys",
    }
)
"""Filesystem types (as ``/proc/self/mountinfo`` names them) where a store cannot be written safely:
SQLite's write-ahead log keeps its index in memory shared through the ``-shm`` file, which these do
not keep coherent between machines (https://sqlite.org/wal.html), and ``flock`` there is emulated,
local to one client, or absent. Cluster filesystems with coherent POSIX locking (Lustre, GPFS, CephFS)
are not listed."""


@dataclass(frozen=True)
class Mount:
    """The mount that holds a path, from ``/proc/self/mountinfo``."""

    point: str
    fstype: str
    source: str


def read_mountinfo() -> str | None:
    """The text of ``/proc/self/mountinfo`` (None where there is none: not Linux)."""
    try:
        return Path("/proc/self/mountinfo").read_text()
    except OSError:
        return None


def _unescape(field: str) -> str:
    """Mountinfo writes space, tab, newline and backslash in paths as octal escapes (``\\040``)."""
    for escaped, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escaped, char)
    return field


def mount_of(path: Path, *, mountinfo: str | None = None) -> Mount | None:
    """The mount that holds ``path`` (which need not exist yet).

    Args:
        path: Any path.
        mountinfo: The text of ``/proc/self/mountinfo`` (read when None).

    Returns:
        The mount with the longest mount point containing the resolved path (the last one mounted
        there when several are stacked), or None without mountinfo.
    """
    text = read_mountinfo() if mountinfo is None else mountinfo
    if not text:
        return None
    target = Path(os.path.realpath(path))  # symlinks resolved; parts that do not exist yet kept
    best: Mount | None = None
    for line in text.splitlines():
        # "36 35 98:0 /root /mnt/point rw,noatime shared:1 - nfs4 server:/export rw,vers=4.2"
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        dash = fields.index("-", 6)
        if len(fields) < dash + 3:
            continue
        point = _unescape(fields[4])
        if not target.is_relative_to(point):
            continue
        if best is None or len(point) >= len(best.point):
            best = Mount(point=point, fstype=fields[dash + 1], source=_unescape(fields[dash + 2]))
    return best


def network_mount(path: Path, *, mountinfo: str | None = None) -> Mount | None:
    """The mount holding ``path`` when it is a network filesystem (:data:`NETWORK_FILESYSTEMS`), else None."""
    mount = mount_of(path, mountinfo=mountinfo)
    return mount if mount is not None and mount.fstype in NETWORK_FILESYSTEMS else None


def check_local_filesystem(data_dir: Path, *, read_only: bool, mountinfo: str | None = None) -> None:
    """Refuse a data dir on a network filesystem for writing, and for reading while a writer uses it.

    A writer needs SQLite's WAL and the store's lock to work, which they do not there. A read-only
    open is allowed: the catalog is then read as an immutable file (no ``-shm``, no locks), which is
    exact for a store that nobody writes, such as a copy. A catalog with a write-ahead log in use
    (``catalog.sqlite3-wal`` not empty) has a writer, or had one that stopped without closing it: its
    newest rows are in that log, which an immutable read skips, so that open is refused too.

    Args:
        data_dir: The data dir (need not exist yet).
        read_only: The open is read-only.
        mountinfo: The text of ``/proc/self/mountinfo`` (read when None).

    Raises:
        NetworkFilesystemError: What the filesystem is and what to do instead.
    """
    mount = network_mount(data_dir, mountinfo=mountinfo)
    if mount is None:
        return
    where = f"{data_dir} is on {mount.fstype} ({mount.source}), a network filesystem"
    if not read_only:
        raise NetworkFilesystemError(
            f"{where}: a writer there could corrupt the catalog (SQLite's write-ahead log needs memory "
            "shared by the processes of one machine, and the store's lock does not hold across machines); "
            "put the data dir on a local disk; other machines may serve a copy of it read-only"
        )
    wal = data_dir / f"{CATALOG_FILE}-wal"
    try:
        in_use = wal.stat().st_size > 0
    except OSError:
        in_use = False
    if in_use:
        raise NetworkFilesystemError(
            f"{where}, and its catalog has a write-ahead log in use ({wal.name}): a writer has the store "
            "open, or one stopped without closing it. Over the network the catalog is read as an immutable "
            "file, which would miss those rows; serve a copy made while no writer runs, or read it on the "
            "machine whose local disk holds it"
        )
    logger.warning(
        "%s: reading the store as an immutable copy (changes made while it is open are not seen)", where
    )


def check_writable(data_dir: Path) -> None:
    """Create the data dir when missing and make sure this process can write in it, so a network
    filesystem, a read-only mount or a permission problem is one clear error before SQLite's "unable to
    open database file" (or, on a network filesystem, before a catalog corrupted later).

    Raises:
        NetworkFilesystemError, ReadOnlyFilesystemError, PermissionDeniedError, StoreFullError: What
            the filesystem is or said.
    """
    check_local_filesystem(data_dir, read_only=False)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = temp_path_for(data_dir / ".write-check")
        probe.touch()
        probe.unlink(missing_ok=True)  # another writer's open may have swept it (its lock, not ours)
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
