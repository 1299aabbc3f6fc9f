"""Index generations: immutable, published FAISS indexes that read replicas memory-map.

A generation is an IVF index built offline from the catalog (:mod:`index.build`, ``deepfeat
build-index``) and never modified afterwards. Its files live in ``<data_dir>/generations/``::

    gen-000007.faiss     FAISS header: pre-transform, coarse quantizer, codebooks, the lists' offsets
    gen-000007.ivfdata   the inverted lists (codes + ids), FAISS ``OnDiskInvertedLists`` layout
    gen-000006.faiss     the previous generation, kept until the next publish
    gen-000006.ivfdata
    gen-000008.partial/  a build in progress, or one that crashed: never read by anyone

The manifest's ``generation`` entry (:class:`index.manifest.GenerationInfo`) is the only pointer to a
generation: names, sizes, sha256 of both files, the factory, the catalog watermarks the build read up
to, and the whitening its vectors went through. Readers never list the directory and never follow a
path stored in a file (the ``.ivfdata`` name written inside the header is ignored; see
:func:`load_generation`).

**Publish protocol** (:func:`index.build.build_generation`): a build reserves the next number by
creating ``gen-N.partial/`` (``mkdir`` is atomic, so concurrent builds get distinct numbers), writes its
shards and the merged files inside it, fsyncs them, then under the store's exclusive lock re-reads the
manifest, refuses if a newer generation was published meanwhile or the whitening changed, moves the
two files to their final names (``os.replace``), fsyncs the directory and writes the manifest
atomically. The manifest write is the commit point: a crash before it leaves the old generation
published and at most a stray ``.partial`` directory or unreferenced files, which the next publish
deletes.

**Retention**: the current and the previous generation are kept; every other ``gen-*`` file is deleted
by the next publish (under the lock). Keeping the previous one lets a replica that read the manifest
just before a publish still open the files it names; a replica that already memory-mapped an older
generation keeps reading it after the unlink (Linux keeps an unlinked file alive while it is mapped)
until its next refresh swaps it out. On a network filesystem without those semantics, publish less
often than a few refresh intervals apart. Stale ``.partial`` directories are removed when their owner
(pid on this host, recorded in ``owner.json``) is gone.

**Readers** (:class:`Generation`): replicas search the memory-mapped generation (the "base") plus a
small in-memory exact index of the catalog rows added after the generation's ``max_seq`` (the
"delta", kept by :class:`index.store.ImageStore`), and merge the two by score. Rows deleted after the
generation's ``deletions_rowid`` cannot be removed from a read-only mapping, so they are *hidden*: the
base is searched for ``k + hidden`` neighbours and hidden ids are dropped, which returns exactly the
top ``k`` live ones.

**The writer keeps its own snapshot.** The writer (server or batch indexer) never loads a generation:
it keeps the in-memory index of the store's ``index_factory`` and its ``vectors.faiss`` snapshot as its
private restart cache, exactly as before generations existed. Generations are a read-side artefact
built from the catalog, the source of truth both derive from. This keeps the writer's add/delete path
(mutable, transactional, crash-tested) independent of an immutable memory-mapped format it could not
mutate anyway, and publishing never forces the writer to reload or rebuild. The cost: the writer's
index and the generation may be different index types (the writer exact, replicas IVF-PQ), which only
means replicas answer approximately, as configured.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from deepfeat.index._fs import sha256_file
from deepfeat.index.errors import CorruptStoreError
from deepfeat.index.ids import seqs_of
from deepfeat.index.manifest import GenerationInfo
from deepfeat.index.vectors import VectorIndex

__all__ = [
    "CLAIM_PREFIX",
    "GENERATIONS_DIR",
    "Generation",
    "data_name",
    "header_name",
    "load_generation",
    "merge_top_k",
    "partial_name",
    "remove_unreferenced",
    "used_numbers",
]

logger = logging.getLogger(__name__)

GENERATIONS_DIR = "generations"
OWNER_FILE = "owner.json"
_NAME_RE = re.compile(r"gen-(\d{6,})\.(faiss|ivfdata|partial)")
CLAIM_PREFIX = ".claim-"
"""A build's directory while it writes its owner file, before it is renamed to ``gen-N.partial``."""
_STALE_UNOWNED_S = 600.0  # a .partial without owner.json (crash right after mkdir) is stale after this


def header_name(number: int) -> str:
    """``gen-000007.faiss``: the FAISS header file of generation ``number``."""
    return f"gen-{number:06d}.faiss"


def data_name(number: int) -> str:
    """``gen-000007.ivfdata``: the inverted lists of generation ``number``."""
    return f"gen-{number:06d}.ivfdata"


def partial_name(number: int) -> str:
    """``gen-000007.partial``: the directory a build of generation ``number`` works in."""
    return f"gen-{number:06d}.partial"


def used_numbers(gen_dir: Path) -> set[int]:
    """Every generation number that has a file or a build directory in ``gen_dir``."""
    if not gen_dir.is_dir():
        return set()
    return {int(m.group(1)) for p in gen_dir.iterdir() if (m := _NAME_RE.fullmatch(p.name))}


