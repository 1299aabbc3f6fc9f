from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from deepfeat.app.deps import AppState, State, require_read
from deepfeat.app.routes.common import model_info
from deepfeat.app.schemas import GenerationOut, HealthResponse, ReadyResponse, StatsResponse, error_responses

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse)
def health() -> HealthResponse:
    """Liveness: the process answers."""
    return HealthResponse(status="ok")


@router.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
def ready(request: Request, response: Response) -> ReadyResponse:
    """Readiness: model loaded and store open and consistent."""
    state: AppState = request.app.state.deepfeat
    if state.runtime is None:
        response.status_code = 503
        return ReadyResponse(status="not_ready", detail=state.not_ready_reason)
    generation = state.runtime.store.generation
    return ReadyResponse(
        status="ready",
        read_only=state.runtime.store.read_only,
        generation=generation.number if generation is not None else None,
        model=model_info(state.runtime.inference.embedder),
    )


@router.get(
    "/v1/stats",
    response_model=StatsResponse,
    responses=error_responses(401, 503),
    dependencies=[Depends(require_read)],
)
def stats(state: State) -> StatsResponse:
    """Index size, model, layer, dimension, index type, and on a replica its generation."""
    info = state.store.stats()
    generation = info["generation"]
    return StatsResponse(
        count=state.store.count,
        model=model_info(state.inference.embedder),
        dim=state.store.dim,
        vectors=info["vectors"],
        # An empty store has not yet seen how many vectors an image gets: the embedder says.
        vectors_per_image=info["vectors_per_image"]
        if info["vectors"]
        else state.inference.embedder.vectors_per_image,
        index_factory=info["index_factory"],
        data_dir=str(state.settings.data_dir),
        read_only=info["read_only"],
        semantic_dim=info["semantic_dim"],
        semantic_count=info["semantic_count"],
        generation=None if generation is None else GenerationOut.model_validate(generation),
    )


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    state: AppState = request.app.state.deepfeat
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
