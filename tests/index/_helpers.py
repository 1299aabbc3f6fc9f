"""Helpers for the index tests: seeded unit vectors and image descriptions."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from deepfeat.index.store import NewImage

DIM = 32
FINGERPRINT: dict[str, Any] = {"model": "resnet50", "weights": "IMAGENET1K_V2", "layer": "layer4", "dim": DIM}


def unit_vectors(n: int, dim: int = DIM, *, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 L2-normalised random vectors from a seeded RNG."""
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def sha_of(key: object) -> str:
    return hashlib.sha256(str(key).encode()).hexdigest()


def new_images(n: int, *, start: int = 0, thumbnail: bool = False, **metadata: Any) -> list[NewImage]:
    """n distinct images (sha256 of their index), optionally with a fake JPEG thumbnail."""
    return [
        NewImage(
            sha256=sha_of(i),
            source=f"/photos/{i}.jpg",
            width=640,
            height=480,
            nbytes=1000 + i,
            metadata={"i": i, **metadata},
            thumbnail=(b"\xff\xd8thumb-" + str(i).encode()) if thumbnail else None,
        )
        for i in range(start, start + n)
    ]


def flip_byte(path: Path, offset: int, mask: int = 0xFF) -> None:
    """Corrupt one byte of ``path`` in place (XOR with ``mask``), as a bad disk or copy would."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ mask]))
