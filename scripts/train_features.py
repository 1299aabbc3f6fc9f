"""Features for ``deepfeat train-classifier --method linear``: each file's embedding from the store when it
indexed that very content with this very embedder, else from the feature cache
(``DATA_DIR/features-cache.sqlite3``, keyed by the embedder's fingerprint and the content hash), else
decoded and embedded here (and cached), so re-training and the index share the work."""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from deepfeat.index.store import ImageStore
from deepfeat.models.embedder import Embedder
from deepfeat.models.heads import fingerprint_differences
from deepfeat.models.images import ImageLimits
from deepfeat.scripts.train_dataset import Dataset, bad_files_error, decode_all

__all__ = ["CACHE_FILE", "FeatureCache", "FeatureStats", "dataset_features", "fingerprint_key"]

# The command's parts log under the command's name: one logger to configure, as before they were split.
log = logging.getLogger(f"{__package__}.train_classifier")

CACHE_FILE = "features-cache.sqlite3"


def fingerprint_key(fingerprint: dict[str, Any]) -> str:
    """A short stable hash of an embedder fingerprint (the cache's namespace)."""
    text = json.dumps(fingerprint, sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class FeatureCache:
    """SQLite cache of embeddings keyed by (embedder fingerprint hash, content sha256).

    A cache, not a store: losing it costs only recomputation, so it runs with ``synchronous=NORMAL``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=30)
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS features (fp TEXT NOT NULL, sha256 TEXT NOT NULL, "
            "vector BLOB NOT NULL, PRIMARY KEY (fp, sha256)) WITHOUT ROWID"
        )
        self._conn.commit()

    def get_many(self, fingerprint: dict[str, Any], shas: Sequence[str], dim: int) -> dict[str, np.ndarray]:
        key = fingerprint_key(fingerprint)
        out: dict[str, np.ndarray] = {}
        wanted = list(dict.fromkeys(shas))
        for start in range(0, len(wanted), 900):
            chunk = wanted[start : start + 900]
            marks = ",".join("?" * len(chunk))
            for sha, blob in self._conn.execute(
                f"SELECT sha256, vector FROM features WHERE fp = ? AND sha256 IN ({marks})", (key, *chunk)
            ):
                vector = np.frombuffer(blob, dtype="<f4")
                if vector.shape == (dim,):
                    out[str(sha)] = vector.astype(np.float32)
        return out

    def put_many(self, fingerprint: dict[str, Any], vectors: dict[str, np.ndarray]) -> None:
        key = fingerprint_key(fingerprint)
        with self._conn:
            self._conn.executemany(
                "INSERT OR REPLACE INTO features (fp, sha256, vector) VALUES (?, ?, ?)",
                [(key, sha, np.asarray(v, dtype="<f4").tobytes()) for sha, v in vectors.items()],
            )

    def close(self) -> None:
        self._conn.close()


@contextmanager
def _store_for(data_dir: Path, embedder: Embedder) -> Iterator[ImageStore | None]:
    """The store in ``data_dir`` when it holds vectors of this very embedder, else None."""
    try:
        manifest = ImageStore.read_manifest(data_dir)
    except Exception as exc:  # a damaged store must not stop training: it is only a shortcut here
        log.warning("not reusing the store's vectors: %s", exc)
        yield None
        return
    if manifest is None or fingerprint_differences(manifest.fingerprint, embedder.fingerprint):
        yield None
        return
    store = ImageStore.open(data_dir, fingerprint=embedder.fingerprint, dim=embedder.dim, read_only=True)
    try:
        yield store
    finally:
        store.close()


@dataclass
class FeatureStats:
    from_store: int = 0
    from_cache: int = 0
    embedded: int = 0
    failed: int = 0
    seconds: float = 0.0


def dataset_features(
    dataset: Dataset,
    embedder: Embedder,
    *,
    data_dir: Path,
    limits: ImageLimits,
    batch_size: int = 32,
    skip_bad: bool = False,
    progress: bool = False,
) -> tuple[Dataset, np.ndarray, FeatureStats]:
    """Embeddings of every file: from the store, then the cache, else decoded and embedded (and cached).

    Returns:
        The dataset without unusable files (only with ``skip_bad``), its (n, d) features, and counts.

    Raises:
        TrainingDataError: Unusable files and not ``skip_bad``.
    """
    started = time.perf_counter()
    stats = FeatureStats()
    found: dict[str, np.ndarray] = {}
    with _store_for(data_dir, embedder) as store:
        if store is not None:
            found = store.vectors_by_sha256(dataset.sha256)
            stats.from_store = len(found)
    cache = FeatureCache(data_dir / CACHE_FILE)
    try:
        missing = [s for s in dataset.sha256 if s not in found]
        cached = cache.get_many(embedder.fingerprint, missing, embedder.dim)
        stats.from_cache = len(cached)
        found.update(cached)
        todo = [i for i, sha in enumerate(dataset.sha256) if sha not in found]
        failures: list[dict[str, str]] = []
        bar = tqdm(total=len(todo), desc="embedding", unit="img", disable=not progress or not todo)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images, bad = decode_all(dataset, chunk, limits, embedder.decode_size)
            failures.extend(bad)
            ok = [i for i in chunk if i in images]
            if ok:
                vectors = embedder.embed([images[i] for i in ok])
                fresh = {dataset.sha256[i]: vectors[j] for j, i in enumerate(ok)}
                cache.put_many(embedder.fingerprint, fresh)
                found.update(fresh)
                stats.embedded += len(ok)
            bar.update(len(chunk))
        bar.close()
    finally:
        cache.close()
    stats.failed = len(failures)
    if failures and not skip_bad:
        raise bad_files_error(failures)
    keep = [i for i, sha in enumerate(dataset.sha256) if sha in found]
    kept = dataset.subset(keep)
    kept.skipped = dataset.skipped + failures
    features = np.stack([found[s] for s in kept.sha256]) if keep else np.zeros((0, embedder.dim), np.float32)
    stats.seconds = round(time.perf_counter() - started, 3)
    return kept, features, stats
