"""Fixtures shared by the ``models.images`` test modules: real photos as PIL images, a real JPEG's bytes."""

from __future__ import annotations

import pytest
from PIL import Image
from skimage import data as skdata

from tests.models.image_helpers import GRACE_HOPPER


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    return Image.fromarray(skdata.chelsea())  # 451x300 RGB cat


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    return Image.fromarray(skdata.coffee())  # 600x400 RGB


@pytest.fixture(scope="module")
def rocket() -> Image.Image:
    return Image.fromarray(skdata.rocket())  # 640x427 RGB


@pytest.fixture(scope="module")
def grace_bytes() -> bytes:
    return GRACE_HOPPER.read_bytes()
