"""Trunks: batch norms folded into the convs they follow, the backbone left as it was."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

from deepfeat.models.embedder import Embedder
from deepfeat.models.layers import build_trunk, fold_batch_norms
from deepfeat.models.registry import get_model


def _count_batch_norms(trunk: nn.Module) -> int:
    assert isinstance(trunk, torch.fx.GraphModule)
    nodes = trunk.graph.nodes
    functional = sum(1 for n in nodes if n.op == "call_function" and n.target is nn.functional.batch_norm)
    modules = sum(
        1
        for n in nodes
        if n.op == "call_module" and isinstance(trunk.get_submodule(str(n.target)), nn.BatchNorm2d)
    )
    return functional + modules


def _with_running_stats(net: nn.Module, seed: int) -> nn.Module:
    """Random-init ResNets carry mean 0, variance 1 and unit affine terms, which fold to nothing:
    give every batch norm stats that make folding change the weights."""
    gen = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
            module.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.1)
            module.weight.data.copy_(torch.randn(c, generator=gen))
            module.bias.data.copy_(torch.randn(c, generator=gen) * 0.2)
    return net.eval()


@pytest.mark.parametrize(("model", "weights"), [("efficientnet_lite0", "DEFAULT"), ("resnet18", "none")])
def test_folded_trunks_compute_what_the_batch_norms_did(
    model: str, weights: str, photos: dict[str, Image.Image]
) -> None:
    """lite0's batch norms are traced as functional calls (timm's norm-act layers), ResNet's as
    modules; both fold away, and the folded trunk's maps match the unfolded ones on real photos."""
    spec = get_model(model)
    net = spec.build()
    if weights == "DEFAULT":
        resolved = spec.resolve(weights)
        assert resolved.state_dict is not None
        net.load_state_dict(resolved.state_dict)
    net = _with_running_stats(net, 0) if weights == "none" else net.eval()
    node = spec.layers[-1].node if weights == "none" else spec.get_layer("head").node
    plain, folded = build_trunk(net, {node: node}), build_trunk(net, {node: node})
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batch_norms(folded)
    assert _count_batch_norms(plain) > 0
    assert _count_batch_norms(folded) == 0
    for key, value in net.state_dict().items():  # the backbone keeps its own weights and norms
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    x = torch.stack(
        Embedder(model, weights=weights, device="cpu", resize_mode="crop", backend="torch").preprocess(
            list(photos.values())
        )
    )
    with torch.no_grad():
        expected, got = plain(x)[node], folded(x)[node]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_trunks_of_one_backbone_share_the_folded_weights() -> None:
    spec = get_model("resnet18")
    net = _with_running_stats(spec.build(), 1)
    shared: dict[int, nn.Conv2d] = {}
    first = fold_batch_norms(build_trunk(net, {"layer1": "layer1"}), shared)
    second = fold_batch_norms(build_trunk(net, {"layer2": "layer2"}), shared)
    assert first.get_submodule("conv1") is second.get_submodule("conv1")
    assert first.get_submodule("conv1") is not net.conv1
    assert isinstance(net.bn1, nn.BatchNorm2d)


class _ConvReadTwice(nn.Module):
    """A conv whose raw output is also added to the normalised one: folding would change that read."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_a_conv_whose_output_is_read_elsewhere_keeps_its_batch_norm() -> None:
    net = _with_running_stats(_ConvReadTwice(), 2)
    trunk = fold_batch_norms(build_trunk(net, {"add": "out"}))
    assert _count_batch_norms(trunk) == 1
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(trunk(x)["out"], net(x))


def test_the_embedder_runs_folded_trunks_over_an_unfolded_backbone() -> None:
    # The PyTorch backend asked for: `auto` runs OpenVINO for lite0 on some CPU classes.
    lite0 = Embedder("efficientnet_lite0", device="cpu", backend="torch", resize_mode="crop", scales=(1.0,))
    assert lite0._single is not None
    assert _count_batch_norms(lite0._single) == 0
    assert sum(isinstance(m, nn.BatchNorm2d) for m in lite0.backbone.modules()) == 49
