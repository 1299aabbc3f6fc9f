"""``deepfeat eval``: metrics against hand-computed values, seeded transforms, and small real runs.

The end-to-end runs use the real photos that ship in scikit-image / matplotlib wheels (conftest
``photos``) and the bundled EfficientNet-Lite0 weights, on a tiny grid so the file stays fast.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from deepfeat.scripts import evaluate as ev

# ---------------------------------------------------------------------------------------------------
# metrics


def test_average_precision_hand_computed() -> None:
    # relevant at ranks 1 and 3 of 5: (1/1 + 2/3) / 2
    assert ev.average_precision(np.array([1, 0, 1, 0, 0], bool)) == pytest.approx((1 + 2 / 3) / 2)
    # a third relevant item never retrieved counts as precision 0
    assert ev.average_precision(np.array([1, 0, 1, 0, 0], bool), n_relevant=3) == pytest.approx(
        (1 + 2 / 3) / 3
    )
    assert ev.average_precision(np.array([0, 0, 0, 1], bool)) == pytest.approx(1 / 4)
    assert ev.average_precision(np.array([0, 0], bool)) == 0.0


def test_ranking_metrics_hand_computed() -> None:
    # query 0: scores rank items 1, 2, 3 (item 0 is itself, -inf); relevant: 2 and 3
    # query 1: ranks items 3, 0, 2 (itself -inf);              relevant: 0
    scores = np.array(
        [
            [-np.inf, 0.9, 0.5, 0.1],
            [0.6, -np.inf, 0.2, 0.8],
        ]
    )
    relevant = np.array(
        [
            [False, False, True, True],
            [True, False, False, False],
        ]
    )
    m = ev.ranking_metrics(scores, relevant, ks=(1, 2, 3))
    ap0 = (1 / 2 + 2 / 3) / 2  # hits at ranks 2 and 3
    ap1 = 1 / 2  # hit at rank 2
    assert m["AP"] == pytest.approx([ap0, ap1])
    assert m["mAP"] == pytest.approx((ap0 + ap1) / 2)
    assert m["P@1"] == pytest.approx(0.0)
    assert m["P@2"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert m["P@3"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert m["R@1"] == pytest.approx(0.0)
    assert m["R@2"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["R@3"] == pytest.approx(1.0)
    assert m["first_rank"] == [2, 2]


def test_ranking_metrics_never_counts_the_excluded_item() -> None:
    # the only "relevant" item is the query itself (-inf): AP 0, not a hit at the bottom of the list
    m = ev.ranking_metrics(np.array([[-np.inf, 0.3]]), np.array([[True, False]]), ks=(1, 2))
    assert m["AP"] == [0.0] and m["R@2"] == 0.0


# ---------------------------------------------------------------------------------------------------
# transforms


def _textured(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)


def test_transforms_are_seeded_and_independent_of_the_other_originals() -> None:
    a, b, c = _textured(1), _textured(2), _textured(3)
    first = ev.make_queries([a, b], ev.TRANSFORMS, seed=7)
    again = ev.make_queries([a, b], ev.TRANSFORMS, seed=7)
    assert [(i, t) for i, t, _ in first] == [(i, t) for i, t, _ in again]
    for (_, _, x), (_, _, y) in zip(first, again, strict=True):
        assert x.size == y.size and x.tobytes() == y.tobytes()
    # original 0's queries do not change when original 1 is another image
    other = ev.make_queries([a, c], ev.TRANSFORMS, seed=7)
    n = len(ev.TRANSFORMS)
    assert all(x.tobytes() == y.tobytes() for (_, _, x), (_, _, y) in zip(first[:n], other[:n], strict=True))
    # another seed changes the random ones
    reseeded = ev.make_queries([a], ["crop", "rotate", "color"], seed=8)
    assert any(x.tobytes() != y.tobytes() for (_, _, x), (_, _, y) in zip(first[:3], reseeded, strict=True))


def test_transform_geometry() -> None:
    img = _textured(4, (400, 300))
    rng = np.random.default_rng(0)
    crop = ev.apply_transform(img, "crop", rng)
    assert 0.40 <= crop.width * crop.height / (400 * 300) <= 0.56
    jpeg = ev.apply_transform(img, "jpeg", rng)
    assert jpeg.size == (100, 75) and jpeg.mode == "RGB"
    flip = ev.apply_transform(img, "flip", rng)
    assert flip.tobytes() == ImageOps.mirror(img).tobytes()
    for name in ("rotate", "color", "blur"):
        out = ev.apply_transform(img, name, rng)
        assert out.size == img.size and out.mode == "RGB"
        assert out.tobytes() != img.tobytes()
    assert ev.apply_transform(img, "combined", rng).mode == "RGB"
    with pytest.raises(ev.EvalError, match="unknown transform"):
        ev.apply_transform(img, "sepia", rng)


def test_heavy_crop_is_off_centre() -> None:
    img = _textured(5, (400, 400))
    for seed in range(10):
        rng = np.random.default_rng(seed)
        crop = ev.apply_transform(img, "crop", rng)
        cw, ch = crop.size
        centre = img.crop(((400 - cw) // 2, (400 - ch) // 2, (400 - cw) // 2 + cw, (400 - ch) // 2 + ch))
        assert crop.tobytes() != centre.tobytes()


# ---------------------------------------------------------------------------------------------------
# grid


def test_grid_has_the_baseline_first_and_skips_pooling_on_vector_layers() -> None:
    grid = ev.build_grid(
        models=["efficientnet_lite0"],
        layers=["penultimate", "head"],
        poolings=["avg", "gem"],
        whitening=["none", "auto"],
        scale_sets=[(1.0,), (1.0, 1 / math.sqrt(2))],
        resize_modes=["crop", "full"],
    )
    assert grid[0].baseline and grid[0].layer == "penultimate" and grid[0].pooling == "none"
    assert grid[0].resize_mode == "crop" and grid[0].scales == (1.0,) and grid[0].whitening == "none"
    assert sum(c.baseline for c in grid) == 1
    assert len({c.name for c in grid}) == len(grid)
    vector_rows = [c for c in grid if c.layer == "penultimate"]
    assert {c.pooling for c in vector_rows} == {"none"}
    # penultimate: 2 resize x 2 scales x 2 whitening = 8 (the baseline is one of them); head: 2 poolings x 8
    assert len(vector_rows) == 8 and len([c for c in grid if c.layer == "head"]) == 16
    default = ev.build_grid(
        models=["efficientnet_lite0"],
        layers=None,
        poolings=["gem"],
        whitening=["none"],
        scale_sets=[(1.0,)],
        resize_modes=["crop"],
    )
    assert [c.layer for c in default] == ["penultimate", "head", "blocks.6", "blocks.5"]


# ---------------------------------------------------------------------------------------------------
# end to end on real photos


@pytest.fixture
def bank(lite0: object) -> ev.FeatureBank:
    """A fresh vector cache around the session's loaded Lite0 (loading it again per test is slow)."""
    return ev.FeatureBank(embedders={"efficientnet_lite0": lite0})


