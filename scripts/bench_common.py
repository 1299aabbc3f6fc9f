"""What the benchmark scripts share: how they start and write, the real photos they measure on, and
the ``deepfeat`` command they run as a child.

Each benchmark's own figures stay in its module; this holds only what every one of them would
otherwise write again.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deepfeat.scripts.bench_machine import describe

__all__ = [
    "COLOUR_PHOTOS",
    "begin",
    "command_line",
    "deepfeat_command",
    "echo",
    "real_photos",
    "table",
    "usage_error",
]

COLOUR_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)
"""scikit-image's colour photographs, for :func:`real_photos`."""


def echo(text: str = "") -> None:
    """A line of the benchmark's report on stdout, flushed (a long run shows its rows as they come)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def begin(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, *, log_to_stderr: bool = False
) -> argparse.Namespace:
    """Parse the arguments and print the machine first (a figure holds only for its CPU class).

    With ``log_to_stderr``, progress logs go to stderr at INFO unless logging is already set up.
    """
    args = parser.parse_args(argv)
    echo(describe())
    if log_to_stderr and not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
        )
    return args


def usage_error(parser: argparse.ArgumentParser, exc: Exception) -> int:
    """Report a bad argument the way argparse does; returns the exit status 2."""
    parser.print_usage(sys.stderr)
    sys.stderr.write(f"{parser.prog}: error: {exc}\n")
    return 2


def command_line(prog: str, argv: Sequence[str] | None) -> str:
    """The command as run, for the JSON report."""
    return prog + " " + " ".join(argv if argv is not None else sys.argv[1:])


def deepfeat_command(*args: str) -> list[str]:
    """``deepfeat ARGS`` as a fresh process of this interpreter."""
    return [sys.executable, "-m", "deepfeat.scripts.cli", *args]


def table(rows: list[dict[str, Any]]) -> str:
    """Rows of dicts as left-aligned columns under their keys (the first row's keys)."""
    if not rows:
        return ""
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(widths[k]) for k in keys)]
    lines += ["  ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def real_photos(names: Sequence[str]) -> list[tuple[str, Any]]:
    """Real photos shipped inside wheels, as RGB PIL images: scikit-image's ``names``, then its stereo
    motorcycle and matplotlib's sample photo of Grace Hopper."""
    import matplotlib
    import skimage.data
    from PIL import Image

    photos = [(name, Image.fromarray(getattr(skimage.data, name)()).convert("RGB")) for name in names]
    photos.append(("motorcycle", Image.fromarray(skimage.data.stereo_motorcycle()[0]).convert("RGB")))
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if path.exists():
        with Image.open(path) as img:
            photos.append(("grace_hopper", img.convert("RGB")))
    return photos
