"""The default `deepfeat duplicates` threshold on real photos at the retrieval defaults: a JPEG re-save
at quality 80 and a half-size copy of a 480 x 360 version group with their photo; distinct photos don't."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from deepfeat.scripts.cli import main
from tests.conftest import jpeg_bytes


def test_default_threshold_groups_copies_and_nothing_else(
    tmp_path: Path, photos: dict[str, Image.Image], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, img in photos.items():
        (folder / f"{name}.jpg").write_bytes(jpeg_bytes(img, quality=95))
    (folder / "coffee-resaved.jpg").write_bytes(jpeg_bytes(photos["coffee"], quality=80))
    small = photos["chelsea"].copy()
    small.thumbnail((480, 360))
    half = small.resize((small.width // 2, small.height // 2), Image.Resampling.LANCZOS)
    (folder / "chelsea-small.jpg").write_bytes(jpeg_bytes(half, quality=85))

    data = str(tmp_path / "data")
    assert main(["index", str(folder), "--data-dir", data, "--workers", "0", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["duplicates", "--data-dir", data, "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)
    names = sorted(sorted(Path(r["source"]).name for r in group) for group in groups)
    assert names == [["chelsea-small.jpg", "chelsea.jpg"], ["coffee-resaved.jpg", "coffee.jpg"]]