@pytest.mark.parametrize(
    "cfg",
    [
        # the baseline: a vector layer, centre crop, one scale
        ev.Config("efficientnet_lite0", "penultimate", "none", "none", baseline=True),
        # a conv layer pooled by R-MAC, whole images of three shapes, two scales
        ev.Config("efficientnet_lite0", "blocks.5", "rmac", "none", (1.0, 1 / math.sqrt(2)), "full", 256),
    ],
    ids=["penultimate-crop", "blocks5-rmac-full-2scales"],
)
def test_bank_vectors_are_the_embedders(
    cfg: ev.Config, photos: dict[str, Image.Image], bank: ev.FeatureBank
) -> None:
    """The shared pass (several layers and poolings read from one forward pass, scales summed by the
    bank) gives what an Embedder built with the configuration's options returns from ``embed``."""
    from deepfeat.models.embedder import Embedder

    landscape_portrait_square = ("chelsea", "rocket", "astronaut")
    images = [_small(photos[name], 300) for name in landscape_portrait_square]
    # other rows of the same passes: the bank must pool each of them apart from cfg's
    siblings = [
        ev.Config(cfg.model, layer, pooling, "none", cfg.scales, cfg.resize_mode, cfg.max_side)
        for layer, pooling in (("head", "gem"), ("blocks.5", "max"), ("logits", "none"))
    ]
    bank.register([*siblings, cfg])
    got = bank.vectors("database", images, cfg)
    reference = Embedder(
        cfg.model,
        device="cpu",
        precision="fp32",
        layer=cfg.layer,
        pooling=None if cfg.pooling == "none" else cfg.pooling,
        gem_p=cfg.gem_p,
        resize_mode=cfg.resize_mode,
        max_side=cfg.max_side,
        scales=cfg.scales,
    ).embed(images)
    assert got.shape == reference.shape and got.dtype == np.float32
    assert float((got * reference).sum(axis=1).min()) >= 0.999


def test_bank_never_serves_another_image_list_under_the_same_name(
    photos: dict[str, Image.Image], bank: ev.FeatureBank
) -> None:
    cfg = ev.Config("efficientnet_lite0", "penultimate", "none", "none")
    first = [photos["chelsea"], photos["coffee"]]
    second = [photos["rocket"], photos["hopper"], photos["astronaut"]]
    a = bank.vectors("database", first, cfg)
    b = bank.vectors("database", second, cfg)
    assert a.shape == (2, 1280) and b.shape == (3, 1280)
    np.testing.assert_allclose(bank.vectors("database", first, cfg), a, atol=1e-5)
    # a row registered after its pass ran is computed, not a KeyError
    late = ev.Config("efficientnet_lite0", "head", "gem", "none")
    assert bank.vectors("database", first, late).shape == (2, 1280)


def _augment(img: Image.Image, seed: int) -> Image.Image:
    """A mild, seeded variation: crop 80-95%, maybe mirrored, colour jitter."""
    rng = np.random.default_rng(seed)
    keep = rng.uniform(0.8, 0.95)
    w, h = img.size
    cw, ch = int(w * keep), int(h * keep)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    return ImageEnhance.Color(out).enhance(float(rng.uniform(0.7, 1.3)))


