"""What "the same features" means: comparing two embedder fingerprints.

A store (``index``) and a trained classifier head (``models``) both record the fingerprint of the
embedder that made their vectors, and both refuse a running embedder whose fingerprint differs. They
must agree on what "differs" means, yet may not import each other (an import-linter contract), so the
comparison lives here, in plain Python, and each side raises its own error from the differences.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

__all__ = ["MISSING", "normalize", "differences", "describe", "without_missing"]

_MAX_VALUE_CHARS = 200


class _Missing:
    """Marks a key one fingerprint lacks: unlike ``None``, it cannot be a recorded JSON value."""

    def __repr__(self) -> str:
        return "<not recorded>"


MISSING: Final = _Missing()


def normalize(fingerprint: Any) -> dict[str, Any]:
    """Round-trip through JSON, so tuples and lists (and key types) compare like the stored copy.

    Raises:
        TypeError: Not a dict, or a value JSON cannot encode.
        ValueError: A NaN or infinite number, or a circular reference.
    """
    if not isinstance(fingerprint, dict):
        raise TypeError(f"fingerprint must be a dict, got {type(fingerprint).__name__}")
    result: dict[str, Any] = json.loads(json.dumps(fingerprint, sort_keys=True, allow_nan=False))
    return result


def differences(
    stored: dict[str, Any], given: dict[str, Any], *, keys: Sequence[str] | None = None
) -> dict[str, tuple[Any, Any]]:
    """The keys whose values differ once both sides are normalised, each with ``(stored, given)``.

    Args:
        stored: The recorded fingerprint (a manifest's).
        given: The running embedder's.
        keys: Compare only these (in this order); None compares every key either side has, sorted.

    Returns:
        ``{key: (stored value, given value)}``, :data:`MISSING` for a key one side lacks; empty when
        the fingerprints agree.

    Raises:
        TypeError, ValueError: A side that :func:`normalize` refuses.
    """
    a, b = normalize(stored), normalize(given)
    wanted = sorted(set(a) | set(b)) if keys is None else list(keys)
    found = {key: (a.get(key, MISSING), b.get(key, MISSING)) for key in wanted}
    return {key: pair for key, pair in found.items() if pair[0] != pair[1]}


def _short(value: Any, max_chars: int) -> str:
    if value is MISSING:
        return "<not recorded>"
    text = json.dumps(value, sort_keys=True, default=repr)
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def describe(
    diffs: dict[str, tuple[Any, Any]],
    *,
    sides: tuple[str, str] = ("stored", "given"),
    max_chars: int = _MAX_VALUE_CHARS,
) -> str:
    """``key: stored=VALUE given=VALUE; ...`` for an error message, each value as JSON cut to
    ``max_chars`` (a preprocessing dict can be long), ``<not recorded>`` for an absent key."""
    first, second = sides
    return "; ".join(
        f"{key}: {first}={_short(a, max_chars)} {second}={_short(b, max_chars)}"
        for key, (a, b) in diffs.items()
    )


def without_missing(diffs: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    """The differences with ``None`` for an absent key: the JSON-ready form errors carry."""
    return {key: (None if a is MISSING else a, None if b is MISSING else b) for key, (a, b) in diffs.items()}
