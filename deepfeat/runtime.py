"""The composition root: settings -> Embedder and ImageStore, shared by the service and the CLI.

It composes models/ and index/ (which never import each other) and loads no web stack, so every
command but ``serve`` runs without FastAPI. An existing store decides what its vectors mean: the
options recorded in its manifest are used unless the user set them explicitly, in which case a
mismatch is refused by the store (never mixed). :meth:`EmbedderConfig.merged` holds that rule.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from deepfeat.models.config import EmbedderConfig
from deepfeat.settings import Settings

if TYPE_CHECKING:
    from deepfeat.index.manifest import Manifest
    from deepfeat.index.store import ImageStore
    from deepfeat.models.embedder import Embedder
    from deepfeat.models.images import ImageLimits

__all__ = [
    "build_embedder",
    "embedder_config",
    "image_limits",
    "open_store",
    "read_manifest",
    "stored_config",
]

log = logging.getLogger(__name__)


def read_manifest(settings: Settings) -> Manifest | None:
    """The manifest of the store in ``settings.data_dir`` (None when there is no store yet)."""
    from deepfeat.index.store import ImageStore

    return ImageStore.read_manifest(settings.data_dir)


def stored_config(manifest: Manifest | None) -> EmbedderConfig | None:
    """The options an existing store was made with: as its manifest recorded them, or, for a store
    written before manifests recorded them, as its fingerprint describes them."""
    if manifest is None:
        return None
    if manifest.embedder is not None:
        return EmbedderConfig.from_manifest(manifest.embedder)
    return EmbedderConfig.from_fingerprint(manifest.fingerprint)


def embedder_config(settings: Settings, manifest: Manifest | None = None) -> EmbedderConfig:
    """Explicit settings, else the store's manifest, else the defaults."""
    if manifest is None:
        manifest = read_manifest(settings)
    return settings.embedder.merged(
        explicit=settings.explicit_embedder_options(), stored=stored_config(manifest)
    )


def build_embedder(settings: Settings, manifest: Manifest | None = None) -> Embedder:
    from deepfeat.models.embedder import Embedder

    return Embedder(
        embedder_config(settings, manifest),
        device=settings.device,
        precision=settings.precision,
        compile=settings.compile,
        backend=settings.backend,
    )


def open_store(settings: Settings, embedder: Embedder, *, read_only: bool = False) -> ImageStore:
    from deepfeat.index.store import ImageStore

    store = ImageStore.open(
        settings.data_dir,
        fingerprint=embedder.fingerprint,
        dim=embedder.dim,
        index_factory=settings.index_factory,
        read_only=read_only,
        snapshot_every=settings.snapshot_every,
        embedder_config=embedder.config.model_dump(mode="json"),
        semantic_dim=embedder.semantic_dim,
        lock_timeout_s=settings.lock_timeout_s,
    )
    if not read_only:
        store.record_writer(embedder.numerics)
    return store


def image_limits(settings: Settings) -> ImageLimits:
    from deepfeat.models.images import ImageLimits

    return ImageLimits(max_pixels=settings.max_pixels, min_side=settings.min_side)
