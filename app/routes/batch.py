"""Batch routes: several images in one request, one status per image.

Each route takes repeated multipart ``files`` fields (at most ``DEEPFEAT_MAX_BATCH_FILES``) and answers
200 with ``{"items": [...]}`` in upload order. An item is ``{"status": 2xx, "result": <the single
route's response>}`` or ``{"status": 4xx, "code": ..., "detail": ...}``: a bad file fails alone,
and the good ones go through the model together (one call to the batcher for all of them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel

from deepfeat.app.deps import State, read_upload, require_read, require_write
from deepfeat.app.errors import APIError, status_of
from deepfeat.app.routes.classify import check_classifier, classify_images
from deepfeat.app.routes.common import model_info
from deepfeat.app.routes.images import _parse_metadata, add_images
from deepfeat.app.routes.search import K, MinScore, SimilarityParam, Where, check_k, search_response
from deepfeat.app.schemas import BatchResponse, EmbedResponse, error_responses
from deepfeat.classifiers import DEFAULT_CLASSIFIER
from deepfeat.index.errors import StoreError
from deepfeat.models.errors import ModelError
from deepfeat.models.images import LoadedImage

router = APIRouter(prefix="/v1", tags=["batch"])

MAX_BATCH_FILES_CAP = 256
"""The parser's own ceiling (the largest DEEPFEAT_MAX_BATCH_FILES allowed); the setting is checked per request."""
Files = Annotated[list[UploadFile], File(description="The images, as repeated `files` fields")]
Item = dict[str, Any]


def _route(path: str, *, statuses: tuple[int, ...], auth: Callable[..., None]) -> Callable[[Any], Any]:
    """``POST path`` as a batch route: up to the cap of file parts, the batch response's schema."""
    return router.post(
        path,
        response_model=BatchResponse,
        responses=error_responses(*statuses),
        dependencies=[Depends(auth)],
        form_limits={"max_files": MAX_BATCH_FILES_CAP, "max_fields": 8 + MAX_BATCH_FILES_CAP},
    )


def _decode(
    state: State, files: Sequence[UploadFile]
) -> tuple[list[Item | None], list[tuple[int, LoadedImage]]]:
    """Per file: an error item, or the decoded image to run (with its position)."""
    if len(files) > state.settings.max_batch_files:
        raise APIError(
            422,
            "too_many_files",
            f"{len(files)} files is above this server's limit of {state.settings.max_batch_files} "
            "(DEEPFEAT_MAX_BATCH_FILES)",
        )
    items: list[Item | None] = [None] * len(files)
    ok: list[tuple[int, LoadedImage]] = []
    for i, upload in enumerate(files):
        try:
            ok.append((i, read_upload(state, upload)))
        except (ModelError, StoreError) as exc:
            items[i] = {"status": status_of(exc), "code": getattr(exc, "code", "error"), "detail": str(exc)}
    return items, ok


def _answer(
    items: list[Item | None],
    ok: list[tuple[int, LoadedImage]],
    results: Sequence[BaseModel],
    *,
    statuses: Sequence[int] | None = None,
) -> JSONResponse:
    """The batch response: each decoded file's result (in ``ok``'s order, with its status: 200
    unless given) beside the files that failed."""
    for n, ((i, _), result) in enumerate(zip(ok, results, strict=True)):
        items[i] = {
            "status": 200 if statuses is None else statuses[n],
            "result": result.model_dump(mode="json"),
        }
    return JSONResponse({"items": items})


def _images(ok: list[tuple[int, LoadedImage]]) -> list[Image.Image]:
    return [img.image for _, img in ok]


@_route("/search/batch", statuses=(400, 401, 409, 413, 422, 503), auth=require_read)
def search_batch(
    state: State,
    files: Files,
    k: K = 10,
    min_score: MinScore = None,
    similarity: SimilarityParam = "visual",
    where: Where = None,
) -> JSONResponse:
    """/v1/search for each uploaded image, in one forward pass and one index search for all."""
    started = time.perf_counter()
    check_k(state, k)
    if similarity == "semantic":
        state.store.semantic_index()
    items, ok = _decode(state, files)
    if not ok:
        return _answer(items, ok, [])
    vectors = state.inference.embed(_images(ok), similarity=similarity)
    hits = state.store.search(vectors, k, similarity=similarity, where=where)
    return _answer(items, ok, [search_response(state, h, min_score=min_score, started=started) for h in hits])


@_route("/embed/batch", statuses=(400, 401, 413, 422, 503), auth=require_read)
def embed_batch(
    state: State,
    files: Files,
    layer: Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")] = None,
    pooling: Annotated[str | None, Query(max_length=16, pattern=r"^[A-Za-z0-9_.\-]+$")] = None,
) -> JSONResponse:
    """/v1/embed for each uploaded image."""
    embedder = state.inference.variant(layer=layer, pooling=pooling)
    items, ok = _decode(state, files)
    if not ok:
        return _answer(items, ok, [])
    vectors = state.inference.embed(_images(ok), embedder)
    info = model_info(state.inference.embedder)
    return _answer(items, ok, [
        EmbedResponse(model=info, layer=embedder.layer.name, pooling=embedder.pooling_id,
                      dim=embedder.dim, vector=v.tolist())
        for v in vectors
    ])  # fmt: skip


@_route("/classify/batch", statuses=(400, 401, 404, 409, 413, 422, 503), auth=require_read)
def classify_batch(
    state: State,
    files: Files,
    k: Annotated[int, Query(ge=1, le=1000, description="Number of classes")] = 5,
    classifier: Annotated[str, Query(min_length=1, max_length=64)] = DEFAULT_CLASSIFIER,
) -> JSONResponse:
    """/v1/classify for each uploaded image."""
    check_classifier(state, classifier)
    items, ok = _decode(state, files)
    if not ok:
        return _answer(items, ok, [])
    return _answer(items, ok, classify_images(state, _images(ok), k=k, classifier=classifier))


@_route("/images/batch", statuses=(400, 401, 403, 413, 422, 503, 507), auth=require_write)
def add_batch(
    state: State,
    files: Files,
    metadata: Annotated[str | None, Form(description="A JSON object stored with every image")] = None,
) -> JSONResponse:
    """/v1/images for each uploaded image (source: its file name); 201 items are new, 200 already there."""
    meta = _parse_metadata(metadata)
    items, ok = _decode(state, files)
    added = add_images(
        state, [img for _, img in ok], sources=[files[i].filename or None for i, _ in ok], metadata=meta
    )
    return _answer(items, ok, added, statuses=[201 if a.created else 200 for a in added])
