"""Durability under SIGKILL, with real processes, real signals and real files (issue 4).

* The batch indexer (``deepfeat index`` as a subprocess) is killed at seeded random moments: while it
  starts, while it creates the store, between and inside batches, while it writes snapshots (a snapshot
  after every batch). After each kill the store on disk is checked as the next process would see it:
  every committed row is searchable and its vector is the catalog's, FAISS holds exactly the catalog's
  rows (no vector without its row or the reverse, also in the snapshot file itself), nothing outside
  the source folder was indexed, no temporary file is loaded. A final run completes and the end state
  equals a clean run's.
* The server (``deepfeat serve`` as a subprocess) is killed while clients add images over HTTP; after
  each restart every add that was acknowledged (201/200) is there and searchable.
* Two writers at once: the indexer subprocess and the running server on one data dir; every image ends
  up exactly once and searches running meanwhile never fail.
"""

from __future__ import annotations

import hashlib
import random
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from deepfeat.index.errors import StoreError
from deepfeat.index.files import PENDING_MARKER
from deepfeat.index.store import CATALOG_FILE, LOCK_FILE, MANIFEST_FILE, SNAPSHOT_FILE, ImageStore
from deepfeat.index.vectors import VectorIndex
from deepfeat.models.embedder import Embedder
from tests.app import hostile as h
from tests.app.live import free_port, live_server
from tests.app.serve_proc import DEEPFEAT, clean_env, served

pytestmark = pytest.mark.slow

Photos = dict[str, Image.Image]
KNOWN_FILES = {
    CATALOG_FILE,
    f"{CATALOG_FILE}-wal",
    f"{CATALOG_FILE}-shm",
    MANIFEST_FILE,
    SNAPSHOT_FILE,
    LOCK_FILE,
}
KNOWN_FILES |= {"index-report.jsonl"}


# ====================================================================================== inputs


