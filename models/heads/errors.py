"""The classifier-head errors: a branch of the ``ModelError`` tree with stable codes, so the service maps
each to its HTTP status once and the CLI prints the message."""

from __future__ import annotations

from typing import Any

from deepfeat.models.errors import ModelError

__all__ = [
    "HeadError",
    "TrainingDataError",
    "InvalidHeadNameError",
    "HeadExistsError",
    "CorruptHeadError",
    "IncompatibleHeadError",
    "UnknownHeadError",
    "NoLabelsError",
]


class HeadError(ModelError):
    """Base of the classifier-head errors."""

    code = "classifier_error"


class TrainingDataError(HeadError):
    """The training folder or data cannot train a classifier (one class, an empty class, bad files...)."""

    code = "bad_training_data"


class InvalidHeadNameError(HeadError):
    code = "invalid_classifier_name"


class HeadExistsError(HeadError):
    code = "classifier_exists"


class CorruptHeadError(HeadError):
    """A saved head whose manifest or weight files are missing, malformed or fail their checksum."""

    code = "corrupt_classifier"


class IncompatibleHeadError(HeadError):
    """A head trained on another embedder's features (another model, weights, layer, pooling...)."""

    code = "incompatible_classifier"

    def __init__(self, message: str, differences: dict[str, tuple[Any, Any]] | None = None) -> None:
        super().__init__(message)
        self.differences = differences or {}


class UnknownHeadError(HeadError):
    code = "unknown_classifier"


class NoLabelsError(HeadError):
    """kNN classification asked for, but no labelled images to vote."""

    code = "no_labels"
