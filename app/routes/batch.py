"""Batch routes: several images in one request, one status per image.

Each route takes repeated multipart ``files`` fields (at most ``DEEPFEAT_MAX_BATCH_FILES``) and answers
200 with ``{"items": [...]}`` in upload order. An item is ``{"status": 2xx, "result": <the single
route's response>}`` or ``{"status": 4xx, "code": ..., "detail": ...}``: a bad file fails alone,
and the good ones go through the model together (one call to the batcher for all of them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse

from deepfeat.app.deps import State, read_upload, require_read, require_write
from deepfeat.app.errors import APIError, status_of
from deepfeat.app.routes.classify import classify_images
from deepfeat.app.routes.common import model_info
from deepfeat.app.routes.images import _parse_metadata
from deepfeat.app.routes.search import check_k, search_response
from deepfeat.app.schemas import BatchResponse, EmbedResponse, error_responses
from deepfeat.classifiers import DEFAULT_CLASSIFIER
from deepfeat.index.errors import StoreError
from deepfeat.index.store import NewImage
from deepfeat.models.errors import ModelError
from deepfeat.models.images import LoadedImage, make_thumbnail

router = APIRouter(prefix="/v1", tags=["batch"])

MAX_BATCH_FILES_CAP = 256
"""The parser's own ceiling (the largest DEEPFEAT_MAX_BATCH_FILES allowed); the setting is checked per request."""
Files = Annotated[list[UploadFile], File(description="The images, as repeated `files` fields")]
_ERRORS = error_responses(400, 401, 413, 422, 503)


def _error_item(exc: Exception) -> dict[str, Any]:
    return {"status": status_of(exc), "code": getattr(exc, "code", "error"), "detail": str(exc)}


def _decode(
    state: State, files: Sequence[UploadFile]
) -> tuple[list[dict[str, Any] | None], list[tuple[int, LoadedImage]]]:
    """Per file: an error item, or the decoded image to run (with its position)."""
    if len(files) > state.settings.max_batch_files:
        raise APIError(
            422,
            "too_many_files",
            f"{len(files)} files is above this server's limit of {state.settings.max_batch_files} "
            "(DEEPFEAT_MAX_BATCH_FILES)",
        )
    items: list[dict[str, Any] | None] = [None] * len(files)
    ok: list[tuple[int, LoadedImage]] = []
    for i, upload in enumerate(files):
        try:
            ok.append((i, read_upload(state, upload)))
        except (ModelError, StoreError) as exc:
            items[i] = _error_item(exc)
    return items, ok


def _answer(items: list[dict[str, Any] | None]) -> JSONResponse:
    return JSONResponse({"items": items})


def _fill(
    items: list[dict[str, Any] | None],
    ok: list[tuple[int, LoadedImage]],
    results: Sequence[Any],
    *,
    status: int | Callable[[Any], int] = 200,
) -> None:
    for (i, _), result in zip(ok, results, strict=True):
        code = status(result) if callable(status) else status
        items[i] = {
            "status": code,
            "result": result.model_dump(mode="json") if hasattr(result, "model_dump") else result,
        }


@router.post(
    "/search/batch", response_model=BatchResponse, responses=_ERRORS, dependencies=[Depends(require_read)],
    form_limits={"max_files": MAX_BATCH_FILES_CAP, "max_fields": 8 + MAX_BATCH_FILES_CAP},
)  # fmt: skip
def search_batch(
    state: State,
    files: Files,
    k: Annotated[int, Query(ge=1, le=10_000, description="Results per image (at most max_k)")] = 10,
    min_score: Annotated[
        float | None, Query(ge=-1, le=1, description="Drop results scoring below this")
    ] = None,
    similarity: Annotated[Literal["visual", "semantic"], Query(description="As for /v1/search")] = "visual",
) -> JSONResponse:
    """/v1/search for each uploaded image, in one forward pass and one index search for all."""
    started = time.perf_counter()
    check_k(state, k)
    if similarity == "semantic":
        state.store.semantic_index()
    items, ok = _decode(state, files)
    if ok:
        vectors = state.inference.embed([img.image for _, img in ok], similarity=similarity)
        hits = state.store.search(vectors, k, similarity=similarity)
        _fill(items, ok, [search_response(state, h, min_score=min_score, started=started) for h in hits])
    return _answer(items)


