"""``deepfeat export`` and ``deepfeat import``: a store's features out to a file, and back in.

Formats:

* ``parquet``: one row per image: ``id``, ``source``, ``metadata`` (JSON text), ``vector`` (the global
  vector, list of float32), then what an import needs to rebuild the store exactly: ``sha256``,
  ``width``, ``height``, ``nbytes``, ``added_at``, ``regions`` (the image's other vectors) and
  ``semantic``. The store's identity (fingerprint, dimension, embedder options) is in the file's
  key-value metadata under ``deepfeat``. Needs pyarrow.
* ``jsonl``: a header line ``{"deepfeat_export": 1, ...identity}``, then one JSON object per image with
  the same fields.
* ``npy``: the global vectors as one ``(n, dim)`` float32 ``.npy`` matrix for numpy, and beside it
  ``<name>.records.jsonl`` (the header, then one record per row of the matrix, without vectors). It
  carries no regional vectors, so it imports only where the exported store kept one vector per image.

Memory stays bounded by one page of images (:data:`PAGE`) whatever the store's size: pages stream from
the catalog to the file (parquet row groups, lines, or rows appended to the matrix).

An import opens (or creates) the store with the export's fingerprint, so a store made by anything else
is refused (``incompatible_index``); images keep their ids, sources, metadata and times, so searches
of the imported store answer what the exported one did. Content already in the store is skipped.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepfeat.index._fs import TMP_MARKER, temp_path_for
from deepfeat.index.errors import InvalidArgumentError, StoreError

if TYPE_CHECKING:
    from deepfeat.index.catalog import ExportedImage
    from deepfeat.index.filters import Filter
    from deepfeat.index.store import ImageStore

__all__ = ["FORMATS", "PAGE", "ExportError", "export_store", "import_file", "read_export"]

FORMATS = ("parquet", "jsonl", "npy")
PAGE = 1000
"""Images per page read from the catalog and written to the file (one parquet row group)."""
FORMAT_VERSION = 1


class ExportError(StoreError):
    """An export file that cannot be written or read: a missing dependency, a file that is not an
    export, or an export this store cannot take."""

    code = "invalid_export"


@dataclass
class ExportSummary:
    path: str
    format: str
    images: int
    vectors: int


def _identity(store: ImageStore) -> dict[str, Any]:
    manifest = store.manifest
    return {
        "deepfeat_export": FORMAT_VERSION,
        "fingerprint": manifest.fingerprint,
        "dim": manifest.dim,
        "embedder": manifest.embedder,
        "semantic_dim": store.stored_semantic_dim,
        "vectors_per_image": store.stats()["vectors_per_image"],
    }


def _row(image: ExportedImage, *, vectors: bool = True) -> dict[str, Any]:
    r = image.record
    row: dict[str, Any] = {
        "id": r.id,
        "source": r.source,
        "metadata": json.dumps(r.metadata, sort_keys=True),
        "sha256": r.sha256,
        "width": r.width,
        "height": r.height,
        "nbytes": r.nbytes,
        "added_at": r.added_at,
    }
    if vectors:
        row["vector"] = image.vectors[0].tolist()
        row["regions"] = image.vectors[1:].tolist()
        row["semantic"] = None if image.semantic is None else image.semantic.tolist()
    return row


def export_store(
    store: ImageStore, out: str | os.PathLike[str], *, fmt: str, where: Filter | None = None
) -> ExportSummary:
    """Write the store's images (those matching ``where``) to ``out``; the file appears only when
    complete (written aside, then renamed).

    Raises:
        ExportError: An unknown format, or parquet without pyarrow.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    path = Path(out)
    identity = _identity(store)
    pages = store.export(where=where, batch=PAGE)
    writer = {"parquet": _write_parquet, "jsonl": _write_jsonl, "npy": _write_npy}[fmt]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep(path)
        images, vectors = writer(path, identity, pages)
    except OSError as exc:  # name the file asked for, not the temp file beside it
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    return ExportSummary(path=str(path), format=fmt, images=images, vectors=vectors)


def _aside(path: Path, part: str = "") -> Path:
    """Where ``path`` is written until complete: the data dir's temp-file rule
    (``<name>.tmp-<pid>-<random>``), so an export killed midway is recognised and swept."""
    return temp_path_for(path.with_name(path.name + part))


def _sweep(path: Path) -> None:
    """Remove what an earlier export to ``path`` left when it was killed (its process is gone)."""
    for target in (path, records_path(path)):
        for stale in target.parent.glob(glob.escape(target.name) + "*" + TMP_MARKER + "*"):
            try:
                pid = int(stale.name.rsplit(TMP_MARKER, 1)[1].split("-", 1)[0])
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError):
                stale.unlink(missing_ok=True)
            except PermissionError:
                pass  # another user's live process


