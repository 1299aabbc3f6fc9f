"""Build a trunk that stops at the chosen layer(s).

torchvision's FX feature extraction prunes everything after the requested nodes, so an embedding
taken from an early block does not pay for the rest of the network, and one trunk can return the
embedding layer and the logits from a single forward pass (embed + classify one upload).
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.models.feature_extraction import create_feature_extractor

__all__ = ["build_trunk", "fold_batch_norms"]


def build_trunk(model: nn.Module, outputs: dict[str, str]) -> nn.Module:
    """A module whose forward returns ``{output_name: tensor}`` for each ``{node: output_name}``.

    The returned GraphModule shares parameters with ``model`` (no copy), so several trunks over one
    backbone cost no extra weight memory.

    Args:
        model: the full network, already in eval mode with its weights loaded.
        outputs: fx node or module names mapped to the names of the returned tensors.
    Returns:
        The pruned trunk, in eval mode.
    """
    trunk = create_feature_extractor(model, return_nodes=outputs)
    return trunk.eval()


# Uses of a conv's output that read its shape only: timm's norm layers assert ``x.ndim == 4``.
_SHAPE_READS = frozenset({"ndim", "shape", "dtype", "device"})


class _Norm(NamedTuple):
    source: fx.Node
    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def _batch_norm_of(trunk: fx.GraphModule, node: fx.Node) -> _Norm | None:
    """The inference batch norm ``node`` is, as a module (torchvision) or as the functional call
    timm's norm-act layers trace to, with the node it normalises; None for anything else."""
    if node.op == "call_module":
        module = trunk.get_submodule(str(node.target))
        source = node.args[0] if node.args else None
        if type(module) is not nn.BatchNorm2d or module.training or not isinstance(source, fx.Node):
            return None
        mean, var = module.running_mean, module.running_var
        if mean is None or var is None:
            return None
        return _Norm(source, mean, var, module.weight, module.bias, module.eps)
    if node.op != "call_function" or node.target is not nn.functional.batch_norm:
        return None
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    args: dict[str, Any] = {**dict(zip(names, node.args, strict=False)), **node.kwargs}
    source, eps = args.get("input"), args.get("eps", 1e-5)
    if args.get("training", False) or not isinstance(source, fx.Node) or not isinstance(eps, float):
        return None
    tensors: dict[str, torch.Tensor | None] = {}
    for name in ("running_mean", "running_var", "weight", "bias"):
        arg = args.get(name)
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            owner, _, attr = str(arg.target).rpartition(".")
            value = getattr(trunk.get_submodule(owner) if owner else trunk, attr)
            tensors[name] = value if isinstance(value, torch.Tensor) else None
        elif arg is None:
            tensors[name] = None
        else:
            return None
    mean, var = tensors["running_mean"], tensors["running_var"]
    if mean is None or var is None:
        return None
    return _Norm(source, mean, var, tensors["weight"], tensors["bias"], eps)


def fold_batch_norms(trunk: nn.Module, folded: dict[int, nn.Conv2d] | None = None) -> nn.Module:
    """Fold every inference batch norm that directly follows a convolution into that convolution.

    Eager PyTorch runs a batch norm as its own pass over the conv's output; at inference it is an
    affine map per channel, so it belongs in the conv's weights. On lite0 the separate passes took a
    quarter of the forward time. The backbone the trunk was traced from keeps its batch norms (it is
    what fine-tuning copies): the folded convs are new modules set in the trunk only.

    Args:
        trunk: a ``build_trunk`` GraphModule in eval mode; changed in place and returned.
        folded: folded convs by ``id`` of the original, shared between the trunks of one backbone so
            that they hold one folded copy of the weights between them.
    """
    if not isinstance(trunk, fx.GraphModule):
        return trunk
    folded = {} if folded is None else folded
    changed = False
    for node in list(trunk.graph.nodes):
        found = _batch_norm_of(trunk, node)
        if found is None:
            continue
        source = found.source
        if source.op != "call_module":
            continue
        conv = trunk.get_submodule(str(source.target))
        if type(conv) is not nn.Conv2d:
            continue
        other_uses = [u for u in source.users if u is not node]
        if any(u.op != "call_function" or u.target is not getattr or u.args[1] not in _SHAPE_READS
               for u in other_uses):  # fmt: skip
            continue  # the un-normalised output is read elsewhere: keep it
        if id(conv) not in folded:
            fused = copy.deepcopy(conv)
            fused.weight, fused.bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, found.mean, found.var, found.eps, found.weight, found.bias
            )
            if conv.weight.is_contiguous(memory_format=torch.channels_last):
                fused.weight.data = fused.weight.data.contiguous(memory_format=torch.channels_last)
            folded[id(conv)] = fused.requires_grad_(False)
        parent, _, name = str(source.target).rpartition(".")
        setattr(trunk.get_submodule(parent) if parent else trunk, name, folded[id(conv)])
        node.replace_all_uses_with(source)
        trunk.graph.erase_node(node)
        changed = True
    if changed:
        # The batch norm modules stay: torchvision's trunk keeps a training graph that still uses them.
        trunk.graph.eliminate_dead_code()
        trunk.recompile()
    return trunk
