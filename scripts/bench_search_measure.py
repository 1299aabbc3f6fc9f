"""The measurement runner of ``deepfeat bench search``: build each index through
:class:`index.vectors.VectorIndex` (train + add, timed, with its memory), time its searches one query at a
time and batched, score recall@k against exact ``Flat`` and take every speed as a ratio to Flat's in the
same run."""

from __future__ import annotations

import gc
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from deepfeat.index.choose import choose_factory
from deepfeat.index.vectors import VectorIndex
from deepfeat.scripts.bench_search_data import Dataset

__all__ = ["TARGET_RECALL", "TARGET_SPEEDUP", "FactorySpec", "recall_at_k", "run_benchmark"]

# The benchmark's parts log under the benchmark's name: one logger to configure, as before they were split.
logger = logging.getLogger(f"{__package__}.bench_search")

TARGET_RECALL = 0.95
TARGET_SPEEDUP = 50.0
_ADD_CHUNK = 100_000


def _rss_bytes() -> int:
    """Current resident set size (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(frozen=True)
class FactorySpec:
    """A factory string and the search settings to measure on one build of it."""

    factory: str
    settings: tuple[dict[str, float], ...]


def _time_single(
    search: Callable[[np.ndarray], Any], queries: np.ndarray, count: int, budget_s: float
) -> list[float]:
    """Latencies of one-query calls (at least 5, at most ``count``, stopping after ``budget_s``)."""
    search(queries[:1])  # warm-up
    latencies: list[float] = []
    started = time.perf_counter()
    for i in range(min(count, len(queries))):
        t0 = time.perf_counter()
        search(queries[i : i + 1])
        latencies.append(time.perf_counter() - t0)
        if i >= 4 and time.perf_counter() - started > budget_s:
            break
    return latencies


def _time_batched(
    search: Callable[[np.ndarray], Any], queries: np.ndarray, runs: int
) -> tuple[list[float], Any]:
    times: list[float] = []
    result: Any = None
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        result = search(queries)
        times.append(time.perf_counter() - t0)
    return times, result


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the exact top-k (``truth``, (nq, k)) among the ids found ((nq, k'), -1 for none)."""
    k = truth.shape[1]
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / (k * len(truth))


def _build(
    factory: str, data: Dataset, *, train_size: int | None, build_threads: int
) -> tuple[VectorIndex, dict[str, Any]]:
    gc.collect()
    rss0 = _rss_bytes()
    faiss.omp_set_num_threads(build_threads)
    index = VectorIndex.create(data.base.shape[1], factory)
    n = data.base.shape[0]
    t0 = time.perf_counter()
    trained_on = 0
    if not index.is_trained:
        rng = np.random.default_rng(7)
        cap = train_size if train_size else None
        sample = (
            data.base if cap is None or cap >= n else data.base[np.sort(rng.choice(n, cap, replace=False))]
        )
        index.train(sample, max_vectors=cap)
        trained_on = min(len(sample), cap or index.default_train_size)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for start in range(0, n, _ADD_CHUNK):
        stop = min(start + _ADD_CHUNK, n)
        index.add(np.arange(start, stop, dtype=np.int64), data.base[start:stop])
    add_s = time.perf_counter() - t1
    gc.collect()
    rss_delta = _rss_bytes() - rss0
    index_bytes = int(faiss.serialize_index(index.faiss_index).nbytes)
    return index, {
        "train_s": train_s,
        "add_s": add_s,
        "build_s": train_s + add_s,
        "trained_on": trained_on,
        "index_bytes": index_bytes,
        "rss_delta_bytes": rss_delta,
    }


def _measure(
    index: VectorIndex,
    data: Dataset,
    truth: np.ndarray | None,
    *,
    k: int,
    threads: int,
    runs: int,
    single_queries: int,
    single_budget_s: float,
) -> tuple[dict[str, Any], np.ndarray]:
    """Time one search setting (batched first, then one query at a time) and score its recall."""
    faiss.omp_set_num_threads(threads)

    def search(q: np.ndarray) -> Any:
        return index.search(q, k)

    batch_times, (_, ids) = _time_batched(search, data.queries, runs)
    latencies = _time_single(search, data.queries, single_queries, single_budget_s)
    nq = len(data.queries)
    single_median = statistics.median(latencies)
    return {
        "search_params": index.search_params,
        "single_qps": 1.0 / single_median,
        "single_ms_p50": single_median * 1e3,
        "single_ms_p90": float(np.percentile(latencies, 90)) * 1e3,
        "single_calls": len(latencies),
        "batch_qps": nq / statistics.median(batch_times),
        "batch_s": [round(t, 4) for t in batch_times],
        "recall": recall_at_k(ids, truth) if truth is not None else 1.0,
    }, ids


