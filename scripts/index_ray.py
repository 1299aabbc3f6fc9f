"""Distributed batch indexer on Ray Data: the local indexer's semantics on a cluster, resumable from shards.

    deepfeat index PHOTOS --engine ray [--address ADDR] [--actors N] [--batch-size B]

The pipeline (clip-retrieval's reader -> mapper -> writer, on Ray Data's streaming executor)::

    listing (driver) -> read/hash/decode/preprocess tasks -> actor pool of embedders
        -> Parquet shards (driver, <data_dir>/ray-jobs/<job-key>/) -> commit into the store (driver)

Why it is built this way:

* One image path. Each file goes through ``index_images.prepare_file``, the function the local
  indexer's DataLoader workers run, so both engines skip known content, decode, preprocess and fail
  (with the same codes) identically; a file that indexes is a file that searches.
* The same vectors. Actors get the embedder *options* (not a pickled model) and build the same
  ``Embedder``; its fingerprint is checked against the store's before the first batch.
* Ray owns scheduling and retries: one GPU per actor when the cluster has GPUs, CPU actors otherwise.
  On a CPU-only cluster the decode step and the actors ask for the same resources, so Ray Data fuses
  them (each actor process decodes and embeds its own batches, no pixels cross the object store); with
  GPUs the decode runs in CPU tasks feeding the GPU actors.
* The driver writes the shards and commits them. Workers only need to read the input files; the data
  dir (SQLite, which must stay on a local disk) is touched by one process, as the store expects.
* Resumable. A job is keyed by the embedder fingerprint, the image limits and the listing. Each shard is
  written atomically (temp file, fsync, rename), so after a kill every shard on disk is whole; a re-run
  lists the same files, reads which paths the job's shards already hold and sends only the rest through
  Ray. The commit adds shard by shard in listing order and is idempotent: the store deduplicates by
  content sha256, so committing twice (a kill during the commit) never duplicates an image. The job's
  directory is removed after a successful commit (``--keep-shards`` keeps it).

Ray is an optional dependency (``pip install 'deepfeat[ray]'``), imported only when this engine runs.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from deepfeat.index.errors import StoreError
from deepfeat.index.store import ImageStore, NewImage
from deepfeat.models.embedder import Embedder
from deepfeat.models.errors import InvalidOptionError
from deepfeat.models.images import ImageLimits
from deepfeat.scripts.index_command import DEFAULT_EXTENSIONS, echo_summary, extensions_from
from deepfeat.scripts.index_images import IndexSummary, iter_image_files, prepare_file

__all__ = [
    "JOBS_DIR",
    "RAY_MISSING",
    "EmbedderActor",
    "JobRunningError",
    "RayIndexSummary",
    "SortedDigests",
    "commit_shards",
    "connect_ray",
    "import_ray",
    "index_paths_ray",
    "job_key",
    "run",
    "shard_paths",
]

log = logging.getLogger(__name__)

JOBS_DIR = "ray-jobs"
"""Under the data dir: one folder of shards per job key."""
RAY_MISSING = "the ray engine needs Ray: pip install 'deepfeat[ray]'"
SHARD_GLOB = "shard-*.parquet"
_COLUMNS = ("index", "path", "status", "sha256", "width", "height", "nbytes", "thumbnail", "code", "reason")
_MAX_BLOCKS = 20_000
"""Input blocks are one embedder batch each, up to this many (bigger blocks for bigger listings)."""


class JobRunningError(StoreError):
    """Another process is running the same job (same listing, model and limits) right now."""

    code = "job_running"


@dataclass
class RayIndexSummary(IndexSummary):
    """The local indexer's counts, plus what the resume reused."""

    reused: int = 0
    """Rows (files) taken from shards written by an earlier, interrupted run of the same job."""
    shards: int = 0
    """Shards committed."""
    startup_s: float = 0.0
    """Seconds until the first embedded rows came back (listing, Ray Data planning, actors starting and
    loading the model): the fixed cost a bigger job amortises."""
    job: str = ""


