"""Errors raised by ``models``.

Every error carries a stable machine-readable ``code`` so callers (the HTTP layer, the batch indexer's
report) can map it without parsing messages. Messages name the bad value and the valid choices.
"""

from __future__ import annotations

__all__ = [
    "ModelError",
    "UnknownModelError",
    "UnknownLayerError",
    "UnknownPoolingError",
    "WeightsUnavailableError",
    "InvalidOptionError",
    "ImageError",
    "unreadable_image_file",
    "UnsupportedFormatError",
    "CorruptImageError",
    "ImageTooLargeError",
    "ImageTooSmallError",
    "Overloaded",
]


class ModelError(Exception):
    """Base of every error raised by ``models``."""

    code = "model_error"


class UnknownModelError(ModelError):
    code = "unknown_model"


class UnknownLayerError(ModelError):
    code = "unknown_layer"


class UnknownPoolingError(ModelError):
    code = "unknown_pooling"


class InvalidOptionError(ModelError):
    """A device, precision or other option value that is not one of the valid choices."""

    code = "invalid_option"


class WeightsUnavailableError(ModelError):
    """Pretrained weights are not on this machine (and cannot be downloaded)."""

    code = "weights_unavailable"


class ImageError(ModelError):
    """The input could not be turned into an RGB image."""

    code = "invalid_image"


def unreadable_image_file(path: str, exc: OSError) -> ImageError:
    """The error for an image file that cannot be read (missing, a folder, no permission): one
    message wherever it is found, by the loader or by the CLI before it loads a model."""
    return ImageError(f"cannot read image file {path!r}: {exc.strerror or exc}")


class UnsupportedFormatError(ImageError):
    """The bytes are not an image in an allowed format (decided from the bytes, never the name)."""

    code = "unsupported_format"


class CorruptImageError(ImageError):
    """The bytes claim an allowed format but cannot be decoded completely (truncated, damaged, empty)."""

    code = "corrupt_image"


class ImageTooLargeError(ImageError):
    """More pixels than the configured limit (decompression-bomb guard) or too many frames."""

    code = "image_too_large"


class ImageTooSmallError(ImageError):
    """A side shorter than the configured minimum (1x1 images carry no features)."""

    code = "image_too_small"


class Overloaded(ModelError):
    """Too many requests are already waiting for the model: a bounded queue turns overload into an
    immediate answer the caller can retry, instead of a backlog that grows until every request times out."""

    code = "overloaded"

    def __init__(self, message: str = "too many requests are waiting for the model; retry shortly") -> None:
        super().__init__(message)
