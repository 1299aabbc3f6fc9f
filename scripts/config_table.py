"""The README's configuration table, generated from the settings classes, so a documented default is
the default that runs (a test compares the README with :func:`render`).

    python -m deepfeat.scripts.config_table --write README.md
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from deepfeat.scripts.cli_common import COMMON_FIELDS
from deepfeat.settings import Settings

__all__ = ["render", "default_text", "main"]

START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"
_OTHER_FLAGS = {"batch_size", "workers", "host", "port", "read_only"}
"""Settings that are also flags of particular commands (index, serve)."""


def default_text(info: FieldInfo) -> str:
    """A default as the table prints it (lists as the a,b,c syntax the settings accept)."""
    value: Any = info.get_default(call_default_factory=True)
    if value is None:
        return "—"
    if isinstance(value, tuple | list):
        return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in value) or "(empty)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and value >= 100_000:
        return f"{value:_}".replace("_", " ")
    return str(value)


def render() -> str:
    rows = ["| Variable | Flag | Default | Meaning |", "|---|---|---|---|"]
    for name, info in Settings.model_fields.items():
        flag = f"`--{name.replace('_', '-')}`" if name in COMMON_FIELDS or name in _OTHER_FLAGS else "—"
        meaning = (info.description or "").replace("|", "\\|")
        rows.append(f"| `DEEPFEAT_{name.upper()}` | {flag} | `{default_text(info)}` | {meaning} |")
    return "\n".join(rows)


def replace_in(text: str) -> str:
    """``text`` with the block between the markers replaced by the current table."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {START} ... {END} block found")
    return pattern.sub(lambda _: f"{START}\n{render()}\n{END}", text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="replace the table in this Markdown file")
    args = parser.parse_args(argv)
    if args.write is None:
        sys.stdout.write(render() + "\n")
        return 0
    args.write.write_text(replace_in(args.write.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
