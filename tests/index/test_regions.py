"""Images with several vectors (a global descriptor, then regional ones): every store contract holds
with k counting images, each image scored by its best vector — search, delete, reopen and replay,
whitening re-projection, index types that cannot remove in place, generations and replicas."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from deepfeat.index.build import build_generation, process_rss_bytes
from deepfeat.index.errors import InvalidVectorError
from deepfeat.index.ids import aggregate, all_vector_ids, seqs_of, vector_ids
from deepfeat.index.store import SNAPSHOT_FILE, ImageStore
from tests.index._helpers import DIM, new_images, unit_vectors

Opener = Callable[..., ImageStore]
PER_IMAGE = 5
N = 120


def image_vectors(n: int = N, *, seed: int = 0) -> np.ndarray:
    """(n, PER_IMAGE, DIM) unit vectors: each image's global vector, then its regional ones."""
    return unit_vectors(n * PER_IMAGE, seed=seed).reshape(n, PER_IMAGE, DIM)


def expected_top(
    vectors: np.ndarray, queries: np.ndarray, k: int, alive: np.ndarray | None = None
) -> list[list[int]]:
    """Brute force: each image's best vector, the top k images (as their metadata "i")."""
    best = np.einsum("qd,nmd->qnm", queries, vectors).max(axis=2)  # (q, n)
    if alive is not None:
        best[:, ~alive] = -np.inf
    return [list(map(int, row)) for row in np.argsort(-best, axis=1, kind="stable")[:, :k]]


def found(store: ImageStore, queries: np.ndarray, k: int) -> list[list[int]]:
    return [[hit.record.metadata["i"] for hit in hits] for hits in store.search(queries, k)]


@pytest.fixture
def vectors() -> np.ndarray:
    return image_vectors()


@pytest.fixture
def writer(open_store: Opener, vectors: np.ndarray) -> ImageStore:
    store = open_store()
    store.add(vectors, new_images(N))
    return store


def test_ids_name_every_vector_and_come_back_to_their_image() -> None:
    seqs = np.array([3, 3, 3, 7, 9, 9], dtype=np.int64)
    ids = vector_ids(seqs)
    assert ids[0] == 3 and ids[3] == 7 and ids[4] == 9  # a global vector is named by its seq
    assert len(set(ids.tolist())) == 6 and seqs_of(ids).tolist() == seqs.tolist()
    assert vector_ids(np.array([1, 2, 3])).tolist() == [1, 2, 3]
    assert set(all_vector_ids(np.array([3]), 3).tolist()) == set(ids[:3].tolist())
    scores = np.array([[0.9, 0.8, 0.7, 0.6]], dtype=np.float32)
    top, top_seqs = aggregate(scores, np.array([[ids[1], ids[0], ids[3], -1]]), 3)
    assert top_seqs.tolist() == [[3, 7, -1]] and top[0, :2].tolist() == pytest.approx([0.9, 0.7])


def test_each_image_scores_its_best_vector_and_k_counts_images(
    writer: ImageStore, vectors: np.ndarray
) -> None:
    stats = writer.stats()
    assert (writer.count, stats["indexed"], stats["vectors"], stats["vectors_per_image"]) == (
        N, N, N * PER_IMAGE, PER_IMAGE,
    )  # fmt: skip
    regional = vectors[10:20, 3]  # a regional vector finds its image first, with its exact score
    hits = writer.search(regional, 10)
    assert [h[0].record.metadata["i"] for h in hits] == list(range(10, 20))
    assert all(h[0].score == pytest.approx(1.0, abs=1e-5) for h in hits)
    queries = unit_vectors(20, seed=5)
    result = found(writer, queries, 10)
    assert all(len(set(row)) == 10 for row in result)  # 10 distinct images, never 10 vectors of fewer
    assert result == expected_top(vectors, queries, 10)
    assert len(found(writer, queries, 1000)[0]) == N


def test_the_global_vector_is_what_the_store_hands_back(writer: ImageStore, vectors: np.ndarray) -> None:
    record = writer.search(vectors[7, :1], 1)[0][0].record
    np.testing.assert_array_equal(writer.vectors_by_sha256([record.sha256])[record.sha256], vectors[7, 0])


def test_bad_shapes_are_refused(writer: ImageStore) -> None:
    with pytest.raises(InvalidVectorError, match=r"\(n, 32\) or \(n, m, 32\)"):
        writer.add(np.zeros((1, 2, 3, DIM), np.float32), new_images(1, start=500))
    with pytest.raises(InvalidVectorError, match="NaN"):
        bad = image_vectors(1)
        bad[0, 2, 0] = np.nan
        writer.add(bad, new_images(1, start=500))
    assert writer.count == N


