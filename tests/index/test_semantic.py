"""Semantic vectors in the store: stored with the visual ones in one transaction, searched exactly
from an in-memory index kept equal to the catalog (add, delete, reopen, replay, updates by
``set_semantic``, replicas), old stores migrated with NULL semantic vectors, and the error when a
store has none."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from deepfeat.index.build import build_generation, process_rss_bytes
from deepfeat.index.catalog_db import SCHEMA_VERSION
from deepfeat.index.errors import (
    InvalidArgumentError,
    InvalidFilterError,
    InvalidVectorError,
    SemanticUnavailableError,
)
from deepfeat.index.filters import parse_filter
from deepfeat.index.semantic import (
    DBA_NEIGHBOURS,
    DBA_POWER,
    QUERY_EXPANSION,
    RERANK_SHORTLIST,
    SemanticIndex,
)
from deepfeat.index.store import CATALOG_FILE, ImageStore
from tests.index._helpers import DIM, new_images, unit_vectors

Opener = Callable[..., ImageStore]
SDIM = 24
N = 60


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def semantic_top(
    semantic: np.ndarray,
    queries: np.ndarray,
    k: int,
    alive: np.ndarray | None = None,
    shortlist: int = RERANK_SHORTLIST,
) -> list[list[int]]:
    """Brute force of what the store does: alpha-query expansion (each query plus its QUERY_EXPANSION
    nearest live vectors weighted by similarity, normalised), then, over that query's ``shortlist``
    best, database-side augmentation: the query plus its DBA_NEIGHBOURS nearest, each hit plus its
    DBA_NEIGHBOURS nearest fellow hits (weights similarity ** DBA_POWER), the augmented query expanded
    over its QUERY_EXPANSION - 1 nearest augmented hits (itself twice), hits ranked by cosine to it."""
    live = np.ones(len(semantic), dtype=bool) if alive is None else alive
    first = queries @ semantic.T
    first[:, ~live] = -np.inf
    order = np.argsort(-first, axis=1, kind="stable")
    near = order[:, :QUERY_EXPANSION]
    weights = np.take_along_axis(first, near, axis=1).clip(min=0)
    expanded = _l2(queries + np.einsum("qn,qnd->qd", weights, semantic[near]))
    scores = expanded @ semantic.T
    scores[:, ~live] = -np.inf
    ranked = np.argsort(-scores, axis=1, kind="stable")
    if not shortlist:
        return [list(map(int, row)) for row in ranked[:, :k]]
    out = []
    for row in range(len(queries)):
        hits = ranked[row, : max(k, min(shortlist, int(live.sum())))]
        own = order[row, :DBA_NEIGHBOURS]
        q = _l2(queries[row] + first[row, own].clip(min=0) ** DBA_POWER @ semantic[own])
        vectors = semantic[hits]
        within = vectors @ vectors.T
        np.fill_diagonal(within, -np.inf)
        fellows = np.argsort(-within, axis=1, kind="stable")[:, :DBA_NEIGHBOURS]
        w = np.take_along_axis(within, fellows, axis=1).clip(min=0) ** DBA_POWER
        augmented = _l2(vectors + np.einsum("hn,hnd->hd", w, vectors[fellows]))
        to_query = augmented @ q
        top = np.argsort(-to_query, kind="stable")[: QUERY_EXPANSION - 1]
        final = _l2(2 * q + to_query[top].clip(min=0) @ augmented[top])
        out.append([int(x) for x in hits[np.argsort(-(augmented @ final), kind="stable")][:k]])
    return out


def found(store: ImageStore, queries: np.ndarray, k: int) -> list[list[int]]:
    return [
        [h.record.metadata["i"] for h in hits] for hits in store.search(queries, k, similarity="semantic")
    ]


def held(store: ImageStore) -> set[int]:
    """The seqs the semantic index holds (every one: k = its size)."""
    index = store.semantic_index()
    _, ids = index.search(np.ones((1, index.dim), dtype=np.float32), max(1, index.count))
    return {int(x) for x in ids[0] if x >= 0}


def catalog_semantic(store: ImageStore) -> set[int]:
    rows = store._catalog.connection().execute("SELECT seq FROM images WHERE semantic IS NOT NULL")
    return {int(r[0]) for r in rows}


@pytest.fixture
def semantic() -> np.ndarray:
    return unit_vectors(N, SDIM, seed=5)


@pytest.fixture
def writer(open_store: Opener, semantic: np.ndarray) -> ImageStore:
    store = open_store(semantic_dim=SDIM)
    store.add(unit_vectors(N), new_images(N), semantic=semantic)
    return store


def test_semantic_search_equals_brute_force(writer: ImageStore, semantic: np.ndarray) -> None:
    queries = unit_vectors(8, SDIM, seed=9)
    assert found(writer, queries, 5) == semantic_top(semantic, queries, 5)
    # The re-ranking moves hits: without it the order is the expanded query's alone.
    assert semantic_top(semantic, queries, 5) != semantic_top(semantic, queries, 5, shortlist=0)
    index = writer.semantic_index()
    _, plain = index.search(queries, 5, rerank=0)
    assert (plain - 1).tolist() == semantic_top(semantic, queries, 5, shortlist=0)  # seqs are 1-based
    assert [h[0].record.metadata["i"] for h in writer.search(semantic[10:14], 1, similarity="semantic")] == [
        10,
        11,
        12,
        13,
    ]
    hits = writer.search(queries[:1], 3, similarity="semantic")[0]
    scores = [h.score for h in hits]  # cosines to the expanded query: best first, never above 1
    assert scores == sorted(scores, reverse=True) and all(-1 <= x <= 1 + 1e-6 for x in scores)
    # Visual search is untouched, and more hits than images just gives fewer.
    assert len(writer.search(unit_vectors(1, seed=3), 5)[0]) == 5
    assert len(writer.search(queries[:1], 1000, similarity="semantic")[0]) == N
    stats = writer.stats()
    assert stats["semantic_dim"] == SDIM and stats["semantic_count"] == N and stats["semantic_indexed"] == N


def test_bad_semantic_arguments(writer: ImageStore, open_store: Opener, tmp_path: Path) -> None:
    with pytest.raises(InvalidVectorError, match=f"\\(2, {SDIM}\\)"):
        writer.add(unit_vectors(2), new_images(2, start=N), semantic=unit_vectors(2, SDIM + 1))
    with pytest.raises(InvalidVectorError, match="semantic queries"):
        writer.search(unit_vectors(1, DIM), 3, similarity="semantic")
    with pytest.raises(InvalidArgumentError, match="visual, semantic"):
        writer.search(unit_vectors(1, DIM), 3, similarity="colour")
    plain = open_store(tmp_path / "plain")
    with pytest.raises(InvalidVectorError, match="without semantic vectors"):
        plain.add(unit_vectors(1), new_images(1), semantic=unit_vectors(1, SDIM))


def test_no_semantic_vectors_is_a_coded_error(open_store: Opener, tmp_path: Path) -> None:
    plain = open_store(tmp_path / "plain")
    plain.add(unit_vectors(3), new_images(3))
    with pytest.raises(SemanticUnavailableError, match="add-semantic") as info:
        plain.search(unit_vectors(1, SDIM), 3, similarity="semantic")
    assert info.value.code == "semantic_unavailable"
    plain.close()
    # Opened with a semantic dim, but every row predates semantic vectors: the same error.
    reopened = open_store(tmp_path / "plain", semantic_dim=SDIM)
    with pytest.raises(SemanticUnavailableError, match="none of the 3 images"):
        reopened.search(unit_vectors(1, SDIM), 3, similarity="semantic")
    assert reopened.stats()["semantic_count"] == 0
    # An empty store with semantic vectors on just finds nothing.
    assert open_store(tmp_path / "empty", semantic_dim=SDIM).search(
        unit_vectors(1, SDIM), 3, similarity="semantic"
    ) == [[]]


def test_delete_reopen_and_replay_keep_the_index_equal_to_the_catalog(
    writer: ImageStore, open_store: Opener, semantic: np.ndarray, data_dir: Path
) -> None:
    queries = unit_vectors(6, SDIM, seed=11)
    alive = np.ones(N, dtype=bool)
    for i in (3, 17, 40):
        writer.delete(writer.search(semantic[i : i + 1], 1, similarity="semantic")[0][0].id)
        alive[i] = False
    assert found(writer, queries, 7) == semantic_top(semantic, queries, 7, alive)
    assert held(writer) == catalog_semantic(writer)

    # Another process (a second writer on the same directory) adds and deletes; refresh replays both.
    other = open_store(semantic_dim=SDIM)
    assert held(other) == catalog_semantic(other)
    more = unit_vectors(5, SDIM, seed=12)
    other.add(unit_vectors(5, seed=13), new_images(5, start=N), semantic=more)
    other.add(unit_vectors(2, seed=14), new_images(2, start=N + 5))  # no semantic vectors
    other.delete(other.search(semantic[50:51], 1, similarity="semantic")[0][0].id)
    alive[50] = False
    writer.refresh()
    assert held(writer) == catalog_semantic(writer) == held(other)
    everything = np.concatenate([semantic, more])
    alive_all = np.concatenate([alive, np.ones(5, dtype=bool)])
    assert found(writer, queries, 10) == semantic_top(everything, queries, 10, alive_all)
    writer.close()
    other.close()

    reopened = open_store(semantic_dim=SDIM)
    assert held(reopened) == catalog_semantic(reopened)
    assert found(reopened, queries, 10) == semantic_top(everything, queries, 10, alive_all)
    assert reopened.stats()["semantic_count"] == N - 4 + 5 and reopened.count == N - 4 + 7


def test_set_semantic_fills_old_rows_everywhere(open_store: Opener, semantic: np.ndarray) -> None:
    writer = open_store(semantic_dim=SDIM)
    writer.add(unit_vectors(N), new_images(N))  # rows without semantic vectors
    reader = open_store(semantic_dim=SDIM)
    missing = [row for chunk in writer.iter_missing_semantic(batch=7) for row in chunk]
    assert len(missing) == N and missing[0][2] == "/photos/0.jpg"
    seqs = [seq for seq, _, _ in missing]
    assert writer.set_semantic(seqs[:30], semantic[:30]) == 30
    assert writer.set_semantic(seqs[30:], semantic[30:]) == 30
    assert list(writer.iter_missing_semantic()) == []
    queries = unit_vectors(5, SDIM, seed=2)
    assert found(writer, queries, 5) == semantic_top(semantic, queries, 5)
    # The re-ranking moves hits: without it the order is the expanded query's alone.
    assert semantic_top(semantic, queries, 5) != semantic_top(semantic, queries, 5, shortlist=0)
    index = writer.semantic_index()
    _, plain = index.search(queries, 5, rerank=0)
    assert (plain - 1).tolist() == semantic_top(semantic, queries, 5, shortlist=0)  # seqs are 1-based
    reader.refresh()  # the update log reaches the other process
    assert found(reader, queries, 5) == semantic_top(semantic, queries, 5)
    # Setting again replaces, never duplicates.
    writer.set_semantic(seqs[:1], semantic[1:2])
    reader.refresh()
    assert held(reader) == set(seqs) and reader.semantic_index().count == N


def test_replica_fills_and_refreshes_its_semantic_index(
    writer: ImageStore, open_store: Opener, semantic: np.ndarray, data_dir: Path
) -> None:
    build_generation(data_dir, factory="IVF4,Flat", max_memory_bytes=process_rss_bytes() + (1 << 30))
    replica = open_store(read_only=True, semantic_dim=SDIM)
    assert replica.generation is not None
    queries = unit_vectors(4, SDIM, seed=3)
    assert found(replica, queries, 5) == found(writer, queries, 5)
    writer.delete(writer.search(semantic[7:8], 1, similarity="semantic")[0][0].id)
    more = unit_vectors(2, SDIM, seed=4)
    writer.add(unit_vectors(2, seed=6), new_images(2, start=N), semantic=more)
    replica.refresh()
    assert held(replica) == catalog_semantic(writer)
    assert found(replica, more, 1) == [[N], [N + 1]]
    assert found(replica, queries, 8) == found(writer, queries, 8)
    # A new generation switch leaves the semantic index as it is.
    build_generation(data_dir, factory="IVF4,Flat", max_memory_bytes=process_rss_bytes() + (1 << 30))
    replica.refresh()
    assert held(replica) == catalog_semantic(writer)


def test_an_old_catalog_migrates_with_null_semantic_vectors(open_store: Opener, data_dir: Path) -> None:
    store = open_store()
    vectors = unit_vectors(4)
    store.add(vectors, new_images(4))
    store.close()
    # Make it a catalog of schema version 1 (before semantic vectors).
    conn = sqlite3.connect(data_dir / CATALOG_FILE)
    conn.executescript(
        "DROP TRIGGER image_meta_on_insert; DROP TABLE image_meta; DROP INDEX images_by_source;"
    )  # schema 3's metadata table
    conn.execute("ALTER TABLE images DROP COLUMN semantic")
    conn.execute("DROP TABLE semantic_updates")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()

    migrated = open_store(semantic_dim=SDIM)
    version = migrated._catalog.connection().execute("PRAGMA user_version").fetchone()[0]
    assert version == SCHEMA_VERSION == 3
    assert [h[0].record.metadata["i"] for h in migrated.search(vectors, 1)] == [0, 1, 2, 3]  # visual works
    assert migrated.stats()["semantic_count"] == 0
    with pytest.raises(SemanticUnavailableError):
        migrated.search(unit_vectors(1, SDIM), 1, similarity="semantic")
    sem = unit_vectors(4, SDIM, seed=1)
    seqs = [seq for chunk in migrated.iter_missing_semantic() for seq, _, _ in chunk]
    migrated.set_semantic(seqs, sem)
    assert found(migrated, sem, 1) == [[0], [1], [2], [3]]


def test_semantic_dim_mismatch_is_refused(writer: ImageStore, open_store: Opener) -> None:
    from deepfeat.index.errors import IncompatibleIndexError

    with pytest.raises(IncompatibleIndexError, match="semantic dimension"):
        open_store(semantic_dim=SDIM + 8)


def test_a_replica_reads_an_unmigrated_catalog(open_store: Opener, data_dir: Path) -> None:
    """A read-only open cannot migrate: a schema-1 catalog is read as it is, visual search works and
    semantic search says there is nothing to search."""
    store = open_store()
    vectors = unit_vectors(3)
    store.add(vectors, new_images(3))
    store.close()
    conn = sqlite3.connect(data_dir / CATALOG_FILE)
    conn.executescript(
        "DROP TRIGGER image_meta_on_insert; DROP TABLE image_meta; DROP INDEX images_by_source;"
    )
    conn.execute("ALTER TABLE images DROP COLUMN semantic")
    conn.execute("DROP TABLE semantic_updates")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    replica = open_store(read_only=True, semantic_dim=SDIM)
    assert [h[0].record.metadata["i"] for h in replica.search(vectors, 1)] == [0, 1, 2]
    assert replica.stats()["semantic_count"] == 0 and replica.refresh() == 0
    with pytest.raises(SemanticUnavailableError):
        replica.search(unit_vectors(1, SDIM), 1, similarity="semantic")
    with pytest.raises(InvalidFilterError, match="predates metadata filters; open the store once read-write"):
        replica.search(vectors, 1, where=parse_filter({"i": 1}))


def test_adding_known_content_with_a_semantic_vector_fills_it(open_store: Opener) -> None:
    """Re-indexing content stored before semantic vectors: no new row, but it gets its semantic vector
    (and only when it has none), in every process."""
    writer = open_store(semantic_dim=SDIM)
    vectors = unit_vectors(4)
    writer.add(vectors, new_images(4))
    reader = open_store(semantic_dim=SDIM)
    assert writer.known_sha256(with_semantic=True) == set()
    sem = unit_vectors(4, SDIM, seed=7)
    results = writer.add(vectors[:2], new_images(2), semantic=sem[:2])
    assert [r.created for r in results] == [False, False] and writer.count == 4
    assert len(writer.known_sha256(with_semantic=True)) == 2 and len(writer.known_sha256()) == 4
    assert found(writer, sem[:2], 1) == [[0], [1]]
    writer.add(vectors[:1], new_images(1), semantic=sem[3:4])  # already has one: kept
    reader.refresh()
    assert found(reader, sem[:2], 1) == [[0], [1]] and reader.semantic_index().count == 2


def test_without_expansion_or_reranking_the_search_is_plain_cosine(semantic: np.ndarray) -> None:
    index = SemanticIndex(SDIM)
    index._add(np.arange(1, N + 1, dtype=np.int64), semantic)
    queries = unit_vectors(5, SDIM, seed=3)
    scores, seqs = index.search(queries, 4, expansion=0, rerank=0)
    expected = np.argsort(-(queries @ semantic.T), axis=1, kind="stable")[:, :4] + 1
    assert seqs.tolist() == expected.tolist()
    np.testing.assert_allclose(scores, np.sort(queries @ semantic.T, axis=1)[:, ::-1][:, :4], atol=1e-5)


def test_reranking_stays_inside_the_shortlist_and_handles_tiny_stores(semantic: np.ndarray) -> None:
    index = SemanticIndex(SDIM)
    index._add(np.arange(1, N + 1, dtype=np.int64), semantic)
    queries = unit_vectors(3, SDIM, seed=4)
    _, plain = index.search(queries, 10, rerank=0)
    _, reranked = index.search(queries, 10, rerank=10)
    for a, b in zip(plain.tolist(), reranked.tolist(), strict=True):
        assert sorted(a) == sorted(b)  # a shortlist of k: the same images, reordered
    one = SemanticIndex(SDIM)
    one._add(np.array([7], dtype=np.int64), semantic[:1])
    scores, seqs = one.search(queries, 5)
    assert seqs.tolist() == [[7]] * 3 and np.all(np.abs(scores) <= 1 + 1e-6)
    empty = SemanticIndex(SDIM)
    _, seqs = empty.search(queries, 5)
    assert (seqs < 0).all()