@pytest.fixture(scope="module")
def cli_embedder(tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    """The embedder `deepfeat index` and `deepfeat serve` build for a new store with default settings:
    its fingerprint is the one a restart opens the store with."""
    from deepfeat.runtime import build_embedder
    from deepfeat.settings import Settings

    return build_embedder(Settings(data_dir=tmp_path_factory.mktemp("no-store")))


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory: pytest.TempPathFactory, photos: Photos) -> Path:
    """Twelve distinct real-photo JPEGs: a shifted crop and a mirror image of each fixture photo."""
    root = tmp_path_factory.mktemp("kill-src")
    for name, photo in photos.items():
        (root / f"{name}-crop.jpg").write_bytes(h.encode(h.variant(photo, 1)))
        (root / f"{name}-mirror.jpg").write_bytes(h.encode(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    return root


def _shas(folder: Path) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


# ====================================================================================== looking at a store


def _catalog_rows(data_dir: Path) -> dict[int, tuple[str, str, np.ndarray]]:
    """seq -> (id, sha256, vectors), read straight from SQLite the way the next process would;
    vectors is flat: the global vector, then the regional ones."""
    path = data_dir / CATALOG_FILE
    if not path.exists():
        return {}
    conn = sqlite3.connect(path, timeout=30)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "images" not in tables:  # killed while creating the schema: nothing was ever committed
            return {}
        return {
            int(seq): (str(image_id), str(sha), np.frombuffer(vector, dtype="<f4").astype(np.float32))
            for seq, image_id, sha, vector in conn.execute("SELECT seq, id, sha256, vector FROM images")
        }
    finally:
        conn.close()


def _catalog_count(data_dir: Path) -> int:
    try:
        conn = sqlite3.connect(data_dir / CATALOG_FILE, timeout=5)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM images").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def check_store(data_dir: Path, embedder: Embedder, allowed_shas: set[str]) -> set[str]:
    """Every invariant a restart relies on; returns the committed sha256s."""
    if not data_dir.exists():
        return set()
    names = {p.name for p in data_dir.iterdir()}
    strays = {n for n in names - KNOWN_FILES if ".tmp-" not in n and not n.startswith(PENDING_MARKER)}
    assert not strays, f"unexpected files in the data dir: {strays}"

    rows = _catalog_rows(data_dir)
    shas = [sha for _, sha, _ in rows.values()]
    assert len(shas) == len(set(shas)), "the same content was committed twice"
    assert set(shas) <= allowed_shas, "a row that is not one of the source files"
    per_image = embedder.vectors_per_image  # the global vector and the regional ones, all unit
    for _, _, vector in rows.values():
        assert vector.shape == (per_image * embedder.dim,)
        assert np.allclose(np.linalg.norm(vector.reshape(per_image, -1), axis=1), 1, atol=1e-3)

    # The snapshot file on disk (whatever a crash left in place under the real name) never holds a
    # vector whose row is not committed: FAISS only ever gets rows after their transaction commits.
    snap = data_dir / SNAPSHOT_FILE
    if snap.exists():
        held = set(VectorIndex.load(snap).seqs().tolist())
        assert held <= set(rows), f"snapshot holds vectors without catalog rows: {sorted(held - set(rows))}"

    try:
        store = ImageStore.open(data_dir, fingerprint=embedder.fingerprint, dim=embedder.dim, read_only=True)
    except StoreError as exc:
        # Killed while the store was being created: there must be nothing committed to lose.
        assert not rows, f"store with {len(rows)} rows cannot be opened: {exc}"
        return set()
    with store:
        # FAISS as loaded and reconciled == the catalog, exactly.
        assert store._vectors.seqs().tolist() == sorted(rows), "FAISS images != catalog seqs"
        assert store._vectors.ntotal == len(rows) * per_image, "an image lost some of its vectors"
        assert store.count == len(rows)
        if rows:
            seqs = sorted(rows)
            queries = np.stack([rows[s][2][: embedder.dim] for s in seqs])  # global vectors
            for seq, hits in zip(seqs, store.search(queries, 1), strict=True):
                assert hits and hits[0].id == rows[seq][0] and hits[0].score > 0.999, (seq, hits)
    return set(shas)


def _ranking(data_dir: Path, embedder: Embedder) -> dict[str, list[tuple[str, float]]]:
    """For each stored image (by sha256): the top-5 (sha256, score) when its own vector is the query."""
    with ImageStore.open(
        data_dir, fingerprint=embedder.fingerprint, dim=embedder.dim, read_only=True
    ) as store:
        rows = _catalog_rows(data_dir)
        sha_of_id = {image_id: sha for image_id, sha, _ in rows.values()}
        seqs = sorted(rows)
        hits = store.search(np.stack([rows[s][2][: embedder.dim] for s in seqs]), 5)
        return {
            rows[s][1]: [(sha_of_id[hit.id], round(hit.score, 3)) for hit in row]
            for s, row in zip(seqs, hits, strict=True)
        }


# ====================================================================================== the indexer


def _index_command(src: Path, data_dir: Path) -> list[str]:
    """``deepfeat index`` decoding in its own process, two images a batch: many commits to kill between."""
    return [
        DEEPFEAT, "index", str(src), "--data-dir", str(data_dir), "--workers", "0", "--batch-size", "2",
        "--no-progress",
    ]  # fmt: skip


def _index(src: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """A whole run, to its end."""
    return subprocess.run(
        _index_command(src, data_dir), capture_output=True, text=True, env=clean_env(), timeout=180
    )


def _indexer(src: Path, data_dir: Path) -> subprocess.Popen[str]:
    """A run to kill."""
    return subprocess.Popen(
        _index_command(src, data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(DEEPFEAT_SNAPSHOT_EVERY="2"),  # a snapshot after every batch: more crash points
    )


def _kill(proc: subprocess.Popen[str]) -> bool:
    """SIGKILL; True when it was still running (a real kill), False when it had finished."""
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return proc.returncode == -signal.SIGKILL


def test_indexer_killed_at_random_moments_loses_nothing(
    tmp_path: Path, source_dir: Path, cli_embedder: Embedder
) -> None:
    rng = random.Random(20241123)
    wanted = _shas(source_dir)
    assert len(wanted) == 12

    clean = tmp_path / "clean"
    done = _index(source_dir, clean)
    assert done.returncode == 0, done.stderr
    assert check_store(clean, cli_embedder, wanted) == wanted
    reference = _ranking(clean, cli_embedder)

    started = time.monotonic()
    kills, episode, moments = 0, 0, []
    data_dir = tmp_path / f"episode-{episode}"
    while kills < 10 and time.monotonic() - started < 150:
        before = check_store(data_dir, cli_embedder, wanted)
        if before == wanted:  # this store is complete: start a fresh one so kills land mid-work again
            episode += 1
            data_dir = tmp_path / f"episode-{episode}"
            before = set()
        proc = _indexer(source_dir, data_dir)
        try:
            if rng.random() < 0.3:
                at = rng.uniform(0.2, 6.0)
                moment = f"at {at:.2f}s (start-up, model load or store creation)"
                time.sleep(at)
            else:
                target = rng.randrange(len(before), len(wanted))
                delay = rng.uniform(0.0, 0.5)
                moment = f"{delay:.2f}s after {target} rows"
                deadline = time.monotonic() + 60
                while (
                    _catalog_count(data_dir) < target and proc.poll() is None and time.monotonic() < deadline
                ):
                    time.sleep(0.01)
                time.sleep(delay)
            killed = _kill(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if killed:
            kills += 1
        else:
            assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        after = check_store(data_dir, cli_embedder, wanted)
        assert before <= after, "a kill lost committed images"
        moments.append(f"{moment}: {len(before)} -> {len(after)} rows{'' if killed else ' (finished first)'}")
    assert kills >= 6, moments
    print("indexer kills:", *moments, sep="\n  ")  # shown with -s or on failure

    # A full run on the last (crashed) store completes and ends where a clean run ends.
    done = _index(source_dir, data_dir)
    assert done.returncode == 0, done.stderr
    assert "store now holds 12 images" in done.stdout, done.stdout
    assert check_store(data_dir, cli_embedder, wanted) == wanted
    with ImageStore.open(
        data_dir, fingerprint=cli_embedder.fingerprint, dim=cli_embedder.dim
    ) as store:  # a writer's open
        assert store.count == 12
    assert not [p.name for p in data_dir.iterdir() if ".tmp-" in p.name]
    assert _ranking(data_dir, cli_embedder) == reference, moments


# ====================================================================================== the server


@pytest.fixture(scope="module")
def upload_pool(photos: Photos) -> list[bytes]:
    """Distinct JPEGs to add over HTTP (small, so a round adds many)."""
    return [
        h.encode(h.variant(photo, i).resize((224, 168)), quality=85)
        for i in range(5)
        for photo in photos.values()
    ]


def test_server_killed_during_adds_keeps_every_acknowledged_image(
    tmp_path: Path, upload_pool: list[bytes]
) -> None:
    rng = random.Random(7)
    data_dir = tmp_path / "data"
    acked: dict[str, str] = {}  # sha256 -> id, for every add that got 201/200
    statuses: list[int] = []
    pending = list(upload_pool)
    port = free_port()
    for _round in range(4):
        with served(data_dir, port=port, DEEPFEAT_SNAPSHOT_EVERY="3") as (proc, base):
            # Everything acknowledged so far survived the previous kill and is searchable.
            with httpx.Client(base_url=base, timeout=30) as http:
                assert http.get("/v1/stats").json()["count"] >= len(acked)
                for sha, image_id in acked.items():
                    assert http.get(f"/v1/images/{image_id}").json()["sha256"] == sha
                for data in upload_pool:
                    sha = hashlib.sha256(data).hexdigest()
                    if sha in acked:
                        top = http.post(
                            "/v1/search?k=1", files={"file": ("q.jpg", data, "image/jpeg")}
                        ).json()
                        assert top["results"][0]["id"] == acked[sha] and top["results"][0]["score"] > 0.99

            lock = threading.Lock()

            def adder(items: list[bytes]) -> None:
                with httpx.Client(base_url=base, timeout=30) as http:  # noqa: B023
                    for data in items:
                        try:
                            resp = http.post("/v1/images", files={"file": ("a.jpg", data, "image/jpeg")})
                        except httpx.TransportError:
                            return  # the server died under us: this add's fate is unknown, both are fine
                        with lock:  # noqa: B023
                            statuses.append(resp.status_code)
                            if resp.status_code in (200, 201):
                                acked[hashlib.sha256(data).hexdigest()] = resp.json()["id"]

            threads = [threading.Thread(target=adder, args=(pending[i::2],)) for i in range(2)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.3, 2.5))
            proc.send_signal(signal.SIGKILL)
            for t in threads:
                t.join(timeout=60)
            proc.wait(timeout=30)
            assert proc.returncode == -signal.SIGKILL
        pending = [d for d in upload_pool if hashlib.sha256(d).hexdigest() not in acked]
    assert set(statuses) <= {200, 201}, statuses
    assert len(acked) >= 4, "too few adds acknowledged to prove anything"

    with served(data_dir, port=port) as (_, base), httpx.Client(base_url=base, timeout=30) as http:
        for sha, image_id in acked.items():
            assert http.get(f"/v1/images/{image_id}").json()["sha256"] == sha
        stats = http.get("/v1/stats").json()
        rows = _catalog_rows(data_dir)
        assert stats["count"] == len(rows) >= len(acked)
        assert {sha for _, sha, _ in rows.values()} <= {hashlib.sha256(d).hexdigest() for d in upload_pool}


# ====================================================================================== two writers


def test_indexer_and_server_write_one_data_dir_at_once(
    tmp_path: Path, source_dir: Path, photos: Photos, cli_embedder: Embedder
) -> None:
    from deepfeat.settings import Settings

    data_dir = tmp_path / "data"
    files = sorted(source_dir.iterdir())
    # Over HTTP: four files the indexer also indexes (same bytes) and six images it does not have.
    http_items = [p.read_bytes() for p in files[::3]] + [
        h.encode(h.variant(photo, 9).resize((256, 192))) for photo in photos.values()
    ]
    expected = _shas(source_dir) | {hashlib.sha256(d).hexdigest() for d in http_items}
    assert len(expected) == 18

    settings = Settings(data_dir=data_dir, refresh_interval_s=0.2, snapshot_every=3)
    errors: list[str] = []
    searches = 0
    stop = threading.Event()
    with live_server(settings) as base:
        query = h.encode(photos["chelsea"].resize((200, 133)))

        def searcher() -> None:
            nonlocal searches
            with httpx.Client(base_url=base, timeout=60) as http:
                while not stop.is_set():
                    resp = http.post("/v1/search?k=20", files={"file": ("q.jpg", query, "image/jpeg")})
                    searches += 1
                    if resp.status_code != 200:
                        errors.append(f"search {resp.status_code}: {resp.text[:200]}")
                        continue
                    results = resp.json()["results"]
                    ids = [r["id"] for r in results]
                    scores = [r["score"] for r in results]
                    if len(ids) != len(set(ids)) or scores != sorted(scores, reverse=True):
                        errors.append(f"inconsistent results: {results}")

        search_thread = threading.Thread(target=searcher)
        search_thread.start()
        indexer = _indexer(source_dir, data_dir)
        try:
            with httpx.Client(base_url=base, timeout=60) as http:
                for data in http_items:
                    resp = http.post("/v1/images", files={"file": ("x.jpg", data, "image/jpeg")})
                    assert resp.status_code in (200, 201), resp.text
            out, err = indexer.communicate(timeout=180)
            assert indexer.returncode == 0, err
        finally:
            if indexer.poll() is None:
                indexer.kill()
                indexer.wait()
            with httpx.Client(base_url=base, timeout=60) as http:
                deadline = time.monotonic() + 20
                while http.get("/v1/stats").json()["count"] < len(expected) and time.monotonic() < deadline:
                    time.sleep(0.2)
                count = http.get("/v1/stats").json()["count"]
            stop.set()
            search_thread.join(timeout=60)
        assert not errors, errors[:5]
        assert searches > 0
        assert count == len(expected)  # the server caught up with the indexer's rows, each once
        with httpx.Client(base_url=base, timeout=60) as http:
            for data in http_items + [p.read_bytes() for p in files]:
                top = http.post("/v1/search?k=1", files={"file": ("q.jpg", data, "image/jpeg")}).json()[
                    "results"
                ]
                assert top[0]["score"] > 0.99
    assert check_store(data_dir, cli_embedder, expected) == expected