def import_ray() -> Any:
    """Ray and Ray Data, imported on demand so the rest of deepfeat works without them.

    Raises:
        ImportError: Ray is not installed (the message says how to install it).
    """
    try:
        import ray
        import ray.data  # noqa: F401  (the pipeline needs it; fail here, not mid-job)
    except ImportError as exc:
        raise ImportError(RAY_MISSING) from exc
    return ray


class SortedDigests:
    """The store's content hashes as one sorted array: ``sha in digests`` by binary search.

    A Python set of millions of hex strings is several hundred bytes each and is pickled into every
    task; this is 64 bytes each and travels once through the object store (zero-copy on each node).
    """

    def __init__(self, hexdigests: np.ndarray) -> None:
        self._sorted = hexdigests

    @classmethod
    def build(cls, hexdigests: set[str] | Sequence[str]) -> SortedDigests:
        return cls(np.sort(np.array(sorted(hexdigests), dtype="S64")))

    @property
    def array(self) -> np.ndarray:
        return self._sorted

    def __len__(self) -> int:
        return int(self._sorted.shape[0])

    def __contains__(self, sha: object) -> bool:
        if not isinstance(sha, str) or not self._sorted.size:
            return False
        key = sha.encode("ascii")
        i = int(np.searchsorted(self._sorted, key))
        return i < self._sorted.shape[0] and bytes(self._sorted[i]) == key


