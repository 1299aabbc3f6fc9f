"""Classifier heads: a linear probe on real photos beats chance by a wide margin on held-out views,
fine-tuning runs on CPU, heads save atomically and refuse other embedders' features.

The "real dataset" is built from the real photos of the test fixtures: four classes (cat, espresso,
rocket, person), several augmented views of each photo for training (crops, flips, colour changes) and
held-out views drawn with another seed and another crop scale.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from deepfeat.models.heads import (
    FINETUNE_COMPATIBLE_KEYS,
    CorruptHeadError,
    FineTuneConfig,
    HeadExistsError,
    HeadManifest,
    IncompatibleHeadError,
    InvalidHeadNameError,
    LinearConfig,
    TrainingDataError,
    check_compatible,
    check_head_name,
    evaluate,
    fine_tune,
    finetune_bytes,
    finetune_state,
    finetuned_from_state,
    knn_vote,
    linear_bytes,
    load_finetune_state,
    load_linear,
    predictions_from_probabilities,
    read_manifest,
    save_head,
    storage,
    stratified_split,
    train_linear,
)

CLASSES = ("cat", "espresso", "person", "rocket")
SOURCES = {
    "cat": ("chelsea",),
    "espresso": ("coffee",),
    "person": ("astronaut", "hopper"),
    "rocket": ("rocket",),
}


def views(image: Image.Image, n: int, *, seed: int, scale: tuple[float, float]) -> list[Image.Image]:
    """``n`` augmented views: a centre-biased random crop, maybe mirrored, colour and brightness changed,
    longest side 256 (the model resizes anyway; small files keep the tests fast)."""
    rng = np.random.default_rng(seed)
    out = []
    w, h = image.size
    for _ in range(n):
        s = rng.uniform(*scale)
        cw, ch = int(w * s), int(h * s)
        x0 = int((w - cw) * rng.uniform(0.25, 0.75))
        y0 = int((h - ch) * rng.uniform(0.25, 0.75))
        v = image.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            v = ImageOps.mirror(v)
        v = ImageEnhance.Color(v).enhance(rng.uniform(0.6, 1.4))
        v = ImageEnhance.Brightness(v).enhance(rng.uniform(0.8, 1.2))
        v.thumbnail((256, 256))
        out.append(v)
    return out


def augmented_classes(
    photos: dict[str, Image.Image], *, train: int = 6, test: int = 3
) -> dict[str, tuple[list[Image.Image], list[Image.Image]]]:
    """class -> (training views, held-out views); a class with two photos alternates between them."""
    data: dict[str, tuple[list[Image.Image], list[Image.Image]]] = {}
    for c, name in enumerate(CLASSES):
        sources = SOURCES[name]
        tr: list[Image.Image] = []
        te: list[Image.Image] = []
        for i, src in enumerate(sources):
            n_tr = -(-train // len(sources)) if i == 0 else train // len(sources)
            n_te = -(-test // len(sources)) if i == 0 else test // len(sources)
            tr += views(photos[src], n_tr, seed=100 * c + i, scale=(0.6, 0.95))
            te += views(photos[src], n_te, seed=1000 + 100 * c + i, scale=(0.45, 0.6))
        data[name] = (tr, te)
    return data


_FEATURES: dict[str, Any] = {}


def augmented_features(photos: dict[str, Image.Image], embedder: Any) -> dict[str, np.ndarray]:
    """Embeddings of :func:`augmented_classes` (computed once per session and embedder)."""
    key = json.dumps(embedder.fingerprint, sort_keys=True)
    if key not in _FEATURES:
        data = augmented_classes(photos)
        x_tr, y_tr, x_te, y_te = [], [], [], []
        for c, name in enumerate(CLASSES):
            tr, te = data[name]
            x_tr.append(embedder.embed(tr))
            x_te.append(embedder.embed(te))
            y_tr += [c] * len(tr)
            y_te += [c] * len(te)
        _FEATURES[key] = {
            "x_train": np.concatenate(x_tr),
            "y_train": np.array(y_tr),
            "x_test": np.concatenate(x_te),
            "y_test": np.array(y_te),
        }
    return dict(_FEATURES[key])


@pytest.fixture(scope="module")
def features(photos: dict[str, Image.Image], lite0: Any) -> dict[str, np.ndarray]:
    return augmented_features(photos, lite0)


def manifest_for(
    name: str, fingerprint: dict[str, Any], method: str = "linear", classes: tuple[str, ...] = CLASSES
) -> HeadManifest:
    return HeadManifest(
        name=name,
        method=method,
        classes=classes,
        fingerprint=fingerprint,
        compatible_on=FINETUNE_COMPATIBLE_KEYS if method == "finetune" else None,
        metrics={"accuracy": 1.0},
    )


# --- linear probe ---------------------------------------------------------------------------------


def test_linear_head_classifies_held_out_photos_well_above_chance(features: dict[str, np.ndarray]) -> None:
    head, log = train_linear(features["x_train"], features["y_train"], CLASSES)
    probs = head.probabilities(features["x_test"])
    assert probs.shape == (len(features["y_test"]), 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    report = evaluate(features["y_test"], probs, CLASSES)
    # Chance is 25%; held-out views are other crops (smaller, other seeds) of the same photos.
    assert report["accuracy"] >= 0.8, report
    assert report["chance"] == 0.25 and report["top2_accuracy"] >= report["accuracy"]
    assert log.method == "linear" and log.val_size > 0 and log.best_step in LinearConfig().strengths
    assert log.history and all("val_accuracy" in h for h in log.history)


def test_linear_head_standardisation_is_folded_into_a_plain_linear_map(
    features: dict[str, np.ndarray],
) -> None:
    head, _ = train_linear(features["x_train"], features["y_train"], CLASSES, LinearConfig(refit=False))
    x = features["x_test"]
    np.testing.assert_allclose(head.logits(x), x @ head.weight.T + head.bias, rtol=1e-5, atol=1e-5)
    assert head.weight.dtype == np.float32 and head.weight.shape == (4, x.shape[1])
    # Deterministic for a given seed.
    again, _ = train_linear(features["x_train"], features["y_train"], CLASSES, LinearConfig(refit=False))
    np.testing.assert_allclose(again.weight, head.weight, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("x", "y", "classes", "match"),
    [
        (np.ones((4, 3), np.float32), [0, 0, 0, 0], ("only",), "at least 2 classes"),
        (np.ones((4, 3), np.float32), [0, 0, 0, 0], ("a", "b"), r"no examples of class\(es\) \['b'\]"),
        (np.full((4, 3), np.nan, np.float32), [0, 1, 0, 1], ("a", "b"), "NaN"),
        (np.ones((4, 3), np.float32), [0, 1], ("a", "b"), "features with n labels"),
        (np.ones((2, 3), np.float32), [0, 1], ("a", "a"), "unique"),
    ],
)
def test_train_linear_rejects_bad_input(
    x: np.ndarray, y: list[int], classes: tuple[str, ...], match: str
) -> None:
    with pytest.raises(TrainingDataError, match=match):
        train_linear(x, y, classes)


def test_stratified_split_keeps_every_class_on_both_sides() -> None:
    y = np.array([0] * 10 + [1] * 3 + [2] * 2 + [3])
    first, second = stratified_split(y, 0.2, seed=3)
    assert sorted([*first, *second]) == list(range(len(y)))
    assert set(y[second]) == {0, 1, 2}  # a class of one stays in the first part
    assert set(y[first]) == {0, 1, 2, 3}
    assert (y[second] == 0).sum() == 2
    again = stratified_split(y, 0.2, seed=3)
    assert np.array_equal(again[0], first) and np.array_equal(again[1], second)
    with pytest.raises(TrainingDataError):
        stratified_split(y, 1.0)


def test_evaluate_against_hand_counts() -> None:
    y = [0, 0, 1, 1, 2]
    probs = np.array([[0.9, 0.1, 0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1], [0, 0.4, 0.6]])
    report = evaluate(y, probs, ["a", "b", "c"])
    assert report["confusion"] == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert report["accuracy"] == 0.6 and report["top2_accuracy"] == 1.0
    assert report["balanced_accuracy"] == round((0.5 + 0.5 + 1) / 3, 4)
    assert report["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    top = predictions_from_probabilities(probs[:1], ["a", "b", "c"], k=2)[0]
    assert [(p.label, p.class_index) for p in top] == [("a", 0), ("b", 1)]


def test_knn_vote_is_weighted_by_similarity() -> None:
    votes = knn_vote(["cat", "dog", "dog", "cat"], [0.9, 0.2, 0.25, 0.8])
    assert votes[0][0] == "cat" and votes[0][1] == pytest.approx(1.7 / 2.15)
    assert sum(share for _, share in votes) == pytest.approx(1.0)
    # A negative similarity counts for (almost) nothing, never against.
    assert knn_vote(["a", "b"], [-0.5, 0.1])[0][0] == "b"


# --- identity -------------------------------------------------------------------------------------


def test_heads_refuse_other_features(lite0: Any) -> None:
    manifest = manifest_for("pets", lite0.fingerprint)
    check_compatible(manifest, lite0.fingerprint)
    other = lite0.variant(layer="head", pooling="gem").fingerprint
    with pytest.raises(IncompatibleHeadError, match='layer: head="penultimate" server="head"') as info:
        check_compatible(manifest, other)
    assert set(info.value.differences) == {"layer", "pooling"}
    # A fine-tuned head runs its own backbone: only the base model and weights must match.
    check_compatible(manifest_for("ft", lite0.fingerprint, method="finetune"), other)
    with pytest.raises(IncompatibleHeadError, match="weights"):
        check_compatible(manifest_for("ft", lite0.fingerprint, method="finetune"), {**other, "weights": "x"})


@pytest.mark.parametrize("name", ["", "knn", "ImageNet", "../x", ".hidden", "a/b", "x" * 65, "-a"])
def test_head_names_are_plain_and_not_reserved(name: str) -> None:
    with pytest.raises(InvalidHeadNameError):
        check_head_name(name)
    assert check_head_name("my-pets_v2.1") == "my-pets_v2.1"


# --- save / load ----------------------------------------------------------------------------------


def test_save_load_round_trip_and_checksums(
    tmp_path: Path, features: dict[str, np.ndarray], lite0: Any
) -> None:
    head, _ = train_linear(features["x_train"], features["y_train"], CLASSES)
    path = save_head(
        tmp_path,
        manifest_for("pets", lite0.fingerprint),
        {"linear.npz": linear_bytes(head), "report.json": b"{}"},
    )
    assert sorted(p.name for p in path.iterdir()) == ["head.json", "linear.npz", "report.json"]
    manifest = read_manifest(path)
    assert manifest.classes == CLASSES and manifest.files["linear.npz"]["sha256"]
    loaded = load_linear(path, manifest)
    np.testing.assert_array_equal(
        loaded.probabilities(features["x_test"]), head.probabilities(features["x_test"])
    )
    with pytest.raises(HeadExistsError, match="--overwrite"):
        save_head(tmp_path, manifest_for("pets", lite0.fingerprint), {"linear.npz": linear_bytes(head)})
    (path / "linear.npz").write_bytes(b"garbage")
    with pytest.raises(CorruptHeadError, match="checksum"):
        load_linear(path, read_manifest(path))
    (path / "head.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CorruptHeadError):
        read_manifest(path)


def test_a_failed_save_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, features: dict[str, np.ndarray], lite0: Any
) -> None:
    head, _ = train_linear(features["x_train"], features["y_train"], CLASSES)
    files = {"linear.npz": linear_bytes(head)}
    real_replace = os.replace

    def crash(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="No space"):
        save_head(tmp_path, manifest_for("pets", lite0.fingerprint), files)
    assert list(tmp_path.iterdir()) == []  # no head, no temporary directory

    monkeypatch.setattr(os, "replace", real_replace)
    first = save_head(tmp_path, manifest_for("pets", lite0.fingerprint), files)
    before = (first / "head.json").read_bytes()

    # An overwrite swaps the two directories in one rename where the filesystem can: a failed swap
    # changes nothing.
    def exchange_fails(a: Path, b: Path) -> bool:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(storage, "_exchange", exchange_fails)
    with pytest.raises(OSError, match="I/O"):
        save_head(tmp_path, manifest_for("pets", lite0.fingerprint), files, overwrite=True)
    assert (first / "head.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["pets"]

    # Where it cannot, the old head is moved aside first and put back when the new one fails to move in.
    monkeypatch.setattr(storage, "_exchange", lambda a, b: False)
    calls = {"n": 0}

    def crash_second(src: Any, dst: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(5, "I/O error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_second)
    with pytest.raises(OSError, match="I/O"):
        save_head(tmp_path, manifest_for("pets", lite0.fingerprint), files, overwrite=True)
    assert (first / "head.json").read_bytes() == before  # the previous head is back, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["pets"]


def test_save_refuses_a_head_without_its_weights(tmp_path: Path, lite0: Any) -> None:
    with pytest.raises(Exception, match="needs its linear.npz"):
        save_head(tmp_path, manifest_for("pets", lite0.fingerprint), {"report.json": b"{}"})
    assert not (tmp_path / "pets").exists()


# --- fine-tuning ----------------------------------------------------------------------------------


def test_fine_tune_one_epoch_on_cpu_and_reload(
    photos: dict[str, Image.Image], lite0: Any, tmp_path: Path
) -> None:
    data = augmented_classes(photos, train=3, test=1)
    images = data["cat"][0] + data["rocket"][0]
    labels = [0] * 3 + [1] * 3
    seen: list[dict[str, float]] = []
    net, log = fine_tune(
        lite0.spec,
        lite0.backbone,
        images,
        labels,
        ("cat", "rocket"),
        config=FineTuneConfig(epochs=1, batch_size=4, val_fraction=0.34),
        device="cpu",
        on_epoch=seen.append,
    )
    assert log.method == "finetune" and log.steps_run == 1 and len(seen) == 1
    assert log.extra["unfrozen"] == ["conv_head", "bn2", "blocks.6"]
    assert not any(p.requires_grad for p in net.parameters())
    # The loaded backbone itself was not touched.
    assert not any(p.requires_grad for p in lite0.backbone.parameters())

    state = finetune_state(net, log.extra["unfrozen"])
    assert "head.weight" in state and any(k.startswith("trunk.blocks.6.") for k in state)
    assert not any(k.startswith("trunk.blocks.5.") for k in state)  # frozen blocks are not saved
    manifest = manifest_for("ft", lite0.fingerprint, method="finetune", classes=("cat", "rocket"))
    path = save_head(tmp_path, manifest, {"finetune.pt": finetune_bytes(state)})
    rebuilt = finetuned_from_state(
        lite0.spec, lite0.backbone, read_manifest(path), load_finetune_state(path, read_manifest(path))
    )
    batch = torch.stack([lite0.classify_transform(img) for img in data["cat"][1] + data["rocket"][1]])
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(batch), net(batch))
        assert rebuilt(batch).argmax(1).tolist() == [0, 1]


@pytest.mark.parametrize("model", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_every_lite_variant_names_its_top_blocks_for_fine_tuning(model: str) -> None:
    from deepfeat.models.heads.finetune import top_blocks

    assert top_blocks(model, 2) == ("conv_head", "bn2", "blocks.6", "blocks.5")
    assert top_blocks("resnet50", 1) == ("layer4",)
