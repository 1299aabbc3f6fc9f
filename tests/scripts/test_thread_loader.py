"""The in-process decode pool: batches in file order, each file prepared once, early stops clean."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import pytest

from deepfeat.models.embedder import Embedder
from deepfeat.models.images import ImageLimits
from deepfeat.scripts.index_images import ThreadLoader, prepare_file


def _prepare(lite0: Embedder):  # type: ignore[no-untyped-def]
    return functools.partial(
        prepare_file,
        transform=lite0.transform,
        limits=ImageLimits(),
        decode_size=lite0.decode_size,
        known_sha256=frozenset(),
    )


@pytest.mark.parametrize(("ahead", "idle"), [(0, False), (1, False), (1, True)])
def test_batches_keep_file_order_and_decode_each_file_once(
    photo_dir: Path, lite0: Embedder, tmp_path: Path, ahead: int, idle: bool
) -> None:
    files = sorted(photo_dir.rglob("*.jpg"))
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    files.insert(1, bad)
    loader = ThreadLoader(files, _prepare(lite0), batch_size=2, threads=3, ahead=ahead, idle=idle)
    batches = list(loader)
    assert len(batches) == len(loader) == -(-len(files) // 2)
    items = [item for batch in batches for item in batch]
    assert [item.path for item in items] == [str(f) for f in files]
    assert items[1].status == "failed" and items[1].code
    assert all(item.status == "ok" and item.tensor is not None for i, item in enumerate(items) if i != 1)


def test_serial_mode_prepares_nothing_while_the_caller_works(photo_dir: Path, lite0: Embedder) -> None:
    """ahead=0: the next batch starts only when the caller asks for it, so the model has the cores."""
    files = sorted(photo_dir.rglob("*.jpg"))[:4]
    started: list[Path] = []
    lock = threading.Lock()
    prepare = _prepare(lite0)

    def counting(path: Path):  # type: ignore[no-untyped-def]
        with lock:
            started.append(path)
        return prepare(path)

    loader = iter(ThreadLoader(files, counting, batch_size=2, threads=2, ahead=0))
    next(loader)
    assert started == files[:2]
    next(loader)
    assert started == files[:4]


def test_an_early_stop_cancels_the_queued_files(photo_dir: Path, lite0: Embedder) -> None:
    files = sorted(photo_dir.rglob("*.jpg")) * 10
    seen: list[Path] = []
    prepare = _prepare(lite0)

    def counting(path: Path):  # type: ignore[no-untyped-def]
        seen.append(path)
        return prepare(path)

    loader = iter(ThreadLoader(files, counting, batch_size=2, threads=1, ahead=3))
    next(loader)
    loader.close()  # what a KeyboardInterrupt in the caller's loop does to the generator
    # close() returned after the running decodes finished: the batch handed out and those
    # prepared ahead were read, never the rest of the files.
    assert len(seen) <= 2 * (1 + 3) < len(files)
