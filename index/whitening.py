"""PCA-whitening learned from a collection's own vectors (Jégou & Chum 2012; Radenović et al. 2018).

Raw CNN descriptors have a few dominant, correlated directions (bursty, co-occurring activations)
that swamp similarity; centring, rotating onto the principal axes, dividing each by the square root of
its variance and re-normalising spreads the information evenly and usually raises retrieval mAP by
several points. Dropping the smallest-variance axes at the same time shrinks the index.

Built on ``faiss.PCAMatrix`` (``eigen_power=-0.5`` is exactly PCA-whitening), saved in FAISS's own
format so the store can checksum it like the vector snapshot.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from deepfeat.index._fs import atomic_write_bytes
from deepfeat.index.errors import CorruptStoreError, InvalidArgumentError

__all__ = ["Whitening"]

log = logging.getLogger(__name__)

_EPS = 1e-12
_FILE_RE = re.compile(r"whitening-[0-9a-f]{16}\.faiss")


class Whitening:
    """A learned linear map raw (d_in) -> whitened, L2-normalised (d_out) vectors."""

    def __init__(self, matrix: faiss.PCAMatrix) -> None:
        self._pca = matrix

    @classmethod
    def fit(cls, vectors: np.ndarray, *, dim: int | None = None, power: float = -0.5) -> Whitening:
        """Learn PCA-whitening from ``vectors`` (n, d_in).

        Args:
            vectors: training vectors, typically the indexed collection itself.
            dim: output dimension (<= d_in and <= n); None keeps min(d_in, n - 1).
            power: eigenvalue power; -0.5 whitens, 0 is plain PCA rotation.
        Raises:
            InvalidArgumentError: too few vectors or a dimension that cannot be learned from them.
        """
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] < 2:
            raise InvalidArgumentError(f"whitening needs at least 2 vectors of shape (n, d), got {x.shape}")
        n, d_in = x.shape
        max_dim = min(d_in, n - 1)
        out = max_dim if dim is None else int(dim)
        if not 1 <= out <= max_dim:
            raise InvalidArgumentError(
                f"whitening dimension {out} must be between 1 and {max_dim} "
                f"(the input dimension {d_in} and the number of training vectors {n} minus one)"
            )
        pca = faiss.PCAMatrix(d_in, out, power)
        pca.train(x)
        log.info("fitted PCA-whitening %d -> %d on %d vectors", d_in, out, n)
        return cls(pca)

    @property
    def d_in(self) -> int:
        return int(self._pca.d_in)

    @property
    def d_out(self) -> int:
        return int(self._pca.d_out)

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """(n, d_in) -> (n, d_out) float32, unit L2 norm (inner product stays cosine)."""
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise InvalidArgumentError(f"whitening expects (n, {self.d_in}) vectors, got {x.shape}")
        y = self._pca.apply(x)
        y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), _EPS)
        return y.astype(np.float32, copy=False)

    def to_bytes(self) -> bytes:
        writer = faiss.VectorIOWriter()
        faiss.write_VectorTransform(self._pca, writer)  # type: ignore[arg-type]  # stubs list only the path overload
        return faiss.vector_to_array(writer.data).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> Whitening:
        reader = faiss.VectorIOReader()
        faiss.copy_array_to_vector(np.frombuffer(data, dtype=np.uint8), reader.data)
        try:
            transform = faiss.read_VectorTransform(reader)  # type: ignore[arg-type]  # ditto
        except RuntimeError as exc:
            raise CorruptStoreError(f"whitening data could not be read: {exc}") from exc
        pca = faiss.downcast_VectorTransform(transform)
        # The downcast wrapper must own the C++ object, or it dies with ``transform``.
        transform.this.disown()  # type: ignore[attr-defined]  # SWIG proxy attribute
        pca.this.own(True)  # type: ignore[attr-defined]
        if not isinstance(pca, faiss.PCAMatrix):
            raise CorruptStoreError(f"whitening data holds a {type(pca).__name__}, not a PCA matrix")
        return cls(pca)

    def save(self, path: Path) -> str:
        """Atomically write to ``path``; returns the sha256 of what was written."""
        data = self.to_bytes()
        atomic_write_bytes(path, data)
        return hashlib.sha256(data).hexdigest()

    def save_recorded(self, data_dir: Path) -> dict[str, Any]:
        """Write to a content-addressed ``whitening-<hex>.faiss`` in ``data_dir`` (atomically) and return
        the manifest entry that names it (``file``, ``sha256``, ``d_in``, ``d_out``; see
        :meth:`load_recorded`)."""
        data = self.to_bytes()
        sha = hashlib.sha256(data).hexdigest()
        name = f"whitening-{sha[:16]}.faiss"
        atomic_write_bytes(data_dir / name, data)
        return {"file": name, "sha256": sha, "d_in": self.d_in, "d_out": self.d_out}

    @staticmethod
    def remove_unrecorded(data_dir: Path, entry: Mapping[str, Any] | None) -> None:
        """Delete every whitening file in ``data_dir`` but the one ``entry`` names (all of them for
        None); call once the manifest that names ``entry`` is written."""
        keep = str(entry.get("file")) if entry else None
        for old in data_dir.glob("whitening-*.faiss"):
            if old.name != keep:
                old.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path, *, expected_sha256: str | None = None) -> Whitening:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CorruptStoreError(f"whitening file {path.name} could not be read: {exc}") from exc
        if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
            raise CorruptStoreError(f"whitening file {path.name} does not match its checksum in the manifest")
        return cls.from_bytes(data)

    @classmethod
    def load_recorded(cls, data_dir: Path, entry: Mapping[str, Any] | None) -> Whitening | None:
        """The whitening a manifest entry (``{"file", "sha256", ...}``) names, verified against its
        checksum; None for no entry. The name must be a content-addressed ``whitening-<hex>.faiss``
        inside ``data_dir``: a path written in the manifest is never followed.

        Raises:
            CorruptStoreError: An invalid name, a missing file or a checksum mismatch.
        """
        if not entry:
            return None
        name = str(entry.get("file", ""))
        if not _FILE_RE.fullmatch(name):
            raise CorruptStoreError(f"manifest names an invalid whitening file {name!r}")
        return cls.load(data_dir / name, expected_sha256=str(entry.get("sha256")))
