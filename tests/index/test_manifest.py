"""Manifest: round trip, human-readable atomic file, corrupt/newer files, fingerprint comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepfeat.index.errors import CorruptStoreError, IncompatibleIndexError, InvalidArgumentError
from deepfeat.index.manifest import (
    FORMAT_VERSION,
    Manifest,
    SnapshotInfo,
    check_compatible,
    normalize_fingerprint,
)


def make_manifest() -> Manifest:
    return Manifest(
        fingerprint={"model": "resnet50", "pooling": ["gem", 3.0]},
        dim=2048,
        index_factory="HNSW32",
        created_at=1.0,
        updated_at=2.0,
        count=7,
        snapshot=SnapshotInfo(
            file="vectors.faiss", sha256="a" * 64, size=10, max_seq=9, deletions_rowid=2, count=7
        ),
    )


def test_round_trip_and_file_format(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    manifest = make_manifest()
    manifest.save(path)
    assert Manifest.load(path) == manifest
    text = path.read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    data = json.loads(text)
    assert data["format_version"] == FORMAT_VERSION and data["metric"] == "ip"
    assert data["snapshot"]["max_seq"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_unknown_fields_survive(tmp_path: Path) -> None:
    data = make_manifest().to_dict() | {"note": "added by an operator"}
    assert Manifest.from_dict(data).to_dict()["note"] == "added by an operator"


def test_missing_and_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    assert Manifest.load(path) is None
    path.write_text("{not json")
    with pytest.raises(CorruptStoreError):
        Manifest.load(path)
    path.write_text(json.dumps({"format_version": 1, "dim": "x", "fingerprint": {}}))
    with pytest.raises(CorruptStoreError, match="dim"):
        Manifest.load(path)
    path.write_text(json.dumps(make_manifest().to_dict() | {"format_version": FORMAT_VERSION + 1}))
    with pytest.raises(IncompatibleIndexError, match="newer"):
        Manifest.load(path)


def test_check_compatible_names_keys() -> None:
    stored = {"model": "resnet50", "layer": "layer4", "dim": 2048}
    check_compatible(stored, dict(stored))
    check_compatible({"pool": [1, 2]}, {"pool": (1, 2)})  # compared as JSON
    with pytest.raises(IncompatibleIndexError) as info:
        check_compatible(stored, {"model": "vgg16", "layer": "layer4", "dim": 2048, "whiten": True})
    message = str(info.value)
    assert 'model: stored="resnet50" given="vgg16"' in message
    assert "whiten: stored=<not recorded> given=true" in message
    assert "layer" not in message
    assert set(info.value.differences) == {"model", "whiten"}
    assert info.value.code == "incompatible_index"


def test_fingerprint_must_be_json() -> None:
    with pytest.raises(InvalidArgumentError):
        normalize_fingerprint({"x": object()})
    with pytest.raises(InvalidArgumentError):
        normalize_fingerprint(["not", "a", "dict"])
