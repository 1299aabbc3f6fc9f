"""Shared fixtures: real photos shipped inside PyPI wheels, and one loaded pretrained embedder.

The photos come from scikit-image's ``skimage.data`` (chelsea = a cat, coffee = an espresso, rocket)
and matplotlib's sample ``grace_hopper.jpg``: real content, so semantic assertions mean something.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

PHOTO_NAMES = ("chelsea", "coffee", "rocket", "hopper", "astronaut", "motorcycle")


def _photo(name: str) -> Image.Image:
    if name == "hopper":
        import matplotlib

        path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
        with Image.open(path) as img:
            return img.convert("RGB")
    import skimage.data

    if name == "motorcycle":
        left, _right, _disp = skimage.data.stereo_motorcycle()
        return Image.fromarray(left)
    return Image.fromarray(getattr(skimage.data, name)())


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """name -> RGB PIL image."""
    return {name: _photo(name) for name in PHOTO_NAMES}


def jpeg_bytes(image: Image.Image, *, quality: int = 90, scale: float = 1.0) -> bytes:
    if scale != 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory, photos: dict[str, Image.Image]) -> Path:
    """A folder of the real photos as JPEG files (one in a sub-folder, to exercise the recursive walk)."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    for i, (name, img) in enumerate(photos.items()):
        target = root / "sub" if i % 2 else root
        (target / f"{name}.jpg").write_bytes(jpeg_bytes(img))
    return root


FAST_EMBEDDER = {"layer": "penultimate", "resize_mode": "crop", "scales": (1.0,)}
"""The classic, cheapest configuration (one 224 px crop). Most tests use it to stay fast on 2 cores;
the retrieval defaults (last conv block, GeM, full image, 3 scales) have their own tests."""
FAST_FLAGS = ["--layer", "penultimate", "--resize-mode", "crop", "--scales", "1", "--precision", "fp32"]
"""FAST_EMBEDDER as CLI flags (the default model), in fp32 like the ``lite0`` fixture."""


@pytest.fixture(scope="session")
def lite0():
    """The default model with its real bundled ImageNet weights, loaded once per test session, in fp32
    (tests compare its vectors with other paths at cosine 0.999; ``auto`` would be bf16 on a CPU with
    native bf16)."""
    from deepfeat.models.embedder import Embedder

    return Embedder("efficientnet_lite0", device="cpu", precision="fp32", **FAST_EMBEDDER)


@pytest.fixture(scope="session")
def make_rng() -> Callable[[int], np.random.Generator]:
    return np.random.default_rng


_RUN_CACHE = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """Converted models (the OpenVINO backend) go to a cache of this run, never the user's, in this
    process and the CLI processes tests start."""
    import tempfile

    cache = tempfile.mkdtemp(prefix="deepfeat-test-cache-")
    os.environ["DEEPFEAT_CACHE_DIR"] = cache
    config.stash[_RUN_CACHE] = cache


def pytest_unconfigure(config: pytest.Config) -> None:
    """The run's converted models go with it: a whole suite converts several GB of them, and a
    machine that runs the suite repeatedly would otherwise fill its disk."""
    import shutil

    cache = config.stash.get(_RUN_CACHE, None)
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
        if os.environ.get("DEEPFEAT_CACHE_DIR") == cache:
            del os.environ["DEEPFEAT_CACHE_DIR"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests skip cleanly where CUDA is absent (CI never has a GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Under CI a skip is a failure, except for the GPU tests and declared ``skipif`` conditions.

    A test that skips because a package, a cached data set, Chromium or a tmpfs is missing passes
    silently wherever that part is lost; CI sets it all up, so there such a skip means the suite
    stopped testing something."""
    outcome = yield
    report = outcome.get_result()
    if not (os.environ.get("CI") and report.skipped) or hasattr(report, "wasxfail"):
        return
    if "gpu" in item.keywords or any(True for _ in item.iter_markers("skipif")):
        return
    _fail_the_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):  # type: ignore[no-untyped-def]
    """The same for a whole module skipped at import (``pytest.importorskip`` at module level)."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped:
        _fail_the_skip(report)


def _fail_the_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under CI, where every part this test needs is installed: {reason}"
