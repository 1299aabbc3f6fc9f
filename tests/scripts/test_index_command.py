"""`deepfeat index` (and the other writers) when the environment fails: a full disk, a read-only or
network filesystem, a lock another process holds: one line with the code and what was committed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepfeat.index.store import LOCK_FILE, ImageStore
from deepfeat.scripts.bench_extract import make_photo_set
from tests.conftest import FAST_FLAGS
from tests.index.test_corruption import fill, small_filesystem
from tests.index.test_fs import held_lock, mountinfo_with
from tests.scripts.test_kill import _catalog_count


def test_a_full_disk_is_one_line_with_the_committed_count(tmp_path: Path) -> None:
    photos = make_photo_set(tmp_path / "photos", 60, seed=7, sizes=[(640, 480), (480, 640)])
    assert len(photos) == 60
    with small_filesystem(tmp_path / "mnt", 6) as mnt:
        data = mnt / "data"
        ballast = fill(mnt, leave=700 * 1024)
        done = subprocess.run(
            [sys.executable, "-m", "deepfeat.scripts.cli", "index", str(tmp_path / "photos"), "--data-dir",
             str(data), *FAST_FLAGS, "--workers", "0", "--batch-size", "4", "--no-progress"],
            capture_output=True, text=True, check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip
        assert done.returncode == 2, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("error [")]
        assert len(errors) == 1 and errors[0].startswith("error [storage_full]: "), done.stderr
        match = re.search(r"(\d+) images were committed before it and the store holds (\d+)", errors[0])
        assert match is not None and int(match.group(1)) == int(match.group(2)) < 60
        os.unlink(ballast)
        with ImageStore.open(data, fingerprint=_fingerprint(data), dim=_dim(data), read_only=True) as store:
            assert store.count == int(match.group(2))


def _fingerprint(data: Path) -> dict:
    manifest = ImageStore.read_manifest(data)
    assert manifest is not None
    return manifest.fingerprint


def _dim(data: Path) -> int:
    manifest = ImageStore.read_manifest(data)
    assert manifest is not None
    return manifest.dim


def test_sigterm_stops_the_indexer_with_one_line_and_loses_nothing(tmp_path: Path) -> None:
    import signal
    import time

    make_photo_set(tmp_path / "photos", 60, seed=11, sizes=[(640, 480), (480, 640)])
    data = tmp_path / "data"
    argv = ["index", str(tmp_path / "photos"), "--data-dir", str(data), *FAST_FLAGS, "--workers", "0",
            "--batch-size", "4", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepfeat.scripts.cli", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while _catalog_count(data) < 8:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err and err.count("\n") == 1, err
    match = re.match(r"interrupted: (\d+) images were committed and the store holds (\d+)", err)
    assert match is not None and int(match.group(1)) == int(match.group(2)) < 60
    done = subprocess.run(
        [sys.executable, "-m", "deepfeat.scripts.cli", *argv], capture_output=True, text=True
    )
    assert done.returncode == 0 and f"already present {match.group(2)}," in done.stdout, (
        done.stdout + done.stderr
    )


def test_a_read_only_filesystem_is_one_line_for_every_writer(tmp_path: Path) -> None:
    """A new data dir, or an existing store, on a read-only mount: each writer says so in one line
    with its code and exits 2, no traceback; read-only commands (search, export) still work."""
    make_photo_set(tmp_path / "photos", 4, seed=3, sizes=[(320, 240)])
    run = _runner(tmp_path)
    assert run("index", str(tmp_path / "photos"), "--data-dir", str(tmp_path / "rw" / "data")).returncode == 0
    with small_filesystem(tmp_path / "empty", 1):
        subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "empty")], check=True)
        done = run("index", str(tmp_path / "photos"), "--data-dir", str(tmp_path / "empty" / "data"))
        _one_line_error(done, "read_only_filesystem")
    mount = tmp_path / "ro"
    mount.mkdir()
    subprocess.run(["mount", "--bind", str(tmp_path / "rw"), str(mount)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mount)], check=True)
        data = str(mount / "data")
        for argv in (
            ["index", str(tmp_path / "photos"), "--data-dir", data],
            ["whiten", "--data-dir", data, "--dim", "2"],
            ["build-index", "--data-dir", data, "--index", "IVF2,Flat"],
            ["import", str(tmp_path / "export.jsonl"), "--data-dir", data],
        ):
            if argv[0] == "import":
                assert (
                    run(
                        "export",
                        "--data-dir",
                        data,
                        "--out",
                        str(tmp_path / "export.jsonl"),
                        "--format",
                        "jsonl",
                    ).returncode
                    == 0
                )
            _one_line_error(run(*argv), "read_only_filesystem")
        query = next((tmp_path / "photos").iterdir())
        assert run("search", str(query), "--data-dir", data, "-k", "1").returncode == 0
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _runner(tmp_path: Path, **env: str):  # type: ignore[no-untyped-def]
    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        flags = [*FAST_FLAGS, "--workers", "0", "--no-progress"] if argv[0] == "index" else []
        return subprocess.run(
            [sys.executable, "-m", "deepfeat.scripts.cli", *argv, *flags],
            capture_output=True, text=True, check=False,
            env={**os.environ, "PYTHONWARNINGS": "ignore", **env},
        )  # fmt: skip

    return run


def _one_line_error(done: subprocess.CompletedProcess[str], code: str) -> str:
    """The one ``error [code]: ...`` line of a command that exited 2 without a traceback."""
    assert done.returncode == 2, (done.args, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error [")]
    assert len(errors) == 1 and errors[0].startswith(f"error [{code}]: "), (done.args, done.stderr)
    return errors[0]


def test_a_stopped_lock_holder_is_one_line_naming_it(tmp_path: Path) -> None:
    """Another process holds the store's lock and is stopped (SIGSTOP): the writer gives up after
    DEEPFEAT_LOCK_TIMEOUT_S with the holder's pid, instead of waiting forever."""
    make_photo_set(tmp_path / "photos", 4, seed=5, sizes=[(320, 240)])
    data = tmp_path / "data"
    with held_lock(data / LOCK_FILE) as holder:
        started = time.monotonic()
        done = _runner(tmp_path, DEEPFEAT_LOCK_TIMEOUT_S="1")(
            "index", str(tmp_path / "photos"), "--data-dir", str(data)
        )
        assert time.monotonic() - started < 60
        line = _one_line_error(done, "store_locked")
        assert f"pid {holder.pid} (" in line and "stopped" in line and f"kill -CONT {holder.pid}" in line
        assert "committed" not in line  # nothing was: the open itself waited
    done = _runner(tmp_path)("index", str(tmp_path / "photos"), "--data-dir", str(data))
    assert done.returncode == 0 and "store now holds 4 images" in done.stdout, done.stderr


