"""Serving your own classes: GET /v1/classifiers and POST /v1/classify?classifier=imagenet|knn|NAME, heads
picked up without a restart, and heads trained on another embedder's features refused."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from deepfeat.classifiers import CLASSIFIERS_DIR
from deepfeat.models.heads import (
    FineTuneConfig,
    fine_tune,
    finetune_bytes,
    finetune_state,
    linear_bytes,
    save_head,
    train_linear,
)
from tests.app.conftest import _client, upload
from tests.app.test_web_browser import browser_context, page  # noqa: F401  (fixtures for the page test)
from tests.models.test_heads import CLASSES, augmented_classes, augmented_features, manifest_for


def _error(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert body["code"] == code and body["detail"], body
    return dict(body)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Path]]:
    """A running app (the fast test embedding) and its classifiers directory."""
    tmp = tmp_path_factory.mktemp("app-classifiers")
    with _client(tmp) as client:
        yield client, tmp / "data" / CLASSIFIERS_DIR


@pytest.fixture(scope="module")
def head_files(photos: dict[str, Image.Image], lite0: Any) -> dict[str, bytes]:
    data = augmented_features(photos, lite0)
    head, _ = train_linear(data["x_train"], data["y_train"], CLASSES)
    return {"linear.npz": linear_bytes(head)}


def _save(root: Path, name: str, fingerprint: dict[str, Any], files: dict[str, bytes], **kw: Any) -> Path:
    return save_head(root, manifest_for(name, fingerprint), files, **kw)


def test_a_saved_head_is_listed_and_classifies_without_a_restart(
    served: tuple[TestClient, Path], head_files: dict[str, bytes], photos: dict[str, Image.Image], lite0: Any
) -> None:
    client, root = served
    before = client.get("/v1/classifiers").json()
    assert before["default"] == "imagenet" and [c["name"] for c in before["classifiers"]] == [
        "imagenet",
        "knn",
    ]
    assert len(before["classifiers"][0]["classes"]) == 1000 and before["refused"] == []

    _save(root, "pets", lite0.fingerprint, head_files)  # while the server runs
    listed = {c["name"]: c for c in client.get("/v1/classifiers").json()["classifiers"]}
    assert listed["pets"]["kind"] == "linear" and listed["pets"]["classes"] == list(CLASSES)
    assert listed["pets"]["metrics"] == {"accuracy": 1.0} and listed["pets"]["created_at"] > 0

    for photo, label in (
        ("chelsea", "cat"),
        ("coffee", "espresso"),
        ("rocket", "rocket"),
        ("hopper", "person"),
    ):
        resp = client.post("/v1/classify?classifier=pets&k=2", files=upload(photos[photo]))
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["classifier"] == "pets" and len(body["predictions"]) == 2
        assert body["predictions"][0]["label"] == label, (photo, body["predictions"])
        assert body["predictions"][0]["class_index"] == CLASSES.index(label)

    # Saved straight away and used at once by name (no listing in between), then replaced and removed.
    _save(root, "pets2", lite0.fingerprint, head_files)
    assert client.post("/v1/classify?classifier=pets2", files=upload(photos["chelsea"])).status_code == 200
    shutil.rmtree(root / "pets2")
    _error(
        client.post("/v1/classify?classifier=pets2", files=upload(photos["chelsea"])),
        404,
        "unknown_classifier",
    )
    assert "pets2" not in {c["name"] for c in client.get("/v1/classifiers").json()["classifiers"]}


def test_default_is_imagenet(served: tuple[TestClient, Path], photos: dict[str, Image.Image]) -> None:
    client, _ = served
    for url in ("/v1/classify", "/v1/classify?classifier=imagenet"):
        body = client.post(url, files=upload(photos["chelsea"])).json()
        assert body["classifier"] == "imagenet" and body["predictions"][0]["class_index"] in (281, 282, 285)
        assert body["neighbours"] is None


def test_a_head_of_another_embedder_is_refused(
    served: tuple[TestClient, Path],
    head_files: dict[str, bytes],
    photos: dict[str, Image.Image],
    lite0: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, root = served
    other = lite0.variant(layer="head", pooling="gem").fingerprint  # the server embeds at "penultimate"
    _save(root, "other-layer", other, {"linear.npz": b"never read"})
    with caplog.at_level(logging.WARNING, logger="deepfeat.classifiers"):
        listing = client.get("/v1/classifiers").json()
    assert "other-layer" not in {c["name"] for c in listing["classifiers"]}
    refused = {r["name"]: r for r in listing["refused"]}
    assert refused["other-layer"]["code"] == "incompatible_classifier"
    assert 'layer: head="head" server="penultimate"' in refused["other-layer"]["detail"]
    assert any(
        "other-layer" in r.getMessage() and "incompatible_classifier" in r.getMessage()
        for r in caplog.records
    )
    body = _error(
        client.post("/v1/classify?classifier=other-layer", files=upload(photos["chelsea"])),
        409,
        "incompatible_classifier",
    )
    assert "retrain" in body["detail"]
    shutil.rmtree(root / "other-layer")


def test_unknown_and_corrupt_heads(
    served: tuple[TestClient, Path], head_files: dict[str, bytes], photos: dict[str, Image.Image], lite0: Any
) -> None:
    client, root = served
    for name in ("nope", "..%2F..%2Fetc", "knn2", "a" * 64):
        _error(
            client.post(f"/v1/classify?classifier={name}", files=upload(photos["chelsea"])),
            404,
            "unknown_classifier",
        )
    _error(
        client.post("/v1/classify?classifier=" + "a" * 65, files=upload(photos["chelsea"])),
        422,
        "invalid_request",
    )

    path = _save(root, "broken", lite0.fingerprint, head_files)
    (path / "linear.npz").write_bytes(b"flipped bits")
    refused = {r["name"]: r for r in client.get("/v1/classifiers").json()["refused"]}
    assert refused["broken"]["code"] == "corrupt_classifier" and "checksum" in refused["broken"]["detail"]
    _error(
        client.post("/v1/classify?classifier=broken", files=upload(photos["chelsea"])),
        503,
        "corrupt_classifier",
    )
    # Fixed in place (a new save): picked up again.
    _save(root, "broken", lite0.fingerprint, head_files, overwrite=True)
    assert client.post("/v1/classify?classifier=broken", files=upload(photos["chelsea"])).status_code == 200
    (root / "junk").mkdir()  # a folder that is no head at all
    refused = {r["name"]: r["code"] for r in client.get("/v1/classifiers").json()["refused"]}
    assert refused.get("junk") == "corrupt_classifier"
    shutil.rmtree(root / "junk")
    shutil.rmtree(root / "broken")


def test_knn_votes_among_labelled_images(
    served: tuple[TestClient, Path], photos: dict[str, Image.Image]
) -> None:
    client, _ = served
    _error(client.post("/v1/classify?classifier=knn", files=upload(photos["chelsea"])), 422, "no_labels")
    data = augmented_classes(photos, train=3, test=1)
    for name in ("cat", "espresso", "rocket"):
        for i, img in enumerate(data[name][0]):
            resp = client.post(
                "/v1/images",
                files=upload(img),
                data={"source": f"{name}-{i}", "metadata": json.dumps({"label": name})},
            )
            assert resp.status_code == 201, resp.text
    client.post("/v1/images", files=upload(photos["motorcycle"]), data={"metadata": json.dumps({"label": 3})})

    knn = next(c for c in client.get("/v1/classifiers").json()["classifiers"] if c["name"] == "knn")
    assert knn["classes"] == ["cat", "espresso", "rocket"] and knn["metrics"]["labelled_images"] == 9

    body = client.post("/v1/classify?classifier=knn&k=3", files=upload(data["cat"][1][0])).json()
    assert body["classifier"] == "knn" and body["predictions"][0]["label"] == "cat"
    assert body["predictions"][0]["class_index"] == -1
    assert sum(p["probability"] for p in body["predictions"]) == pytest.approx(1.0, abs=1e-6)
    voters = body["neighbours"]
    assert len(voters) == 9 and {v["label"] for v in voters} == {"cat", "espresso", "rocket"}
    assert voters[0]["label"] == "cat" and voters[0]["thumbnail_url"].startswith("/v1/images/")
    assert [v["score"] for v in voters] == sorted((v["score"] for v in voters), reverse=True)


def test_a_fine_tuned_head_is_served(
    served: tuple[TestClient, Path], photos: dict[str, Image.Image], lite0: Any
) -> None:
    """Epoch 0 (the linear-probe initialisation only) keeps this fast; the network path is the same."""
    client, root = served
    data = augmented_classes(photos, train=3, test=1)
    images = data["cat"][0] + data["rocket"][0]
    net, log = fine_tune(
        lite0.spec,
        lite0.backbone,
        images,
        [0] * 3 + [1] * 3,
        ("cat", "rocket"),
        config=FineTuneConfig(epochs=0),
    )
    manifest = manifest_for("ft", lite0.fingerprint, method="finetune", classes=("cat", "rocket"))
    save_head(root, manifest, {"finetune.pt": finetune_bytes(finetune_state(net, log.extra["unfrozen"]))})
    listed = {c["name"]: c for c in client.get("/v1/classifiers").json()["classifiers"]}
    assert listed["ft"]["kind"] == "finetune" and listed["ft"]["classes"] == ["cat", "rocket"]
    for photo, label in (("chelsea", "cat"), ("rocket", "rocket")):
        body = client.post("/v1/classify?classifier=ft", files=upload(photos[photo])).json()
        assert body["predictions"][0]["label"] == label
    assert np.isclose(sum(p["probability"] for p in body["predictions"]), 1.0)


# --- the web page's picker, in a real Chromium ---------------------------------------------------------


@pytest.mark.browser
def test_web_page_picks_the_classifier(
    page: Any,  # noqa: F811
    tmp_path: Path,
    head_files: dict[str, bytes],
    photos: dict[str, Image.Image],
    lite0: Any,
) -> None:
    from playwright.sync_api import expect

    from deepfeat.settings import Settings
    from tests.app.conftest import FAST
    from tests.app.live import live_server
    from tests.conftest import jpeg_bytes

    data_dir = tmp_path / "data"
    root = data_dir / CLASSIFIERS_DIR
    _save(root, "pets", lite0.fingerprint, head_files)
    query = tmp_path / "cat.jpg"
    query.write_bytes(jpeg_bytes(photos["chelsea"]))
    with live_server(Settings(data_dir=data_dir, **FAST)) as base:
        page.goto(base + "/")
        picker = page.get_by_test_id("classifier-select")
        expect(picker.locator("option")).to_have_count(3)
        expect(picker.locator("option[value=pets]")).to_contain_text(
            "pets (linear, 4 classes, 100% held-out)"
        )

        page.get_by_test_id("file-input").set_input_files(str(query))
        classes = page.get_by_test_id("classes-list")
        expect(classes.get_by_test_id("class-item")).to_have_count(5)  # ImageNet by default
        picker.select_option("pets")
        expect(classes.get_by_test_id("class-item")).to_have_count(4)
        expect(classes.get_by_test_id("class-label").first).to_have_text(re.compile("^cat$", re.IGNORECASE))
        expect(page.get_by_test_id("classifier-help")).to_have_text("Classes: cat, espresso, person, rocket.")

        picker.select_option("knn")  # no labelled images in this store: the error is shown, not swallowed
        expect(page.get_by_test_id("error")).to_contain_text("no_labels")

        _save(root, "pets2", lite0.fingerprint, head_files)  # trained while the page is open
        picker.focus()
        expect(picker.locator("option[value=pets2]")).to_have_count(1)
