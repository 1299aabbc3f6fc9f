"""Semantic vectors: read in the same forward pass as the visual descriptor (a vector layer, or the
default ``gem-logits+penultimate`` computed from the last conv map), and how ``semantic_layer``
resolves (absent from old stores' configs and fingerprints)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from deepfeat.models.config import GEM_LOGITS_PENULTIMATE, EmbedderConfig
from deepfeat.models.embedder import Embedder
from deepfeat.models.errors import InvalidOptionError, UnknownLayerError
from deepfeat.models.identity import resolve

# The retrieval defaults' shape (head, GeM, whole image, three scales) at a small side, to stay fast.
SMALL = {
    "layer": "head",
    "pooling": "gem",
    "resize_mode": "full",
    "max_side": 192,
    "scales": (1.0, 0.7071, 0.5),
}


def _unit_rows(x: np.ndarray) -> None:
    assert x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-4)


def test_semantic_equals_the_penultimate_embedder(lite0: Embedder, photos: dict[str, Image.Image]) -> None:
    """Visual (head, GeM, two scales, regions) and semantic vectors from one pass; the semantic one is
    what an embedder whose own layer is the penultimate one gives with the same preprocessing."""
    opts = {"resize_mode": "full", "max_side": 256, "scales": (1.0, 0.7071)}
    both = lite0.variant(layer="head", pooling="gem", regions=2, semantic_layer="penultimate", **opts)
    plain = lite0.variant(layer="penultimate", **opts)
    assert both.semantic_dim == plain.dim == 1280
    images = [photos["chelsea"], photos["coffee"], photos["rocket"]]
    visual, semantic = both.embed_tensors(both.preprocess(images), regions=True, semantic=True)
    assert visual.shape == (3, both.vectors_per_image, both.dim) and semantic.shape == (3, 1280)
    _unit_rows(semantic)
    reference = plain.embed(images)
    cosines = np.sum(semantic * reference, axis=1)
    assert cosines.min() >= 0.999, cosines
    # The visual vectors are unchanged by asking for the semantic one too.
    alone = both.embed_tensors(both.preprocess(images), regions=True)
    np.testing.assert_allclose(alone, visual, atol=1e-5)
    # The query-side path gives the same semantic vectors, batch or single.
    np.testing.assert_allclose(both.embed(images, similarity="semantic"), semantic, atol=1e-5)
    np.testing.assert_allclose(both.embed_semantic(images[:1]), semantic[:1], atol=1e-5)


def test_semantic_vectors_are_semantic(lite0: Embedder, photos: dict[str, Image.Image]) -> None:
    """The logits layer as the semantic layer: a real photo is nearer itself than others."""
    logits = lite0.variant(semantic_layer="logits")
    assert logits.semantic_dim == 1000
    images = list(photos.values())[:4]
    sem = logits.embed(images, similarity="semantic")
    _unit_rows(sem)
    sims = sem @ sem.T
    assert (np.argmax(sims, axis=1) == np.arange(len(images))).all()


def test_semantic_off(lite0: Embedder, photos: dict[str, Image.Image]) -> None:
    off = lite0.variant(semantic_layer="none")
    assert off.semantic_dim is None and off.config.semantic_layer is None
    assert "semantic" not in off.fingerprint
    with pytest.raises(InvalidOptionError, match="no semantic layer"):
        off.embed([photos["coffee"]], similarity="semantic")
    with pytest.raises(InvalidOptionError, match="visual, semantic"):
        lite0.embed([photos["coffee"]], similarity="colour")


@pytest.mark.parametrize("layer", ["head", "blocks.5", "nope", "7"])
def test_semantic_layer_must_be_a_vector_layer(layer: str) -> None:
    with pytest.raises(
        UnknownLayerError, match="gem-logits\\+penultimate, logits, penultimate, auto, or none"
    ):
        resolve(EmbedderConfig(semantic_layer=layer))


def test_semantic_layer_resolution_and_fingerprint() -> None:
    assert EmbedderConfig().semantic_layer == "auto"
    default = resolve(EmbedderConfig())  # what a manifest records
    assert default.semantic_layer == GEM_LOGITS_PENULTIMATE == "gem-logits+penultimate"  # tuning parts
    assert resolve(default) == default
    assert resolve(EmbedderConfig(semantic_layer="logits")).semantic_layer == "logits"
    assert resolve(EmbedderConfig(semantic_layer="penultimate")).semantic_layer == "penultimate"
    assert resolve(EmbedderConfig(semantic_layer="0")).semantic_layer == "logits"
    assert resolve(EmbedderConfig(semantic_layer="Off")).semantic_layer is None
    # VGG16 has no layer named "penultimate": the vector layer below the logits (fc7) answers.
    assert resolve(EmbedderConfig(model="vgg16", semantic_layer="penultimate")).semantic_layer == "fc7"
    fp = EmbedderConfig().fingerprint()
    # The composite records the constants that define it; a vector layer only its name and dim, as
    # stores written with the logits recorded it.
    assert fp["semantic"] == {
        "layer": "gem-logits+penultimate",
        "dim": 2280,
        "gem_p": 3.0,
        "penultimate_weight": 1.25,
    }
    logits = EmbedderConfig(semantic_layer="logits").fingerprint()
    assert logits["semantic"] == {"layer": "logits", "dim": 1000}
    assert {k: v for k, v in fp.items() if k != "semantic"} == {
        k: v for k, v in logits.items() if k != "semantic"
    }  # the visual identity is the same; only the semantic vector differs
    assert "semantic" not in EmbedderConfig(semantic_layer=None).fingerprint()
    # Its round trip through a pre-manifest store's fingerprint.
    assert EmbedderConfig.from_fingerprint(fp).fingerprint() == fp


@pytest.mark.parametrize(("model", "dim"), [("resnet18", 1000 + 512), ("resnet50", 1000 + 2048)])
def test_gem_logits_penultimate_on_resnets(model: str, dim: int) -> None:
    config = resolve(EmbedderConfig(model=model, weights="none"))
    assert config.semantic_layer == GEM_LOGITS_PENULTIMATE
    assert config.fingerprint()["semantic"]["dim"] == dim


def test_vgg_refuses_gem_logits_penultimate() -> None:
    """VGG's classifier is three Linear layers on the flattened 7 x 7 map: no pooled map to read the
    class scores from. Asked for, it is refused by name with the choices that work; by default (auto)
    VGG's semantic vector is its logits."""
    with pytest.raises(UnknownLayerError) as info:
        resolve(EmbedderConfig(model="vgg16", weights="none", semantic_layer=GEM_LOGITS_PENULTIMATE))
    message = str(info.value)
    assert "'gem-logits+penultimate'" in message and "vgg16" in message and "one Linear layer" in message
    assert message.endswith("choose one of: logits, fc7, fc6, auto, or none")
    assert resolve(EmbedderConfig(model="vgg16", weights="none")).semantic_layer == "logits"


