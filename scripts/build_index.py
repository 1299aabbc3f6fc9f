"""``deepfeat build-index``: build an IVF index generation from a store's catalog within a memory
budget, and publish it for read replicas (``deepfeat serve --read-only``).

The work is :func:`index.build.build_generation` (train on a sample, add shard by shard, merge the
lists on disk, publish atomically); this module parses the flags, shows progress on stderr and prints
a summary (``--json`` for machines) with the build's peak resident memory, so the budget can be
checked against what the process really used.

The build runs in a process of its own (``python -m deepfeat.scripts.build_index``), which imports
only numpy, FAISS and the ``index`` package (~60 MiB resident), so its peak is what ``--max-memory``
bounds whatever process started it. The child is tied to the ``deepfeat`` process that waits for it:
when that one dies, even by SIGKILL, the kernel kills the child (``PR_SET_PDEATHSIG``), so a stopped
command never goes on to publish a generation.

    deepfeat build-index --data-dir data --index IVF4096,PQ32 --max-memory 2GiB
    python -m deepfeat.scripts.build_index --data-dir data --index IVF4096,PQ32 --max-memory 2GiB
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from deepfeat.index.build import build_generation, parse_bytes
from deepfeat.index.errors import StoreError
from deepfeat.index.store import lock_timeout
from deepfeat.scripts.cli_common import echo, echo_json, settings_from_args

__all__ = ["add_arguments", "build", "main", "run"]

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, help="store directory (default: DEEPFEAT_DATA_DIR, else ./data)"
    )
    parser.add_argument(
        "--index",
        required=True,
        metavar="FACTORY",
        help="IVF factory string with 8-bit codes, e.g. IVF4096,PQ32 or OPQ32,IVF16384,PQ32 (not x4fs)",
    )
    parser.add_argument(
        "--max-memory",
        default="2GiB",
        help="peak memory the build may use, e.g. 512MiB or 2GiB (default 2GiB); refused up front if too small",
    )
    parser.add_argument(
        "--sample",
        type=int,
        help="training vectors (default: max(100000, 40 * nlist), fewer if the budget says so)",
    )
    parser.add_argument(
        "--nprobe",
        type=int,
        help="IVF lists replicas search per query (default: the store's policy for nlist)",
    )
    parser.add_argument("--seed", type=int, default=0, help="training sample seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far: ``VmHWM`` from ``/proc/self/status``.

    Not ``getrusage``'s ``ru_maxrss``: Linux carries that across ``exec``, so a child started from the
    torch-laden front-end would report the front-end's size.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # not Linux: best effort


def run(args: argparse.Namespace) -> int:
    """``deepfeat build-index``: the same flags, run by :func:`main` in a lean child process."""
    argv = ["--index", args.index, "--max-memory", args.max_memory, "--seed", str(args.seed)]
    if args.data_dir is not None:
        argv += ["--data-dir", str(args.data_dir)]
    for flag, value in (("--sample", args.sample), ("--nprobe", args.nprobe)):
        if value is not None:
            argv += [flag, str(value)]
    argv += [flag for flag, on in (("--json", args.json), ("--no-progress", args.no_progress)) if on]
    verbosity = ["-" + "v" * min(getattr(args, "verbose", 0), 2)] if getattr(args, "verbose", 0) else []
    sys.stdout.flush()
    return subprocess.run(
        [sys.executable, "-m", "deepfeat.scripts.build_index", *verbosity, *argv],
        check=False,
        preexec_fn=_dies_with(os.getpid()) if sys.platform == "linux" else None,
    ).returncode


_PR_SET_PDEATHSIG = 1


def _dies_with(parent: int) -> Callable[[], None]:
    """Run in the child before exec: ask the kernel for SIGKILL when the parent dies, and exit at once
    if it already died between fork and here (the request would then never fire)."""

    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(1)

    return arm


def build(args: argparse.Namespace) -> int:
    """Build and publish in this process; prints the summary."""
    settings = settings_from_args(args)
    budget = parse_bytes(args.max_memory)
    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if args.no_progress:
            return
        bar = bars.get(stage)
        if bar is None:
            unit = "shard" if stage == "merge" else "vec"
            bar = bars[stage] = tqdm(
                total=total, desc=stage, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False
            )
        bar.n = done
        bar.refresh()

    try:
        with lock_timeout(settings.lock_timeout_s):  # the publish takes the store's lock
            info = build_generation(
                settings.data_dir,
                factory=args.index,
                max_memory_bytes=budget,
                sample=args.sample,
                search_params=None if args.nprobe is None else {"nprobe": args.nprobe},
                seed=args.seed,
                progress=progress,
            )
    finally:
        for bar in bars.values():
            bar.close()
    peak = peak_rss_bytes()
    summary = {
        "generation": info.number,
        "factory": info.factory,
        "count": info.count,
        "dim": info.dim,
        "max_seq": info.max_seq,
        "files": {info.file: info.size, info.data_file: info.data_size},
        "budget_bytes": budget,
        "peak_rss_bytes": peak,
        "build": info.build,
        "previous": info.previous.number if info.previous is not None else None,
        "data_dir": str(settings.data_dir),
    }
    if args.json:
        echo_json(summary)
        return 0
    mib = 2**20
    build = info.build
    echo(
        f"published generation {info.number}: {info.count} vectors, {info.factory}, "
        f"{(info.size + info.data_size) / mib:.1f} MiB on disk, in {build.get('seconds', 0):.1f} s "
        f"(train {build.get('train_s', 0):.1f} s on {build.get('trained_on')} vectors, "
        f"add {build.get('add_s', 0):.1f} s in {build.get('shards')} shard(s), merge {build.get('merge_s', 0):.1f} s)"
    )
    echo(f"peak memory {peak / mib:.0f} MiB of a {budget / mib:.0f} MiB budget")
    echo(
        "read replicas (deepfeat serve --read-only) pick it up at their next refresh"
        + (f"; generation {info.previous.number} is kept until the next publish" if info.previous else "")
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deepfeat.scripts.build_index",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return build(args)
    except StoreError as exc:
        sys.stderr.write(f"error [{exc.code}]: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; the published generation is unchanged\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
