from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Query, UploadFile

from deepfeat.app.deps import State, read_upload, require_read
from deepfeat.app.errors import APIError
from deepfeat.app.routes.common import model_info, thumbnail_url
from deepfeat.app.schemas import SearchHit, SearchResponse, error_responses
from deepfeat.index.filters import Filter, parse_filter
from deepfeat.index.store import Hit

router = APIRouter(prefix="/v1", tags=["search"], dependencies=[Depends(require_read)])

# The query parameters every search route takes (upload, batch, more-like-this).
K = Annotated[
    int, Query(ge=1, description="Number of results (at most the server's max_k: above it, 422 k_too_large)")
]
MinScore = Annotated[
    float | None,
    Query(ge=-1, le=1, description='Drop results scoring below this ("no match" is an empty list)'),
]
MAX_FILTER_CHARS = 4096
"""A filter is a query parameter: at 4096 characters its URL stays within what the HTTP server reads
(64 KiB), even percent-encoded (12 bytes for a 4-byte character)."""
FILTER_HELP = (
    'Only images whose metadata match this JSON filter, e.g. {"album": "2024"}, '
    '{"year": {"$gte": 2020, "$lt": 2025}}, {"tag": {"$in": ["a", "b"]}}, {"source": {"$prefix": "photos/"}}, '
    "with $eq $ne $gt $gte $lt $lte $in $nin $exists $prefix $and $or (README, Filters). "
    f"At most {MAX_FILTER_CHARS} characters. 422 invalid_filter says what is wrong."
)


def _where(
    filter: Annotated[str | None, Query(max_length=MAX_FILTER_CHARS, description=FILTER_HELP)] = None,  # noqa: A002
) -> Filter | None:
    return parse_filter(filter)


Where = Annotated[Filter | None, Depends(_where)]
"""The ``filter`` query parameter, checked (422 invalid_filter) before any upload is read."""

SimilarityParam = Annotated[
    Literal["visual", "semantic"],
    Query(
        description="visual: the same scene or object (copies, crops, near-duplicates); semantic: "
        "the same kind of content (class scores and penultimate features, re-ranked); 409 semantic_unavailable on a "
        "store without semantic vectors"
    ),
]


@router.post(
    "/search",
    response_model=SearchResponse,
    responses=error_responses(400, 401, 409, 413, 415, 422, 503),
)
def search(
    state: State,
    file: Annotated[UploadFile, File(description="The query image")],
    k: K = 10,
    min_score: MinScore = None,
    similarity: SimilarityParam = "visual",
    where: Where = None,
) -> SearchResponse:
    """Find the indexed images most similar to the uploaded one (cosine similarity, best first)."""
    started = time.perf_counter()
    check_k(state, k)
    if similarity == "semantic":
        state.store.semantic_index()  # refuse before decoding and a forward pass
    image = read_upload(state, file)
    vector = state.inference.embed([image.image], similarity=similarity)
    hits = state.store.search(vector, k, similarity=similarity, where=where)[0]
    return search_response(state, hits, min_score=min_score, started=started)


def check_k(state: State, k: int) -> None:
    """More results than the server allows is an error that names the limit, never a silent cut."""
    if k > state.settings.max_k:
        raise APIError(
            422,
            "k_too_large",
            f"k={k} is above this server's limit of {state.settings.max_k} (DEEPFEAT_MAX_K)",
        )


def search_response(
    state: State, hits: list[Hit], *, min_score: float | None, started: float
) -> SearchResponse:
    """Hits (best first) as the search routes answer them, cut at ``min_score``."""
    return SearchResponse(
        results=[
            SearchHit(
                id=hit.id,
                score=hit.score,
                source=hit.record.source,
                metadata=hit.record.metadata,
                thumbnail_url=thumbnail_url(hit.id),
            )
            for hit in hits
            if min_score is None or hit.score >= min_score
        ],
        model=model_info(state.inference.embedder),
        took_ms=round((time.perf_counter() - started) * 1000, 2),
    )
