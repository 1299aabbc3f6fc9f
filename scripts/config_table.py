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

from deepfeat.scripts.cli_common import COMMON_FIELDS, default_text
from deepfeat.settings import Settings

__all__ = ["render", "default_text", "main"]

START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"
_OTHER_FLAGS = {"batch_size", "workers", "host", "port", "read_only"}
"""Settings that are also flags of particular commands (index, serve)."""


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
