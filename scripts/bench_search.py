"""Search benchmark: FAISS index types against exact search, on the same vectors in the same run.

For each collection size and data set it builds an exact ``Flat`` index first (its results are the
ground truth and its speed the baseline), then each requested factory through the project's
:class:`index.vectors.VectorIndex` (the store's own code path: explicit ids, inner product, training on
a sample). Per factory and search setting it reports:

* build time (train + add) and memory: the serialized index size (what a snapshot weighs; FAISS keeps
  about the same in RAM) and the process RSS growth while the index was built and held;
* queries/s one query at a time (``1 / median latency`` over ``--single-queries`` calls) and batched
  (all queries in one call, median over ``--runs`` calls);
* recall@k against the exact top-k, and both speeds as a ratio to exact ``Flat`` measured in this run.

Data sets (float32, L2-normalised, queries held out from the collection):

* ``synthetic``: a mixture of 1000 Gaussian clusters around random unit centres plus a shared mean
  direction (CNN features are non-negative, so unrelated images are not orthogonal: cosine ~0.3), with noise
  whose variance decays as 1/rank over a random basis (CNN features have a fast-decaying PCA spectrum;
  uniform or isotropic noise would make every approximate index look worse than it is on real data).
* ``real``: ``efficientnet_lite0`` embeddings (1280-d) of 21 real photos shipped in scikit-image and
  matplotlib, each also as 24 random crops and flips (the 525 seeds). Vectors are seeds plus Gaussian
  noise shaped like the seeds' own crop/flip variation (their top principal directions) plus a little
  isotropic noise, in two levels: "scenes" around seeds, ~10 copies around each scene (one level of
  fixed-scale noise makes every copy of a seed equidistant from a query, so the top 10 would be
  arbitrary). With ``--dim`` below 1280 the vectors are reduced with a ``faiss.PCAMatrix`` trained on
  a sample (and renormalised): the output says so.

Threads: searches run on ``--threads`` (default 1: a one-query search is single-threaded anyway, and
on a shared 2-core machine OpenMP threads that wait on a busy core make multi-threaded timings
erratic). Building uses ``--build-threads`` (default all cores). On a shared machine also set
``OMP_WAIT_POLICY=PASSIVE`` in the environment. The load average is recorded in the JSON.

Factories are separated by ``;`` (FAISS strings contain commas). ``{nlist}`` is replaced by
:func:`index.choose.ivf_nlist` for each size and ``auto`` by :func:`index.choose.choose_factory`. A
factory may carry search settings to sweep after ``@``: ``HNSW32@efSearch=32|64|128`` or
``IVF{nlist},PQ32x4fs,RFlat@nprobe=16|32,k_factor_rf=4|8`` (every combination is measured on one
build); without ``@`` it gets :func:`index.choose.default_search_params`.

    python -m scripts.bench_search --sizes 100000 --dim 256 --data synthetic --json /tmp/out.json
    deepfeat bench search --sizes 100000,1000000 --dim 256 --data real

Prints medians and ratios; ``--json`` writes everything. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from deepfeat.index.choose import choose_factory, default_search_params, ivf_nlist
from deepfeat.index.vectors import VectorIndex
from deepfeat.scripts.bench_common import COLOUR_PHOTOS, begin, command_line, echo, real_photos, usage_error
from deepfeat.scripts.bench_machine import machine

__all__ = [
    "DEFAULT_FACTORIES",
    "Dataset",
    "FactorySpec",
    "machine_report",
    "main",
    "parse_factories",
    "real_dataset",
    "recall_at_k",
    "run_benchmark",
    "synthetic_dataset",
]

logger = logging.getLogger(__name__)

DEFAULT_FACTORIES = (
    "HNSW32@efSearch=16|32|64|128;IVF{nlist},SQ8@nprobe=4|8|16|32|64;IVF{nlist},PQ32x4fs@nprobe=16|64;"
    "IVF{nlist}_HNSW32,PQ32x4fs@nprobe=16|64"
)
TARGET_RECALL = 0.95
TARGET_SPEEDUP = 50.0
_ADD_CHUNK = 100_000
_REAL_MODEL = "efficientnet_lite0"
_REAL_PHOTOS = (
    *COLOUR_PHOTOS,
    "colorwheel",
    "logo",
    "camera",
    "coins",
    "moon",
    "page",
    "clock",
    "brick",
    "grass",
    "gravel",
    "text",
    "cell",
)
"""scikit-image's photos of the ``real`` data set (:func:`real_photos` adds two more)."""


