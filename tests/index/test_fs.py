"""The data dir's environment: a network filesystem is refused for writing, and a lock that another
process holds (stopped, or just slow) is waited for within a bound and then named.

Network filesystems are fed to the detection as ``/proc/self/mountinfo`` text (no NFS server here),
and the detection is checked against the real mount table for what this machine does have. Locks are
held by real second processes, stopped with SIGSTOP like a suspended job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from deepfeat.index import _fs
from deepfeat.index._fs import (
    FileLock,
    check_local_filesystem,
    check_writable,
    lock_holders,
    lock_timeout,
    mount_of,
    network_mount,
)
from deepfeat.index.errors import NetworkFilesystemError, StoreLockedError
from deepfeat.index.store import CATALOG_FILE, LOCK_FILE, ImageStore
from tests.index._helpers import DIM, FINGERPRINT, new_images, unit_vectors

# ====================================================================================== helpers


@contextmanager
def held_lock(path: Path, *, stopped: bool = True, shared: bool = False) -> Iterator[subprocess.Popen[str]]:
    """Another process holding ``flock`` on ``path`` (exclusive unless ``shared``), SIGSTOPped unless
    ``stopped`` is False; killed on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = "LOCK_SH" if shared else "LOCK_EX"
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT, 0o644)\n"
        f"fcntl.flock(fd, fcntl.{kind})\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        if stopped:
            proc.send_signal(signal.SIGSTOP)
            _wait_for(lambda: _state(proc.pid) in ("T", "t"))
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def take(lock: FileLock, *, shared: bool = False) -> None:
    """Take and release ``lock`` once."""
    with lock.hold(shared=shared):
        pass


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()[0]


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def mountinfo_with(point: Path, fstype: str, source: str = "server:/export") -> str:
    """This machine's mount table plus a mount of ``fstype`` at ``point`` (mounted last, so on top)."""
    escaped = str(point).replace("\\", "\\134").replace(" ", "\\040")
    return (
        Path("/proc/self/mountinfo").read_text()
        + f"999 1 0:99 / {escaped} rw,relatime shared:99 - {fstype} {source} rw,vers=4.2\n"
    )


@pytest.fixture
def on_nfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path/share`` as every check in the process sees it: an NFS 4 mount."""
    share = tmp_path / "share"
    share.mkdir()
    table = mountinfo_with(share, "nfs4")
    monkeypatch.setattr(_fs, "read_mountinfo", lambda: table)
    return share


# ====================================================================================== network filesystems

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 27 0:40 / /srv rw,relatime - xfs /dev/vdb rw
41 40 0:41 / /srv/photos rw,relatime shared:7 - nfs4 nas:/photos rw,vers=4.2,addr=10.0.0.2
42 40 0:42 / /srv/my\\040share rw,relatime - cifs //nas/share rw,vers=3.1.1
43 41 0:43 / /srv/photos/cache rw,relatime - tmpfs tmpfs rw
44 40 0:44 / /srv/photos rw,relatime - ext4 /dev/vdc rw
45 27 0:45 / /mnt/c rw,noatime - 9p drvfs rw,aname=drvfs
"""


@pytest.mark.parametrize(
    ("path", "fstype", "network"),
    [
        ("/srv/data", "xfs", False),
        ("/srv/photos-old/data", "xfs", False),  # a prefix of the name is not a parent
        ("/srv/my share/data", "cifs", True),  # escaped space in the mount point
        ("/mnt/c/Users/me/data", "9p", True),
        ("/var/lib/deepfeat", "ext4", False),
    ],
)
def test_the_mount_holding_a_path_is_found_in_mountinfo(path: str, fstype: str, network: bool) -> None:
    mount = mount_of(Path(path), mountinfo=MOUNTINFO)
    assert mount is not None and mount.fstype == fstype
    assert (network_mount(Path(path), mountinfo=MOUNTINFO) is not None) is network


def test_the_last_mount_stacked_on_a_point_wins_and_a_nested_mount_is_its_own() -> None:
    # /srv/photos is NFS, then a local disk mounted over it: the local one is what a path there is on.
    assert mount_of(Path("/srv/photos/x"), mountinfo=MOUNTINFO).fstype == "ext4"  # type: ignore[union-attr]
    nested = mount_of(Path("/srv/photos/cache/x"), mountinfo=MOUNTINFO)
    assert nested is not None and nested.point == "/srv/photos/cache" and nested.fstype == "tmpfs"
    only_nfs = "\n".join(line for line in MOUNTINFO.splitlines() if not line.startswith("44 "))
    mount = network_mount(Path("/srv/photos/albums/data"), mountinfo=only_nfs)
    assert mount is not None and (mount.fstype, mount.source) == ("nfs4", "nas:/photos")


