"""Model calls for the service: micro-batched forward passes, bounded queues, metrics.

Routes never touch the Embedder directly. Preprocessing (resize, normalise) runs in the request's
own worker thread, in parallel; only the forward pass is serialised and batched.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from PIL import Image

from deepfeat.app.metrics import Metrics
from deepfeat.models.batching import MicroBatcher
from deepfeat.models.embedder import SIMILARITIES, Embedder, Prediction
from deepfeat.models.errors import InvalidOptionError, Overloaded

__all__ = ["Batcher", "Inference"]

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Protocol[R]):
    """What :class:`Inference` needs of a batcher (:class:`deepfeat.models.batching.MicroBatcher`,
    or Ray Serve's ``@serve.batch`` on a replica: :class:`deepfeat.app.ray_serve.ServeBatcher`)."""

    def submit_many(self, items: Sequence[Any]) -> list[R]: ...

    def close(self) -> None: ...


Vectors = tuple[np.ndarray, np.ndarray | None]
"""One image's vectors from one forward pass: (m, dim) visual (global first), (d_s,) semantic or None."""


class Inference:
    """Args:
    embedder: the loaded model.
    metrics: where batch sizes and forward times go.
    batching: gather concurrent requests into one forward pass (else one pass per request).
    max_batch: most images per forward pass.
    max_wait_ms: how long the first request of a batch waits for company.
    max_queue: images allowed to wait; beyond that requests get :class:`Overloaded` (503 ``overloaded``).
    batcher: builds each batcher, called like :class:`MicroBatcher` (the default).
    """

    def __init__(
        self,
        embedder: Embedder,
        metrics: Metrics,
        *,
        batching: bool = True,
        max_batch: int = 16,
        max_wait_ms: float = 2.0,
        max_queue: int = 64,
        batcher: Callable[..., Batcher[Any]] = MicroBatcher,
    ) -> None:
        self.embedder = embedder
        self.metrics = metrics
        self.batching = batching
        self._direct = threading.Lock()  # one forward pass at a time: each already uses every core
        self._waiting = threading.BoundedSemaphore(max_queue)
        self._embedder_batcher: Batcher[Vectors] | None = None
        self._logits_batcher: Batcher[torch.Tensor] | None = None
        if batching:
            # Both batchers gather concurrent requests the same way; they differ in what they run.
            make = functools.partial(
                batcher,
                max_batch=max_batch,
                max_wait_s=max_wait_ms / 1000,
                max_queue=max_queue,
                on_batch=self._observe,
            )
            self._embedder_batcher = make(self._embed_batch, name="embed-batcher")
            self._logits_batcher = make(self._logits_batch, name="classify-batcher")

    # -- batch functions (run in the batcher thread) --------------------------------------------

    def _timed(self, fn: Callable[[], T]) -> T:
        started = time.perf_counter()
        result = fn()
        self.metrics.forward_seconds.observe(time.perf_counter() - started)
        return result

    def _observe(self, n: int) -> None:
        self.metrics.batch_size.observe(n)

    def _vectors(self, tensors: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray | None]:
        """(n, m, dim) visual and (n, d_s) semantic vectors (None without a semantic layer), from one
        forward pass per size and scale."""
        if self.embedder.semantic_dim is None:
            return self.embedder.embed_tensors(tensors, regions=True), None
        return self.embedder.embed_tensors(tensors, regions=True, semantic=True)

    def _embed_batch(self, tensors: list[torch.Tensor]) -> list[Vectors]:
        # Regional and semantic vectors come from the same forward pass for a few pooling ops, so
        # every request gets them and a search and an add (visual or semantic) can share a batch.
        visual, semantic = self._timed(lambda: self._vectors(tensors))
        return [(visual[i], None if semantic is None else semantic[i]) for i in range(len(tensors))]

    def _logits_batch(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(self._timed(lambda: self.embedder.logits(tensors)))

    # -- request side ----------------------------------------------------------------------------

    def _run_direct(self, n: int, fn: Callable[[], T]) -> T:
        if not self._waiting.acquire(blocking=False):
            raise Overloaded
        try:
            with self._direct:
                result = self._timed(fn)
                self._observe(n)
                return result
        finally:
            self._waiting.release()

    def variant(self, *, layer: str | None = None, pooling: str | None = None) -> Embedder:
        """The loaded model read at another layer or pooling (no second copy of the weights)."""
        if layer is None and pooling is None:
            return self.embedder
        return self.embedder.variant(layer=layer, pooling=pooling)

    def vectors(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray | None]:
        """What the store keeps per image, from one forward pass: (n, vectors_per_image, dim) visual
        vectors (global first) and (n, d_s) semantic ones (None when the model has no semantic layer)."""
        tensors = self.embedder.preprocess(images)
        if self._embedder_batcher is None:
            return self._run_direct(len(images), lambda: self._vectors(tensors))
        results = self._embedder_batcher.submit_many(tensors)
        visual = np.stack([r[0] for r in results])  # (n, m, dim)
        semantic = [r[1] for r in results if r[1] is not None]
        return visual, np.stack(semantic) if semantic and len(semantic) == len(results) else None

    def embed(
        self,
        images: Sequence[Image.Image],
        embedder: Embedder | None = None,
        *,
        regions: bool = False,
        similarity: str = "visual",
    ) -> np.ndarray:
        """(n, dim) vectors; ``embedder`` may be a variant (another layer) of the loaded model. With
        ``regions``, what the store keeps per image: (n, vectors_per_image, dim), global first. With
        ``similarity="semantic"``, the (n, d_s) semantic vectors.

        Raises:
            InvalidOptionError: semantic asked of a model without a semantic layer, or an unknown
                similarity.
        """
        if embedder is not None and embedder is not self.embedder:
            variant = embedder
            if similarity == "visual":
                return self._run_direct(len(images), lambda: variant.embed(images))
            return self._run_direct(len(images), lambda: variant.embed(images, similarity=similarity))
        if similarity not in SIMILARITIES:
            raise InvalidOptionError(
                f"unknown similarity {similarity!r}; choose one of: {', '.join(SIMILARITIES)}"
            )
        if similarity == "semantic" and self.embedder.semantic_dim is None:
            raise InvalidOptionError("the loaded model has no semantic layer (semantic_layer=none)")
        visual, semantic = self.vectors(images)
        if similarity == "semantic" and semantic is not None:
            return semantic
        return visual if regions else visual[:, 0]

    def classify(self, images: Sequence[Image.Image], *, k: int) -> list[list[Prediction]]:
        tensors = self.embedder.classify_inputs(images)
        if self._logits_batcher is None:
            logits = self._run_direct(len(images), lambda: self.embedder.logits(tensors))
        else:
            logits = torch.stack(self._logits_batcher.submit_many(tensors))
        return self.embedder.top_k(logits, k=k)

    def close(self) -> None:
        for batcher in (self._embedder_batcher, self._logits_batcher):
            if batcher is not None:
                batcher.close()
