"""Flags shared by every ``deepfeat`` sub-command, and turning them into the one Settings object.

Flags override ``DEEPFEAT_*`` environment variables, which override defaults: a flag left out is
simply not passed to Settings, so the environment (or an existing store's manifest) still decides.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from deepfeat.settings import Settings

__all__ = ["add_common_arguments", "settings_from_args", "echo", "echo_json"]

# argparse dest -> Settings field
_FLAG_FIELDS = (
    "data_dir",
    "model",
    "weights",
    "layer",
    "pooling",
    "gem_p",
    "resize_mode",
    "max_side",
    "scales",
    "device",
    "precision",
    "compile",
    "index_factory",
    "batch_size",
    "workers",
    "max_pixels",
)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "model and store (default: DEEPFEAT_* environment, then the store's manifest)"
    )
    group.add_argument("--data-dir", type=Path, help="store directory (default ./data)")
    group.add_argument("--model", help="model name (see `deepfeat models`)")
    group.add_argument("--weights", help="DEFAULT, a weights enum name, a checkpoint path, or none")
    group.add_argument("--layer", help="layer name or its position k from the top (0 = logits)")
    group.add_argument("--pooling", choices=["avg", "max", "gem", "rmac"], help="pooling for conv layers")
    group.add_argument("--gem-p", type=float, help="GeM power (default 3)")
    group.add_argument(
        "--resize-mode", choices=["crop", "full"], help="centre crop, or the full image (aspect kept)"
    )
    group.add_argument("--max-side", type=int, help="longest side in full resize mode (default 512)")
    group.add_argument("--scales", type=_scales, help="multi-scale factors, e.g. 1,0.707 (default 1)")
    group.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    group.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="auto (default): bf16 on CUDA and on CPUs with native bf16, else fp32",
    )
    group.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the embedding trunk: a one-off compile, then a faster forward pass",
    )
    group.add_argument("--index-factory", help="FAISS factory string for a new store (default Flat)")
    group.add_argument("--max-pixels", type=int, help="reject larger images (default 40M)")


def _scales(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"scales must be comma-separated numbers, got {text!r}") from None


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> Settings:
    values = {name: getattr(args, name) for name in _FLAG_FIELDS if getattr(args, name, None) is not None}
    values.update(overrides)
    return Settings(**values)


def echo(text: str = "") -> None:
    """The CLI's output to the user (results and summaries), as opposed to log lines on stderr."""
    sys.stdout.write(text + "\n")


def echo_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
