"""Batch indexer: files and folders -> decode in threads -> batched embeddings -> the store.

A reader -> mapper -> writer pipeline (after clip-retrieval): a pool of threads (or, when asked, a
torch DataLoader's worker processes) reads, hashes, decodes (at the size the model needs) and
preprocesses each file; the main thread embeds full batches and commits each batch to the store, so
a crash loses at most the batch in flight and a re-run skips everything already committed without
decoding or embedding it again.

Bad files never stop a run: each is logged, counted and written to a JSON-lines report with its
stable error code and reason.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from deepfeat.index.store import ImageStore, NewImage
from deepfeat.models.embedder import Embedder
from deepfeat.models.errors import ImageError
from deepfeat.models.images import (
    ImageLimits,
    decode_jpegs,
    load_image,
    make_thumbnail,
    probe_image,
    thumbnail_from_tensor,
)
from deepfeat.scripts.index_command import DEFAULT_EXTENSIONS

__all__ = [
    "IndexSummary",
    "index_paths",
    "iter_image_files",
    "prepare_file",
]

log = logging.getLogger(__name__)

STAGES = ("decode_wait", "model", "commit")
"""Where the indexing loop's main thread spends its time (:attr:`IndexSummary.stages`)."""


def iter_image_files(
    paths: Iterable[str | os.PathLike[str]], *, extensions: frozenset[str]
) -> Iterator[Path]:
    """Files named on the command line are always tried; folders are walked recursively (sorted, so
    runs are reproducible), keeping files with an image extension and skipping hidden entries."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith(".") and Path(name).suffix.lower() in extensions:
                        yield Path(root) / name
        else:
            yield path


@dataclass
class _Item:
    """What a worker sends back for one file (small: the decoded image stays in the worker)."""

    path: str
    status: str  # "ok" | "present" | "failed"
    sha256: str = ""
    tensor: torch.Tensor | None = None
    width: int = 0
    height: int = 0
    nbytes: int = 0
    thumbnail: bytes | None = None
    code: str = ""
    reason: str = ""
    data: bytes | None = None  # a JPEG left for the GPU to decode (then tensor and thumbnail are None)


class _FileDataset(Dataset[_Item]):
    """The files, each prepared by ``prepare`` (:func:`prepare_file` with the run's options bound)."""

    def __init__(self, files: Sequence[Path], prepare: Callable[[Path], _Item]) -> None:
        self.files = files
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> _Item:
        return self.prepare(self.files[i])


def prepare_file(
    path: Path,
    *,
    transform: Callable[[Image.Image], torch.Tensor],
    limits: ImageLimits,
    decode_size: tuple[int, int],
    known_sha256: Container[str],
    gpu_decode: bool = False,
) -> _Item:
    """Read, hash, decode and preprocess one file: the one per-file path of every indexing engine
    (the local DataLoader workers and scripts/index_ray.py's Ray tasks), so both skip, decode and
    fail identically. Never raises for a bad file: the failure comes back with its code and reason.

    ``gpu_decode``: a complete JPEG is only probed here (header checks, no pixels) and its bytes go
    back for :func:`_decode_on_gpu`; anything else is decoded here as usual."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return _Item(
            str(path), "failed", code="unreadable", reason=f"cannot read the file: {exc.strerror or exc}"
        )
    sha = hashlib.sha256(data).hexdigest()
    if sha in known_sha256:
        # Resuming: hashing is all it costs; no decode, no forward pass.
        return _Item(str(path), "present", sha256=sha, nbytes=len(data))
    if gpu_decode:
        try:
            probed = probe_image(data, limits=limits, sha256=sha)
        except ImageError as exc:
            return _Item(str(path), "failed", sha256=sha, nbytes=len(data), code=exc.code, reason=str(exc))
        if probed.gpu_decodable:
            width, height = probed.upright_size
            return _Item(str(path), "ok", sha256=sha, width=width, height=height, nbytes=len(data), data=data)
    try:
        tensor, thumb, (width, height) = _decode_on_cpu(data, transform, limits, decode_size, sha)
    except ImageError as exc:
        return _Item(str(path), "failed", sha256=sha, nbytes=len(data), code=exc.code, reason=str(exc))
    return _Item(
        str(path),
        "ok",
        sha256=sha,
        tensor=tensor,
        width=width,
        height=height,
        nbytes=len(data),
        thumbnail=thumb,
    )


def _decode_on_cpu(
    data: bytes,
    transform: Callable[[Image.Image], torch.Tensor],
    limits: ImageLimits,
    decode_size: tuple[int, int],
    sha256: str | None = None,
) -> tuple[torch.Tensor, bytes, tuple[int, int]]:
    """The CPU path for one file: the model's input, the thumbnail and the upright full size.

    Raises:
        ImageError: with the code the report records.
    """
    loaded = load_image(data, limits=limits, draft_size=decode_size, sha256=sha256)
    return transform(loaded.image), make_thumbnail(loaded.image), loaded.upright_size


def _collate(items: list[_Item]) -> list[_Item]:
    return items


def _decode_on_gpu(items: Sequence[_Item], *, embedder: Embedder, limits: ImageLimits) -> None:
    """Decode, resize and thumbnail the JPEGs the workers left as bytes, on the embedder's GPU
    (nvJPEG: a 12 MP photo never crosses PCIe as pixels). A file nvJPEG refuses is decoded by the
    CPU loader instead, which either succeeds or fails it with the same code as the CPU path."""
    pending = [item for item in items if item.data is not None]
    if not pending:
        return
    decoded = decode_jpegs([item.data for item in pending if item.data is not None], embedder.device)
    for item, pixels in zip(pending, decoded, strict=True):
        data, item.data = item.data, None
        try:
            if pixels is not None:
                item.tensor = embedder.transform(pixels)
                item.thumbnail = thumbnail_from_tensor(pixels)
            else:
                assert data is not None
                item.tensor, item.thumbnail, _ = _decode_on_cpu(
                    data, embedder.transform, limits, embedder.decode_size, item.sha256
                )
        except ImageError as exc:
            item.status, item.code, item.reason = "failed", exc.code, str(exc)


@dataclass
class IndexSummary:
    files: int = 0
    indexed: int = 0
    already_present: int = 0
    failed: int = 0
    embedded: int = 0
    seconds: float = 0.0
    report: str | None = None
    failures: list[dict[str, str]] = field(default_factory=list)
    # Seconds of the loop's main thread: waiting for decoded batches, in the model, in store.add.
    stages: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["images_per_s"] = round(self.images_per_s, 2)
        out["stages"] = {name: round(seconds, 3) for name, seconds in self.stages.items()}
        out.pop("failures")
        return out


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(device_type: str) -> int:
    """Decode worker processes when none are asked for. On CPU none: threads of this process decode
    the next batch at idle priority while the model, with every core, runs this one (see
    :class:`ThreadLoader`). With CUDA the GPU is the model, so all cores but the one feeding it decode in processes (capped: past
    ~8, one GPU no longer waits for JPEGs)."""
    if device_type == "cuda":
        return max(1, min(8, _cpu_count() - 1))
    return 0


def index_paths(
    paths: Sequence[str | os.PathLike[str]],
    *,
    embedder: Embedder,
    store: ImageStore,
    limits: ImageLimits,
    batch_size: int = 32,
    workers: int | None = None,
    extensions: frozenset[str] = DEFAULT_EXTENSIONS,
    report_path: Path | None = None,
    progress: bool = True,
    gpu_decode: bool | None = None,
) -> IndexSummary:
    """Index every image under ``paths`` into ``store``.

    Args:
        paths: files and folders; folders are walked recursively.
        embedder: must match the store's fingerprint (the store refused otherwise when opened).
        store: an open, writable ImageStore.
        limits: the same image limits the service applies, so a file that indexes is one that searches.
        batch_size: images per forward pass and per store commit.
        workers: decode worker processes (0: threads of this process decode; None: see ``default_workers``).
        extensions: which files a folder walk picks up.
        report_path: JSON-lines file listing each failed file with its code and reason.
        progress: show a progress bar on stderr.
        gpu_decode: decode JPEGs on the embedder's device, with nvJPEG on CUDA (None: whenever the
            model runs on CUDA). On a CPU it only moves JPEG decoding from the workers to this process
            (no DCT scaling: slower; the tests use it to run this path without a GPU).
    Returns:
        Counts, timing and the failures.
    """
    started = time.perf_counter()
    if workers is None:
        workers = default_workers(embedder.device.type)
    if gpu_decode is None:
        gpu_decode = embedder.device.type == "cuda"
    files = list(iter_image_files(paths, extensions=extensions))
    summary = IndexSummary(files=len(files))
    loader = _loader(
        files,
        embedder=embedder,
        # A store keeping semantic vectors re-embeds known files that lack one (add() fills it in).
        known_sha256=frozenset(
            store.known_sha256(
                with_semantic=embedder.semantic_dim is not None and store.semantic_dim is not None
            )
        ),
        limits=limits,
        batch_size=batch_size,
        workers=workers,
        gpu_decode=gpu_decode,
    )
    report = report_path.open("w", encoding="utf-8") if report_path is not None else None
    bar = tqdm(total=len(files), unit="img", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    try:
        with _model_threads(embedder, workers=workers):
            batches = iter(loader)
            while True:
                waited = time.perf_counter()
                items = next(batches, None)
                summary.stages["decode_wait"] += time.perf_counter() - waited
                if items is None:
                    break
                if gpu_decode:
                    _decode_on_gpu(items, embedder=embedder, limits=limits)
                _tally_skipped(items, summary, report)
                ok = [item for item in items if item.status == "ok"]
                if ok:
                    _embed_and_add(ok, embedder=embedder, store=store, summary=summary)
                bar.update(len(items))
                elapsed = time.perf_counter() - started
                bar.set_postfix(
                    indexed=summary.indexed,
                    failed=summary.failed,
                    emb_per_s=f"{summary.embedded / elapsed:.1f}",
                )
    finally:
        bar.close()
        if report is not None:
            report.close()
    summary.seconds = time.perf_counter() - started
    summary.report = str(report_path) if report_path is not None else None
    return summary


def _loader(
    files: Sequence[Path],
    *,
    embedder: Embedder,
    known_sha256: frozenset[str],
    limits: ImageLimits,
    batch_size: int,
    workers: int,
    gpu_decode: bool,
) -> Iterable[list[_Item]]:
    """Batches of prepared files (lists of :class:`_Item`): decoded by ``workers`` processes when
    there are any, else by a thread per core in this process."""
    prepare = functools.partial(
        prepare_file,
        transform=embedder.transform,
        limits=limits,
        decode_size=embedder.decode_size,
        known_sha256=known_sha256,
        gpu_decode=gpu_decode,
    )
    if workers == 0:
        # The next batch decodes while the model runs this one. With a CPU model the decoders run
        # at idle priority: they take the cores the model leaves idle (between its parallel
        # regions, during commits) and all of them when the model waits for its batch.
        cpu = embedder.device.type == "cpu"
        return ThreadLoader(files, prepare, batch_size=batch_size, threads=_cpu_count(), ahead=1, idle=cpu)
    return DataLoader(
        _FileDataset(files, prepare),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=2 if workers > 0 else None,
        pin_memory=False,
    )


class ThreadLoader:
    """Batches of ``prepare(file)`` results in file order, prepared by a pool of threads in this
    process (Pillow, hashlib and torch release the GIL while they decode, hash and convert).

    ``ahead``: batches prepared while the caller works on the current one (0: the phases
    alternate, every thread decoding a batch and then the caller's model having every core).

    ``idle``: the threads run at the scheduler's idle priority. A decoder sharing a core on equal
    terms with an OpenMP team stalls the whole team at each barrier; at idle priority it only gets
    the cycles the team leaves, so the split of the cores between decoding and the model follows
    their costs as the run goes, with no fixed share for either (docs/performance.md has the
    measurements against alternating phases, equal priority and decode processes).
    """

    def __init__(
        self,
        files: Sequence[Path],
        prepare: Callable[[Path], _Item],
        *,
        batch_size: int,
        threads: int,
        ahead: int = 0,
        idle: bool = False,
    ) -> None:
        self.files = files
        self.idle = idle
        self.prepare = prepare
        self.batch_size = batch_size
        self.threads = max(1, threads)
        self.ahead = max(0, ahead)

    def __len__(self) -> int:
        return -(-len(self.files) // self.batch_size)

    def __iter__(self) -> Iterator[list[_Item]]:
        starts = iter(range(0, len(self.files), self.batch_size))
        pool = ThreadPoolExecutor(
            self.threads,
            thread_name_prefix="deepfeat-decode",
            initializer=_idle_thread if self.idle else None,
        )
        pending: deque[list[Future[_Item]]] = deque()

        def submit() -> None:
            start = next(starts, None)
            if start is not None:
                batch = self.files[start : start + self.batch_size]
                pending.append([pool.submit(self.prepare, path) for path in batch])

        try:
            for _ in range(self.ahead + 1):
                submit()
            while pending:
                items = [future.result() for future in pending.popleft()]
                if self.ahead:
                    submit()
                yield items
                if not self.ahead:
                    submit()
        finally:
            # Stopped early (an error, Ctrl-C): drop what has not started; running decodes finish.
            pool.shutdown(wait=True, cancel_futures=True)


def _idle_thread() -> None:
    """Run the calling thread only on cores nothing else wants (Linux ``SCHED_IDLE``, per thread)."""
    # Not Linux, or not allowed: the thread stays an ordinary one.
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


@contextmanager
def _model_threads(embedder: Embedder, *, workers: int) -> Iterator[None]:
    """On CPU with decode worker processes, fewer torch threads for the run; restored after it."""
    threads = torch.get_num_threads()
    if embedder.device.type == "cpu" and workers > 0:
        # Leave the decode workers their cores: oneDNN's threads spin while they wait, so a model
        # thread sharing a core with a decoder slows both.
        torch.set_num_threads(max(1, _cpu_count() - workers))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _tally_skipped(items: Sequence[_Item], summary: IndexSummary, report: IO[str] | None) -> None:
    """Count the files already in the store; count, log and report the failed ones (written and
    flushed as they come, so a killed run's report still lists what it saw)."""
    for item in items:
        if item.status == "present":
            summary.already_present += 1
        elif item.status == "failed":
            summary.failed += 1
            failure = {"path": item.path, "code": item.code, "reason": item.reason}
            summary.failures.append(failure)
            log.warning("skipped %s: %s (%s)", item.path, item.reason, item.code)
            if report is not None:
                report.write(json.dumps(failure) + "\n")
                report.flush()


def _embed_and_add(
    ok: Sequence[_Item], *, embedder: Embedder, store: ImageStore, summary: IndexSummary
) -> None:
    """Embed one batch of decoded files and commit it to the store."""
    started = time.perf_counter()
    # Tensors may differ in size (full-image mode): the embedder batches equal shapes.
    # (n, vectors_per_image, dim): each image's global vector, then its regional ones
    tensors = [item.tensor for item in ok if item.tensor is not None]
    semantic = None
    if embedder.semantic_dim is not None and store.semantic_dim is not None:
        # The semantic vectors (n, d_s) come from the same forward passes.
        vectors, semantic = embedder.embed_tensors(tensors, regions=True, semantic=True)
    else:
        vectors = embedder.embed_tensors(tensors, regions=True)
    embedded = time.perf_counter()
    summary.stages["model"] += embedded - started
    summary.embedded += len(ok)
    results = store.add(
        vectors,
        [
            NewImage(
                sha256=item.sha256,
                source=item.path,
                width=item.width,
                height=item.height,
                nbytes=item.nbytes,
                thumbnail=item.thumbnail,
            )
            for item in ok
        ],
        semantic=semantic,
    )
    summary.stages["commit"] += time.perf_counter() - embedded
    created = sum(result.created for result in results)
    summary.indexed += created
    # The same content twice in one run: the second copy maps to the first id.
    summary.already_present += len(results) - created
