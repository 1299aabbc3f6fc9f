"""Whitening inside the store: learned from the catalog, applied to stored vectors and queries,
persisted with a checksum, picked up by other processes, removable — never re-embedding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepfeat.index.errors import CorruptStoreError, InvalidArgumentError
from deepfeat.index.store import ImageStore, NewImage
from deepfeat.index.whitening import Whitening

FP = {"model": "test", "layer": "x"}
DIM = 24


def _data(n: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.geomspace(8.0, 0.2, DIM)
    x = rng.standard_normal((n, DIM)) * scales + 2.0
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _images(n: int, offset: int = 0) -> list[NewImage]:
    return [
        NewImage(sha256=f"{i + offset:064x}", source=f"img{i + offset}", width=8, height=8, nbytes=1)
        for i in range(n)
    ]


def _open(path: Path, **kw) -> ImageStore:
    return ImageStore.open(path, fingerprint=FP, dim=DIM, **kw)


def test_fit_applies_to_stored_vectors_and_queries(tmp_path: Path) -> None:
    x = _data()
    with _open(tmp_path / "s") as store:
        store.add(x, _images(len(x)))
        w = store.fit_whitening(dim=12)
        assert store.index_dim == 12 and store.dim == DIM and store.count == len(x)
        hits = store.search(x[:5], 3)
        # Expected: brute force in the whitened space.
        wx = w.apply(x)
        expected = np.argsort(-(w.apply(x[:5]) @ wx.T), axis=1)[:, :3]
        assert [[h.record.source for h in row] for row in hits] == [
            [f"img{j}" for j in row] for row in expected
        ]
        assert hits[0][0].score == pytest.approx(1.0, abs=1e-5)
        # New adds are projected too.
        extra = _data(20, seed=9)
        store.add(extra, _images(20, offset=1000))
        assert store.search(extra[:1], 1)[0][0].record.source == "img1000"
        assert store.stats()["whitening"]["d_out"] == 12


def test_whitening_survives_reopen_and_reaches_other_instances(tmp_path: Path) -> None:
    x = _data()
    with _open(tmp_path / "s") as writer, _open(tmp_path / "s") as reader:
        writer.add(x, _images(len(x)))
        reader.refresh()
        before = [h.id for h in reader.search(x[:1], 5)[0]]
        writer.fit_whitening(dim=8)
        assert reader.index_dim == DIM
        reader.refresh()  # notices the new whitening in the manifest and re-projects
        assert reader.index_dim == 8
        assert [h.id for h in reader.search(x[:1], 5)[0]] == [h.id for h in writer.search(x[:1], 5)[0]]
        assert before[0] == reader.search(x[:1], 5)[0][0].id
    with _open(tmp_path / "s") as again:
        assert again.index_dim == 8 and again.count == len(x)
    assert len(list((tmp_path / "s").glob("whitening-*.faiss"))) == 1


def test_remove_whitening_restores_raw_search(tmp_path: Path) -> None:
    x = _data()
    with _open(tmp_path / "s") as store:
        store.add(x, _images(len(x)))
        raw = [(h.id, round(h.score, 5)) for h in store.search(x[:3], 4)[0]]
        store.fit_whitening(dim=10)
        store.set_whitening(None)
        assert store.index_dim == DIM
        assert [(h.id, round(h.score, 5)) for h in store.search(x[:3], 4)[0]] == raw
    assert not list((tmp_path / "s").glob("whitening-*.faiss"))


def test_bad_whitening_is_refused_or_detected(tmp_path: Path) -> None:
    x = _data()
    with _open(tmp_path / "s") as store:
        store.add(x[:5], _images(5))
        with pytest.raises(InvalidArgumentError, match="between 1 and 4"):
            store.fit_whitening(dim=10)
        with pytest.raises(InvalidArgumentError, match="expects 6-d"):
            store.set_whitening(Whitening.fit(np.random.default_rng(0).standard_normal((50, 6)), dim=3))
        store.add(x[5:], _images(len(x) - 5, offset=5))
        store.fit_whitening(dim=6)
    (file,) = (tmp_path / "s").glob("whitening-*.faiss")
    file.write_bytes(file.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(CorruptStoreError, match="checksum"):
        _open(tmp_path / "s")


def test_near_duplicate_groups_use_the_index(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    base = _data(50, seed=3)
    # three near-copies of image 0 (a chain), two of image 7; the rest distinct
    copies = [
        base[0] + 0.01 * rng.standard_normal(DIM),
        base[0] + 0.02 * rng.standard_normal(DIM),
        base[7] + 0.01 * rng.standard_normal(DIM),
    ]
    x = np.vstack([base, np.array(copies)]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with _open(tmp_path / "s") as store:
        store.add(x, _images(len(x)))
        groups = store.near_duplicates(0.99)
        names = [sorted(r.source for r in g) for g in groups]
        assert names == [["img0", "img50", "img51"], ["img52", "img7"]]
        assert store.near_duplicates(1.0) == []
        with pytest.raises(InvalidArgumentError):
            store.near_duplicates(0.0)


def test_auto_index_follows_the_collection_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import deepfeat.index.choose as choose

    x = _data(300)
    with _open(tmp_path / "s", index_factory="auto") as store:
        assert store.index_factory == "Flat" and store.manifest.extra["index_policy"] == "auto"
        store.add(x, _images(len(x)))
        expected = [h.id for h in store.search(x[:3], 5)[0]]
    # Pretend the collection crossed the Flat threshold: the next open moves it to HNSW.
    monkeypatch.setattr(choose, "FLAT_MAX_SCAN", 100 * DIM)
    with _open(tmp_path / "s") as store:
        assert store.index_factory == "HNSW32" and store.count == len(x)
        assert [h.id for h in store.search(x[:3], 5)[0]][:1] == expected[:1]
    monkeypatch.undo()
    with _open(tmp_path / "s") as store:
        assert store.index_factory == "Flat"  # and back, still from the catalog, nothing lost
        assert [h.id for h in store.search(x[:3], 5)[0]] == expected
