"""Building an index generation from the catalog within a memory budget (``deepfeat build-index``).

The autofaiss recipe on our store: train the IVF coarse quantizer and the codes (PQ, SQ...) on a
sample drawn from the catalog, add the catalog's vectors shard by shard into empty copies of the
trained index, write each shard's inverted lists to disk, then merge them list by list into one file
in FAISS's ``OnDiskInvertedLists`` layout (``.ivfdata``) and write the index header that describes
it. Vectors are read from SQLite in batches (:meth:`index.catalog.Catalog.iter_vectors`), never all
at once, and the merge reads and writes one list at a time with plain file I/O (FAISS's
``merge_ondisk`` memory-maps every shard and the output, which RSS then counts), so the working memory
is set by the batch and shard sizes, not by the collection. The result is published as a new
generation (:mod:`index.generations` describes the files, the publish protocol and the retention
rule).

Memory budget (``max_memory_bytes``, the peak RSS the build may reach). :func:`plan_build` takes the
process's own RSS at the start (interpreter, numpy, FAISS: ~100 MiB), the trained structures (coarse
centroids, codebooks, transforms: :func:`index.choose.estimate_memory_bytes` at 0 vectors) and a
reserve for SQLite's cache and allocator slack off the budget, then sizes, from what is left:

* the training sample: ``TRAIN_COPIES`` float32 copies of each sampled vector are alive at once (the
  sample, its whitened copy, the IVF residuals PQ trains on, k-means' own subsample); at most
  ``max(100_000, 40 * nlist)`` vectors as for any store (FAISS's k-means uses up to 256 a centroid);
* the add batch: a quarter of it, at ``ADD_COPIES`` float32 copies a vector (SQLite rows, decoded
  array, projection, residuals) plus Python's per-row overhead;
* the shard: the rest, at twice the code size plus the id a vector (FAISS's per-list vectors grow by
  doubling).

A budget that cannot hold the process, the trained structures and the minimum training sample is
refused before anything is written.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from deepfeat.index._fs import (
    FileLock,
    check_writable,
    fsync_dir,
    fsync_file,
    remove_stale_temps,
    sha256_file,
)
from deepfeat.index.catalog import Catalog
from deepfeat.index.choose import estimate_memory_bytes, min_train_vectors
from deepfeat.index.errors import InvalidArgumentError, MemoryBudgetError, StoreError
from deepfeat.index.files import CATALOG_FILE, LOCK_FILE, MANIFEST_FILE
from deepfeat.index.generations import (
    CLAIM_PREFIX,
    GENERATIONS_DIR,
    OWNER_FILE,
    data_name,
    header_name,
    partial_name,
    remove_unreferenced,
    used_numbers,
)
from deepfeat.index.ids import vector_ids
from deepfeat.index.manifest import GenerationInfo, Manifest
from deepfeat.index.relayout import FillReport, train_and_fill
from deepfeat.index.vectors import VectorIndex
from deepfeat.index.whitening import Whitening

__all__ = ["BuildPlan", "build_generation", "parse_bytes", "plan_build", "process_rss_bytes"]

logger = logging.getLogger(__name__)

TRAIN_COPIES = 4
ADD_COPIES = 6
ROW_OVERHEAD = 200  # bytes a row beyond its vector while SQLite rows are Python objects
RESERVE_BYTES = 48 * 2**20
MIN_ADD_BATCH = 256
MAX_ADD_BATCH = 50_000
MIN_SHARD = 10_000

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: stage is ``train``, ``add`` or ``merge``."""


