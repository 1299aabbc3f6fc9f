"""Ray engine benchmark: ``deepfeat index --engine ray`` against the local indexer, same photos, same run.

Both sides run as fresh ``deepfeat index`` processes on the same files with the same model options and
this machine's CPUs (the Ray side starts its own local Ray with all of them), alternating which goes
first on each repeat. Two figures per side: the whole command (interpreter start, model load, Ray start,
decode, embed, commit, exit) and the indexer's own seconds as it reports them (for Ray: listing, the
Ray Data pipeline including actor start-up, shards and commit; not ``ray.init``). The ratio of the two
sides is the overhead of going through Ray on one machine, which is what a cluster has to amortise;
with several ``--sizes`` the marginal images/s between the smallest and largest run (whole-command
time difference, so interpreter, model, Ray and actor start-up cancel out) separates that fixed cost
from the per-image rate.

    deepfeat bench ray --sizes 120,400 --repeats 3
    deepfeat bench ray --sizes 120

Prints medians and ratios; ``--json`` writes everything. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from deepfeat.scripts.bench_common import begin, deepfeat_command, echo, table
from deepfeat.scripts.bench_extract import MATCHED, make_photo_set
from deepfeat.scripts.bench_machine import machine

__all__ = ["main", "run_once"]

_REPORTED = re.compile(r"of (\d+) files in ([\d.]+)s")
_STARTUP = re.compile(r"first batch after ([\d.]+)s")


def run_once(photos: Path, data_dir: Path, *, engine: str, extra: list[str]) -> dict[str, float]:
    """One fresh ``deepfeat index`` process: wall seconds, and the seconds the indexer reports."""
    cmd = deepfeat_command(
        "index", str(photos), "--data-dir", str(data_dir), "--engine", engine, "--no-progress", *extra
    )
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{engine} run failed ({done.returncode}): {done.stderr[-2000:]}")
    match = _REPORTED.search(done.stdout)
    if match is None:
        raise RuntimeError(f"no summary in the {engine} run's output: {done.stdout[-500:]}")
    row = {"files": float(match.group(1)), "wall_s": wall, "indexer_s": float(match.group(2))}
    startup = _STARTUP.search(done.stdout)
    if startup is not None:  # the ray engine: seconds until its actors returned the first batch
        row["startup_s"] = float(startup.group(1))
    return row


def _summarise(engine: str, n: int, results: list[dict[str, float]]) -> dict[str, Any]:
    wall = statistics.median(r["wall_s"] for r in results)
    indexer = statistics.median(r["indexer_s"] for r in results)
    startups = [r["startup_s"] for r in results if "startup_s" in r]
    return {
        "engine": engine,
        "images": n,
        "wall_s": round(wall, 2),
        "wall_img_s": round(n / wall, 2),
        "indexer_s": round(indexer, 2),
        "indexer_img_s": round(n / indexer, 2),
        "first_batch_s": round(statistics.median(startups), 2) if startups else "",
        "repeats": len(results),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepfeat bench ray",
        description=(__doc__ or "").split("\n\n")[0].replace("``", "`"),
    )
    parser.add_argument(
        "--sizes",
        default="120",
        help="photo counts, e.g. 120,400; with two or more, the marginal images/s between the smallest and "
        "the largest (the rate once fixed costs are paid) is reported too (default 120)",
    )
    parser.add_argument(
        "--photo-dir", type=Path, default=Path(tempfile.gettempdir()) / "deepfeat-bench-photos"
    )
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--repeats", type=int, default=1, help="runs per engine and size (medians reported)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="the retrieval defaults (full image, 3 scales) instead of one 224 px crop (penultimate layer)",
    )
    parser.add_argument("--ray-args", default="", help="extra flags for the ray side, e.g. '--actors 1'")
    parser.add_argument("--json", type=Path, help="write all results here")
    return parser


def _run_all(
    args: argparse.Namespace, sizes: list[int], all_files: list[Path], tmp: Path
) -> tuple[dict[str, list[dict[str, float]]], list[dict[str, Any]]]:
    """Every size, repeat and engine (alternating which goes first); the raw runs and their medians."""
    common = [
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        *([] if args.defaults else MATCHED),
    ]
    runs: dict[str, list[dict[str, float]]] = {}
    rows: list[dict[str, Any]] = []
    for n in sizes:
        # A folder of exactly these files (the photo dir may hold more from other runs).
        folder = tmp / f"photos-{n}"
        folder.mkdir()
        for path in all_files[:n]:
            (folder / path.name).symlink_to(path.resolve())
        for repeat in range(args.repeats):
            order = ["local", "ray"] if repeat % 2 == 0 else ["ray", "local"]
            for engine in order:
                extra = common + (args.ray_args.split() if engine == "ray" else [])
                result = run_once(folder, tmp / f"{engine}-{n}-{repeat}", engine=engine, extra=extra)
                if result["files"] != n:
                    raise RuntimeError(f"{engine} saw {result['files']:.0f} files, expected {n}")
                runs.setdefault(f"{engine}-{n}", []).append(result)
                sys.stderr.write(f"{n} photos, repeat {repeat + 1}/{args.repeats}, {engine}: {result}\n")
        rows += [_summarise(engine, n, runs[f"{engine}-{n}"]) for engine in ("local", "ray")]
    return runs, rows


def _compare(rows: list[dict[str, Any]], sizes: list[int]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Ray's time over the local engine's per size, and each engine's marginal images/s between the
    smallest and the largest size (whole-command times, so the fixed costs cancel)."""
    by = {(row["engine"], row["images"]): row for row in rows}
    overhead = [
        {
            "images": n,
            "wall_ratio": round(by["ray", n]["wall_s"] / by["local", n]["wall_s"], 2),
            "indexer_ratio": round(by["ray", n]["indexer_s"] / by["local", n]["indexer_s"], 2),
        }
        for n in sizes
    ]
    marginal: dict[str, float] = {}
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        for engine in ("local", "ray"):
            extra_s = by[engine, hi]["wall_s"] - by[engine, lo]["wall_s"]
            marginal[engine] = round((hi - lo) / extra_s, 2) if extra_s > 0 else float("nan")
    return overhead, marginal


