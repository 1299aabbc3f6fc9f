"""Build benchmark: time and peak memory of ``build-index`` within a stated budget, and the recall@k
of the generation it publishes against exact search.

1. **Data**: ``synthetic`` or ``real`` vectors from :mod:`scripts.bench_search` (clustered, CNN-like
   spectrum; or noisy efficientnet_lite0 embeddings of real photos), ``n`` stored plus held-out queries.
2. **Store**: a data directory whose catalog is filled through :class:`index.catalog.Catalog` (the
   store's own write path, without a FAISS index), in transactions of ``--fill-batch`` rows. With
   ``--data-dir`` pointing at a store this benchmark filled before with the same arguments, the fill
   is skipped (the vectors are regenerated from the seed and checked against a few stored rows).
3. **Build**: ``python -m deepfeat.scripts.build_index --json`` (what ``deepfeat build-index`` runs) in a child
   process. Its peak resident memory is the child's own ``VmHWM`` (``/proc/<pid>/status``), read by
   the child at the end and also sampled by this process every 20 ms while it runs (``ru_maxrss``
   from ``wait4`` is not used: Linux carries it across ``exec`` from this process, which holds the
   data set). RSS counts the page-cache pages of the memory-mapped shards and output file while the
   merge touches them (reclaimable, never heap), so the heap alone (``RssAnon``) is sampled too.
4. **Recall**: the published generation is opened as a replica opens it (checksums, then memory-mapped
   lists, :func:`index.generations.load_generation`) and searched with the held-out queries for each
   ``--nprobe`` value: recall@k against the exact top-k (numpy, float32, chunked), queries/s batched
   (median of ``--runs``) and one at a time (median latency over ``--single-queries``), on
   ``--threads`` threads.

    deepfeat bench build --n 1000000 --dim 256 --index IVF4096,PQ32 --max-memory 1GiB
    deepfeat bench build --n 100000 --dim 256 --index IVF1024,PQ32 --max-memory 512MiB --json /tmp/b.json

Prints a summary; ``--json`` writes everything. No figure is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from deepfeat.index.build import parse_bytes
from deepfeat.index.catalog import Catalog, NewImage
from deepfeat.index.errors import StoreError
from deepfeat.index.generations import load_generation
from deepfeat.index.manifest import Manifest
from deepfeat.index.store import CATALOG_FILE, MANIFEST_FILE, ImageStore
from deepfeat.scripts.bench_common import begin, command_line, echo, usage_error
from deepfeat.scripts.bench_search import (
    Dataset,
    machine_report,
    real_dataset,
    recall_at_k,
    synthetic_dataset,
)

__all__ = ["exact_top_k", "fill_store", "main", "run_build"]

logger = logging.getLogger(__name__)

_FINGERPRINT_KIND = "bench_build"


def _proc_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


# ============================================================================ store


def fill_store(data_dir: Path, data: Dataset, *, batch: int, seed: int) -> dict[str, Any]:
    """Create a store in ``data_dir`` holding ``data.base`` as catalog rows with seqs 1..n.

    Returns:
        ``{"filled": bool, "fill_s": seconds}``; an existing store filled by this benchmark with the
        same data is reused when its sampled rows match.
    """
    n, dim = data.base.shape
    fingerprint = {"kind": _FINGERPRINT_KIND, "data": data.name, "n": n, "dim": dim, "seed": seed}
    manifest = Manifest.load(data_dir / MANIFEST_FILE)
    if manifest is not None:
        if manifest.fingerprint != fingerprint:
            raise SystemExit(
                f"{data_dir} holds another store ({manifest.fingerprint}); use an empty directory"
            )
        catalog = Catalog(data_dir / CATALOG_FILE, dim=dim, read_only=True)
        try:
            probe = [1, n // 2, n]
            stored = dict(
                (int(s), v)
                for seqs, vecs in catalog.vectors_for_seqs(probe)
                for s, v in zip(seqs, vecs, strict=True)
            )
            if catalog.count() == n and all(
                s in stored and np.array_equal(stored[s], data.base[s - 1]) for s in probe
            ):
                logger.info("reusing the store in %s (%d vectors)", data_dir, n)
                return {"filled": False, "fill_s": 0.0}
        finally:
            catalog.close()
        raise SystemExit(f"{data_dir} holds a partial or different fill; use an empty directory")
    ImageStore.open(data_dir, fingerprint=fingerprint, dim=dim, snapshot_every=0).close()
    catalog = Catalog(data_dir / CATALOG_FILE, dim=dim)
    started = time.perf_counter()
    try:
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            rows = [
                NewImage(sha256=f"{i:064x}", source=None, width=None, height=None, nbytes=None)
                for i in range(start, stop)
            ]
            catalog.insert_many(rows, data.base[start:stop])
            if (stop // batch) % 10 == 0 or stop == n:
                logger.info(
                    "filled %d/%d rows (%.0f rows/s)", stop, n, stop / (time.perf_counter() - started)
                )
        if catalog.max_seq() != n:
            raise SystemExit(
                f"{data_dir}: expected seqs 1..{n}, the catalog's highest is {catalog.max_seq()}"
            )
    finally:
        catalog.close()
    return {"filled": True, "fill_s": round(time.perf_counter() - started, 2)}


# ============================================================================ build


def run_build(data_dir: Path, *, factory: str, budget: str, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Run ``python -m deepfeat.scripts.build_index --json`` in a child; its summary plus sampled peak memory."""
    cmd = [
        sys.executable,
        "-m",
        "deepfeat.scripts.build_index",
        "--data-dir",
        str(data_dir),
        "--index",
        factory,
        "--max-memory",
        budget,
        "--json",
        "--no-progress",
        *extra,
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    sampled = {"rss": 0, "anon": 0, "file": 0}
    timeline: list[tuple[float, int, int]] = []  # (s, RssAnon, RssFile) once a second

    def sample() -> None:
        while proc.poll() is None:
            anon, file = _proc_kib(proc.pid, "RssAnon") * 1024, _proc_kib(proc.pid, "RssFile") * 1024
            sampled["rss"] = max(sampled["rss"], _proc_kib(proc.pid, "VmHWM") * 1024, anon + file)
            sampled["anon"] = max(sampled["anon"], anon)
            sampled["file"] = max(sampled["file"], file)
            if anon and (not timeline or time.perf_counter() - started - timeline[-1][0] >= 1.0):
                timeline.append((round(time.perf_counter() - started, 1), anon, file))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"build failed with exit status {proc.returncode}: {' '.join(cmd)}")
    summary = json.loads(out)
    summary["wall_s"] = round(wall, 2)
    summary["peak_rss_sampled_bytes"] = sampled["rss"]
    summary["peak_anon_sampled_bytes"] = sampled["anon"]
    summary["peak_file_sampled_bytes"] = sampled["file"]
    summary["rss_timeline"] = timeline
    summary["command"] = " ".join(cmd[1:])
    return summary