def job_key(files: Sequence[Path], *, fingerprint: dict[str, Any], limits: ImageLimits) -> str:
    """What identifies a job's shards: the same files, embedder and limits give the same key."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"fingerprint": fingerprint, "limits": asdict(limits)}, sort_keys=True).encode())
    for path in files:
        digest.update(b"\0" + str(path).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:20]


# ==================================================================================== Ray stages


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    transform: Any,
    limits: ImageLimits,
    decode_size: tuple[int, int],
    known_ref: Any,
) -> dict[str, np.ndarray]:
    """Ray Data task: read, hash, decode and preprocess a batch of paths with ``prepare_file``.

    The (3, H, W) float32 tensors travel as raw bytes plus their shape: in "full" resize mode images
    have different sizes, which a fixed-shape tensor column cannot hold.
    """
    import ray

    known = SortedDigests(ray.get(known_ref))
    items = [
        prepare_file(
            Path(str(path)), transform=transform, limits=limits, decode_size=decode_size, known_sha256=known
        )
        for path in batch["path"]
    ]
    n = len(items)
    shapes = np.zeros((n, 3), dtype=np.int64)
    pixels = np.empty(n, dtype=object)
    for i, item in enumerate(items):
        if item.tensor is not None:
            array = item.tensor.numpy()
            shapes[i] = array.shape
            pixels[i] = np.ascontiguousarray(array, dtype=np.float32).tobytes()
        else:
            pixels[i] = b""
    return {
        "index": np.asarray(batch["index"], dtype=np.int64),
        "path": np.array([item.path for item in items], dtype=object),
        "status": np.array([item.status for item in items], dtype=object),
        "sha256": np.array([item.sha256 for item in items], dtype=object),
        "width": np.array([item.width for item in items], dtype=np.int64),
        "height": np.array([item.height for item in items], dtype=np.int64),
        "nbytes": np.array([item.nbytes for item in items], dtype=np.int64),
        "thumbnail": np.array([item.thumbnail or b"" for item in items], dtype=object),
        "code": np.array([item.code for item in items], dtype=object),
        "reason": np.array([item.reason for item in items], dtype=object),
        "shape": shapes,
        "pixels": pixels,
    }


class EmbedderActor:
    """Ray Data actor: one Embedder per actor, built from the options (never a pickled model).

    Args:
        options: ``Embedder`` keyword arguments (model, weights, layer, pooling, ...).
        device: ``cpu`` or ``cuda`` (Ray gives each GPU actor one visible device).
        precision: autocast precision, as the local indexer's.
        fingerprint: the store's; an actor whose embedder differs (another deepfeat or model version
            on a worker) refuses to start rather than write vectors that mean something else.
        threads: torch intra-op threads (the CPUs Ray reserved for this actor).
        compile: ``torch.compile`` the trunk, as ``--compile`` does for the local indexer.
    """

    def __init__(
        self,
        options: dict[str, Any],
        *,
        device: str,
        precision: str,
        fingerprint: dict[str, Any],
        threads: int,
        compile: bool = False,
        backend: str = "auto",
    ) -> None:
        import torch

        if device == "cpu":
            torch.set_num_threads(threads)
        self.embedder = Embedder(
            **options, device=device, precision=precision, compile=compile, backend=backend
        )
        if self.embedder.fingerprint != fingerprint:
            raise InvalidOptionError(
                f"this worker's embedder {self.embedder.fingerprint} differs from the store's {fingerprint}; "
                "install the same deepfeat version and weights on every node"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        out = {name: batch[name] for name in _COLUMNS}
        n = len(batch["path"])
        vectors = np.empty(n, dtype=object)
        vectors[:] = [b""] * n
        semantic = np.empty(n, dtype=object)
        semantic[:] = [b""] * n
        ok = [i for i in range(n) if batch["status"][i] == "ok"]
        if ok:
            tensors = [
                torch.from_numpy(
                    np.frombuffer(batch["pixels"][i], dtype=np.float32)
                    .reshape(tuple(batch["shape"][i]))
                    .copy()
                )
                for i in ok
            ]
            # (len(ok), vectors_per_image, dim) float32, unit L2: global vector first, then regional
            if self.embedder.semantic_dim is None:
                embedded = self.embedder.embed_tensors(tensors, regions=True)
                for row, i in enumerate(ok):
                    vectors[i] = embedded[row].tobytes()
            else:
                # (len(ok), d_s) semantic vectors from the same forward passes
                embedded, sem = self.embedder.embed_tensors(tensors, regions=True, semantic=True)
                for row, i in enumerate(ok):
                    vectors[i] = embedded[row].tobytes()
                    semantic[i] = sem[row].tobytes()
        out["vector"] = vectors
        out["semantic"] = semantic
        return out


# ==================================================================================== shards


def _shard_schema(dim: int, fingerprint: dict[str, Any]) -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("index", pa.int64()),  # position in the job's listing: the commit keeps listing order
            ("path", pa.string()),
            ("status", pa.string()),  # ok | present | failed
            ("sha256", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("nbytes", pa.int64()),
            ("thumbnail", pa.binary()),  # JPEG, empty unless ok
            ("code", pa.string()),  # failed: the stable error code
            ("reason", pa.string()),
            ("vector", pa.binary()),  # (vectors_per_image, dim) little-endian float32, empty unless ok
            ("semantic", pa.binary()),  # (d_s,) little-endian float32, empty without a semantic layer
        ],
        metadata={"deepfeat.dim": str(dim), "deepfeat.fingerprint": json.dumps(fingerprint, sort_keys=True)},
    )


def _write_shard(job_dir: Path, table: Any) -> Path:
    """Write rows (sorted by listing index) as ``shard-<first index>-<n>.parquet``, atomically."""
    import pyarrow.parquet as pq

    from deepfeat.index._fs import atomic_write

    table = table.sort_by("index")
    first = int(table.column("index")[0].as_py())
    path = job_dir / f"shard-{first:010d}-{table.num_rows:06d}.parquet"
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    return path


def shard_paths(job_dir: Path) -> set[str]:
    """The input paths the job's shards already hold. An unreadable shard is deleted (it is derived
    data: its files are simply processed again)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done: set[str] = set()
    for shard in sorted(job_dir.glob(SHARD_GLOB)):
        try:
            done.update(pq.read_table(shard, columns=["path"]).column("path").to_pylist())
        except (OSError, pa.ArrowException) as exc:
            log.warning("discarding unreadable shard %s (%s); its files are indexed again", shard.name, exc)
            shard.unlink(missing_ok=True)
    return done


