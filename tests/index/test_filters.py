"""Metadata filters: the language's exact semantics against a reference evaluator, every invalid
filter refused with where and why, SQLite answering from its indexes, and filtered search equal to a
brute-force filtered search on Flat, HNSW and IVF stores at selectivities from 0.1% to 100%."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deepfeat.index import store as store_module
from deepfeat.index.catalog import NewImage
from deepfeat.index.errors import InvalidFilterError
from deepfeat.index.files import CATALOG_FILE
from deepfeat.index.filters import MAX_CONDITIONS, MAX_IN_VALUES, parse_filter
from deepfeat.index.store import ImageStore
from deepfeat.index.vectors import VectorIndex
from tests.index._helpers import DIM, sha_of, unit_vectors

# ---------------------------------------------------------------------------- a reference evaluator


def _kind(v: Any) -> str:
    if v is None:
        return "z"
    if isinstance(v, bool):
        return "b"
    if isinstance(v, int | float):
        return "n"
    if isinstance(v, str):
        return "s"
    return "o"


def _same(a: Any, b: Any) -> bool:
    return _kind(a) == _kind(b) and a == b


def _element_ok(v: Any, ops: dict[str, Any]) -> bool:
    """Whether one stored value meets every positive operator of one key."""
    for op, arg in ops.items():
        if op == "$eq" and not _same(v, arg):
            return False
        if op == "$in" and not any(_same(v, a) for a in arg):
            return False
        if op == "$prefix" and not (isinstance(v, str) and v.startswith(arg)):
            return False
        if op in ("$gt", "$gte", "$lt", "$lte"):
            if _kind(v) != _kind(arg) or _kind(v) not in "ns":
                return False
            if not {"$gt": v > arg, "$gte": v >= arg, "$lt": v < arg, "$lte": v <= arg}[op]:
                return False
    return True


def _key_ok(record: dict[str, Any], key: str, spec: Any) -> bool:
    ops = spec if isinstance(spec, dict) else {"$eq": spec}
    present = key in record
    value = record.get(key)
    values = value if isinstance(value, list) else [value]
    scalars = [v for v in values if not isinstance(v, list | dict)] if present else []
    positive = {op: a for op, a in ops.items() if op not in ("$ne", "$nin", "$exists")}
    if "$exists" in ops and ops["$exists"] != present:
        return False
    if "$ne" in ops and any(_same(v, ops["$ne"]) for v in scalars):
        return False
    if "$nin" in ops and any(_same(v, a) for v in scalars for a in ops["$nin"]):
        return False
    if positive:
        if isinstance(value, list):
            return any(_element_ok(v, positive) for v in scalars)
        return present and not isinstance(value, dict) and _element_ok(value, positive)
    return True


def matches(record: dict[str, Any], expr: dict[str, Any]) -> bool:
    for key, spec in expr.items():
        if key == "$and":
            ok = all(matches(record, e) for e in spec)
        elif key == "$or":
            ok = any(matches(record, e) for e in spec)
        else:
            ok = _key_ok(record, key, spec)
        if not ok:
            return False
    return True


# ---------------------------------------------------------------------------- random stores and filters

ALBUMS = ["2022", "2023", "2024", "travel", "family"]
TAGS = ["a", "b", "c", "d"]


def random_metadata(rng: np.random.Generator, i: int) -> tuple[str | None, dict[str, Any]]:
    meta: dict[str, Any] = {}
    if rng.random() < 0.8:
        meta["album"] = str(rng.choice(ALBUMS))
    if rng.random() < 0.7:
        meta["year"] = int(rng.integers(2000, 2030)) if rng.random() < 0.8 else float(rng.integers(0, 99)) / 3
    if rng.random() < 0.5:
        meta["tag"] = [str(t) for t in rng.choice(TAGS, size=int(rng.integers(0, 3)), replace=False)]
    elif rng.random() < 0.3:
        meta["tag"] = str(rng.choice(TAGS))
    if rng.random() < 0.2:
        meta["flag"] = bool(rng.random() < 0.5) if rng.random() < 0.6 else int(rng.integers(0, 2))
    if rng.random() < 0.05:
        meta["note"] = None
    if rng.random() < 0.05:
        meta["nested"] = {"x": 1}
    source = None if rng.random() < 0.05 else f"{rng.choice(['photos', 'scans', 'photos/old'])}/{i}.jpg"
    return source, meta


def random_filter(rng: np.random.Generator, depth: int = 0) -> dict[str, Any]:
    roll = rng.random()
    if depth < 2 and roll < 0.15:
        return {str(rng.choice(["$and", "$or"])): [random_filter(rng, depth + 1) for _ in range(2)]}
    choices: list[dict[str, Any]] = [
        {"album": str(rng.choice(ALBUMS))},
        {"album": {"$in": [str(a) for a in rng.choice(ALBUMS, size=2, replace=False)]}},
        {"album": {"$ne": str(rng.choice(ALBUMS))}},
        {"album": {"$exists": bool(rng.random() < 0.5)}},
        {"year": {"$gte": int(rng.integers(2000, 2030)), "$lt": int(rng.integers(2000, 2031))}},
        {"year": {"$gt": int(rng.integers(1990, 2030))}},
        {"year": {"$lte": 20.5}},
        {"tag": str(rng.choice(TAGS))},
        {"tag": {"$nin": [str(rng.choice(TAGS))]}},
        {"tag": {"$in": ["a", 1, None]}},
        {"flag": True},
        {"flag": 1},
        {"note": None},
        {"nested": {"$exists": True}},
        {"source": {"$prefix": str(rng.choice(["photos/", "photos/old", "scans/", ""]))}},
        {"source": {"$exists": False}},
        {"album": {"$prefix": "20", "$ne": "2024"}},
        {"year": {"$gte": "2020"}},
        {},
    ]
    return choices[int(rng.integers(len(choices)))]


def fill(
    store: ImageStore, n: int, *, seed: int, per_image: int = 1
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """n images with random metadata; returns their vectors ((n, per_image, DIM)) and their records
    as the reference evaluator sees them (metadata plus ``source``)."""
    rng = np.random.default_rng(seed)
    vectors = unit_vectors(n * per_image, seed=seed).reshape(n, per_image, DIM)
    rows, records = [], []
    for i in range(n):
        source, meta = random_metadata(rng, i)
        rows.append(
            NewImage(sha256=sha_of((seed, i)), source=source, width=8, height=8, nbytes=1, metadata=meta)
        )
        records.append({**meta, **({"source": source} if source is not None else {})})
    store.add(vectors if per_image > 1 else vectors[:, 0], rows)
    return vectors, records


# ---------------------------------------------------------------------------- the language


def test_random_filters_select_what_the_reference_semantics_select(
    open_store: Callable[..., ImageStore],
) -> None:
    store = open_store()
    _, records = fill(store, 600, seed=1)
    ids = [r.id for r in store.list_images(limit=1000)[0]]
    rng = np.random.default_rng(2)
    checked = 0
    for _ in range(300):
        expr = random_filter(rng)
        want = {ids[i] for i, record in enumerate(records) if matches(record, expr)}
        got = {r.id for r in store.list_images(limit=1000, where=parse_filter(json.dumps(expr)))[0]}
        assert got == want, expr
        checked += bool(want) and len(want) < len(records)
    assert checked > 150  # most filters select a proper, non-empty part


@pytest.mark.parametrize(
    ("expr", "want"),
    [
        ({"album": "2024"}, {0}),
        ({"year": {"$gte": 2020, "$lt": 2025}}, {0}),
        ({"tag": {"$in": ["a", "x"]}}, {0}),
        ({"tag": "b"}, {0}),  # an array matches by any element
        ({"album": {"$exists": True}}, {0, 1}),
        ({"album": {"$exists": False}}, {2, 3}),
        ({"source": {"$prefix": "photos/"}}, {0, 1}),
        ({"flag": True}, {2}),  # booleans are not numbers
        ({"flag": 1}, {3}),
        ({"n": None}, {3}),
        ({"year": "2020"}, {2}),  # strings are not numbers
        ({"$or": [{"album": "2023"}, {"flag": True}]}, {1, 2}),
        ({"$and": [{"album": {"$exists": True}}, {"year": {"$lt": 2020}}]}, {1}),
        ({"album": {"$ne": "2024"}}, {1, 2, 3}),  # includes images without the key
        ({"tag": {"$nin": ["a"]}}, {1, 2, 3}),
        ({"tag": {"$gt": "a", "$lt": "c"}}, {0}),  # both bounds on one element ("b")
        ({"source": "scans/3.jpg"}, {3}),
        ({"source": None}, set()),
        ({}, {0, 1, 2, 3}),
    ],
)
def test_documented_examples(
    open_store: Callable[..., ImageStore], expr: dict[str, Any], want: set[int]
) -> None:
    store = open_store()
    metas = [
        {"album": "2024", "year": 2021, "tag": ["a", "b"]},
        {"album": "2023", "year": 2019.5, "tag": "c"},
        {"year": "2020", "flag": True},
        {"flag": 1, "n": None},
    ]
    sources = ["photos/0.jpg", "photos/1.jpg", "photo/2.jpg", "scans/3.jpg"]
    added = store.add(
        unit_vectors(4),
        [
            NewImage(sha256=sha_of(i), source=s, width=8, height=8, nbytes=1, metadata=m)
            for i, (s, m) in enumerate(zip(sources, metas, strict=True))
        ],
    )
    got = {r.id for r in store.list_images(limit=10, where=parse_filter(expr))[0]}
    assert got == {added[i].id for i in want}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "filter is not valid JSON"),
        ("[1]", "filter: expected a JSON object, got a list"),
        ('{"year": NaN}', "filter is not valid JSON: NaN is not a JSON number"),
        ('{"$not": {"a": 1}}', "filter: unknown operator '$not' where a key belongs"),
        ('{"a": {"$regex": "x"}}', "filter.a: unknown operator '$regex'"),
        ('{"a": [1, 2]}', "filter.a.$eq: expected a string, number, boolean or null, got list (use $in"),
        ('{"a": {"b": 1}}', "filter.a: an object here must hold operators"),
        ('{"a": {"$in": []}}', "filter.a.$in: expected a non-empty list of values"),
        ('{"a": {"$in": "x"}}', "filter.a.$in: expected a non-empty list of values"),
        ('{"a": {"$gte": 1, "$lt": "z"}}', "filter.a: range bounds must be all numbers or all strings"),
        ('{"a": {"$gt": true}}', "filter.a: range bounds must be all numbers or all strings"),
        ('{"a": {"$exists": 1}}', "filter.a.$exists: expected true or false, got a number"),
        ('{"a": {"$prefix": 3}}', "filter.a.$prefix: expected a string, got a number"),
        ('{"$and": []}', "filter.$and: expected a non-empty list of filters"),
        ('{"$or": {"a": 1}}', "filter.$or: expected a non-empty list of filters"),
        ('{"$and": [3]}', "filter.$and[0]: expected a JSON object, got a number"),
        ('{"": 1}', "filter: empty key"),
        ('{"a": {"$gt": 1e999}}', "filter.a.$gt: numbers must be finite"),
        (
            '{"a": 1' + "0" * 400 + "}",
            "filter.a.$eq: 10000000000000000000... is beyond the range of stored numbers",
        ),
    ],
)
def test_invalid_filters_say_where_and_why(text: str, message: str) -> None:
    with pytest.raises(InvalidFilterError, match="^" + _escape(message)) as caught:
        parse_filter(text)
    assert caught.value.code == "invalid_filter"


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_whole_numbers_beyond_64_bits_match_as_sqlite_stores_them(
    open_store: Callable[..., ImageStore],
) -> None:
    """SQLite reads a JSON whole number outside its 64-bit integers as a float: a filter holding the
    same number finds the image instead of failing to bind it."""
    store = open_store()
    big = 99999999999999999999999
    added = store.add(
        unit_vectors(2),
        [
            NewImage(sha256=sha_of(i), source=f"{i}.jpg", width=8, height=8, nbytes=1, metadata=m)
            for i, m in enumerate([{"big": big}, {"big": 2**63 - 1}])
        ],
    )
    for expr, want in (
        ({"big": big}, {0}),
        ({"big": {"$gte": big - 1}}, {0}),
        ({"big": {"$in": [big, 2**63 - 1]}}, {0, 1}),
        ({"big": {"$lt": 2**64}}, {1}),
    ):
        got = {r.id for r in store.list_images(limit=10, where=parse_filter(expr))[0]}
        assert got == {added[i].id for i in want}, expr


def test_limits_on_size_and_depth() -> None:
    many = {f"k{i}": 1 for i in range(MAX_CONDITIONS + 1)}
    with pytest.raises(InvalidFilterError, match=f"more than {MAX_CONDITIONS} key conditions"):
        parse_filter(many)
    with pytest.raises(InvalidFilterError, match=f"at most {MAX_IN_VALUES} values"):
        parse_filter({"a": {"$in": list(range(MAX_IN_VALUES + 1))}})
    deep: dict[str, Any] = {"a": 1}
    for _ in range(10):
        deep = {"$and": [deep]}
    with pytest.raises(InvalidFilterError, match="nested deeper than 8"):
        parse_filter(deep)
    assert parse_filter(None) is None and parse_filter("") is None


def test_sqlite_answers_from_its_indexes(open_store: Callable[..., ImageStore], data_dir: Path) -> None:
    fill(open_store(), 50, seed=3)
    conn = sqlite3.connect(data_dir / CATALOG_FILE)
    for expr in (
        {"album": "2024"},
        {"year": {"$gte": 2020, "$lt": 2025}},
        {"tag": {"$in": ["a", "b"]}},
        {"album": {"$prefix": "20"}},
        {"source": {"$prefix": "photos/"}},
        {"$or": [{"album": "2023"}, {"year": {"$gt": 2010}}]},
    ):
        f = parse_filter(expr)
        assert f is not None
        plan = " | ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + f.sql, f.params))
        assert "SCAN images" not in plan and "SCAN image_meta" not in plan, (expr, plan)
        assert "image_meta_by_value" in plan or "images_by_source" in plan, (expr, plan)


def test_deleted_images_leave_the_metadata_table(
    open_store: Callable[..., ImageStore], data_dir: Path
) -> None:
    store = open_store()
    fill(store, 20, seed=4)
    for record in store.list_images(limit=100)[0]:
        store.delete(record.id)
    conn = sqlite3.connect(data_dir / CATALOG_FILE)
    assert conn.execute("SELECT count(*) FROM image_meta").fetchone()[0] == 0


def test_a_catalog_from_before_filters_gets_its_metadata_indexed(
    open_store: Callable[..., ImageStore], data_dir: Path
) -> None:
    """Rolled back to schema 2 (no metadata table), the next writable open fills it from the JSON."""
    store = open_store()
    _, records = fill(store, 40, seed=5)
    store.close()
    conn = sqlite3.connect(data_dir / CATALOG_FILE)
    conn.executescript(
        "DROP TRIGGER image_meta_on_insert; DROP TABLE image_meta; DROP INDEX images_by_source; PRAGMA user_version = 2;"
    )
    conn.close()
    store = open_store()
    ids = [r.id for r in store.list_images(limit=100)[0]]
    want = {ids[i] for i, r in enumerate(records) if matches(r, {"album": "2024"})}
    assert (
        want
        and {r.id for r in store.list_images(limit=100, where=parse_filter({"album": "2024"}))[0]} == want
    )


# ---------------------------------------------------------------------------- filtered search


def brute_force(
    vectors: np.ndarray, records: list[dict[str, Any]], ids: list[str], query: np.ndarray, expr: Any, k: int
) -> list[str]:
    """The best k matching images by their best vector, by exhaustive scoring."""
    best = (vectors @ query).max(axis=1)  # (n,)
    order = [i for i in np.argsort(-best, kind="stable") if matches(records[i], expr)]
    return [ids[i] for i in order[:k]]


def _bucketed(
    store: ImageStore, n: int, per_image: int, seed: int
) -> tuple[np.ndarray, list[dict[str, Any]], list[str]]:
    """n images whose metadata ``bucket`` is 0..999 (i * 7919 mod 1000): ``bucket < 1000 * share``
    selects a share of them from 0.1% to 100%."""
    vectors = unit_vectors(n * per_image, seed=seed).reshape(n, per_image, DIM)
    rows, records = [], []
    for i in range(n):
        meta = {"bucket": (i * 7919) % 1000, "album": ALBUMS[i % len(ALBUMS)]}
        rows.append(
            NewImage(
                sha256=sha_of(("b", seed, i)), source=f"p/{i}", width=8, height=8, nbytes=1, metadata=meta
            )
        )
        records.append(meta)
    for start in range(0, n, 500):
        chunk = vectors[start : start + 500]
        store.add(chunk if per_image > 1 else chunk[:, 0], rows[start : start + 500])
    ids = [r.id for r in store.list_images(limit=n + 1)[0]]
    return vectors, records, ids


SHARES = (0.001, 0.01, 0.1, 0.5, 1.0)


@pytest.mark.parametrize(
    ("factory", "per_image", "params"),
    [
        ("Flat", 1, {}),
        ("Flat", 3, {}),  # regional vectors: k counts images
        ("HNSW32", 1, {"efSearch": 256}),
        ("IVF16,Flat", 1, {"nprobe": 16}),
    ],
)
@pytest.mark.parametrize("path", ["index", "exact scan"])
def test_filtered_search_equals_brute_force_filtered_search(
    open_store: Callable[..., ImageStore],
    monkeypatch: pytest.MonkeyPatch,
    factory: str,
    per_image: int,
    params: dict[str, int],
    path: str,
) -> None:
    """Same ids in the same order as exhaustive scoring of the matching images, at every share.

    ``index``: FAISS's ID selector on the index (the exact-scan threshold set to 0); ``exact scan``:
    the stored vectors of the matching images (the threshold set high, which only changes anything on
    the approximate indexes)."""
    monkeypatch.setattr(store_module, "EXACT_SCAN_BYTES", 0 if path == "index" else 1 << 40)
    store = open_store(index_factory=factory)
    n = 2000
    vectors, records, ids = _bucketed(store, n, per_image, seed=11)
    if params:
        store._vectors.set_search_params(params)
    queries = unit_vectors(8, seed=12)
    for share in SHARES:
        expr = {"bucket": {"$lt": int(1000 * share)}}
        where = parse_filter(expr)
        for k in (1, 10, 50):
            hits = store.search(queries, k, where=where)
            for q, row in zip(queries, hits, strict=True):
                want = brute_force(vectors, records, ids, q, expr, k)
                assert [h.id for h in row] == want, (factory, share, k)
                assert all(math.isfinite(h.score) for h in row)


def test_an_approximate_index_never_returns_fewer_than_k_matching_images(
    open_store: Callable[..., ImageStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """IVF probing one list of 16 (its nprobe not widened by the filter's share here) with a filter
    matching 1% finds few matches in that list; the short rows are completed by an exact scan, so
    every query gets min(k, matches) hits."""
    monkeypatch.setattr(store_module, "EXACT_SCAN_BYTES", 0)
    params = VectorIndex._filtered_params
    monkeypatch.setattr(VectorIndex, "_filtered_params", lambda self, sel, share: params(self, sel, 1.0))
    store = open_store(index_factory="IVF16,Flat")
    vectors, records, ids = _bucketed(store, 2000, 1, seed=13)
    store._vectors.set_search_params({"nprobe": 1})
    where = parse_filter({"bucket": {"$lt": 10}})  # 20 images
    queries = unit_vectors(16, seed=14)
    for q, row in zip(queries, store.search(queries, 10, where=where), strict=True):
        assert len(row) == 10
        assert {h.id for h in row} <= set(brute_force(vectors, records, ids, q, {"bucket": {"$lt": 10}}, 20))


def test_similar_and_semantic_and_duplicates_take_the_filter(open_store: Callable[..., ImageStore]) -> None:
    store = open_store(semantic_dim=8)
    vectors = unit_vectors(40)
    vectors[20:] = vectors[:20] + 0.01 * unit_vectors(20, seed=9)  # 20 near-duplicate pairs
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = [
        NewImage(sha256=sha_of(i), source=f"s/{i}", width=8, height=8, nbytes=1, metadata={"half": i % 2})
        for i in range(40)
    ]
    added = [r.id for r in store.add(vectors, rows, semantic=unit_vectors(40, 8, seed=3))]
    even = parse_filter({"half": 0})
    hits = store.similar(added[0], 5, where=even)
    assert len(hits) == 5 and added[0] not in {h.id for h in hits}
    assert all(added.index(h.id) % 2 == 0 for h in hits)
    semantic = store.search(unit_vectors(1, 8, seed=4), 7, similarity="semantic", where=even)[0]
    assert len(semantic) == 7 and all(added.index(h.id) % 2 == 0 for h in semantic)
    groups = store.near_duplicates(0.99, where=even)
    assert groups and all(added.index(r.id) % 2 == 0 for g in groups for r in g)
    assert len(groups) == 10  # the pairs (i, i + 20) with i even
    assert store.search(unit_vectors(1), 5, where=parse_filter({"half": 7})) == [[]]


def test_a_repeated_filter_sees_every_add_and_delete(open_store: Callable[..., ImageStore]) -> None:
    """Matching sets are kept between searches only while the catalog is unchanged."""
    store = open_store()
    where = parse_filter({"album": "x"})
    rows = [
        NewImage(sha256=sha_of(("c", i)), source=None, width=1, height=1, nbytes=1, metadata={"album": "x"})
        for i in range(3)
    ]
    first = store.add(unit_vectors(1, seed=1), rows[:1])[0].id
    assert [h.id for h in store.search(unit_vectors(1), 5, where=where)[0]] == [first]
    second = store.add(unit_vectors(1, seed=2), rows[1:2])[0].id
    assert {h.id for h in store.search(unit_vectors(1), 5, where=where)[0]} == {first, second}
    store.delete(first)
    assert [h.id for h in store.search(unit_vectors(1), 5, where=where)[0]] == [second]
    assert [r.id for r in store.list_images(limit=5, where=where)[0]] == [second]