def _write_jsonl(
    path: Path, identity: dict[str, Any], pages: Iterator[list[ExportedImage]]
) -> tuple[int, int]:
    tmp = _aside(path)
    images = vectors = 0
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(json.dumps(identity) + "\n")
            for page in pages:
                for image in page:
                    fh.write(json.dumps(_row(image)) + "\n")
                    images, vectors = images + 1, vectors + len(image.vectors)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return images, vectors


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ExportError(
            "parquet needs pyarrow: pip install 'deepfeat[parquet]' (or use --format jsonl or npy)"
        ) from None
    return pa, pq


def _write_parquet(
    path: Path, identity: dict[str, Any], pages: Iterator[list[ExportedImage]]
) -> tuple[int, int]:
    pa, pq = _pyarrow()
    vec = pa.list_(pa.float32())
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("source", pa.string()),
            ("metadata", pa.string()),
            ("vector", vec),
            ("sha256", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("nbytes", pa.int64()),
            ("added_at", pa.float64()),
            ("regions", pa.list_(vec)),
            ("semantic", vec),
        ],
        metadata={"deepfeat": json.dumps(identity)},
    )
    tmp = _aside(path)
    images = vectors = 0
    try:
        with pq.ParquetWriter(str(tmp), schema) as writer:
            for page in pages:
                rows = [_row(image) for image in page]
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                images += len(page)
                vectors += sum(len(image.vectors) for image in page)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return images, vectors


def records_path(path: Path) -> Path:
    """The records that go with an ``.npy`` export: ``vectors.npy`` -> ``vectors.records.jsonl``."""
    return path.with_name(path.stem + ".records.jsonl")


def _write_npy(path: Path, identity: dict[str, Any], pages: Iterator[list[ExportedImage]]) -> tuple[int, int]:
    """Rows go to a raw file as they come; the matrix is then that file behind an .npy header (the row
    count is only known at the end)."""
    raw, tmp, records_tmp = _aside(path, ".rows"), _aside(path), _aside(records_path(path))
    images = 0
    try:
        with raw.open("wb") as rows, records_tmp.open("w", encoding="utf-8") as records:
            records.write(json.dumps({**identity, "global_only": True}) + "\n")
            for page in pages:
                for image in page:
                    rows.write(np.ascontiguousarray(image.vectors[0], dtype="<f4").tobytes())
                    records.write(json.dumps(_row(image, vectors=False)) + "\n")
                    images += 1
        dim = int(identity["dim"])
        with tmp.open("wb") as fh, raw.open("rb") as rows:
            header = {"descr": "<f4", "fortran_order": False, "shape": (images, dim)}
            np.lib.format.write_array_header_1_0(fh, header)
            while chunk := rows.read(1 << 20):
                fh.write(chunk)
        os.replace(tmp, path)
        os.replace(records_tmp, records_path(path))
    finally:
        for leftover in (raw, tmp, records_tmp):
            leftover.unlink(missing_ok=True)
    return images, images


# ---------------------------------------------------------------------------------------------- read


@dataclass
class ExportedRow:
    id: str
    source: str | None
    metadata: dict[str, Any]
    sha256: str
    width: int | None
    height: int | None
    nbytes: int | None
    added_at: float | None
    vectors: np.ndarray  # (m, dim): global, then regional
    semantic: np.ndarray | None


def _parsed(row: dict[str, Any], vectors: np.ndarray) -> ExportedRow:
    try:
        metadata = json.loads(row["metadata"]) if isinstance(row["metadata"], str) else row["metadata"]
        semantic = row.get("semantic")
        return ExportedRow(
            id=row["id"],
            source=row.get("source"),
            metadata=metadata,
            sha256=row["sha256"],
            width=row.get("width"),
            height=row.get("height"),
            nbytes=row.get("nbytes"),
            added_at=row.get("added_at"),
            vectors=vectors,
            semantic=None if semantic is None else np.asarray(semantic, dtype=np.float32),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"not a deepfeat export row: {exc}") from None


def _with_vectors(row: dict[str, Any]) -> ExportedRow:
    vectors = np.asarray([row["vector"], *(row.get("regions") or [])], dtype=np.float32)
    return _parsed(row, vectors)


