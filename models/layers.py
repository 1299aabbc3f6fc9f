"""Build a trunk that stops at the chosen layer(s).

torchvision's FX feature extraction prunes everything after the requested nodes, so an embedding
taken from an early block does not pay for the rest of the network, and one trunk can return the
embedding layer and the logits from a single forward pass (embed + classify one upload).
"""

from __future__ import annotations

from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

__all__ = ["build_trunk"]


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
