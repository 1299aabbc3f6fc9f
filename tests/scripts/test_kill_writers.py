"""Every writer under SIGKILL (issue 17): ``whiten``, ``whiten --remove``, ``build-index`` under a
read-only replica that switches generations, ``train-classifier``, ``export``/``import``, the server
under concurrent deletes and adds, and ``index --engine ray``: real ``deepfeat`` processes on real files.

Kills are seeded and aimed: the harness polls for the moment a writer is most fragile (its temp file
appearing, a snapshot or generation renamed into place before the manifest names it, the manifest's
own temp file, a classifier's directory swapped) and kills the process group within a millisecond of
it, or after a seeded random delay. After each kill the store is checked as the next process would see
it (every committed row there, FAISS equal to the catalog, the manifest naming only files that
verify, each image its own nearest neighbour); after the command is run again it has completed and the
data dir holds no temp file, no ``.partial`` or claim directory, no pending marker, nothing
quarantined and nothing named corrupt. The tests assert that the narrow windows were really hit.

A classifier save is also killed before each of its filesystem changes in turn (a forked child and
Python's audit hooks), since the swap of two directories is too short a window to aim at from outside.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from deepfeat.index.files import (
    MANIFEST_FILE,
    PENDING_MARKER,
    QUARANTINE_DIR,
    SNAPSHOT_FILE,
)
from deepfeat.index.generations import GENERATIONS_DIR
from deepfeat.index.manifest import Manifest
from deepfeat.index.store import ImageStore, NewImage
from deepfeat.index.whitening import Whitening
from tests.app import hostile as h
from tests.app.serve_proc import DEEPFEAT, clean_env, served
from tests.conftest import FAST_FLAGS
from tests.scripts.test_kill import _catalog_count, _catalog_rows
from tests.scripts.test_kill import upload_pool as kill_upload_pool  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow

Photos = dict[str, Image.Image]
SYNTHETIC = 600
"""Images added to the seed store without embedding (random unit vectors under the real embedder's
identity): enough for a whitening of 64 dimensions and an IVF generation, cheap to copy."""


# ====================================================================================== the harness


def leftovers(data_dir: Path) -> list[str]:
    """Whatever a crash may leave and a completed run must have swept, anywhere under ``data_dir``:
    temp files (``*.tmp-*``), build and claim directories, pending markers, a classifier's swapped-out
    directory, files set aside as corrupt, anything quarantined."""
    found = []
    for path in data_dir.rglob("*"):
        name = path.name
        rel = str(path.relative_to(data_dir))
        if (
            ".tmp-" in name
            or name.endswith(".partial")
            or name.startswith(".claim-")
            or name.startswith(PENDING_MARKER)
            or ".old-" in name
            or ".corrupt" in name
            or rel.startswith(QUARANTINE_DIR)
        ):
            found.append(rel)
    return sorted(found)


def start(argv: list[str], **env: str) -> subprocess.Popen[str]:
    """A ``deepfeat`` command in its own process group (its children, e.g. build-index's, die with it)."""
    return subprocess.Popen(
        [DEEPFEAT, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(**env),
        start_new_session=True,
    )


def run(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """A whole run, to its end; fails the test on a non-zero exit."""
    done = subprocess.run(
        [DEEPFEAT, *argv], capture_output=True, text=True, env=clean_env(**env), timeout=300
    )
    assert done.returncode == 0, f"deepfeat {' '.join(argv)} failed:\n{done.stdout}\n{done.stderr[-3000:]}"
    return done


def kill_when(
    proc: subprocess.Popen[str], trigger: Callable[[], bool], *, delay: float = 0.0, timeout: float = 120
) -> bool:
    """SIGKILL the process group ``delay`` seconds after ``trigger()`` first holds (polled as fast as
    Python can, so a kill aimed at a window of a few milliseconds lands in it). True when the process
    was killed, False when it finished first (with status 0)."""
    deadline = time.monotonic() + timeout
    try:
        while not trigger():
            if proc.poll() is not None:
                break
            assert time.monotonic() < deadline, "the moment to kill at never came"
            time.sleep(0.0002)
        if delay:
            time.sleep(delay)
        if proc.poll() is not None:
            out, err = proc.communicate()
            assert proc.returncode == 0, f"exited {proc.returncode} before the kill:\n{out}\n{err[-3000:]}"
            return False
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        return proc.returncode == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def appears(folder: Path, pattern: str) -> Callable[[], bool]:
    """A trigger: a file matching ``pattern`` exists in ``folder``."""

    def check() -> bool:
        try:
            return any(folder.glob(pattern))
        except OSError:
            return False

    return check


def replaced(path: Path) -> Callable[[], bool]:
    """A trigger: ``path`` is another file than now (``os.replace`` put a new one in place)."""
    before = path.stat().st_ino

    def check() -> bool:
        try:
            return path.stat().st_ino != before
        except FileNotFoundError:
            return False

    return check


def open_read_only(data_dir: Path) -> ImageStore:
    manifest = Manifest.load(data_dir / MANIFEST_FILE)
    assert manifest is not None
    return ImageStore.open(data_dir, fingerprint=manifest.fingerprint, dim=manifest.dim, read_only=True)


def check_store(data_dir: Path, expected: dict[str, str], *, at_most: bool = False) -> Manifest:
    """What the next process relies on: the catalog holds exactly ``expected`` (sha256 -> id; with
    ``at_most``, some of it), the manifest names only files that verify, and a (read-only, so nothing
    is repaired here) open gives FAISS == catalog, each image its own nearest neighbour. Returns the
    manifest."""
    rows = _catalog_rows(data_dir)
    held = {sha: image_id for image_id, sha, _ in rows.values()}
    if at_most:
        assert held.items() <= expected.items(), "the catalog holds rows it was never given"
        expected = held
    assert held == expected, "the catalog lost or gained rows"
    manifest = Manifest.load(data_dir / MANIFEST_FILE)
    assert manifest is not None
    Whitening.load_recorded(data_dir, manifest.extra.get("whitening"))  # raises unless it verifies
    with open_read_only(data_dir) as store:
        in_faiss = set(store._vectors.seqs().tolist())
        if store._base is not None:  # a replica: the generation it maps plus the rows after it
            in_faiss |= set(store._base.index.seqs().tolist()) - set(store._base.hidden.tolist())
        assert sorted(in_faiss) == sorted(rows), "FAISS != catalog"
        assert store.count == len(rows)
        for image_id in rng_sample(sorted(expected.values()), 8):
            top = store.search(store.vector(image_id)[None], 1)[0]
            assert top and top[0].id == image_id and top[0].score > 0.99, (image_id, top)
    return manifest


def rng_sample(items: list[str], n: int) -> list[str]:
    return random.Random(len(items)).sample(items, min(n, len(items)))


def whitening_files(data_dir: Path) -> set[str]:
    return {p.name for p in data_dir.glob("whitening-*.faiss")}


# ====================================================================================== stores


@pytest.fixture(scope="module")
def seed_store(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> Path:
    """A store made by ``deepfeat index`` (the fast embedder) from the six fixture photos, plus
    :data:`SYNTHETIC` images added in-process under its identity; tests copy it."""
    data_dir = tmp_path_factory.mktemp("kill-writers") / "seed"
    run(
        ["index", str(photo_dir), "--data-dir", str(data_dir), "--workers", "0", "--no-progress", *FAST_FLAGS]
    )
    manifest = Manifest.load(data_dir / MANIFEST_FILE)
    assert manifest is not None and manifest.count == 6
    with ImageStore.open(
        data_dir,
        fingerprint=manifest.fingerprint,
        dim=manifest.dim,
        embedder_config=manifest.embedder,
    ) as store:
        per_image = store.stats()["vectors_per_image"]
        rng = np.random.default_rng(17)
        x = rng.standard_normal((SYNTHETIC, per_image, manifest.dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=2, keepdims=True)
        images = [
            NewImage(
                sha256=hashlib.sha256(f"synthetic-{i}".encode()).hexdigest(),
                source=f"/synthetic/{i}.jpg", width=640, height=480, nbytes=1000 + i, metadata={"i": i},
            )
            for i in range(SYNTHETIC)
        ]  # fmt: skip
        store.add(x if per_image > 1 else x[:, 0], images)
    return data_dir


def copy_store(seed: Path, target: Path) -> dict[str, str]:
    """A private copy of ``seed``; returns its catalog (sha256 -> id)."""
    shutil.copytree(seed, target)
    return {sha: image_id for image_id, sha, _ in _catalog_rows(target).values()}


# ====================================================================================== whiten


def _interrupted_snapshot(data_dir: Path) -> bool:
    """Whether the store shows a snapshot renamed into place whose manifest write never happened."""
    manifest = Manifest.load(data_dir / MANIFEST_FILE)
    snap = data_dir / SNAPSHOT_FILE
    if manifest is None or manifest.snapshot is None or not snap.exists():
        return False
    return hashlib.sha256(snap.read_bytes()).hexdigest() != manifest.snapshot.sha256


def test_whiten_and_whiten_remove(tmp_path: Path, seed_store: Path) -> None:
    rng = random.Random(1717)
    data_dir = tmp_path / "data"
    expected = copy_store(seed_store, data_dir)
    whiten = ["whiten", "--data-dir", str(data_dir), "--dim", "64"]
    remove = ["whiten", "--data-dir", str(data_dir), "--remove"]
    # (command, moment, trigger factory, delay): aimed kills, each delay drawn from the seeded rng.
    plan: list[tuple[list[str], str, Callable[[], Callable[[], bool]], float]] = [
        (
            whiten,
            "whitening temp file",
            lambda: appears(data_dir, "whitening-*.tmp-*"),
            rng.uniform(0, 0.004),
        ),
        (whiten, "snapshot renamed", lambda: replaced(data_dir / SNAPSHOT_FILE), 0.0),
        (whiten, None, None, 0.0),  # type: ignore[list-item]  # the re-run
        (remove, "pending marker", lambda: appears(data_dir, PENDING_MARKER + "*"), rng.uniform(0, 0.004)),
        (remove, "snapshot renamed", lambda: replaced(data_dir / SNAPSHOT_FILE), 0.0),
        (remove, None, None, 0.0),  # type: ignore[list-item]
    ]
    landed: list[str] = []
    for argv, moment, trigger, delay in plan:
        if moment is None:  # the command again, to its end
            run(argv)
            manifest = check_store(data_dir, expected)
            assert not leftovers(data_dir), leftovers(data_dir)
            entry = manifest.extra.get("whitening")
            if argv is whiten:
                assert entry is not None and entry["d_out"] == 64
                assert whitening_files(data_dir) == {entry["file"]}
            else:
                assert entry is None and not whitening_files(data_dir)
            continue
        proc = start(argv)
        killed = kill_when(proc, trigger(), delay=delay)
        interrupted = _interrupted_snapshot(data_dir)
        landed.append(
            f"{argv[-1]} {moment} +{delay * 1000:.1f} ms: {'killed' if killed else 'finished'}"
            f"{' (snapshot renamed, manifest not written)' if interrupted else ''}"
        )
        manifest = check_store(data_dir, expected)
        assert not list((data_dir / QUARANTINE_DIR).glob("*")), "a read-only open quarantined something"
    print("whiten kills:", *landed, sep="\n  ")
    assert any("manifest not written" in line for line in landed), landed


# ====================================================================================== build-index + a replica


def new_name(folder: Path, pattern: str) -> Callable[[], bool]:
    """A trigger: a name matching ``pattern`` that was not in ``folder`` before shows up there."""
    before = {p.name for p in folder.glob(pattern)}

    def check() -> bool:
        try:
            return any(p.name not in before for p in folder.glob(pattern))
        except OSError:
            return False

    return check


def test_build_index_killed_while_a_replica_switches_generations(
    tmp_path: Path, seed_store: Path, photo_dir: Path
) -> None:
    from deepfeat.index.generations import header_name, load_generation
    from deepfeat.settings import Settings
    from tests.app.live import live_server

    rng = random.Random(4242)
    data_dir = tmp_path / "data"
    expected = copy_store(seed_store, data_dir)
    gen_dir = data_dir / GENERATIONS_DIR
    build = ["build-index", "--data-dir", str(data_dir), "--index", "IVF16,Flat", "--max-memory", "512MiB",
             "--no-progress"]  # fmt: skip
    queries = {  # each fixture photo, as uploaded, and the id it was indexed under
        path.name: (path.read_bytes(), expected[hashlib.sha256(path.read_bytes()).hexdigest()])
        for path in sorted(photo_dir.rglob("*.jpg"))
    }
    run(build)  # generation 1: the replica starts on it

    settings = Settings(data_dir=data_dir, read_only=True, refresh_interval_s=0.1, precision="fp32")
    errors: list[str] = []
    generations_seen: set[int | None] = set()
    searches = 0
    stop = threading.Event()
    with live_server(settings) as base:

        def searcher() -> None:
            nonlocal searches
            with httpx.Client(base_url=base, timeout=60) as http:
                while not stop.is_set():
                    for name, (data, image_id) in queries.items():
                        resp = http.post("/v1/search?k=3", files={"file": (name, data, "image/jpeg")})
                        searches += 1
                        if resp.status_code != 200:
                            errors.append(f"search {resp.status_code}: {resp.text[:200]}")
                            continue
                        top = resp.json()["results"][0]
                        if top["id"] != image_id or top["score"] < 0.99:
                            errors.append(f"{name}: top hit {top['id']} {top['score']:.3f}, not {image_id}")
                    generations_seen.add(http.get("/ready").json()["generation"])

        thread = threading.Thread(target=searcher)
        thread.start()
        try:
            landed: list[str] = []
            moments: list[tuple[str, Callable[[], Callable[[], bool]], float]] = [
                ("at random", lambda: lambda: True, rng.uniform(0.2, 1.5)),
                ("build directory", lambda: appears(gen_dir, "gen-*.partial"), rng.uniform(0, 0.05)),
                ("generation renamed", lambda: new_name(gen_dir, "gen-*.ivfdata"), 0.0),
                ("manifest temp file", lambda: appears(data_dir, f"{MANIFEST_FILE}.tmp-*"), 0.0),
            ]
            for moment, trigger, delay in moments:
                # The manifest's temp file exists for a few milliseconds: aim again until a kill
                # lands while it does (at most three times).
                for _attempt in range(3 if moment == "manifest temp file" else 1):
                    before = Manifest.load(data_dir / MANIFEST_FILE)
                    assert before is not None and before.generation is not None
                    killed = kill_when(start(build), trigger(), delay=delay)
                    after = check_store(data_dir, expected)
                    assert after.generation is not None
                    number = after.generation.number
                    # Killed: published or not; finished: published. A new number may skip those
                    # that builds killed earlier reserved and left behind.
                    assert number >= before.generation.number
                    assert killed or number > before.generation.number
                    load_generation(data_dir, after.generation)  # the published one verifies
                    left = leftovers(data_dir)
                    unreferenced = sorted(
                        p.name for p in gen_dir.glob("gen-*.*") if p.is_file() and int(p.name[4:10]) > number
                    )
                    landed.append(
                        f"{moment} +{delay * 1000:.1f} ms: {'killed' if killed else 'finished'}, "
                        f"generation {number}, left {left + unreferenced}"
                    )
                    if any(name.startswith(f"{MANIFEST_FILE}.tmp-") for name in left):
                        break
                time.sleep(0.3)  # a few searches and refreshes on this state
            run(build)  # the re-run publishes and sweeps what the kills left
            final = check_store(data_dir, expected)
            deadline = time.monotonic() + 30
            while final.generation.number not in generations_seen:  # type: ignore[union-attr]
                assert time.monotonic() < deadline, f"the replica never switched to {final.generation}"
                time.sleep(0.1)
        finally:
            stop.set()
            thread.join(timeout=60)
    print("build-index kills:", *landed, sep="\n  ")
    assert any(f"'{MANIFEST_FILE}.tmp-" in line for line in landed), landed
    assert any("'gen-" in line and "ivfdata" in line for line in landed), landed  # renamed, unpublished
    print(f"replica: {searches} searches, generations {sorted(g for g in generations_seen if g)}")
    assert not errors, errors[:5]
    assert searches >= len(queries) * 3
    assert not leftovers(data_dir), leftovers(data_dir)
    assert final.generation is not None and final.generation.previous is not None
    kept = {final.generation.number, final.generation.previous.number}
    assert {p.name for p in gen_dir.iterdir()} == {
        name for n in kept for name in (header_name(n), header_name(n).replace(".faiss", ".ivfdata"))
    }
    assert len(generations_seen - {None}) >= 2, "the replica never switched generations"


# ====================================================================================== train-classifier


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory: pytest.TempPathFactory, photos: Photos) -> Path:
    """Two classes of six small real photos each (three variants of two photos per class)."""
    root = tmp_path_factory.mktemp("classes")
    for label, names in {"animal": ("chelsea", "astronaut"), "thing": ("coffee", "rocket")}.items():
        (root / label).mkdir()
        for name in names:
            for i in range(3):
                (root / label / f"{name}-{i}.jpg").write_bytes(
                    h.encode(h.variant(photos[name], i).resize((160, 120)))
                )
    return root


def gone_or_replaced(path: Path) -> Callable[[], bool]:
    """A trigger: ``path`` is missing or another file than now."""
    before = path.stat().st_ino

    def check() -> bool:
        try:
            return path.stat().st_ino != before
        except FileNotFoundError:
            return True

    return check


def loadable_head(head_dir: Path) -> float:
    """The head's ``created_at``, after reading it back checksum-verified (raises when it does not)."""
    from deepfeat.models.heads.storage import load_linear, read_manifest

    manifest = read_manifest(head_dir)
    load_linear(head_dir, manifest)
    return manifest.created_at


def test_train_classifier(tmp_path: Path, class_dir: Path) -> None:
    rng = random.Random(99)
    data_dir = tmp_path / "data"
    heads = data_dir / "classifiers"
    train = ["train-classifier", str(class_dir), "--name", "pets", "--data-dir", str(data_dir), "--no-progress",
             "--overwrite", *FAST_FLAGS]  # fmt: skip
    landed: list[str] = []
    head_before: float | None = None
    steps: list[tuple[str, Callable[[], Callable[[], bool]] | None, float]] = [
        ("temp directory", lambda: new_name(heads, ".pets.tmp-*"), rng.uniform(0, 0.003)),
        ("re-run", None, 0.0),
        ("head swapped", lambda: gone_or_replaced(heads / "pets"), 0.0),
        ("temp directory", lambda: new_name(heads, ".pets.tmp-*"), rng.uniform(0, 0.003)),
        ("re-run", None, 0.0),
    ]
    for moment, trigger, delay in steps:
        if trigger is None:
            run(train)
            assert not leftovers(data_dir), leftovers(data_dir)
            head_before = loadable_head(heads / "pets")
            assert [p.name for p in heads.iterdir()] == ["pets"]
            continue
        killed = kill_when(start(train), trigger(), delay=delay)
        left = leftovers(data_dir)
        if head_before is not None:  # a head was saved: a kill keeps it, or the new one, never neither
            assert (heads / "pets").is_dir(), f"the saved head is gone after a kill ({moment}); left: {left}"
        if (heads / "pets").exists():
            loadable_head(heads / "pets")
        landed.append(f"{moment} +{delay * 1000:.1f} ms: {'killed' if killed else 'finished'}, left {left}")
    print("train-classifier kills:", *landed, sep="\n  ")


def _fs_events_until_kill(kill_at: int, work: Callable[[], object]) -> bool:
    """Run ``work`` in a forked child that SIGKILLs itself just before its ``kill_at``-th filesystem
    change (a write open, mkdir, rename, unlink, rmtree or C call: Python's audit events); True when
    it was killed, False when ``work`` finished first."""
    import sys

    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT
    changes = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "ctypes.call_function"}
    pid = os.fork()
    if pid == 0:  # the child: no return from here
        seen = 0

        def hook(event: str, args: tuple[object, ...]) -> None:
            nonlocal seen
            if event in changes or (event == "open" and isinstance(args[2], int) and args[2] & writes):
                seen += 1
                if seen == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

        try:
            sys.addaudithook(hook)
            work()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status)


def test_a_classifier_save_killed_at_every_step_keeps_a_whole_head(tmp_path: Path) -> None:
    """Crash points, exhaustively: a save is killed before each of its filesystem changes in turn. A
    first save leaves no head or the whole new one; an overwrite leaves the old head or the new one,
    never neither; the next save removes whatever the killed one left."""
    from deepfeat.models.embedder import FINGERPRINT_VERSION
    from deepfeat.models.heads.linear import LinearHead
    from deepfeat.models.heads.storage import HeadManifest, linear_bytes, save_head

    def head_files(value: float) -> tuple[HeadManifest, dict[str, bytes]]:
        head = LinearHead(("a", "b"), np.full((2, 4), value, np.float32), np.zeros(2, np.float32))
        fingerprint = {"version": FINGERPRINT_VERSION, "dim": 4}
        manifest = HeadManifest(name="pets", method="linear", classes=("a", "b"), fingerprint=fingerprint,
                                created_at=value)  # fmt: skip
        return manifest, {"linear.npz": linear_bytes(head), "report.json": b"{}"}

    points = {"first save": 0, "overwrite": 0}
    for case in points:
        root = tmp_path / case.replace(" ", "-")
        step = 0
        while True:
            step += 1
            shutil.rmtree(root, ignore_errors=True)
            if case == "overwrite":
                save_head(root, *head_files(1.0))
            killed = _fs_events_until_kill(step, lambda: save_head(root, *head_files(2.0), overwrite=True))  # noqa: B023
            if (root / "pets").exists():
                assert loadable_head(root / "pets") in (1.0, 2.0)
            else:
                assert case == "first save", f"killed before change {step} of an overwrite: no head at all"
            save_head(root, *head_files(3.0), overwrite=True)  # the next save sweeps
            assert [p.name for p in root.iterdir()] == ["pets"] and loadable_head(root / "pets") == 3.0
            if not killed:
                break
            points[case] = step
    assert min(points.values()) >= 3, points  # mkdir, the files, the rename(s): at least three points


# ====================================================================================== export / import


def test_export_and_import(tmp_path: Path) -> None:
    from deepfeat.scripts.export_import import PAGE, read_export
    from tests.index._helpers import DIM, FINGERPRINT, new_images, unit_vectors

    rng = random.Random(3030)
    n = 3 * PAGE  # an import commits a page at a time: three commits to kill between
    source = tmp_path / "source"
    with ImageStore.open(source, fingerprint=FINGERPRINT, dim=DIM) as store:
        store.add(unit_vectors(n, seed=5), new_images(n))
    expected = {sha: image_id for image_id, sha, _ in _catalog_rows(source).values()}
    out = tmp_path / "out" / "export.jsonl"
    export = ["export", "--data-dir", str(source), "--out", str(out), "--format", "jsonl"]
    landed: list[str] = []

    def exported() -> dict[str, str]:
        _, pages = read_export(out)
        return {row.sha256: row.id for page in pages for row in page}

    out.parent.mkdir()
    for moment, trigger, delay in [
        ("temp file", lambda: new_name(out.parent, "export.jsonl.tmp-*"), rng.uniform(0, 0.05)),
        ("temp file", lambda: new_name(out.parent, "export.jsonl.tmp-*"), rng.uniform(0, 0.05)),
    ]:
        killed = kill_when(start(export), trigger(), delay=delay)
        left = sorted(p.name for p in out.parent.iterdir() if p.name != out.name)
        landed.append(
            f"export {moment} +{delay * 1000:.1f} ms: {'killed' if killed else 'finished'}, left {left}"
        )
        if out.exists():  # the file appears only when complete
            assert exported() == expected
        check_store(source, expected)  # an export never changes the store
    run(export)
    assert [p.name for p in out.parent.iterdir()] == [out.name], "the re-run left or kept a temp file"
    assert exported() == expected

    target = tmp_path / "target"
    load = ["import", str(out), "--data-dir", str(target)]
    for moment, trigger, delay in [
        ("after the first page", lambda: lambda: _catalog_count(target) >= PAGE, rng.uniform(0, 0.05)),
        ("snapshot temp file", lambda: appears(target, f"{SNAPSHOT_FILE}.tmp-*"), rng.uniform(0, 0.002)),
    ]:
        killed = kill_when(start(load), trigger(), delay=delay)
        count = _catalog_count(target)
        landed.append(
            f"import {moment} +{delay * 1000:.1f} ms: {'killed' if killed else 'finished'}, {count} rows, "
            f"left {leftovers(target)}"
        )
        assert count % PAGE == 0, "an import page was committed in part"
        if count:
            check_store(target, expected, at_most=True)
    done = run(load)
    assert "imported" in done.stdout, done.stdout
    check_store(target, expected)  # every image, under the id it was exported with
    assert not leftovers(target), leftovers(target)
    print("export/import kills:", *landed, sep="\n  ")


# ====================================================================================== the server: deletes


def test_server_killed_during_deletes_and_adds(
    tmp_path: Path,
    seed_store: Path,
    kill_upload_pool: list[bytes],  # noqa: F811  (the fixture imported above)
) -> None:
    """Two clients delete stored images while one adds new ones; the server is SIGKILLed at a seeded
    random moment, twice. After each restart every acknowledged delete is still deleted and every
    acknowledged add is there; the catalog holds exactly those plus, at most, the operations the kill
    cut short."""
    rng = random.Random(808)
    data_dir = tmp_path / "data"
    initial = copy_store(seed_store, data_dir)  # sha256 -> id
    to_delete = sorted(initial.values())
    rng.shuffle(to_delete)
    pool = list(kill_upload_pool)
    attempted_deletes: set[str] = set()
    deleted: set[str] = set()  # acknowledged deletes (200)
    attempted_adds: set[str] = set()  # sha256
    added: dict[str, str] = {}  # acknowledged adds: sha256 -> id
    statuses: list[str] = []
    lock = threading.Lock()
    landed: list[str] = []

    def verify(base: str) -> None:
        with httpx.Client(base_url=base, timeout=30) as http:
            for image_id in sorted(deleted):
                assert http.get(f"/v1/images/{image_id}").status_code == 404, f"deleted {image_id} is back"
            for sha, image_id in added.items():
                assert http.get(f"/v1/images/{image_id}").json()["sha256"] == sha, f"added {image_id} is lost"

    for round_ in range(2):
        with served(data_dir, DEEPFEAT_SNAPSHOT_EVERY="2") as (proc, base):
            verify(base)
            before = _catalog_count(data_dir)

            def deleter(ids: list[str]) -> None:
                with httpx.Client(base_url=base, timeout=30) as http:  # noqa: B023
                    for image_id in ids:
                        with lock:
                            attempted_deletes.add(image_id)
                        try:
                            resp = http.delete(f"/v1/images/{image_id}")
                        except httpx.TransportError:
                            return  # the server died under us: this delete's fate is unknown
                        with lock:
                            statuses.append(f"delete {resp.status_code}")
                            if resp.status_code == 200:
                                deleted.add(image_id)

            def adder(items: list[bytes]) -> None:
                with httpx.Client(base_url=base, timeout=30) as http:  # noqa: B023
                    for data in items:
                        sha = hashlib.sha256(data).hexdigest()
                        with lock:
                            attempted_adds.add(sha)
                        try:
                            resp = http.post("/v1/images", files={"file": ("a.jpg", data, "image/jpeg")})
                        except httpx.TransportError:
                            return
                        with lock:
                            statuses.append(f"add {resp.status_code}")
                            if resp.status_code in (200, 201):
                                added[sha] = resp.json()["id"]

            batch = [i for i in to_delete if i not in attempted_deletes][:400]
            adds = [d for d in pool if hashlib.sha256(d).hexdigest() not in attempted_adds]
            threads = [threading.Thread(target=deleter, args=(batch[i::2],)) for i in range(2)]
            threads.append(threading.Thread(target=adder, args=(adds,)))
            for t in threads:
                t.start()
            at = rng.uniform(0.5, 2.5)
            time.sleep(at)
            proc.send_signal(signal.SIGKILL)
            for t in threads:
                t.join(timeout=60)
            proc.wait(timeout=30)
            assert proc.returncode == -signal.SIGKILL
            landed.append(
                f"round {round_} killed at {at:.2f}s: {before} -> {_catalog_count(data_dir)} rows, "
                f"{len(deleted)} deletes and {len(added)} adds acknowledged so far"
            )

    with served(data_dir) as (_, base):
        verify(base)
    rows = {image_id: sha for image_id, sha, _ in _catalog_rows(data_dir).values()}
    must = (set(initial.values()) - attempted_deletes) | set(added.values())
    may = (set(initial.values()) - deleted) | set(added.values())
    assert must <= set(rows), "an image nobody deleted, or an acknowledged add, is gone"
    extra = set(rows) - may
    assert all(rows[i] in attempted_adds for i in extra), "the catalog holds an image nobody added"
    # Each kill cuts short at most one request of each of the three clients.
    assert len(set(rows) - must) <= 3 * 2, "more operations of unknown fate than the kills could cut short"
    check_store(data_dir, {sha: image_id for image_id, sha in rows.items()})
    assert set(statuses) <= {"delete 200", "add 200", "add 201"}, sorted(set(statuses))
    assert len(deleted) >= 20 and added, landed
    print("server kills:", *landed, sep="\n  ")


# ====================================================================================== index --engine ray


def test_index_ray_engine(tmp_path: Path, photo_dir: Path) -> None:
    """``deepfeat index --engine ray`` killed as a shard's temp file appears, then while it commits
    the shards into the store; the re-run reuses what survived, commits the rest and leaves nothing."""
    pytest.importorskip("ray")
    from deepfeat.scripts.index_ray import JOBS_DIR

    rng = random.Random(5150)
    data_dir = tmp_path / "data"
    jobs = data_dir / JOBS_DIR
    wanted = {hashlib.sha256(p.read_bytes()).hexdigest() for p in photo_dir.rglob("*.jpg")}
    index = ["index", str(photo_dir), "--engine", "ray", "--data-dir", str(data_dir), *FAST_FLAGS,
             "--batch-size", "1", "--shard-size", "1", "--no-progress"]  # fmt: skip
    landed: list[str] = []
    for moment, trigger, delay in [
        ("shard temp file", lambda: appears(jobs, "*/shard-*.tmp-*"), rng.uniform(0, 0.003)),
        ("commit", lambda: lambda: _catalog_count(data_dir) >= 2, rng.uniform(0, 0.01)),
    ]:
        killed = kill_when(start(index), trigger(), delay=delay, timeout=240)
        rows = _catalog_rows(data_dir)
        landed.append(
            f"{moment} +{delay * 1000:.1f} ms: {'killed' if killed else 'finished'}, {len(rows)} rows, "
            f"left {leftovers(data_dir)}"
        )
        if rows:
            check_store(data_dir, {sha: image_id for image_id, sha, _ in rows.values() if sha in wanted})
    done = run(index)
    assert "store now holds 6 images" in done.stdout, done.stdout
    rows = _catalog_rows(data_dir)
    assert {sha for _, sha, _ in rows.values()} == wanted and len(rows) == len(wanted)
    check_store(data_dir, {sha: image_id for image_id, sha, _ in rows.values()})
    assert not leftovers(data_dir) and not jobs.exists(), leftovers(data_dir)
    print("ray kills:", *landed, sep="\n  ")


def test_a_build_killed_after_its_publish_leaves_no_build_directory(tmp_path: Path) -> None:
    """Killed between writing the manifest and removing its ``gen-N.partial`` (aimed from inside: an
    audit hook SIGKILLs the build as it starts that removal): generation N is published and kept by
    the next build, whose publish still removes N's build directory."""
    import sys

    from tests.index._helpers import DIM, FINGERPRINT, new_images, unit_vectors

    data_dir = tmp_path / "data"
    with ImageStore.open(data_dir, fingerprint=FINGERPRINT, dim=DIM) as store:
        store.add(unit_vectors(1000, seed=2), new_images(1000))
    code = (
        "import os, signal, sys\n"
        "def hook(event, args):\n"
        "    if event == 'shutil.rmtree' and str(args[0]).endswith('.partial'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "sys.addaudithook(hook)\n"
        "from deepfeat.index.build import build_generation\n"
        f"build_generation({str(data_dir)!r}, factory='IVF4,Flat', max_memory_bytes=512 * 2**20)\n"
    )
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    manifest = Manifest.load(data_dir / MANIFEST_FILE)
    assert manifest is not None and manifest.generation is not None and manifest.generation.number == 1
    assert (data_dir / GENERATIONS_DIR / "gen-000001.partial").is_dir()  # what the kill left

    run(
        [
            "build-index",
            "--data-dir",
            str(data_dir),
            "--index",
            "IVF4,Flat",
            "--max-memory",
            "512MiB",
            "--no-progress",
        ]
    )
    published = Manifest.load(data_dir / MANIFEST_FILE).generation  # type: ignore[union-attr]
    assert published is not None and published.number == 2
    assert published.previous is not None and published.previous.number == 1
    assert not leftovers(data_dir), leftovers(data_dir)
