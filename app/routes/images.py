from __future__ import annotations

import base64
import json
import math
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Path, Query, Response, UploadFile

from deepfeat.app.deps import State, read_upload, require_read, require_write
from deepfeat.app.errors import APIError
from deepfeat.app.routes.common import image_info
from deepfeat.app.routes.search import K, MinScore, SimilarityParam, Where, check_k, search_response
from deepfeat.app.schemas import (
    AddImageResponse,
    DeleteResponse,
    ImageInfo,
    ImagePage,
    SearchResponse,
    error_responses,
)
from deepfeat.index.store import NewImage
from deepfeat.models.images import LoadedImage, make_thumbnail

router = APIRouter(prefix="/v1/images", tags=["images"])

MAX_METADATA_BYTES = 16 * 1024
MAX_SOURCE_CHARS = 4096
# No length limit here: a malformed id of any length is 404 invalid_id from the store, like any other.
ImageId = Annotated[str, Path(description="The image id returned when it was added")]


def _parse_metadata(raw: str | None) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if len(raw.encode("utf-8")) > MAX_METADATA_BYTES:
        raise APIError(422, "invalid_metadata", f"metadata is larger than {MAX_METADATA_BYTES} bytes")
    try:
        value = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise APIError(422, "invalid_metadata", f"metadata is not valid JSON: {exc.msg}") from None
    except ValueError as exc:  # NaN, Infinity or a number too large for a float: not JSON the store keeps
        raise APIError(422, "invalid_metadata", f"metadata is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise APIError(422, "invalid_metadata", "metadata must be a JSON object")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text[:40]} is beyond the range of a float")
    return number


@router.post(
    "",
    response_model=AddImageResponse,
    status_code=201,
    responses={
        200: {"model": AddImageResponse, "description": "Already indexed"},
        **error_responses(400, 401, 403, 413, 415, 422, 503, 507),
    },
    dependencies=[Depends(require_write)],
)
def add_image(
    state: State,
    response: Response,
    file: Annotated[UploadFile, File(description="The image to index")],
    source: Annotated[
        str | None, Form(max_length=MAX_SOURCE_CHARS, description="Free text, stored as data")
    ] = None,
    metadata: Annotated[str | None, Form(description="A JSON object stored with the image")] = None,
) -> AddImageResponse:
    """Index an image; 201 when new, 200 with created=false when the same content is already indexed."""
    meta = _parse_metadata(metadata)
    result = add_images(state, [read_upload(state, file)], sources=[source], metadata=meta)[0]
    if not result.created:
        response.status_code = 200
    return result


def add_images(
    state: State, images: list[LoadedImage], *, sources: list[str | None], metadata: dict[str, Any]
) -> list[AddImageResponse]:
    """Add decoded uploads (content already indexed answers with its id and created=false); the new
    ones go through the model in one call."""
    existing = state.store.find_existing([image.sha256 for image in images])
    new = [i for i, image in enumerate(images) if image.sha256 not in existing]
    out = [AddImageResponse(id=existing.get(image.sha256, ""), created=False) for image in images]
    if not new:
        return out
    # (n, m, dim) visual and (n, d_s) semantic vectors (None without a semantic layer)
    vectors, semantic = state.inference.vectors([images[i].image for i in new])
    if state.store.semantic_dim is None:
        semantic = None  # a store opened without semantic vectors keeps none
    results = state.store.add(
        vectors,
        [
            NewImage(
                sha256=images[i].sha256,
                source=sources[i],
                width=images[i].upright_size[0],
                height=images[i].upright_size[1],
                nbytes=images[i].nbytes,
                metadata=metadata,
                thumbnail=make_thumbnail(images[i].image),
            )
            for i in new
        ],
        semantic=semantic,
    )
    for i, result in zip(new, results, strict=True):
        out[i] = AddImageResponse(id=result.id, created=result.created)
    return out


@router.get(
    "",
    response_model=ImagePage,
    response_model_exclude_unset=True,  # no "vector": null in every item
    responses=error_responses(401, 422, 503),
    dependencies=[Depends(require_read)],
)
def list_images(
    state: State,
    limit: Annotated[int, Query(ge=1, le=1000, description="Images per page")] = 100,
    cursor: Annotated[
        str | None, Query(max_length=64, description="`next_cursor` of the previous page")
    ] = None,
    where: Where = None,
) -> ImagePage:
    """Page through the indexed images in the order they were added (those matching ``filter``).

    The cursor is a position, not an offset: images added or deleted while paging never make a page
    repeat an image or skip one that existed throughout."""
    records, next_seq = state.store.list_images(limit=limit, after_seq=_decode_cursor(cursor), where=where)
    return ImagePage(
        items=[image_info(record) for record in records],
        next_cursor=None if next_seq is None else _encode_cursor(next_seq),
    )


_CURSOR_PREFIX = "after:"
_MAX_SEQ = 2**63 - 1
"""The largest position SQLite can hold; a forged cursor beyond it is no cursor of this server."""


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> int:
    """The position a cursor stands for (opaque to clients: it may change form between versions)."""
    if not cursor:
        return 0
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        digits = text[len(_CURSOR_PREFIX) :]
        if text.startswith(_CURSOR_PREFIX) and digits.isdigit() and (seq := int(digits)) <= _MAX_SEQ:
            return seq
    except (ValueError, UnicodeDecodeError):
        pass
    raise APIError(422, "invalid_cursor", "cursor is not one this server returned as next_cursor")


@router.get(
    "/{image_id}/similar",
    response_model=SearchResponse,
    responses=error_responses(401, 404, 409, 422, 503),
    dependencies=[Depends(require_read)],
)
def similar_images(
    state: State,
    image_id: ImageId,
    k: K = 10,
    min_score: MinScore = None,
    similarity: SimilarityParam = "visual",
    where: Where = None,
) -> SearchResponse:
    """More like this: search with an indexed image's stored vector; the image itself is not returned."""
    started = time.perf_counter()
    check_k(state, k)
    hits = state.store.similar(image_id, k, similarity=similarity, where=where)
    return search_response(state, hits, min_score=min_score, started=started)


@router.get(
    "/{image_id}",
    response_model=ImageInfo,
    response_model_exclude_unset=True,  # "vector" only when asked for
    responses=error_responses(401, 404, 422, 503),
    dependencies=[Depends(require_read)],
)
def get_image(
    state: State,
    image_id: ImageId,
    include: Annotated[
        Literal["vector"] | None, Query(description="`vector`: add the stored global vector")
    ] = None,
) -> ImageInfo:
    """What the store knows about one image (with `include=vector`, its stored vector too)."""
    info = image_info(state.store.get(image_id))
    if include == "vector":
        info.vector = state.store.vector(image_id).tolist()
    return info


@router.get(
    "/{image_id}/thumbnail",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, **error_responses(401, 404, 422, 503)},
    dependencies=[Depends(require_read)],
)
def get_thumbnail(state: State, image_id: ImageId) -> Response:
    """A small re-encoded JPEG of the image."""
    data = state.store.thumbnail(image_id)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})


@router.delete(
    "/{image_id}",
    response_model=DeleteResponse,
    responses=error_responses(401, 403, 404, 422, 503, 507),
    dependencies=[Depends(require_write)],
)
def delete_image(state: State, image_id: ImageId) -> DeleteResponse:
    """Remove an image from the store and from search results."""
    state.store.delete(image_id)
    return DeleteResponse(id=image_id, deleted=True)