SMALL_GRID = [
    "--layers",
    "head",
    "--poolings",
    "gem,rmac",
    "--whitening",
    "none",
    "--scales",
    "1",
    "--resize-modes",
    "crop",
]


def _small(photo: Image.Image, side: int) -> Image.Image:
    """A copy at most ``side`` px on its longer side."""
    small = photo.copy()
    small.thumbnail((side, side))
    return small


def _originals(folder: Path, photos: dict[str, Image.Image], side: int) -> Path:
    """Each photo, at most ``side`` px, as ``folder/<name>.png``."""
    folder.mkdir()
    for name, img in photos.items():
        _small(img, side).save(folder / f"{name}.png")
    return folder


def test_category_run_on_real_photos(
    tmp_path: Path, photos: dict[str, Image.Image], bank: ev.FeatureBank, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "classes"
    for name in ("chelsea", "coffee", "rocket", "astronaut"):
        (root / name).mkdir(parents=True)
        small = _small(photos[name], 320)
        for j in range(3):
            _augment(small, seed=j).save(root / name / f"{j}.jpg", quality=90)
    out_json, out_png = tmp_path / "cat.json", tmp_path / "cat.png"
    rc = ev.main(
        ["category", str(root), *SMALL_GRID, "-k", "1,2", "--json", str(out_json), "--plot", str(out_png)],
        bank=bank,
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "<- baseline" in printed and "mAP" in printed and "chance mAP" in printed

    report = json.loads(out_json.read_text())
    assert report["mode"] == "category" and report["images"] == 12
    assert report["classes"] == {"astronaut": 3, "chelsea": 3, "coffee": 3, "rocket": 3}
    assert report["chance_mAP"] == pytest.approx(2 / 11)
    names = [r["config"] for r in report["results"]]
    assert len(names) == 3 and report["baseline"] in names and report["best"] in names
    for r in report["results"]:
        assert set(r["metrics"]) >= {"mAP", "medAP", "P@1", "P@2", "R@1", "R@2"}
        assert set(r["per_class_mAP"]) == set(report["classes"])
        # same-photo crops of four distinct scenes: far above chance for every configuration
        assert r["metrics"]["mAP"] > report["chance_mAP"] + 0.4
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_copy_run_finds_the_original_of_mild_copies(
    tmp_path: Path, photos: dict[str, Image.Image], bank: ev.FeatureBank, capsys: pytest.CaptureFixture[str]
) -> None:
    originals = _originals(tmp_path / "originals", photos, 400)
    out_json = tmp_path / "copy.json"
    rc = ev.main(
        [
            "copy",
            str(originals),
            *SMALL_GRID,
            "--transforms",
            "flip,color,blur,jpeg",
            "--json",
            str(out_json),
        ],
        bank=bank,
    )
    assert rc == 0
    report = json.loads(out_json.read_text())
    assert report["originals"] == len(photos) and report["queries"] == 4 * len(photos)
    assert report["transforms"] == ["flip", "color", "blur", "jpeg"]
    for r in report["results"]:
        assert set(r["per_transform"]) == {"flip", "color", "blur", "jpeg"}
        for t in ("flip", "color", "blur"):
            assert r["per_transform"][t]["recall@1"] >= 0.8, (r["config"], t, r["per_transform"][t])
        assert 0 < r["metrics"]["mAP"] <= 1 and r["metrics"]["hard_recall@1"] >= 0
    assert "hard = crop + jpeg" in capsys.readouterr().out


def test_whitening_rows_run_and_report_their_dimension(
    tmp_path: Path, photos: dict[str, Image.Image], bank: ev.FeatureBank
) -> None:
    originals = _originals(tmp_path / "o", photos, 256)
    configs = [
        ev.Config("efficientnet_lite0", "head", "gem", "none"),
        ev.Config("efficientnet_lite0", "head", "gem", "auto"),
        ev.Config("efficientnet_lite0", "head", "gem", "3"),
    ]
    report = ev.evaluate_copy(originals, configs, transforms=["flip"], bank=bank)
    dims = [r["whitening_dim"] for r in report["results"]]
    assert dims[0] is None and dims[2] == 3 and 1 <= dims[1] <= len(photos) - 1
    assert [r["dim"] for r in report["results"]] == [1280, dims[1], 3]


def test_bad_input_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "only").mkdir()
    _textured(0).save(tmp_path / "only" / "a.png")
    assert ev.main(["category", str(tmp_path), *SMALL_GRID]) == 2
    assert "error [invalid_eval]: category mode needs at least 2 class sub-folders" in capsys.readouterr().err
    assert ev.main(["copy", str(tmp_path), *SMALL_GRID, "--transforms", "sepia"]) == 2
    assert "unknown transform 'sepia'" in capsys.readouterr().err
    assert ev.main(["copy", str(tmp_path), "--layers", "nope", "--resize-modes", "crop"]) == 2
    assert "error [unknown_layer]" in capsys.readouterr().err
