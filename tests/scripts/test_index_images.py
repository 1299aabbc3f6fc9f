"""The batch indexer end to end: real photos, bad files skipped and reported, resumable, searchable."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepfeat.index.errors import IncompatibleIndexError
from deepfeat.index.store import ImageStore
from deepfeat.models.embedder import Embedder
from deepfeat.models.errors import ImageError
from deepfeat.models.images import ImageLimits, load_image
from deepfeat.scripts.index_images import IndexSummary, index_paths, iter_image_files
from tests.conftest import jpeg_bytes


def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (what a decompression bomb looks like)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def messy_dir(tmp_path: Path, photo_dir: Path, photos: dict[str, Image.Image]) -> Path:
    """The real photos plus a truncated JPEG, a text file named .jpg, a bomb, a duplicate and a README."""
    root = tmp_path / "messy"
    root.mkdir()
    for path in photo_dir.rglob("*.jpg"):
        target = root / path.relative_to(photo_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    full = jpeg_bytes(photos["coffee"])
    (root / "truncated.jpg").write_bytes(full[: len(full) // 3])
    (root / "notes.jpg").write_text("this is not an image")
    (root / "bomb.png").write_bytes(png_bomb())
    (root / "copy-of-chelsea.jpg").write_bytes((photo_dir / "chelsea.jpg").read_bytes())
    (root / "README.txt").write_text("not picked up by the folder walk")
    (root / ".hidden.jpg").write_bytes(full)
    return root


def _open(tmp_path: Path, embedder: Embedder) -> ImageStore:
    return ImageStore.open(tmp_path / "data", fingerprint=embedder.fingerprint, dim=embedder.dim)


def _index(
    folder: Path,
    store: ImageStore,
    embedder: Embedder,
    *,
    workers: int,
    report: Path | None,
    gpu_decode: bool | None = None,
) -> IndexSummary:
    """``folder`` into ``store`` in batches of 4, with the service's default limits, no progress bar."""
    return index_paths(
        [folder],
        embedder=embedder,
        store=store,
        limits=ImageLimits(),
        batch_size=4,
        workers=workers,
        report_path=report,
        progress=False,
        gpu_decode=gpu_decode,
    )


def test_walk_is_recursive_sorted_and_filtered(messy_dir: Path) -> None:
    files = list(iter_image_files([messy_dir], extensions=frozenset({".jpg", ".png"})))
    names = [f.name for f in files]
    assert "README.txt" not in names and ".hidden.jpg" not in names
    assert "bomb.png" in names and any(f.parent.name == "sub" for f in files)
    again = list(iter_image_files([messy_dir], extensions=frozenset({".jpg", ".png"})))
    assert files == again and len(set(files)) == len(files)  # deterministic, no repeats
    top_level = [f.name for f in files if f.parent == messy_dir]
    assert top_level == sorted(top_level)
    # a file named explicitly is always tried
    assert list(iter_image_files([messy_dir / "README.txt"], extensions=frozenset({".jpg"}))) == [
        messy_dir / "README.txt"
    ]


def test_index_skips_bad_files_reports_them_and_resumes(
    tmp_path: Path, messy_dir: Path, lite0: Embedder, photos: dict[str, Image.Image]
) -> None:
    report = tmp_path / "report.jsonl"
    with _open(tmp_path, lite0) as store:
        summary = _index(messy_dir, store, lite0, workers=2, report=report)
        assert summary.files == len(photos) + 4
        assert summary.indexed == len(photos)
        assert summary.already_present == 1  # the copy of chelsea maps to the first id
        assert summary.failed == 3
        failures = {Path(f["path"]).name: f["code"] for f in map(json.loads, report.read_text().splitlines())}
        assert failures == {
            "truncated.jpg": "corrupt_image",
            "notes.jpg": "unsupported_format",
            "bomb.png": "image_too_large",
        }
        assert store.count == len(photos)

        # Each real photo is its own top-1 for a resized, re-encoded copy.
        for name, img in photos.items():
            query = load_image(jpeg_bytes(img, quality=70, scale=0.6), draft_size=lite0.decode_size)
            hit = store.search(lite0.embed([query.image]), 1)[0][0]
            assert Path(hit.record.source or "").stem == name, (name, hit)
        before = [
            [(h.id, h.score) for h in row] for row in store.search(lite0.embed(list(photos.values())), 3)
        ]

    # Re-run: nothing is decoded or embedded again.
    with _open(tmp_path, lite0) as store:
        again = _index(messy_dir, store, lite0, workers=0, report=None)
        assert (again.indexed, again.embedded, again.failed) == (0, 0, 3)
        assert again.already_present == len(photos) + 1
        after = [
            [(h.id, h.score) for h in row] for row in store.search(lite0.embed(list(photos.values())), 3)
        ]
    assert [[i for i, _ in row] for row in after] == [[i for i, _ in row] for row in before]
    assert np.allclose(
        [[s for _, s in row] for row in after], [[s for _, s in row] for row in before], atol=1e-6
    )