def _hand_computed(embedder: Embedder, batch: torch.Tensor) -> np.ndarray:
    """``gem-logits+penultimate`` from ``forward_intermediates`` and the model's Linear, written out:
    per scale, the Linear on the GeM (p = 3) pooled head map and the head map's mean, each L2-normalised;
    each summed over the scales and re-normalised; the second weighted 1.25; concatenated; L2."""
    linear = embedder.backbone.classifier
    logits, means = [], []
    for scale in embedder.scales:
        head = embedder.forward_intermediates(embedder.rescale(batch, scale), ["head"])["head"]
        gem = head.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
        logits.append(F.normalize(gem @ linear.weight.T + linear.bias, dim=1))
        means.append(F.normalize(head.mean(dim=(2, 3)), dim=1))
    a = F.normalize(torch.stack(logits).sum(0), dim=1)
    b = F.normalize(torch.stack(means).sum(0), dim=1)
    return F.normalize(torch.cat([a, 1.25 * b], dim=1), dim=1).numpy()


def test_gem_logits_penultimate_vectors(lite0: Embedder, photos: dict[str, Image.Image]) -> None:
    """The default semantic vector: (n, 1000 + 1280), unit norm, what the hand computation gives, the
    same in a batch as alone, and from the same forward passes as the visual vectors (which it leaves
    unchanged)."""
    emb = lite0.variant(**SMALL, regions=2, semantic_layer=GEM_LOGITS_PENULTIMATE)
    assert emb.semantic_dim == 2280 and emb.config.semantic_layer == "gem-logits+penultimate"
    assert emb._pair_nodes() == (emb.layer.node,)  # the head map the visual vector reads: one node
    images = [photos["chelsea"], photos["coffee"], photos["rocket"]]
    tensors = emb.preprocess(images)
    visual, semantic = emb.embed_tensors(tensors, regions=True, semantic=True)
    assert semantic.shape == (3, 2280)
    _unit_rows(semantic)
    # Both parts carry weight: the class scores at 1/sqrt(1 + 1.25^2) of the norm, the mean at the rest.
    np.testing.assert_allclose(np.linalg.norm(semantic[:, :1000], axis=1), 1 / np.hypot(1, 1.25), atol=1e-5)
    for i, tensor in enumerate(tensors):
        np.testing.assert_allclose(semantic[i], _hand_computed(emb, tensor[None])[0], atol=1e-5)
        single = emb.embed_tensors([tensor], semantic=True)[1]
        np.testing.assert_allclose(single[0], semantic[i], atol=1e-5)  # batch = single
    np.testing.assert_allclose(emb.embed_tensors(tensors, regions=True), visual, atol=1e-6)
    np.testing.assert_allclose(emb.embed(images, similarity="semantic"), semantic, atol=1e-5)
    # Semantic: a photo is nearest itself, and it differs from the logits' vector.
    sims = semantic @ semantic.T
    assert (np.argmax(sims, axis=1) == np.arange(3)).all()
    logits = lite0.variant(**SMALL, semantic_layer="logits")
    assert logits.fingerprint != emb.fingerprint and logits.semantic_dim == 1000


