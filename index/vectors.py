"""A thin wrapper over a FAISS index that always takes explicit int64 ids.

The ids are the catalog's ``seq`` numbers, never FAISS row positions (which shift on removal). The
metric is always inner product: the embedder L2-normalises, so inner product is cosine.

How ids are attached depends on the index type:

* IVF indexes (``"IVF1024,Flat"``, ``"OPQ16,IVF1024,PQ16"``...) store ids in their inverted lists, so
  they are used as they are (wrapping them in ``IndexIDMap`` would break ``remove_ids``: IVF does not
  renumber positions when it removes).
* Anything else (``"Flat"``, ``"HNSW32"``, ``"PQ16"``...) is wrapped in ``faiss.IndexIDMap2`` unless the
  factory string already produced an ``IDMap``/``IDMap2``.

Training: an untrained index (IVF, PQ...) is trained on the first batch given to :meth:`add`, or on
a random sample of it when it is large (at most ``max(100_000, 40 * nlist)`` vectors: k-means time grows
with the sample, and FAISS itself stops gaining at a few hundred points per centroid). That batch must
hold enough vectors (at least ``nlist`` for IVF, 256 per PQ codebook); otherwise a :class:`StoreError`
tells the caller to add a bigger first batch or use ``"Flat"``. :func:`index.choose.ivf_nlist` gives
nlist ~ 4 sqrt(n).

Search-time parameters (``efSearch``, ``nprobe``, ``quantizer_efSearch``, ``k_factor_rf``: FAISS
``ParameterSpace`` names) get :func:`index.choose.default_search_params` at :meth:`create` (FAISS's own
defaults, ``efSearch=16`` and ``nprobe=1``, give poor recall), can be changed with
:meth:`set_search_params`, and are read back by :attr:`search_params`. FAISS stores them in the index
file, so a snapshot keeps them. IVF with an HNSW coarse quantizer (``"IVF65536_HNSW32,PQ32x4fs"``) is
an IVF index like any other here: ids live in its lists.

Removal: indexes that cannot remove ids (HNSW) are rebuilt in memory from their own stored vectors
(``reconstruct_n`` on the wrapped index, then ``reset`` and re-add the survivors). That is exact for
raw-vector storage (``"HNSW32"`` = HNSW over a flat store) and re-encodes already-quantised codes
otherwise. It costs a full rebuild per call, so delete in batches where possible.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from deepfeat.index._fs import atomic_write, sha256_file
from deepfeat.index.choose import default_search_params
from deepfeat.index.errors import CorruptStoreError, InvalidArgumentError, InvalidVectorError, StoreError
from deepfeat.index.ids import SEQ_BITS, all_vector_ids, seqs_of, vector_ids

__all__ = ["VectorIndex"]

logger = logging.getLogger(__name__)

_TRAIN_SAMPLE_MIN = 100_000
_TRAIN_PER_LIST = 40
_TRAIN_SEED = 1234
_MAX_FILTERED_EF = 4096
"""HNSW's widest filtered exploration; past it a filter is selective enough for an exact scan."""


def _parts(index: Any) -> Iterator[tuple[str, Any]]:
    """Walk the wrappers of a FAISS index: ``(role, downcast index)`` for the index and what it wraps.

    Roles: ``"top"`` for each layer down the main chain (IDMap, pre-transform, refine, IVF/HNSW...),
    ``"refine"`` for an ``IndexRefine`` and ``"quantizer"`` for an IVF's coarse quantizer.
    """
    node: Any = faiss.downcast_index(index)
    while node is not None:
        if isinstance(node, faiss.IndexRefine):
            yield "refine", node
            node = faiss.downcast_index(node.base_index)
            continue
        yield "top", node
        if isinstance(node, faiss.IndexIDMap | faiss.IndexIDMap2 | faiss.IndexPreTransform):
            node = faiss.downcast_index(node.index)
        elif isinstance(node, faiss.IndexIVF):
            yield "quantizer", faiss.downcast_index(node.quantizer)
            node = None
        else:
            node = None


