"""deepfeat export / import: every format round-trips into a fresh store that answers every search as
the exported one did; a store made by another embedder is refused; memory stays bounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepfeat.index.catalog import NewImage
from deepfeat.index.filters import parse_filter
from deepfeat.index.store import ImageStore
from deepfeat.scripts.cli import main
from deepfeat.scripts.export_import import ExportError, export_store, import_file, records_path
from tests.index._helpers import sha_of, unit_vectors

DIM = 24
FINGERPRINT = {"model": "test", "dim": DIM, "regions": 2}


def _store(
    path: Path, n: int, *, per_image: int = 3, semantic: bool = True, fingerprint: dict | None = None
) -> ImageStore:
    store = ImageStore.open(
        path, fingerprint=fingerprint or FINGERPRINT, dim=DIM, semantic_dim=8 if semantic else None
    )
    vectors = unit_vectors(n * per_image, DIM, seed=1).reshape(n, per_image, DIM)
    rows = [
        NewImage(
            sha256=sha_of(("e", i)), source=None if i % 7 == 0 else f"photos/{i}.jpg", width=640, height=480,
            nbytes=1000 + i, metadata={"album": ["a", "b", "c"][i % 3], "i": i, "tags": ["x", i % 2]},
        )
        for i in range(n)
    ]  # fmt: skip
    sem = unit_vectors(n, 8, seed=2) if semantic else None
    store.add(vectors if per_image > 1 else vectors[:, 0], rows, sem)
    return store


def _answers(store: ImageStore, queries: np.ndarray, *, semantic: bool = True) -> list:
    out = [[(h.id, round(h.score, 6), h.record) for h in row] for row in store.search(queries, 10)]
    out += [
        [(h.id, h.score) for h in row] for row in store.search(queries, 5, where=parse_filter({"album": "b"}))
    ]
    if semantic:
        out += [
            [(h.id, h.score) for h in row]
            for row in store.search(unit_vectors(3, 8, seed=5), 5, similarity="semantic")
        ]
    return out


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_round_trip_answers_every_search_as_before(tmp_path: Path, fmt: str) -> None:
    source = _store(tmp_path / "a", 300)
    queries = unit_vectors(6, DIM, seed=3)
    out = tmp_path / f"export.{fmt}"
    summary = export_store(source, out, fmt=fmt)
    assert (summary.images, summary.vectors) == (300, 900)
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]  # nothing left aside
    result = import_file(out, tmp_path / "b")
    assert (result.added, result.already_present) == (300, 0)
    with ImageStore.open(tmp_path / "b", fingerprint=FINGERPRINT, dim=DIM, semantic_dim=8) as imported:
        assert _answers(imported, queries) == _answers(source, queries)
        assert (
            imported.list_images(limit=1000)[0] == source.list_images(limit=1000)[0]
        )  # ids, times, metadata
    assert import_file(out, tmp_path / "b").already_present == 300  # again: nothing twice
    source.close()


def test_parquet_columns_are_the_documented_ones(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    with _store(tmp_path / "a", 20) as store:
        export_store(store, tmp_path / "x.parquet", fmt="parquet", where=parse_filter({"album": "a"}))
        first = store.list_images(limit=1)[0][0]
        vector = store.vector(first.id)
    table = pq.read_table(tmp_path / "x.parquet")
    assert table.column_names[:4] == ["id", "source", "metadata", "vector"]
    assert str(table.schema.field("vector").type.value_type) == "float"
    assert table.num_rows == 7  # i % 3 == 0 among 20
    row = table.slice(0, 1).to_pylist()[0]
    assert row["id"] == first.id and json.loads(row["metadata"]) == first.metadata
    np.testing.assert_array_equal(np.asarray(row["vector"], dtype=np.float32), vector)


def test_npy_is_a_matrix_with_its_records_and_imports_single_vector_stores(tmp_path: Path) -> None:
    fingerprint = {"model": "test", "dim": DIM}
    source = _store(tmp_path / "a", 50, per_image=1, semantic=False, fingerprint=fingerprint)
    export_store(source, tmp_path / "v.npy", fmt="npy")
    matrix = np.load(tmp_path / "v.npy")
    records = (tmp_path / "v.records.jsonl").read_text().splitlines()
    assert matrix.shape == (50, DIM) and matrix.dtype == np.float32 and len(records) == 51
    assert json.loads(records[1])["id"] == source.list_images(limit=1)[0][0].id
    import_file(tmp_path / "v.npy", tmp_path / "b")
    queries = unit_vectors(4, DIM, seed=3)
    with ImageStore.open(tmp_path / "b", fingerprint=fingerprint, dim=DIM) as imported:
        assert _answers(imported, queries, semantic=False) == _answers(source, queries, semantic=False)
    # A store with regional vectors cannot come back from its global vectors alone.
    with _store(tmp_path / "c", 10) as regions:
        export_store(regions, tmp_path / "r.npy", fmt="npy")
    with pytest.raises(ExportError, match="npy export: global vectors only"):
        import_file(tmp_path / "r.npy", tmp_path / "d")
    assert records_path(tmp_path / "r.npy").exists()
    source.close()


def test_cli_export_import_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _store(tmp_path / "a", 30).close()
    assert (
        main(
            [
                "export",
                "--data-dir",
                str(tmp_path / "a"),
                "--out",
                str(tmp_path / "e.jsonl"),  # the format from the extension
                "--filter",
                '{"album": "c"}',
            ]
        )
        == 0
    )
    assert "exported 10 images (30 vectors)" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.jsonl").read_text().splitlines()[0])  # JSON lines, not parquet
    assert main(["export", "--data-dir", str(tmp_path / "a"), "--out", str(tmp_path / "g.npy")]) == 0
    assert np.load(tmp_path / "g.npy").shape == (30, DIM)  # all 30, one global vector each
    capsys.readouterr()
    (tmp_path / "a-file").write_text("x")
    target = tmp_path / "a-file" / "e.jsonl"  # its folder cannot be made
    assert main(["export", "--data-dir", str(tmp_path / "a"), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error [os_error]: ") and err.endswith(f": {target}\n") and ".tmp-" not in err
    assert main(["import", str(tmp_path / "e.jsonl"), "--data-dir", str(tmp_path / "b")]) == 0
    assert "imported 10, already present 0" in capsys.readouterr().out
    # Another embedder's store refuses it, with the stable code and no traceback.
    ImageStore.open(tmp_path / "other", fingerprint={"model": "other"}, dim=DIM).close()
    assert main(["import", str(tmp_path / "e.jsonl"), "--data-dir", str(tmp_path / "other")]) == 2
    assert capsys.readouterr().err.startswith("error [incompatible_index]")
    (tmp_path / "junk.jsonl").write_text('{"hello": 1}\n')
    assert main(["import", str(tmp_path / "junk.jsonl"), "--data-dir", str(tmp_path / "fresh")]) == 2
    assert "error [invalid_export]" in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()  # refused before any store is created
    assert (
        main(["export", "--data-dir", str(tmp_path / "a"), "--out", str(tmp_path / "x"), "--filter", "{"])
        == 2
    )
    assert capsys.readouterr().err.startswith("error [invalid_filter]")


MEMORY_PROBE = """
import resource, sys
from pathlib import Path
from deepfeat.index.store import ImageStore
from deepfeat.scripts.export_import import export_store
store = ImageStore.open(Path(sys.argv[1]), fingerprint={"model": "mem"}, dim=128, read_only=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
export_store(store, sys.argv[2], fmt=sys.argv[3])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.slow
def test_exporting_100k_vectors_stays_under_the_memory_bound(tmp_path: Path) -> None:
    """The documented bound: an export's peak memory grows by less than 64 MiB over the open store,
    whatever the store's size (100k images x 128 floats is 51 MB of vectors alone)."""
    with ImageStore.open(tmp_path / "s", fingerprint={"model": "mem"}, dim=128, snapshot_every=0) as store:
        for start in range(0, 100_000, 20_000):
            rows = [
                NewImage(
                    sha256=sha_of(("m", i)), source=f"p/{i}", width=1, height=1, nbytes=1, metadata={"i": i}
                )
                for i in range(start, start + 20_000)
            ]
            store.add(unit_vectors(20_000, 128, seed=start), rows)
    for fmt in ("parquet", "npy"):
        done = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "s"), str(tmp_path / f"out.{fmt}"), fmt],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        grew = int(done.stdout.strip().splitlines()[-1])
        assert grew < 64 * 2**20, (fmt, grew)


def test_an_export_killed_midway_leaves_no_file_and_the_next_one_sweeps_its_temp(tmp_path: Path) -> None:
    """The file appears only complete; what a killed export left (its process gone) is swept by the
    next export to the same place, and a live one's is not."""
    with _store(tmp_path / "a", 10) as store:
        dead = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
        )
        stale = tmp_path / f"out.jsonl.tmp-{dead.stdout.strip()}-abcd1234"
        stale.write_text("half an export")
        live = tmp_path / f"out.jsonl.tmp-{os.getpid()}-0000ffff"
        live.write_text("another export in progress")
        export_store(store, tmp_path / "out.jsonl", fmt="jsonl")
    assert not stale.exists() and live.exists()
    assert (tmp_path / "out.jsonl").read_text().count("\n") == 11
