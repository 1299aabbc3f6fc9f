"""Choosing a FAISS index for a collection: the ``auto`` policy and default search-time parameters.

The numbers come from ``scripts/bench_search.py`` on the development machine (2-core AMD EPYC with
AVX-512, shared with other jobs: load average 2-6, so absolute speeds are noisy and ratios are taken
within one run), one search thread, 1000 held-out queries, recall@10 against exact search in the same
run, 256-d vectors, two data sets: clustered Gaussian ("synthetic") and noisy efficientnet_lite0
embeddings of real photos ("real"). The README has the tables and the commands.

* **Flat** (exact) while one query's scan stays cheap: ``n * dim <= FLAT_MAX_SCAN`` (64 Mi floats,
  256 MiB scanned a query): up to ~262k vectors at 256-d, ~52k at 1280-d. Measured at 100k x 256-d:
  150-170 exact queries/s one at a time (6-7 ms), 1100-1800/s batched. Flat needs no training, deletes
  cheaply and costs ``4 * dim`` bytes a vector.
* **HNSW32** from there up to ``IVF_FROM`` vectors, when it fits the budget: no training (the batch
  indexer can add to it in small batches). At 100k: recall@10 0.976 (synthetic, ``efSearch=64``,
  4.1k q/s) and 0.989 (real, ``efSearch=16``, 17k q/s). At 1M it lost to IVF-SQ8 on every count:
  synthetic recall 0.956 needed ``efSearch=128`` (1.8k q/s), on the real set it stalled at 0.657
  whatever ``efSearch`` (tight near-duplicate groups the graph does not connect), the build took
  200-330 s against ~60 s, and it holds 1.24 GiB against 0.26 GiB. Deletes rebuild the whole graph
  (:mod:`index.vectors`).
* **IVF{nlist},SQ8** from ``IVF_FROM`` vectors (or when HNSW does not fit): 1 byte a dimension, IVF
  deletes natively. At 1M (4096 lists, ``nprobe=8``): recall@10 0.968 (synthetic) and 0.975 (real),
  5.8k and 6.4k q/s one at a time (236-340x exact), 9.7-10.4k q/s batched (56-60x). Recall saturates
  at ~0.98 (the codes are lossy). ``nlist`` is ~4 sqrt(n) as a power of two (:func:`ivf_nlist`). IVF
  must be trained: the store trains on its first batch, which must hold at least ``nlist`` vectors
  (:func:`min_train_vectors`).
* **IVF{nlist},PQ{m}x4fs** only when SQ8 does not fit either: the largest fast-scan PQ code that fits
  (``m / 2`` bytes a vector). Recall pays: 16-byte codes (``PQ32x4fs``) gave recall@10 0.41/0.72 at
  100k and 0.22/0.65 at 1M (synthetic/real), however many lists were probed.
* The coarse quantizer becomes an HNSW (``IVF{nlist}_HNSW32,...``) only from 2^16 lists: at 4096 lists
  it searched 15-35% slower than the flat quantizer (whose 4096 dot products a query are cheap), and
  built no faster.

No budget (``memory_budget_bytes=None``) means only the size rules apply.
"""

from __future__ import annotations

import math
import re

__all__ = [
    "FLAT_MAX_SCAN",
    "HNSW_EF_SEARCH",
    "IVF_FROM",
    "choose_factory",
    "default_search_params",
    "estimate_memory_bytes",
    "ivf_nlist",
    "min_train_vectors",
    "resolve_factory",
]

FLAT_MAX_SCAN = 64 * 2**20
"""Largest ``n * dim`` (floats scanned per exact query) for which ``auto`` stays exact."""

IVF_FROM = 500_000
"""From this size ``auto`` prefers IVF-SQ8 to HNSW: comparable at 100k, IVF ahead on speed, recall,
memory and build time at 1M; the switch sits between the two measured sizes."""

HNSW_M = 32
"""Graph degree for ``auto``'s HNSW (``HNSW32``): 2*M links a vector on the base layer."""

