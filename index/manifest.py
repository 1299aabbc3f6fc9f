"""``manifest.json``: what made this index, so a store is never searched with the wrong embedder.

The manifest lives beside the catalog and the FAISS snapshot. It records the embedder's fingerprint
(an opaque dict: model, weights, layer, pooling, dim, preprocessing...), the vector dimension and
metric, the FAISS factory string, counts, the snapshot's checksum and watermarks, and the published
index generation (:mod:`index.generations`) with the one before it. It is written atomically and kept
human-readable (indent 2, sorted keys) so an operator can inspect it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deepfeat import fingerprints
from deepfeat.index._fs import atomic_write_bytes
from deepfeat.index.errors import CorruptStoreError, IncompatibleIndexError, InvalidArgumentError

__all__ = [
    "FORMAT_VERSION",
    "GenerationInfo",
    "Manifest",
    "SnapshotInfo",
    "check_compatible",
    "normalize_fingerprint",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class SnapshotInfo:
    """The FAISS snapshot that goes with the manifest.

    ``max_seq`` / ``deletions_rowid`` are the catalog watermarks the snapshot had caught up to, and
    ``count`` the number of vectors in it.
    """

    file: str
    sha256: str
    size: int
    max_seq: int
    deletions_rowid: int
    count: int


@dataclass(frozen=True)
class GenerationInfo:
    """A published index generation: immutable files under ``generations/`` and what they hold.

    ``file`` (the FAISS header: quantizer, codebooks, list offsets) and ``data_file`` (the inverted
    lists, memory-mapped by readers) are bare names inside ``generations/``, never paths. ``max_seq`` /
    ``deletions_rowid`` are the catalog watermarks the build read up to, ``count`` the vectors in it,
    ``dim`` their dimension in the index (after ``whitening``, the manifest's whitening entry at build
    time), ``build`` what the build planned and measured (informational). ``previous`` is the
    generation this one replaced, kept on disk until the next publish (one level deep).
    """

    number: int
    file: str
    sha256: str
    size: int
    data_file: str
    data_sha256: str
    data_size: int
    factory: str
    dim: int
    max_seq: int
    deletions_rowid: int
    count: int
    whitening: dict[str, Any] | None = None
    built_at: float = 0.0
    build: dict[str, Any] = field(default_factory=dict)
    previous: GenerationInfo | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form (``previous`` nested, without its own ``previous``)."""
        data = asdict(self)
        if data["previous"] is not None:
            data["previous"].pop("previous", None)
        return data

    @classmethod
    def from_dict(cls, data: Any, *, nested: bool = True) -> GenerationInfo:
        """Parse the manifest's ``generation`` object.

        Raises:
            TypeError, KeyError, ValueError: A missing or mistyped field (the manifest parser turns
                these into :class:`CorruptStoreError`).
        """
        if not isinstance(data, dict):
            raise TypeError(f"generation must be an object, got {type(data).__name__}")
        whitening = data.get("whitening")
        build = data.get("build") or {}
        if whitening is not None and not isinstance(whitening, dict):
            raise TypeError("generation.whitening must be an object or null")
        if not isinstance(build, dict):
            raise TypeError("generation.build must be an object")
        previous = data.get("previous")
        return cls(
            number=int(data["number"]),
            file=str(data["file"]),
            sha256=str(data["sha256"]),
            size=int(data["size"]),
            data_file=str(data["data_file"]),
            data_sha256=str(data["data_sha256"]),
            data_size=int(data["data_size"]),
            factory=str(data["factory"]),
            dim=int(data["dim"]),
            max_seq=int(data["max_seq"]),
            deletions_rowid=int(data["deletions_rowid"]),
            count=int(data["count"]),
            whitening=whitening,
            built_at=float(data.get("built_at", 0.0)),
            build=build,
            previous=cls.from_dict(previous, nested=False) if nested and previous is not None else None,
        )


