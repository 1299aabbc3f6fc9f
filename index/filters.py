"""Metadata filters: a Mongo/Chroma-style JSON object, checked and compiled to one SQL query over the
catalog's indexed metadata table.

The language::

    {"album": "2024"}                                  equality (also {"album": {"$eq": "2024"}})
    {"year": {"$gte": 2020, "$lt": 2025}}              ranges: $gt $gte $lt $lte
    {"tag": {"$in": ["a", "b"]}}                       $in, $nin
    {"album": {"$exists": true}}                       $exists
    {"source": {"$prefix": "photos/"}}                 $prefix (strings only)
    {"album": {"$ne": "2024"}}                         $ne (also true where the key is absent)
    {"$and": [...]}, {"$or": [...]}                    combinations; several keys in one object are ANDed

Keys are the image's top-level metadata keys, and ``source`` (the path or name it was added with).

Semantics, chosen to be exact and predictable:

* Types never mix: a number compares only with numbers, a string only with strings, ``true`` only
  with booleans (so ``{"n": 1}`` does not match ``{"n": true}``, nor ``{"n": "1"}``); ``null`` matches
  an explicit null.
* An array value matches when one of its elements matches (``{"tag": "a"}`` matches ``["a", "b"]``),
  and the conditions given for one key in one object hold for the same element (so
  ``{"n": {"$gt": 1, "$lt": 3}}`` needs one element between 1 and 3).
* ``$ne`` and ``$nin`` are the complement of ``$eq`` and ``$in``: they also match images without the key.

Compilation: every condition on one key is one range of the index ``(key, kind, value)`` of the
``image_meta`` table (``index.catalog_db``: filled by a trigger from the metadata JSON with SQLite's
JSON1 ``json_each``), and ``$and``/``$or``/complements are ``INTERSECT``/``UNION``/``EXCEPT`` of those
seq sets, so SQLite answers a filter from its indexes, never by scanning the catalog.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Any

from deepfeat.index.errors import InvalidFilterError

__all__ = ["MAX_CONDITIONS", "MAX_IN_VALUES", "Filter", "parse_filter"]

MAX_CONDITIONS = 64
"""Key conditions in one filter (each is one index range in the query)."""
MAX_IN_VALUES = 1000
"""Values in one ``$in``/``$nin`` list (SQLite's host-parameter limit bounds the whole query)."""
MAX_DEPTH = 8
"""Nesting of ``$and``/``$or``."""

_RANGE = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_OPERATORS = ("$eq", "$ne", *_RANGE, "$in", "$nin", "$exists", "$prefix")
_LOWEST_TEXT = ""
"""SQLite orders every number before every string, and '' first among strings: ``value < ''`` bounds a
numeric range from above without leaving the index."""
_ALL = "SELECT seq FROM images"
_INT64 = (-(2**63), 2**63 - 1)
"""SQLite's integers; a JSON whole number outside them is read as a float."""


def _kind(value: Any, where: str) -> str:
    """The stored kind of a filter operand: n(umber), s(tring), b(oolean), z (null)."""
    if value is None:
        return "z"
    if isinstance(value, bool):
        return "b"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidFilterError(f"{where}: numbers must be finite")
        if isinstance(value, int) and abs(value) > sys.float_info.max:
            raise InvalidFilterError(f"{where}: {str(value)[:20]}... is beyond the range of stored numbers")
        return "n"
    if isinstance(value, str):
        return "s"
    raise InvalidFilterError(
        f"{where}: expected a string, number, boolean or null, got {type(value).__name__}"
        + (" (use $in for a list of values)" if isinstance(value, list) else "")
    )


def _stored(value: Any) -> Any:
    """The operand as the table stores it, as JSON1's json_each gives it: booleans as 1/0, and whole
    numbers beyond SQLite's 64-bit integers as the floats it reads them as (such a number in metadata
    matches the same number in a filter)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and not _INT64[0] <= value <= _INT64[1]:
        return float(value)
    return value


@dataclass(frozen=True)
class Filter:
    """A checked filter: ``sql`` selects the seqs of the matching images (with ``params``)."""

    expression: dict[str, Any]
    sql: str
    params: tuple[Any, ...]

    @property
    def matches_all(self) -> bool:
        return self.sql == _ALL

    def canonical(self) -> str:
        return json.dumps(self.expression, sort_keys=True, separators=(",", ":"))


Sql = tuple[str, tuple[Any, ...]]
"""A query or condition and its parameters, in the order their ``?`` appear."""


class _Compiler:
    def __init__(self) -> None:
        self.conditions = 0

    def node(self, expr: Any, where: str, depth: int) -> Sql:
        if not isinstance(expr, dict):
            raise InvalidFilterError(f"{where}: expected a JSON object, got {_json_type(expr)}")
        if depth > MAX_DEPTH:
            raise InvalidFilterError(f"{where}: $and/$or nested deeper than {MAX_DEPTH}")
        parts: list[Sql] = []
        for key, value in expr.items():
            if key in ("$and", "$or"):
                if not isinstance(value, list) or not value:
                    raise InvalidFilterError(f"{where}.{key}: expected a non-empty list of filters")
                children = [self.node(v, f"{where}.{key}[{i}]", depth + 1) for i, v in enumerate(value)]
                parts.append(_combine(children, "INTERSECT" if key == "$and" else "UNION"))
            elif key.startswith("$"):
                raise InvalidFilterError(
                    f"{where}: unknown operator {key!r} where a key belongs (keys are metadata keys, "
                    "'source', $and or $or)"
                )
            elif not key:
                raise InvalidFilterError(f"{where}: empty key")
            else:
                parts.append(self.key(key, value, f"{where}.{key}"))
        return _combine(parts, "INTERSECT") if parts else (_ALL, ())

    def key(self, key: str, spec: Any, where: str) -> Sql:
        is_ops = isinstance(spec, dict) and spec and all(k.startswith("$") for k in spec)
        if isinstance(spec, dict) and not is_ops:
            raise InvalidFilterError(
                f"{where}: an object here must hold operators ({', '.join(_OPERATORS)}); "
                "nested metadata is not filterable"
            )
        ops: dict[str, Any] = spec if is_ops else {"$eq": spec}
        unknown = sorted(set(ops) - set(_OPERATORS))
        if unknown:
            raise InvalidFilterError(
                f"{where}: unknown operator {unknown[0]!r}; use one of {', '.join(_OPERATORS)}"
            )
        self.conditions += 1
        if self.conditions > MAX_CONDITIONS:
            raise InvalidFilterError(f"more than {MAX_CONDITIONS} key conditions in one filter")
        column = _Column(key)
        positive: list[Sql] = []  # conditions on one stored value, ANDed in one index range
        sets: list[Sql] = []  # whole seq sets, intersected
        bounds = {op: ops[op] for op in _RANGE if op in ops}
        if bounds:
            kinds = {_kind(v, f"{where}.{op}") for op, v in bounds.items()}
            if kinds - {"n", "s"} or len(kinds) > 1:
                raise InvalidFilterError(f"{where}: range bounds must be all numbers or all strings")
            positive.append(column.range(kinds.pop(), bounds))
        if "$prefix" in ops:
            prefix = ops["$prefix"]
            if not isinstance(prefix, str):
                raise InvalidFilterError(f"{where}.$prefix: expected a string, got {_json_type(prefix)}")
            positive.append(column.prefix(prefix))
        if "$eq" in ops:
            positive.append(column.equal([ops["$eq"]], f"{where}.$eq"))
        if "$in" in ops:
            positive.append(column.equal(_values(ops["$in"], f"{where}.$in"), f"{where}.$in"))
        if "$exists" in ops:
            flag = ops["$exists"]
            if not isinstance(flag, bool):
                raise InvalidFilterError(f"{where}.$exists: expected true or false, got {_json_type(flag)}")
            if flag:
                positive.append(column.present())
            else:
                sets.append(_complement(column.select([column.present()])))
        if "$ne" in ops:
            sets.append(_complement(column.select([column.equal([ops["$ne"]], f"{where}.$ne")])))
        if "$nin" in ops:
            values = _values(ops["$nin"], f"{where}.$nin")
            sets.append(_complement(column.select([column.equal(values, f"{where}.$nin")])))
        if positive:
            sets.insert(0, column.select(positive))
        return _combine(sets, "INTERSECT")


class _Column:
    """SQL over one key: the metadata table's rows for it, or the images table's ``source`` column.

    Each method but :meth:`select` returns a condition on one stored value; :meth:`select` makes the
    query of the seqs whose value meets all the conditions given."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.source = key == "source"
        self.col = "source" if self.source else "value"

    def select(self, conditions: list[Sql]) -> Sql:
        where = " AND ".join(sql for sql, _ in conditions)
        params = tuple(p for _, ps in conditions for p in ps)
        if self.source:
            return f"SELECT seq FROM images WHERE {where}", params
        return f"SELECT seq FROM image_meta WHERE key = ? AND {where}", (self.key, *params)

    def present(self) -> Sql:
        return ("source IS NOT NULL" if self.source else "1"), ()

    def _typed(self, kind: str, condition: Sql) -> Sql:
        sql, params = condition
        if self.source:  # the column holds strings, or NULL for images added without one
            if kind == "s":
                return condition
            return ("source IS NULL" if kind == "z" else "0"), ()
        if not sql:
            return "kind = ?", (kind,)
        return f"(kind = ? AND {sql})", (kind, *params)

    def range(self, kind: str, bounds: dict[str, Any]) -> Sql:
        terms = [f"{self.col} {_RANGE[op]} ?" for op in bounds]
        params = [_stored(v) for v in bounds.values()]
        if kind == "n" and not any(op in bounds for op in ("$lt", "$lte")):
            terms.append(f"{self.col} < ?")
            params.append(_LOWEST_TEXT)
        return self._typed(kind, (" AND ".join(terms), tuple(params)))

    def prefix(self, prefix: str) -> Sql:
        # An index range from the prefix up, then the exact check (no upper-bound string is safe for
        # every code point).
        sql = f"{self.col} >= ? AND substr({self.col}, 1, ?) = ?"
        return self._typed("s", (sql, (prefix, len(prefix), prefix)))

    def equal(self, values: list[Any], where: str) -> Sql:
        by_kind: dict[str, list[Any]] = {}
        for i, v in enumerate(values):
            by_kind.setdefault(_kind(v, f"{where}[{i}]" if len(values) > 1 else where), []).append(_stored(v))
        terms: list[Sql] = []
        for kind, vs in by_kind.items():
            unique = tuple(dict.fromkeys(vs))
            if kind == "z":
                terms.append(self._typed("z", ("", ())))
            elif len(unique) == 1:
                terms.append(self._typed(kind, (f"{self.col} = ?", unique)))
            else:
                terms.append(self._typed(kind, (f"{self.col} IN ({', '.join('?' * len(unique))})", unique)))
        if len(terms) == 1:
            return terms[0]
        return "(" + " OR ".join(sql for sql, _ in terms) + ")", tuple(p for _, ps in terms for p in ps)


def _complement(query: Sql) -> Sql:
    return f"{_ALL} EXCEPT SELECT seq FROM ({query[0]})", query[1]


def _values(values: Any, where: str) -> list[Any]:
    if not isinstance(values, list) or not values:
        raise InvalidFilterError(f"{where}: expected a non-empty list of values")
    if len(values) > MAX_IN_VALUES:
        raise InvalidFilterError(f"{where}: at most {MAX_IN_VALUES} values, got {len(values)}")
    return values


def _combine(queries: list[Sql], op: str) -> Sql:
    if len(queries) == 1:
        return queries[0]
    sql = f" {op} ".join(f"SELECT seq FROM ({q})" for q, _ in queries)
    return sql, tuple(p for _, ps in queries for p in ps)


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value),
        "null" if value is None else "a number" if isinstance(value, int | float) else type(value).__name__,
    )


def parse_filter(value: str | dict[str, Any] | None) -> Filter | None:
    """A filter from its JSON text (a query parameter, a CLI flag) or an already-parsed object.

    Returns:
        None for no filter (None or an empty string).

    Raises:
        InvalidFilterError: Not JSON, not an object, or not the language above; the message says
            where and why.
    """
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            expr = json.loads(value, parse_constant=_no_constant)
        except ValueError as exc:
            raise InvalidFilterError(f"filter is not valid JSON: {exc}") from None
    else:
        expr = value
    sql, params = _Compiler().node(expr, "filter", 0)
    return Filter(expression=expr, sql=sql, params=params)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