def parse_bytes(text: str) -> int:
    """``"2GiB"``, ``"512MiB"``, ``"1.5G"``, ``"300M"``, ``"4096"`` -> bytes (K/M/G/T are powers of 1024).

    Raises:
        InvalidArgumentError: Not a positive size.
    """
    units = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    raw = str(text).strip().lower().replace(" ", "")
    for suffix in ("ib", "b"):
        if raw.endswith(suffix) and raw[: -len(suffix)][-1:].isalpha():
            raw = raw[: -len(suffix)]
            break
    unit = raw[-1:] if raw[-1:].isalpha() else ""
    try:
        value = float(raw[: len(raw) - len(unit)])
    except ValueError:
        value = math.nan
    if unit not in units or not math.isfinite(value) or value <= 0:
        raise InvalidArgumentError(f"invalid memory size {text!r}: expected e.g. 2GiB, 512MiB or 1500000000")
    return int(value * units[unit])


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def process_rss_bytes() -> int:
    """This process's resident set size now (``/proc/self/status`` VmRSS; 0 where unavailable)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class BuildPlan:
    """How a build will use its memory budget (all sizes in bytes or vectors)."""

    factory: str
    dim: int
    index_dim: int
    n_vectors: int
    nlist: int
    code_size: int
    budget_bytes: int
    baseline_bytes: int
    fixed_bytes: int
    train_vectors: int
    add_batch: int
    shard_vectors: int

    @property
    def shards(self) -> int:
        """How many shards the add phase writes."""
        return max(1, math.ceil(self.n_vectors / self.shard_vectors))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the shard count."""
        return {**asdict(self), "shards": self.shards}


def plan_build(
    *,
    factory: str,
    dim: int,
    index_dim: int,
    n_vectors: int,
    budget_bytes: int,
    baseline_bytes: int,
    sample: int | None = None,
) -> BuildPlan:
    """Size the training sample, the add batch and the shards from a memory budget.

    Args:
        factory: An IVF factory string whose lists FAISS keeps in ``ArrayInvertedLists`` (``IVF4096,PQ32``,
            ``OPQ32,IVF4096,PQ32``, ``IVF1024,SQ8``, ``IVF65536_HNSW32,PQ64``...; not fast-scan ``x4fs``).
        dim: Catalog vector dimension.
        index_dim: Dimension in the index (after whitening).
        n_vectors: Vectors to index.
        budget_bytes: Peak RSS allowed.
        baseline_bytes: The process's RSS before the build (see :func:`process_rss_bytes`).
        sample: Training vectors wanted (None: ``max(100_000, 40 * nlist)``, fewer if the budget says so).

    Returns:
        The plan.

    Raises:
        InvalidArgumentError: Not a usable IVF factory, or nothing to build.
        MemoryBudgetError: The budget cannot hold the process, the trained structures and the smallest
            training sample, or the requested ``sample``.
    """
    nlist, code_size, min_train = _trainable(factory, index_dim, n_vectors=n_vectors, sample=sample)
    budget = _Budget.split(
        factory,
        dim=dim,
        index_dim=index_dim,
        code_size=code_size,
        budget_bytes=budget_bytes,
        baseline_bytes=baseline_bytes,
    )
    default_sample = max(100_000, 40 * nlist)
    train = _train_vectors(
        budget, min_train=min_train, default=default_sample, n_vectors=n_vectors, sample=sample
    )
    add_batch, shard = _add_batch_and_shard(budget, min_train=min_train, n_vectors=n_vectors)
    if train < default_sample and train < n_vectors:
        logger.warning(
            "the memory budget limits training to %d vectors (%.0f a list; FAISS suggests 39+)",
            train,
            train / nlist,
        )
    return BuildPlan(
        factory=factory,
        dim=dim,
        index_dim=index_dim,
        n_vectors=n_vectors,
        nlist=nlist,
        code_size=code_size,
        budget_bytes=budget_bytes,
        baseline_bytes=baseline_bytes,
        fixed_bytes=budget.fixed,
        train_vectors=int(train),
        add_batch=add_batch,
        shard_vectors=shard,
    )


@dataclass(frozen=True)
class _Budget:
    """A memory budget split as the module docstring says: what the process, the trained structures
    (``fixed``) and the reserve take off it, the ``work`` bytes left, and what a vector costs in each
    phase (bytes per vector: training sample, add batch, shard)."""

    factory: str
    index_dim: int
    budget: int
    baseline: int
    fixed: int
    work: int
    train_bpv: int
    add_bpv: int
    shard_bpv: int

    @classmethod
    def split(
        cls, factory: str, *, dim: int, index_dim: int, code_size: int, budget_bytes: int, baseline_bytes: int
    ) -> _Budget:
        width = max(dim, index_dim)
        fixed = estimate_memory_bytes(factory, 0, index_dim)
        return cls(
            factory=factory,
            index_dim=index_dim,
            budget=budget_bytes,
            baseline=baseline_bytes,
            fixed=fixed,
            work=budget_bytes - baseline_bytes - fixed - RESERVE_BYTES,
            train_bpv=TRAIN_COPIES * 4 * width,
            add_bpv=ADD_COPIES * 4 * width + ROW_OVERHEAD,
            shard_bpv=2 * (code_size + 8),
        )

    def need(self, min_train: int) -> int:
        """The smallest budget that trains on ``min_train`` vectors (before the add batch and shard)."""
        return self.baseline + self.fixed + RESERVE_BYTES + min_train * self.train_bpv


