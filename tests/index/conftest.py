"""Fixtures for the index tests: a data directory and a store factory that closes what it opened."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deepfeat.index.store import ImageStore
from tests.index._helpers import DIM, FINGERPRINT


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def open_store(data_dir: Path) -> Iterator[Callable[..., ImageStore]]:
    """Factory opening stores on ``data_dir`` (defaults: FINGERPRINT, DIM); closes them all afterwards."""
    opened: list[ImageStore] = []

    def _open(path: Path | None = None, **kwargs: Any) -> ImageStore:
        kwargs.setdefault("fingerprint", FINGERPRINT)
        kwargs.setdefault("dim", DIM)
        store = ImageStore.open(path or data_dir, **kwargs)
        opened.append(store)
        return store

    yield _open
    for store in opened:
        store.close()
