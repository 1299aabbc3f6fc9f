from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Query, UploadFile

from deepfeat.app.deps import State, read_upload, require_read
from deepfeat.app.routes.common import model_info
from deepfeat.app.schemas import EmbedResponse, error_responses

router = APIRouter(prefix="/v1", tags=["embed"], dependencies=[Depends(require_read)])


@router.post("/embed", response_model=EmbedResponse, responses=error_responses(400, 401, 413, 415, 422, 503))
def embed(
    state: State,
    file: Annotated[UploadFile, File(description="The image")],
    layer: Annotated[
        str | None,
        Query(
            max_length=64,
            pattern=r"^[A-Za-z0-9_.\-]+$",  # ASCII only: "¹".isdigit() is True but int("¹") fails
            description="Layer name or position k from the top",
        ),
    ] = None,
    pooling: Annotated[
        str | None,
        Query(
            max_length=16, pattern=r"^[A-Za-z0-9_.\-]+$", description="avg, max, gem or rmac (conv layers)"
        ),
    ] = None,
) -> EmbedResponse:
    """The deep-feature vector of the uploaded image (L2-normalised), from the store's layer or another one."""
    embedder = state.inference.variant(layer=layer, pooling=pooling)
    image = read_upload(state, file)
    vector = state.inference.embed([image.image], embedder)[0]
    return EmbedResponse(
        model=model_info(state.inference.embedder),
        layer=embedder.layer.name,
        pooling=embedder.pooling_id,
        dim=embedder.dim,
        vector=vector.tolist(),
    )
