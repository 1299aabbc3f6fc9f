"""Request dependencies: the app's state, API keys, and turning an upload into a safe image."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, UploadFile
from fastapi.security import APIKeyHeader

from deepfeat.app.errors import APIError
from deepfeat.app.inference import Inference
from deepfeat.app.metrics import Metrics
from deepfeat.classifiers import ClassifierRegistry
from deepfeat.index.store import ImageStore
from deepfeat.models.images import ImageLimits, LoadedImage, load_image
from deepfeat.settings import Settings

__all__ = ["AppState", "Runtime", "get_runtime", "require_read", "require_write", "read_upload", "State"]


@dataclass
class Runtime:
    """What a request needs once the service is ready: never half-built."""

    settings: Settings
    metrics: Metrics
    inference: Inference
    store: ImageStore
    limits: ImageLimits
    classifiers: ClassifierRegistry


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    runtime: Runtime | None = None
    not_ready_reason: str | None = "starting"


def get_runtime(request: Request) -> Runtime:
    state: AppState = request.app.state.deepfeat
    if state.runtime is None:
        raise APIError(
            503, "not_ready", f"service not ready: {state.not_ready_reason}", headers={"Retry-After": "5"}
        )
    return state.runtime


State = Annotated[Runtime, Depends(get_runtime)]

_api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="API key, when the server sets one"
)


def _digest(value: str) -> bytes:
    # Compare fixed-length digests so the comparison time does not depend on the key's length either.
    return hashlib.sha256(value.encode("utf-8")).digest()


def _matches(given: str | None, *keys: str | None) -> bool:
    if given is None:
        return False
    ok = False
    for key in keys:
        if key is not None:
            ok |= secrets.compare_digest(_digest(given), _digest(key))
    return ok


def _unauthorized(given: str | None) -> APIError:
    detail = "missing API key: send it in the X-API-Key header" if given is None else "wrong API key"
    return APIError(401, "unauthorized", detail, headers={"WWW-Authenticate": "X-API-Key"})


def require_write(request: Request, api_key: Annotated[str | None, Depends(_api_key_header)] = None) -> None:
    """Write routes need DEEPFEAT_API_KEY when one is set, and a server that is not a read replica.

    A replica refuses before reading the upload or running the model: the answer cannot change.
    """
    settings: Settings = request.app.state.deepfeat.settings
    if settings.read_only:
        raise APIError(
            403,
            "read_only",
            "this server is a read-only replica (DEEPFEAT_READ_ONLY): send adds and deletes to the writer",
        )
    key = settings.api_key.get_secret_value() if settings.api_key else None
    if key is not None and not _matches(api_key, key):
        raise _unauthorized(api_key)


def require_read(request: Request, api_key: Annotated[str | None, Depends(_api_key_header)] = None) -> None:
    """Read routes stay open unless DEEPFEAT_READ_API_KEY is set (the write key also reads)."""
    settings: Settings = request.app.state.deepfeat.settings
    if settings.read_api_key is None:
        return
    write = settings.api_key.get_secret_value() if settings.api_key else None
    if not _matches(api_key, settings.read_api_key.get_secret_value(), write):
        raise _unauthorized(api_key)


def read_upload(state: Runtime, file: UploadFile) -> LoadedImage:
    """Decode an upload with the same loader, limits and decode size the batch indexer uses, so a file
    that indexes is a file that searches (routes are sync, so this runs in a worker thread)."""
    data = file.file.read()
    return load_image(data, limits=state.limits, draft_size=state.inference.embedder.decode_size)
