"""What the registry needs to know about torchvision's weights, without importing torchvision.

``import torchvision`` costs about 4 s on a small CPU (it loads torch and torch._dynamo), which
listing models, checking which weights are on disk and printing ``--help`` must not pay. The facts
they need (each weights enum's names and file names, and the preprocessing that travels with the
default weights) are read from torchvision once per installed version and kept in a small JSON file
under the user's cache directory; anything that builds a network imports torchvision anyway.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = ["hub_dir", "metadata"]

log = logging.getLogger(__name__)

ARCHS = ("vgg16", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_FORMAT = 1


def _cache_home() -> str:
    return os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))


def hub_dir() -> Path:
    """Where torch hub keeps downloads: the rule of ``torch.hub.get_dir()`` ($TORCH_HOME/hub, else
    $XDG_CACHE_HOME/torch/hub, else ~/.cache/torch/hub); a test holds the two together."""
    torch_home = os.environ.get("TORCH_HOME")
    if torch_home is None:
        torch_home = os.path.join(_cache_home(), "torch")
    return Path(os.path.expanduser(torch_home)) / "hub"


def _cache_file(version: str) -> Path:
    return Path(_cache_home()) / "deepfeat" / f"torchvision-{version}-v{_FORMAT}.json"


def _read_from_torchvision() -> dict[str, Any]:
    import torchvision

    out: dict[str, Any] = {}
    for arch in ARCHS:
        enum = torchvision.models.get_model_weights(arch)
        tf = enum.DEFAULT.transforms()
        out[arch] = {
            "enum": enum.__name__,
            "default": enum.DEFAULT.name,
            "weights": {w.name: {"url": w.url, "file": os.path.basename(urlparse(w.url).path)} for w in enum},
            "preprocess": {
                "resize": int(tf.resize_size[0]),
                "crop": int(tf.crop_size[0]),
                "mean": list(tf.mean),
                "std": list(tf.std),
                "interpolation": tf.interpolation.value,
            },
        }
    return out


@functools.cache
def metadata() -> dict[str, Any]:
    """{arch: {enum, default, weights: {name: {url, file}}, preprocess}} for the installed torchvision."""
    version = importlib.metadata.version("torchvision")
    path = _cache_file(version)
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        if set(data) == set(ARCHS):
            return data
    except (OSError, ValueError):
        pass
    data = _read_from_torchvision()
    try:  # a cache only: a read-only home directory costs start-up time, nothing else
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as fh:
            json.dump(data, fh)
        os.replace(fh.name, path)
    except OSError as exc:
        log.debug("could not cache torchvision metadata in %s: %s", path, exc)
    return data