def test_delete_reopen_and_replay_keep_every_vector_of_an_image_together(
    open_store: Opener, writer: ImageStore, vectors: np.ndarray
) -> None:
    queries = np.concatenate([vectors[:30, 2], unit_vectors(10, seed=3)])
    doomed = [hits[0].id for hits in writer.search(vectors[:5, 0], 1)]
    for image_id in doomed:
        writer.delete(image_id)
    alive = np.ones(N, dtype=bool)
    alive[:5] = False
    assert writer.stats()["vectors"] == (N - 5) * PER_IMAGE
    assert found(writer, queries, 8) == expected_top(vectors, queries, 8, alive)
    writer.close()

    reopened = open_store()  # from the snapshot
    assert reopened.count == N - 5 and found(reopened, queries, 8) == expected_top(vectors, queries, 8, alive)
    more = image_vectors(10, seed=9)
    reopened.add(more, new_images(10, start=N))
    reopened.close(snapshot=False)  # as if killed: the next open replays the catalog after the snapshot

    replayed = open_store()
    everything = np.concatenate([vectors, more])
    alive = np.r_[alive, np.ones(10, dtype=bool)]
    assert replayed.count == N + 5
    assert found(replayed, queries, 8) == expected_top(everything, queries, 8, alive)
    replayed.close()
    (replayed.data_dir / SNAPSHOT_FILE).unlink()  # no snapshot at all: rebuilt from the catalog
    rebuilt = open_store()
    assert rebuilt.stats()["vectors"] == (N + 5) * PER_IMAGE
    assert found(rebuilt, queries, 8) == expected_top(everything, queries, 8, alive)


@pytest.mark.parametrize("factory", ["HNSW16", "IVF4,Flat"])
def test_index_types_that_rebuild_or_train_keep_images_whole(
    open_store: Opener, vectors: np.ndarray, factory: str
) -> None:
    store = open_store(index_factory=factory)
    store.add(vectors, new_images(N))
    target = store.search(vectors[3, 4:5], 1)[0][0]
    assert target.record.metadata["i"] == 3
    store.delete(target.id)
    assert store.stats()["vectors"] == (N - 1) * PER_IMAGE
    assert all(h.record.metadata["i"] != 3 for h in store.search(vectors[3], 20)[0])


def test_whitening_reprojects_every_vector(writer: ImageStore, vectors: np.ndarray) -> None:
    whitening = writer.fit_whitening(dim=16)
    assert writer.index_dim == 16 and writer.stats()["vectors"] == N * PER_IMAGE
    regional = vectors[40:50, 2]
    assert [h[0].record.metadata["i"] for h in writer.search(regional, 5)] == list(range(40, 50))
    queries = unit_vectors(10, seed=4)
    projected = whitening.apply(vectors.reshape(-1, DIM)).reshape(N, PER_IMAGE, -1)
    assert found(writer, queries, 5) == expected_top(projected, whitening.apply(queries), 5)
    writer.set_whitening(None)
    assert found(writer, queries, 5) == expected_top(vectors, queries, 5)


def test_generations_and_replicas_search_images(
    open_store: Opener, writer: ImageStore, vectors: np.ndarray, data_dir: Path
) -> None:
    for factory, params in (("IVF8,Flat", {"nprobe": 8}), ("IVF8,PQ8x4", {"nprobe": 8})):
        info = build_generation(
            data_dir, factory=factory, max_memory_bytes=process_rss_bytes() + (1 << 30), search_params=params
        )
        assert info.count == N * PER_IMAGE
        replica = open_store(read_only=True)
        assert replica.generation is not None and replica.count == N
        regional = vectors[60:80, 1]  # the PQ shortlist is re-scored with the catalog's exact vectors
        assert [h[0].record.metadata["i"] for h in replica.search(regional, 3)] == list(range(60, 80))
        if factory == "IVF8,Flat":
            queries = unit_vectors(10, seed=8)
            assert found(replica, queries, 10) == found(writer, queries, 10)
        replica.close()

    # Deleted after the generation: the replica hides all of the image's vectors.
    doomed = writer.search(vectors[61, :1], 1)[0][0]
    writer.delete(doomed.id)
    replica = open_store(read_only=True)
    assert replica.count == N - 1
    assert all(h.id != doomed.id for h in replica.search(vectors[61], 10)[0])
    added = image_vectors(3, seed=21)
    writer.add(added, new_images(3, start=N))
    replica.refresh()
    assert replica.search(added[1, 3:4], 1)[0][0].record.metadata["i"] == N + 1