HNSW_EF_SEARCH = 128
"""Default ``efSearch`` for HNSW indexes (synthetic: recall@10 0.990 at 100k, 0.956 at 1M; 64 gave
0.976 and 0.903)."""

IVF_QUANTIZER_EF_SEARCH = 128
"""Default ``quantizer_efSearch`` for an HNSW coarse quantizer (kept >= 2 * nprobe; not tuned)."""

REFINE_K_FACTOR = 8
"""Default ``k_factor_rf`` for ``...,RFlat`` (re-rank 8*k approximate candidates exactly)."""

_HNSW_QUANTIZER_FROM_NLIST = 2**16
_NLIST_MIN = 64
_NLIST_MAX = 2**18

_FACTORY_SPLIT = re.compile(r",(?![^()]*\))")
_HNSW_RE = re.compile(r"HNSW(\d+)")
_IVF_RE = re.compile(r"IVF(\d+)(?:_(HNSW(\d+)|[A-Za-z0-9]+))?")
_PQ_RE = re.compile(r"PQ(\d+)(?:x(\d+))?(fs|np)?")
_SQ_RE = re.compile(r"SQ(\d+|fp16|bf16)")
_PRE_RE = re.compile(r"(OPQ|PCA|PCAR|PCAW|PCAWR|ITQ|RR|L2norm)(\d+)?(?:_(\d+))?")