@router.post(
    "/embed/batch", response_model=BatchResponse, responses=_ERRORS, dependencies=[Depends(require_read)],
    form_limits={"max_files": MAX_BATCH_FILES_CAP, "max_fields": 8 + MAX_BATCH_FILES_CAP},
)  # fmt: skip
def embed_batch(
    state: State,
    files: Files,
    layer: Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")] = None,
    pooling: Annotated[str | None, Query(max_length=16, pattern=r"^[A-Za-z0-9_.\-]+$")] = None,
) -> JSONResponse:
    """/v1/embed for each uploaded image."""
    embedder = state.inference.variant(layer=layer, pooling=pooling)
    items, ok = _decode(state, files)
    if ok:
        vectors = state.inference.embed([img.image for _, img in ok], embedder)
        info = model_info(state.inference.embedder)
        _fill(items, ok, [
            EmbedResponse(model=info, layer=embedder.layer.name, pooling=embedder.pooling_id,
                          dim=embedder.dim, vector=v.tolist())
            for v in vectors
        ])  # fmt: skip
    return _answer(items)


@router.post(
    "/classify/batch", response_model=BatchResponse, responses=error_responses(400, 401, 404, 409, 413, 422, 503),
    dependencies=[Depends(require_read)], form_limits={"max_files": MAX_BATCH_FILES_CAP, "max_fields": 8 + MAX_BATCH_FILES_CAP},
)  # fmt: skip
def classify_batch(
    state: State,
    files: Files,
    k: Annotated[int, Query(ge=1, le=1000, description="Number of classes")] = 5,
    classifier: Annotated[str, Query(min_length=1, max_length=64)] = DEFAULT_CLASSIFIER,
) -> JSONResponse:
    """/v1/classify for each uploaded image."""
    if classifier not in (DEFAULT_CLASSIFIER, "knn"):
        state.classifiers.get(classifier)
    items, ok = _decode(state, files)
    if ok:
        _fill(items, ok, classify_images(state, [img.image for _, img in ok], k=k, classifier=classifier))
    return _answer(items)


@router.post(
    "/images/batch", response_model=BatchResponse, responses=error_responses(400, 401, 403, 413, 422, 503, 507),
    dependencies=[Depends(require_write)], form_limits={"max_files": MAX_BATCH_FILES_CAP, "max_fields": 8 + MAX_BATCH_FILES_CAP},
)  # fmt: skip
def add_batch(
    state: State,
    files: Files,
    metadata: Annotated[str | None, Form(description="A JSON object stored with every image")] = None,
) -> JSONResponse:
    """/v1/images for each uploaded image (source: its file name); 201 items are new, 200 already there."""
    meta = _parse_metadata(metadata)
    items, ok = _decode(state, files)
    known = state.store.find_existing([img.sha256 for _, img in ok])
    new = [(i, img) for i, img in ok if img.sha256 not in known]
    for i, img in ok:
        if img.sha256 in known:
            items[i] = {"status": 200, "result": {"id": known[img.sha256], "created": False}}
    if new:
        visual, semantic = state.inference.vectors([img.image for _, img in new])
        if state.store.semantic_dim is None:
            semantic = None
        results = state.store.add(
            visual,
            [
                NewImage(
                    sha256=img.sha256, source=files[i].filename or None, width=img.upright_size[0],
                    height=img.upright_size[1], nbytes=img.nbytes, metadata=meta,
                    thumbnail=make_thumbnail(img.image),
                )
                for i, img in new
            ],
            semantic=semantic,
        )  # fmt: skip
        _fill(items, new, [{"id": r.id, "created": r.created} for r in results],
              status=lambda r: 201 if r["created"] else 200)  # fmt: skip
    return _answer(items)
