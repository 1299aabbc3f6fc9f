from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Query, UploadFile

from deepfeat.app.deps import State, read_upload, require_read
from deepfeat.app.routes.common import model_info, thumbnail_url
from deepfeat.app.schemas import SearchHit, SearchResponse, error_responses

router = APIRouter(prefix="/v1", tags=["search"], dependencies=[Depends(require_read)])


@router.post(
    "/search",
    response_model=SearchResponse,
    responses=error_responses(400, 401, 409, 413, 415, 422, 503),
)
def search(
    state: State,
    file: Annotated[UploadFile, File(description="The query image")],
    k: Annotated[int, Query(ge=1, le=10_000, description="Number of results")] = 10,
    similarity: Annotated[
        Literal["visual", "semantic"],
        Query(
            description="visual: the same scene or object (copies, crops, near-duplicates); semantic: "
            "the same kind of content (the model's penultimate vector); 409 semantic_unavailable on a "
            "store without semantic vectors"
        ),
    ] = "visual",
) -> SearchResponse:
    """Find the indexed images most similar to the uploaded one (cosine similarity, best first)."""
    started = time.perf_counter()
    k = min(k, state.settings.max_k)
    if similarity == "semantic":
        state.store.semantic_index()  # refuse before decoding and a forward pass
    image = read_upload(state, file)
    vector = state.inference.embed([image.image], similarity=similarity)
    hits = state.store.search(vector, k, similarity=similarity)[0]
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
        ],
        model=model_info(state.inference.embedder),
        took_ms=round((time.perf_counter() - started) * 1000, 2),
    )