def _train_vectors(
    budget: _Budget, *, min_train: int, default: int, n_vectors: int, sample: int | None
) -> int:
    """The training sample: ``sample`` (else ``default``), at most what the budget holds and the
    collection has.

    Raises:
        MemoryBudgetError: The budget cannot hold ``min_train`` vectors, or the requested ``sample``.
    """
    if budget.work < min_train * budget.train_bpv:
        raise MemoryBudgetError(
            f"a budget of {_mib(budget.budget)} cannot build {budget.factory!r} at dim {budget.index_dim}: "
            f"the process already uses {_mib(budget.baseline)}, the trained quantizer and codebooks need "
            f"{_mib(budget.fixed)}, a reserve of {_mib(RESERVE_BYTES)}, and training needs at least "
            f"{min_train} vectors ({_mib(min_train * budget.train_bpv)}); give at least "
            f"{_mib(budget.need(min_train))} or use fewer IVF lists"
        )
    train_cap = budget.work // budget.train_bpv
    if sample is not None and sample > train_cap:
        raise MemoryBudgetError(
            f"--sample {sample} needs {_mib(sample * budget.train_bpv)} to train on; a budget of "
            f"{_mib(budget.budget)} leaves {_mib(budget.work)}: at most {train_cap} vectors"
        )
    return min(sample or default, train_cap, n_vectors)


