"""Batch indexer: files and folders -> decode in worker processes -> batched embeddings -> the store.

A reader -> mapper -> writer pipeline (after clip-retrieval): a torch DataLoader's worker processes
read, hash, decode (at the size the model needs) and preprocess each file; the main process embeds
full batches and commits each batch to the store, so a crash loses at most the batch in flight and a
re-run skips everything already committed without decoding or embedding it again.

Bad files never stop a run: each is logged, counted and written to a JSON-lines report with its
stable error code and reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from index.store import ImageStore, NewImage
from models.embedder import Embedder
from models.errors import ImageError
from models.images import ImageLimits, load_image, make_thumbnail

__all__ = ["IndexSummary", "index_paths", "iter_image_files", "main", "DEFAULT_EXTENSIONS"]

log = logging.getLogger(__name__)

DEFAULT_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".mpo"})


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


class _FileDataset(Dataset[_Item]):
    def __init__(
        self,
        files: Sequence[Path],
        *,
        transform: Callable[[Image.Image], torch.Tensor],
        limits: ImageLimits,
        decode_size: tuple[int, int],
        known_sha256: frozenset[str],
    ) -> None:
        self.files = files
        self.transform = transform
        self.limits = limits
        self.decode_size = decode_size
        self.known = known_sha256

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> _Item:
        path = self.files[i]
        try:
            data = path.read_bytes()
        except OSError as exc:
            return _Item(
                str(path), "failed", code="unreadable", reason=f"{type(exc).__name__}: {exc.strerror or exc}"
            )
        sha = hashlib.sha256(data).hexdigest()
        if sha in self.known:
            # Resuming: hashing is all it costs; no decode, no forward pass.
            return _Item(str(path), "present", sha256=sha, nbytes=len(data))
        try:
            loaded = load_image(data, limits=self.limits, draft_size=self.decode_size)
            tensor = self.transform(loaded.image)
            thumb = make_thumbnail(loaded.image)
        except ImageError as exc:
            return _Item(str(path), "failed", sha256=sha, nbytes=len(data), code=exc.code, reason=str(exc))
        return _Item(
            str(path),
            "ok",
            sha256=sha,
            tensor=tensor,
            width=loaded.upright_size[0],
            height=loaded.upright_size[1],
            nbytes=len(data),
            thumbnail=thumb,
        )


def _collate(items: list[_Item]) -> list[_Item]:
    return items


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

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["images_per_s"] = round(self.images_per_s, 2)
        out.pop("failures")
        return out


def index_paths(
    paths: Sequence[str | os.PathLike[str]],
    *,
    embedder: Embedder,
    store: ImageStore,
    limits: ImageLimits,
    batch_size: int = 32,
    workers: int = 2,
    extensions: frozenset[str] = DEFAULT_EXTENSIONS,
    report_path: Path | None = None,
    progress: bool = True,
) -> IndexSummary:
    """Index every image under ``paths`` into ``store``.

    Args:
        paths: files and folders; folders are walked recursively.
        embedder: must match the store's fingerprint (the store refused otherwise when opened).
        store: an open, writable ImageStore.
        limits: the same image limits the service applies, so a file that indexes is one that searches.
        batch_size: images per forward pass and per store commit.
        workers: decode worker processes (0 decodes in this process).
        extensions: which files a folder walk picks up.
        report_path: JSON-lines file listing each failed file with its code and reason.
        progress: show a progress bar on stderr.
    Returns:
        Counts, timing and the failures.
    """
    started = time.perf_counter()
    files = list(iter_image_files(paths, extensions=extensions))
    summary = IndexSummary(files=len(files))
    dataset = _FileDataset(
        files,
        transform=embedder.transform,
        limits=limits,
        decode_size=embedder.decode_size,
        known_sha256=frozenset(store.known_sha256()),
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=2 if workers > 0 else None,
        pin_memory=False,
    )
    report = report_path.open("w", encoding="utf-8") if report_path is not None else None
    bar = tqdm(total=len(files), unit="img", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    try:
        for items in loader:
            ok = [item for item in items if item.status == "ok"]
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
            if ok:
                # Tensors may differ in size (full-image mode): the embedder batches equal shapes.
                vectors = embedder.embed_tensors([item.tensor for item in ok if item.tensor is not None])
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
                )
                created = sum(result.created for result in results)
                summary.indexed += created
                # The same content twice in one run: the second copy maps to the first id.
                summary.already_present += len(results) - created
            bar.update(len(items))
            elapsed = time.perf_counter() - started
            bar.set_postfix(
                indexed=summary.indexed, failed=summary.failed, emb_per_s=f"{summary.embedded / elapsed:.1f}"
            )
    finally:
        bar.close()
        if report is not None:
            report.close()
    summary.seconds = time.perf_counter() - started
    summary.report = str(report_path) if report_path is not None else None
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The indexer's flags; shared by ``deepfeat index`` and ``python -m scripts.index_images``."""
    parser.add_argument("paths", nargs="+", help="image files and folders (walked recursively)")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default 32)")
    parser.add_argument("--workers", type=int, help="decode worker processes (default 2)")
    parser.add_argument(
        "--ext",
        default=",".join(sorted(ext.lstrip(".") for ext in DEFAULT_EXTENSIONS)),
        help="comma-separated extensions picked up when walking folders",
    )
    parser.add_argument(
        "--report", type=Path, help="failed-files report (default DATA_DIR/index-report.jsonl)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the indexer from parsed CLI arguments; returns the process exit code."""
    from app.runtime import build_embedder, image_limits, open_store
    from scripts.cli_common import echo, settings_from_args

    settings = settings_from_args(args)
    embedder = build_embedder(settings)
    report_path = args.report or settings.data_dir / "index-report.jsonl"
    with open_store(settings, embedder) as store:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        summary = index_paths(
            args.paths,
            embedder=embedder,
            store=store,
            limits=image_limits(settings),
            batch_size=settings.batch_size,
            workers=settings.workers,
            extensions=frozenset(
                "." + ext.strip().lower().lstrip(".") for ext in args.ext.split(",") if ext.strip()
            ),
            report_path=report_path,
            progress=not args.no_progress,
        )
        total = store.count
    echo(
        f"indexed {summary.indexed}, already present {summary.already_present}, failed {summary.failed} "
        f"of {summary.files} files in {summary.seconds:.1f}s ({summary.images_per_s:.1f} images/s embedded); "
        f"store now holds {total} images"
    )
    if summary.failed:
        echo(f"failures listed in {report_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from scripts.cli_common import add_common_arguments

    parser = argparse.ArgumentParser(
        prog="index_images", description=__doc__.splitlines()[0] if __doc__ else None
    )
    add_common_arguments(parser)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
