"""VectorIndex: explicit ids, inner product, removal (incl. HNSW rebuild), training, checksummed save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepfeat.index.errors import CorruptStoreError, InvalidArgumentError, InvalidVectorError, StoreError
from deepfeat.index.vectors import VectorIndex
from tests.index._helpers import DIM, unit_vectors


def brute_force(
    base: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ base.T  # (m, n)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def test_flat_search_equals_brute_force() -> None:
    base = unit_vectors(500, seed=1)
    queries = unit_vectors(25, seed=2)
    ids = np.arange(1000, 1500, dtype=np.int64)[::-1].copy()  # ids unrelated to positions
    index = VectorIndex.create(DIM, "Flat")
    index.add(ids, base)
    scores, got = index.search(queries, 10)
    want_scores, want_ids = brute_force(base, ids, queries, 10)
    np.testing.assert_array_equal(got, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    assert scores.dtype == np.float32 and got.dtype == np.int64


def test_remove_and_ids() -> None:
    index = VectorIndex.create(DIM)
    index.add(np.arange(10, 20), unit_vectors(10))
    assert index.remove(np.array([12, 15, 99])) == 2
    assert sorted(index.ids().tolist()) == [10, 11, 13, 14, 16, 17, 18, 19]
    _, got = index.search(unit_vectors(10), 8)
    assert not np.isin(got, [12, 15]).any()


def test_hnsw_remove_falls_back_to_rebuild() -> None:
    base = unit_vectors(300, seed=3)
    index = VectorIndex.create(DIM, "HNSW32")
    index.add(np.arange(300), base)
    assert index.remove(np.arange(0, 300, 3)) == 100
    assert index.ntotal == 200
    _, got = index.search(base[1:3], 1)
    assert got[:, 0].tolist() == [1, 2]  # survivors keep their ids and exact vectors
    assert index.remove(np.array([0])) == 0


def test_k_capped_and_empty_index() -> None:
    index = VectorIndex.create(DIM)
    scores, ids = index.search(unit_vectors(3), 5)
    assert scores.shape == (3, 0) and ids.shape == (3, 0)
    index.add(np.array([7, 8]), unit_vectors(2))
    _, ids = index.search(unit_vectors(1), 10**9)
    assert ids.shape == (1, 2)
    with pytest.raises(InvalidArgumentError):
        index.search(unit_vectors(1), 0)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, DIM + 1), np.float32), np.zeros(DIM, np.float32), np.zeros((2, DIM), np.int64)],
)
def test_bad_vectors_refused(bad: np.ndarray) -> None:
    with pytest.raises(InvalidVectorError, match=str(DIM)):
        VectorIndex.create(DIM).add(np.arange(len(bad)), bad)


def test_nan_refused() -> None:
    x = unit_vectors(3)
    x[1, 4] = np.nan
    index = VectorIndex.create(DIM)
    with pytest.raises(InvalidVectorError, match="row 1"):
        index.add(np.arange(3), x)
    assert index.ntotal == 0


def test_ivf_trains_on_first_batch_or_says_what_to_do() -> None:
    index = VectorIndex.create(DIM, "IVF16,Flat")
    assert not index.is_trained
    with pytest.raises(StoreError, match="at least 16 vectors.*'Flat'"):
        index.add(np.arange(5), unit_vectors(5))
    assert index.ntotal == 0
    base = unit_vectors(400, seed=4)
    index.add(np.arange(400), base)
    assert index.is_trained and index.ntotal == 400
    assert sorted(index.ids().tolist()) == list(range(400))
    assert index.remove(np.array([3, 4])) == 2 and index.ntotal == 398
    index.faiss_index.nprobe = 16  # exhaustive: exact results
    _, got = index.search(base[10:12], 1)
    assert got[:, 0].tolist() == [10, 11]


def test_invalid_factory() -> None:
    with pytest.raises(InvalidArgumentError, match="NotAnIndex"):
        VectorIndex.create(DIM, "NotAnIndex")


def test_save_load_round_trip_and_checksum(tmp_path: Path) -> None:
    index = VectorIndex.create(DIM)
    base = unit_vectors(50)
    index.add(np.arange(100, 150), base)
    path = tmp_path / "v.faiss"
    sha = index.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["v.faiss"]  # no temp file left behind
    loaded = VectorIndex.load(path, expected_sha256=sha, factory="Flat")
    assert loaded.ntotal == 50 and loaded.factory == "Flat"
    np.testing.assert_array_equal(loaded.search(base, 3)[1], index.search(base, 3)[1])
    with pytest.raises(CorruptStoreError, match="checksum"):
        VectorIndex.load(path, expected_sha256="0" * 64)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptStoreError):
        VectorIndex.load(path)
    with pytest.raises(CorruptStoreError):
        VectorIndex.load(tmp_path / "missing.faiss", expected_sha256=sha)


@pytest.mark.parametrize(
    ("factory", "exact"),
    [
        ("Flat", True),
        ("IVF8,Flat", True),
        ("HNSW32", True),
        ("IVF8,PQ8x4,RFlat", True),
        ("IVF8,PQ8x4", False),
        ("IVF8,SQ8", False),
        ("IVF8,PQ8x4,Refine(SQ8)", False),
    ],
)
def test_exact_scores_follows_how_vectors_are_stored(factory: str, exact: bool) -> None:
    assert VectorIndex.create(32, factory).exact_scores is exact
