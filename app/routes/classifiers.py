from __future__ import annotations

from fastapi import APIRouter, Depends

from deepfeat.app.deps import State, require_read
from deepfeat.app.schemas import ClassifierInfo, ClassifiersResponse, RefusedClassifier, error_responses
from deepfeat.classifiers import DEFAULT_CLASSIFIER, KNN_NEIGHBOURS, LABEL_KEY, describe_reserved

router = APIRouter(prefix="/v1", tags=["classify"], dependencies=[Depends(require_read)])


@router.get("/classifiers", response_model=ClassifiersResponse, responses=error_responses(401, 503))
def list_classifiers(state: State) -> ClassifiersResponse:
    """The classifiers POST /v1/classify?classifier=NAME accepts: imagenet, knn and trained heads."""
    labels = state.classifiers.label_counts(state.store)
    items = [
        ClassifierInfo(**describe_reserved(state.inference.embedder)),
        ClassifierInfo(
            name="knn",
            kind="knn",
            classes=sorted(labels),
            description=(
                f"similarity-weighted vote of the {KNN_NEIGHBOURS} nearest store images with a "
                f"{LABEL_KEY!r} in their metadata"
            ),
            metrics={"labelled_images": sum(labels.values()), "neighbours": KNN_NEIGHBOURS},
        ),
    ]
    loaded, refused = state.classifiers.heads()
    for head in loaded:
        m = head.manifest
        items.append(
            ClassifierInfo(
                name=m.name,
                kind="linear" if m.method == "linear" else "finetune",
                classes=list(m.classes),
                description=(
                    f"{m.method} head on {m.fingerprint.get('model')} "
                    + (
                        f"{m.fingerprint.get('layer')} features"
                        if m.method == "linear"
                        else "(top blocks fine-tuned)"
                    )
                ),
                metrics=m.metrics,
                training=m.training,
                created_at=m.created_at,
            )
        )
    return ClassifiersResponse(
        default=DEFAULT_CLASSIFIER,
        classifiers=items,
        refused=[RefusedClassifier(name=r.name, code=r.code, detail=r.reason) for r in refused],
    )
