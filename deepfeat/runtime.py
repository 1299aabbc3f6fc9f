"""Composition shared by the service and the CLI: settings -> Embedder and ImageStore.

An existing store decides what its vectors mean: the embedder options recorded in its manifest are used
unless the user set them explicitly, in which case a mismatch is refused by the store (never mixed).
"""

from __future__ import annotations

import logging
from typing import Any

from deepfeat.index.store import ImageStore
from deepfeat.models.embedder import Embedder
from deepfeat.models.heads import embedder_kwargs
from deepfeat.models.images import ImageLimits
from deepfeat.settings import Settings

__all__ = ["embedder_options", "build_embedder", "open_store", "image_limits"]

log = logging.getLogger(__name__)


def embedder_options(settings: Settings) -> dict[str, Any]:
    """Embedder keyword arguments: explicit settings, else the store's manifest, else defaults."""
    options: dict[str, Any] = {
        "model": settings.model,
        "weights": settings.weights,
        "layer": settings.layer,
        "pooling": settings.pooling,
        "gem_p": settings.gem_p,
        "resize_mode": settings.resize_mode,
        "max_side": settings.max_side,
        "scales": tuple(settings.scales),
    }
    manifest = ImageStore.read_manifest(settings.data_dir)
    if manifest is not None:
        from_store = embedder_kwargs(manifest.fingerprint)
        explicit = settings.explicit_embedder_options()
        if "model" in explicit or "layer" in explicit:
            # Another network or layer: the store's pooling may not even apply; let the store
            # refuse the mismatch by name instead of failing on a pooling/layer combination.
            from_store.pop("pooling", None)
            from_store.pop("gem_p", None)
        for key, value in from_store.items():
            if key not in explicit:
                options[key] = value
    return options


def build_embedder(settings: Settings) -> Embedder:
    return Embedder(
        **embedder_options(settings),
        device=settings.device,
        precision=settings.precision,
        compile=settings.compile,
    )


def open_store(settings: Settings, embedder: Embedder, *, read_only: bool = False) -> ImageStore:
    return ImageStore.open(
        settings.data_dir,
        fingerprint=embedder.fingerprint,
        dim=embedder.dim,
        index_factory=settings.index_factory,
        read_only=read_only,
        snapshot_every=settings.snapshot_every,
    )


def image_limits(settings: Settings) -> ImageLimits:
    return ImageLimits(max_pixels=settings.max_pixels, min_side=settings.min_side)