def _check_sizes(n_vectors: int, dim: int) -> None:
    for name, value, low in (("n_vectors", n_vectors, 0), ("dim", dim, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def ivf_nlist(n_vectors: int) -> int:
    """The number of IVF lists for ``n_vectors``: ~4 sqrt(n), rounded to the nearest power of two.

    Clamped to [64, 2^18]. 100k -> 1024, 1M -> 4096, 10M -> 16384, 100M -> 32768.

    Args:
        n_vectors: Expected collection size.

    Returns:
        A power of two.

    Raises:
        ValueError: ``n_vectors`` is not a non-negative integer.
    """
    _check_sizes(n_vectors, 1)
    target = 4.0 * math.sqrt(max(n_vectors, 1))
    nlist = 2 ** round(math.log2(target))
    return int(min(max(nlist, _NLIST_MIN), _NLIST_MAX))


def min_train_vectors(factory: str) -> int:
    """How many vectors an index built from ``factory`` needs to train (0: no training).

    IVF needs at least ``nlist`` (FAISS warns below 39 per list); 8-bit PQ codebooks want 256 points
    each, 4-bit ones 16.

    Args:
        factory: A FAISS factory string.

    Returns:
        The minimum first-batch size for the store (:meth:`index.vectors.VectorIndex.train` uses up
        to ``max(100_000, 40 * nlist)`` when it gets more; FAISS warns below 39 a list).
    """
    need = 0
    for part in _FACTORY_SPLIT.split(factory.strip()):
        if m := _IVF_RE.fullmatch(part):
            need = max(need, int(m.group(1)))
        elif m := _PQ_RE.fullmatch(part):
            bits = int(m.group(2) or 8)
            need = max(need, 2**bits)
    return need


def _hnsw_graph_bytes(m: int) -> int:
    # Per vector: base layer (2M int32 links), upper layers (M links on ~1/M of the nodes: ~4 bytes),
    # the level byte and the int64 offset into the link table.
    return 4 * 2 * m + 4 + 1 + 8


def estimate_memory_bytes(factory: str, n_vectors: int, dim: int) -> int:
    """Approximate RAM (and snapshot size) of ``n_vectors`` in an index built from ``factory``.

    Good to ~10% for the shapes ``auto`` emits (checked against ``faiss.serialize_index`` sizes in the
    benchmark): Flat ``4*dim`` bytes a vector, HNSW32 ``4*dim + ~300``, IVF-SQ8 ``dim + 8``, IVF-PQm
    ``m + 8`` (8-bit) or ``m/2 + 8`` (4-bit fast scan), plus centroids; a refinement stage adds its own
    codes. Every layout also pays the int64 id.

    Args:
        factory: A FAISS factory string.
        n_vectors: Collection size.
        dim: Vector dimension.

    Returns:
        Estimated bytes.

    Raises:
        ValueError: Bad sizes.
    """
    _check_sizes(n_vectors, dim)
    parts = _FACTORY_SPLIT.split(factory.strip())
    d = dim
    fixed = 0
    per_vector = 0
    coded = False
    for part in parts:
        if m := _PRE_RE.fullmatch(part):
            kind, first, second = m.groups()
            if kind == "L2norm":
                continue
            out = (int(second) if second else d) if kind == "OPQ" else (int(first) if first else d)
            fixed += 4 * d * out  # the transform matrix
            d = out
        elif m := _IVF_RE.fullmatch(part):
            nlist = int(m.group(1))
            fixed += 4 * nlist * d  # centroids
            if m.group(3):
                fixed += nlist * _hnsw_graph_bytes(int(m.group(3)))
            per_vector += 8  # ids live in the inverted lists
        elif m := _HNSW_RE.fullmatch(part):
            per_vector += _hnsw_graph_bytes(int(m.group(1)))  # storage: the next part, else Flat
        elif m := _PQ_RE.fullmatch(part):
            bits = int(m.group(2) or 8)
            per_vector += math.ceil(int(m.group(1)) * bits / 8)
            fixed += 4 * d * 2**bits  # codebooks
            coded = True
        elif m := _SQ_RE.fullmatch(part):
            kind = m.group(1)
            per_vector += 2 * d if kind in ("fp16", "bf16") else math.ceil(d * int(kind) / 8)
            coded = True
        elif part == "Flat":
            per_vector += 4 * d
            coded = True
        elif part in ("RFlat", "Refine(Flat)"):
            per_vector += 4 * d
    if not coded:  # "HNSW32" alone stores raw floats (so does anything unknown, to be safe)
        per_vector += 4 * d
    if not any(_IVF_RE.fullmatch(p) for p in parts):
        per_vector += 8  # the IDMap2 wrapper's int64 id outside IVF
    return int(fixed + per_vector * n_vectors)


def choose_factory(n_vectors: int, dim: int, *, memory_budget_bytes: int | None = None) -> str:
    """The ``auto`` index choice for a collection of ``n_vectors`` ``dim``-dimensional vectors.

    See the module docstring for the policy and the measurements behind it. In short: ``Flat`` while
    ``n * dim <= FLAT_MAX_SCAN``; ``HNSW32`` below ``IVF_FROM`` vectors when it fits the budget;
    otherwise ``IVF{nlist},SQ8`` if that fits, else ``IVF{nlist},PQ{m}x4fs`` with the largest ``m``
    that fits (``IVF{nlist}_HNSW32,...`` from 2^16 lists).

    Args:
        n_vectors: Expected collection size (what the store will hold, not the first batch).
        dim: Vector dimension.
        memory_budget_bytes: RAM the index may use; None for no limit.

    Returns:
        A FAISS factory string for :meth:`index.vectors.VectorIndex.create`.

    Raises:
        ValueError: Bad sizes or a non-positive budget.
    """
    _check_sizes(n_vectors, dim)
    if memory_budget_bytes is not None and (
        not isinstance(memory_budget_bytes, int)
        or isinstance(memory_budget_bytes, bool)
        or memory_budget_bytes <= 0
    ):
        raise ValueError(
            f"memory_budget_bytes must be a positive integer or None, got {memory_budget_bytes!r}"
        )
    budget = math.inf if memory_budget_bytes is None else memory_budget_bytes

    def fits(factory: str) -> bool:
        return estimate_memory_bytes(factory, n_vectors, dim) <= budget

    if n_vectors * dim <= FLAT_MAX_SCAN and fits("Flat"):
        return "Flat"
    hnsw = f"HNSW{HNSW_M}"
    if n_vectors < IVF_FROM and fits(hnsw):
        return hnsw
    nlist = ivf_nlist(n_vectors)
    coarse = f"IVF{nlist}_HNSW32" if nlist >= _HNSW_QUANTIZER_FROM_NLIST else f"IVF{nlist}"
    sq8 = f"{coarse},SQ8"
    if fits(sq8):
        return sq8
    # Fast-scan PQ needs an even m; the largest divisor of dim (<= dim/2, so >= 2 dims a sub-vector)
    # that fits, down to the smallest code FAISS accepts.
    candidates = [m for m in range(dim // 2, 0, -1) if dim % m == 0 and m % 2 == 0]
    for m in candidates:
        factory = f"{coarse},PQ{m}x4fs"
        if fits(factory):
            return factory
    smallest = f"{coarse},PQ{candidates[-1]}x4fs" if candidates else f"{coarse},PQ1"
    return smallest  # nothing fits: the smallest code there is (the caller may still refuse)


def resolve_factory(
    factory: str | None, n_vectors: int, dim: int, *, memory_budget_bytes: int | None = None
) -> str:
    """``"auto"`` -> :func:`choose_factory`; None -> ``"Flat"``; anything else is returned unchanged.

    Args:
        factory: What the user asked for (``auto``, a FAISS factory string, or None).
        n_vectors: Expected collection size (only used for ``auto``).
        dim: Vector dimension.
        memory_budget_bytes: RAM the index may use (only used for ``auto``).

    Returns:
        A FAISS factory string.
    """
    if factory is None:
        return "Flat"
    if factory.strip().lower() == "auto":
        return choose_factory(n_vectors, dim, memory_budget_bytes=memory_budget_bytes)
    return factory


def _default_nprobe(nlist: int) -> int:
    if nlist <= 1024:
        return 32
    if nlist <= 2048:
        return 16
    return max(8, nlist // 512)


def default_search_params(factory: str) -> dict[str, int]:
    """Search-time parameters that gave recall@10 >= 0.95 in the benchmark, by index type.

    * HNSW (top level): ``efSearch`` = :data:`HNSW_EF_SEARCH`.
    * IVF: ``nprobe`` 32 up to 1024 lists, 16 at 2048, then ``max(8, nlist / 512)`` (8 at 4096, 32 at
      16384), never more than 256 or nlist. Measured: 1024 lists/100k needed 32 on the synthetic set
      (0.954; 16 gave 0.916; the real set had 0.979 already at 4); 4096 lists/1M reached 0.968 and
      0.975 at 8 (0.952 and 0.956 at 4). Other list counts are interpolated, not measured. With an
      HNSW coarse quantizer also ``quantizer_efSearch`` = max(:data:`IVF_QUANTIZER_EF_SEARCH`,
      2 * nprobe).
    * A refinement stage (``RFlat``, ``Refine(...)``): ``k_factor_rf`` = :data:`REFINE_K_FACTOR`.
    * Flat, bare PQ/SQ/LSH: nothing to set (empty dict).

    The names are :class:`faiss.ParameterSpace` names, so they can be applied with
    :meth:`index.vectors.VectorIndex.set_search_params`.

    Args:
        factory: A FAISS factory string.

    Returns:
        ``{name: value}``.
    """
    params: dict[str, int] = {}
    for part in _FACTORY_SPLIT.split(factory.strip()):
        if m := _IVF_RE.fullmatch(part):
            nlist = int(m.group(1))
            nprobe = min(nlist, 256, _default_nprobe(nlist))
            params["nprobe"] = nprobe
            if m.group(3):
                params["quantizer_efSearch"] = max(IVF_QUANTIZER_EF_SEARCH, 2 * nprobe)
        elif _HNSW_RE.match(part) and "nprobe" not in params:
            params["efSearch"] = HNSW_EF_SEARCH
        elif part in ("RFlat",) or part.startswith("Refine("):
            params["k_factor_rf"] = REFINE_K_FACTOR
    return params