def test_the_real_mount_table_agrees_with_findmnt(tmp_path: Path) -> None:
    """On whatever this machine has (a data dir that does not exist yet is judged by its parent)."""
    found = subprocess.run(
        ["findmnt", "-n", "-o", "TARGET,FSTYPE", "--target", str(tmp_path)], capture_output=True, text=True
    )
    if found.returncode != 0:
        pytest.skip("findmnt is not available")
    target, fstype = found.stdout.split()
    for path in (tmp_path, tmp_path / "not" / "yet"):
        mount = mount_of(path)
        assert mount is not None and (mount.point, mount.fstype) == (target, fstype)
    assert network_mount(tmp_path) is None  # so the tests' own stores are local
    check_writable(tmp_path / "data")


def test_a_real_tmpfs_is_local(tmp_path: Path) -> None:
    from tests.index.test_corruption import small_filesystem

    with small_filesystem(tmp_path / "fs", 1) as fs:
        mount = mount_of(fs / "data")
        assert mount is not None and mount.fstype == "tmpfs" and mount.point == str(fs)
        check_writable(fs / "data")


def test_a_writer_on_a_network_filesystem_is_refused_before_anything_is_written(on_nfs: Path) -> None:
    data_dir = on_nfs / "data"
    with pytest.raises(NetworkFilesystemError) as caught:
        check_writable(data_dir)
    assert caught.value.code == "network_filesystem"
    message = str(caught.value)
    assert str(data_dir) in message and "nfs4" in message and "local disk" in message
    with pytest.raises(NetworkFilesystemError):
        ImageStore.open(data_dir, fingerprint=FINGERPRINT, dim=DIM)
    assert not data_dir.exists()


def test_a_read_only_open_there_reads_a_closed_store_as_immutable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy nobody writes: it opens, answers, and gets no -wal/-shm files (nothing written there)."""
    data_dir = tmp_path / "share" / "data"
    with ImageStore.open(data_dir, fingerprint=FINGERPRINT, dim=DIM) as store:
        store.add(unit_vectors(5, seed=1), new_images(5))
    before = sorted(p.name for p in data_dir.iterdir())
    assert f"{CATALOG_FILE}-wal" not in before  # a closed store has no write-ahead log
    table = mountinfo_with(tmp_path / "share", "nfs")
    monkeypatch.setattr(_fs, "read_mountinfo", lambda: table)
    with ImageStore.open(data_dir, fingerprint=FINGERPRINT, dim=DIM, read_only=True) as replica:
        assert replica.count == 5
        assert replica.search(unit_vectors(5, seed=1)[:1], 1)[0][0].score > 0.999
        assert sorted(p.name for p in data_dir.iterdir()) == before


def test_a_read_only_open_there_is_refused_while_a_writer_has_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its newest rows live in the write-ahead log, which an immutable read would skip."""
    data_dir = tmp_path / "share" / "data"
    with ImageStore.open(data_dir, fingerprint=FINGERPRINT, dim=DIM) as writer:
        writer.add(unit_vectors(3, seed=2), new_images(3))
        assert (data_dir / f"{CATALOG_FILE}-wal").stat().st_size > 0
        table = mountinfo_with(tmp_path / "share", "cifs", "//nas/share")
        monkeypatch.setattr(_fs, "read_mountinfo", lambda: table)
        with pytest.raises(NetworkFilesystemError, match=r"cifs .*write-ahead log in use") as caught:
            ImageStore.open(data_dir, fingerprint=FINGERPRINT, dim=DIM, read_only=True)
        assert caught.value.code == "network_filesystem"
        with pytest.raises(NetworkFilesystemError):  # the read-only check does not let a writer through
            check_local_filesystem(data_dir, read_only=False)


# ====================================================================================== the lock


