"""``deepfeat train-classifier`` and ``compare-classifiers`` on a folder of real photos (augmented views of
the fixture photos, one sub-folder per class): reports, atomic saves, feature reuse, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from deepfeat.classifiers import load_head
from deepfeat.index.store import ImageStore, NewImage
from deepfeat.models.heads import FineTuneConfig, HeadExistsError, TrainingDataError, read_manifest
from deepfeat.runtime import image_limits
from deepfeat.scripts import cli
from deepfeat.scripts.compare_classifiers import compare, markdown_table
from deepfeat.scripts.train_classifier import (
    CACHE_FILE,
    FeatureCache,
    TrainOptions,
    dataset_features,
    scan_class_folders,
    train,
)
from deepfeat.settings import Settings
from tests.conftest import jpeg_bytes
from tests.models.test_heads import CLASSES, augmented_classes

FAST_FLAGS = ["--layer", "penultimate", "--resize-mode", "crop", "--scales", "1", "--device", "cpu"]


def _write(root: Path, data: dict[str, list[Image.Image]]) -> Path:
    for name, images in data.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            (root / name / f"{name}-{i}.jpg").write_bytes(jpeg_bytes(img, quality=85))
    (root / "README.txt").write_text("files at the top are ignored", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, photos: dict[str, Image.Image]) -> Path:
    """4 classes x 6 photos (4 training-style views and 2 smaller held-out-style crops each)."""
    data = augmented_classes(photos, train=4, test=2)
    return _write(tmp_path_factory.mktemp("classes"), {name: tr + te for name, (tr, te) in data.items()})


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir shared by the tests that train on ``folder``: its feature cache makes the later ones cheap."""
    return tmp_path_factory.mktemp("shared")


def _settings(tmp: Path) -> Settings:
    return Settings(
        data_dir=tmp / "data", layer="penultimate", resize_mode="crop", scales=[1.0], device="cpu"
    )


def _no_leftovers(data_dir: Path) -> list[str]:
    root = data_dir / "classifiers"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# --- linear -----------------------------------------------------------------------------------------