# ============================================================================ recall


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int, *, chunk: int = 100_000) -> np.ndarray:
    """Exact inner-product top-k ids (0-based rows of ``base``), chunked over ``base``: (nq, k)."""
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(base), chunk):
        scores = queries @ base[start : start + chunk].T  # (nq, chunk)
        top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
        cand_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
        cand_ids = np.concatenate([best_ids, top + start], axis=1)
        order = np.argsort(-cand_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(cand_scores, order, axis=1)
        best_ids = np.take_along_axis(cand_ids, order, axis=1)
    return best_ids


def measure_recall(
    data_dir: Path,
    data: Dataset,
    *,
    k: int,
    nprobes: Sequence[int],
    runs: int,
    single_queries: int,
    threads: int,
) -> dict[str, Any]:
    """Open the published generation like a replica and measure recall@k and speed per nprobe."""
    manifest = Manifest.load(data_dir / MANIFEST_FILE)
    if manifest is None or manifest.generation is None:
        raise SystemExit(f"no published generation in {data_dir}")
    info = manifest.generation
    started = time.perf_counter()
    index = load_generation(data_dir, info)
    load_s = time.perf_counter() - started
    t = time.perf_counter()
    truth = exact_top_k(data.base, data.queries, k) + 1  # row i has seq i + 1
    exact_s = time.perf_counter() - t
    faiss.omp_set_num_threads(threads)
    replica = None
    if not index.exact_scores:
        replica = ImageStore.open(
            data_dir, fingerprint=manifest.fingerprint, dim=manifest.dim, read_only=True
        )
    rows = []
    for nprobe in nprobes:
        index.set_search_params({"nprobe": nprobe})
        batched = []
        for _ in range(runs):
            t = time.perf_counter()
            _, found = index.search(data.queries, k)
            batched.append(time.perf_counter() - t)
        single = []
        for q in data.queries[:single_queries]:
            t = time.perf_counter()
            index.search(q[None, :], k)
            single.append(time.perf_counter() - t)
        row = {
            "nprobe": nprobe,
            "recall": round(recall_at_k(found, truth), 4),
            "qps_batched": round(len(data.queries) / statistics.median(batched), 1),
            "qps_single": round(1.0 / statistics.median(single), 1),
        }
        if replica is not None and replica._base is not None:
            # What a read replica returns: the same shortlist re-scored with the catalog's exact vectors.
            replica._base.index.set_search_params({"nprobe": nprobe})
            t = time.perf_counter()
            _, reranked = replica._search_index(data.queries, k)
            row["recall_reranked"] = round(recall_at_k(reranked, truth), 4)
            row["qps_batched_reranked"] = round(len(data.queries) / (time.perf_counter() - t), 1)
        rows.append(row)
        logger.info("nprobe=%d: %s", nprobe, rows[-1])
    if replica is not None:
        replica.close()
    return {
        "generation": info.number,
        "k": k,
        "queries": len(data.queries),
        "load_s": round(load_s, 3),
        "exact_s": round(exact_s, 2),
        "threads": threads,
        "by_nprobe": rows,
    }


# ============================================================================ main


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="deepfeat bench build",
        description=(__doc__ or "").split("\n\n")[0].replace("``", "`"),
    )
    parser.add_argument("--n", type=int, default=1_000_000, help="stored vectors (default 1000000)")
    parser.add_argument(
        "--dim", type=int, default=256, help="dimension (default 256; real data is PCA-reduced)"
    )
    parser.add_argument("--data", choices=["synthetic", "real"], default="synthetic")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries (default 1000)")
    parser.add_argument("--index", default="IVF4096,PQ32", help="factory string (default IVF4096,PQ32)")
    parser.add_argument("--max-memory", default="1GiB", help="the build's budget (default 1GiB)")
    parser.add_argument(
        "--nprobe", default="8,16,32,64", help="nprobe values to measure (default 8,16,32,64)"
    )
    parser.add_argument("--k", type=int, default=10, help="recall@k (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads while searching (default 1)")
    parser.add_argument("--runs", type=int, default=3, help="batched searches per nprobe; median (default 3)")
    parser.add_argument(
        "--single-queries", type=int, default=200, help="one-at-a-time queries timed (default 200)"
    )
    parser.add_argument(
        "--fill-batch", type=int, default=20_000, help="rows a catalog transaction (default 20000)"
    )
    parser.add_argument("--data-dir", type=Path, help="store directory (default: a new one under /tmp)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the full report here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (0, or 2 on bad arguments)."""
    parser = build_parser()
    args = begin(parser, argv, log_to_stderr=True)
    try:
        budget_bytes = parse_bytes(args.max_memory)
        nprobes = [int(p) for p in args.nprobe.split(",") if p.strip()]
        if args.n < 1 or args.dim < 1 or args.queries < 1 or not nprobes or min(nprobes) < 1:
            raise ValueError("--n, --dim, --queries and every --nprobe must be >= 1")
    except (ValueError, StoreError) as exc:  # StoreError: a bad --max-memory
        return usage_error(parser, exc)
    data_dir = args.data_dir or Path(
        f"/tmp/deepfeat-bench-build-{args.data}-{args.n}x{args.dim}-s{args.seed}"
    )
    report: dict[str, Any] = {
        "command": command_line("bench_build", argv),
        "machine": machine_report(),
        "data_dir": str(data_dir),
        "budget_bytes": budget_bytes,
    }
    t = time.perf_counter()
    if args.data == "synthetic":
        data = synthetic_dataset(args.n, args.queries, args.dim, seed=args.seed)
    else:
        data = real_dataset(args.n, args.queries, args.dim, seed=args.seed)
    report["data"] = {
        **data.info,
        "n": args.n,
        "dim": int(data.base.shape[1]),
        "generate_s": round(time.perf_counter() - t, 2),
    }
    report["fill"] = fill_store(data_dir, data, batch=args.fill_batch, seed=args.seed)
    report["loadavg_before_build"] = list(os.getloadavg())
    report["build"] = run_build(data_dir, factory=args.index, budget=args.max_memory)
    report["loadavg_after_build"] = list(os.getloadavg())
    report["search"] = measure_recall(
        data_dir,
        data,
        k=args.k,
        nprobes=nprobes,
        runs=args.runs,
        single_queries=args.single_queries,
        threads=args.threads,
    )
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    echo(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        echo(f"wrote {args.json}")
    return 0


def format_report(report: dict[str, Any]) -> str:
    mib = 2**20
    b = report["build"]
    build = b["build"]
    plan = build["plan"]
    data = report["data"]
    lines = [
        f"data: {data['kind']} n={data['n']} dim={data['dim']}  store {report['data_dir']}",
        f"build {b['factory']} within --max-memory {report['budget_bytes'] / mib:.0f} MiB: "
        f"{b['wall_s']:.1f} s wall ({build['seconds']:.1f} s in the build: train {build['train_s']:.1f} s on "
        f"{build['trained_on']} vectors, add {build['add_s']:.1f} s in {build['shards']} shard(s) of <= "
        f"{plan['shard_vectors']} with batches of {plan['add_batch']}, merge {build['merge_s']:.1f} s, "
        f"checksums {build['checksum_s']:.1f} s)",
        f"peak RSS {b['peak_rss_bytes'] / mib:.0f} MiB (VmHWM), of which heap <= {b['peak_anon_sampled_bytes'] / mib:.0f} "
        f"MiB (RssAnon, sampled every 20 ms) and mapped files <= {b['peak_file_sampled_bytes'] / mib:.0f} MiB; the process "
        f"started at {plan['baseline_bytes'] / mib:.0f} MiB",
        "files: " + ", ".join(f"{name} {size / mib:.1f} MiB" for name, size in b["files"].items()),
        f"load as a replica (sha256 + mmap): {report['search']['load_s']:.2f} s;  exact top-{report['search']['k']} "
        f"of {report['search']['queries']} queries: {report['search']['exact_s']:.1f} s",
        f"{'nprobe':>7} {'recall@' + str(report['search']['k']):>10} {'q/s batched':>12} {'q/s single':>11}",
    ]
    for row in report["search"]["by_nprobe"]:
        lines.append(
            f"{row['nprobe']:>7} {row['recall']:>10.4f} {row['qps_batched']:>12.0f} {row['qps_single']:>11.0f}"
            + (
                f"   re-ranked by a replica: recall {row['recall_reranked']:.4f}, {row['qps_batched_reranked']:.0f} q/s"
                if "recall_reranked" in row
                else ""
            )
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
