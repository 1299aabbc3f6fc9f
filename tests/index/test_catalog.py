"""Catalog: dedup in one transaction, tombstones, streaming reads, integrity check, disk full."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from deepfeat.index.catalog import Catalog, NewImage
from deepfeat.index.errors import CorruptStoreError, InvalidArgumentError, ReadOnlyStoreError, StoreFullError
from tests.index._helpers import DIM, sha_of, unit_vectors


def rows(n: int, *, start: int = 0, thumbnail: bytes | None = None) -> tuple[list[NewImage], np.ndarray]:
    """n images and their vectors, as ``Catalog.insert_many`` takes them."""
    images = [
        NewImage(
            sha256=sha_of(i), source=None, width=1, height=2, nbytes=3, metadata={"i": i}, thumbnail=thumbnail
        )
        for i in range(start, start + n)
    ]
    return images, unit_vectors(n, seed=start)


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    cat = Catalog(tmp_path / "catalog.sqlite3", dim=DIM)
    yield cat
    cat.close()


def test_schema_and_pragmas(catalog: Catalog) -> None:
    conn = catalog.connection()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 3  # 2: semantic vectors, 3: metadata filters


def test_insert_dedup_within_batch_and_against_db(catalog: Catalog) -> None:
    batch, vecs = rows(3)
    batch.append(batch[1])  # same content twice in one batch
    results = catalog.insert_many(batch, np.vstack([vecs, vecs[1:2]]))
    assert [r.created for r in results] == [True, True, True, False]
    assert results[3].id == results[1].id and results[3].seq == results[1].seq
    again = catalog.insert_many(*rows(2, start=2))  # sha 2 exists, sha 3 is new
    assert [r.created for r in again] == [False, True]
    assert again[0].id == results[2].id
    assert catalog.count() == 4
    assert catalog.find_sha256([sha_of(0), sha_of(99)]) == {sha_of(0): results[0].id}


def test_vectors_stored_raw_and_streamed(catalog: Catalog) -> None:
    batch, vecs = rows(25)
    results = catalog.insert_many(batch, vecs)
    chunks = list(catalog.iter_vectors(batch=7))
    assert [len(s) for s, _ in chunks] == [7, 7, 7, 4]
    seqs = np.concatenate([s for s, _ in chunks])
    got_vecs = np.concatenate([v for _, v in chunks])
    assert seqs.tolist() == [r.seq for r in results]
    np.testing.assert_array_equal(got_vecs, vecs)
    assert [len(s) for s, _ in catalog.iter_vectors(after_seq=results[20].seq)] == [4]
    got = list(catalog.vectors_for_seqs([results[3].seq, 10_000]))
    assert got[0][0].tolist() == [results[3].seq]


def test_delete_tombstones_and_cascade(catalog: Catalog) -> None:
    results = catalog.insert_many(*rows(3, thumbnail=b"jpeg"))
    assert catalog.thumbnail(results[0].id) == b"jpeg"
    assert catalog.delete(results[0].id) == results[0].seq
    assert catalog.delete(results[0].id) is None
    assert catalog.get(results[0].id) is None and catalog.thumbnail(results[0].id) is None
    n_thumbs = catalog.connection().execute("SELECT COUNT(*) FROM thumbnails").fetchone()[0]
    assert n_thumbs == 2
    seqs, mark = catalog.deleted_since(0)
    assert seqs == [results[0].seq] and mark == 1
    assert catalog.deleted_since(mark) == ([], mark)
    assert catalog.watermarks() == (3, 1)
    max_seq, del_rowid, live = catalog.state()
    assert (max_seq, del_rowid, sorted(live.tolist())) == (3, 1, [results[1].seq, results[2].seq])
    record = catalog.get(results[1].id)
    assert record is not None and record.metadata == {"i": 1} and record.width == 1
    assert set(catalog.get_many_by_seq([results[1].seq, results[0].seq])) == {results[1].seq}


def test_malformed_rows_write_nothing(catalog: Catalog) -> None:
    bad, vecs = rows(2)
    bad[1] = NewImage(sha256="nothex", source=None, width=1, height=1, nbytes=1)
    with pytest.raises(InvalidArgumentError, match="row 1"):
        catalog.insert_many(bad, vecs)
    assert catalog.count() == 0


def test_disk_full_rolls_back(catalog: Catalog) -> None:
    catalog.insert_many(*rows(2))
    conn = catalog.connection()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StoreFullError):
        catalog.insert_many(*rows(50, start=10, thumbnail=b"x" * 50_000))
    conn.execute("PRAGMA max_page_count = 1073741823")
    assert catalog.count() == 2
    assert catalog.max_seq() == 2  # the rolled-back rows did not consume seqs
    assert catalog.insert_many(*rows(1, start=10))[0].seq == 3


def test_read_only(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite3"
    Catalog(path, dim=DIM).close()
    ro = Catalog(path, dim=DIM, read_only=True)
    try:
        assert ro.count() == 0
        with pytest.raises(ReadOnlyStoreError):
            ro.insert_many(*rows(1))
    finally:
        ro.close()


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CorruptStoreError):
        Catalog(path, dim=DIM)


def test_quick_check_detects_damage(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite3"
    cat = Catalog(path, dim=DIM)
    cat.insert_many(*rows(200, thumbnail=b"t" * 3000))
    cat.connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    cat.close()
    data = bytearray(path.read_bytes())
    page = 4096
    for offset in range(3 * page, len(data) - page, 5 * page):  # smash several b-tree pages
        data[offset : offset + 64] = b"\x07" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError):
        damaged = Catalog(path, dim=DIM)
        try:
            damaged.quick_check()
        finally:
            damaged.close()


def test_foreign_keys_enforced(catalog: Catalog) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        catalog.connection().execute("INSERT INTO thumbnails(seq, data) VALUES (999, x'00')")