@dataclass(frozen=True)
class Manifest:
    """The parsed content of ``manifest.json``."""

    fingerprint: dict[str, Any]
    dim: int
    index_factory: str = "Flat"
    embedder: dict[str, Any] | None = None
    """The options that made the vectors, as the embedder's config recorded them (opaque here: the
    index never interprets them). Absent in stores written before it existed; a writer adds it."""
    metric: str = "ip"
    format_version: int = FORMAT_VERSION
    created_at: float = 0.0
    updated_at: float = 0.0
    count: int = 0
    snapshot: SnapshotInfo | None = None
    generation: GenerationInfo | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form (``extra`` keys are kept at the top level so unknown fields survive).

        Returns:
            A dict with the fields described in the module docstring.
        """
        data = asdict(self)
        extra = data.pop("extra")
        data["generation"] = None if self.generation is None else self.generation.to_dict()
        if data["generation"] is None:
            del data["generation"]  # stores without generations keep the manifest they always had
        if data["embedder"] is None:
            del data["embedder"]
        return {**extra, **data}

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Validate and parse a manifest dict.

        Args:
            data: Decoded JSON.

        Returns:
            The manifest.

        Raises:
            CorruptStoreError: Missing or mistyped fields (a hand-edited or damaged file).
            IncompatibleIndexError: Written by a newer format version this code cannot read.
        """
        if not isinstance(data, dict):
            raise CorruptStoreError(f"manifest must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if not isinstance(version, int):
            raise CorruptStoreError(f"manifest format_version must be an integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise IncompatibleIndexError(
                f"manifest format_version {version} is newer than the supported {FORMAT_VERSION}; "
                "upgrade deepfeat to open this store",
                differences={"format_version": (version, FORMAT_VERSION)},
            )
        try:
            fingerprint = data["fingerprint"]
            dim = data["dim"]
            snap = data.get("snapshot")
            if not isinstance(fingerprint, dict):
                raise TypeError(f"fingerprint must be an object, got {type(fingerprint).__name__}")
            if not isinstance(dim, int) or dim < 1:
                raise TypeError(f"dim must be a positive integer, got {dim!r}")
            embedder = data.get("embedder")
            if embedder is not None and not isinstance(embedder, dict):
                raise TypeError(f"embedder must be an object or null, got {type(embedder).__name__}")
            snapshot = None
            if snap is not None:
                if not isinstance(snap, dict):
                    raise TypeError(f"snapshot must be an object or null, got {type(snap).__name__}")
                snapshot = SnapshotInfo(
                    file=str(snap["file"]),
                    sha256=str(snap["sha256"]),
                    size=int(snap["size"]),
                    max_seq=int(snap["max_seq"]),
                    deletions_rowid=int(snap["deletions_rowid"]),
                    count=int(snap["count"]),
                )
            known = {
                "fingerprint",
                "dim",
                "index_factory",
                "metric",
                "format_version",
                "created_at",
                "updated_at",
                "count",
                "snapshot",
                "generation",
                "embedder",
            }
            gen = data.get("generation")
            return cls(
                fingerprint=fingerprint,
                dim=dim,
                index_factory=str(data.get("index_factory", "Flat")),
                embedder=embedder,
                metric=str(data.get("metric", "ip")),
                format_version=version,
                created_at=float(data.get("created_at", 0.0)),
                updated_at=float(data.get("updated_at", 0.0)),
                count=int(data.get("count", 0)),
                snapshot=snapshot,
                generation=None if gen is None else GenerationInfo.from_dict(gen),
                extra={k: v for k, v in data.items() if k not in known},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptStoreError(f"manifest is malformed: {exc!r}") from exc

    @classmethod
    def load(cls, path: str | Path) -> Manifest | None:
        """Read a manifest file.

        Args:
            path: Path of ``manifest.json``.

        Returns:
            The manifest, or None when the file does not exist (a store not created yet).

        Raises:
            CorruptStoreError: The file exists but is not readable JSON or has bad fields.
            IncompatibleIndexError: Written by a newer format version.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise CorruptStoreError(f"cannot read manifest {path}: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CorruptStoreError(f"manifest {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write the manifest atomically (temp file, fsync, rename, directory fsync).

        Args:
            path: Path of ``manifest.json``.

        Raises:
            StoreFullError: No space left on the device.
        """
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"
        atomic_write_bytes(Path(path), text.encode("utf-8"))


def normalize_fingerprint(fingerprint: Any) -> dict[str, Any]:
    """Round-trip a fingerprint through JSON so tuples/lists and key types compare like the stored copy.

    Args:
        fingerprint: The embedder's fingerprint.

    Returns:
        An equal-by-JSON plain dict.

    Raises:
        InvalidArgumentError: Not a dict, or not JSON-serialisable.
    """
    if not isinstance(fingerprint, dict):
        raise InvalidArgumentError(f"fingerprint must be a dict, got {type(fingerprint).__name__}")
    try:
        return fingerprints.normalize(fingerprint)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"fingerprint must be JSON-serialisable: {exc}") from exc


def check_compatible(stored_fingerprint: dict[str, Any], given_fingerprint: dict[str, Any]) -> None:
    """Refuse to use a store built by a different embedder.

    Vectors from two embedders live in different spaces, so mixing them gives silently wrong search
    results; comparing the fingerprints (with ``==``, after JSON normalisation) catches that up front.

    Args:
        stored_fingerprint: From the manifest.
        given_fingerprint: From the embedder that wants to use the store.

    Raises:
        IncompatibleIndexError: The fingerprints differ; the message lists each differing key with the
            stored and the given value (``<not recorded>`` when one side lacks the key).
    """
    differences = fingerprints.differences(
        normalize_fingerprint(stored_fingerprint), normalize_fingerprint(given_fingerprint)
    )
    if differences:
        raise IncompatibleIndexError(
            "this store was built by a different embedder (fingerprint mismatch): "
            + fingerprints.describe(differences, sides=("stored", "given"))
            + ". Use a new data directory or re-index with this embedder.",
            differences=fingerprints.without_missing(differences),
        )