def run_benchmark(
    data: Dataset,
    specs: Sequence[FactorySpec],
    *,
    k: int = 10,
    threads: int = 1,
    build_threads: int | None = None,
    runs: int = 3,
    single_queries: int = 200,
    single_budget_s: float = 20.0,
    train_size: int | None = None,
) -> dict[str, Any]:
    """Exact ``Flat`` first (ground truth and baseline), then every spec; one dict for the report.

    Args:
        data: The vectors and queries.
        specs: Factories and their search settings (a ``Flat`` among them is measured once, as the
            baseline).
        k: Neighbours per query (recall@k).
        threads: FAISS/OpenMP threads while searching.
        build_threads: Threads while training/adding (None: all cores).
        runs: Batched calls per setting (the median is reported).
        single_queries: One-query calls per setting (the median latency is reported).
        single_budget_s: Stop the one-query calls of a setting after this long (at least 5 calls).
        train_size: Train IVF/PQ on this many vectors (None: ``VectorIndex.train``'s default sample).

    Returns:
        ``{"data", "n", "dim", "queries", "k", "auto_factory", "rows": [...]}``; each row has the
        factory, its build and memory figures, the measured setting and ``speedup_single``,
        ``speedup_batch`` (against Flat) and ``meets_target_single``/``_batch``.
    """
    n, dim = data.base.shape
    build_threads = build_threads or os.cpu_count() or 1
    logger.info("%s n=%d dim=%d: building Flat (exact baseline)", data.name, n, dim)
    flat, flat_build = _build("Flat", data, train_size=train_size, build_threads=build_threads)
    timing: dict[str, Any] = {
        "k": k,
        "threads": threads,
        "runs": runs,
        "single_queries": single_queries,
        "single_budget_s": single_budget_s,
    }
    first, truth = _measure(flat, data, None, **timing)
    rows = [{"factory": "Flat", "baseline": "start", **flat_build, **first}]
    rows += _measure_specs(
        data, specs, truth, timing=timing, train_size=train_size, build_threads=build_threads
    )
    # Exact search again at the end: on a shared machine the load changes during a run, so the ratios
    # are taken against the faster of the two exact measurements (the conservative choice).
    last, _ = _measure(flat, data, truth, **timing)
    rows.append({"factory": "Flat", "baseline": "end", **flat_build, **last})
    del flat
    baseline = {
        "single_qps": max(first["single_qps"], last["single_qps"]),
        "batch_qps": max(first["batch_qps"], last["batch_qps"]),
    }
    _add_speedups(rows, baseline)
    return {
        "data": data.name,
        "data_info": data.info,
        "n": int(n),
        "dim": int(dim),
        "queries": int(len(data.queries)),
        "k": k,
        "threads": threads,
        "build_threads": build_threads,
        "auto_factory": choose_factory(int(n), int(dim)),
        "baseline": baseline,
        "rows": rows,
    }


def _measure_specs(
    data: Dataset,
    specs: Sequence[FactorySpec],
    truth: np.ndarray,
    *,
    timing: dict[str, Any],
    train_size: int | None,
    build_threads: int,
) -> list[dict[str, Any]]:
    """One build per spec (``Flat`` skipped: it is the baseline), one row per search setting."""
    n, dim = data.base.shape
    rows: list[dict[str, Any]] = []
    for spec in specs:
        if spec.factory == "Flat":
            continue
        logger.info("%s n=%d dim=%d: building %s", data.name, n, dim, spec.factory)
        index, build = _build(spec.factory, data, train_size=train_size, build_threads=build_threads)
        for setting in spec.settings:
            if setting:
                index.set_search_params(setting)
            row, _ = _measure(index, data, truth, **timing)
            rows.append({"factory": spec.factory, **build, **row})
            logger.info("  %s %s recall=%.3f", spec.factory, row["search_params"], row["recall"])
        del index
        gc.collect()
    return rows


def _add_speedups(rows: list[dict[str, Any]], baseline: dict[str, float]) -> None:
    """Each row's speeds as a ratio to exact Flat's, and whether it meets the targets."""
    for row in rows:
        row["speedup_single"] = row["single_qps"] / baseline["single_qps"]
        row["speedup_batch"] = row["batch_qps"] / baseline["batch_qps"]
        ok = row["recall"] >= TARGET_RECALL
        row["meets_target_single"] = bool(ok and row["speedup_single"] >= TARGET_SPEEDUP)
        row["meets_target_batch"] = bool(ok and row["speedup_batch"] >= TARGET_SPEEDUP)