def commit_shards(
    job_dir: Path,
    store: ImageStore,
    *,
    summary: RayIndexSummary,
    report_path: Path | None,
) -> None:
    """Merge a job's shards into the store, in listing order, and write the failures report.

    Idempotent: content already in the store (committed by an earlier, interrupted commit, or the same
    bytes under two paths) gets its existing id back, never a second row.
    """
    import pyarrow.parquet as pq

    dim = store.dim
    seen: set[str] = set()
    failures: list[tuple[int, dict[str, str]]] = []
    for shard in sorted(job_dir.glob(SHARD_GLOB)):
        rows = pq.read_table(shard).to_pylist()
        ok: list[dict[str, Any]] = []
        for row in rows:
            if row["path"] in seen:  # only if a shard was copied in by hand: keep the first
                continue
            seen.add(row["path"])
            if row["status"] == "ok":
                ok.append(row)
            elif row["status"] == "present":
                summary.already_present += 1
            else:
                failure = {"path": row["path"], "code": row["code"], "reason": row["reason"]}
                failures.append((row["index"], failure))
        if ok:
            # (n, vectors_per_image, dim): every row of a job holds as many vectors (one embedder)
            vectors = np.frombuffer(b"".join(row["vector"] for row in ok), dtype="<f4").reshape(
                len(ok), -1, dim
            )
            # (n, d_s) when every row has one (shards written before semantic vectors have none)
            semantic = None
            if store.semantic_dim is not None and all(row.get("semantic") for row in ok):
                semantic = np.frombuffer(b"".join(row["semantic"] for row in ok), dtype="<f4").reshape(
                    len(ok), -1
                )
            results = store.add(
                vectors,
                [
                    NewImage(
                        sha256=row["sha256"],
                        source=row["path"],
                        width=row["width"],
                        height=row["height"],
                        nbytes=row["nbytes"],
                        thumbnail=row["thumbnail"] or None,
                    )
                    for row in ok
                ],
                semantic=semantic,
            )
            created = sum(result.created for result in results)
            summary.indexed += created
            summary.already_present += len(results) - created
        summary.shards += 1
    failures.sort(key=lambda pair: pair[0])
    summary.failed = len(failures)
    summary.failures = [failure for _, failure in failures]
    for failure in summary.failures:
        log.warning("skipped %s: %s (%s)", failure["path"], failure["reason"], failure["code"])
    if report_path is not None:
        with report_path.open("w", encoding="utf-8") as report:
            for failure in summary.failures:
                report.write(json.dumps(failure) + "\n")


