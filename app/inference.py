"""Model calls for the service: bounded concurrency, metrics, and the one place a forward pass happens.

Routes never touch the Embedder directly, so batching strategies can change here without touching them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from PIL import Image

from app.metrics import Metrics
from models.embedder import Embedder, Prediction

__all__ = ["Inference"]

T = TypeVar("T")


class Inference:
    def __init__(self, embedder: Embedder, metrics: Metrics, *, max_concurrency: int = 2) -> None:
        self.embedder = embedder
        self.metrics = metrics
        # More concurrent forward passes than cores only thrash the CPU's caches and threads.
        self._slots = threading.BoundedSemaphore(max_concurrency)

    def _run(self, n: int, fn: Callable[[], T]) -> T:
        with self._slots:
            started = time.perf_counter()
            result = fn()
            self.metrics.forward_seconds.observe(time.perf_counter() - started)
            self.metrics.batch_size.observe(n)
            return result

    def embed(self, images: list[Image.Image], embedder: Embedder | None = None) -> np.ndarray:
        emb = embedder or self.embedder
        return self._run(len(images), lambda: emb.embed(images))

    def classify(self, images: list[Image.Image], *, k: int) -> list[list[Prediction]]:
        return self._run(len(images), lambda: self.embedder.classify(images, k=k))

    def embed_and_classify(
        self, images: list[Image.Image], *, k: int
    ) -> tuple[np.ndarray, list[list[Prediction]]]:
        return self._run(len(images), lambda: self.embedder.embed_and_classify(images, k=k))
