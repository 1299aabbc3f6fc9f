"""ImageStore contract: search = brute force, ids, dedup, persistence and recovery, errors, read-only."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pytest

from deepfeat.index.errors import (
    CorruptStoreError,
    IncompatibleIndexError,
    InvalidArgumentError,
    InvalidIdError,
    InvalidVectorError,
    NotFoundError,
    ReadOnlyStoreError,
    StoreError,
    StoreFullError,
)
from deepfeat.index.files import PENDING_MARKER, QUARANTINE_DIR, QUARANTINE_KEEP
from deepfeat.index.store import MANIFEST_FILE, SNAPSHOT_FILE, Hit, ImageStore
from tests.index._helpers import DIM, FINGERPRINT, new_images, sha_of, unit_vectors

Opener = Callable[..., ImageStore]


def ranked(results: list[list[Hit]]) -> list[list[tuple[str, float]]]:
    return [[(h.id, round(h.score, 5)) for h in hits] for hits in results]


def dir_fingerprint(path: Path) -> dict[str, str]:
    """Hash of every file, except SQLite's -wal/-shm side files that any reader may create or empty."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.iterdir())
        if p.is_file() and not p.name.endswith(("-wal", "-shm"))
    }


# ---------------------------------------------------------------- search and basic operations


def test_flat_search_equals_brute_force(open_store: Opener) -> None:
    store = open_store()
    base = unit_vectors(500, seed=1)
    ids = [r.id for r in store.add(base, new_images(500))]
    queries = unit_vectors(20, seed=2)
    results = store.search(queries, 10)
    scores = queries @ base.T  # (20, 500)
    order = np.argsort(-scores, axis=1)[:, :10]
    for q, hits in enumerate(results):
        assert [h.id for h in hits] == [ids[j] for j in order[q]]
        np.testing.assert_allclose([h.score for h in hits], scores[q, order[q]], rtol=1e-5, atol=1e-6)
        assert all(h.record.id == h.id for h in hits)


def test_add_get_delete(open_store: Opener) -> None:
    store = open_store()
    base = unit_vectors(20)
    results = store.add(base, new_images(20, tag="x"))
    assert all(r.created for r in results) and len({r.id for r in results}) == 20
    assert all(len(r.id) == 32 for r in results)
    record = store.get(results[3].id)
    assert record.sha256 == sha_of(3) and record.source == "/photos/3.jpg"
    assert (record.width, record.height, record.nbytes) == (640, 480, 1003)
    assert record.metadata == {"i": 3, "tag": "x"} and record.added_at > 0
    assert store.search(base[3:4], 1)[0][0].id == results[3].id

    store.delete(results[3].id)
    assert store.count == 19
    with pytest.raises(NotFoundError, match=results[3].id):
        store.get(results[3].id)
    with pytest.raises(NotFoundError):
        store.delete(results[3].id)
    hits = store.search(base, 20)
    assert all(h.id != results[3].id for row in hits for h in row)
    assert store.search(base[3:4], 1)[0][0].id != results[3].id


def test_duplicates_return_existing_id(open_store: Opener) -> None:
    store = open_store()
    images = new_images(3)
    vecs = unit_vectors(4)
    first = store.add(vecs, [*images, images[0]])  # same content twice in one batch
    assert [r.created for r in first] == [True, True, True, False]
    assert first[3].id == first[0].id
    assert store.count == 3
    again = store.add(unit_vectors(2, seed=9), [images[1], *new_images(1, start=50)])
    assert [r.created for r in again] == [False, True] and again[0].id == first[1].id
    assert store.count == 4 and store.stats()["count"] == 4
    assert store.find_existing([sha_of(0), sha_of(50), sha_of(77)]) == {
        sha_of(0): first[0].id,
        sha_of(50): again[1].id,
    }
    # The duplicate's vector was not added: searching with it finds the original's vector score.
    hits = store.search(unit_vectors(2, seed=9)[:1], 4)[0]
    assert [h.id for h in hits].count(first[1].id) == 1


