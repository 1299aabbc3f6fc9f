from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Query, UploadFile

from deepfeat.app.deps import State, read_upload, require_read
from deepfeat.app.routes.common import model_info, thumbnail_url
from deepfeat.app.schemas import ClassifyResponse, NeighbourOut, PredictionOut, error_responses
from deepfeat.classifiers import DEFAULT_CLASSIFIER, knn_classify
from deepfeat.models.embedder import Prediction

router = APIRouter(prefix="/v1", tags=["classify"], dependencies=[Depends(require_read)])


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=error_responses(400, 401, 404, 409, 413, 415, 422, 503),
)
def classify(
    state: State,
    file: Annotated[UploadFile, File(description="The image to classify")],
    k: Annotated[int, Query(ge=1, le=1000, description="Number of classes")] = 5,
    classifier: Annotated[
        str,
        Query(
            min_length=1,
            max_length=64,
            description="imagenet (default), knn (vote of labelled store images) or a trained head's name "
            "(GET /v1/classifiers)",
        ),
    ] = DEFAULT_CLASSIFIER,
) -> ClassifyResponse:
    """Top-k classes of the uploaded image: ImageNet's, kNN over labelled images, or a trained head's."""
    neighbours = None
    if classifier == DEFAULT_CLASSIFIER:
        image = read_upload(state, file)
        predictions: list[Prediction] = state.inference.classify([image.image], k=k)[0]
    elif classifier == "knn":
        image = read_upload(state, file)
        vector = state.inference.embed([image.image])
        predictions, voters = knn_classify(state.store, vector, k=k)
        neighbours = [
            NeighbourOut(id=n.id, score=n.score, label=n.label, thumbnail_url=thumbnail_url(n.id))
            for n in voters
        ]
    else:
        head = state.classifiers.get(classifier)  # before decoding: an unknown name costs nothing
        image = read_upload(state, file)
        predictions = head.predict([image.image], embed=state.inference.embed, k=k)[0]
    return ClassifyResponse(
        predictions=[
            PredictionOut(label=p.label, class_index=p.class_index, probability=p.probability)
            for p in predictions
        ],
        model=model_info(state.inference.embedder),
        classifier=classifier,
        neighbours=neighbours,
    )
