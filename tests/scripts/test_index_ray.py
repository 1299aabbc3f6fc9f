"""``deepfeat index --engine ray``: the local indexer's results through Ray Data, resumable after a kill.

Ray runs for real on this machine's two CPUs (one session for the module; the kill test starts its own
in a ``deepfeat`` subprocess), on real photos plus broken files. Equivalence with the local indexer is
checked image by image: the same content hashes, sources and failure codes, vectors at cosine >= 0.999.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from deepfeat.index.store import CATALOG_FILE, ImageStore
from deepfeat.models.embedder import Embedder
from deepfeat.models.errors import InvalidOptionError
from deepfeat.models.images import ImageLimits
from deepfeat.scripts import cli
from deepfeat.scripts.bench_extract import make_photo_set
from deepfeat.scripts.index_command import DEFAULT_EXTENSIONS
from deepfeat.scripts.index_images import index_paths, iter_image_files
from tests.app.live import free_port
from tests.app.serve_proc import DEEPFEAT, clean_env
from tests.conftest import FAST_EMBEDDER, FAST_FLAGS, jpeg_bytes
from tests.scripts.test_index_images import png_bomb

ray = pytest.importorskip("ray")

from deepfeat.scripts import index_ray  # noqa: E402  (after the skip: it is only useful with Ray)
from deepfeat.scripts.index_ray import (  # noqa: E402
    JOBS_DIR,
    EmbedderActor,
    JobRunningError,
    SortedDigests,
    connect_ray,
    index_paths_ray,
    job_key,
)

OPTIONS: dict[str, Any] = {"model": "efficientnet_lite0", **FAST_EMBEDDER}
EXPECTED_FAILURES = {
    "truncated.jpg": "corrupt_image",
    "notes.jpg": "unsupported_format",
    "bomb.png": "image_too_large",
}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """One local Ray for the module, with the machine's two CPUs (startup costs seconds)."""
    started = connect_ray(ray, address=None, num_cpus=2)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path, photos: dict[str, Image.Image]) -> Path:
    """Real photos (fixture set, one in a sub-folder, plus 10 camera-style variants), a truncated JPEG,
    a text file named .jpg, a decompression bomb and a byte-identical copy."""
    root = tmp_path_factory.mktemp("messy")
    for path in photo_dir.rglob("*.jpg"):
        target = root / path.relative_to(photo_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    make_photo_set(root / "camera", 10, seed=3, sizes=[(640, 480), (480, 640)])
    full = jpeg_bytes(photos["coffee"])
    (root / "truncated.jpg").write_bytes(full[: len(full) // 3])
    (root / "notes.jpg").write_text("this is not an image")
    (root / "bomb.png").write_bytes(png_bomb())
    (root / "copy-of-chelsea.jpg").write_bytes((photo_dir / "chelsea.jpg").read_bytes())
    return root


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory: pytest.TempPathFactory, messy: Path, lite0: Embedder) -> dict[str, Any]:
    """The local indexer's result on the same folder: catalog, summary, failures report."""
    data_dir = tmp_path_factory.mktemp("local") / "data"
    report = data_dir.parent / "report.jsonl"
    with ImageStore.open(data_dir, fingerprint=lite0.fingerprint, dim=lite0.dim) as store:
        summary = index_paths(
            [messy], embedder=lite0, store=store, limits=ImageLimits(), batch_size=4, workers=2,
            report_path=report, progress=False,
        )  # fmt: skip
    return {"catalog": _catalog(data_dir), "summary": summary, "failures": _failures(report)}


def _catalog(data_dir: Path) -> dict[str, tuple[str, np.ndarray]]:
    """sha256 -> (source, vector), read from SQLite as the next process would; asserts no duplicates."""
    conn = sqlite3.connect(data_dir / CATALOG_FILE)
    try:
        rows = conn.execute("SELECT sha256, source, vector FROM images").fetchall()
    finally:
        conn.close()
    out = {sha: (source, np.frombuffer(vector, dtype="<f4")) for sha, source, vector in rows}
    assert len(out) == len(rows), "the same content was committed twice"
    return out


def _failures(report: Path) -> dict[str, str]:
    return {Path(f["path"]).name: f["code"] for f in map(json.loads, report.read_text().splitlines())}


def _assert_same_as_local(data_dir: Path, reference: dict[str, Any]) -> None:
    ours, theirs = _catalog(data_dir), reference["catalog"]
    assert set(ours) == set(theirs)
    for sha, (source, vector) in theirs.items():
        assert ours[sha][0] == source  # the first of two identical files wins, as locally
        assert float(ours[sha][1] @ vector) >= 0.999, (source, float(ours[sha][1] @ vector))


# ====================================================================================== end to end


@pytest.mark.slow
def test_ray_engine_matches_the_local_indexer(
    ray_cluster: None,
    tmp_path: Path,
    messy: Path,
    local_reference: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    data_dir = tmp_path / "data"
    argv = ["index", str(messy), "--engine", "ray", "--data-dir", str(data_dir), "--batch-size", "3"]
    assert cli.main([*argv, *FAST_FLAGS, "--no-progress"]) == 0
    _assert_same_as_local(data_dir, local_reference)
    assert _failures(data_dir / "index-report.jsonl") == EXPECTED_FAILURES == local_reference["failures"]
    local = local_reference["summary"]
    out = capsys.readouterr().out
    assert (
        f"indexed {local.indexed}, already present {local.already_present}, failed {local.failed} "
        f"of {local.files} files" in out
    )
    assert not (data_dir / JOBS_DIR).exists()  # the shards are removed once committed
    # `deepfeat bench ray` reads its figures from this summary line.
    from deepfeat.scripts.bench_ray import _REPORTED, _STARTUP

    assert _REPORTED.search(out) and _STARTUP.search(out)


@pytest.mark.slow
def test_a_killed_job_resumes_from_its_shards_without_duplicates(
    ray_cluster: None, tmp_path: Path, messy: Path, lite0: Embedder, local_reference: dict[str, Any]
) -> None:
    data_dir = tmp_path / "data"
    # A real `deepfeat index --engine ray` (its own Ray), SIGKILLed as soon as its first shard is on disk.
    proc = subprocess.Popen(
        [DEEPFEAT, "index", str(messy), "--engine", "ray", "--data-dir", str(data_dir), *FAST_FLAGS,
         "--batch-size", "1", "--shard-size", "1", "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=clean_env(),
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 150
        while not list(data_dir.glob(f"{JOBS_DIR}/*/shard-*.parquet")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no shard written in 150 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        # Ray's helper processes it started (same session) go too; nothing outlives the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    files = list(iter_image_files([messy], extensions=DEFAULT_EXTENSIONS))
    [job_dir] = (data_dir / JOBS_DIR).iterdir()
    assert job_dir.name == job_key(files, fingerprint=lite0.fingerprint, limits=ImageLimits())
    before = {p.name: p.stat().st_mtime_ns for p in job_dir.glob("shard-*.parquet")}
    assert 0 < len(before) < len(files), "killed midway: some shards, not all"
    assert not _catalog(data_dir), "nothing is committed before the Ray stage ends"
    # What else a crash can leave: a half-written temp file and (by hand, here) an unreadable shard.
    (job_dir / "shard-0000000099-000001.parquet.tmp-1-deadbeef").write_bytes(b"PAR1 half")
    garbage = job_dir / "shard-0000000098-000001.parquet"
    garbage.write_bytes(b"not parquet")

    with ImageStore.open(data_dir, fingerprint=lite0.fingerprint, dim=lite0.dim) as store:
        resumed = _index(messy, lite0, store, tmp_path / "report.jsonl", keep_shards=True)
    assert resumed.reused == len(before)  # each surviving shard holds one file (--shard-size 1)
    assert resumed.embedded == len(local_reference["catalog"]) + 1 - sum(
        1 for name in before if _shard_status(job_dir / name) == "ok"
    )  # only the files without a shard went through the embedders (the copy of chelsea too)
    after = {p.name: p.stat().st_mtime_ns for p in job_dir.glob("shard-*.parquet")}
    assert {name: after[name] for name in before} == before, "existing shards reused, never rewritten"
    assert not garbage.exists() and not list(job_dir.glob("*.tmp-*"))
    assert (resumed.files, resumed.failed) == (len(files), len(EXPECTED_FAILURES))
    assert resumed.indexed == len(local_reference["catalog"])
    _assert_same_as_local(data_dir, local_reference)
    assert _failures(tmp_path / "report.jsonl") == EXPECTED_FAILURES

    # Committing the same shards again (as after a kill during the commit) adds nothing.
    with ImageStore.open(data_dir, fingerprint=lite0.fingerprint, dim=lite0.dim) as store:
        again = _index(messy, lite0, store, None, keep_shards=False)
        assert store.count == len(local_reference["catalog"])
    assert (again.reused, again.embedded, again.indexed) == (len(files), 0, 0)
    assert again.already_present == len(files) - len(EXPECTED_FAILURES)
    _assert_same_as_local(data_dir, local_reference)
    assert not (data_dir / JOBS_DIR).exists()


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_actors_embed_like_the_local_indexer(
    ray_cluster: None, tmp_path: Path, messy: Path, lite0: Embedder, local_reference: dict[str, Any]
) -> None:
    assert ray.cluster_resources().get("GPU", 0) >= 1, "ray.init found no GPU on a CUDA machine"
    with ImageStore.open(tmp_path / "data", fingerprint=lite0.fingerprint, dim=lite0.dim) as store:
        summary = index_paths_ray(
            [messy], embedder=lite0, embedder_options=OPTIONS, store=store, limits=ImageLimits(),
            device="auto", precision="fp32", batch_size=4, progress=False,
        )  # fmt: skip
    assert (summary.indexed, summary.failed) == (len(local_reference["catalog"]), len(EXPECTED_FAILURES))
    ours = _catalog(tmp_path / "data")
    assert set(ours) == set(local_reference["catalog"])
    for sha, (_, vector) in local_reference["catalog"].items():
        # GPU kernels (TF32 convolutions) against the CPU's: the fingerprint's tolerance, not bit-equality.
        assert float(ours[sha][1] @ vector) >= 0.99


def _index(
    messy: Path, lite0: Embedder, store: ImageStore, report: Path | None, *, keep_shards: bool
) -> index_ray.RayIndexSummary:
    return index_paths_ray(
        [messy], embedder=lite0, embedder_options=OPTIONS, store=store, limits=ImageLimits(),
        device="cpu", batch_size=4, shard_size=4, report_path=report, keep_shards=keep_shards, progress=False,
    )  # fmt: skip


def _shard_status(path: Path) -> str:
    import pyarrow.parquet as pq

    [status] = pq.read_table(path, columns=["status"]).column("status").to_pylist()
    return str(status)


def test_a_second_process_cannot_run_the_same_job(
    ray_cluster: None, tmp_path: Path, photo_dir: Path, lite0: Embedder
) -> None:
    files = list(iter_image_files([photo_dir], extensions=DEFAULT_EXTENSIONS))
    job_dir = (
        tmp_path / "data" / JOBS_DIR / job_key(files, fingerprint=lite0.fingerprint, limits=ImageLimits())
    )
    job_dir.mkdir(parents=True)
    with (
        index_ray._job_lock(job_dir),
        ImageStore.open(tmp_path / "data", fingerprint=lite0.fingerprint, dim=lite0.dim) as store,
        pytest.raises(JobRunningError, match="another process is running this job"),
    ):
        index_paths_ray(
            [photo_dir], embedder=lite0, embedder_options=OPTIONS, store=store, limits=ImageLimits()
        )


# ====================================================================================== error paths


def test_without_ray_the_engine_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, photo_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    rc = cli.main(["index", str(photo_dir), "--engine", "ray", "--data-dir", str(tmp_path / "data")])
    assert rc == 2
    assert "error [ray_not_installed]" in capsys.readouterr().err
    assert "pip install 'deepfeat[ray]'" in index_ray.RAY_MISSING
    assert not (tmp_path / "data").exists()  # refused before touching anything


class _NoCluster:
    """Stands in for the ``ray`` module where no cluster answers: init must never be reached."""

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs: Any) -> None:
        raise AssertionError(f"ray.init reached with {kwargs}")


def test_an_unreachable_address_fails_fast(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, photo_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        connect_ray(_NoCluster(), address=f"ray://127.0.0.1:{port}")
    assert time.monotonic() - started < 10  # ray.init itself would retry for minutes

    monkeypatch.setattr(index_ray, "import_ray", _NoCluster)
    argv = ["index", str(photo_dir), "--engine", "ray", "--address", f"127.0.0.1:{port}"]
    assert cli.main([*argv, "--data-dir", str(tmp_path / "data"), *FAST_FLAGS]) == 2
    assert (
        f"error [ray_unreachable]: cannot start or reach Ray at 127.0.0.1:{port}" in capsys.readouterr().err
    )


class _Cluster:
    def __init__(self, **resources: float) -> None:
        self.resources = resources

    def cluster_resources(self) -> dict[str, float]:
        return self.resources


def test_actor_plan_follows_the_cluster() -> None:
    plan = index_ray._plan_resources
    # CPU: actors fill the CPUs and the decode asks for the same CPUs (fused into the actors).
    assert plan(_Cluster(CPU=8), device="auto", actors=None, actor_cpus=2) == ("cpu", 4, {"num_cpus": 2}, 2)
    assert plan(_Cluster(CPU=16, GPU=2), device="auto", actors=None, actor_cpus=1) == (
        "cuda", 2, {"num_gpus": 1, "num_cpus": 1}, 1,
    )  # fmt: skip
    assert plan(_Cluster(CPU=16, GPU=2), device="cpu", actors=3, actor_cpus=1)[:2] == ("cpu", 3)
    with pytest.raises(InvalidOptionError, match="no GPUs"):
        plan(_Cluster(CPU=4), device="cuda", actors=None, actor_cpus=1)
    with pytest.raises(InvalidOptionError, match="leaving none for the decode tasks"):
        plan(_Cluster(CPU=4, GPU=2), device="auto", actors=None, actor_cpus=2)
    with pytest.raises(InvalidOptionError, match="--actors must be >= 1"):
        plan(_Cluster(CPU=4), device="auto", actors=0, actor_cpus=1)
    with pytest.raises(InvalidOptionError, match="--actor-cpus must be >= 1"):
        plan(_Cluster(CPU=4), device="auto", actors=None, actor_cpus=0)


def test_bad_shard_size_is_refused(tmp_path: Path, photo_dir: Path, lite0: Embedder) -> None:
    with (
        ImageStore.open(tmp_path / "data", fingerprint=lite0.fingerprint, dim=lite0.dim) as store,
        pytest.raises(InvalidOptionError, match="--shard-size must be >= 1"),
    ):
        index_paths_ray(
            [photo_dir],
            embedder=lite0,
            embedder_options=OPTIONS,
            store=store,
            limits=ImageLimits(),
            shard_size=0,
        )


def test_an_actor_with_another_embedder_refuses_to_start(lite0: Embedder) -> None:
    with pytest.raises(InvalidOptionError, match="differs from the store's"):
        EmbedderActor(
            OPTIONS,
            device="cpu",
            precision="fp32",
            fingerprint={**lite0.fingerprint, "layer": "x"},
            threads=1,
        )
    actor = EmbedderActor(OPTIONS, device="cpu", precision="fp32", fingerprint=lite0.fingerprint, threads=1)
    assert actor.embedder.fingerprint == lite0.fingerprint


def test_sorted_digests_membership() -> None:
    shas = [f"{i:064x}" for i in (5, 1, 300, 0)]
    digests = SortedDigests.build(shas)
    assert len(digests) == 4 and all(sha in digests for sha in shas)
    assert f"{2:064x}" not in digests and f"{301:064x}" not in digests and "" not in digests
    assert 5 not in digests and f"{5:064x}" not in SortedDigests.build([])


# ====================================================================================== --from-list (both engines)


def test_from_list_indexes_the_listed_paths(
    tmp_path: Path, photo_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listed = sorted(photo_dir.rglob("*.jpg"))[:2]
    manifest = tmp_path / "paths.txt"
    manifest.write_text(f"# two photos\n{listed[0]}\n\n  {listed[1]}  \n")
    data_dir = tmp_path / "data"
    argv = [
        "index",
        "--from-list",
        str(manifest),
        "--data-dir",
        str(data_dir),
        "--workers",
        "0",
        "--no-progress",
    ]
    assert cli.main([*argv, *FAST_FLAGS]) == 0
    assert {source for source, _ in _catalog(data_dir).values()} == {str(p) for p in listed}

    assert cli.main(["index", "--data-dir", str(data_dir)]) == 2
    assert "error [no_inputs]" in capsys.readouterr().err
    assert cli.main(["index", "--from-list", str(tmp_path / "missing.txt"), "--data-dir", str(data_dir)]) == 2
    assert "error [unreadable_list]" in capsys.readouterr().err
