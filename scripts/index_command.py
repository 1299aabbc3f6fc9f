"""``deepfeat index``: its flags and its entry point, kept apart from the indexing engines so that
the command's ``--help`` (and the CLI's start-up) loads no torch; the engines are imported when it runs.

    deepfeat index PATH... [--from-list FILE] [--engine local|ray] ...
    python -m deepfeat.scripts.index_command PATH ...
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from deepfeat.scripts.cli_common import add_setting_arguments

if TYPE_CHECKING:
    from deepfeat.index.store import ImageStore
    from deepfeat.scripts.index_images import IndexSummary

__all__ = [
    "DEFAULT_EXTENSIONS",
    "add_arguments",
    "echo_summary",
    "extensions_from",
    "input_paths",
    "main",
    "run",
]

DEFAULT_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".mpo"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The indexer's flags; shared by ``deepfeat index`` and ``python -m deepfeat.scripts.index_command``."""
    parser.add_argument("paths", nargs="*", help="image files and folders (walked recursively)")
    parser.add_argument(
        "--from-list",
        type=Path,
        metavar="FILE",
        help="also index the paths listed in FILE, one per line (blank lines and # comments skipped)",
    )
    parser.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local (DataLoader workers, this process embeds) or ray (Ray Data: decode tasks, an actor "
        "pool of embedders, resumable shards; needs deepfeat[ray])",
    )
    parser.add_argument(
        "--address", help="ray: cluster address (ray://..., HOST:PORT or auto); default a local Ray"
    )
    parser.add_argument(
        "--actors", type=int, help="ray: embedder actors (default: one per GPU, else CPUs / --actor-cpus)"
    )
    parser.add_argument(
        "--actor-cpus", type=int, default=1, help="ray: CPUs (torch threads) per CPU embedder actor"
    )
    parser.add_argument(
        "--shard-size", type=int, default=1024, help="ray: rows per shard (the unit a resumed job reuses)"
    )
    parser.add_argument(
        "--keep-shards", action="store_true", help="ray: keep the job's shards after the commit"
    )
    add_setting_arguments(parser, ("batch_size", "workers"))
    parser.add_argument(
        "--ext",
        default=",".join(sorted(ext.lstrip(".") for ext in DEFAULT_EXTENSIONS)),
        help="comma-separated extensions picked up when walking folders",
    )
    parser.add_argument(
        "--report", type=Path, help="failed-files report (default DATA_DIR/index-report.jsonl)"
    )
    parser.add_argument(
        "--gpu-decode",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode JPEGs with nvJPEG on the GPU (default: when the model runs on CUDA)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def extensions_from(text: str) -> frozenset[str]:
    """``--ext jpg,PNG,.webp`` -> ``{".jpg", ".png", ".webp"}`` (what a folder walk picks up)."""
    return frozenset("." + ext.strip().lower().lstrip(".") for ext in text.split(",") if ext.strip())


def input_paths(args: argparse.Namespace) -> list[str]:
    """The positional paths plus those of ``--from-list`` (a manifest of paths, one per line)."""
    paths = [str(p) for p in args.paths]
    if getattr(args, "from_list", None) is not None:
        text = args.from_list.read_text(encoding="utf-8")
        paths += [s for line in text.splitlines() if (s := line.strip()) and not s.startswith("#")]
    return paths


def run(args: argparse.Namespace) -> int:
    """Run the indexer from parsed CLI arguments; returns the process exit code."""
    from deepfeat.index.errors import StoreError
    from deepfeat.runtime import build_embedder, image_limits, open_store
    from deepfeat.scripts.cli_common import settings_from_args

    if not args.paths and getattr(args, "from_list", None) is None:
        sys.stderr.write("error [no_inputs]: give image files/folders, or --from-list FILE\n")
        return 2
    try:
        paths = input_paths(args)
    except OSError as exc:
        sys.stderr.write(f"error [unreadable_list]: cannot read {args.from_list}: {exc.strerror or exc}\n")
        return 2
    missing = [str(p) for p in args.paths if not os.path.exists(p)]
    if missing:  # a mistyped folder fails here, before a model loads or a store is created
        sys.stderr.write(
            f"error [not_found]: no such file or folder: {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "\n"
        )
        return 2
    if getattr(args, "engine", "local") == "ray":
        from deepfeat.scripts import index_ray

        return index_ray.run(args, paths)
    from deepfeat.scripts.index_images import index_paths

    settings = settings_from_args(args)
    embedder = build_embedder(settings)
    report_path = args.report or settings.data_dir / "index-report.jsonl"
    store = open_store(settings, embedder)
    before = store.committed_count()
    try:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        summary = index_paths(
            paths,
            embedder=embedder,
            store=store,
            limits=image_limits(settings),
            batch_size=settings.batch_size,
            workers=settings.workers,
            extensions=extensions_from(args.ext),
            report_path=report_path,
            progress=not args.no_progress,
            gpu_decode=getattr(args, "gpu_decode", None),
        )
        store.snapshot()  # part of success: a snapshot that fails is not a finished run
    except StoreError as exc:
        # Every acknowledged add is in the catalog; say how many, in the one line the CLI prints.
        total = _committed(store)
        store.close(snapshot=False)
        sys.stderr.write(
            f"error [{exc.code}]: {exc}; {total - before} images were committed before it and the store "
            f"holds {total} (a re-run resumes)\n"
        )
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the deepfeat command turns it into this)
        # Stop without a final snapshot: an add may have been cut between its commit and the index
        # update, and the next open reconciles the index with the catalog exactly.
        total = _committed(store)
        store.close(snapshot=False)
        sys.stderr.write(
            f"interrupted: {total - before} images were committed and the store holds {total} "
            "(a re-run resumes)\n"
        )
        return 130
    except BaseException:
        store.close()
        raise
    total = store.count
    store.close()
    echo_summary(summary, total=total, report_path=report_path)
    return 0


def echo_summary(summary: IndexSummary, *, total: int, report_path: Path, detail: str = "") -> None:
    """The closing lines of ``deepfeat index``, either engine (``bench ray`` reads its figures from the
    first); ``detail`` goes after the embedding rate."""
    from deepfeat.scripts.cli_common import echo

    echo(
        f"indexed {summary.indexed}, already present {summary.already_present}, failed {summary.failed} "
        f"of {summary.files} files in {summary.seconds:.1f}s ({summary.images_per_s:.1f} images/s embedded"
        f"{detail}); store now holds {total} images"
    )
    stages = summary.stages
    if summary.embedded and any(stages.values()):
        echo(
            f"time in the loop: waiting for decoded images {stages['decode_wait']:.1f}s, "
            f"model {stages['model']:.1f}s, store {stages['commit']:.1f}s"
        )
    if summary.failed:
        echo(f"failures listed in {report_path}")


def _committed(store: ImageStore) -> int:
    """The catalog's count, which a re-run will find; the searchable count if the catalog cannot be
    read either (the failure being reported may be the catalog's own)."""
    from deepfeat.index.errors import StoreError

    try:
        return store.committed_count()
    except StoreError:
        return store.count


def main(argv: Sequence[str] | None = None) -> int:
    from deepfeat.scripts.cli_common import add_common_arguments

    parser = argparse.ArgumentParser(
        prog="index_images", description=__doc__.splitlines()[0] if __doc__ else None
    )
    add_common_arguments(parser)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
