"""App fixtures: a real app (lifespan and all) over a temporary data dir, via TestClient."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from deepfeat.app.main import create_app
from deepfeat.settings import Settings
from tests.conftest import jpeg_bytes

MakeClient = Callable[..., Any]


FAST = {"layer": "penultimate", "resize_mode": "crop", "scales": [1.0]}
"""Unless a test sets them, app tests use the cheapest embedding (see tests/conftest.FAST_EMBEDDER)."""


@contextmanager
def _client(tmp: Path, *, fast: bool = True, **overrides: Any) -> Iterator[TestClient]:
    use_fast = fast and not {"layer", "model"} & overrides.keys()
    explicit = FAST if use_fast else {}
    settings = Settings(data_dir=tmp / "data", **{**explicit, **overrides})
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Build a client with extra settings; closed at teardown."""
    stack: list[Any] = []

    def make(*, fast: bool = True, **overrides: Any) -> TestClient:
        """``fast=False``: no embedder settings at all, as a user who sets none."""
        cm = _client(tmp_path, fast=fast, **overrides)
        stack.append(cm)
        return cm.__enter__()

    yield make
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One app per test module (the model loads once), empty store."""
    with _client(tmp_path_factory.mktemp("app")) as c:
        yield c


def upload(
    image: Image.Image | bytes, name: str = "photo.jpg", content_type: str = "image/jpeg"
) -> dict[str, Any]:
    data = image if isinstance(image, bytes) else jpeg_bytes(image)
    return {"file": (name, data, content_type)}


def expect_error(resp: Any, status: int, code: str) -> dict[str, Any]:
    """An error answer with this status and stable code, and a message for people."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    body: dict[str, Any] = resp.json()
    assert body["code"] == code and body["detail"], body
    return body
