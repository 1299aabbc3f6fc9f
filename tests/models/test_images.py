"""The ``models.images`` tests live in ``test_images_*.py`` next to this file, their helpers in
``image_helpers`` and their fixtures in ``conftest``. This module only keeps the two names that
``tests/scripts/test_index_images.py`` imports from here; new code imports them from ``image_helpers``."""

from __future__ import annotations

from tests.models.image_helpers import NOT_A_SCAN, without_jpeg_segment

__all__ = ["NOT_A_SCAN", "without_jpeg_segment"]
