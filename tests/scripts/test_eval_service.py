"""``deepfeat eval service`` (quality through the HTTP API) and ``deepfeat eval duplicates`` (the
duplicates threshold): real servers, real photos, error paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepfeat.scripts.evaluate import main
from deepfeat.scripts.evaluate.duplicates import COPIES, _copy, choose_threshold
from deepfeat.scripts.evaluate.service import BASELINE_ENV, Collections
from deepfeat.settings import Settings


def _collections(tmp_path: Path, photos: dict[str, Image.Image]) -> tuple[Path, Path]:
    """Six originals in two groups, and two classes of three mild variations each."""
    originals, classes = tmp_path / "originals", tmp_path / "classes"
    for i, (name, img) in enumerate(photos.items()):
        group = originals / ("a" if i % 2 else "b")
        group.mkdir(parents=True, exist_ok=True)
        img.save(group / f"{name}.jpg", quality=92)
    for name in ("coffee", "rocket"):
        (classes / name).mkdir(parents=True)
        for j, scale in enumerate((0.9, 0.8, 0.7)):
            small = photos[name].resize((int(photos[name].width * scale), int(photos[name].height * scale)))
            small.save(classes / name / f"{j}.jpg", quality=85)
    return originals, classes


def test_the_parts_are_the_evaluation_split(tmp_path: Path, photos: dict[str, Image.Image]) -> None:
    originals, classes = _collections(tmp_path, photos)
    tune = Collections([originals], [classes], part="tune")
    validation = Collections([originals], [classes])
    seen_tune = {p for _, p in tune.originals()} | {p for *_, p in tune.categories()}
    seen_validation = {p for _, p in validation.originals()} | {p for *_, p in validation.categories()}
    assert not seen_tune & seen_validation and len(seen_tune | seen_validation) == 12
    assert {c for _, c, _ in validation.categories()} == {"coffee", "rocket"}


def test_the_baseline_settings_are_valid_settings() -> None:
    settings = Settings(**{k.removeprefix("DEEPFEAT_").lower(): v for k, v in BASELINE_ENV.items()})
    assert (settings.layer, settings.resize_mode, settings.scales, settings.regions) == (
        "penultimate",
        "crop",
        (1.0,),
        0,
    )


def test_bad_arguments_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["service"]) == 2
    assert "error [invalid_eval]: give --copy and/or --category" in capsys.readouterr().err
    assert main(["service", "--copy", str(tmp_path), "--transforms", "sepia"]) == 2
    assert "unknown transform 'sepia'" in capsys.readouterr().err


@pytest.mark.slow
def test_service_run_measures_the_shipped_defaults_through_http(
    tmp_path: Path, photos: dict[str, Image.Image], capsys: pytest.CaptureFixture[str]
) -> None:
    originals, classes = _collections(tmp_path, photos)
    out = tmp_path / "service.json"
    argv = ["service", "--copy", str(originals), "--category", str(classes), "--part", "validation"]
    assert (
        main([*argv, "--no-baseline", "--transforms", "crop_quarter,jpeg_q10_quarter", "--json", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "default" in printed and "crop_quarter" in printed
    report = json.loads(out.read_text())
    result = report["results"]["default"]
    assert result["model"]["config"]["regions"] == 3 and result["model"]["precision"] != "auto"
    assert result["copy"]["queries"] == 2 * result["originals"]
    assert 0.0 <= result["copy"]["recall@1"] <= 1.0
    assert (
        result["category"]["visual"]["P@10"] is not None
        and result["category"]["semantic"]["P@10"] is not None
    )
    assert report["machine"].startswith("machine: ")


def test_copies_are_what_the_threshold_must_group(photos: dict[str, Image.Image]) -> None:
    photo = photos["astronaut"]
    resaved, small = (_copy(photo, name) for name in COPIES)
    assert resaved.size == photo.size
    assert small.size == (180, 180)  # half of the 360 x 360 that fits 480 x 360


def test_threshold_sits_in_the_gap_or_minimises_errors() -> None:
    assert choose_threshold(np.array([0.97, 0.99]), np.array([0.6, 0.81])) == pytest.approx(0.89)
    overlapping = choose_threshold(np.array([0.7, 0.95, 0.96]), np.array([0.5, 0.6, 0.75]))
    assert overlapping == pytest.approx(0.95)  # one error either way; the higher line groups less
