"""`deepfeat index` when the environment fails: a full disk is one line with what was committed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from deepfeat.index.store import ImageStore
from deepfeat.scripts.bench_extract import make_photo_set
from tests.conftest import FAST_FLAGS
from tests.index.test_corruption import fill, small_filesystem
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
