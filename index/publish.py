"""Self-contained published generations: what a replica on another host needs, and nothing else.

A replica that reads the writer's data dir must share its host (SQLite's WAL needs shared memory, so
not over NFS either). To serve from other machines, the writer *publishes* a copy of everything a
search needs to a location (a local folder, a shared mount, or an object store URL through
``pyarrow.fs``), and replicas open that copy instead of the live files::

    LOCATION/
      LATEST                  {"number": 12, "sha256": <sha256 of pub-000012/files.json>}: the commit point
      pub-000012/             a complete read-only store, opened by ImageStore(read_only=True) as is:
        manifest.json           the writer's manifest at publish time (no previous generation, no lock)
        catalog.sqlite3         an online-backup copy of the catalog (rollback journal, never WAL): every
                                record, thumbnail and raw vector as of the publish
        generations/gen-000007.faiss, .ivfdata   the IVF generation, when one is published (memory-mapped)
        vectors.faiss           the writer's own snapshot, when there is no generation (loaded in memory)
        whitening-<sha>.faiss   the whitening the manifest names, if any
        files.json              size and sha256 of every file above
      pub-000011/             the previous one, deleted by the next publish

Because a published generation *is* a read-only store layout, replicas reuse the store unchanged:
:class:`index.store.ImageStore` opens it read-only (the IVF generation memory-mapped and searched with
the rows the catalog copy holds beyond it as the delta, :mod:`index.replica`). Nothing in it is ever
written again, so readers need no lock and no write access, and the catalog copy is a plain SQLite file
in rollback-journal mode that any host can read, over NFS too.

**Publish protocol** (:func:`publish`): the writer stages the copy beside its data dir (hard links for
the immutable index files, SQLite's online backup for the catalog, which gives one consistent
transaction while the writer keeps writing), checksums it, uploads it as ``pub-N.partial/`` (a local
location: the staging directory is renamed there when both are on one filesystem), renames it to
``pub-N`` and only then replaces ``LATEST`` (write to a temporary name, then rename). ``LATEST`` is the
commit point: a crash before it leaves the previous publication current and a stray ``pub-N.partial``
or unreferenced ``pub-N``, which the next publish deletes. Retention keeps the current and the previous
publication, like :mod:`index.generations`.

**Fetching** (:func:`fetch`): a replica reads ``LATEST``; a local location is used in place (nothing
copied, the IVF lists memory-mapped from it); a remote one is downloaded into a cache directory. Either
way ``files.json`` must hash to what ``LATEST`` says and every file it lists must have its size and
sha256 before anything opens it: one flipped byte refuses the whole publication
(:class:`index.errors.CorruptStoreError`), and the replica keeps the one it serves.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from deepfeat.index._fs import FileLock, atomic_write_bytes, fsync_dir, fsync_file, sha256_file
from deepfeat.index.catalog import Catalog
from deepfeat.index.errors import CorruptStoreError, InvalidArgumentError, StoreError
from deepfeat.index.files import CATALOG_FILE, LOCK_FILE, MANIFEST_FILE, SNAPSHOT_FILE
from deepfeat.index.generations import GENERATIONS_DIR
from deepfeat.index.manifest import Manifest

__all__ = [
    "FILES_FILE",
    "LATEST_FILE",
    "Location",
    "Publication",
    "fetch",
    "latest",
    "publish",
    "publication_name",
    "verify",
]

logger = logging.getLogger(__name__)

LATEST_FILE = "LATEST"
FILES_FILE = "files.json"
FORMAT = 1
KEEP = 2
"""Publications kept at the location: the current one and the previous one (a replica that read
``LATEST`` just before a publish can still fetch what it names)."""
_NAME_RE = re.compile(r"pub-(\d{6,})(\.partial)?")
STAGING_PREFIX = "publish.tmp-"
"""The writer's staging directories inside its data dir; a crashed publish leaves one, removed by the
next publish of that data dir."""


def publication_name(number: int) -> str:
    """``pub-000012``: the directory of publication ``number``."""
    return f"pub-{number:06d}"


@dataclass(frozen=True)
class Publication:
    """A verified publication on this host's disk.

    Attributes:
        number: Its number at the location.
        path: A local directory holding the read-only store layout (in place for a local location,
            a download for a remote one).
        files: ``files.json`` as published.
    """

    number: int
    path: Path
    files: dict[str, Any]


# ============================================================================ locations


class Location:
    """Where publications live: a local directory (``/srv/gens``, ``file:///srv/gens``) or any URL
    ``pyarrow.fs.FileSystem.from_uri`` understands (``s3://bucket/gens``, ``gs://...``, ``hdfs://...``).

    A local location is read and written with plain file calls (renames are atomic, files fsynced);
    pyarrow is only imported for other schemes.
    """

    def __init__(self, where: str | Path) -> None:
        text = str(where)
        if not text:
            raise InvalidArgumentError("the generations location is empty: give a directory or a URL")
        self.url = text
        self._fs: Any = None
        if "://" not in text:
            self.local: Path | None = Path(text).expanduser().absolute()
            self.root = str(self.local)
        elif text.startswith("file://"):
            self.local = Path(text[len("file://") :]).absolute()
            self.root = str(self.local)
        else:
            self.local = None
            try:
                import pyarrow.fs as pafs

                self._fs, self.root = pafs.FileSystem.from_uri(text)
            except (ImportError, ValueError, OSError) as exc:
                raise InvalidArgumentError(
                    f"cannot open generations location {text!r}: {exc} "
                    "(a local path, file://, or a scheme pyarrow.fs supports: s3://, gs://, hdfs://)"
                ) from exc
            self.root = self.root.rstrip("/")

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def _join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def read_bytes(self, name: str) -> bytes | None:
        """A small file at the location (``LATEST``, ``files.json``), or None when absent."""
        if self.local is not None:
            try:
                return (self.local / name).read_bytes()
            except FileNotFoundError:
                return None
        import pyarrow.fs as pafs

        path = self._join(name)
        if self._fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self._fs.open_input_stream(path) as fh:
            return bytes(fh.read())

    def names(self) -> list[str]:
        """Entries at the top of the location (none when it does not exist yet)."""
        if self.local is not None:
            return sorted(p.name for p in self.local.iterdir()) if self.local.is_dir() else []
        import pyarrow.fs as pafs

        infos = self._fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(PurePosixPath(info.path).name for info in infos)

    def put_tree(self, source: Path, name: str) -> None:
        """Upload the directory ``source`` as ``name`` (replacing a leftover of that name)."""
        self.remove(name)
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
            target = self.local / name
            try:
                os.replace(source, target)  # same filesystem: the staged copy moves, nothing is copied
            except OSError:
                shutil.copytree(source, target)
                for path in target.rglob("*"):
                    if path.is_file():
                        fsync_file(path)
            for directory in (target, *(p for p in target.rglob("*") if p.is_dir())):
                fsync_dir(directory)
            fsync_dir(self.local)
            return
        import pyarrow.fs as pafs

        self._fs.create_dir(self._join(name), recursive=True)
        pafs.copy_files(
            str(source),
            self._join(name),
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self._fs,
        )

    def rename(self, old: str, new: str) -> None:
        """Rename an entry (a directory rename on a local location; a copy on most object stores)."""
        if self.local is not None:
            os.replace(self.local / old, self.local / new)
            fsync_dir(self.local)
        else:
            self._fs.move(self._join(old), self._join(new))

    def write_atomic(self, name: str, data: bytes) -> None:
        """Replace a small file so readers see the old or the new content, never a torn one."""
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.local / name, data)
            return
        temp = f"{name}.tmp-{uuid.uuid4().hex[:8]}"
        with self._fs.open_output_stream(self._join(temp)) as fh:
            fh.write(data)
        self._fs.move(self._join(temp), self._join(name))

    def remove(self, name: str) -> None:
        """Delete an entry (file or directory tree) if present."""
        if self.local is not None:
            path = self.local / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            return
        import pyarrow.fs as pafs

        info = self._fs.get_file_info(self._join(name))
        if info.type == pafs.FileType.Directory:
            self._fs.delete_dir(self._join(name))
        elif info.type == pafs.FileType.File:
            self._fs.delete_file(self._join(name))

    def download(self, name: str, target: Path) -> None:
        """Copy the directory ``name`` to the local directory ``target``."""
        if self.local is not None:
            shutil.copytree(self.local / name, target)
            return
        import pyarrow.fs as pafs

        target.mkdir(parents=True)
        pafs.copy_files(
            self._join(name),
            str(target),
            source_filesystem=self._fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )


def _as_location(where: str | Path | Location) -> Location:
    return where if isinstance(where, Location) else Location(where)


# ============================================================================ publishing


@contextmanager
def _staging(data_dir: Path) -> Iterator[Path]:
    """A fresh staging directory inside ``data_dir`` (hard links need the same filesystem), removed on
    exit; leftovers of a crashed publish are removed first (one writer publishes a data dir)."""
    for old in data_dir.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(old, ignore_errors=True)
    path = data_dir / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # the source is immutable (or replaced by rename, never rewritten)
    except OSError:
        shutil.copy2(source, target)


def _backup_catalog(source: Path, target: Path) -> None:
    """A consistent copy of a live WAL catalog, as a rollback-journal database.

    ``sqlite3.Connection.backup`` copies every page within one read transaction, so the copy is the
    catalog at one commit however the writer goes on; readers never block the writer in WAL mode. The
    copy is switched to ``journal_mode=DELETE``: a WAL database cannot be opened read-only without its
    ``-shm`` file (which a reader may not be able to create), and WAL does not work over NFS.
    """
    src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")
        dst.commit()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot copy the catalog {source} for publishing: {exc}") from exc
    finally:
        dst.close()
        src.close()
    fsync_file(target)


def _stage(data_dir: Path, staging: Path, extra_dirs: Sequence[str]) -> Manifest:
    """Fill ``staging`` with the read-only store layout; returns the manifest written there.

    The manifest and the index files it names are taken together under the store's shared lock, which
    every snapshot and generation publish takes exclusively, so they match; the catalog is copied
    after, so it holds at least every row the index holds (the later rows become the replica's delta).
    """
    lock = FileLock(data_dir / LOCK_FILE)
    try:
        with lock.hold(shared=True):
            manifest = Manifest.load(data_dir / MANIFEST_FILE)
            if manifest is None:
                raise StoreError(f"no store in {data_dir}: nothing to publish")
            generation = manifest.generation
            snapshot = manifest.snapshot
            if generation is not None:
                gen_dir = data_dir / GENERATIONS_DIR
                for name in (generation.file, generation.data_file):
                    _link_or_copy(gen_dir / name, staging / GENERATIONS_DIR / name)
                snapshot = None  # the replica serves the generation; the snapshot would only be read
            elif snapshot is not None and (data_dir / SNAPSHOT_FILE).exists():
                _link_or_copy(data_dir / SNAPSHOT_FILE, staging / SNAPSHOT_FILE)
            else:
                snapshot = None
            whitening = manifest.extra.get("whitening")
            if whitening:
                _link_or_copy(data_dir / str(whitening["file"]), staging / str(whitening["file"]))
    finally:
        lock.close()
    _backup_catalog(data_dir / CATALOG_FILE, staging / CATALOG_FILE)
    for name in extra_dirs:
        if (data_dir / name).is_dir():
            shutil.copytree(data_dir / name, staging / name)
    copy = Catalog(staging / CATALOG_FILE, dim=manifest.dim, read_only=True)
    try:
        count = copy.count()  # the manifest's count is as of the writer's last snapshot
    finally:
        copy.close()
    published = replace(
        manifest,
        count=count,
        snapshot=snapshot,
        generation=replace(generation, previous=None) if generation is not None else None,
    )
    published.save(staging / MANIFEST_FILE)
    (staging / LOCK_FILE).touch()  # readers flock it shared; without it they warn on every open
    return published


def _checksums(root: Path) -> dict[str, dict[str, Any]]:
    return {
        path.relative_to(root).as_posix(): {"size": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _numbers(names: list[str]) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for name in names:
        if m := _NAME_RE.fullmatch(name):
            found.setdefault(int(m.group(1)), []).append(name)
    return found


def publish(
    data_dir: str | Path,
    location: str | Path | Location,
    *,
    keep: int = KEEP,
    extra_dirs: Sequence[str] = (),
) -> Publication:
    """Publish the store in ``data_dir`` as a self-contained generation at ``location``.

    Safe beside a live writer in another thread or process (it only reads the store, under the shared
    lock for the manifest and index files). Publish the IVF generation first
    (:func:`index.build.build_generation`) for replicas to memory-map it; without one, replicas load the
    published snapshot or rebuild an exact index from the catalog copy in memory.

    Args:
        data_dir: The writer's data directory.
        location: Directory, ``file://`` URL or a ``pyarrow.fs`` URL.
        keep: Publications kept at the location, the new one included (at least 2).
        extra_dirs: Directories of ``data_dir`` copied along (the service's trained classifier heads),
            so replicas serve them too.

    Returns:
        The publication (``path`` is its directory for a local location, else the staging directory,
        already removed).

    Raises:
        StoreError: No store in ``data_dir``, or the catalog cannot be copied.
        InvalidArgumentError: An unusable location or ``keep``.
    """
    if keep < 2:
        raise InvalidArgumentError(f"keep must be at least 2 (the current and the previous), got {keep}")
    data_dir = Path(data_dir)
    loc = _as_location(location)
    started = time.monotonic()
    with _staging(data_dir) as staging:
        manifest = _stage(data_dir, staging, extra_dirs)
        files: dict[str, Any] = {
            "format": FORMAT,
            "published_at": time.time(),
            "generation": manifest.generation.number if manifest.generation is not None else None,
            "count": manifest.count,
            "files": _checksums(staging),
        }
        present = _numbers(loc.names())
        number = max(present, default=0) + 1
        files["number"] = number
        blob = (json.dumps(files, indent=2, sort_keys=True) + "\n").encode("utf-8")
        (staging / FILES_FILE).write_bytes(blob)
        fsync_file(staging / FILES_FILE)
        name = publication_name(number)
        loc.put_tree(staging, f"{name}.partial")
        loc.rename(f"{name}.partial", name)
    pointer = {"number": number, "sha256": _sha256_bytes(blob)}
    loc.write_atomic(LATEST_FILE, (json.dumps(pointer, sort_keys=True) + "\n").encode("utf-8"))
    kept = set(
        sorted(n for n, names in present.items() if n < number and not _partial_only(names))[-(keep - 1) :]
    )
    for old, names in present.items():
        for entry in names:
            if old not in kept or entry.endswith(".partial"):
                loc.remove(entry)
    logger.info(
        "published %s to %s in %.2f s (%d files, %d images%s)",
        name,
        loc.url,
        time.monotonic() - started,
        len(files["files"]),
        manifest.count,
        f", generation {files['generation']}" if files["generation"] is not None else "",
    )
    path = loc.local / name if loc.local is not None else staging
    return Publication(number=number, path=path, files=files)


def _partial_only(names: list[str]) -> bool:
    return all(n.endswith(".partial") for n in names)


def _sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


# ============================================================================ fetching


def latest(location: str | Path | Location) -> dict[str, Any] | None:
    """``LATEST`` at ``location`` (``{"number", "sha256"}``), or None before the first publish.

    Raises:
        CorruptStoreError: ``LATEST`` is not what a publish writes.
    """
    loc = _as_location(location)
    raw = loc.read_bytes(LATEST_FILE)
    if raw is None:
        return None
    try:
        pointer = json.loads(raw)
        return {"number": int(pointer["number"]), "sha256": str(pointer["sha256"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptStoreError(f"{loc.url}/{LATEST_FILE} is not a publication pointer: {exc}") from exc


def verify(path: Path, files_sha256: str) -> dict[str, Any]:
    """Check a publication directory against the checksum of its ``files.json``, and every file it
    lists against its size and sha256.

    Returns:
        ``files.json``.

    Raises:
        CorruptStoreError: A missing, truncated or altered file, or a ``files.json`` that does not hash
            to ``files_sha256``.
    """
    try:
        blob = (path / FILES_FILE).read_bytes()
    except OSError as exc:
        raise CorruptStoreError(f"{path.name}: cannot read {FILES_FILE}: {exc}") from exc
    if _sha256_bytes(blob) != files_sha256:
        raise CorruptStoreError(f"{path.name}: {FILES_FILE} does not match the checksum {LATEST_FILE} gives")
    files = json.loads(blob)
    for rel, entry in files["files"].items():
        parts = PurePosixPath(rel).parts
        if PurePosixPath(rel).is_absolute() or ".." in parts or not parts:
            raise CorruptStoreError(
                f"{path.name}: {FILES_FILE} lists a path outside the publication: {rel!r}"
            )
        file = path.joinpath(*parts)
        try:
            size = file.stat().st_size
            if size != entry["size"]:
                raise CorruptStoreError(
                    f"{path.name}: {rel} has {size} bytes, {FILES_FILE} says {entry['size']}"
                )
            actual = sha256_file(file)
        except OSError as exc:
            raise CorruptStoreError(f"{path.name}: cannot read {rel}: {exc}") from exc
        if actual != entry["sha256"]:
            raise CorruptStoreError(
                f"{path.name}: {rel} checksum mismatch: expected {entry['sha256']}, got {actual}"
            )
    return dict(files)


def fetch(
    location: str | Path | Location,
    *,
    cache_dir: Path,
    current: int | None = None,
    download: bool | None = None,
) -> Publication | None:
    """The latest publication, verified, on local disk; None when it is ``current`` or there is none.

    Args:
        location: Where the writer publishes.
        cache_dir: Where downloads go (``pub-N`` directories; all but the newest two are removed).
        current: The number already served: not fetched again.
        download: Copy even a local location into ``cache_dir`` (None: only remote ones).

    Raises:
        CorruptStoreError: The publication fails its checks (a download is removed again).
    """
    loc = _as_location(location)
    pointer = latest(loc)
    if pointer is None or pointer["number"] == current:
        return None
    number, name = pointer["number"], publication_name(pointer["number"])
    if loc.local is not None and not download:
        path = loc.local / name
        return Publication(number=number, path=path, files=verify(path, pointer["sha256"]))
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / name
    if not path.is_dir():
        partial = cache_dir / f"{name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            loc.download(name, partial)
            verify(partial, pointer["sha256"])
            os.replace(partial, path)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    try:
        files = verify(path, pointer["sha256"])
    except CorruptStoreError:
        shutil.rmtree(path, ignore_errors=True)
        raise
    keep = {number, current}
    for old in cache_dir.iterdir():
        m = _NAME_RE.fullmatch(old.name)
        if m is not None and int(m.group(1)) not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return Publication(number=number, path=path, files=files)
