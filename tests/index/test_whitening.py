"""PCA-whitening: fitted on data, outputs decorrelated with unit variance, save/load round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepfeat.index.errors import CorruptStoreError, InvalidArgumentError
from deepfeat.index.whitening import Whitening


def _correlated(n: int = 2000, d: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.geomspace(10.0, 0.1, d)  # a few dominant directions, like raw CNN features
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (rng.standard_normal((n, d)) * scales) @ basis.T + rng.standard_normal(d) * 3


def test_projection_is_whitened() -> None:
    x = _correlated()
    w = Whitening.fit(x, dim=16)
    # Before the final L2 normalisation the PCA part has a covariance proportional to the identity
    # (FAISS leaves a global scale, which the L2 normalisation removes anyway).
    y = w._pca.apply(x.astype(np.float32))
    cov = np.cov(y, rowvar=False)
    assert np.allclose(cov / np.mean(np.diag(cov)), np.eye(16), atol=0.1)
    out = w.apply(x)
    assert out.shape == (len(x), 16) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_rows_of_the_projection_are_orthonormal_directions() -> None:
    x = _correlated(d=24)
    w = Whitening.fit(x, dim=24, power=0.0)  # power 0: a pure rotation after centring
    a = np.ascontiguousarray(x[:5], dtype=np.float32)
    b = np.ascontiguousarray(x[5:10], dtype=np.float32)
    ya, yb = w._pca.apply(a), w._pca.apply(b)
    # Rotations preserve distances between points.
    assert np.allclose(np.linalg.norm(ya - yb, axis=1), np.linalg.norm(a - b, axis=1), rtol=1e-3)


def test_save_load_round_trip(tmp_path: Path) -> None:
    x = _correlated()
    w = Whitening.fit(x, dim=8)
    sha = w.save(tmp_path / "w.faiss")
    again = Whitening.load(tmp_path / "w.faiss", expected_sha256=sha)
    assert (again.d_in, again.d_out) == (32, 8)
    assert np.array_equal(again.apply(x[:10]), w.apply(x[:10]))
    with pytest.raises(CorruptStoreError, match="checksum"):
        Whitening.load(tmp_path / "w.faiss", expected_sha256="0" * 64)
    (tmp_path / "bad.faiss").write_bytes(b"garbage")
    with pytest.raises(CorruptStoreError):
        Whitening.load(tmp_path / "bad.faiss")


def test_bad_arguments() -> None:
    x = _correlated(n=10, d=32)
    with pytest.raises(InvalidArgumentError, match="between 1 and 9"):
        Whitening.fit(x, dim=16)
    with pytest.raises(InvalidArgumentError, match="at least 2"):
        Whitening.fit(x[:1])
    with pytest.raises(InvalidArgumentError, match=r"\(n, 32\)"):
        Whitening.fit(x, dim=4).apply(np.zeros((2, 31), dtype=np.float32))