def _format(report: dict[str, Any], sizes: list[int]) -> str:
    lines = [
        f"{report['model']} ({report['config']}), batch {report['batch_size']}, {report['cpu_count']} CPUs, "
        f"load average {report['loadavg_before'][0]} before / {report['loadavg_after'][0]} after "
        "(wall: the whole command; indexer: its reported seconds; first_batch: ray actors up and one batch back):",
        table(report["results"]),
        "ray / local time: "
        + ", ".join(
            f"{o['images']} photos {o['wall_ratio']}x whole command, {o['indexer_ratio']}x indexer"
            for o in report["overhead"]
        ),
    ]
    if report["marginal_img_s"]:
        lines.append(
            f"marginal images/s from {sizes[0]} to {sizes[-1]} photos (fixed costs cancel): "
            + ", ".join(f"{engine} {rate}" for engine, rate in report["marginal_img_s"].items())
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = begin(_parser(), argv)
    sizes = sorted({int(size) for size in args.sizes.split(",") if size.strip()})
    all_files = make_photo_set(args.photo_dir, sizes[-1])
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        runs, rows = _run_all(args, sizes, all_files, Path(tmp))
    overhead, marginal = _compare(rows, sizes)
    report = {
        "machine": machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "config": "retrieval defaults" if args.defaults else "one 224 px crop, penultimate layer",
        "model": args.model,
        "batch_size": args.batch_size,
        "ray_args": args.ray_args,
        "results": rows,
        "overhead": overhead,
        "marginal_img_s": marginal,
        "runs": runs,
    }
    echo(_format(report, sizes))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