def test_a_stopped_holder_is_named_after_the_timeout(tmp_path: Path) -> None:
    path = tmp_path / LOCK_FILE
    with held_lock(path) as holder:
        lock = FileLock(path, timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(StoreLockedError) as caught:
            take(lock)
        waited = time.monotonic() - started
        assert 0.5 <= waited < 2.0, waited
        assert caught.value.code == "store_locked" and caught.value.holder_pid == holder.pid
        message = str(caught.value)
        assert (
            f"pid {holder.pid} (" in message
            and "stopped" in message
            and f"kill -CONT {holder.pid}" in message
        )
        assert str(tmp_path) in message and "0.5 s" in message
        with pytest.raises(StoreLockedError):  # a reader waits for a writer's lock the same way
            take(FileLock(path, optional=True, timeout_s=0.2), shared=True)
    with lock.hold():  # the holder is gone: the lock is free again
        pass
    lock.close()


def test_a_running_holder_is_waited_for_and_the_lock_taken_when_it_lets_go(tmp_path: Path) -> None:
    path = tmp_path / LOCK_FILE
    with held_lock(path, stopped=False) as holder:
        with pytest.raises(
            StoreLockedError, match=r"wait for it to finish .*DEEPFEAT_LOCK_TIMEOUT_S"
        ) as caught:
            take(FileLock(path, timeout_s=0.2))
        assert caught.value.holder_pid == holder.pid and "stopped" not in str(caught.value)
        lock = FileLock(path, timeout_s=20)
        releaser = subprocess.Popen(["sh", "-c", f"sleep 0.5; kill {holder.pid}"])
        started = time.monotonic()
        with lock.hold():
            assert 0.3 < time.monotonic() - started < 10
        releaser.wait()
        lock.close()


def test_shared_holders_let_readers_in_and_keep_a_writer_out(tmp_path: Path) -> None:
    path = tmp_path / LOCK_FILE
    with held_lock(path, shared=True) as holder:
        with FileLock(path, optional=True, timeout_s=0.2).hold(shared=True):
            pass
        with pytest.raises(StoreLockedError) as caught:
            take(FileLock(path, timeout_s=0.2))
        assert caught.value.holder_pid == holder.pid


def test_the_timeout_comes_from_the_enclosing_scope_and_the_store_open(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with ImageStore.open(data_dir, fingerprint=FINGERPRINT, dim=DIM):
        pass
    assert FileLock(tmp_path / "x").timeout_s == _fs.DEFAULT_LOCK_TIMEOUT_S
    with lock_timeout(0.3):
        assert FileLock(tmp_path / "x").timeout_s == 0.3
    with held_lock(data_dir / LOCK_FILE):
        started = time.monotonic()
        with pytest.raises(StoreLockedError):
            ImageStore.open(data_dir, fingerprint=FINGERPRINT, dim=DIM, lock_timeout_s=0.3)
        with pytest.raises(StoreLockedError):
            ImageStore.open(data_dir, fingerprint=FINGERPRINT, dim=DIM, read_only=True, lock_timeout_s=0.3)
        assert time.monotonic() - started < 5


def test_an_add_never_waits_for_the_lock_for_its_automatic_snapshot(tmp_path: Path) -> None:
    """The snapshot is a restart cache: an add whose snapshot is due goes on when another process
    holds the lock, and a later add writes the snapshot once the lock is free."""
    data_dir = tmp_path / "data"
    with ImageStore.open(data_dir, fingerprint=FINGERPRINT, dim=DIM, snapshot_every=2) as store:
        with held_lock(data_dir / LOCK_FILE):
            started = time.monotonic()
            store.add(unit_vectors(4, seed=3), new_images(4))
            assert time.monotonic() - started < 5  # the default timeout is 30 s
            assert store.count == 4
            snapshot = store.manifest.snapshot
            assert snapshot is None or snapshot.count < 4
        store.add(unit_vectors(1, seed=4), new_images(1, start=10))
        assert store.manifest.snapshot is not None and store.manifest.snapshot.count == 5


def test_lock_holders_reads_proc_locks(tmp_path: Path) -> None:
    path = tmp_path / LOCK_FILE
    path.touch()
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
        text = (
            f"1: FLOCK  ADVISORY  WRITE {os.getpid()} {dev}:{st.st_ino} 0 EOF\n"
            f"1: -> FLOCK  ADVISORY  WRITE 99999 {dev}:{st.st_ino} 0 EOF\n"  # a waiter, not a holder
            f"2: POSIX  ADVISORY  READ 4242 {dev}:{st.st_ino + 1} 0 EOF\n"  # another file
        )
        holders = lock_holders(fd, proc_locks=text)
        assert [h.pid for h in holders] == [os.getpid()]
        assert holders[0].command is not None and not holders[0].stopped
        assert lock_holders(fd, proc_locks="") == []
    finally:
        os.close(fd)
