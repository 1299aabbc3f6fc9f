"""Damaged files and full disks, with real photos, real files and (for disk full) a real small filesystem.

* A truncated, bit-flipped, emptied, deleted or swapped ``vectors.faiss`` is detected at start (checksum),
  set aside, rebuilt from the catalog, and searches return exactly what they returned before.
* A corrupt ``catalog.sqlite3`` (pages overwritten in the middle), a catalog row with a torn vector, or a
  garbage manifest makes the service come up *not ready* (``/ready`` 503 naming the problem) instead of
  serving half a state, and the damaged files are left as they were for a person to look at.
* Disk full (a tmpfs of a few MB filled with ballast): an add over HTTP gets 507 ``storage_full``,
  nothing changes, and the next add after space returns works; a snapshot on a full disk keeps the
  previous snapshot and manifest.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from deepfeat.app.main import create_app
from deepfeat.index.errors import StoreFullError
from deepfeat.index.files import QUARANTINE_DIR
from deepfeat.index.store import CATALOG_FILE, MANIFEST_FILE, SNAPSHOT_FILE, Hit, ImageStore, NewImage
from deepfeat.models.embedder import Embedder
from deepfeat.settings import Settings
from tests.app import hostile as h

Photos = dict[str, Image.Image]
N_VARIANTS = 5  # per photo: 30 images


# ================================================================================ helpers


def ranked(results: list[list[Hit]]) -> list[list[tuple[str, float]]]:
    return [[(hit.id, round(hit.score, 5)) for hit in hits] for hits in results]


def file_hashes(path: Path) -> dict[str, str]:
    """Every file but SQLite's -wal/-shm companions (which any reader may create or empty)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.iterdir())
        if p.is_file() and not p.name.endswith(("-wal", "-shm"))
    }


@pytest.fixture(scope="module")
def images(photos: Photos) -> list[Image.Image]:
    return [h.variant(photo, i) for photo in photos.values() for i in range(N_VARIANTS)]


@pytest.fixture(scope="module")
def vectors(lite0: Embedder, images: list[Image.Image]) -> np.ndarray:
    return lite0.embed(images)  # (30, 1280), unit norm