def test_linear_end_to_end_report_png_and_cached_features(
    folder: Path, shared: Path, lite0: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(shared)
    report = train(folder, "pets", settings, TrainOptions(test_fraction=0.34), embedder=lite0)
    assert report["classes"] == list(CLASSES) and report["counts"] == dict.fromkeys(CLASSES, 6)
    assert report["split"] == {"train": 16, "test": 8, "seed": 0}
    assert report["features"]["embedded"] + report["features"]["from_cache"] == 24
    test = report["test"]
    assert test["accuracy"] >= 0.75, test  # chance: 0.25
    assert set(test["per_class"]) == set(CLASSES) and np.sum(test["confusion"]) == 8

    head_dir = Path(report["path"])
    assert sorted(p.name for p in head_dir.iterdir()) == [
        "confusion.png",
        "head.json",
        "linear.npz",
        "report.json",
    ]
    with Image.open(head_dir / "confusion.png") as png:
        assert png.format == "PNG" and png.width > 300 and png.height > 300
    manifest = read_manifest(head_dir)
    assert manifest.fingerprint == lite0.fingerprint and manifest.method == "linear"
    assert manifest.metrics["accuracy"] == test["accuracy"] and "confusion" not in manifest.metrics
    assert json.loads((head_dir / "report.json").read_text())["test"]["n"] == 8

    # Re-training reuses every feature from the cache: not one image is embedded again.
    def boom(*_a: Any, **_k: Any) -> None:
        raise AssertionError("embedded again")

    monkeypatch.setattr(lite0, "embed", boom)
    with pytest.raises(HeadExistsError, match="--overwrite"):
        train(folder, "pets", settings, TrainOptions(test_fraction=0.34), embedder=lite0)
    again = train(folder, "pets", settings, TrainOptions(test_fraction=0.34, overwrite=True), embedder=lite0)
    assert again["features"]["from_cache"] == 24 and again["features"]["embedded"] == 0
    assert again["test"]["accuracy"] == test["accuracy"]
    assert "pets" in _no_leftovers(settings.data_dir)
    assert not [p for p in _no_leftovers(settings.data_dir) if p.startswith(".")]


def test_features_come_from_the_store_when_it_indexed_the_files(
    folder: Path, tmp_path: Path, lite0: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    dataset = scan_class_folders(folder)
    rng = np.random.default_rng(0)
    stored = rng.normal(size=(len(dataset.sha256), lite0.dim)).astype(np.float32)
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    with ImageStore.open(data_dir, fingerprint=lite0.fingerprint, dim=lite0.dim) as store:
        store.add(
            stored, [NewImage(sha256=s, source=None, width=1, height=1, nbytes=1) for s in dataset.sha256]
        )
    monkeypatch.setattr(lite0, "embed", lambda *_a, **_k: pytest.fail("embedded a file the store knows"))
    kept, features, stats = dataset_features(
        dataset, lite0, data_dir=data_dir, limits=image_limits(Settings())
    )
    assert stats.from_store == 24 and stats.embedded == 0
    np.testing.assert_array_equal(features, stored)
    assert kept.files == dataset.files


def test_feature_cache_round_trip(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / CACHE_FILE)
    fp = {"version": 1, "model": "m", "layer": "x"}
    cache.put_many(fp, {"a" * 64: np.ones(4, np.float32)})
    assert list(cache.get_many(fp, ["a" * 64, "b" * 64], 4)) == ["a" * 64]
    assert cache.get_many({**fp, "layer": "y"}, ["a" * 64], 4) == {}  # another embedder, another namespace
    assert cache.get_many(fp, ["a" * 64], 8) == {}  # wrong dim: ignored, recomputed
    cache.close()


# --- bad input: a clear error and nothing saved -------------------------------------------------------


def _make(root: Path, layout: dict[str, int], photos: dict[str, Image.Image]) -> Path:
    root.mkdir(parents=True)
    for c, (name, n) in enumerate(layout.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            scale = 0.1 + 0.02 * i + 0.005 * c  # distinct contents (identical files are kept once)
            (root / name / f"{i}.jpg").write_bytes(jpeg_bytes(photos["coffee"], scale=scale))
    return root


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        ({"cats": 3}, r"at least 2 classes; found only 'cats'"),
        ({}, "found none"),
        ({"cats": 3, "dogs": 0}, r"class folder\(s\) without image files .*dogs"),
        ({"cats": 3, "dogs": 1}, r"at least 2 usable images .*dogs \(1\)"),
    ],
)
def test_bad_training_folders_are_refused_before_any_work(
    tmp_path: Path, photos: dict[str, Image.Image], layout: dict[str, int], match: str
) -> None:
    root = _make(tmp_path / "train", layout, photos)
    settings = _settings(tmp_path)
    with pytest.raises(TrainingDataError, match=match):
        train(root, "bad", settings, TrainOptions(), embedder=None)  # fails before loading any model
    assert _no_leftovers(settings.data_dir) == []


def test_unreadable_files_are_named_and_nothing_is_saved(
    tmp_path: Path, photos: dict[str, Image.Image], lite0: Any
) -> None:
    root = _make(tmp_path / "train", {"cats": 2, "dogs": 2}, photos)
    (root / "dogs" / "truncated.jpg").write_bytes(jpeg_bytes(photos["chelsea"])[:300])
    (root / "cats" / "notes.jpg").write_bytes(b"this is not an image")
    settings = _settings(tmp_path)
    with pytest.raises(TrainingDataError, match=r"2 file\(s\) are not usable") as info:
        train(root, "pets", settings, TrainOptions(test_fraction=0.5), embedder=lite0)
    message = str(info.value)
    assert "truncated.jpg: corrupt_image" in message and "notes.jpg: unsupported_format" in message
    assert "--skip-bad" in message
    assert _no_leftovers(settings.data_dir) == []

    report = train(root, "pets", settings, TrainOptions(test_fraction=0.5, skip_bad=True), embedder=lite0)
    assert sorted(Path(s["path"]).name for s in report["skipped"]) == ["notes.jpg", "truncated.jpg"]
    assert report["counts"] == {"cats": 2, "dogs": 2}  # what it trained and tested on
    assert _no_leftovers(settings.data_dir) == ["pets"]


def test_cli_train_then_classify_and_errors(
    folder: Path,
    shared: Path,
    tmp_path: Path,
    photos: dict[str, Image.Image],
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = ["--data-dir", str(shared / "data")]
    args = ["train-classifier", str(folder), "--name", "pets-cli", "--test-fraction", "0.34", "--no-progress"]
    assert cli.main([*args, *data, *FAST_FLAGS]) == 0
    out = capsys.readouterr().out
    assert "trained linear classifier 'pets-cli': 4 classes" in out and "held-out accuracy" in out
    assert "confusion.png" in out and "classifier=pets-cli" in out
    assert cli.main([*args[:3], "pets-json", *args[4:], "--json", *data, *FAST_FLAGS]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["name"] == "pets-json"  # stdout is the report alone
    assert "features of" in captured.err

    query = tmp_path / "cat.jpg"
    query.write_bytes(jpeg_bytes(photos["chelsea"]))
    assert (
        cli.main(["classify", str(query), "--classifier", "pets-cli", "--json", *data, "--device", "cpu"])
        == 0
    )
    answer = json.loads(capsys.readouterr().out)
    assert answer["predictions"][0]["label"] == "cat" and answer["classifier"] == "pets-cli"

    assert cli.main([*args, *data]) == 2  # the name is taken
    assert "error [classifier_exists]" in capsys.readouterr().err
    assert cli.main(["train-classifier", str(folder / "cat"), "--name", "x", *data]) == 2
    assert "error [bad_training_data]" in capsys.readouterr().err
    assert cli.main(["classify", str(query), "--classifier", "nope", *data]) == 2
    assert "error [unknown_classifier]" in capsys.readouterr().err


# --- fine-tuning and the comparison ---------------------------------------------------------------------


def test_finetune_one_epoch_saves_a_servable_head(
    tmp_path: Path, photos: dict[str, Image.Image], lite0: Any
) -> None:
    data = augmented_classes(photos, train=3, test=1)
    root = _write(tmp_path / "train", {name: data[name][0] + data[name][1] for name in ("cat", "rocket")})
    settings = _settings(tmp_path)
    options = TrainOptions(
        method="finetune",
        test_fraction=0.25,
        finetune=FineTuneConfig(epochs=1, batch_size=4, val_fraction=0.34),
    )
    report = train(root, "ft", settings, options, embedder=lite0)
    head_dir = Path(report["path"])
    assert (head_dir / "finetune.pt").is_file() and (head_dir / "confusion.png").is_file()
    assert report["training"]["unfrozen"] == ["conv_head", "bn2", "blocks.6"] and report["test"]["n"] == 2
    head = load_head(head_dir, lite0)
    assert head.manifest.compatible_on == ("version", "model", "weights", "pretrained")
    preds = head.predict([photos["chelsea"], photos["rocket"]], embed=lite0.embed, k=2)
    assert [p[0].label for p in preds] == ["cat", "rocket"]


def test_compare_methods_on_one_split(folder: Path, shared: Path, tmp_path: Path, lite0: Any) -> None:
    mapping = tmp_path / "map.json"
    mapping.write_text(
        json.dumps(
            {"cat": ["281-285"], "espresso": [967], "rocket": [657, 744, 812], "person": [834, 655, 981]}
        )
    )
    result = compare(
        folder,
        settings=_settings(shared),
        methods=["linear", "knn", "imagenet"],
        test_fraction=0.34,
        neighbours=3,
        imagenet_map=str(mapping),
        embedder=lite0,
    )
    assert set(result["methods"]) == {"linear", "knn", "imagenet"}
    for name, entry in result["methods"].items():
        assert entry["runs"][0]["n"] == 8 and np.sum(entry["confusion"]) == 8, name
        assert 0.0 <= entry["accuracy_mean"] <= 1.0
    assert result["methods"]["linear"]["accuracy_mean"] >= 0.75
    assert result["imagenet_map"]["cat"] == [281, 282, 283, 284, 285]
    table = markdown_table(result)
    assert "| linear |" in table and "| knn |" in table and "| imagenet |" in table
    assert result["skipped"] == {}
    unmapped = compare(
        folder, settings=_settings(shared), methods=["knn", "imagenet"], test_fraction=0.34, neighbours=3,
        embedder=lite0,
    )  # fmt: skip
    assert set(unmapped["methods"]) == {"knn"}
    assert "no built-in ImageNet mapping" in unmapped["skipped"]["imagenet"]
    assert "--imagenet-map FILE" in unmapped["skipped"]["imagenet"]
    with pytest.raises(TrainingDataError, match="no entry for class"):
        compare(
            folder,
            settings=_settings(tmp_path),
            methods=["imagenet"],
            imagenet_map="tuxpaint",
            embedder=lite0,
        )


def test_the_method_flag_offers_what_the_heads_can_store() -> None:
    from deepfeat.models.heads import METHODS
    from deepfeat.scripts.classifier_args import TRAIN_METHODS

    assert TRAIN_METHODS == METHODS


def test_a_head_the_stores_server_would_refuse_is_saved_with_a_warning(
    folder: Path, tmp_path: Path, lite0: Any
) -> None:
    """Training with flags that change the features (here the weights) on a data dir whose store was
    made with others: the server there answers 409 for this head, so the trainer says so at once."""
    settings = _settings(tmp_path)
    other = {**lite0.fingerprint, "weights": "none(seed=0)", "pretrained": False}
    ImageStore.open(settings.data_dir, fingerprint=other, dim=lite0.dim).close()
    lines: list[str] = []
    report = train(
        folder, "odd", settings, TrainOptions(test_fraction=0.34), embedder=lite0, echo_fn=lines.append
    )
    assert "odd" in _no_leftovers(settings.data_dir)  # saved: a server started with these flags serves it
    assert "refuses this classifier" in report["warning"] and "weights" in report["warning"]
    assert any(line.startswith("warning: ") for line in lines)
    matching = _settings(tmp_path / "b")
    ImageStore.open(matching.data_dir, fingerprint=lite0.fingerprint, dim=lite0.dim).close()
    assert "warning" not in train(folder, "same", matching, TrainOptions(test_fraction=0.34), embedder=lite0)