def test_build_index_gives_up_on_a_stopped_lock_holder_after_the_setting(tmp_path: Path) -> None:
    """build-index runs its build in a child process: DEEPFEAT_LOCK_TIMEOUT_S reaches it too."""
    from tests.index._helpers import DIM, FINGERPRINT, new_images, unit_vectors

    data = tmp_path / "data"
    with ImageStore.open(data, fingerprint=FINGERPRINT, dim=DIM) as store:
        store.add(unit_vectors(300, seed=1), new_images(300))
    with held_lock(data / LOCK_FILE) as holder:
        started = time.monotonic()
        done = _runner(tmp_path, DEEPFEAT_LOCK_TIMEOUT_S="1")(
            "build-index", "--data-dir", str(data), "--index", "IVF4,Flat", "--no-progress"
        )
        assert time.monotonic() - started < 20  # the default (30 s) would have been waited otherwise
        line = _one_line_error(done, "store_locked")
        assert f"pid {holder.pid} (" in line
    manifest = ImageStore.read_manifest(data)
    assert manifest is not None and manifest.generation is None


def test_a_lock_taken_during_the_run_fails_the_final_snapshot_with_the_committed_count(
    tmp_path: Path,
) -> None:
    """Every image is committed, the snapshot after them cannot be written: that is not a success
    (exit 2, one line, with the count), and the store holds exactly that count."""
    make_photo_set(tmp_path / "photos", 24, seed=9, sizes=[(320, 240)])
    data = tmp_path / "data"
    argv = [sys.executable, "-m", "deepfeat.scripts.cli", "index", str(tmp_path / "photos"), "--data-dir",
            str(data), *FAST_FLAGS, "--workers", "0", "--batch-size", "2", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "DEEPFEAT_LOCK_TIMEOUT_S": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while _catalog_count(data) < 2:  # past the open: the indexer holds no lock while it adds
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        with held_lock(data / LOCK_FILE, stopped=False) as holder:
            out, err = proc.communicate(timeout=180)
            committed = _catalog_count(data)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    line = _one_line_error(done, "store_locked")
    assert f"pid {holder.pid}" in line
    match = re.search(r"(\d+) images were committed before it and the store holds (\d+)", line)
    assert match is not None and int(match.group(1)) == int(match.group(2)) == committed == 24, line
    with ImageStore.open(data, fingerprint=_fingerprint(data), dim=_dim(data), read_only=True) as store:
        assert store.count == 24


def test_a_data_dir_on_a_network_filesystem_is_one_line_for_writers_and_readable_by_readers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Over NFS (as the mount table says): index and whiten refuse in one line, nothing written;
    search and export read a store nobody writes (as an immutable copy)."""
    from deepfeat.index import _fs
    from deepfeat.scripts.cli import main

    make_photo_set(tmp_path / "photos", 3, seed=4, sizes=[(320, 240)])
    data = tmp_path / "share" / "data"
    assert _runner(tmp_path)("index", str(tmp_path / "photos"), "--data-dir", str(data)).returncode == 0
    files = sorted(p.name for p in data.iterdir())
    table = mountinfo_with(tmp_path / "share", "nfs4", "nas:/export")
    monkeypatch.setattr(_fs, "read_mountinfo", lambda: table)
    capsys.readouterr()
    for argv in (
        [
            "index",
            str(tmp_path / "photos"),
            "--data-dir",
            str(data),
            *FAST_FLAGS,
            "--workers",
            "0",
            "--no-progress",
        ],
        ["index", str(tmp_path / "photos"), "--data-dir", str(tmp_path / "share" / "new"), *FAST_FLAGS],
        ["whiten", "--data-dir", str(data), "--dim", "2"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if line.startswith("error [")]
        assert len(errors) == 1 and errors[0].startswith("error [network_filesystem]: "), err
        assert "nfs4 (nas:/export)" in errors[0] and "local disk" in errors[0]
    assert not (tmp_path / "share" / "new").exists()
    query = str(next((tmp_path / "photos").iterdir()))
    assert main(["search", query, "--data-dir", str(data), "-k", "1"]) == 0
    out = tmp_path / "export.jsonl"
    assert main(["export", "--data-dir", str(data), "--out", str(out), "--format", "jsonl"]) == 0
    assert "exported 3 images" in capsys.readouterr().out
    assert sorted(p.name for p in data.iterdir()) == files  # nothing written to the share


def test_the_committed_count_falls_back_when_the_catalog_cannot_be_read(tmp_path: Path) -> None:
    """The failure being reported may be the catalog's own: the one-line message still gets a count."""
    from deepfeat.index.errors import CorruptStoreError
    from deepfeat.scripts.index_command import _committed
    from tests.index._helpers import DIM, FINGERPRINT, new_images, unit_vectors

    with ImageStore.open(tmp_path / "data", fingerprint=FINGERPRINT, dim=DIM) as store:
        store.add(unit_vectors(5), new_images(5))
        assert _committed(store) == 5

        def unreadable() -> int:
            raise CorruptStoreError("the catalog cannot be read")

        store.committed_count = unreadable  # type: ignore[method-assign]
        assert _committed(store) == store.count == 5