def _add_batch_and_shard(budget: _Budget, *, min_train: int, n_vectors: int) -> tuple[int, int]:
    """``(add_batch, shard_vectors)``: the add batch takes up to a quarter of the working memory, the
    shard the rest.

    Raises:
        MemoryBudgetError: No room left for a shard of ``min(MIN_SHARD, n_vectors)`` codes.
    """
    add_batch = int(min(MAX_ADD_BATCH, max(MIN_ADD_BATCH, (budget.work // 4) // budget.add_bpv), n_vectors))
    shard = (budget.work - add_batch * budget.add_bpv) // budget.shard_bpv
    if shard < min(MIN_SHARD, n_vectors):
        raise MemoryBudgetError(
            f"a budget of {_mib(budget.budget)} leaves no room to hold a shard of {min(MIN_SHARD, n_vectors)} "
            f"codes after an add batch of {add_batch}; give at least "
            f"{_mib(budget.need(min_train) + add_batch * budget.add_bpv + MIN_SHARD * budget.shard_bpv)}"
        )
    return add_batch, int(min(shard, n_vectors))


def _trainable(factory: str, index_dim: int, *, n_vectors: int, sample: int | None) -> tuple[int, int, int]:
    """``(nlist, code_size, min_train)`` of an IVF factory, once the collection and the requested
    sample are known to be enough to train it.

    Raises:
        InvalidArgumentError: Not a usable IVF factory, nothing to build, too few vectors, or a
            ``sample`` under the training minimum.
    """
    ivf = faiss.extract_index_ivf(_template(factory, index_dim).faiss_index)
    nlist, code_size = int(ivf.nlist), int(ivf.code_size)
    if n_vectors < 1:
        raise InvalidArgumentError("nothing to build: the store holds no vectors")
    min_train = max(nlist, min_train_vectors(factory))
    if n_vectors < min_train:
        raise InvalidArgumentError(
            f"{factory!r} needs at least {min_train} vectors to train, the store holds {n_vectors}; "
            "use fewer IVF lists"
        )
    if sample is not None and (not isinstance(sample, int) or isinstance(sample, bool) or sample < min_train):
        raise InvalidArgumentError(
            f"--sample must be an integer >= {min_train} for {factory!r}, got {sample!r}"
        )
    return nlist, code_size, min_train


def _template(factory: str, index_dim: int, search_params: Mapping[str, float] | None = None) -> VectorIndex:
    """An empty index from ``factory``, checked to be an IVF index whose lists can go on disk."""
    index = VectorIndex.create(index_dim, factory, search_params=search_params)
    ivf = index.ivf
    if ivf is None:
        raise InvalidArgumentError(
            f"build-index builds IVF indexes (e.g. 'IVF4096,PQ32'); {factory!r} is not one. Flat and HNSW "
            "indexes live in the writer's snapshot"
        )
    if not isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists) or isinstance(
        ivf, faiss.IndexIVFPQR
    ):
        raise InvalidArgumentError(
            f"{factory!r} keeps its lists in a layout that cannot be merged on disk (fast-scan 'x4fs' "
            "codes or a refined IVFPQR); use 8-bit codes such as 'IVF4096,PQ32'"
        )
    if isinstance(ivf, faiss.IndexIVFPQ):
        # FAISS's factory turns on polysemous training for IVF-PQ: it reorders each codebook so Hamming
        # distances between codes approximate real ones, which only matters to polysemous filtering
        # (``polysemous_ht``, never used here); ADC distances are the same. Training IVF128,PQ16 on 20k
        # x 64-d took 24 s with it and 16 s without (shared 2-core machine).
        ivf.do_polysemous_training = False  # type: ignore[attr-defined]  # SWIG attribute, not in the stubs
    return index


# ============================================================================ the build


def _write_lists(ivf: Any, path: Path) -> np.ndarray:
    """Write an in-memory IVF's lists to ``path`` in FAISS's on-disk layout; returns the list sizes.

    Each list is its codes (``size * code_size`` bytes) then its ids (``size`` int64), lists back to
    back in list order: ``OnDiskInvertedLists`` with every list's capacity equal to its size, which is
    what :meth:`faiss.OnDiskInvertedLists.set_all_lists_sizes` describes. Plain writes, no memory map.
    """
    lists, code_size = ivf.invlists, int(ivf.code_size)
    sizes = np.zeros(int(ivf.nlist), dtype=np.int64)
    with open(path, "wb") as fh:
        for number in range(sizes.size):
            n = int(lists.list_size(number))
            sizes[number] = n
            if n:
                fh.write(faiss.rev_swig_ptr(lists.get_codes(number), n * code_size).data)
                fh.write(faiss.rev_swig_ptr(lists.get_ids(number), n).data)
    return sizes


def _merge_lists(shards: list[tuple[Path, np.ndarray]], out: Path, *, code_size: int) -> np.ndarray:
    """Concatenate the shards' lists, list by list, into one file in the same layout; returns the sizes.

    Reads with ``pread`` and writes sequentially through the page cache, never through a memory map,
    so the merge holds one list at a time and adds nothing to RSS at any scale (FAISS's own
    ``merge_from_multiple`` maps every shard and the output: RSS then grows by twice the lists' size).
    One shard is already the final file.
    """
    if len(shards) == 1:
        os.replace(shards[0][0], out)
        return shards[0][1]
    entry = code_size + 8
    fds = [os.open(path, os.O_RDONLY) for path, _ in shards]
    try:
        starts = [np.concatenate([[0], np.cumsum(sizes * entry)[:-1]]) for _, sizes in shards]

        def read(fd: int, n: int, offset: int) -> bytes:
            chunk = os.pread(fd, n, offset)
            if len(chunk) != n:
                raise StoreError(f"shard file ended early while merging into {out.name}")
            return chunk

        with open(out, "wb") as fh:
            for number in range(shards[0][1].size):
                for fd, (_, sizes), start in zip(fds, shards, starts, strict=True):
                    if n := int(sizes[number]):
                        fh.write(read(fd, n * code_size, int(start[number])))
                for fd, (_, sizes), start in zip(fds, shards, starts, strict=True):
                    if n := int(sizes[number]):
                        fh.write(read(fd, n * 8, int(start[number]) + n * code_size))
    finally:
        for fd in fds:
            os.close(fd)
    for path, _ in shards:
        path.unlink()
    return np.sum([sizes for _, sizes in shards], axis=0)


def _reserve(gen_dir: Path, manifest: Manifest) -> tuple[int, Path]:
    """Claim the next generation number: its build directory appears, by an atomic rename, with its
    owner file already inside, so a build killed at any moment never leaves a directory that looks
    like a live build's (a bare ``mkdir`` then a write would, for ten minutes)."""
    gen_dir.mkdir(exist_ok=True)
    taken = used_numbers(gen_dir)
    if manifest.generation is not None:
        taken.add(manifest.generation.number)
    number = max(taken, default=0) + 1
    claim = gen_dir / f"{CLAIM_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    claim.mkdir()
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time()}
    (claim / OWNER_FILE).write_text(json.dumps(owner), encoding="utf-8")
    while True:
        partial = gen_dir / partial_name(number)
        try:
            # Fails on a non-empty directory of that name (another build's); replaces an empty one,
            # which only a build killed right after a bare mkdir (older versions) leaves.
            os.rename(claim, partial)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                shutil.rmtree(claim, ignore_errors=True)
                raise
            number += 1
            continue
        return number, partial


def build_generation(
    data_dir: str | Path,
    *,
    factory: str,
    max_memory_bytes: int,
    sample: int | None = None,
    search_params: Mapping[str, float] | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> GenerationInfo:
    """Build an IVF index over the catalog within a memory budget and publish it as a new generation.

    Runs beside a live writer: the catalog is read in short transactions (WAL readers never block the
    writer), the build works in its own ``generations/gen-N.partial/`` directory, and only the publish
    takes the store's exclusive lock, for a rename and a manifest write. Rows added after the build
    read the catalog's watermarks, and rows deleted after it, are served by replicas from the catalog
    (the delta and the hidden set, :mod:`index.generations`).

    Args:
        data_dir: An existing store.
        factory: IVF factory string, e.g. ``IVF4096,PQ32``.
        max_memory_bytes: Peak RSS the build may reach (see the module docstring for the split).
        sample: Training vectors (None: from the budget, at most ``max(100_000, 40 * nlist)``).
        search_params: Search-time parameters stored in the generation (``{"nprobe": 16}``) over
            :func:`index.choose.default_search_params`; replicas search with them.
        seed: Sampling seed.
        progress: Called as ``progress(stage, done, total)``.

    Returns:
        The published generation's manifest entry (``build`` holds the plan and stage timings).

    Raises:
        StoreError: No store in ``data_dir``; a newer generation or another whitening was published
            while this one was built (nothing is published then).
        InvalidArgumentError: Not a usable IVF factory, or too few vectors to train it.
        MemoryBudgetError: The budget is too small (refused before anything is written).
        CorruptStoreError: The manifest or the catalog is unreadable.
    """
    started = time.monotonic()
    data_dir = Path(data_dir)
    source = _read_source(data_dir)
    check_writable(data_dir)  # the generation is written beside the catalog
    catalog = Catalog(data_dir / CATALOG_FILE, dim=source.manifest.dim, read_only=True)
    try:
        watermarks = catalog.watermarks()  # read first: the generation holds the rows up to these
        plan = _plan_for(
            source,
            factory=factory,
            n_vectors=catalog.count() * catalog.vectors_per_image(),
            max_memory_bytes=max_memory_bytes,
            sample=sample,
            search_params=search_params,
        )
        number, partial = _reserve(data_dir / GENERATIONS_DIR, source.manifest)
        with _removed_on_failure(partial):
            info = _build_into(
                partial,
                number=number,
                catalog=catalog,
                plan=plan,
                source=source,
                search_params=search_params,
                watermarks=watermarks,
                seed=seed,
                progress=progress,
                started=started,
            )
            published = _publish(data_dir, partial, info, expected=source.manifest)
    finally:
        catalog.close()
    shutil.rmtree(partial, ignore_errors=True)
    logger.info(
        "published generation %d: %d vectors, %s, %.1f s",
        number,
        published.count,
        factory,
        time.monotonic() - started,
    )
    return published


@dataclass(frozen=True)
class _Source:
    """What a build reads from the store before it starts: the manifest, the whitening it records (the
    manifest entry and the loaded projection) and the dimension of the vectors in the index."""

    manifest: Manifest
    whitening_entry: dict[str, Any] | None
    whitening: Whitening | None
    index_dim: int


def _read_source(data_dir: Path) -> _Source:
    """The store's manifest and whitening.

    Raises:
        StoreError: No store in ``data_dir``.
    """
    manifest = Manifest.load(data_dir / MANIFEST_FILE)
    if manifest is None:
        raise StoreError(f"no store in {data_dir}: run `deepfeat index PATH --data-dir {data_dir}` first")
    entry = manifest.extra.get("whitening")
    whitening = Whitening.load_recorded(data_dir, entry)
    index_dim = whitening.d_out if whitening is not None else manifest.dim
    return _Source(manifest=manifest, whitening_entry=entry, whitening=whitening, index_dim=index_dim)


def _plan_for(
    source: _Source,
    *,
    factory: str,
    n_vectors: int,
    max_memory_bytes: int,
    sample: int | None,
    search_params: Mapping[str, float] | None,
) -> BuildPlan:
    """:func:`plan_build` for this store, once ``factory`` and ``search_params`` are known to be usable."""
    _template(factory, source.index_dim, search_params)  # refuse a bad factory or parameter before planning
    plan = plan_build(
        factory=factory,
        dim=source.manifest.dim,
        index_dim=source.index_dim,
        n_vectors=n_vectors,
        budget_bytes=max_memory_bytes,
        baseline_bytes=process_rss_bytes(),
        sample=sample,
    )
    logger.info("build plan: %s", plan.to_dict())
    return plan


@contextmanager
def _removed_on_failure(partial: Path) -> Iterator[None]:
    """Remove the build directory when the block fails: a failure seen here cleans up; a crash leaves
    the directory to the next publish."""
    try:
        yield
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _build_into(
    partial: Path,
    *,
    number: int,
    catalog: Catalog,
    plan: BuildPlan,
    source: _Source,
    search_params: Mapping[str, float] | None,
    watermarks: tuple[int, int],
    seed: int,
    progress: Progress | None,
    started: float,
) -> GenerationInfo:
    """Train, add shard by shard, merge into ``partial``; returns the entry minus the publish fields
    (``previous``), built at the catalog's ``watermarks`` (``max_seq``, ``deletions_rowid``), its
    ``build`` timed from ``started`` (``time.monotonic()``)."""
    max_seq, deletions_rowid = watermarks
    report = progress or (lambda stage, done, total: None)
    template = _template(plan.factory, plan.index_dim, search_params)
    t = time.monotonic()
    shards, filled = _fill_shards(
        partial,
        template,
        catalog,
        plan=plan,
        whitening=source.whitening,
        max_seq=max_seq,
        seed=seed,
        progress=progress,
    )
    timings = {
        "train_s": round(filled.train_s, 3),
        "add_s": round(time.monotonic() - t - filled.train_s, 3),
    }

    t = time.monotonic()
    report("merge", 0, len(shards))
    header, data = partial / header_name(number), partial / data_name(number)
    ntotal = _merge_into(shards, template, header=header, data=data, code_size=plan.code_size)
    report("merge", len(shards), len(shards))
    timings["merge_s"] = round(time.monotonic() - t, 3)
    t = time.monotonic()
    header_sha, data_sha = sha256_file(header), sha256_file(data)
    timings["checksum_s"] = round(time.monotonic() - t, 3)
    return GenerationInfo(
        number=number,
        file=header.name,
        sha256=header_sha,
        size=header.stat().st_size,
        data_file=data.name,
        data_sha256=data_sha,
        data_size=data.stat().st_size,
        factory=plan.factory,
        dim=plan.index_dim,
        max_seq=max_seq,
        deletions_rowid=deletions_rowid,
        count=ntotal,
        whitening=source.whitening_entry,
        built_at=time.time(),
        build={
            "trained_on": filled.trained_on,
            "shards": len(shards),
            "search_params": template.search_params,
            **timings,
            "plan": plan.to_dict(),
            "seconds": round(time.monotonic() - started, 3),
        },
    )


def _fill_shards(
    partial: Path,
    template: VectorIndex,
    catalog: Catalog,
    *,
    plan: BuildPlan,
    whitening: Whitening | None,
    max_seq: int,
    seed: int,
    progress: Progress | None,
) -> tuple[list[tuple[Path, np.ndarray]], FillReport]:
    """Train ``template`` on a sample, then add the catalog into empty copies of it, one a shard, each
    written to ``partial`` as soon as it is full; returns the shards (file, list sizes) in order."""
    shards: list[tuple[Path, np.ndarray]] = []
    block: Any = None  # the shard being filled; made once the template is trained

    def flush(full: Any) -> None:
        path = partial / f"shard-{len(shards):05d}.lists"
        shards.append((path, _write_lists(faiss.extract_index_ivf(full), path)))

    def add(seqs: np.ndarray, vecs: np.ndarray) -> None:
        nonlocal block
        if block is None:
            block = faiss.clone_index(template.faiss_index)
        block.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), vector_ids(seqs))
        if block.ntotal >= plan.shard_vectors:
            flush(block)
            block = None

    filled = train_and_fill(
        template,
        catalog,
        max_seq=max_seq,
        n_live=plan.n_vectors,
        sample=plan.train_vectors,
        seed=seed,
        project=whitening.apply if whitening is not None else None,
        add=add,
        batch=plan.add_batch,
        progress=progress,
    )
    if not shards or (block is not None and block.ntotal):
        flush(block if block is not None else faiss.clone_index(template.faiss_index))
    return shards, filled


def _merge_into(
    shards: list[tuple[Path, np.ndarray]], template: VectorIndex, *, header: Path, data: Path, code_size: int
) -> int:
    """Merge the shards' lists into ``data``, list by list, write the index ``header`` that describes
    it, fsync both; returns the vectors held."""
    sizes = _merge_lists(shards, data, code_size=code_size)
    ntotal = int(sizes.sum())
    merged = faiss.clone_index(template.faiss_index)
    ivf = faiss.extract_index_ivf(merged)
    # The header records only the bare data file name: readers re-point it (index.generations).
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, data.name)
    lists.totsize = data.stat().st_size
    list_sizes = np.ascontiguousarray(sizes, dtype=np.uint64)  # named: swig_ptr keeps no reference
    lists.set_all_lists_sizes(faiss.swig_ptr(list_sizes))
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # type: ignore[attr-defined]  # SWIG proxy attribute; the index owns the lists now
    ivf.ntotal = merged.ntotal = ntotal
    faiss.write_index(merged, str(header))
    del merged, ivf, lists
    fsync_file(data)
    fsync_file(header)
    return ntotal


