from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Query, UploadFile

from app.deps import State, read_upload, require_read
from app.routes.common import model_info
from app.schemas import ClassifyResponse, ErrorResponse, PredictionOut

router = APIRouter(prefix="/v1", tags=["classify"], dependencies=[Depends(require_read)])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 503)
}


@router.post("/classify", response_model=ClassifyResponse, responses=_ERRORS)
def classify(
    state: State,
    file: Annotated[UploadFile, File(description="The image to classify")],
    k: Annotated[int, Query(ge=1, le=1000, description="Number of classes")] = 5,
) -> ClassifyResponse:
    """ImageNet top-k classes of the uploaded image."""
    image = read_upload(state, file)
    predictions = state.inference.classify([image.image], k=k)[0]
    return ClassifyResponse(
        predictions=[
            PredictionOut(label=p.label, class_index=p.class_index, probability=p.probability)
            for p in predictions
        ],
        model=model_info(state.inference.embedder),
    )