def test_empty_store_and_k(open_store: Opener) -> None:
    store = open_store()
    assert store.search(unit_vectors(3), 5) == [[], [], []]
    assert store.search(np.empty((0, DIM), np.float32), 5) == []
    store.add(unit_vectors(4), new_images(4))
    assert [len(hits) for hits in store.search(unit_vectors(2), 100)] == [4, 4]
    for k in (0, -1, 2.5, True, "3"):
        with pytest.raises(InvalidArgumentError, match="k must be"):
            store.search(unit_vectors(1), k)  # type: ignore[arg-type]


def test_thumbnail_round_trip(open_store: Opener) -> None:
    store = open_store()
    with_thumb = store.add(unit_vectors(2), new_images(2, thumbnail=True))
    without = store.add(unit_vectors(1, seed=5), new_images(1, start=10))
    assert store.thumbnail(with_thumb[1].id) == b"\xff\xd8thumb-1"
    with pytest.raises(NotFoundError, match="no thumbnail"):
        store.thumbnail(without[0].id)
    store.delete(with_thumb[1].id)
    with pytest.raises(NotFoundError, match="no image"):
        store.thumbnail(with_thumb[1].id)


@pytest.mark.parametrize(
    "bad", ["../../etc/passwd", "a" * 100_000, "", "ABCDEF0123456789ABCDEF0123456789", None, 42]
)
def test_bad_ids_refused(open_store: Opener, data_dir: Path, bad: object) -> None:
    store = open_store()
    store.add(unit_vectors(1), new_images(1))
    before = dir_fingerprint(data_dir)
    for call in (store.get, store.delete, store.thumbnail):
        with pytest.raises(InvalidIdError) as info:
            call(bad)  # type: ignore[arg-type]
        assert isinstance(info.value, NotFoundError) and info.value.code == "invalid_id"
        assert len(str(info.value)) < 200
    assert store.count == 1 and dir_fingerprint(data_dir).keys() == before.keys()


def test_unknown_well_formed_id_is_not_found(open_store: Opener) -> None:
    store = open_store()
    with pytest.raises(NotFoundError) as info:
        store.get("0" * 32)
    assert info.value.code == "not_found"


@pytest.mark.parametrize(
    ("vectors", "match"),
    [
        (np.zeros((2, DIM + 1), np.float32), "shape"),
        (np.zeros((2,), np.float32), "shape"),
        (np.zeros((2, DIM), np.int32), "dtype"),
        (np.zeros((3, DIM), np.float32), "3 vectors for 2 images"),
    ],
)
def test_invalid_vectors_store_nothing(open_store: Opener, vectors: np.ndarray, match: str) -> None:
    store = open_store()
    with pytest.raises(InvalidVectorError, match=match):
        store.add(vectors, new_images(2))
    assert store.count == 0 and store.stats()["count"] == 0


def test_nan_vectors_store_nothing(open_store: Opener) -> None:
    store = open_store()
    vecs = unit_vectors(3)
    vecs[2, 0] = np.inf
    with pytest.raises(InvalidVectorError, match="row 2"):
        store.add(vecs, new_images(3))
    vecs[2, 0] = np.nan
    with pytest.raises(InvalidVectorError):
        store.search(vecs, 1)
    assert store.count == 0 and store.stats()["count"] == 0


def test_float64_is_cast(open_store: Opener) -> None:
    store = open_store()
    vecs = unit_vectors(3).astype(np.float64)
    ids = [r.id for r in store.add(vecs, new_images(3))]
    assert store.search(vecs[1:2], 1)[0][0].id == ids[1]


def test_bad_sha_refused(open_store: Opener) -> None:
    store = open_store()
    images = new_images(2)
    images[1] = type(images[1])(sha256="../x", source=None, width=1, height=1, nbytes=1)
    with pytest.raises(InvalidArgumentError, match="sha256"):
        store.add(unit_vectors(2), images)
    assert store.count == 0


# ---------------------------------------------------------------- persistence


