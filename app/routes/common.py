"""Small helpers the routes share: model info and record -> response conversion."""

from __future__ import annotations

from deepfeat.app.schemas import ImageInfo, ModelInfo
from deepfeat.index.catalog import ImageRecord
from deepfeat.models.embedder import Embedder

__all__ = ["model_info", "image_info", "thumbnail_url"]


def model_info(embedder: Embedder) -> ModelInfo:
    return ModelInfo(
        name=embedder.spec.name,
        weights=embedder.weights_identity,
        pretrained=embedder.pretrained,
        layer=embedder.layer.name,
        pooling=embedder.pooling_id,
        dim=embedder.dim,
        device=str(embedder.device),
        precision=embedder.precision_in_use,
        backend=embedder.backend,
        config=embedder.config,
    )


def thumbnail_url(image_id: str) -> str:
    return f"/v1/images/{image_id}/thumbnail"


def image_info(record: ImageRecord) -> ImageInfo:
    return ImageInfo(
        id=record.id,
        sha256=record.sha256,
        source=record.source,
        width=record.width,
        height=record.height,
        nbytes=record.nbytes,
        metadata=record.metadata,
        added_at=record.added_at,
        thumbnail_url=thumbnail_url(record.id),
    )