def _publish(data_dir: Path, partial: Path, info: GenerationInfo, *, expected: Manifest) -> GenerationInfo:
    """Move the files in place and point the manifest at them, under the store's exclusive lock.

    A build is a writer of the data dir like any other, so it also removes the temp files a killed
    writer left there (a build killed while writing its manifest leaves ``manifest.json.tmp-*``, and
    the next build may be the next writer to run)."""
    gen_dir = data_dir / GENERATIONS_DIR
    lock = FileLock(data_dir / LOCK_FILE)
    try:
        with lock.hold():
            remove_stale_temps(data_dir)
            current = Manifest.load(data_dir / MANIFEST_FILE)
            if current is None or current.fingerprint != expected.fingerprint or current.dim != expected.dim:
                raise StoreError(f"the store in {data_dir} changed identity while the generation was built")
            if current.extra.get("whitening") != info.whitening:
                raise StoreError(
                    "the store's whitening changed while the generation was built; run build-index again"
                )
            previous = current.generation
            if previous is not None and previous.number >= info.number:
                raise StoreError(
                    f"generation {previous.number} was published while generation {info.number} was built; "
                    "not publishing an older build over it"
                )
            os.replace(partial / info.data_file, gen_dir / info.data_file)
            os.replace(partial / info.file, gen_dir / info.file)
            fsync_dir(gen_dir)
            published = replace(info, previous=None if previous is None else replace(previous, previous=None))
            replace(current, generation=published, updated_at=time.time()).save(data_dir / MANIFEST_FILE)
            keep = {info.number} | ({previous.number} if previous is not None else set())
            try:
                remove_unreferenced(gen_dir, keep)
            except OSError as exc:  # published already; the next publish retries the clean-up
                logger.warning("could not remove old generation files: %s", exc)
    finally:
        lock.close()
    return published
