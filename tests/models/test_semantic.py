"""Semantic vectors: the vector layer read in the same forward pass as the visual descriptor, and how
``semantic_layer`` resolves (vector layers only; absent from old stores' configs and fingerprints)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deepfeat.models.config import EmbedderConfig
from deepfeat.models.embedder import Embedder
from deepfeat.models.errors import InvalidOptionError, UnknownLayerError
from deepfeat.models.identity import resolve


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
    with pytest.raises(UnknownLayerError, match="logits, penultimate, or none"):
        resolve(EmbedderConfig(semantic_layer=layer))


def test_semantic_layer_resolution_and_fingerprint() -> None:
    assert resolve(EmbedderConfig()).semantic_layer == "logits"  # chosen on the tuning parts
    assert resolve(EmbedderConfig(semantic_layer="penultimate")).semantic_layer == "penultimate"
    assert resolve(EmbedderConfig(semantic_layer="0")).semantic_layer == "logits"
    assert resolve(EmbedderConfig(semantic_layer="Off")).semantic_layer is None
    # VGG16 has no layer named "penultimate": the vector layer below the logits (fc7) answers.
    assert resolve(EmbedderConfig(model="vgg16", semantic_layer="penultimate")).semantic_layer == "fc7"
    fp = EmbedderConfig().fingerprint()
    assert fp["semantic"] == {"layer": "logits", "dim": 1000}
    assert "semantic" not in EmbedderConfig(semantic_layer=None).fingerprint()


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
    opts = {"layer": "head", "resize_mode": "crop", "scales": (1.0,), "regions": 0}
    own = Embedder("efficientnet_lite0", device="cpu", precision="fp32", **opts)
    assert own._pair is not None and own._trunk(own._pair_nodes()) is own._pair
    shared = lite0.variant(**opts, pooling="gem")  # no pair trunk: served by the all-layers one
    assert shared._pair is None
    images = [photos["rocket"], photos["chelsea"]]
    a = own.embed_tensors(own.preprocess(images), semantic=True)
    b = shared.embed_tensors(shared.preprocess(images), semantic=True)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    np.testing.assert_allclose(a[1], b[1], atol=1e-5)
