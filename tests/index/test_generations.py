"""Index generations: build within a budget, atomic publish, retention, crashes, corruption, and read
replicas (memory-mapped base + in-memory delta, hidden deletions, generation switch)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import deepfeat.index.build as build_module
from deepfeat.index.build import BuildPlan, build_generation, parse_bytes, plan_build, process_rss_bytes
from deepfeat.index.errors import (
    CorruptStoreError,
    InvalidArgumentError,
    MemoryBudgetError,
    ReadOnlyStoreError,
    StoreError,
)
from deepfeat.index.generations import GENERATIONS_DIR, Generation, load_generation, merge_top_k
from deepfeat.index.manifest import GenerationInfo, Manifest
from deepfeat.index.store import LOCK_FILE, MANIFEST_FILE, ImageStore
from tests.index._helpers import DIM, FINGERPRINT, flip_byte, new_images, unit_vectors

Opener = Callable[..., ImageStore]

# IVF with uncompressed codes and every list probed is exact, so replica results can be compared with
# the writer's Flat index hit for hit; PQ codes get their own test.
EXACT = "IVF8,Flat"
EXACT_PARAMS = {"nprobe": 8}
BUDGET = 1 << 30  # on top of what the process already holds (other test modules load torch)
REPO = Path(__file__).resolve().parents[2]


def build(data_dir: Path, factory: str = EXACT, **kwargs: object) -> GenerationInfo:
    kwargs.setdefault("search_params", EXACT_PARAMS if factory == EXACT else None)
    budget = process_rss_bytes() + BUDGET
    return build_generation(data_dir, factory=factory, max_memory_bytes=budget, **kwargs)  # type: ignore[arg-type]


def ids_of(results: list) -> list[list[str]]:
    return [[h.id for h in hits] for hits in results]


def gen_files(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / GENERATIONS_DIR).iterdir())


@pytest.fixture
def writer(open_store: Opener) -> ImageStore:
    """A writer (Flat, exact) holding 600 vectors."""
    store = open_store()
    store.add(unit_vectors(600, seed=1), new_images(600))
    return store


# ---------------------------------------------------------------- building and publishing


def test_build_publishes_a_generation_replicas_search_exactly(writer: ImageStore, open_store: Opener) -> None:
    data_dir = writer.data_dir
    info = build(data_dir)
    assert (info.number, info.count, info.max_seq, info.factory, info.dim) == (1, 600, 600, EXACT, DIM)
    assert gen_files(data_dir) == ["gen-000001.faiss", "gen-000001.ivfdata"]  # no .partial left
    on_disk = Manifest.load(data_dir / MANIFEST_FILE)
    assert on_disk is not None and on_disk.generation == info and info.previous is None
    assert info.build["search_params"] == EXACT_PARAMS and info.build["plan"]["budget_bytes"] > BUDGET

    replica = open_store(read_only=True)
    assert replica.generation is not None and replica.generation.number == 1
    assert replica.count == 600 and replica.stats()["generation"]["delta"] == 0
    queries = unit_vectors(15, seed=7)
    assert ids_of(replica.search(queries, 10)) == ids_of(writer.search(queries, 10))
    for action in (
        lambda: replica.add(unit_vectors(1), new_images(1, start=900)),
        lambda: replica.delete(writer.search(queries[:1], 1)[0][0].id),
        replica.snapshot,
    ):
        with pytest.raises(ReadOnlyStoreError):
            action()


@pytest.mark.parametrize("factory", [EXACT, "IVF8,PQ8x4"])
def test_generation_built_through_several_shards(
    writer: ImageStore, open_store: Opener, monkeypatch: pytest.MonkeyPatch, factory: str
) -> None:
    """A budget that only fits small shards: four shard files merged list by list into one."""
    real_plan = build_module.plan_build

    def small_shards(**kwargs: object) -> BuildPlan:
        return replace(real_plan(**kwargs), add_batch=64, shard_vectors=150)  # type: ignore[arg-type]

    monkeypatch.setattr(build_module, "plan_build", small_shards)
    info = build(writer.data_dir, factory, search_params={"nprobe": 8})
    assert info.build["shards"] == 4 and info.count == 600
    assert info.data_size == 600 * (info.build["plan"]["code_size"] + 8)  # codes + ids, nothing else
    replica = open_store(read_only=True)
    if factory == EXACT:
        queries = unit_vectors(20, seed=7)
        assert ids_of(replica.search(queries, 10)) == ids_of(writer.search(queries, 10))
    else:
        queries = unit_vectors(600, seed=1)[:50]  # stored vectors: each is its own nearest neighbour
        top1 = [hits[0].record.metadata["i"] for hits in replica.search(queries, 1)]
        assert top1 == list(range(50))  # PQ shortlist re-scored with the catalog's exact vectors


def test_replica_reranks_a_compressed_generation_with_exact_vectors(
    writer: ImageStore, open_store: Opener
) -> None:
    """4-byte PQ codes of 32-d vectors rank coarsely; the replica re-scores a 10x shortlist with the
    raw vectors in the catalog: far closer to exact search than the codes alone, every score exact."""
    build(writer.data_dir, "IVF8,PQ8x4", search_params={"nprobe": 8})
    replica = open_store(read_only=True)
    assert replica.generation is not None
    queries = unit_vectors(40, seed=11)
    exact = ids_of(writer.search(queries, 10))  # the writer's own index is Flat

    def recall(found: list[list[str]]) -> float:
        return float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)]))

    codes_only = load_generation(writer.data_dir, replica.generation)
    codes_only.set_search_params({"nprobe": 8})
    _, seqs = codes_only.search(queries, 10)
    records = writer._catalog.get_many_by_seq(np.unique(seqs).tolist())
    from_codes = [[records[s].id for s in row if s in records] for row in seqs.tolist()]

    results = replica.search(queries, 10)
    assert recall(ids_of(results)) >= 0.9 and recall(ids_of(results)) > recall(from_codes) + 0.2
    for query, hits in zip(queries, results, strict=True):
        for hit in hits:
            vector = writer.vectors_by_sha256([hit.record.sha256])[hit.record.sha256]
            assert hit.score == pytest.approx(float(vector @ query), abs=1e-5)


def test_retention_keeps_the_current_and_the_previous_generation(writer: ImageStore) -> None:
    data_dir = writer.data_dir
    for expected in (1, 2, 3):
        assert build(data_dir).number == expected
    assert gen_files(data_dir) == [f"gen-00000{n}.{ext}" for n in (2, 3) for ext in ("faiss", "ivfdata")]
    manifest = Manifest.load(data_dir / MANIFEST_FILE)
    assert manifest is not None and manifest.generation is not None
    assert manifest.generation.number == 3 and manifest.generation.previous is not None
    assert manifest.generation.previous.number == 2 and manifest.generation.previous.previous is None


def test_writer_keeps_working_and_its_snapshots_keep_the_generation(
    writer: ImageStore, open_store: Opener
) -> None:
    data_dir = writer.data_dir
    info = build(data_dir)
    writer.add(unit_vectors(5, seed=9), new_images(5, start=600))
    writer.delete(writer.search(unit_vectors(600, seed=1)[:1], 1)[0][0].id)
    writer.snapshot()  # the writer's own snapshot: it must not drop the published generation
    assert writer.generation is None and writer.stats()["generation"] is None and writer.count == 604
    manifest = Manifest.load(data_dir / MANIFEST_FILE)
    assert manifest is not None and manifest.generation == info
    writer.close()
    reopened = open_store()
    assert reopened.count == 604 and reopened.generation is None


def test_build_refuses_what_it_cannot_build(writer: ImageStore, tmp_path: Path) -> None:
    data_dir = writer.data_dir
    cases: list[tuple[str, type[Exception], str]] = [
        ("HNSW32", InvalidArgumentError, "builds IVF indexes"),
        ("Flat", InvalidArgumentError, "builds IVF indexes"),
        ("IVF8,PQ8x4fs", InvalidArgumentError, "cannot be merged on disk"),
        ("IVF1024,Flat", InvalidArgumentError, "needs at least 1024 vectors"),
        ("IVF8,Bogus", InvalidArgumentError, "invalid FAISS index_factory"),
    ]
    for factory, error, message in cases:
        with pytest.raises(error, match=message):
            build(data_dir, factory)
    with pytest.raises(StoreError, match="no store"):
        build(tmp_path / "nothing")
    assert not (data_dir / GENERATIONS_DIR).exists() or gen_files(data_dir) == []
    assert Manifest.load(data_dir / MANIFEST_FILE).generation is None  # type: ignore[union-attr]


# ---------------------------------------------------------------- memory budget


def test_budget_too_small_is_refused_before_anything_is_written(writer: ImageStore) -> None:
    with pytest.raises(MemoryBudgetError, match=r"give at least \d+ MiB") as caught:
        build_generation(writer.data_dir, factory=EXACT, max_memory_bytes=process_rss_bytes() + 16 * 2**20)
    assert caught.value.code == "memory_budget"
    assert "the process already uses" in str(caught.value)
    assert not (writer.data_dir / GENERATIONS_DIR).exists()


def test_plan_sizes_follow_the_budget() -> None:
    common = {"factory": "IVF4096,PQ32", "dim": 256, "index_dim": 256, "n_vectors": 10_000_000}
    baseline = 100 * 2**20
    small = plan_build(**common, budget_bytes=512 * 2**20, baseline_bytes=baseline)  # type: ignore[arg-type]
    large = plan_build(**common, budget_bytes=4 * 2**30, baseline_bytes=baseline)  # type: ignore[arg-type]
    assert small.train_vectors < large.train_vectors == 163_840  # 40 per list, capped by the default
    assert small.train_vectors >= 4096 and small.shard_vectors < large.shard_vectors
    assert small.shards > 1 and small.add_batch <= large.add_batch
    for plan in (small, large):
        # What the plan holds at its peak stays inside the budget it was given.
        train = build_module.TRAIN_COPIES * 4 * 256 * plan.train_vectors
        add = (build_module.ADD_COPIES * 4 * 256 + build_module.ROW_OVERHEAD) * plan.add_batch
        add += 2 * (32 + 8) * plan.shard_vectors
        peak = baseline + plan.fixed_bytes + build_module.RESERVE_BYTES + max(train, add)
        assert peak <= plan.budget_bytes
    with pytest.raises(MemoryBudgetError, match="--sample 1000000"):
        plan_build(**common, budget_bytes=512 * 2**20, baseline_bytes=baseline, sample=1_000_000)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="--sample must be"):
        plan_build(**common, budget_bytes=512 * 2**20, baseline_bytes=baseline, sample=10)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GiB", 2 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5G", int(1.5 * 2**30)),
        ("300m", 300 * 2**20),
        ("4096", 4096),
    ],
)
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "0", "-1G", "12XB", "G", "nan", "1e400"])
def test_parse_bytes_refuses(text: str) -> None:
    with pytest.raises(InvalidArgumentError, match="invalid memory size"):
        parse_bytes(text)


# ---------------------------------------------------------------- crashes and concurrent publishes


def _crash_during_build(data_dir: Path, patch: str) -> None:
    """Run a build in a child process that dies (``os._exit``, no clean-up) where ``patch`` says."""
    code = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        import faiss
        import deepfeat.index.build as b
        {patch}
        b.build_generation({str(data_dir)!r}, factory={EXACT!r}, max_memory_bytes={BUDGET})
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr


@pytest.mark.parametrize(
    "patch",
    [
        # after the shards are written, before the merge: a .partial directory is left behind
        "b._merge_lists = lambda *a, **k: os._exit(9)",
        # after both files were moved to their final names, before the manifest (the commit point)
        "b.fsync_dir = lambda path: os._exit(9)",
    ],
    ids=["mid-build", "before-commit"],
)
def test_crash_leaves_the_old_generation_published(
    writer: ImageStore, open_store: Opener, patch: str
) -> None:
    data_dir = writer.data_dir
    first = build(data_dir)
    writer.add(unit_vectors(10, seed=3), new_images(10, start=600))
    _crash_during_build(data_dir, patch)
    manifest = Manifest.load(data_dir / MANIFEST_FILE)
    assert manifest is not None and manifest.generation == first
    leftovers = set(gen_files(data_dir)) - {"gen-000001.faiss", "gen-000001.ivfdata"}
    assert leftovers  # the crash left something behind, which nobody reads:
    replica = open_store(read_only=True)
    assert replica.generation is not None and replica.generation.number == 1 and replica.count == 610
    # The next build takes the next free number and clears the dead build's files.
    assert build(data_dir).number == 3
    assert gen_files(data_dir) == [f"gen-00000{n}.{ext}" for n in (1, 3) for ext in ("faiss", "ivfdata")]


def test_an_older_build_is_not_published_over_a_newer_one(
    writer: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two builds at once: the one that finishes second but started first (lower number) gives way."""
    data_dir = writer.data_dir
    real_build_into = build_module._build_into
    calls = []

    def racing(*args: object, **kwargs: object) -> GenerationInfo:
        calls.append(kwargs["number"])
        if len(calls) == 1:
            assert build(data_dir).number == 2  # a second build starts and publishes meanwhile
        return real_build_into(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(build_module, "_build_into", racing)
    with pytest.raises(StoreError, match="generation 2 was published while generation 1 was built"):
        build(data_dir)
    assert calls == [1, 2]
    assert Manifest.load(data_dir / MANIFEST_FILE).generation.number == 2  # type: ignore[union-attr]
    assert gen_files(data_dir) == ["gen-000002.faiss", "gen-000002.ivfdata"]


# ---------------------------------------------------------------- corruption


def test_corrupt_generation_falls_back_to_the_previous_then_to_memory(
    writer: ImageStore, open_store: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = writer.data_dir
    build(data_dir)
    writer.add(unit_vectors(20, seed=4), new_images(20, start=600))
    second = build(data_dir)
    queries = unit_vectors(10, seed=8)
    expected = ids_of(writer.search(queries, 5))
    flip_byte(data_dir / GENERATIONS_DIR / second.data_file, 100)
    with pytest.raises(CorruptStoreError, match="checksum mismatch"):
        load_generation(data_dir, second)

    with caplog.at_level(logging.WARNING, logger="deepfeat.index.store"):
        replica = open_store(read_only=True)
        assert replica.generation is not None and replica.generation.number == 1  # the previous one
        assert replica.count == 620 and ids_of(replica.search(queries, 5)) == expected
        assert replica.refresh() == 0 and replica.refresh() == 0  # the corrupt one is not verified again
    assert sum("cannot use generation 2" in r.getMessage() for r in caplog.records) == 1
    replica.close()

    (data_dir / GENERATIONS_DIR / "gen-000001.faiss").unlink()  # the previous one is gone too
    fallback = open_store(read_only=True)
    assert fallback.generation is None and fallback.count == 620
    assert ids_of(fallback.search(queries, 5)) == expected


def test_a_header_whose_lists_do_not_fit_the_data_file_is_refused(
    writer: ImageStore, open_store: Opener
) -> None:
    """Checksums prove which files were published, not that the header describes the data file; FAISS
    would read outside the mapping (SIGSEGV) at the first search. Simulate a buggy publish."""
    import faiss

    from deepfeat.index._fs import sha256_file

    data_dir = writer.data_dir
    info = build(data_dir)
    header = data_dir / GENERATIONS_DIR / info.file
    raw = faiss.read_index(str(header), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(raw).invlists)
    sizes = np.full(8, 75, dtype=np.uint64)
    sizes[0] = 10**6
    lists.set_all_lists_sizes(faiss.swig_ptr(sizes))
    faiss.write_index(raw, str(header))
    bad = replace(info, sha256=sha256_file(header), size=header.stat().st_size)
    manifest = Manifest.load(data_dir / MANIFEST_FILE)
    assert manifest is not None
    replace(manifest, generation=bad).save(data_dir / MANIFEST_FILE)
    with pytest.raises(CorruptStoreError, match="list 0 .* does not fit"):
        load_generation(data_dir, bad)
    replica = open_store(read_only=True)  # refused, logged, served from memory
    assert replica.generation is None and len(replica.search(unit_vectors(1), 5)[0]) == 5


def test_a_replica_keeps_serving_when_a_corrupt_generation_is_published(
    writer: ImageStore, open_store: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = writer.data_dir
    build(data_dir)
    replica = open_store(read_only=True)
    second = build(data_dir)
    (data_dir / GENERATIONS_DIR / second.file).write_bytes(b"not a faiss index")
    assert replica.refresh() == 0
    assert replica.generation is not None and replica.generation.number == 1
    assert len(replica.search(unit_vectors(1), 5)[0]) == 5


# ---------------------------------------------------------------- replicas: delta, deletions, switch


def test_replica_serves_rows_added_and_deleted_after_the_generation(
    writer: ImageStore, open_store: Opener
) -> None:
    data_dir = writer.data_dir
    build(data_dir)
    replica = open_store(read_only=True)
    queries = unit_vectors(600, seed=1)[:3]
    # Delete the 5 best hits of the first query (all in the generation) and add 40 new rows.
    doomed = [h.id for h in writer.search(queries[:1], 5)[0]]
    for image_id in doomed:
        writer.delete(image_id)
    new = [r.id for r in writer.add(unit_vectors(40, seed=5), new_images(40, start=600))]
    assert replica.refresh() == 45
    stats = replica.stats()["generation"]
    assert (stats["hidden"], stats["delta"], replica.count) == (5, 40, 635)
    # Exactly the writer's (exact) answers: deleted rows filtered, k still full, new rows merged in.
    probes = np.concatenate([queries, unit_vectors(40, seed=5)[:5]])
    got, want = replica.search(probes, 10), writer.search(probes, 10)
    assert ids_of(got) == ids_of(want)
    np.testing.assert_allclose([h.score for h in got[0]], [h.score for h in want[0]], rtol=1e-5, atol=1e-6)
    assert all(len(hits) == 10 for hits in got) and not set(doomed) & {h.id for hits in got for h in hits}
    assert [hits[0].id for hits in got[3:]] == new[:5]
    # Deleting a row of the delta removes it from the delta.
    writer.delete(new[0])
    replica.refresh()
    assert replica.stats()["generation"]["delta"] == 39 and replica.count == 634
    assert new[0] not in {h.id for h in replica.search(probes[3:4], 10)[0]}


def test_replica_switches_generation_while_searches_run(writer: ImageStore, open_store: Opener) -> None:
    """Searches in flight during two switches (the second deletes the first generation's files) never
    fail, never miss a row, never return a deleted one."""
    data_dir = writer.data_dir
    build(data_dir)
    replica = open_store(read_only=True)
    queries = unit_vectors(600, seed=1)[:20]
    expected = ids_of(writer.search(queries, 5))
    stop, errors, rounds = threading.Event(), [], [0]

    def search_forever() -> None:
        while not stop.is_set():
            try:
                assert ids_of(replica.search(queries, 5)) == expected
                rounds[0] += 1
            except BaseException as exc:  # reported below, with the traceback
                errors.append(exc)
                return

    threads = [threading.Thread(target=search_forever) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for number in (2, 3):
            writer.add(unit_vectors(3, seed=10 + number), new_images(3, start=600 + 3 * number))
            assert build(data_dir).number == number
            replica.refresh()
            assert replica.generation is not None and replica.generation.number == number
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors[0]
    assert rounds[0] > 0 and replica.count == writer.count == 606
    assert gen_files(data_dir) == [f"gen-00000{n}.{ext}" for n in (2, 3) for ext in ("faiss", "ivfdata")]


def test_replica_started_before_any_generation_switches_to_the_first(
    writer: ImageStore, open_store: Opener
) -> None:
    replica = open_store(read_only=True)
    assert replica.generation is None and replica.count == 600
    build(writer.data_dir)
    assert replica.refresh() == 600
    assert replica.generation is not None and replica.generation.number == 1
    queries = unit_vectors(5, seed=6)
    assert ids_of(replica.search(queries, 10)) == ids_of(writer.search(queries, 10))
    assert replica.near_duplicates(0.999) == writer.near_duplicates(0.999) == []


def test_whitening_change_makes_a_generation_stale(writer: ImageStore, open_store: Opener) -> None:
    data_dir = writer.data_dir
    build(data_dir)
    replica = open_store(read_only=True)
    writer.fit_whitening(dim=16)
    assert replica.refresh() == 600  # rebuilt from the catalog with the new whitening, in memory
    assert replica.generation is None and replica.index_dim == 16
    queries = unit_vectors(5, seed=6)
    assert ids_of(replica.search(queries, 10)) == ids_of(writer.search(queries, 10))
    info = build(data_dir)
    assert info.dim == 16 and info.whitening == writer.manifest.extra["whitening"]
    assert replica.refresh() == 600 and replica.generation is not None and replica.generation.number == 2
    assert ids_of(replica.search(queries, 10)) == ids_of(writer.search(queries, 10))


# ---------------------------------------------------------------- memory maps, files, locks


def _maps_of(path: Path) -> list[str]:
    with open("/proc/self/maps") as fh:
        return [line for line in fh if line.rstrip().endswith(str(path))]


def test_generation_lists_are_memory_mapped_read_only(writer: ImageStore, open_store: Opener) -> None:
    info = build(writer.data_dir)
    data = (writer.data_dir / GENERATIONS_DIR / info.data_file).resolve()
    assert _maps_of(data) == []
    replica = open_store(read_only=True)
    maps = _maps_of(data)
    assert maps and all(line.split()[1].startswith("r-") for line in maps)  # mapped, never writable
    replica.close()
    assert _maps_of(data) == []  # closing unmaps it


def test_read_only_open_creates_no_file_and_only_shares_the_lock(
    writer: ImageStore, open_store: Opener
) -> None:
    data_dir = writer.data_dir
    build(data_dir)

    def listing() -> list[str]:
        return sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*"))

    before = listing()
    # Hold a shared lock, as another replica would: an exclusive request from the replica would block.
    fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        done = threading.Event()

        def replica_work() -> None:
            replica = open_store(read_only=True)
            writer.add(unit_vectors(2, seed=11), new_images(2, start=700))
            replica.refresh()
            replica.search(unit_vectors(2), 3)
            replica.close()
            done.set()

        thread = threading.Thread(target=replica_work)
        thread.start()
        thread.join(timeout=60)
        assert done.is_set(), "the replica blocked on the lock"
    finally:
        os.close(fd)
    assert listing() == before


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_replica_reads_a_data_dir_only_the_writer_can_write() -> None:
    """The deployment the README describes: the writer owns the data dir, the replica's user may only
    read it. While the writer has the store open (SQLite's -wal/-shm exist), the replica opens, searches
    and refreshes without creating or changing anything; without a writer it refuses, saying why."""
    root = Path(tempfile.mkdtemp(prefix="deepfeat-replica-"))
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(REPO)!r})
        from deepfeat.index.store import ImageStore
        from tests.index._helpers import DIM, FINGERPRINT, unit_vectors
        store = ImageStore.open({str(root / "store")!r}, fingerprint=FINGERPRINT, dim=DIM, read_only=True)
        hits = store.search(unit_vectors(5, seed=2), 1)
        store.refresh()
        print(json.dumps([store.count, store.generation.number, [h[0].record.metadata["i"] for h in hits]]))
        store.close()
        """
    )

    def as_nobody() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HOME": "/tmp"},
        )

    def state(data_dir: Path) -> dict[str, int]:
        return {str(p): p.stat().st_mtime_ns for p in data_dir.rglob("*")}

    try:
        os.chmod(root, 0o755)
        data_dir = root / "store"
        with ImageStore.open(data_dir, fingerprint=FINGERPRINT, dim=DIM) as writer:
            writer.add(unit_vectors(600, seed=1), new_images(600))
            build(data_dir)
            writer.add(unit_vectors(5, seed=2), new_images(5, start=600))
            before = state(data_dir)
            proc = as_nobody()
            assert proc.returncode == 0, proc.stderr
            assert json.loads(proc.stdout) == [605, 1, [600, 601, 602, 603, 604]]
            assert state(data_dir) == before
        before = state(data_dir)  # the writer closed: SQLite removed its -wal and -shm
        proc = as_nobody()
        assert proc.returncode != 0 and "start the writer first" in proc.stderr
        assert state(data_dir) == before
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- merging results


def test_merge_top_k_and_hidden_rows() -> None:
    a = (np.array([[0.9, 0.5, 0.1]], dtype=np.float32), np.array([[1, 2, 3]]))
    b = (np.array([[0.7, 0.6, -1.0]], dtype=np.float32), np.array([[10, 11, -1]]))
    scores, ids = merge_top_k([a, b], 4)
    assert ids.tolist() == [[1, 10, 11, 2]] and scores[0].tolist() == pytest.approx([0.9, 0.7, 0.6, 0.5])
    scores, ids = merge_top_k([a, (np.empty((1, 0), np.float32), np.empty((1, 0), np.int64))], 5)
    assert ids.tolist() == [[1, 2, 3]]
    short = merge_top_k([(np.array([[0.3, 0.0]], np.float32), np.array([[4, -1]]))], 2)
    assert short[1].tolist() == [[4, -1]] and short[0][0, 1] == -np.inf


def test_hide_keeps_only_rows_the_generation_holds(writer: ImageStore) -> None:
    info = build(writer.data_dir)
    generation = Generation(info=info, index=load_generation(writer.data_dir, info))
    hidden = generation.hide([3, 5, 5, 9999])  # 9999 > max_seq: never in it
    assert hidden.hidden.tolist() == [3, 5] and hidden.visible == 598 and generation.visible == 600
    assert hidden.hide([3]) is hidden
    _, ids = hidden.search(unit_vectors(600, seed=1)[2:5], 3)  # rows 2, 3, 4 have seqs 3, 4, 5
    assert ids.shape == (3, 3) and ids[1, 0] == 4 and not np.isin(ids, [3, 5]).any()


@pytest.fixture(autouse=True)
def _no_stray_faiss_output(capfd: pytest.CaptureFixture[str]) -> Iterator[None]:
    """Nothing a build does prints to stdout (FAISS's own on-disk merge would: "resizing ...")."""
    yield
    assert "resizing" not in capfd.readouterr().out


def test_a_claim_left_by_a_killed_build_is_swept(writer: ImageStore) -> None:
    """A build killed between writing its owner file and renaming its claim to gen-N.partial leaves a
    .claim- directory; the next publish removes it once its owner is gone, never a live one's."""
    import json
    import socket

    from deepfeat.index.generations import CLAIM_PREFIX, OWNER_FILE, remove_unreferenced

    gen_dir = writer.data_dir / GENERATIONS_DIR
    gen_dir.mkdir(exist_ok=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale, live = (
        gen_dir / f"{CLAIM_PREFIX}{dead.stdout.strip()}-abcd",
        gen_dir / f"{CLAIM_PREFIX}{os.getpid()}-ef01",
    )
    for path, pid in ((stale, int(dead.stdout)), (live, os.getpid())):
        path.mkdir()
        (path / OWNER_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    assert remove_unreferenced(gen_dir, keep=[]) == [stale.name]
    assert live.exists()
    info = build(writer.data_dir)  # its own claim became gen-000001.partial, then was published
    assert info.number == 1 and [p.name for p in gen_dir.glob(f"{CLAIM_PREFIX}*")] == [live.name]


def test_a_partial_whose_build_is_a_zombie_is_swept(tmp_path: Path) -> None:
    """A killed build whose parent died too stays a zombie until something reaps it (in a container
    without an init, maybe never): its directory is not a live build's."""
    import socket

    from deepfeat.index.generations import OWNER_FILE, partial_name, remove_unreferenced

    gen_dir = tmp_path / GENERATIONS_DIR
    gen_dir.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "pass"])  # exits, unreaped: a zombie of this test
    try:
        stat = Path(f"/proc/{child.pid}/stat")
        deadline = time.monotonic() + 30
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        partial = gen_dir / partial_name(3)
        partial.mkdir()
        (partial / OWNER_FILE).write_text(json.dumps({"pid": child.pid, "host": socket.gethostname()}))
        assert remove_unreferenced(gen_dir, keep=[]) == [partial.name]
    finally:
        child.wait()
