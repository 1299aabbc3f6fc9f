"""``deepfeat build-index`` (a lean child process), ``serve --read-only`` flags, and ``bench build`` on a
tiny store. No timing is asserted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from deepfeat.index.manifest import Manifest
from deepfeat.index.store import MANIFEST_FILE, ImageStore
from deepfeat.scripts import bench_build, build_index
from deepfeat.scripts.cli import build_parser, main
from tests.index._helpers import DIM, FINGERPRINT, new_images, unit_vectors


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    data_dir = tmp_path / "store"
    with ImageStore.open(data_dir, fingerprint=FINGERPRINT, dim=DIM) as store:
        store.add(unit_vectors(300, seed=1), new_images(300))
    return data_dir


def test_build_index_publishes_and_reports(store_dir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    argv = ["build-index", "--data-dir", str(store_dir), "--index", "IVF4,Flat", "--max-memory", "512MiB"]
    assert main([*argv, "--nprobe", "4", "--json", "--no-progress"]) == 0
    summary = json.loads(capfd.readouterr().out)
    assert summary["generation"] == 1 and summary["count"] == 300 and summary["factory"] == "IVF4,Flat"
    assert summary["build"]["search_params"] == {"nprobe": 4} and summary["budget_bytes"] == 512 * 2**20
    # The child's own peak: numpy + FAISS + the index package, not the front-end's torch.
    assert 0 < summary["peak_rss_bytes"] < 512 * 2**20
    manifest = Manifest.load(store_dir / MANIFEST_FILE)
    assert manifest is not None and manifest.generation is not None and manifest.generation.number == 1

    assert main([*argv, "--no-progress"]) == 0
    out = capfd.readouterr().out
    assert out.startswith("published generation 2: 300 vectors, IVF4,Flat") and "generation 1 is kept" in out


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        (["--index", "HNSW32"], "invalid_argument"),
        (["--index", "IVF4,Flat", "--max-memory", "8MiB"], "memory_budget"),
        (["--index", "IVF4,Flat", "--max-memory", "lots"], "invalid_argument"),
    ],
)
def test_build_index_errors_are_one_line_with_a_code(
    store_dir: Path, capfd: pytest.CaptureFixture[str], extra: list[str], code: str
) -> None:
    assert main(["build-index", "--data-dir", str(store_dir), *extra]) == 2
    out, err = capfd.readouterr()
    assert out == "" and err.startswith(f"error [{code}]: ") and err.count("\n") == 1
    assert Manifest.load(store_dir / MANIFEST_FILE).generation is None  # type: ignore[union-attr]


def test_build_index_on_a_missing_store(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert build_index.main(["--data-dir", str(tmp_path / "none"), "--index", "IVF4,Flat"]) == 2
    assert capfd.readouterr().err.startswith("error [store_error]: no store in")
    assert not (tmp_path / "none").exists()


def test_serve_read_only_flag_reaches_the_settings() -> None:
    args = build_parser().parse_args(["serve", "--read-only"])
    assert args.read_only is True
    assert build_parser().parse_args(["serve"]).read_only is None  # unset: DEEPFEAT_READ_ONLY decides


def test_bench_build_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    argv = ["--n", "2000", "--dim", "16", "--queries", "20", "--index", "IVF8,Flat", "--nprobe", "1,8"]
    argv += [
        "--max-memory",
        "512MiB",
        "--data-dir",
        str(tmp_path / "b"),
        "--json",
        str(out),
        "--single-queries",
        "5",
    ]
    assert bench_build.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["fill"]["filled"] is True and report["build"]["count"] == 2000
    assert report["build"]["peak_rss_bytes"] > 0 and report["build"]["build"]["plan"]["n_vectors"] == 2000
    by_nprobe = {row["nprobe"]: row["recall"] for row in report["search"]["by_nprobe"]}
    assert by_nprobe[8] == 1.0 and by_nprobe[1] <= 1.0  # every list probed with flat codes: exact
    assert "recall@10" in capsys.readouterr().out
    # A second run reuses the filled store and publishes generation 2.
    assert bench_build.main(argv) == 0
    again = json.loads(out.read_text())
    assert again["fill"]["filled"] is False and again["search"]["generation"] == 2


def test_exact_top_k_matches_argsort() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((1000, 8)).astype(np.float32)
    queries = rng.standard_normal((7, 8)).astype(np.float32)
    expected = np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :5]
    assert (bench_build.exact_top_k(base, queries, 5, chunk=128) == expected).all()


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


_BUILD_ARGV = ["build-index", "--index", "IVF256,PQ8", "--max-memory", "512MiB", "--no-progress"]


@pytest.fixture
def large_store(tmp_path: Path) -> Path:
    """40,000 vectors: enough that the build child runs for seconds, long enough to be stopped."""
    data_dir = tmp_path / "store"
    with ImageStore.open(data_dir, fingerprint=FINGERPRINT, dim=DIM) as store:
        for start in range(0, 40_000, 10_000):
            store.add(unit_vectors(10_000, seed=start), new_images(10_000, start=start))
    return data_dir


def _start_build(data_dir: Path) -> tuple[subprocess.Popen[str], list[int]]:
    """``deepfeat build-index`` as a process of its own; returns it once its build child runs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepfeat.scripts.cli", *_BUILD_ARGV, "--data-dir", str(data_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not (children := _children(proc.pid)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.02)
    time.sleep(0.5)  # the child is importing FAISS or already training (the whole build takes seconds)
    return proc, children


def _wait_gone(children: list[int]) -> None:
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children):
        assert time.monotonic() < deadline, "the build child outlived the command"
        time.sleep(0.05)


def _rebuild_publishes(data_dir: Path) -> None:
    """A re-run completes and publishes; an abandoned partial directory is swept by that publish."""
    assert main([*_BUILD_ARGV, "--data-dir", str(data_dir)]) == 0
    manifest = Manifest.load(data_dir / MANIFEST_FILE)
    assert manifest is not None and manifest.generation is not None
    assert not list((data_dir / "generations").glob("*.partial"))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc (PR_SET_PDEATHSIG)")
def test_kill_9_of_the_command_stops_the_build(large_store: Path) -> None:
    """`kill -9` of the PID the operator sees: the build child dies with it and publishes nothing."""
    proc, children = _start_build(large_store)
    os.kill(proc.pid, signal.SIGKILL)  # that PID only
    proc.wait(timeout=10)
    _wait_gone(children)
    time.sleep(0.5)
    manifest = Manifest.load(large_store / MANIFEST_FILE)
    assert manifest is not None and manifest.generation is None
    assert (
        not list((large_store / "generations").glob("gen-*.faiss"))
        if (large_store / "generations").exists()
        else True
    )
    _rebuild_publishes(large_store)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc (PR_SET_PDEATHSIG)")
def test_sigterm_stops_the_build_with_one_line(large_store: Path) -> None:
    """SIGTERM (what systemd and `kill` send) stops the command and its build child: one line, exit 130,
    nothing published, and a re-run publishes."""
    proc, children = _start_build(large_store)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("interrupted; everything committed so far is kept"), err
    _wait_gone(children)
    manifest = Manifest.load(large_store / MANIFEST_FILE)
    assert manifest is not None and manifest.generation is None
    _rebuild_publishes(large_store)