def test_reopen_after_snapshot(open_store: Opener, data_dir: Path) -> None:
    queries = unit_vectors(10, seed=3)
    store = open_store()
    store.add(unit_vectors(300), new_images(300))
    before = ranked(store.search(queries, 5))
    store.close()
    manifest = ImageStore.read_manifest(data_dir)
    assert manifest is not None and manifest.snapshot is not None and manifest.snapshot.count == 300
    reopened = open_store()
    assert reopened.count == 300 and ranked(reopened.search(queries, 5)) == before


def test_reopen_without_snapshot_rebuilds(open_store: Opener, data_dir: Path) -> None:
    queries = unit_vectors(10, seed=3)
    writer = open_store(snapshot_every=0)
    writer.add(unit_vectors(200), new_images(200))
    before = ranked(writer.search(queries, 5))
    assert not (data_dir / SNAPSHOT_FILE).exists()  # as if the writer had crashed now
    reader = open_store(snapshot_every=0)
    assert reader.count == 200 and ranked(reader.search(queries, 5)) == before


def test_reopen_replays_rows_added_after_snapshot(
    open_store: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    queries = unit_vectors(10, seed=3)
    writer = open_store(snapshot_every=0)
    writer.add(unit_vectors(200), new_images(200))
    writer.snapshot()
    writer.add(unit_vectors(50, seed=7), new_images(50, start=200))
    writer.delete(writer.search(queries[:1], 1)[0][0].id)
    before = ranked(writer.search(queries, 5))
    with caplog.at_level(logging.INFO, logger="deepfeat.index.store"):
        reader = open_store(snapshot_every=0)
    assert "removed 1, added 50" in caplog.text
    assert reader.count == 249 and ranked(reader.search(queries, 5)) == before


def test_subprocess_killed_without_close_loses_nothing(data_dir: Path, open_store: Opener) -> None:
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(Path.cwd())!r})
        from deepfeat.index.store import ImageStore
        from tests.index._helpers import FINGERPRINT, DIM, new_images, unit_vectors
        store = ImageStore.open({str(data_dir)!r}, fingerprint=FINGERPRINT, dim=DIM, snapshot_every=100)
        for b in range(3):
            store.add(unit_vectors(70, seed=b), new_images(70, start=70 * b))
        os._exit(0)  # no close(), no final snapshot
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    store = open_store()
    assert store.count == 210
    assert store.find_existing([sha_of(0), sha_of(209)]).keys() == {sha_of(0), sha_of(209)}


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_damaged_snapshot_is_set_aside_and_rebuilt(
    open_store: Opener, data_dir: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    queries = unit_vectors(10, seed=3)
    store = open_store()
    store.add(unit_vectors(300), new_images(300))
    before = ranked(store.search(queries, 5))
    store.close()
    snap = data_dir / SNAPSHOT_FILE
    data = bytearray(snap.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x10
    snap.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="deepfeat.index.store"):
        reopened = open_store()
    assert "rebuilding the index from the catalog" in caplog.text
    assert ranked(reopened.search(queries, 5)) == before
    aside = list((data_dir / QUARANTINE_DIR).glob(f"{SNAPSHOT_FILE}.*"))
    assert len(aside) == 1 and aside[0].read_bytes() == bytes(data)
    manifest = ImageStore.read_manifest(data_dir)
    assert manifest is not None and manifest.snapshot is not None
    assert manifest.snapshot.sha256 == hashlib.sha256(snap.read_bytes()).hexdigest()


def test_manifest_counts(open_store: Opener, data_dir: Path) -> None:
    store = open_store(snapshot_every=0)
    results = store.add(unit_vectors(30), new_images(30))
    for r in results[:5]:
        store.delete(r.id)
    store.snapshot()
    on_disk = ImageStore.read_manifest(data_dir)
    assert on_disk == store.manifest
    assert on_disk is not None and on_disk.snapshot is not None
    assert (on_disk.count, on_disk.snapshot.count) == (25, 25)
    assert (on_disk.snapshot.max_seq, on_disk.snapshot.deletions_rowid) == (30, 5)
    assert on_disk.fingerprint == FINGERPRINT and on_disk.dim == DIM and on_disk.metric == "ip"
    assert (
        on_disk.index_factory == "Flat" and on_disk.snapshot.size == (data_dir / SNAPSHOT_FILE).stat().st_size
    )
    stats = store.stats()
    assert stats["count"] == 25 and stats["indexed"] == 25 and stats["unsnapshotted_changes"] == 0
    assert stats["snapshot"]["sha256"] == on_disk.snapshot.sha256


def test_automatic_snapshot(open_store: Opener, data_dir: Path) -> None:
    store = open_store(snapshot_every=50)
    store.add(unit_vectors(30), new_images(30))
    assert not (data_dir / SNAPSHOT_FILE).exists()
    store.add(unit_vectors(30, seed=1), new_images(30, start=30))
    manifest = ImageStore.read_manifest(data_dir)
    assert manifest is not None and manifest.snapshot is not None and manifest.snapshot.count == 60


def test_atomic_writes_leave_no_temp_files(open_store: Opener, data_dir: Path) -> None:
    store = open_store(snapshot_every=10)
    for b in range(5):
        store.add(unit_vectors(10, seed=b), new_images(10, start=10 * b))
        store.snapshot()
    store.close()
    names = sorted(p.name for p in data_dir.iterdir())
    assert not [n for n in names if ".tmp-" in n]
    assert {MANIFEST_FILE, SNAPSHOT_FILE, "catalog.sqlite3", ".lock"} <= set(names)


# ---------------------------------------------------------------- compatibility and modes


def test_different_fingerprint_refused_and_files_untouched(open_store: Opener, data_dir: Path) -> None:
    store = open_store()
    store.add(unit_vectors(5), new_images(5))
    store.close()
    before = dir_fingerprint(data_dir)
    with pytest.raises(IncompatibleIndexError) as info:
        ImageStore.open(data_dir, fingerprint={**FINGERPRINT, "layer": "layer3"}, dim=DIM)
    assert 'layer: stored="layer4" given="layer3"' in str(info.value)
    assert info.value.differences == {"layer": ("layer4", "layer3")}
    with pytest.raises(IncompatibleIndexError, match="dim"):
        ImageStore.open(data_dir, fingerprint=FINGERPRINT, dim=DIM * 2)
    assert dir_fingerprint(data_dir) == before


def test_stored_factory_wins(open_store: Opener, caplog: pytest.LogCaptureFixture) -> None:
    open_store(index_factory="HNSW32").close()
    with caplog.at_level(logging.WARNING, logger="deepfeat.index.store"):
        store = open_store(index_factory="Flat")
    assert store.index_factory == "HNSW32" and "ignoring the requested 'Flat'" in caplog.text


def test_hnsw_add_search_delete(open_store: Opener, data_dir: Path) -> None:
    store = open_store(index_factory="HNSW32")
    base = unit_vectors(300, seed=11)
    ids = [r.id for r in store.add(base, new_images(300))]
    top1 = [hits[0].id for hits in store.search(base, 1)]
    assert np.mean([a == b for a, b in zip(top1, ids, strict=True)]) > 0.95
    for i in range(0, 30, 3):
        store.delete(ids[i])
    assert store.count == 290
    gone = set(ids[0:30:3])
    assert not any(h.id in gone for hits in store.search(base, 10) for h in hits)
    store.close()
    reopened = open_store()
    assert reopened.index_factory == "HNSW32" and reopened.count == 290


def test_ivf_store_trains_on_first_batch(open_store: Opener) -> None:
    store = open_store(index_factory="IVF8,Flat")
    with pytest.raises(StoreError, match="at least 8"):
        store.add(unit_vectors(3), new_images(3))
    assert store.stats()["count"] == 0  # refused before the commit
    store.add(unit_vectors(100), new_images(100))
    assert store.count == 100


def test_read_only(open_store: Opener, data_dir: Path, tmp_path: Path) -> None:
    writer = open_store()
    ids = [r.id for r in writer.add(unit_vectors(10), new_images(10))]
    writer.close()
    before = dir_fingerprint(data_dir)
    reader = open_store(read_only=True)
    assert reader.count == 10 and reader.search(unit_vectors(1), 3)[0]
    with pytest.raises(ReadOnlyStoreError):
        reader.add(unit_vectors(1, seed=5), new_images(1, start=99))
    with pytest.raises(ReadOnlyStoreError):
        reader.delete(ids[0])
    with pytest.raises(ReadOnlyStoreError):
        reader.snapshot()
    reader.close()
    assert dir_fingerprint(data_dir) == before
    missing = tmp_path / "nowhere"
    with pytest.raises(StoreError, match="no store"):
        ImageStore.open(missing, fingerprint=FINGERPRINT, dim=DIM, read_only=True)
    assert not missing.exists()


def test_corrupt_manifest_and_catalog(open_store: Opener, data_dir: Path) -> None:
    open_store().close()
    (data_dir / MANIFEST_FILE).write_text("{")
    with pytest.raises(CorruptStoreError):
        ImageStore.open(data_dir, fingerprint=FINGERPRINT, dim=DIM)
    (data_dir / MANIFEST_FILE).unlink()
    (data_dir / "catalog.sqlite3").write_bytes(b"garbage" * 1000)
    for wal in data_dir.glob("catalog.sqlite3-*"):
        wal.unlink()
    with pytest.raises(CorruptStoreError):
        ImageStore.open(data_dir, fingerprint=FINGERPRINT, dim=DIM)


def test_lost_manifest_is_regenerated_and_still_checked(open_store: Opener, data_dir: Path) -> None:
    store = open_store()
    store.add(unit_vectors(5), new_images(5))
    store.close()
    (data_dir / MANIFEST_FILE).unlink()
    with pytest.raises(IncompatibleIndexError, match="model"):
        ImageStore.open(data_dir, fingerprint={**FINGERPRINT, "model": "vgg16"}, dim=DIM)
    reopened = open_store()
    assert reopened.count == 5 and (data_dir / MANIFEST_FILE).exists()
    assert json.loads((data_dir / MANIFEST_FILE).read_text())["fingerprint"] == FINGERPRINT


def test_closed_store_refuses(open_store: Opener) -> None:
    store = open_store()
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        store.search(unit_vectors(1), 1)


# ---------------------------------------------------------------- disk full


def test_disk_full_on_add_leaves_nothing(open_store: Opener) -> None:
    store = open_store()
    store.add(unit_vectors(5), new_images(5))
    conn = store._catalog.connection()  # the same thread's connection is used by add()
    conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
    with pytest.raises(StoreFullError) as info:
        store.add(unit_vectors(40, seed=3), new_images(40, start=100, thumbnail=True, blob="x" * 20_000))
    assert info.value.code == "storage_full"
    assert store.count == 5 and store.stats()["count"] == 5
    assert store.find_existing([sha_of(100)]) == {}
    conn.execute("PRAGMA max_page_count = 1073741823")
    assert all(r.created for r in store.add(unit_vectors(2, seed=4), new_images(2, start=100)))
    assert store.count == 7


def test_disk_full_on_snapshot_keeps_previous(
    open_store: Opener, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(snapshot_every=0)
    store.add(unit_vectors(10), new_images(10))
    store.snapshot()
    good = dir_fingerprint(data_dir)
    store.add(unit_vectors(10, seed=1), new_images(10, start=10))

    def full_disk(index: object, path: str) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(faiss, "write_index", full_disk)
    with pytest.raises(StoreFullError):
        store.snapshot()
    assert not [p for p in data_dir.iterdir() if ".tmp-" in p.name]
    after = dir_fingerprint(data_dir)
    assert after[SNAPSHOT_FILE] == good[SNAPSHOT_FILE] and after[MANIFEST_FILE] == good[MANIFEST_FILE]
    assert store.count == 20
    monkeypatch.undo()
    store.close()
    assert open_store().count == 20


def test_known_sha256_lists_every_stored_hash(tmp_path) -> None:
    import numpy as np

    from deepfeat.index.store import ImageStore, NewImage

    rng = np.random.default_rng(3)
    vecs = rng.standard_normal((3, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    images = [NewImage(sha256=f"{i:064x}", source=None, width=10, height=10, nbytes=1) for i in range(3)]
    with ImageStore.open(tmp_path / "s", fingerprint={"m": 1}, dim=8) as store:
        assert store.known_sha256() == set()
        store.add(vecs, images)
        assert store.known_sha256() == {img.sha256 for img in images}


def test_a_writer_sweeps_every_temp_file_a_crashed_writer_left(tmp_path: Path) -> None:
    """Snapshot, manifest and whitening temp files share one naming rule; the next writer removes them
    all under the exclusive lock, a read-only open touches nothing."""
    with ImageStore.open(tmp_path, fingerprint=FINGERPRINT, dim=DIM) as store:
        store.add(unit_vectors(5), new_images(5))
    stray = [
        tmp_path / f"{SNAPSHOT_FILE}.tmp-123-deadbeef",
        tmp_path / f"{MANIFEST_FILE}.tmp-123-cafebabe",
        tmp_path / f"whitening-{'a' * 16}.faiss.tmp-456-0badf00d",
    ]
    for path in stray:
        path.write_bytes(b"half written")
    keep = tmp_path / "notes.txt"
    keep.write_text("not ours")
    with ImageStore.open(tmp_path, fingerprint=FINGERPRINT, dim=DIM, read_only=True) as store:
        assert store.count == 5
    assert all(path.exists() for path in stray)
    with ImageStore.open(tmp_path, fingerprint=FINGERPRINT, dim=DIM) as store:
        assert store.count == 5
    assert not any(path.exists() for path in stray) and keep.exists()


def test_a_snapshot_write_interrupted_before_the_manifest_is_not_called_corruption(
    data_dir: Path, open_store: Opener
) -> None:
    """Killed between the snapshot's rename and the manifest's: the next open recognises its own
    interrupted write (the pending marker), replaces the snapshot from the catalog, keeps no copy."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(Path.cwd())!r})
        from deepfeat.index.manifest import Manifest
        from deepfeat.index.store import ImageStore
        from tests.index._helpers import FINGERPRINT, DIM, new_images, unit_vectors
        store = ImageStore.open({str(data_dir)!r}, fingerprint=FINGERPRINT, dim=DIM, snapshot_every=0)
        store.add(unit_vectors(50, seed=1), new_images(50))
        store.snapshot()
        store.add(unit_vectors(30, seed=2), new_images(30, start=50))
        Manifest.save = lambda self, path: os._exit(0)  # killed right after the snapshot's rename
        store.snapshot()
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert list(data_dir.glob(f"{PENDING_MARKER}*"))
    store = open_store()
    assert store.count == 80
    assert not (data_dir / QUARANTINE_DIR).exists()
    assert not list(data_dir.glob(f"{PENDING_MARKER}*")) and not list(data_dir.glob("*.corrupt-*"))
    manifest = ImageStore.read_manifest(data_dir)
    assert manifest is not None and manifest.snapshot is not None
    assert manifest.snapshot.sha256 == hashlib.sha256((data_dir / SNAPSHOT_FILE).read_bytes()).hexdigest()


def test_quarantine_keeps_only_the_newest_damaged_files(data_dir: Path, open_store: Opener) -> None:
    store = open_store()
    store.add(unit_vectors(20), new_images(20))
    store.close()
    for round_ in range(QUARANTINE_KEEP + 2):
        snap = data_dir / SNAPSHOT_FILE
        snap.write_bytes(b"garbage %d" % round_)
        store = open_store()
        assert store.count == 20
        store.close()
    kept = sorted(p.read_bytes() for p in (data_dir / QUARANTINE_DIR).iterdir())
    assert len(kept) == QUARANTINE_KEEP and b"garbage 0" not in kept


def test_an_interrupt_after_the_commit_is_counted_as_committed(
    open_store: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C between an add's catalog commit and its index update: the searchable count lags, the
    committed count is what the next open (and a resumed indexer) finds."""
    store = open_store(snapshot_every=0)
    store.add(unit_vectors(20), new_images(20))
    assert store.committed_count() == store.count == 20

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "_sync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.add(unit_vectors(8, seed=5), new_images(8, start=20))
    assert (store.count, store.committed_count()) == (20, 28)
    store.close(snapshot=False)
    reopened = open_store(snapshot_every=0)
    assert reopened.count == reopened.committed_count() == 28
