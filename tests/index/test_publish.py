"""Self-contained published generations: a read-only store layout at a location, verified on fetch,
opened by a read-only ImageStore with no access to the writer's data dir."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from deepfeat.index.build import build_generation, process_rss_bytes
from deepfeat.index.errors import CorruptStoreError, ReadOnlyStoreError
from deepfeat.index.publish import FILES_FILE, LATEST_FILE, Location, fetch, latest, publish
from deepfeat.index.store import CATALOG_FILE, ImageStore
from tests.index._helpers import flip_byte, new_images, unit_vectors

Opener = Callable[..., ImageStore]


def ids_of(results: list) -> list[list[str]]:
    return [[h.id for h in hits] for hits in results]


@pytest.fixture
def writer(open_store: Opener) -> ImageStore:
    store = open_store()
    store.add(unit_vectors(300, seed=1), new_images(300, thumbnail=True))
    return store


def test_publication_is_a_read_only_store_that_searches_like_the_writer(
    writer: ImageStore, open_store: Opener, tmp_path: Path
) -> None:
    build_generation(
        writer.data_dir,
        factory="IVF4,Flat",
        max_memory_bytes=process_rss_bytes() + (1 << 30),
        search_params={"nprobe": 4},
    )
    writer.add(unit_vectors(20, seed=2), new_images(20, start=1000))  # after the generation: the delta
    location = tmp_path / "gens"
    pub = publish(writer.data_dir, location)
    assert pub.number == 1 and pub.path == location / "pub-000001" and pub.files["count"] == 320
    assert latest(location) == {"number": 1, "sha256": latest(location)["sha256"]}  # type: ignore[index]
    names = set(pub.files["files"])
    assert {
        "manifest.json",
        CATALOG_FILE,
        "generations/gen-000001.faiss",
        "generations/gen-000001.ivfdata",
    } <= names
    assert not any(n.endswith(("-wal", "-shm")) for n in os.listdir(pub.path))

    fetched = fetch(f"file://{location}", cache_dir=tmp_path / "cache")
    assert fetched is not None and fetched.path == pub.path  # a local location is used in place
    queries = unit_vectors(10, seed=7)
    expected = ids_of(writer.search(queries, 5))
    replica = open_store(fetched.path, read_only=True)
    assert replica.generation is not None and replica.count == 320
    assert ids_of(replica.search(queries, 5)) == expected
    some = expected[0][0]
    assert replica.thumbnail(some) == writer.thumbnail(some)
    with pytest.raises(ReadOnlyStoreError):
        replica.add(unit_vectors(1, seed=3), new_images(1, start=5000))
    assert fetch(location, cache_dir=tmp_path / "cache", current=1) is None


def test_downloaded_publication_opens_without_the_writer_dir(
    writer: ImageStore, open_store: Opener, tmp_path: Path
) -> None:
    """No IVF generation: the writer's snapshot travels and the catalog copy fills the rest."""
    writer.snapshot()
    writer.add(unit_vectors(5, seed=4), new_images(5, start=2000))
    location = tmp_path / "gens"
    publish(writer.data_dir, location)
    queries = unit_vectors(8, seed=9)
    expected = ids_of(writer.search(queries, 3))
    mode = writer.data_dir.stat().st_mode
    if os.geteuid() != 0:
        writer.data_dir.chmod(0)
    try:
        fetched = fetch(location, cache_dir=tmp_path / "cache", download=True)
        assert fetched is not None and fetched.path == tmp_path / "cache" / "pub-000001"
        replica = open_store(fetched.path, read_only=True)
        assert replica.count == 305 and ids_of(replica.search(queries, 3)) == expected
    finally:
        writer.data_dir.chmod(stat.S_IMODE(mode))


@pytest.mark.parametrize("victim", [CATALOG_FILE, "vectors.faiss", "manifest.json", FILES_FILE])
def test_one_flipped_byte_refuses_the_publication(writer: ImageStore, tmp_path: Path, victim: str) -> None:
    writer.snapshot()
    location = tmp_path / "gens"
    first = publish(writer.data_dir, location)
    writer.add(unit_vectors(3, seed=5), new_images(3, start=3000))
    second = publish(writer.data_dir, location)
    assert second.number == 2
    path = second.path / victim
    flip_byte(path, path.stat().st_size // 2, mask=0x01)
    with pytest.raises(CorruptStoreError, match="checksum|does not match"):
        fetch(location, cache_dir=tmp_path / "cache", current=first.number)
    with pytest.raises(CorruptStoreError):
        fetch(location, cache_dir=tmp_path / "cache", download=True)
    assert not (tmp_path / "cache" / "pub-000002").exists()  # a bad download is not kept


def test_retention_keeps_two_and_latest_is_the_commit_point(writer: ImageStore, tmp_path: Path) -> None:
    location = tmp_path / "gens"
    for _ in range(3):
        publish(writer.data_dir, location)
    assert sorted(os.listdir(location)) == [LATEST_FILE, "pub-000002", "pub-000003"]
    (location / "pub-000004.partial").mkdir()  # a publish that crashed before LATEST
    assert latest(location)["number"] == 3  # type: ignore[index]
    assert fetch(location, cache_dir=tmp_path / "cache", current=3) is None
    publish(writer.data_dir, location)
    # The crashed number is skipped and its leftover removed; the previous published one stays.
    assert sorted(os.listdir(location)) == [LATEST_FILE, "pub-000003", "pub-000005"]
    assert json.loads((location / LATEST_FILE).read_text())["number"] == 5
    assert not list(writer.data_dir.glob("publish.tmp-*"))


def test_location_parses_paths_and_urls(tmp_path: Path) -> None:
    assert Location(tmp_path).local == tmp_path
    assert Location(f"file://{tmp_path}").local == tmp_path
    remote = Location("mock://bucket/gens")
    assert remote.local is None and remote.names() == []