@contextmanager
def _job_lock(job_dir: Path) -> Iterator[None]:
    fd = os.open(job_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobRunningError(
                f"another process is running this job ({job_dir}); wait for it, or stop it and re-run to resume"
            ) from None
        yield
    finally:
        os.close(fd)


# ==================================================================================== the driver


def connect_ray(ray: Any, *, address: str | None, num_cpus: int | None = None, verbose: bool = False) -> bool:
    """Connect to ``address``, or start a local Ray with ``num_cpus`` (default: every CPU here).

    An already initialised Ray (a test session, a notebook) is used as it is. Ray's own logging stays
    at warnings and workers' output is not forwarded unless ``verbose``: a batch job's output is its
    progress bar and summary.

    Returns:
        Whether this call started (or connected) Ray, i.e. whether the caller should shut it down.
    Raises:
        ConnectionError: no Ray cluster at ``address``.
    """
    if ray.is_initialized():
        return False
    quiet = {
        "include_dashboard": False,
        "logging_level": logging.INFO if verbose else logging.WARNING,
        "log_to_driver": verbose,
    }
    if address:
        _probe(address)
        ray.init(address=address, **quiet)
    else:
        # "local": a fresh Ray of our own, never a cluster someone else started on this machine.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, **quiet)
    if not verbose:
        # Ray Data logs each execution's plan at INFO and warns that we replaced its progress bars.
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    return True


def _probe(address: str, *, timeout: float = 5.0) -> None:
    """Fail fast when nothing listens at a HOST:PORT (or ray://HOST:PORT) address: ``ray.init`` would
    retry its GCS connection for many minutes before giving up."""
    if "://" in address:
        address = address.split("://", 1)[1]
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and other forms Ray resolves itself (and reports quickly)
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {host}:{port} ({exc.strerror or exc})") from None


class _Plan(NamedTuple):
    device: str
    """The actors' device: cpu or cuda."""
    actors: int
    resources: dict[str, Any]
    """Ray resources per actor."""
    decode_cpus: int
    """CPUs per decode task."""


def _plan_resources(ray: Any, *, device: str, actors: int | None, actor_cpus: int) -> _Plan:
    """(actor device, number of actors, Ray resources per actor, CPUs per decode task).

    CPU actors: as many as the CPUs allow, each with ``actor_cpus`` torch threads; the decode tasks ask
    for the same CPUs, so Ray Data fuses them into the actors (each decodes its own batches; a separate
    decode stage would find every CPU held by an actor and wait forever). GPU actors: one GPU each,
    the decode runs in one-CPU tasks on the CPUs the actors leave free (at least one must be left).

    Raises:
        InvalidOptionError: a count below 1, CUDA without GPUs, or GPU actors holding every CPU.
    """
    if actor_cpus < 1:
        raise InvalidOptionError(f"--actor-cpus must be >= 1, got {actor_cpus}")
    if actors is not None and actors < 1:
        raise InvalidOptionError(f"--actors must be >= 1, got {actors}")
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    if device.startswith("cuda") and gpus == 0:
        raise InvalidOptionError(
            f"device {device!r} requested but the Ray cluster has no GPUs; use auto or cpu"
        )
    if device != "cpu" and gpus > 0:
        n = actors or gpus
        if n * actor_cpus >= cpus:
            raise InvalidOptionError(
                f"{n} GPU actors x {actor_cpus} CPUs would hold all {cpus} CPUs of the cluster, leaving none "
                "for the decode tasks; lower --actors or --actor-cpus"
            )
        if n > gpus:
            log.warning("%d actors but %d GPUs: the others wait for GPUs (an autoscaler's)", n, gpus)
        return _Plan("cuda", n, {"num_gpus": 1, "num_cpus": actor_cpus}, 1)
    n = actors or max(1, cpus // actor_cpus)
    if n * actor_cpus > cpus:
        log.warning("%d actors x %d CPUs but %d CPUs: the others wait for CPUs", n, actor_cpus, cpus)
    return _Plan("cpu", n, {"num_cpus": actor_cpus}, actor_cpus)


def index_paths_ray(
    paths: Sequence[str | os.PathLike[str]],
    *,
    embedder: Embedder,
    embedder_options: dict[str, Any],
    store: ImageStore,
    limits: ImageLimits,
    device: str = "auto",
    precision: str = "fp32",
    compile: bool = False,
    backend: str = "auto",
    batch_size: int = 32,
    actors: int | None = None,
    actor_cpus: int = 1,
    shard_size: int = 1024,
    extensions: frozenset[str] = DEFAULT_EXTENSIONS,
    report_path: Path | None = None,
    keep_shards: bool = False,
    progress: bool = True,
) -> RayIndexSummary:
    """Index every image under ``paths`` into ``store`` with Ray Data (Ray must be initialised).

    Args:
        paths: files and folders (folders walked as by the local indexer).
        embedder: this process's copy; gives the fingerprint, the decode size and the preprocessing.
        embedder_options: the keyword arguments ``embedder`` was built with (minus device/precision):
            each actor builds its own from them.
        store: an open, writable ImageStore (its data dir holds the job's shards).
        limits: the service's image limits.
        device: auto / cpu / cuda: GPU actors when the cluster has GPUs (auto) or must (cuda).
        precision: the actors' autocast precision.
        compile: ``torch.compile`` each actor's trunk.
        backend: what runs each actor's trunk (``auto`` resolves on the actor's own machine).
        batch_size: images per forward pass, per actor.
        actors: embedder actors (default: one per GPU, else cluster CPUs / actor_cpus).
        actor_cpus: CPUs each actor reserves (its torch threads on CPU).
        shard_size: rows per shard: the unit of work a resumed job keeps.
        extensions: which files a folder walk picks up.
        report_path: JSON-lines file listing each failed file with its code and reason.
        keep_shards: keep the job's directory after the commit.
        progress: show a progress bar on stderr.
    Returns:
        The local indexer's counts plus ``reused`` (rows from an interrupted run's shards).
    Raises:
        InvalidOptionError: bad actor/shard options, or CUDA asked for on a cluster without GPUs.
        JobRunningError: another process runs the same job now.
    """
    import ray

    if shard_size < 1:
        raise InvalidOptionError(f"--shard-size must be >= 1, got {shard_size}")
    if batch_size < 1:
        raise InvalidOptionError(f"--batch-size must be >= 1, got {batch_size}")
    started = time.perf_counter()
    plan = _plan_resources(ray, device=device, actors=actors, actor_cpus=actor_cpus)
    files = list(iter_image_files(paths, extensions=extensions))
    key = job_key(files, fingerprint=embedder.fingerprint, limits=limits)
    summary = RayIndexSummary(files=len(files), job=key)
    job_dir = store.data_dir / JOBS_DIR / key
    job_dir.mkdir(parents=True, exist_ok=True)
    with _job_lock(job_dir):
        todo = _left_to_do(job_dir, files)
        summary.reused = len(files) - len(todo)
        log.info(
            "ray job %s: %d files, %d already in shards, %d actors on %s",
            key,
            len(files),
            summary.reused,
            plan.actors,
            plan.device,
        )
        if todo:
            ds = _pipeline(
                ray, todo, embedder=embedder, embedder_options=embedder_options, limits=limits,
                known=store.known_sha256(with_semantic=store.semantic_dim is not None),
                plan=plan, precision=precision, compile=compile, backend=backend,
                batch_size=batch_size, actor_cpus=actor_cpus,
            )  # fmt: skip
            _write_shards(
                ds, job_dir, embedder=embedder, summary=summary, shard_size=shard_size,
                started=started, progress=progress,
            )  # fmt: skip
        commit_shards(job_dir, store, summary=summary, report_path=report_path)
        if not keep_shards:
            # Under the lock: a second run of the same job cannot start between commit and removal.
            shutil.rmtree(job_dir, ignore_errors=True)
    if not keep_shards:
        with suppress(OSError):
            job_dir.parent.rmdir()  # only when no other job's shards are there
    summary.seconds = time.perf_counter() - started
    summary.report = str(report_path) if report_path is not None else None
    return summary


def _left_to_do(job_dir: Path, files: Sequence[Path]) -> list[tuple[int, str]]:
    """(listing index, path) of the files the job's shards do not hold yet; a killed run's
    half-written shard is removed first."""
    for stale in job_dir.glob("*.tmp-*"):
        stale.unlink(missing_ok=True)
    done = shard_paths(job_dir)
    return [(i, str(path)) for i, path in enumerate(files) if str(path) not in done]


def _pipeline(
    ray: Any,
    todo: Sequence[tuple[int, str]],
    *,
    embedder: Embedder,
    embedder_options: dict[str, Any],
    limits: ImageLimits,
    known: set[str],
    plan: _Plan,
    precision: str,
    compile: bool,
    backend: str,
    batch_size: int,
    actor_cpus: int,
) -> Any:
    """The Ray Data pipeline: listing blocks -> decode tasks -> the embedder actor pool, in order.

    ``known``: the store's content hashes (files with one of them are skipped, not decoded); the
    other arguments as :func:`index_paths_ray`'s.
    """
    import pyarrow as pa

    known_ref = ray.put(SortedDigests.build(known).array)
    block_rows = max(batch_size, math.ceil(len(todo) / _MAX_BLOCKS))
    blocks = [
        pa.table(
            {
                "index": pa.array([i for i, _ in todo[s : s + block_rows]], pa.int64()),
                "path": pa.array([p for _, p in todo[s : s + block_rows]], pa.string()),
            }
        )
        for s in range(0, len(todo), block_rows)
    ]
    ds: Any = ray.data.from_arrow(blocks)  # Ray Data's stubs do not type map_batches with kwargs
    ds = ds.map_batches(
        decode_batch,
        batch_size=None,  # one block = one task
        fn_kwargs={
            "transform": embedder.transform,
            "limits": limits,
            "decode_size": embedder.decode_size,
            "known_ref": known_ref,
        },
        num_cpus=plan.decode_cpus,
        udf_modifying_row_count=False,
    )
    ds = ds.map_batches(
        EmbedderActor,
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        fn_constructor_kwargs={
            "options": embedder_options,
            "device": plan.device,
            "precision": precision,
            "fingerprint": embedder.fingerprint,
            "threads": actor_cpus,
            "compile": compile,
            "backend": backend,
        },
        udf_modifying_row_count=False,
        **plan.resources,
    )
    # Rows come back in listing order, so shards are contiguous runs of the listing and the
    # commit adds in the local indexer's order (the first of two identical files wins).
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    return ds


def _write_shards(
    ds: Any,
    job_dir: Path,
    *,
    embedder: Embedder,
    summary: RayIndexSummary,
    shard_size: int,
    started: float,
    progress: bool,
) -> None:
    """Run the pipeline and write what comes back as shards of ``shard_size`` rows (the last smaller)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from tqdm import tqdm

    schema = _shard_schema(embedder.dim, embedder.fingerprint)
    bar = tqdm(
        total=summary.files,
        initial=summary.reused,
        unit="img",
        disable=not progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    pending: list[Any] = []
    pending_rows = 0
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            table = batch.select([*_COLUMNS, "vector", "semantic"]).cast(schema)
            if not summary.startup_s:
                summary.startup_s = time.perf_counter() - started
            summary.embedded += int(pc.sum(pc.equal(table["status"], "ok")).as_py() or 0)
            pending.append(table)
            pending_rows += table.num_rows
            bar.update(table.num_rows)
            while pending_rows >= shard_size:
                merged = pa.concat_tables(pending)
                _write_shard(job_dir, merged.slice(0, shard_size))
                rest = merged.slice(shard_size)
                pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if pending_rows:
            _write_shard(job_dir, pa.concat_tables(pending))
    finally:
        bar.close()


def run(args: argparse.Namespace, paths: Sequence[str]) -> int:
    """``deepfeat index --engine ray``: returns the process exit code."""
    from deepfeat.runtime import embedder_config, image_limits, open_store
    from deepfeat.scripts.cli_common import settings_from_args

    try:
        ray = import_ray()
    except ImportError as exc:
        sys.stderr.write(f"error [ray_not_installed]: {exc}\n")
        return 2
    settings = settings_from_args(args)
    options = embedder_config(settings).model_dump(mode="json")
    # This process only needs the fingerprint and the preprocessing: the actors do the forward passes.
    # "auto" only ever picks a backend whose vectors mix with PyTorch's (same fingerprint), so that
    # needs no conversion here; a forced backend and precision may change the fingerprint.
    forced = settings.backend != "auto"
    embedder = Embedder(
        **options,
        device="cpu",
        precision=settings.precision if forced else "fp32",
        backend=settings.backend if forced else "torch",
    )
    report_path = args.report or settings.data_dir / "index-report.jsonl"
    verbose = logging.getLogger().isEnabledFor(logging.INFO)
    with open_store(settings, embedder) as store:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            started = connect_ray(ray, address=args.address, verbose=verbose)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            sys.stderr.write(f"error [ray_unreachable]: cannot start or reach Ray at {args.address}: {exc}\n")
            return 2
        try:
            summary = index_paths_ray(
                paths,
                embedder=embedder,
                embedder_options=options,
                store=store,
                limits=image_limits(settings),
                device=settings.device,
                precision=settings.precision,
                compile=settings.compile,
                backend=settings.backend,
                batch_size=settings.batch_size,
                actors=args.actors,
                actor_cpus=args.actor_cpus,
                shard_size=args.shard_size,
                extensions=extensions_from(args.ext),
                report_path=report_path,
                keep_shards=args.keep_shards,
                progress=not args.no_progress,
            )
        finally:
            if started:
                ray.shutdown()
        total = store.count
    detail = f", {summary.reused} from an earlier run's shards; first batch after {summary.startup_s:.1f}s"
    echo_summary(summary, total=total, report_path=report_path, detail=detail)
    return 0