def _per_image_of(ids: np.ndarray) -> int:
    """The most vectors one image has among FAISS ids (an image's vector r has r in the high bits)."""
    return int(ids.max() >> SEQ_BITS) + 1 if ids.size else 1


def _ivf_of(index: Any) -> Any | None:
    """The IVF index that directly holds the ids (top level or under a pre-transform), else None."""
    if isinstance(index, faiss.IndexIVF):
        return index
    if isinstance(index, faiss.IndexPreTransform):
        inner = faiss.downcast_index(index.index)
        if isinstance(inner, faiss.IndexIVF):
            return inner
    return None


_BITMAP_MAX_ID = 1 << 32
"""Ids below this get a bitmap selector (at most 512 MiB; 125 KB for a million images)."""


def id_selector(ids: np.ndarray) -> tuple[Any, np.ndarray | None]:
    """A FAISS ID selector for ``ids``, and the buffer it reads (keep it alive while searching).

    Plain seqs (one vector per image) get a bitmap: built by numpy in a few ms and one bit test per
    candidate. Ids carrying a vector position in their high bits get FAISS's hash set.
    """
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if ids.size and int(ids.min()) >= 0 and int(ids.max()) < _BITMAP_MAX_ID:
        bits = np.zeros(int(ids.max()) + 1, dtype=bool)
        bits[ids] = True
        bitmap = np.packbits(bits, bitorder="little")
        return faiss.IDSelectorBitmap(bitmap.size, faiss.swig_ptr(bitmap)), bitmap
    return faiss.IDSelectorBatch(ids), None


def check_k(k: object) -> int:
    """``k`` as an int, or InvalidArgumentError unless it is an integer >= 1 (a bool is not)."""
    if not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 1:
        raise InvalidArgumentError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


