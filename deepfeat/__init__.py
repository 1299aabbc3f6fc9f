"""deepfeat: image retrieval, classification and feature extraction on deep CNN features.

The public Python API. Names are imported on first use, so ``import deepfeat`` (and the
``deepfeat`` command's start-up) does not load torch, FAISS or the web stack until they are needed.

>>> from deepfeat import Embedder, EmbedderConfig, ImageStore, load_image
>>> embedder = Embedder(EmbedderConfig())            # the documented defaults
>>> vectors = embedder.embed([load_image("cat.jpg").image])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

__all__ = [
    "Client",
    "DeepfeatAPIError",
    "Embedder",
    "EmbedderConfig",
    "ImageLimits",
    "ImageStore",
    "IncompatibleIndexError",
    "ModelError",
    "NewImage",
    "Settings",
    "StoreError",
    "build_embedder",
    "load_image",
    "open_store",
    "__version__",
]

_LAZY = {
    "Client": "deepfeat.client",
    "DeepfeatAPIError": "deepfeat.client",
    "Embedder": "deepfeat.models.embedder",
    "EmbedderConfig": "deepfeat.models.config",
    "ImageLimits": "deepfeat.models.images",
    "load_image": "deepfeat.models.images",
    "ModelError": "deepfeat.models.errors",
    "ImageStore": "deepfeat.index.store",
    "NewImage": "deepfeat.index.store",
    "StoreError": "deepfeat.index.errors",
    "IncompatibleIndexError": "deepfeat.index.errors",
    "Settings": "deepfeat.settings",
    "build_embedder": "deepfeat.runtime",
    "open_store": "deepfeat.runtime",
}

if TYPE_CHECKING:
    from deepfeat.client import Client, DeepfeatAPIError
    from deepfeat.index.errors import IncompatibleIndexError, StoreError
    from deepfeat.index.store import ImageStore, NewImage
    from deepfeat.models.config import EmbedderConfig
    from deepfeat.models.embedder import Embedder
    from deepfeat.models.errors import ModelError
    from deepfeat.models.images import ImageLimits, load_image
    from deepfeat.runtime import build_embedder, open_store
    from deepfeat.settings import Settings


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'deepfeat' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
