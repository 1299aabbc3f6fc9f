"""Flags shared by every ``deepfeat`` sub-command, generated from the settings, and turning them into
the one Settings object.

Flags override ``DEEPFEAT_*`` environment variables, which override defaults: a flag left out is
simply not passed to Settings, so the environment (or an existing store's manifest) still decides.
Every flag here is a Settings field (``--gem-p`` is ``gem_p``), so adding an option to
:class:`~deepfeat.models.config.EmbedderFields` or Settings adds its flag, help and choices.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from typing import Any

from pydantic.fields import FieldInfo

from deepfeat.models.config import EmbedderConfig
from deepfeat.settings import Settings

__all__ = [
    "COMMON_FIELDS",
    "add_common_arguments",
    "default_text",
    "add_setting_arguments",
    "settings_from_args",
    "echo",
    "echo_json",
]

COMMON_FIELDS = (
    "data_dir",
    *EmbedderConfig.model_fields,
    "device",
    "precision",
    "compile",
    "backend",
    "index_factory",
    "max_pixels",
)
"""The settings every store-using command takes as flags."""


def _choices(annotation: Any) -> list[str] | None:
    """The values of a Literal annotation (also inside ``X | None``), else None."""
    if typing.get_origin(annotation) is typing.Literal:
        return [str(v) for v in typing.get_args(annotation)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _choices(arg)
            if found:
                return found
    return None


def default_text(info: FieldInfo) -> str:
    """A setting's default as the help and the README's table print it (lists in the a,b,c syntax the
    settings accept; "—" for none)."""
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


def add_setting_arguments(parser: argparse.ArgumentParser | Any, names: typing.Iterable[str]) -> None:
    """One ``--flag-name`` per Settings field: help from its description, choices from its Literal
    type, booleans as switches. Values are validated by Settings, so a bad flag reads like a bad
    environment variable (``error [invalid_setting]``)."""
    for name in names:
        info = Settings.model_fields[name]
        flag = "--" + name.replace("_", "-")
        default = default_text(info)
        text = (info.description or name.replace("_", " ")) + (
            "" if default == "—" else f" (default {default})"
        )
        if info.annotation is bool:
            parser.add_argument(flag, dest=name, action="store_true", default=None, help=text)
            continue
        choices = _choices(info.annotation)
        if name == "pooling" and choices:
            choices = [c for c in choices if c != "none"]
        parser.add_argument(flag, dest=name, choices=choices, help=text)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "model and store (default: DEEPFEAT_* environment, then the store's manifest, then the default)"
    )
    add_setting_arguments(group, COMMON_FIELDS)


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Settings from the environment, with every flag that names a setting and was given on top."""
    values = {
        name: value for name in Settings.model_fields if (value := getattr(args, name, None)) is not None
    }
    values.update(overrides)
    return Settings(**values)


def echo(text: str = "") -> None:
    """The CLI's output to the user (results and summaries), as opposed to log lines on stderr."""
    sys.stdout.write(text + "\n")


def echo_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def existing_manifest(settings: Settings) -> Any:
    """The manifest of the store at ``settings.data_dir``; None, after the one-line error, when there is
    no store there (every command that works on an existing store says it the same way)."""
    from deepfeat.runtime import read_manifest

    manifest = read_manifest(settings)
    if manifest is None:
        echo(
            f"error [no_store]: no store in {settings.data_dir}; run `deepfeat index PATH --data-dir DIR` first"
        )
    return manifest
