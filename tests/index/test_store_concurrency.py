"""Two instances (or processes) on one directory, and threads searching while another adds."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from deepfeat.index.store import ImageStore
from tests.index._helpers import DIM, FINGERPRINT, new_images, sha_of, unit_vectors

Opener = Callable[..., ImageStore]


def test_refresh_sees_other_instance_adds_and_deletes(open_store: Opener) -> None:
    writer = open_store(snapshot_every=0)
    reader = open_store(read_only=True)
    assert reader.refresh() == 0
    base = unit_vectors(40)
    ids = [r.id for r in writer.add(base, new_images(40))]
    assert reader.count == 0 and reader.search(base[:1], 1) == [[]]
    assert reader.refresh() == 40
    assert reader.count == 40 and reader.search(base[5:6], 1)[0][0].id == ids[5]
    writer.delete(ids[5])
    writer.delete(ids[6])
    assert reader.refresh() == 2
    assert reader.count == 38 and reader.search(base[5:6], 1)[0][0].id != ids[5]
    assert reader.refresh() == 0  # nothing new: cheap no-op


def test_row_added_and_deleted_between_refreshes(open_store: Opener) -> None:
    writer = open_store(snapshot_every=0)
    reader = open_store(snapshot_every=0)
    ids = [r.id for r in writer.add(unit_vectors(3), new_images(3))]
    writer.delete(ids[2])  # the reader never saw it
    reader.refresh()
    assert reader.count == 2
    reader.add(unit_vectors(1, seed=4), new_images(1, start=10))  # the reader writes too
    writer.refresh()
    assert writer.count == reader.count == 3
    assert writer.refresh() == reader.refresh() == 0


def test_lagging_writer_snapshot_includes_others_rows(open_store: Opener, data_dir: Path) -> None:
    a = open_store(snapshot_every=0)
    b = open_store(snapshot_every=0)
    a.add(unit_vectors(10), new_images(10))
    b.snapshot()  # b never refreshed: snapshot() catches up first
    manifest = ImageStore.read_manifest(data_dir)
    assert manifest is not None and manifest.snapshot is not None and manifest.snapshot.count == 10


def test_searches_during_adds_never_see_half_a_batch(open_store: Opener) -> None:
    store = open_store(snapshot_every=0)
    batch, n_batches = 25, 24
    store.add(unit_vectors(batch, seed=100), new_images(batch, batch=0))
    errors: list[BaseException] = []
    stop = threading.Event()
    queries = unit_vectors(4, seed=7)
    checks = Counter[str]()

    def search_loop() -> None:
        try:
            while not stop.is_set():
                for hits in store.search(queries, 10_000):  # k >= count: every vector comes back
                    per_batch = Counter(h.record.metadata["batch"] for h in hits)
                    assert all(n == batch for n in per_batch.values()), per_batch
                    assert all(h.record.id == h.id for h in hits)
                    checks["searches"] += 1
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    def add_loop() -> None:
        try:
            for b in range(1, n_batches):
                store.add(unit_vectors(batch, seed=100 + b), new_images(batch, start=b * batch, batch=b))
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=search_loop) for _ in range(4)]
    writer = threading.Thread(target=add_loop)
    for t in [*readers, writer]:
        t.start()
    writer.join(timeout=60)
    stop.set()
    for t in readers:
        t.join(timeout=60)
    assert not errors, errors[0]
    assert store.count == batch * n_batches and checks["searches"] > 0


def test_searches_during_deletes_never_return_missing_records(open_store: Opener) -> None:
    store = open_store(snapshot_every=0)
    base = unit_vectors(300)
    ids = [r.id for r in store.add(base, new_images(300))]
    errors: list[BaseException] = []
    stop = threading.Event()

    def search_loop() -> None:
        try:
            while not stop.is_set():
                for hits in store.search(base[:8], 50):
                    assert all(h.record.id == h.id for h in hits)
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=search_loop) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        for image_id in ids[:150]:
            store.delete(image_id)
    finally:
        stop.set()
        for t in readers:
            t.join(timeout=60)
    assert not errors, errors[0]
    assert store.count == 150


def test_two_processes_add_concurrently(data_dir: Path, open_store: Opener) -> None:
    """The batch indexer and the server on one directory: every row from both ends up indexed once."""
    open_store().close()
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path.cwd())!r})
        from deepfeat.index.store import ImageStore
        from tests.index._helpers import FINGERPRINT, DIM, new_images, unit_vectors
        start = int(sys.argv[1])
        with ImageStore.open({str(data_dir)!r}, fingerprint=FINGERPRINT, dim=DIM, snapshot_every=40) as s:
            for b in range(10):
                s.add(unit_vectors(20, seed=start + b), new_images(20, start=start + 20 * b))
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(start)]) for start in (0, 1000)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    store = open_store()
    assert store.count == 400 and store.stats()["count"] == 400
    vectors = unit_vectors(20, seed=1000)
    hit = store.search(vectors[:1], 1)[0][0]
    assert hit.record.sha256 == sha_of(1000) and np.isclose(hit.score, 1.0, atol=1e-5)
    assert store.dim == DIM and store.fingerprint == FINGERPRINT