def _new_images(images: list[Image.Image]) -> list[NewImage]:
    out = []
    for i, img in enumerate(images):
        data = h.encode(img)
        out.append(
            NewImage(
                sha256=hashlib.sha256(data).hexdigest(),
                source=f"photo-{i}.jpg",
                width=img.width,
                height=img.height,
                nbytes=len(data),
                thumbnail=h.encode(img.resize((img.width // 4, img.height // 4))),
            )
        )
    return out


@pytest.fixture
def built_store(tmp_path: Path, lite0: Embedder, images: list[Image.Image], vectors: np.ndarray) -> Path:
    """A closed store (catalog + snapshot + manifest) holding the 30 real-photo vectors."""
    data_dir = tmp_path / "data"
    with ImageStore.open(data_dir, fingerprint=lite0.fingerprint, dim=lite0.dim) as store:
        store.add(vectors, _new_images(images))
    assert (data_dir / SNAPSHOT_FILE).exists()
    return data_dir


def _open(data_dir: Path, lite0: Embedder) -> ImageStore:
    return ImageStore.open(data_dir, fingerprint=lite0.fingerprint, dim=lite0.dim)


# ================================================================================ snapshot damage


def _damage(path: Path, kind: str, *, lite0: Embedder, vectors: np.ndarray, tmp: Path) -> None:
    data = bytearray(path.read_bytes())
    if kind == "truncated-half":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif kind == "truncated-last-byte":
        path.write_bytes(bytes(data[:-1]))
    elif kind == "bit-flip-middle":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif kind == "bit-flip-header":
        data[3] ^= 0x80
        path.write_bytes(bytes(data))
    elif kind == "emptied":
        path.write_bytes(b"")
    elif kind == "deleted":
        path.unlink()
    elif kind == "valid-but-other-index":
        # A well-formed FAISS file of the same kind holding only half the vectors: only the checksum
        # in the manifest can tell it is not the snapshot that was written.
        other = tmp / "other"
        with ImageStore.open(other, fingerprint=lite0.fingerprint, dim=lite0.dim) as store:
            store.add(vectors[:15], _new_images([Image.new("RGB", (32, 32), (i, i, i)) for i in range(15)]))
        shutil.copyfile(other / SNAPSHOT_FILE, path)
    else:
        raise AssertionError(kind)


SNAPSHOT_DAMAGE = [
    "truncated-half",
    "truncated-last-byte",
    "bit-flip-middle",
    "bit-flip-header",
    "emptied",
    "deleted",
    "valid-but-other-index",
]


@pytest.mark.parametrize("kind", SNAPSHOT_DAMAGE)
def test_damaged_snapshot_is_detected_set_aside_and_rebuilt(
    built_store: Path, lite0: Embedder, vectors: np.ndarray, tmp_path: Path, kind: str
) -> None:
    queries = vectors[::3] + 0.01  # near, not equal, to the stored vectors
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    with _open(built_store, lite0) as store:
        before = ranked(store.search(queries, 10))
        recorded = store.manifest.snapshot
    assert recorded is not None
    snap = built_store / SNAPSHOT_FILE
    _damage(snap, kind, lite0=lite0, vectors=vectors, tmp=tmp_path)
    damaged = snap.read_bytes() if snap.exists() else None

    with _open(built_store, lite0) as store:
        assert store.count == len(vectors)
        assert ranked(store.search(queries, 10)) == before
        # Rebuilt and persisted at once, with a checksum that matches the new file.
        snapshot = store.manifest.snapshot
        assert snapshot is not None and snapshot.count == len(vectors)
        assert snapshot.sha256 == hashlib.sha256(snap.read_bytes()).hexdigest()
    aside = sorted((built_store / QUARANTINE_DIR).glob(f"{SNAPSHOT_FILE}.*"))
    if damaged is None:
        assert aside == []
    else:
        assert len(aside) == 1 and aside[0].read_bytes() == damaged  # kept for a person to look at
    with _open(built_store, lite0) as store:  # and the next start is a plain load
        assert ranked(store.search(queries, 10)) == before
    assert len(list((built_store / QUARANTINE_DIR).glob(f"{SNAPSHOT_FILE}.*"))) == len(aside)


def test_torn_temp_files_are_never_loaded(built_store: Path, lite0: Embedder, vectors: np.ndarray) -> None:
    """What a writer killed mid-snapshot leaves behind: temp files beside the real ones."""
    with _open(built_store, lite0) as store:
        before = ranked(store.search(vectors[:5], 5))
    snap = built_store / SNAPSHOT_FILE
    torn = built_store / f"{SNAPSHOT_FILE}.tmp-99999-deadbeef"
    torn.write_bytes(snap.read_bytes()[:1000])
    torn_manifest = built_store / f"{MANIFEST_FILE}.tmp-99999-deadbeef"
    torn_manifest.write_text('{"fingerprint": ')
    good = file_hashes(built_store)
    with _open(built_store, lite0) as store:
        assert ranked(store.search(vectors[:5], 5)) == before
        store.add(vectors[1:2], _new_images([Image.new("RGB", (64, 64), "red")]))
        store.snapshot()  # a writer holding the lock clears what crashed writers left
    assert not torn.exists() and not torn_manifest.exists()
    assert file_hashes(built_store)[SNAPSHOT_FILE] != good[SNAPSHOT_FILE]


# ================================================================================ the service on damaged stores


def _settings(data_dir: Path, **extra: Any) -> Settings:
    return Settings(data_dir=data_dir, **extra)


def _add_photos(client: TestClient, photos: Photos) -> dict[str, str]:
    ids = {}
    for name, img in photos.items():
        resp = client.post("/v1/images", files={"file": (f"{name}.jpg", h.encode(img), "image/jpeg")})
        assert resp.status_code == 201, resp.text
        ids[name] = resp.json()["id"]
    return ids


def _search_all(client: TestClient, photos: Photos) -> dict[str, list[tuple[str, float]]]:
    out = {}
    for name, img in photos.items():
        query = h.encode(img.resize((img.width // 2, img.height // 2)), quality=70)
        resp = client.post("/v1/search?k=6", files={"file": ("q.jpg", query, "image/jpeg")})
        assert resp.status_code == 200, resp.text
        out[name] = [(r["id"], round(r["score"], 5)) for r in resp.json()["results"]]
    return out


@pytest.fixture(scope="module")
def served_template(
    tmp_path_factory: pytest.TempPathFactory, photos: Photos
) -> tuple[Path, dict[str, str], dict[str, Any]]:
    """A data dir written by the service (six real photos), the ids, and what searches returned."""
    data_dir = tmp_path_factory.mktemp("served") / "data"
    with TestClient(create_app(_settings(data_dir))) as client:
        ids = _add_photos(client, photos)
        results = _search_all(client, photos)
    return data_dir, ids, results


@pytest.fixture
def served_store(
    served_template: tuple[Path, dict[str, str], dict[str, Any]], tmp_path: Path
) -> tuple[Path, dict[str, str], dict[str, Any]]:
    """A private copy of the template (each test damages its own)."""
    template, ids, results = served_template
    data_dir = tmp_path / "data"
    shutil.copytree(template, data_dir)
    return data_dir, ids, results


def test_service_restarts_on_a_bit_flipped_snapshot(
    served_store: tuple[Path, dict[str, str], dict[str, Any]], photos: Photos
) -> None:
    data_dir, ids, results = served_store
    snap = data_dir / SNAPSHOT_FILE
    data = bytearray(snap.read_bytes())
    data[len(data) // 3] ^= 0x04
    snap.write_bytes(bytes(data))
    with TestClient(create_app(_settings(data_dir))) as client:
        assert client.get("/ready").status_code == 200
        assert client.get("/v1/stats").json()["count"] == len(ids)
        assert _search_all(client, photos) == results
    assert len(list((data_dir / QUARANTINE_DIR).glob(f"{SNAPSHOT_FILE}.*"))) == 1


def _smash_catalog_pages(path: Path) -> None:
    """Overwrite b-tree pages in the middle of the database file with garbage."""
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 12 * page, "catalog too small to damage its middle"
    rng = np.random.default_rng(4)
    for first in range(len(data) // page // 3, 2 * len(data) // page // 3, 3):
        data[first * page : first * page + 200] = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def _checkpoint(data_dir: Path) -> None:
    """Fold the WAL into the main file, as a clean shutdown eventually does, so damage lands in it."""
    conn = sqlite3.connect(data_dir / CATALOG_FILE)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def _tear_a_vector(data_dir: Path) -> None:
    conn = sqlite3.connect(data_dir / CATALOG_FILE)
    try:
        conn.execute("UPDATE images SET vector = substr(vector, 1, 100) WHERE seq = 3")
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("damage", "expect"),
    [
        ("catalog-pages-overwritten", "corrupt_store"),
        ("catalog-row-with-torn-vector", "corrupt_store"),
        ("catalog-replaced-by-garbage", "corrupt_store"),
        ("manifest-truncated", "corrupt_store"),
    ],
)
def test_corrupt_catalog_or_manifest_is_not_ready_with_a_clear_message(
    served_store: tuple[Path, dict[str, str], dict[str, Any]], photos: Photos, damage: str, expect: str
) -> None:
    data_dir, ids, _ = served_store
    _checkpoint(data_dir)
    catalog = data_dir / CATALOG_FILE
    if damage == "catalog-pages-overwritten":
        _smash_catalog_pages(catalog)
    elif damage == "catalog-row-with-torn-vector":
        _tear_a_vector(data_dir)
    elif damage == "catalog-replaced-by-garbage":
        catalog.write_bytes(os.urandom(64 * 1024))
    else:
        manifest = data_dir / MANIFEST_FILE
        manifest.write_bytes(manifest.read_bytes()[:40])
    damaged = file_hashes(data_dir)

    with TestClient(create_app(_settings(data_dir))) as client:
        ready = client.get("/ready")
        assert ready.status_code == 503, ready.text
        detail = ready.json()["detail"]
        assert ready.json()["status"] == "not_ready" and expect in detail, detail
        name = MANIFEST_FILE if damage.startswith("manifest") else CATALOG_FILE
        assert name in detail or "catalog" in detail, detail  # names what is broken
        # Nothing is served from half a state: every store-backed route says why, liveness stays up.
        assert client.get("/health").status_code == 200
        for resp in (
            client.get("/v1/stats"),
            client.get(f"/v1/images/{ids['coffee']}"),
            client.post("/v1/search", files={"file": ("q.jpg", h.encode(photos["coffee"]), "image/jpeg")}),
            client.post("/v1/images", files={"file": ("q.jpg", h.encode(photos["rocket"]), "image/jpeg")}),
        ):
            assert resp.status_code == 503 and resp.json()["code"] == "not_ready", resp.text
            assert expect in resp.json()["detail"]
    # The damaged files are left exactly as they were (no "repair" that destroys evidence or data).
    after = file_hashes(data_dir)
    assert {k: v for k, v in after.items() if k != ".lock"} == {
        k: v for k, v in damaged.items() if k != ".lock"
    }


# ================================================================================ disk full (a real small filesystem)


@contextlib.contextmanager
def small_filesystem(path: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` at ``path`` (needs root / CAP_SYS_ADMIN, as in CI); skips otherwise."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip() or result.returncode})")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path, *, leave: int = 0) -> Path:
    """Write a ballast file until the filesystem has at most ``leave`` bytes free; returns it."""
    ballast = directory / f"ballast-{uuid.uuid4().hex[:6]}"
    chunk = b"\xa5" * (256 * 1024)
    with open(ballast, "wb") as fh:
        while True:
            free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
            if free <= leave:
                break
            try:
                fh.write(chunk[: max(4096, min(len(chunk), free - leave))])
                fh.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    return ballast


def test_add_on_a_full_disk_is_507_and_changes_nothing(tmp_path: Path, photos: Photos) -> None:
    with small_filesystem(tmp_path / "fs", 48) as fs:
        data_dir = fs / "data"
        with TestClient(create_app(_settings(data_dir))) as client:
            first = client.post(
                "/v1/images", files={"file": ("a.jpg", h.encode(photos["coffee"]), "image/jpeg")}
            )
            assert first.status_code == 201
            before_search = _search_all(client, {"coffee": photos["coffee"]})
            conn = sqlite3.connect(data_dir / CATALOG_FILE)
            rows_before = conn.execute("SELECT id, sha256 FROM images ORDER BY seq").fetchall()

            ballast = fill(fs)
            big = h.encode(photos["astronaut"], quality=98)  # its thumbnail and vector need new pages
            for attempt in range(3):  # and it stays refused, without side effects, while the disk is full
                resp = client.post(
                    "/v1/images",
                    files={"file": ("b.jpg", big, "image/jpeg")},
                    data={"source": "x" * 4000, "metadata": json.dumps({"pad": "y" * 8000})},
                )
                assert resp.status_code == 507, (attempt, resp.status_code, resp.text)
                assert resp.json()["code"] == "storage_full" and "space" in resp.json()["detail"]
            assert client.get("/v1/stats").json()["count"] == 1
            assert conn.execute("SELECT id, sha256 FROM images ORDER BY seq").fetchall() == rows_before
            assert _search_all(client, {"coffee": photos["coffee"]}) == before_search
            assert client.get("/ready").status_code == 200  # a full disk is not a broken store

            ballast.unlink()  # space returns
            again = client.post("/v1/images", files={"file": ("b.jpg", big, "image/jpeg")})
            assert again.status_code == 201, again.text
            hits = client.post(
                "/v1/search?k=1", files={"file": ("q.jpg", h.encode(photos["astronaut"]), "image/jpeg")}
            ).json()["results"]
            assert hits[0]["id"] == again.json()["id"]
            assert client.get("/v1/stats").json()["count"] == 2
            conn.close()
        with TestClient(create_app(_settings(data_dir))) as client:  # and it all survives a restart
            assert client.get("/v1/stats").json()["count"] == 2


def test_snapshot_on_a_full_disk_keeps_the_previous_one(
    tmp_path: Path, lite0: Embedder, vectors: np.ndarray, images: list[Image.Image]
) -> None:
    with small_filesystem(tmp_path / "fs", 24) as fs:
        data_dir = fs / "data"
        store = ImageStore.open(data_dir, fingerprint=lite0.fingerprint, dim=lite0.dim, snapshot_every=0)
        try:
            store.add(vectors[:10], _new_images(images[:10]))
            store.snapshot()
            good = file_hashes(data_dir)
            store.add(vectors[10:], _new_images(images[10:]))
            # Room for nothing as big as a snapshot (20+ vectors x 5 kB) but for SQLite's small writes.
            ballast = fill(fs, leave=16 * 1024)
            with pytest.raises(StoreFullError):
                store.snapshot()
            after = file_hashes(data_dir)
            assert after[SNAPSHOT_FILE] == good[SNAPSHOT_FILE] and after[MANIFEST_FILE] == good[MANIFEST_FILE]
            assert not [p.name for p in data_dir.iterdir() if ".tmp-" in p.name]
            assert store.count == len(vectors)  # still searchable from memory
            ballast.unlink()
            store.snapshot()
        finally:
            store.close()
        with _open(data_dir, lite0) as reopened:
            assert reopened.count == len(vectors)
            assert reopened.manifest.snapshot is not None and reopened.manifest.snapshot.count == len(vectors)