def test_gem_logits_penultimate_beside_another_visual_layer(
    lite0: Embedder, photos: dict[str, Image.Image]
) -> None:
    """With the visual vector from another layer, one pass still reads both maps (the pair trunk)."""
    options = {**SMALL, "layer": "blocks.5", "regions": 0, "lowpass": 0.0}
    own = Embedder("efficientnet_lite0", device="cpu", precision="fp32", **options)
    assert own._pair is not None and own._pair_nodes() == ("blocks.5", "bn2")
    tensors = own.preprocess([photos["coffee"], photos["rocket"]])
    semantic = own.embed_tensors(tensors, semantic=True)[1]
    for i, tensor in enumerate(tensors):
        np.testing.assert_allclose(semantic[i], _hand_computed(own, tensor[None])[0], atol=1e-5)


def test_old_configs_and_fingerprints_have_no_semantic_vectors() -> None:
    assert EmbedderConfig.from_manifest({"model": "efficientnet_lite0"}).semantic_layer is None
    assert EmbedderConfig.from_manifest({"semantic_layer": "logits"}).semantic_layer == "logits"
    fp = EmbedderConfig(semantic_layer=None).fingerprint()
    assert EmbedderConfig.from_fingerprint(fp).semantic_layer is None
    fp_on = EmbedderConfig(semantic_layer="logits").fingerprint()
    assert EmbedderConfig.from_fingerprint(fp_on).semantic_layer == "logits"
    # Reading back reproduces the fingerprint in both cases.
    assert EmbedderConfig.from_fingerprint(fp_on).fingerprint() == fp_on


def test_the_pair_trunk_serves_both_layers(lite0: Embedder, photos: dict[str, Image.Image]) -> None:
    """An embedder built with a conv layer and a semantic layer has a trunk pruned to those two nodes
    (compiled with ``compile=True``), and it gives what the all-layers trunk gives."""
    opts = {
        "layer": "head",
        "resize_mode": "crop",
        "scales": (1.0,),
        "regions": 0,
        "semantic_layer": "logits",
    }
    own = Embedder("efficientnet_lite0", device="cpu", precision="fp32", **opts)
    assert own._pair is not None and own._trunk(own._pair_nodes()) is own._pair
    shared = lite0.variant(**opts, pooling="gem")  # no pair trunk: served by the all-layers one
    assert shared._pair is None
    images = [photos["rocket"], photos["chelsea"]]
    a = own.embed_tensors(own.preprocess(images), semantic=True)
    b = shared.embed_tensors(shared.preprocess(images), semantic=True)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    np.testing.assert_allclose(a[1], b[1], atol=1e-5)
