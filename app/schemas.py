"""Request/response models; every route declares one, so /docs shows the real contract."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from deepfeat.models.config import EmbedderConfig

__all__ = [
    "ErrorResponse",
    "error_responses",
    "ModelInfo",
    "SearchHit",
    "SearchResponse",
    "PredictionOut",
    "ClassifyResponse",
    "NeighbourOut",
    "ClassifierInfo",
    "RefusedClassifier",
    "ClassifiersResponse",
    "EmbedResponse",
    "AddImageResponse",
    "ImageInfo",
    "DeleteResponse",
    "HealthResponse",
    "ReadyResponse",
    "StatsResponse",
]


class ErrorResponse(BaseModel):
    detail: str = Field(description="What went wrong, for people")
    code: str = Field(description="Stable machine-readable error code")


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses=``: each of these error statuses, documented with :class:`ErrorResponse`."""
    return {code: {"model": ErrorResponse} for code in codes}


class ModelInfo(BaseModel):
    name: str
    weights: str
    pretrained: bool
    layer: str
    pooling: str
    dim: int
    device: str
    precision: str = Field(description="The precision in use (what `auto` resolved to): fp32, bf16 or fp16")
    backend: str = Field(
        description="What runs the embedding trunk (what `auto` resolved to): torch or openvino"
    )
    config: EmbedderConfig = Field(
        description="Every option that defines the vectors, as the store records them"
    )


class SearchHit(BaseModel):
    id: str
    score: float = Field(description="Cosine similarity, higher is more similar")
    source: str | None
    metadata: dict[str, Any]
    thumbnail_url: str


class SearchResponse(BaseModel):
    results: list[SearchHit]
    model: ModelInfo
    took_ms: float


class PredictionOut(BaseModel):
    label: str
    class_index: int = Field(
        description="The class's index in the classifier; -1 for kNN votes, which have none"
    )
    probability: float


class NeighbourOut(BaseModel):
    id: str
    score: float = Field(description="Cosine similarity to the query")
    label: str
    thumbnail_url: str


class ClassifyResponse(BaseModel):
    predictions: list[PredictionOut]
    model: ModelInfo
    classifier: str = Field("imagenet", description="The classifier that answered")
    neighbours: list[NeighbourOut] | None = Field(
        None, description="classifier=knn only: the labelled images that voted, nearest first"
    )


class ClassifierInfo(BaseModel):
    name: str
    kind: Literal["imagenet", "knn", "linear", "finetune"]
    classes: list[str]
    description: str
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="Held-out metrics recorded at training (trained heads)"
    )
    training: dict[str, Any] | None = None
    created_at: float | None = None


class RefusedClassifier(BaseModel):
    name: str
    code: str = Field(description="incompatible_classifier or corrupt_classifier")
    detail: str


class ClassifiersResponse(BaseModel):
    default: str = "imagenet"
    classifiers: list[ClassifierInfo]
    refused: list[RefusedClassifier] = Field(
        default_factory=list, description="Saved heads this server will not use, and why"
    )


class EmbedResponse(BaseModel):
    model: ModelInfo
    layer: str
    pooling: str
    dim: int
    vector: list[float]


class AddImageResponse(BaseModel):
    id: str
    created: bool


class ImageInfo(BaseModel):
    id: str
    sha256: str
    source: str | None
    width: int | None
    height: int | None
    nbytes: int | None
    metadata: dict[str, Any]
    added_at: float
    thumbnail_url: str
    vector: list[float] | None = Field(
        None, description="The stored global vector (unit L2 norm), only with `include=vector`"
    )


class ImagePage(BaseModel):
    items: list[ImageInfo] = Field(description="Images in the order they were added")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last one. Stable while images "
        "are added and deleted: no image is returned twice, none that existed throughout is skipped"
    )


class BatchItem(BaseModel):
    status: int = Field(description="The single route's status for this image (200/201, or 4xx)")
    result: dict[str, Any] | None = Field(None, description="The single route's response (2xx)")
    code: str | None = Field(None, description="The error code (4xx)")
    detail: str | None = Field(None, description="The error message (4xx)")


class BatchResponse(BaseModel):
    items: list[BatchItem] = Field(description="One item per uploaded file, in upload order")


class DeleteResponse(BaseModel):
    id: str
    deleted: bool


class HealthResponse(BaseModel):
    status: str


class ReadyResponse(BaseModel):
    status: str
    detail: str | None = None
    read_only: bool | None = Field(None, description="A read replica (writes are refused with 403)")
    generation: int | None = Field(
        None, description="The published index generation a replica searches (null: none, or a writer)"
    )
    model: ModelInfo | None = Field(
        None, description="Every option that defines a vector and the precision in use (when ready)"
    )


class GenerationOut(BaseModel):
    number: int
    factory: str
    count: int = Field(description="Images in the generation")
    hidden: int = Field(description="Of those, deleted since it was built (filtered out)")
    delta: int = Field(description="Images added since it was built (searched exactly, in memory)")


class StatsResponse(BaseModel):
    count: int
    model: ModelInfo
    dim: int
    vectors: int = Field(
        description="Vectors searched: each image's global one, its low-pass one and its regional ones"
    )
    vectors_per_image: int = Field(
        description="1 + (1 with a low-pass vector) + regions² (the model config's lowpass and grid)"
    )
    index_factory: str
    data_dir: str
    read_only: bool
    semantic_dim: int | None = Field(
        None, description="Dimension of the semantic vectors (similarity=semantic); null: none kept"
    )
    semantic_count: int = Field(0, description="Images that have a semantic vector")
    generation: GenerationOut | None = Field(
        None, description="The published index generation a read replica searches, with its delta"
    )