# ============================================================================ loading


def load_generation(data_dir: Path, info: GenerationInfo) -> VectorIndex:
    """Open a published generation read-only, its inverted lists memory-mapped.

    Both files are checked against the manifest (size, then sha256, streamed) before FAISS parses
    anything: a truncated ``.ivfdata`` would otherwise be mapped and fault (SIGBUS) at the first search
    that touches a missing page. The header is read with ``IO_FLAG_SKIP_IVF_DATA | IO_FLAG_READ_ONLY``
    and its lists are then pointed at the verified data file and mapped read-only: the data file name
    stored inside the header is never used (FAISS's own ``IO_FLAG_ONDISK_SAME_DIR`` would do the same
    but prints to stdout, which the CLI keeps for results), and nothing is ever opened for writing.

    Args:
        data_dir: The store's data directory.
        info: The manifest's entry for the generation.

    Returns:
        A :class:`VectorIndex` over the mapped index. Never add to or remove from it: the mapping is
        read-only and FAISS would fault.

    Raises:
        CorruptStoreError: Missing or damaged files, a mismatch with the manifest, or not an IVF index
            with on-disk lists.
    """
    gen_dir = Path(data_dir) / GENERATIONS_DIR
    if info.file != header_name(info.number) or info.data_file != data_name(info.number):
        raise CorruptStoreError(
            f"generation {info.number}: the manifest names files {info.file!r} and {info.data_file!r}, "
            f"expected {header_name(info.number)!r} and {data_name(info.number)!r}"
        )
    header, data = gen_dir / info.file, gen_dir / info.data_file
    for path, size, sha in ((header, info.size, info.sha256), (data, info.data_size, info.data_sha256)):
        try:
            actual_size = path.stat().st_size
            if actual_size != size:
                raise CorruptStoreError(
                    f"generation {info.number}: {path.name} has {actual_size} bytes, the manifest says {size}"
                )
            actual = sha256_file(path)
        except OSError as exc:
            raise CorruptStoreError(f"generation {info.number}: cannot read {path.name}: {exc}") from exc
        if actual != sha:
            raise CorruptStoreError(
                f"generation {info.number}: {path.name} checksum mismatch: expected {sha}, got {actual}"
            )
    try:
        raw = faiss.read_index(str(header), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as exc:
        raise CorruptStoreError(f"generation {info.number}: cannot read {header.name}: {exc}") from exc
    ivf = _ivf_in(raw)
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        raise CorruptStoreError(
            f"generation {info.number}: {header.name} is not an IVF index with on-disk lists"
        )
    _check_layout(lists, info)
    lists.filename = str(data.resolve())
    lists.read_only = True
    try:
        lists.do_mmap()
    except RuntimeError as exc:
        raise CorruptStoreError(f"generation {info.number}: cannot map {data.name}: {exc}") from exc
    index = VectorIndex(raw, factory=info.factory)
    if index.ntotal != info.count or index.dim != info.dim:
        raise CorruptStoreError(
            f"generation {info.number} holds {index.ntotal} vectors of dim {index.dim}; "
            f"the manifest says {info.count} of dim {info.dim}"
        )
    return index


def _check_layout(lists: Any, info: GenerationInfo) -> None:
    """Every list the header describes lies inside the data file, and they hold ``info.count`` entries.

    The checksums prove the files are the ones published, not that the header describes the data file
    correctly; FAISS reads list ``i`` at ``offset[i]`` with no bounds check, so a wrong layout would
    crash the process (SIGSEGV/SIGBUS) at the first search instead of failing here.
    """
    entry = int(lists.code_size) + 8
    total = 0
    for number in range(int(lists.nlist)):
        one = lists.lists.at(number)
        size, capacity, offset = int(one.size), int(one.capacity), int(one.offset)
        if size > capacity or (capacity and offset + capacity * entry > info.data_size):
            raise CorruptStoreError(
                f"generation {info.number}: list {number} ({size} of {capacity} entries at byte {offset}) "
                f"does not fit in {info.data_file} ({info.data_size} bytes)"
            )
        total += size
    if int(lists.totsize) > info.data_size or total != info.count:
        raise CorruptStoreError(
            f"generation {info.number}: the header describes {total} entries in {int(lists.totsize)} bytes; "
            f"the manifest says {info.count} in {info.data_size}"
        )


def _ivf_in(raw: Any) -> Any:
    """The IVF index inside ``raw`` (FAISS unwraps pre-transforms and id maps), else None."""
    try:
        return faiss.extract_index_ivf(raw)
    except RuntimeError:
        return None


# ============================================================================ searching


def merge_top_k(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-query result lists from several indexes into one top-``k`` by score.

    Args:
        parts: ``(scores (m, k_i) float32, ids (m, k_i) int64)`` per index, best first; id -1 marks an
            empty slot.
        k: Results wanted per query.

    Returns:
        ``(scores, ids)`` of shape (m, min(k, sum k_i)), best first, -1 ids (score -inf) at the end of a
        row that has fewer hits.
    """
    scores = np.concatenate([p[0] for p in parts], axis=1).astype(np.float32, copy=True)  # (m, sum k_i)
    ids = np.concatenate([p[1] for p in parts], axis=1).astype(np.int64, copy=False)
    scores[ids < 0] = -np.inf
    width = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :width]  # (m, width)
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids = np.take_along_axis(ids, order, axis=1)
    top_ids[~np.isfinite(top_scores)] = -1
    return top_scores, top_ids


@dataclass(frozen=True, eq=False)
class Generation:
    """A published generation as a replica searches it: the mapped index and the seqs hidden in it.

    Immutable, so a search can hold a reference outside the store's locks while a refresh swaps in a
    newer generation or hides more rows: in-flight searches finish on the object they started with.

    Attributes:
        info: The manifest entry.
        index: The memory-mapped index (never mutated).
        hidden: Sorted int64 seqs deleted from the catalog after ``info.deletions_rowid`` that may be in
            the index (seq <= ``info.max_seq``).
    """

    info: GenerationInfo
    index: VectorIndex
    hidden: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    @property
    def visible(self) -> int:
        """Images searchable in the generation (held minus hidden)."""
        return max(0, self.index.images - int(self.hidden.size))

    def hide(self, seqs: Iterable[int]) -> Generation:
        """A copy with ``seqs`` hidden too (those above ``info.max_seq`` are not in it and are ignored)."""
        wanted = np.fromiter((int(s) for s in seqs), dtype=np.int64)
        wanted = wanted[wanted <= self.info.max_seq]
        merged = np.union1d(self.hidden, wanted)
        if merged.size == self.hidden.size:
            return self
        return Generation(info=self.info, index=self.index, hidden=merged)

    def search(
        self, queries: np.ndarray, k: int, *, among: np.ndarray | None = None, share: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` live neighbours: searches ``k + len(hidden)`` and drops hidden ids.

        Args:
            queries: (m, dim) float32, already projected like the generation's vectors.
            k: Neighbours per query, >= 1.
            among, share: A filter's FAISS ids, as :meth:`VectorIndex.search` takes them.

        Returns:
            ``(scores, ids)`` as :func:`merge_top_k` returns them.
        """
        # A hidden image may fill as many slots as it has vectors.
        scores, ids = self.index.search(
            queries, int(k) + int(self.hidden.size) * self.index.per_image, among=among, share=share
        )
        if self.hidden.size:
            ids = np.where(np.isin(seqs_of(ids), self.hidden), -1, ids)
        return merge_top_k([(scores, ids)], int(k))


# ============================================================================ retention


def _owner_alive(partial: Path) -> bool:
    """Whether the build that owns ``partial`` may still be running (when unsure: yes)."""
    try:
        owner = json.loads((partial / OWNER_FILE).read_text(encoding="utf-8"))
        pid, host = int(owner["pid"]), str(owner["host"])
    except FileNotFoundError:
        try:
            return time.time() - partial.stat().st_mtime < _STALE_UNOWNED_S
        except OSError:
            return False
    except (OSError, ValueError, KeyError, TypeError):
        return True
    if host != socket.gethostname():
        return True  # another machine's build: nothing here can tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and waits to be reaped: a killed build whose parent died too stays
    a zombie until init reaps it, which in a container without an init may be never."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc (not Linux), or gone meanwhile: the signal check above decides
    return stat[stat.rfind(")") + 2 :].startswith("Z")


def remove_unreferenced(gen_dir: Path, keep: Iterable[int]) -> list[str]:
    """Delete generation files not in ``keep`` and build directories whose owner is gone.

    Only call it holding the store's exclusive lock, right after the manifest names the generations in
    ``keep``: nothing else can then start to read an unreferenced file.

    Args:
        gen_dir: ``<data_dir>/generations``.
        keep: Generation numbers still referenced (the current one and the previous one).

    Returns:
        The names removed.
    """
    kept = set(keep)
    removed: list[str] = []
    if not gen_dir.is_dir():
        return removed
    for path in sorted(gen_dir.iterdir()):
        if path.name.startswith(CLAIM_PREFIX) and path.is_dir():
            if not _owner_alive(path):  # a build killed between its claim and the rename
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
            continue
        m = _NAME_RE.fullmatch(path.name)
        if m is None:
            continue
        if m.group(2) == "partial":
            # Also the build directory of a kept generation: a build killed after its publish, before
            # it removed the directory its files were moved out of, leaves it holding nothing needed.
            if _owner_alive(path):
                continue
            shutil.rmtree(path, ignore_errors=True)
        elif int(m.group(1)) in kept:
            continue
        else:
            path.unlink(missing_ok=True)
        removed.append(path.name)
    if removed:
        logger.info("removed unreferenced generation files: %s", ", ".join(removed))
    return removed
