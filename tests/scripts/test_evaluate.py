"""``deepfeat eval``: metrics against hand-computed values, seeded transforms, and small real runs.

The end-to-end runs use the real photos that ship in scikit-image / matplotlib wheels (conftest
``photos``) and the bundled EfficientNet-Lite0 weights, on a tiny grid so the file stays fast.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

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


def test_the_transforms_are_the_six_named_ones() -> None:
    assert ev.TRANSFORMS == (
        "crop_quarter",
        "jpeg_q10_quarter",
        "rotate15",
        "contrast_desat",
        "blur_flip",
        "combined",
    )
    assert ev.HARD_TRANSFORMS == ("crop_quarter", "jpeg_q10_quarter")


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
    # nor with its place in the list, once it carries its own id (the evaluation passes a content hash)
    swapped = ev.make_queries([b, a], ev.TRANSFORMS, seed=7, ids=[1, 0])
    assert all(
        x.tobytes() == y.tobytes() for (_, _, x), (_, _, y) in zip(first[:n], swapped[n:], strict=True)
    )
    # nor with the other transforms of the run
    alone = ev.make_queries([a], ["combined"], seed=7)
    assert alone[0][2].tobytes() == first[n - 1][2].tobytes()
    # another seed changes the random ones
    random_ones = ["crop_quarter", "rotate15", "contrast_desat", "combined"]
    reseeded = ev.make_queries([a], random_ones, seed=8)
    firsts = [q for q in first[:n] if q[1] in random_ones]
    assert any(x.tobytes() != y.tobytes() for (_, _, x), (_, _, y) in zip(firsts, reseeded, strict=True))


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _coordinates(w: int, h: int) -> Image.Image:
    """Each pixel says where it is: R, G = x, y mod 256; B = their 256s."""
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x % 256, y % 256, (x // 256) * 16 + y // 256], axis=2).astype(np.uint8))


@pytest.mark.parametrize("size", [(400, 300), (300, 400), (640, 200)])
def test_crop_quarter_keeps_a_quarter_away_from_the_centre(size: tuple[int, int]) -> None:
    w, h = size
    img = _coordinates(w, h)
    for seed in range(12):
        crop = ev.apply_transform(img, "crop_quarter", np.random.default_rng(seed))
        cw, ch = crop.size
        assert 0.23 <= cw * ch / (w * h) <= 0.27, (size, crop.size)
        assert 0.4 * w <= cw <= 0.6 * w and 0.4 * h <= ch <= 0.6 * h  # the image's shape, about
        r, g, b = np.asarray(crop)[0, 0].astype(int)
        x, y = r + 256 * (b // 16), g + 256 * (b % 16)
        assert crop.tobytes() == img.crop((x, y, x + cw, y + ch)).tobytes()
        # off-centre: the offset along each axis lies in the outer quarters of its range
        for offset, span in ((x, w - cw), (y, h - ch)):
            assert offset <= 0.25 * span + 1 or offset >= 0.75 * span - 1, (offset, span)


def test_jpeg_q10_quarter_is_a_quarter_per_side_and_lossy() -> None:
    img = _textured(4, (400, 300))
    out = ev.apply_transform(img, "jpeg_q10_quarter", _rng())
    assert out.size == (100, 75) and out.mode == "RGB"
    clean = np.asarray(img.resize((100, 75), Image.Resampling.LANCZOS), dtype=float)
    error = np.abs(np.asarray(out, dtype=float) - clean).mean()
    assert error > 3  # quality 10: visibly blocky, not a clean downscale
    assert ev.apply_transform(img, "jpeg_q10_quarter", _rng()).tobytes() == out.tobytes()


def test_rotate15_turns_by_15_degrees_either_way() -> None:
    img = _textured(6, (320, 240))
    seen = set()
    for seed in range(8):
        out = ev.apply_transform(img, "rotate15", np.random.default_rng(seed))
        assert out.size == img.size and out.mode == "RGB"
        candidates = {
            angle: img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)).tobytes()
            for angle in (15, -15)
        }
        matched = [a for a, data in candidates.items() if data == out.tobytes()]
        assert len(matched) == 1
        seen.add(matched[0])
    assert seen == {15, -15}


def test_contrast_desat_raises_contrast_and_drops_saturation() -> None:
    img = _textured(7, (320, 240))
    out = ev.apply_transform(img, "contrast_desat", _rng())
    assert out.size == img.size and out.mode == "RGB"

    def chroma(im: Image.Image) -> float:  # mean of max - min over the channels
        a = np.asarray(im, dtype=float)
        return float((a.max(axis=2) - a.min(axis=2)).mean())

    # saturation x0.1-0.3, then contrast x1.8-2.2 stretches what is left: at most about 0.66 of it
    assert chroma(out) < 0.7 * chroma(img)
    grey_in, grey_out = (np.asarray(im.convert("L"), dtype=float) for im in (img, out))
    assert grey_out.std() > 1.3 * grey_in.std()


def test_blur_flip_is_a_mirrored_blur() -> None:
    img = _textured(8, (320, 240))
    out = ev.apply_transform(img, "blur_flip", _rng())
    expected = ImageOps.mirror(img.filter(ImageFilter.GaussianBlur(radius=0.015 * 240)))
    assert out.tobytes() == expected.tobytes()


def test_combined_crops_recolours_and_compresses() -> None:
    img = _textured(9, (400, 300))
    out = ev.apply_transform(img, "combined", _rng())
    assert out.mode == "RGB"
    # half the area, then half of each side: about an eighth of the pixels
    assert 0.10 <= out.width * out.height / (400 * 300) <= 0.15
    assert ev.apply_transform(img, "combined", _rng()).tobytes() == out.tobytes()
    with pytest.raises(ev.EvalError, match="unknown transform"):
        ev.apply_transform(img, "sepia", _rng())


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


def test_bank_regional_vectors_are_the_ones_a_store_keeps(
    photos: dict[str, Image.Image], bank: ev.FeatureBank
) -> None:
    """Regional vectors from the shared pass are what ``Embedder.embed_tensors(regions=True)`` gives
    an indexer, windows of the scale-1 map of a multi-scale configuration."""
    from deepfeat.models.embedder import Embedder

    cfg = ev.Config("efficientnet_lite0", "head", "gem", "none", (1.0, 0.5), "full", 256, regions=3)
    images = [_small(photos[name], 300) for name in ("chelsea", "rocket")]
    bank.register([cfg])
    regions = bank.region_vectors("database", images, cfg)
    embedder = Embedder(
        cfg.model, device="cpu", precision="fp32", max_side=256, scales=cfg.scales, regions=3, lowpass=0.01
    )
    stored = embedder.embed_tensors(embedder.preprocess(images), regions=True)  # (2, 11, d)
    assert regions.shape == (2, 9, 1280)
    assert float(np.einsum("nrd,nrd->nr", regions, stored[:, 2:]).min()) >= 0.999
    lowpass = bank.lowpass_vectors("database", images, replace(cfg, lowpass=0.01))
    assert float(np.einsum("nd,nd->n", lowpass, stored[:, 1]).min()) >= 0.999
    assert float(np.einsum("nd,nd->n", bank.vectors("database", images, cfg), stored[:, 0]).min()) >= 0.999


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
    "gem",
    "--whitening",
    "none",
    "--scales",
    "1",
    "--resize-modes",
    "crop",
    "--regions",
    "0,2",
    "--lowpass",
    "0",
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


def _more_photos() -> dict[str, Image.Image]:
    """More real photos from the scikit-image wheel (the grey ones as RGB)."""
    import skimage.data

    out = {}
    for name in ("camera", "coins", "moon", "immunohistochemistry", "hubble_deep_field", "retina"):
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        img.thumbnail((400, 400))
        out[name] = img
    return out


def _category_folder(root: Path, photos: dict[str, Image.Image]) -> Path:
    """Four classes, each of four seeded mild variations of one photo."""
    for name in ("chelsea", "coffee", "rocket", "astronaut"):
        (root / name).mkdir(parents=True)
        small = _small(photos[name], 320)
        for j in range(4):
            _augment(small, seed=j).save(root / name / f"{j}.jpg", quality=90)
    return root


@pytest.fixture
def cheap_default(monkeypatch: pytest.MonkeyPatch) -> ev.Config:
    """A one-scale 256 px stand-in for the shipped default (3 scales at 512 px), where a test is about
    the protocol; the category run and ``test_validation_rows_run_each_configuration_once`` keep the
    real one."""
    from deepfeat.scripts.evaluate import protocol

    cheap = ev.Config("efficientnet_lite0", "head", "gem", "none", (1.0,), "full", 256)
    monkeypatch.setattr(protocol, "default_config", lambda: cheap)
    return cheap


def test_category_run_tunes_then_reports_validation(
    tmp_path: Path,
    photos: dict[str, Image.Image],
    bank: ev.FeatureBank,
    cheap_default: ev.Config,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = _category_folder(tmp_path / "classes", photos)
    out_json, out_png = tmp_path / "cat.json", tmp_path / "cat.png"
    rc = ev.main(
        ["category", str(root), *SMALL_GRID, "-k", "1,2", "--json", str(out_json), "--plot", str(out_png)],
        bank=bank,
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tuning: 3 configurations" in printed and "took no part in the choice" in printed
    assert "<- baseline" in printed and "chance mAP" in printed

    report = json.loads(out_json.read_text())
    assert report["mode"] == "category" and report["primary_metric"] == "mAP"
    assert (
        report["collections"]["classes"]["tune"] == 8 and report["collections"]["classes"]["validation"] == 8
    )
    tune, val = report["tuning"]["classes"], report["validation"]["classes"]
    assert tune["classes"] == val["classes"] == {"astronaut": 2, "chelsea": 2, "coffee": 2, "rocket": 2}
    assert tune["chance_mAP"] == pytest.approx(1 / 7)
    # the grid ran on the tuning part only; the choice is the ranking's first row
    assert len(tune["results"]) == 3 and len(report["ranking"]) == 3
    assert report["chosen"] == report["ranking"][0]["config"]
    means = [r["mean"] for r in report["ranking"]]
    assert means == sorted(means, reverse=True)
    # validation: the chosen configuration, the shipped default and the baseline, each once
    roles = [r["roles"] for r in report["validation_summary"]]
    assert sorted(role for rs in roles for role in rs) == ["baseline", "chosen", "default"]
    assert report["default"] == cheap_default.name
    assert {r["config"] for r in val["results"]} == {r["config"] for r in report["validation_summary"]}
    for r in val["results"]:
        # same-photo variations of four distinct scenes: far above chance for every configuration
        assert r["metrics"]["mAP"] > val["chance_mAP"] + 0.4
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # the default embeds at 512 px and three scales: seconds per image on a busy 2-core CPU
def test_validation_runs_the_real_shipped_default(
    tmp_path: Path, photos: dict[str, Image.Image], bank: ev.FeatureBank
) -> None:
    root = _category_folder(tmp_path / "classes", photos)
    report = ev.run(ev.build_parser().parse_args(["category", str(root), *SMALL_GRID]), bank=bank)
    default = ev.default_config()
    assert report["default"] == default.name
    row = next(r for r in report["validation"]["classes"]["results"] if r["config"] == default.name)
    assert "default" in row["roles"] and row["resize_mode"] == default.resize_mode
    assert row["scales"] == list(default.scales) and row["metrics"]["mAP"] > 0.5


def test_copy_run_on_two_collections_chooses_on_tuning_and_validates(
    tmp_path: Path,
    photos: dict[str, Image.Image],
    bank: ev.FeatureBank,
    cheap_default: ev.Config,
    capsys: pytest.CaptureFixture[str],
) -> None:
    more = _more_photos()
    a = _originals(
        tmp_path / "scenes", {k: photos[k] for k in ("chelsea", "coffee", "rocket", "hopper")}, 320
    )
    b = _originals(
        tmp_path / "objects",
        {
            "astronaut": photos["astronaut"],
            "motorcycle": photos["motorcycle"],
            "coins": more["coins"],
            "moon": more["moon"],
        },
        320,
    )
    d = _originals(
        tmp_path / "distractors", {k: v for k, v in more.items() if k not in ("coins", "moon")}, 320
    )
    for i in range(4):
        _textured(20 + i).save(d / f"texture-{i}.png")
    out_json = tmp_path / "copy.json"
    flags = ["--transforms", "blur_flip,contrast_desat", "--json", str(out_json), "--top", "2"]
    rc = ev.main(["copy", str(a), str(b), "--distractors", str(d), *SMALL_GRID, *flags], bank=bank)
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "validation part of scenes" in printed and "validation part of objects" in printed
    assert "<- default" in printed and "<- chosen" in printed

    report = json.loads(out_json.read_text())
    assert report["collections"]["scenes"]["tune"] == report["collections"]["scenes"]["validation"] == 2
    assert report["distractors"]["tune"] == report["distractors"]["validation"] == 4
    assert report["transforms"] == ["blur_flip", "contrast_desat"] and report["min_distractor_ratio"] == 2
    for part in ("tuning", "validation"):
        for name in ("scenes", "objects"):
            r = report[part][name]
            assert r["originals"] == 2 and r["distractors"] == 4 and r["queries"] == 4
            assert set(r["results"][0]["per_transform"]) == {"blur_flip", "contrast_desat"}
    # chosen by the mean over both collections' tuning parts
    best = report["ranking"][0]
    assert best["config"] == report["chosen"]
    assert best["mean"] == pytest.approx(np.mean(list(best["per_collection"].values())))
    assert report["default"] == cheap_default.name
    summary = {tuple(r["roles"]): r for r in report["validation_summary"]}
    assert any("default" in roles for roles in summary) and any("baseline" in roles for roles in summary)
    for r in summary.values():
        assert set(r["per_collection"]) == {"scenes", "objects"}
        assert r["mean"] >= 0.75, r  # mild copies of distinct photos: found by every configuration


def test_copy_run_refuses_too_few_distractors(tmp_path: Path, photos: dict[str, Image.Image]) -> None:
    """Checked on the file lists, before any image is decoded or a model loads."""
    originals = _originals(tmp_path / "o", photos, 200)
    few = tmp_path / "few"
    few.mkdir()
    for i in range(6):  # 3 per part, for 3 originals per part: fewer than twice as many
        _textured(i, (64, 48)).save(few / f"{i}.png")
    args = ["copy", str(originals), "--distractors", str(few), *SMALL_GRID]
    with pytest.raises(ev.EvalError, match="at least 2x as many distractors as originals") as err:
        ev.run(ev.build_parser().parse_args(args), bank=ev.FeatureBank(embedders={}))
    assert "o tune: 3 originals, 3 distractors" in str(err.value) and "--allow-few-distractors" in str(
        err.value
    )
    with pytest.raises(ev.EvalError, match="distractors"):  # none at all: the same rule
        ev.run(ev.build_parser().parse_args(["copy", str(originals), *SMALL_GRID]), bank=ev.FeatureBank())


def test_allow_few_distractors_runs_anyway(
    tmp_path: Path, photos: dict[str, Image.Image], bank: ev.FeatureBank, cheap_default: ev.Config
) -> None:
    originals = _originals(tmp_path / "o", photos, 200)
    grid = [
        "--layers",
        "head",
        "--poolings",
        "gem",
        "--whitening",
        "none",
        "--scales",
        "1",
        "--resize-modes",
        "crop",
    ]
    args = ["copy", str(originals), *grid, "--transforms", "blur_flip", "--allow-few-distractors"]
    report = ev.run(ev.build_parser().parse_args(args), bank=bank)
    assert report["min_distractor_ratio"] is None and report["distractors"]["tune"] == 0
    assert report["validation"]["o"]["originals"] == 3


def _rep(values: dict[str, tuple[float, float]]) -> dict[str, object]:
    return {"results": [{"config": k, "metrics": {"recall@1": p, "mAP": s}} for k, (p, s) in values.items()]}


def test_the_choice_follows_the_stated_criterion() -> None:
    grid = [ev.Config("m", layer, "gem", "none") for layer in ("l1", "l2", "l3", "l4")]
    n = [c.name for c in grid]
    reports = {
        # mean recall@1: l1 0.7, l2 0.8, l3 0.8 (higher mAP than l2), l4 0.8 (same as l3, later in the grid)
        "a": _rep({n[0]: (0.9, 0.9), n[1]: (0.8, 0.8), n[2]: (0.6, 0.9), n[3]: (0.6, 0.9)}),
        "b": _rep({n[0]: (0.5, 0.5), n[1]: (0.8, 0.8), n[2]: (1.0, 0.9), n[3]: (1.0, 0.9)}),
    }
    ranking = ev.rank_configs(reports, grid, "recall@1", "mAP")
    assert [r["config"] for r in ranking] == [n[2], n[3], n[1], n[0]]
    assert ranking[0]["per_collection"] == {"a": 0.6, "b": 1.0}
    assert "highest mean recall@1" in ev.CRITERION.format(primary="recall@1", secondary="mAP")


def test_validation_rows_run_each_configuration_once() -> None:
    from deepfeat.models.config import EmbedderConfig
    from deepfeat.models.identity import resolve

    default = ev.default_config()
    shipped = resolve(EmbedderConfig())
    assert (default.model, default.layer, default.pooling) == (shipped.model, shipped.layer, shipped.pooling)
    assert (default.resize_mode, default.max_side, default.scales) == (
        shipped.resize_mode,
        shipped.max_side,
        tuple(shipped.scales),
    )
    assert default.whitening == "none" and not default.baseline and default.regions == shipped.regions
    grid = ev.build_grid(
        models=["efficientnet_lite0"],
        layers=[default.layer],
        poolings=[default.pooling],
        whitening=["none"],
        scale_sets=[default.scales],
        resize_modes=[default.resize_mode],
        regions=[default.regions],
        lowpass=[default.lowpass],
    )
    chosen = next(c for c in grid if not c.baseline)
    rows = ev.validation_rows(grid, chosen, default)
    assert [roles for roles, _ in rows] == [["chosen", "default"], ["baseline"]]
    rows = ev.validation_rows(grid, grid[0], default)
    assert [roles for roles, _ in rows] == [["chosen", "baseline"], ["default"]]


def test_whitening_rows_run_and_report_their_dimension(
    tmp_path: Path, photos: dict[str, Image.Image], bank: ev.FeatureBank
) -> None:
    originals = _originals(tmp_path / "o", photos, 256)
    configs = [
        ev.Config("efficientnet_lite0", "head", "gem", "none"),
        ev.Config("efficientnet_lite0", "head", "gem", "auto"),
        ev.Config("efficientnet_lite0", "head", "gem", "3"),
    ]
    report = ev.evaluate_copy(originals, configs, transforms=["blur_flip"], bank=bank)
    dims = [r["whitening_dim"] for r in report["results"]]
    assert dims[0] is None and dims[2] == 3 and 1 <= dims[1] <= len(photos) - 1
    assert [r["dim"] for r in report["results"]] == [1280, dims[1], 3]


def test_bad_input_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "only").mkdir()
    _textured(0).save(tmp_path / "only" / "a.png")
    assert ev.main(["category", str(tmp_path), *SMALL_GRID]) == 2
    assert "error [invalid_eval]: category mode needs at least 2 class sub-folders" in capsys.readouterr().err
    (tmp_path / "second").mkdir()
    for i in range(3):
        _textured(i).save(tmp_path / "second" / f"{i}.png")
    assert ev.main(["category", str(tmp_path), *SMALL_GRID]) == 2
    assert "every class needs at least 4 images" in capsys.readouterr().err
    assert ev.main(["copy", str(tmp_path), *SMALL_GRID, "--transforms", "sepia"]) == 2
    assert "unknown transform 'sepia'" in capsys.readouterr().err
    assert ev.main(["copy", str(tmp_path / "only"), *SMALL_GRID, "--allow-few-distractors"]) == 2
    assert "at least 4 originals" in capsys.readouterr().err
    assert ev.main(["category", str(tmp_path), "--distractors", str(tmp_path), *SMALL_GRID]) == 2
    assert "copy mode only" in capsys.readouterr().err
    assert ev.main(["copy", str(tmp_path), "--layers", "nope", "--resize-modes", "crop"]) == 2
    assert "error [unknown_layer]" in capsys.readouterr().err
