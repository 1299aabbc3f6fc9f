from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Query, UploadFile
from PIL import Image

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
    check_classifier(state, classifier)
    image = read_upload(state, file)
    return classify_images(state, [image.image], k=k, classifier=classifier)[0]


def check_classifier(state: State, classifier: str) -> None:
    """Refuse an unknown classifier before any upload is decoded: an unknown name costs nothing."""
    if classifier not in (DEFAULT_CLASSIFIER, "knn"):
        state.classifiers.get(classifier)


def classify_images(
    state: State, images: list[Image.Image], *, k: int, classifier: str
) -> list[ClassifyResponse]:
    """The classify route's answer for each image; ImageNet and heads in one forward pass for all."""
    neighbours: list[list[NeighbourOut] | None] = [None] * len(images)
    if classifier == DEFAULT_CLASSIFIER:
        predictions: list[list[Prediction]] = state.inference.classify(images, k=k)
    elif classifier == "knn":
        vectors = state.inference.embed(images)
        predictions = []
        for i in range(len(images)):
            voted, voters = knn_classify(state.store, vectors[i : i + 1], k=k)
            predictions.append(voted)
            neighbours[i] = [
                NeighbourOut(id=n.id, score=n.score, label=n.label, thumbnail_url=thumbnail_url(n.id))
                for n in voters
            ]
    else:
        head = state.classifiers.get(classifier)
        predictions = head.predict(images, embed=state.inference.embed, k=k)
    return [
        ClassifyResponse(
            predictions=[
                PredictionOut(label=p.label, class_index=p.class_index, probability=p.probability)
                for p in preds
            ],
            model=model_info(state.inference.embedder),
            classifier=classifier,
            neighbours=near,
        )
        for preds, near in zip(predictions, neighbours, strict=True)
    ]