def _rss_bytes() -> int:
    """Current resident set size (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _normalize(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


# ============================================================================ data


@dataclass
class Dataset:
    """Collection vectors (n, dim) and held-out queries (nq, dim), float32, unit L2 norm."""

    name: str
    base: np.ndarray
    queries: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def synthetic_dataset(
    n: int,
    n_queries: int,
    dim: int,
    *,
    seed: int = 0,
    n_clusters: int = 1000,
    sigma: float = 1.0,
    spectrum_decay: float = 1.0,
    mean_norm: float = 1.0,
) -> Dataset:
    """Clustered Gaussian vectors that look like CNN features more than uniform noise does.

    ``x = normalise(mean + centre[c] + sigma_c * (z * s) @ R)`` with ``c`` uniform over ``n_clusters``
    random unit centres, ``sigma_c = sigma * lognormal(0, 0.3)`` (clusters of different spreads),
    ``s_j ~ j^(-spectrum_decay / 2)`` scaled to unit total variance (so the variance decays as
    ``1/j`` by default), ``R`` a random rotation and ``mean`` a shared direction of norm ``mean_norm``.

    Args:
        n: Collection size.
        n_queries: Held-out queries drawn from the same mixture.
        dim: Dimension.
        seed: RNG seed.
        n_clusters: Mixture components.
        sigma: Noise scale relative to the (unit) centres.
        spectrum_decay: Exponent of the variance decay.
        mean_norm: Norm of the shared offset.

    Returns:
        The data set.
    """
    rng = np.random.default_rng(seed)
    centres = _normalize(rng.standard_normal((n_clusters, dim)).astype(np.float32))
    mean = _normalize(rng.standard_normal((1, dim)).astype(np.float32))[0] * mean_norm
    scales = (np.arange(1, dim + 1, dtype=np.float64) ** (-spectrum_decay / 2)).astype(np.float32)
    scales /= np.sqrt((scales**2).sum())
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    rotation = rotation.astype(np.float32)
    spread = (sigma * np.exp(0.3 * rng.standard_normal(n_clusters))).astype(np.float32)
    total = n + n_queries
    out = np.empty((total, dim), dtype=np.float32)
    for start in range(0, total, _ADD_CHUNK):
        stop = min(start + _ADD_CHUNK, total)
        labels = rng.integers(0, n_clusters, stop - start)
        noise = (rng.standard_normal((stop - start, dim)).astype(np.float32) * scales) @ rotation
        chunk = mean + centres[labels] + spread[labels, None] * noise
        out[start:stop] = _normalize(chunk)
    info = {
        "kind": "synthetic",
        "clusters": n_clusters,
        "sigma": sigma,
        "spectrum_decay": spectrum_decay,
        "mean_norm": mean_norm,
        "seed": seed,
    }
    return Dataset("synthetic", np.ascontiguousarray(out[:n]), np.ascontiguousarray(out[n:]), info)


def _augment(image: Any, rng: np.random.Generator) -> Any:
    """A random crop (15-100% of the area, aspect 3:4 to 4:3) and a coin-flip horizontal flip."""
    from PIL import Image

    width, height = image.size
    area = width * height * rng.uniform(0.15, 1.0)
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    w = int(min(width, round(np.sqrt(area * aspect))))
    h = int(min(height, round(np.sqrt(area / aspect))))
    left = int(rng.integers(0, width - w + 1))
    top = int(rng.integers(0, height - h + 1))
    crop = image.crop((left, top, left + w, top + h))
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def real_seeds(
    *, crops_per_photo: int = 24, seed: int = 0, model: str = _REAL_MODEL
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Embed the real photos and random crops/flips of them (the seeds of the ``real`` data set).

    Returns:
        ``(seeds, photo_of_seed, photo_names)``: (s, 1280) float32 unit vectors and (s,) int labels.
    """
    from deepfeat.models.embedder import Embedder  # scripts may import models; index/ never does

    rng = np.random.default_rng(seed)
    photos = real_photos(_REAL_PHOTOS)
    images: list[Any] = []
    labels: list[int] = []
    for i, (_, photo) in enumerate(photos):
        images.append(photo)
        labels.append(i)
        for _ in range(crops_per_photo):
            images.append(_augment(photo, rng))
            labels.append(i)
    embedder = Embedder(model, device="cpu")
    parts = [embedder.embed(images[i : i + 32]) for i in range(0, len(images), 32)]
    return np.concatenate(parts).astype(np.float32), np.asarray(labels), [name for name, _ in photos]