class VectorIndex:
    """FAISS index + explicit int64 ids, inner-product metric.

    Not thread-safe on its own: the store serialises mutation and search with a lock.
    """

    def __init__(self, index: Any, *, factory: str) -> None:
        """Wrap an already-built FAISS index (use :meth:`create` or :meth:`load`).

        Args:
            index: A FAISS index that takes explicit ids (IDMap/IDMap2 or IVF).
            factory: The factory string it was built from (informational).

        Raises:
            CorruptStoreError: The index does not take explicit ids or is not inner-product.
        """
        if not isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2) and _ivf_of(index) is None:
            raise CorruptStoreError(f"FAISS index of type {type(index).__name__} carries no explicit ids")
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise CorruptStoreError(f"FAISS index metric is {index.metric_type}, expected inner product")
        self._index = index
        self._factory = factory
        self._per_image: int | None = None if index.ntotal else 1

    @classmethod
    def create(
        cls, dim: int, factory: str = "Flat", *, search_params: Mapping[str, float] | None = None
    ) -> VectorIndex:
        """Build an empty index from a FAISS factory string, metric inner product.

        Args:
            dim: Vector dimension.
            factory: FAISS ``index_factory`` string ("Flat", "HNSW32", "IVF4096,PQ32"...).
            search_params: Search-time parameters (``ParameterSpace`` names) applied over
                :func:`index.choose.default_search_params` for this factory.

        Returns:
            The empty index.

        Raises:
            InvalidArgumentError: ``dim`` < 1, a factory string FAISS does not understand, or a search
                parameter that does not apply to it.
        """
        if not isinstance(dim, int) or dim < 1:
            raise InvalidArgumentError(f"dim must be a positive integer, got {dim!r}")
        try:
            raw = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except (RuntimeError, TypeError) as exc:
            raise InvalidArgumentError(
                f"invalid FAISS index_factory {factory!r} for dim {dim}: {exc}. "
                "Examples: 'Flat', 'HNSW32', 'IVF1024,Flat'"
            ) from exc
        if not isinstance(raw, faiss.IndexIDMap | faiss.IndexIDMap2) and _ivf_of(raw) is None:
            raw = faiss.IndexIDMap2(raw)
        index = cls(raw, factory=factory)
        params: dict[str, float] = dict(default_search_params(factory))
        params.update(search_params or {})
        if params:
            index.set_search_params(params)
        return index

    # ------------------------------------------------------------------ properties

    @property
    def factory(self) -> str:
        """The factory string the index was built from."""
        return self._factory

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self._index.d)

    @property
    def ntotal(self) -> int:
        """Number of vectors held."""
        return int(self._index.ntotal)

    @property
    def exact_scores(self) -> bool:
        """Whether searches return exact inner products: the vectors are stored uncompressed (Flat,
        IVF-Flat, HNSW over Flat, or a Flat refine stage). A replica re-ranks the others' shortlists."""
        for role, node in _parts(self._index):
            if role == "refine":
                return isinstance(faiss.downcast_index(node.refine_index), faiss.IndexFlat)
            if role != "top":
                continue
            if isinstance(node, faiss.IndexFlat | faiss.IndexIVFFlat):
                return True
            if isinstance(node, faiss.IndexHNSW):
                return isinstance(faiss.downcast_index(node.storage), faiss.IndexFlat)
        return False

    @property
    def exhaustive(self) -> bool:
        """Whether a search scores every stored vector exactly (a flat index): its top k is the true
        top k, with or without an ID selector."""
        tops = [node for role, node in _parts(self._index) if role == "top"]
        return isinstance(tops[-1], faiss.IndexFlat) and not any(
            role == "refine" for role, _ in _parts(self._index)
        )

    @property
    def is_trained(self) -> bool:
        """Whether the index can accept vectors (Flat/HNSW always; IVF/PQ after :meth:`train`)."""
        return bool(self._index.is_trained)

    @property
    def search_params(self) -> dict[str, int | float]:
        """The search-time parameters in effect (only those that apply to this index type).

        Keys among ``efSearch`` (HNSW), ``nprobe`` (IVF), ``quantizer_efSearch`` (IVF over an HNSW
        quantizer) and ``k_factor_rf`` (refinement), the names :meth:`set_search_params` takes.
        """
        out: dict[str, int | float] = {}
        for role, node in _parts(self._index):
            if role == "refine":
                out["k_factor_rf"] = float(node.k_factor)
            elif role == "quantizer" and isinstance(node, faiss.IndexHNSW):
                out["quantizer_efSearch"] = int(node.hnsw.efSearch)
            elif role == "top" and isinstance(node, faiss.IndexIVF):
                out["nprobe"] = int(node.nprobe)
            elif role == "top" and isinstance(node, faiss.IndexHNSW):
                out["efSearch"] = int(node.hnsw.efSearch)
        return out

    def set_search_params(self, params: Mapping[str, float]) -> None:
        """Set search-time parameters (kept in snapshots: FAISS writes them into the index file).

        Args:
            params: ``{name: value}`` with ``ParameterSpace`` names: ``efSearch``, ``nprobe``,
                ``quantizer_efSearch``, ``k_factor_rf``.

        Raises:
            InvalidArgumentError: A name that does not apply to this index type, or a value < 1.
        """
        space = faiss.ParameterSpace()
        for name, value in params.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 1:
                raise InvalidArgumentError(f"search parameter {name} must be a number >= 1, got {value!r}")
            try:
                space.set_index_parameter(self._index, name, float(value))
            except RuntimeError as exc:
                applicable = ", ".join(sorted(self.search_params)) or "none"
                raise InvalidArgumentError(
                    f"search parameter {name!r} does not apply to index_factory {self._factory!r} "
                    f"(applicable: {applicable})"
                ) from exc

    @property
    def ivf(self) -> Any | None:
        """The IVF index holding the ids (top level or under a pre-transform), else None."""
        return _ivf_of(self._index)

    @property
    def faiss_index(self) -> Any:
        """The underlying FAISS object (for tuning such as ``nprobe``/``efSearch``; do not mutate ids)."""
        return self._index

    # ------------------------------------------------------------------ validation

    def _check_vectors(self, vectors: np.ndarray, what: str) -> np.ndarray:
        arr = np.asarray(vectors)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise InvalidVectorError(f"{what} must have shape (n, {self.dim}), got {arr.shape}")
        if arr.dtype not in (np.float32, np.float64):
            raise InvalidVectorError(f"{what} must be float32 (or float64), got dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
            raise InvalidVectorError(f"{what} contain NaN or infinite values (first at row {bad})")
        return arr

    @staticmethod
    def _check_ids(ids: np.ndarray, n: int | None = None) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
            want = f"({n},)" if n is not None else "(n,)"
            raise InvalidArgumentError(f"ids must have shape {want}, got {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise InvalidArgumentError(f"ids must be integers, got dtype {arr.dtype}")
        return np.ascontiguousarray(arr, dtype=np.int64)

    # ------------------------------------------------------------------ mutation

    @property
    def default_train_size(self) -> int:
        """How many vectors :meth:`train` samples at most by default: ``max(100_000, 40 * nlist)``."""
        ivf = _ivf_of(self._index)
        return max(_TRAIN_SAMPLE_MIN, _TRAIN_PER_LIST * (int(ivf.nlist) if ivf is not None else 0))

    def train(self, vectors: np.ndarray, *, max_vectors: int | None = None) -> None:
        """Train the index (IVF centroids, PQ codebooks) on ``vectors``, or on a random sample of them.

        Args:
            vectors: (n, dim) float32 training vectors.
            max_vectors: Train on at most this many (a seeded random sample); None means
                ``max(100_000, 40 * nlist)``.

        Raises:
            InvalidVectorError: Wrong shape/dtype or non-finite values.
            StoreError: Too few vectors for this index type (the message says how many are needed).
        """
        x = self._check_vectors(vectors, "training vectors")
        ivf = _ivf_of(self._index)
        if ivf is not None and x.shape[0] < ivf.nlist:
            raise StoreError(
                f"index_factory {self._factory!r} needs at least {ivf.nlist} vectors to train its "
                f"{ivf.nlist} IVF lists, got {x.shape[0]}; add a bigger first batch or use 'Flat'"
            )
        if max_vectors is None:
            max_vectors = self.default_train_size
        if x.shape[0] > max_vectors:
            rows = np.random.default_rng(_TRAIN_SEED).choice(x.shape[0], size=max_vectors, replace=False)
            x = x[np.sort(rows)]
        try:
            self._index.train(x)
        except RuntimeError as exc:
            raise StoreError(
                f"cannot train index_factory {self._factory!r} on {x.shape[0]} vectors ({exc}); "
                "add a bigger first batch or use 'Flat'"
            ) from exc

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under their images' seqs, training first if the index needs it.

        Seqs must not already be in the index (FAISS would keep both copies); the store guarantees that.

        Args:
            ids: (n,) int64 seqs, one per vector: an image with several vectors repeats its seq once
                per vector, contiguously, its global vector first (:func:`index.ids.vector_ids`).
            vectors: (n, dim) float32 vectors (float64 is cast).

        Raises:
            InvalidVectorError: Wrong shape/dtype or non-finite values.
            InvalidArgumentError: ``ids`` is not a 1-D integer array of length n.
            StoreError: The index needs training and ``vectors`` are too few to train on.
        """
        x = self._check_vectors(vectors, "vectors")
        i = self._check_ids(ids, x.shape[0])
        if x.shape[0] == 0:
            return
        if not self.is_trained:
            self.train(x)
        faiss_ids = vector_ids(i)
        self._index.add_with_ids(x, faiss_ids)
        if self._per_image is not None:
            self._per_image = max(self._per_image, _per_image_of(faiss_ids))

    @property
    def images(self) -> int:
        """Images held: every image of a store has the same number of vectors (its embedder's)."""
        return self.ntotal // self.per_image

    @property
    def per_image(self) -> int:
        """The most vectors any image has here (read from the ids once, then kept up to date)."""
        if self._per_image is None:
            self._per_image = _per_image_of(self.ids())
        return self._per_image

    def remove(self, ids: np.ndarray) -> int:
        """Remove images by seq, every vector of each (absent ones are ignored).

        Args:
            ids: (n,) int64 seqs.

        Returns:
            How many vectors were removed.

        Raises:
            InvalidArgumentError: ``ids`` is not a 1-D integer array.
        """
        i = self._check_ids(ids)
        if i.size == 0 or self.ntotal == 0:
            return 0
        if self.per_image > 1:
            i = all_vector_ids(i, self.per_image)
        try:
            return int(self._index.remove_ids(faiss.IDSelectorBatch(i)))
        except RuntimeError as exc:
            if "not implemented" not in str(exc):
                raise
        return self._remove_by_rebuild(i)

    def _remove_by_rebuild(self, ids: np.ndarray) -> int:
        # Only IDMap-wrapped indexes get here (IVF supports remove_ids natively). Row r of the wrapped
        # index has id id_map[r], so reconstruct_n(0, ntotal) lines up with ids().
        held = self.ids()
        drop = np.isin(held, ids)
        n_drop = int(drop.sum())
        if n_drop == 0:
            return 0
        inner = faiss.downcast_index(self._index.index)
        vectors = inner.reconstruct_n(0, self.ntotal)  # (ntotal, dim)
        keep = ~drop
        logger.info("rebuilding %s index without %d id(s) (%d kept)", self._factory, n_drop, int(keep.sum()))
        self._index.reset()
        if keep.any():
            self._index.add_with_ids(np.ascontiguousarray(vectors[keep]), np.ascontiguousarray(held[keep]))
        return n_drop

    # ------------------------------------------------------------------ queries

    def search(
        self, queries: np.ndarray, k: int, *, among: np.ndarray | None = None, share: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product.

        Args:
            queries: (m, dim) float32 queries.
            k: Neighbours per query, >= 1.
            among: Only these FAISS ids may be returned (a metadata filter's images), through FAISS's
                ID selector: a flat index then scores only them, exactly.
            share: The fraction of the index ``among`` is. An IVF index probes ``nprobe / share``
                lists and HNSW explores ``efSearch / share`` candidates (both capped), so a filtered
                search examines about as many matching vectors as an unfiltered one.

        Returns:
            ``(scores, ids)``: (m, k') float32 best first and (m, k') int64 FAISS ids (an image's seq
            and which of its vectors: :func:`index.ids.seqs_of`), where k' = min(k, ntotal) (so a huge
            k never allocates a huge result); ids are -1 where an approximate index found fewer than
            k' neighbours.

        Raises:
            InvalidVectorError: Bad query shape/dtype/values.
            InvalidArgumentError: ``k`` < 1.
        """
        q = self._check_vectors(queries, "queries")
        k_eff = min(check_k(k), self.ntotal)
        if q.shape[0] == 0 or k_eff == 0:
            m = q.shape[0]
            return np.empty((m, k_eff), dtype=np.float32), np.empty((m, k_eff), dtype=np.int64)
        if among is None:
            scores, ids = self._index.search(q, k_eff)
        else:
            selector, bitmap = id_selector(among)
            params = self._filtered_params(selector, share)  # selector and bitmap referenced until here
            scores, ids = self._index.search(q, k_eff, params=params)
            del bitmap
        return np.asarray(scores, dtype=np.float32), np.asarray(ids, dtype=np.int64)

    @property
    def can_select(self) -> bool:
        """Whether :meth:`search` takes ``among`` (FAISS's refine wrapper takes no ID selector)."""
        return not any(role == "refine" for role, _ in _parts(self._index))

    def _filtered_params(self, selector: Any, share: float) -> Any:
        """Search parameters restricted to ``selector``, with the index's own search settings widened
        by ``1 / share`` (FAISS applies a parameter object instead of the index's settings)."""
        widen = 1.0 / min(1.0, max(share, 1e-9))
        ivf = self.ivf
        hnsw = next((node for _, node in _parts(self._index) if isinstance(node, faiss.IndexHNSW)), None)
        params: Any
        if ivf is not None:
            params = faiss.SearchParametersIVF()
            params.nprobe = int(min(ivf.nlist, math.ceil(ivf.nprobe * widen)))
            params.max_codes = ivf.max_codes
        elif hnsw is not None:
            params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # missing from the stubs
            params.efSearch = int(
                min(_MAX_FILTERED_EF, max(hnsw.hnsw.efSearch, math.ceil(hnsw.hnsw.efSearch * widen)))
            )
        else:
            params = faiss.SearchParameters()
        params.sel = selector
        return params

    def seqs(self) -> np.ndarray:
        """The seqs of the images held (sorted, unique)."""
        return np.unique(seqs_of(self.ids()))

    def ids(self) -> np.ndarray:
        """All FAISS ids currently held (one per vector: :mod:`index.ids`).

        Returns:
            int64 array (order: insertion order for IDMap indexes, list order for IVF).
        """
        if isinstance(self._index, faiss.IndexIDMap | faiss.IndexIDMap2):
            return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)
        ivf = _ivf_of(self._index)
        if ivf is None:  # pragma: no cover - excluded by __init__
            raise CorruptStoreError("index carries no ids")
        invlists = ivf.invlists
        parts = []
        for lst in range(ivf.nlist):
            size = invlists.list_size(lst)
            if size:
                ptr = invlists.get_ids(lst)
                try:
                    parts.append(faiss.rev_swig_ptr(ptr, size).astype(np.int64, copy=True))
                finally:
                    invlists.release_ids(lst, ptr)
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path, *, before_replace: Callable[[str], None] | None = None) -> str:
        """Write the index atomically (temp file in the same dir, fsync, ``os.replace``, dir fsync).

        Args:
            path: Destination, e.g. ``<data_dir>/vectors.faiss``.
            before_replace: Called with the new file's sha256 once it is written, before it replaces
                ``path`` (the store records its intent there, see :mod:`index.files`).

        Returns:
            The sha256 hex digest of the written file, to be recorded in the manifest.

        Raises:
            StoreFullError: No space left on the device (the temp file is removed).
        """
        digest: list[str] = []

        def _write(tmp: Path) -> None:
            faiss.write_index(self._index, str(tmp))
            # Hash the temp file: it is exactly what os.replace will put in place.
            digest.append(sha256_file(tmp))
            if before_replace is not None:
                before_replace(digest[0])

        atomic_write(Path(path), _write)
        return digest[0]

    @classmethod
    def load(
        cls, path: str | Path, *, expected_sha256: str | None = None, factory: str = "unknown"
    ) -> VectorIndex:
        """Read an index written by :meth:`save`, verifying its checksum first.

        The checksum is checked before FAISS parses the file, so a damaged file never reaches the C++
        reader (which can crash on garbage).

        Args:
            path: The snapshot file.
            expected_sha256: The manifest's checksum; None skips the check.
            factory: The factory string to report (not stored in FAISS files).

        Returns:
            The loaded index.

        Raises:
            CorruptStoreError: Missing/unreadable file, checksum mismatch, or not an id-carrying
                inner-product FAISS index.
        """
        path = Path(path)
        try:
            if expected_sha256 is not None:
                actual = sha256_file(path)
                if actual != expected_sha256:
                    raise CorruptStoreError(
                        f"snapshot {path.name} checksum mismatch: expected {expected_sha256}, got {actual}"
                    )
            raw = faiss.read_index(str(path))
        except (OSError, RuntimeError) as exc:
            raise CorruptStoreError(f"cannot read snapshot {path}: {exc}") from exc
        return cls(raw, factory=factory)
