"""Errors raised by ``index``.

Every error carries a stable machine-readable ``code`` so callers (the HTTP layer, the batch indexer's
report) can map it without parsing messages. Messages name the bad value and, where there are any, the
valid choices.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "StoreError",
    "IncompatibleIndexError",
    "NotFoundError",
    "InvalidIdError",
    "InvalidVectorError",
    "InvalidArgumentError",
    "InvalidFilterError",
    "CorruptStoreError",
    "StoreFullError",
    "ReadOnlyStoreError",
    "ReadOnlyFilesystemError",
    "PermissionDeniedError",
    "NetworkFilesystemError",
    "StoreLockedError",
    "MemoryBudgetError",
    "SemanticUnavailableError",
]


class StoreError(Exception):
    """Base of every error raised by ``index``."""

    code = "store_error"


class IncompatibleIndexError(StoreError):
    """The store on disk was made by a different embedder (fingerprint/dim) or a newer format.

    ``differences`` maps each differing key to ``(stored, given)`` so callers can report it.
    """

    code = "incompatible_index"

    def __init__(self, message: str, *, differences: dict[str, tuple[Any, Any]] | None = None) -> None:
        super().__init__(message)
        self.differences: dict[str, tuple[Any, Any]] = dict(differences or {})


class NotFoundError(StoreError):
    """No image with this id (or it has no thumbnail)."""

    code = "not_found"


class InvalidIdError(NotFoundError):
    """The id is not a well-formed image id (32 lowercase hex chars), so it cannot exist.

    A subclass of :class:`NotFoundError` so callers that only handle "not found" stay correct.
    """

    code = "invalid_id"


class InvalidVectorError(StoreError):
    """Vectors of the wrong shape, dtype or dimension, or with NaN/inf values."""

    code = "invalid_vector"


class InvalidArgumentError(StoreError):
    """Any other bad argument: ``k < 1``, a malformed sha256, metadata that is not JSON, a bad factory."""

    code = "invalid_argument"


class InvalidFilterError(InvalidArgumentError):
    """A metadata filter that is not JSON or not the filter language (:mod:`index.filters`)."""

    code = "invalid_filter"


class CorruptStoreError(StoreError):
    """The catalog fails its integrity check, or the manifest / a snapshot cannot be read."""

    code = "corrupt_store"


class StoreFullError(StoreError):
    """The disk (or the database's size limit) is full; the failed write was rolled back."""

    code = "storage_full"


class ReadOnlyStoreError(StoreError):
    """A write (add, delete, snapshot) on a store opened with ``read_only=True``."""

    code = "read_only"


class ReadOnlyFilesystemError(StoreError):
    """A writable open of a data dir on a filesystem mounted read-only."""

    code = "read_only_filesystem"


class PermissionDeniedError(StoreError):
    """A writable open of a data dir this user may not write."""

    code = "permission_denied"


class NetworkFilesystemError(StoreError):
    """A data dir on a network filesystem (NFS, SMB, ...): refused for writing, where SQLite's
    write-ahead log and the store's lock do not work; a read-only open is refused only while a writer
    has the store open."""

    code = "network_filesystem"


class StoreLockedError(StoreError):
    """Another process held the store's lock for longer than the lock timeout (a stopped or hung
    holder); ``holder_pid`` names it when ``/proc/locks`` could."""

    code = "store_locked"

    def __init__(self, message: str, *, holder_pid: int | None = None) -> None:
        super().__init__(message)
        self.holder_pid = holder_pid


class MemoryBudgetError(InvalidArgumentError):
    """A memory budget too small for the work asked (an index build): the message says what is needed."""

    code = "memory_budget"


class SemanticUnavailableError(StoreError):
    """A ``similarity=semantic`` search on a store that holds no semantic vectors (written before
    them, or opened without a semantic layer); ``deepfeat add-semantic`` computes them."""

    code = "semantic_unavailable"
