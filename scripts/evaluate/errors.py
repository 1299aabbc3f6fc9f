"""The evaluation's one error type, apart so every part of the package can raise it without a cycle."""

from __future__ import annotations

__all__ = ["EvalError"]


class EvalError(Exception):
    """Bad evaluation input (a folder without classes, too few images, an impossible option)."""

    code = "invalid_eval"