def real_dataset(
    n: int,
    n_queries: int,
    dim: int | None,
    *,
    seed: int = 0,
    crops_per_photo: int = 24,
    group: int = 10,
    scene_noise: float = 1.0,
    copy_noise: float = 0.35,
    iso_noise: float = 0.25,
    rank: int = 128,
    seeds: tuple[np.ndarray, np.ndarray, list[str]] | None = None,
) -> Dataset:
    """Noisy copies of real-photo embeddings, in two levels: scenes around seeds, copies around scenes.

    ``scene = normalise(seed + scene_noise * g_shaped + iso_noise * g_iso)`` (one per ``group``
    vectors: other photos of the same subject), then every vector (queries too) is
    ``normalise(scene + copy_noise * (g_shaped + iso_noise * g_iso))`` for a random scene (edits and
    near-duplicates). ``g_shaped`` is Gaussian with the covariance of the seeds' deviations from their
    photo's mean embedding (top ``rank`` principal directions), scaled so that 1 is as far as a typical
    crop/flip moves an embedding; ``g_iso`` is isotropic with the same expected norm. One level of
    fixed-scale noise would not do: in high dimension all copies of a seed would sit at the same
    distance from each other and from a query, so "the" 10 nearest would be arbitrary.

    Args:
        n: Collection size.
        n_queries: Held-out queries (new copies of existing scenes).
        dim: Output dimension; below the embedding's (1280) a ``faiss.PCAMatrix`` reduces it; None
            keeps the embedding's.
        seed: RNG seed.
        crops_per_photo: Crops/flips embedded per photo.
        group: Vectors per scene on average.
        scene_noise: Scale of a scene's offset from its seed.
        copy_noise: Scale of a vector's offset from its scene.
        iso_noise: Weight of the isotropic part at both levels.
        rank: Principal directions kept for the shaped noise.
        seeds: Precomputed :func:`real_seeds` output (the tests and repeated sizes reuse it).

    Returns:
        The data set.
    """
    seed_vecs, photo_of, names = (
        seeds if seeds is not None else real_seeds(crops_per_photo=crops_per_photo, seed=seed)
    )
    rng = np.random.default_rng(seed + 1)
    full_dim = seed_vecs.shape[1]
    noise, keep = _crop_noise(seed_vecs, photo_of, len(names), rank=rank, iso_noise=iso_noise, rng=rng)
    total = n + n_queries
    n_scenes = max(1, total // max(1, group))
    scenes = _scenes(seed_vecs, n_scenes, noise=noise, scale=scene_noise, rng=rng)
    out_dim = dim if dim is not None and dim < full_dim else full_dim
    out = _copies(scenes, total, out_dim, noise=noise, scale=copy_noise, rng=rng)
    info = {
        "kind": "real",
        "model": _REAL_MODEL,
        "photos": names,
        "seeds": int(len(seed_vecs)),
        "scenes": n_scenes,
        "scene_noise": scene_noise,
        "copy_noise": copy_noise,
        "iso_noise": iso_noise,
        "rank": keep,
        "embedding_dim": full_dim,
        "pca": f"faiss.PCAMatrix {full_dim} -> {out_dim}, trained on 50k" if out_dim < full_dim else None,
        "seed": seed,
    }
    return Dataset("real", np.ascontiguousarray(out[:n]), np.ascontiguousarray(out[n:]), info)


_Noise = Callable[[int, float], np.ndarray]
"""``noise(size, scale)``: (size, D) float32 offsets, ``scale`` times a typical crop/flip's."""


def _crop_noise(
    seed_vecs: np.ndarray,
    photo_of: np.ndarray,
    n_photos: int,
    *,
    rank: int,
    iso_noise: float,
    rng: np.random.Generator,
) -> tuple[_Noise, int]:
    """Gaussian noise shaped like the seeds' deviations from their photo's mean embedding (top ``rank``
    principal directions) plus ``iso_noise`` of isotropic noise; and the rank kept."""
    full_dim = seed_vecs.shape[1]
    photo_means = np.stack([seed_vecs[photo_of == p].mean(axis=0) for p in range(n_photos)])
    deviations = seed_vecs - photo_means[photo_of]  # (s, D): how crops/flips move an embedding
    typical = float(np.sqrt((deviations**2).sum(axis=1).mean()))
    _, sing, vt = np.linalg.svd(deviations, full_matrices=False)
    keep = min(rank, vt.shape[0])
    basis = (vt[:keep] * (sing[:keep, None] / np.sqrt(len(seed_vecs)))).astype(np.float32)  # (r, D)

    def noise(size: int, scale: float) -> np.ndarray:
        shaped = rng.standard_normal((size, keep)).astype(np.float32) @ basis
        iso = rng.standard_normal((size, full_dim)).astype(np.float32) * (
            iso_noise * typical / np.sqrt(full_dim)
        )
        return scale * (shaped + iso)

    return noise, keep


def _scenes(
    seed_vecs: np.ndarray, n_scenes: int, *, noise: _Noise, scale: float, rng: np.random.Generator
) -> np.ndarray:
    """(n_scenes, D) unit vectors, each a random seed moved by ``noise`` of ``scale``."""
    scenes = np.empty((n_scenes, seed_vecs.shape[1]), dtype=np.float32)
    for start in range(0, n_scenes, 50_000):
        stop = min(start + 50_000, n_scenes)
        picks = rng.integers(0, len(seed_vecs), stop - start)
        scenes[start:stop] = _normalize(seed_vecs[picks] + noise(stop - start, scale))
    return scenes


def _copies(
    scenes: np.ndarray,
    total: int,
    out_dim: int,
    *,
    noise: _Noise,
    scale: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """(total, out_dim) unit vectors, each a random scene moved by ``noise`` of ``scale``; below the
    scenes' dimension reduced by a ``faiss.PCAMatrix`` trained on (up to) 50k of them."""
    n_scenes, full_dim = scenes.shape

    def chunk_of(size: int) -> np.ndarray:
        return _normalize(scenes[rng.integers(0, n_scenes, size)] + noise(size, scale))

    pca = None
    if out_dim < full_dim:
        pca = faiss.PCAMatrix(full_dim, out_dim)
        pca.train(chunk_of(min(total, 50_000)))
    out = np.empty((total, out_dim), dtype=np.float32)
    for start in range(0, total, 50_000):
        stop = min(start + 50_000, total)
        x = chunk_of(stop - start)
        out[start:stop] = _normalize(pca.apply(x)) if pca is not None else x
    return out


# ============================================================================ factories


@dataclass(frozen=True)
class FactorySpec:
    """A factory string and the search settings to measure on one build of it."""

    factory: str
    settings: tuple[dict[str, float], ...]


def _number(text: str) -> float:
    value = float(text)
    return int(value) if value.is_integer() else value


def parse_factories(text: str, n: int, dim: int) -> list[FactorySpec]:
    """Parse ``--factories`` for one size: ``;``-separated, ``{nlist}``/``auto`` expanded, ``@`` sweeps.

    Args:
        text: e.g. ``"HNSW32@efSearch=64|128;IVF{nlist},PQ32x4fs"``.
        n: Collection size (for ``{nlist}`` and ``auto``).
        dim: Dimension (for ``auto``).

    Returns:
        One spec per factory, in order, duplicates (after expansion) merged.

    Raises:
        ValueError: An empty factory or a malformed ``@`` part.
    """
    specs: list[FactorySpec] = []
    seen: dict[str, int] = {}
    for raw in text.split(";"):
        raw = raw.strip()
        if not raw:
            continue
        factory, _, sweep = raw.partition("@")
        factory = factory.strip()
        if factory.lower() == "auto":
            factory = choose_factory(n, dim)
        factory = factory.replace("{nlist}", str(ivf_nlist(n)))
        if not factory:
            raise ValueError(f"empty factory in {raw!r}")
        if sweep.strip():
            names: list[str] = []
            values: list[list[float]] = []
            for item in sweep.split(","):
                name, eq, vals = item.partition("=")
                if not eq or not name.strip() or not vals.strip():
                    raise ValueError(f"bad search setting {item!r} in {raw!r}; expected name=v1|v2")
                names.append(name.strip())
                values.append([_number(v) for v in vals.split("|")])
            settings = tuple(dict(zip(names, combo, strict=True)) for combo in itertools.product(*values))
        else:
            settings = (dict(default_search_params(factory)),)
        if factory in seen:
            old = specs[seen[factory]]
            merged = old.settings + tuple(s for s in settings if s not in old.settings)
            specs[seen[factory]] = FactorySpec(factory, merged)
        else:
            seen[factory] = len(specs)
            specs.append(FactorySpec(factory, settings))
    return specs


# ============================================================================ measuring


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


# ============================================================================ report


def _fmt_params(params: dict[str, Any]) -> str:
    if not params:
        return "-"
    return ",".join(f"{k}={int(v) if float(v).is_integer() else v}" for k, v in params.items())


def format_table(result: dict[str, Any]) -> str:
    """The per-size table (medians; ratios against exact Flat in the same run)."""
    info = result["data_info"]
    head = (
        f"== {result['data']}  n={result['n']:,}  dim={result['dim']}  queries={result['queries']}  "
        f"k={result['k']}  search threads={result['threads']}  build threads={result['build_threads']}"
    )
    lines = [head]
    if info.get("pca"):
        lines.append(
            f"   real photos: {info['seeds']} seeds from {len(info['photos'])} photos, {info['pca']}"
        )
    lines.append(f"   auto would choose: {result['auto_factory']}")
    header = (
        f"{'factory':<26} {'search params':<34} {'build s':>8} {'index MiB':>9} {'RSS+ MiB':>8} "
        f"{'1-q q/s':>9} {'batch q/s':>10} {'recall@' + str(result['k']):>9} {'x1 vs Flat':>10} {'xB vs Flat':>10}"
    )
    lines += [header, "-" * len(header)]
    for row in result["rows"]:
        mark = " *" if row["meets_target_single"] or row["meets_target_batch"] else ""
        name = row["factory"] + (" (again, end)" if row.get("baseline") == "end" else "")
        lines.append(
            f"{name:<26} {_fmt_params(row['search_params']):<34} {row['build_s']:>8.1f} "
            f"{row['index_bytes'] / 2**20:>9.1f} {row['rss_delta_bytes'] / 2**20:>8.1f} "
            f"{row['single_qps']:>9.0f} {row['batch_qps']:>10.0f} {row['recall']:>9.3f} "
            f"{row['speedup_single']:>10.1f} {row['speedup_batch']:>10.1f}{mark}"
        )
    lines.append(
        f"   x = queries/s over exact Flat's (the faster of its two measurements in this run); "
        f"* = recall@{result['k']} >= {TARGET_RECALL} and >= {TARGET_SPEEDUP:.0f}x (one-query or batched)"
    )
    return "\n".join(lines)


# ============================================================================ CLI


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of ``deepfeat bench search`` (pass a subparser to attach them to it)."""
    parser = parser or argparse.ArgumentParser(
        prog="bench_search", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100000", help="comma-separated collection sizes (default 100000)")
    parser.add_argument(
        "--dim",
        type=int,
        default=256,
        help="vector dimension; for real data, PCA target (default 256; 0 = 1280, no PCA)",
    )
    parser.add_argument(
        "--factories",
        default=DEFAULT_FACTORIES,
        help="';'-separated FAISS factory strings, '{nlist}' and 'auto' expanded, '@name=v1|v2,...' sweeps "
        f"(default {DEFAULT_FACTORIES!r}); exact Flat always runs first",
    )
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries (default 1000)")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query, recall@k (default 10)")
    parser.add_argument("--data", choices=["synthetic", "real"], default="synthetic")
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads while searching (default 1)")
    parser.add_argument(
        "--build-threads", type=int, default=0, help="threads while building (default: all cores)"
    )
    parser.add_argument("--runs", type=int, default=3, help="batched calls per setting; median (default 3)")
    parser.add_argument(
        "--single-queries", type=int, default=200, help="one-query calls per setting; median (default 200)"
    )
    parser.add_argument(
        "--single-budget", type=float, default=20.0, help="max seconds of one-query calls per setting"
    )
    parser.add_argument(
        "--train-size",
        type=int,
        default=100_000,
        help="IVF/PQ training sample (default 100000; 0: VectorIndex's max(100k, 40*nlist))",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the full report here")
    return parser


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _checked(args: argparse.Namespace) -> tuple[list[int], int | None, dict[int, list[FactorySpec]]]:
    """(sizes, dimension or None for the embedding's, factory specs per size).

    Raises:
        ValueError: A bad size, count, dimension or factory string.
    """
    sizes = [_positive("size", int(s.replace("_", ""))) for s in args.sizes.split(",") if s.strip()]
    _positive("--queries", args.queries)
    _positive("--k", args.k)
    _positive("--threads", args.threads)
    dim = args.dim if args.dim > 0 else None
    if args.data == "synthetic" and dim is None:
        raise ValueError("--dim must be >= 1 for synthetic data")
    return sizes, dim, {n: parse_factories(args.factories, n, dim or 1280) for n in sizes}


def machine_report() -> dict[str, Any]:
    """:func:`bench_machine.machine` and what else decides FAISS's speed: its version and SIMD build,
    numpy's, the platform and the load average now (``loadavg_start``)."""
    return {
        **machine(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "faiss": faiss.__version__,
        "faiss_simd": faiss.get_compile_options(),
        "numpy": np.__version__,
        "loadavg_start": list(os.getloadavg()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (0, or 2 on bad arguments)."""
    parser = build_parser()
    args = begin(parser, argv, log_to_stderr=True)
    try:
        sizes, dim, specs_by_size = _checked(args)
    except ValueError as exc:
        return usage_error(parser, exc)
    report: dict[str, Any] = {
        "command": command_line("bench_search", argv),
        "machine": machine_report(),
        "target": {"recall": TARGET_RECALL, "speedup": TARGET_SPEEDUP},
        "results": [],
    }
    seeds = None
    seeds_s = 0.0
    for n in sizes:
        t0 = time.perf_counter()
        if args.data == "synthetic" and dim is not None:
            data = synthetic_dataset(n, args.queries, dim, seed=args.seed)
        else:
            if seeds is None:
                seeds = real_seeds(seed=args.seed)
                seeds_s = time.perf_counter() - t0
            data = real_dataset(n, args.queries, dim, seed=args.seed, seeds=seeds)
            data.info["embed_seeds_s"] = round(seeds_s, 2)
        logger.info(
            "generated %s n=%d dim=%d in %.1fs", data.name, n, data.base.shape[1], time.perf_counter() - t0
        )
        result = run_benchmark(
            data,
            specs_by_size[n],
            k=args.k,
            threads=args.threads,
            build_threads=args.build_threads or None,
            runs=args.runs,
            single_queries=args.single_queries,
            single_budget_s=args.single_budget,
            train_size=args.train_size or None,
        )
        result["total_s"] = round(time.perf_counter() - t0, 2)
        result["loadavg_end"] = list(os.getloadavg())
        report["results"].append(result)
        echo(format_table(result))
        echo()
        del data
        gc.collect()
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        echo(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
