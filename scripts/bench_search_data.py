"""The vectors of the search benchmark (``deepfeat bench search``, ``deepfeat bench build``): a synthetic
mixture shaped like CNN features, and noisy copies of real-photo embeddings. Both are float32, L2-normalised,
with the queries held out from the collection; :mod:`scripts.bench_search` describes them for users."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from deepfeat.scripts.bench_common import COLOUR_PHOTOS, real_photos

__all__ = ["Dataset", "real_dataset", "real_seeds", "synthetic_dataset"]

_CHUNK = 100_000
"""Synthetic vectors generated per step (bounds the temporary arrays)."""
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


def _normalize(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


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
    for start in range(0, total, _CHUNK):
        stop = min(start + _CHUNK, total)
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