def read_export(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Iterator[list[ExportedRow]]]:
    """The identity an export was made with, and its rows a page at a time (format from the file).

    Raises:
        ExportError: Not an export deepfeat wrote, or a version it does not know.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"no export file at {path}")
    with path.open("rb") as fh:
        magic = fh.read(6)
    if magic.startswith(b"PAR1"):
        return _read_parquet(path)
    if magic == b"\x93NUMPY":
        return _read_npy(path)
    return _read_jsonl(path)


def _check_identity(identity: Any, path: Path) -> dict[str, Any]:
    if not isinstance(identity, dict) or identity.get("deepfeat_export") != FORMAT_VERSION:
        raise ExportError(f"{path} is not a deepfeat export (version {FORMAT_VERSION})")
    return identity


def _paged(rows: Iterable[ExportedRow]) -> Iterator[list[ExportedRow]]:
    """Rows in pages of :data:`PAGE`."""
    page: list[ExportedRow] = []
    for row in rows:
        page.append(row)
        if len(page) == PAGE:
            yield page
            page = []
    if page:
        yield page


def _header(lines: Path, path: Path) -> dict[str, Any]:
    """The identity on the first line of a jsonl export (or an npy export's records)."""
    with lines.open(encoding="utf-8") as fh:
        try:
            return _check_identity(json.loads(fh.readline()), path)
        except ValueError:
            raise ExportError(f"{path} is not a deepfeat export (its first line is not JSON)") from None


def _records(lines: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each line after the header."""
    with lines.open(encoding="utf-8") as fh:
        fh.readline()
        for number, line in enumerate(fh, start=2):
            try:
                yield number, json.loads(line)
            except ValueError:
                raise ExportError(f"{lines}:{number}: not JSON") from None


def _read_jsonl(path: Path) -> tuple[dict[str, Any], Iterator[list[ExportedRow]]]:
    identity = _header(path, path)
    return identity, _paged(_with_vectors(row) for _, row in _records(path))


def _read_parquet(path: Path) -> tuple[dict[str, Any], Iterator[list[ExportedRow]]]:
    _, pq = _pyarrow()
    parquet = pq.ParquetFile(str(path))
    raw = (parquet.schema_arrow.metadata or {}).get(b"deepfeat")
    identity = _check_identity(json.loads(raw) if raw else None, path)

    def pages() -> Iterator[list[ExportedRow]]:
        for batch in parquet.iter_batches(batch_size=PAGE):
            yield [_with_vectors(row) for row in batch.to_pylist()]

    return identity, pages()


def _read_npy(path: Path) -> tuple[dict[str, Any], Iterator[list[ExportedRow]]]:
    records = records_path(path)
    if not records.is_file():
        raise ExportError(f"{path} has no {records.name} beside it (the records of its rows)")
    identity = _header(records, path)
    matrix = np.load(path, mmap_mode="r")
    if matrix.ndim != 2 or matrix.shape[1] != identity["dim"]:
        raise ExportError(f"{path}: a ({matrix.shape}) matrix, expected (n, {identity['dim']})")

    def rows() -> Iterator[ExportedRow]:
        for number, row in _records(records):
            i = number - 2
            if i >= matrix.shape[0]:
                raise ExportError(f"{records} has more records than {path} has rows")
            yield _parsed(row, np.array(matrix[i : i + 1], dtype=np.float32))

    return identity, _paged(rows())


# ---------------------------------------------------------------------------------------------- import


@dataclass
class ImportSummary:
    path: str
    added: int
    already_present: int


def import_file(path: str | os.PathLike[str], data_dir: str | os.PathLike[str]) -> ImportSummary:
    """Load an export into the store at ``data_dir``, creating it with the export's identity when
    there is none.

    Raises:
        ExportError: Not an export, or an npy export (global vectors only) for a store with regions.
        IncompatibleIndexError: The store there was made by a different embedder.
    """
    from deepfeat.index.catalog import NewImage
    from deepfeat.index.store import ImageStore

    identity, pages = read_export(path)
    if identity.get("global_only") and int(identity.get("vectors_per_image") or 1) > 1:
        raise ExportError(
            f"{path} is an npy export: global vectors only, of a store that keeps "
            f"{identity['vectors_per_image']} vectors per image; export with --format parquet or jsonl to import"
        )
    store = ImageStore.open(
        Path(data_dir),
        fingerprint=identity["fingerprint"],
        dim=int(identity["dim"]),
        embedder_config=identity.get("embedder"),
        semantic_dim=identity.get("semantic_dim"),
    )
    added = present = 0
    with store:
        for page in pages:
            # store.add takes one shape per call: group rows by vector count and semantic presence.
            groups: dict[tuple[int, bool], list[ExportedRow]] = {}
            for row in page:
                groups.setdefault((len(row.vectors), row.semantic is not None), []).append(row)
            for (_, with_semantic), rows in groups.items():
                images = [
                    NewImage(
                        sha256=r.sha256, source=r.source, width=r.width, height=r.height, nbytes=r.nbytes,
                        metadata=r.metadata, id=r.id, added_at=r.added_at,
                    )
                    for r in rows
                ]  # fmt: skip
                vectors = np.stack([r.vectors for r in rows])
                semantic = (
                    np.stack([r.semantic for r in rows if r.semantic is not None]) if with_semantic else None
                )
                try:
                    results = store.add(vectors if vectors.shape[1] > 1 else vectors[:, 0], images, semantic)
                except InvalidArgumentError as exc:
                    raise ExportError(f"{path}: {exc}") from None
                created = sum(result.created for result in results)
                added, present = added + created, present + len(results) - created
    return ImportSummary(path=str(path), added=added, already_present=present)