def test_a_store_refuses_another_layer(tmp_path: Path, photo_dir: Path, lite0: Embedder) -> None:
    with _open(tmp_path, lite0) as store:
        index_paths([photo_dir], embedder=lite0, store=store, limits=ImageLimits(), workers=0, progress=False)
    other = lite0.variant(layer="head", pooling="gem")
    with pytest.raises(IncompatibleIndexError, match="layer"):
        ImageStore.open(tmp_path / "data", fingerprint=other.fingerprint, dim=other.dim)


def _index_into(
    data_dir: Path, folder: Path, embedder: Embedder, *, gpu_decode: bool | None
) -> tuple[ImageStore, dict[str, str]]:
    store = ImageStore.open(data_dir, fingerprint=embedder.fingerprint, dim=embedder.dim)
    report = data_dir / "report.jsonl"
    _index(folder, store, embedder, workers=1, report=report, gpu_decode=gpu_decode)
    failures = {Path(f["path"]).name: f["code"] for f in map(json.loads, report.read_text().splitlines())}
    return store, failures


def test_device_decode_path_gives_the_same_index_as_the_worker_path(
    tmp_path: Path, messy_dir: Path, lite0: Embedder, photos: dict[str, Image.Image]
) -> None:
    """``gpu_decode``: workers only probe JPEGs and the model's device decodes them (nvJPEG on CUDA;
    torchvision's libjpeg here, so this path runs without a GPU). Same files, same failures, same
    vectors and sizes as the worker decode, and a file only a decoder finds broken still fails as corrupt."""
    from tests.models.image_helpers import without_jpeg_segment

    (messy_dir / "no-tables.jpg").write_bytes(
        without_jpeg_segment(next(messy_dir.rglob("coffee.jpg")).read_bytes(), 0xDB)
    )
    workers_store, workers_failures = _index_into(tmp_path / "a", messy_dir, lite0, gpu_decode=False)
    device_store, device_failures = _index_into(tmp_path / "b", messy_dir, lite0, gpu_decode=True)
    with workers_store, device_store:
        assert device_failures == workers_failures
        assert device_failures["no-tables.jpg"] == device_failures["truncated.jpg"] == "corrupt_image"
        shas = sorted(workers_store.known_sha256())
        assert sorted(device_store.known_sha256()) == shas and len(shas) == len(photos)
        workers_vectors = workers_store.vectors_by_sha256(shas)
        device_vectors = device_store.vectors_by_sha256(shas)
        # The workers decode with libjpeg's DCT scaling (Embedder.decode_size), the device decodes in full
        # and resizes with antialiasing: the two ~512 px photos halved in the DCT land at 0.977, the
        # photos decoded at full size by both agree exactly.
        cosines = sorted(float(device_vectors[sha] @ workers_vectors[sha]) for sha in shas)
        assert cosines[0] > 0.97 and cosines[2] > 0.9999, cosines
        workers_ids = workers_store.find_existing(shas)
        for sha, image_id in device_store.find_existing(shas).items():
            record, reference = device_store.get(image_id), workers_store.get(workers_ids[sha])
            assert (record.width, record.height) == (reference.width, reference.height)
            with Image.open(io.BytesIO(device_store.thumbnail(image_id))) as thumb:
                assert thumb.format == "JPEG" and max(thumb.size) == 256


def test_a_file_the_device_decoder_refuses_fails_with_the_cpu_loaders_code(lite0: Embedder) -> None:
    from deepfeat.scripts.index_images import _decode_on_gpu, _Item
    from tests.models.image_helpers import NOT_A_SCAN

    good = jpeg_bytes(Image.new("RGB", (64, 48), (200, 30, 30)))
    items = [_Item("bad.jpg", "ok", data=NOT_A_SCAN), _Item("good.jpg", "ok", data=good)]
    _decode_on_gpu(items, embedder=lite0, limits=ImageLimits())
    with pytest.raises(ImageError) as cpu:
        load_image(NOT_A_SCAN)
    assert (items[0].status, items[0].code) == ("failed", cpu.value.code) and items[0].tensor is None
    assert items[1].status == "ok" and items[1].tensor is not None and items[1].thumbnail
    assert items[1].tensor.shape == (3, 224, 224) and items[0].data is None is items[1].data


@pytest.mark.gpu
def test_cuda_indexing_with_nvjpeg_matches_the_cpu_index(
    tmp_path: Path, messy_dir: Path, lite0: Embedder, photos: dict[str, Image.Image]
) -> None:
    from tests.conftest import FAST_EMBEDDER

    gpu = Embedder("efficientnet_lite0", device="cuda", precision="auto", **FAST_EMBEDDER)
    cpu_store, cpu_failures = _index_into(tmp_path / "cpu", messy_dir, lite0, gpu_decode=False)
    gpu_store, gpu_failures = _index_into(tmp_path / "gpu", messy_dir, gpu, gpu_decode=None)
    with cpu_store, gpu_store:
        assert gpu_failures == cpu_failures
        shas = sorted(cpu_store.known_sha256())
        assert sorted(gpu_store.known_sha256()) == shas and len(shas) == len(photos)
        cpu_vectors, gpu_vectors = cpu_store.vectors_by_sha256(shas), gpu_store.vectors_by_sha256(shas)
        assert min(float(cpu_vectors[s] @ gpu_vectors[s]) for s in shas) >= 0.99
