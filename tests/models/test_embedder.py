"""The Embedder: real semantics with the bundled lite0 weights, shapes for every model and layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.embedder import Embedder, resolve_device
from models.errors import InvalidOptionError, UnknownLayerError, UnknownPoolingError
from models.registry import get_model, list_models


def test_lite0_classifies_real_photos(lite0: Embedder, photos: dict[str, Image.Image]) -> None:
    cat, coffee = lite0.classify([photos["chelsea"], photos["coffee"]], k=5)
    assert cat[0].class_index in (281, 282, 285), cat[0]
    assert coffee[0].class_index in (967, 968), coffee[0]
    assert cat[0].label == lite0.categories[cat[0].class_index]
    probs = [p.probability for p in cat]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6


def test_vectors_are_unit_float32(lite0: Embedder, photos: dict[str, Image.Image]) -> None:
    vectors = lite0.embed(list(photos.values()))
    assert vectors.dtype == np.float32 and vectors.shape == (len(photos), lite0.dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_batch_equals_single(lite0: Embedder, photos: dict[str, Image.Image]) -> None:
    images = list(photos.values())
    batch = lite0.embed(images)
    single = np.concatenate([lite0.embed([img]) for img in images])
    assert np.min(np.sum(batch * single, axis=1)) >= 0.999


def test_deterministic(lite0: Embedder, photos: dict[str, Image.Image]) -> None:
    a = lite0.embed([photos["rocket"]])
    b = lite0.embed([photos["rocket"]])
    assert np.array_equal(a, b)


def test_similar_content_is_closer(lite0: Embedder, photos: dict[str, Image.Image]) -> None:
    """A re-encoded, resized copy is far closer to its original than any other photo is."""
    chelsea_small = photos["chelsea"].resize((200, 133))
    q = lite0.embed([chelsea_small])[0]
    db = lite0.embed(list(photos.values()))
    scores = db @ q
    assert list(photos)[int(np.argmax(scores))] == "chelsea"
    assert scores.max() > 0.9


def test_embed_and_classify_in_one_pass(lite0: Embedder, photos: dict[str, Image.Image]) -> None:
    images = [photos["chelsea"], photos["coffee"]]
    vectors, preds = lite0.embed_and_classify(images, k=3)
    assert np.allclose(vectors, lite0.embed(images), atol=1e-5)
    assert [p[0].class_index for p in preds] == [p[0].class_index for p in lite0.classify(images, k=3)]


def test_fingerprint_names_what_makes_a_vector(lite0: Embedder) -> None:
    fp = lite0.fingerprint
    assert fp["model"] == "efficientnet_lite0" and fp["layer"] == "penultimate" and fp["pooling"] == "none"
    assert fp["dim"] == 1280 and fp["pretrained"] is True and fp["normalize"] == "l2"
    assert "device" not in fp and "precision" not in fp


@pytest.mark.parametrize("pooling", ["avg", "max", "gem", "rmac"])
def test_conv_layer_poolings(pooling: str, photos: dict[str, Image.Image]) -> None:
    emb = Embedder("efficientnet_lite0", layer="head", pooling=pooling, device="cpu")
    v = emb.embed([photos["chelsea"], photos["coffee"]])
    assert v.shape == (2, 1280) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert emb.fingerprint["pooling"] == ("gem(p=3)" if pooling == "gem" else pooling)


def _layer_cases() -> list[tuple[str, int]]:
    cases = []
    for name in list_models():
        n = len(get_model(name).layers)
        cases += [(name, 0), (name, 1), (name, 2), (name, n - 1)]
    return cases


@pytest.mark.parametrize(("name", "k"), _layer_cases())
def test_every_model_and_layer_gives_the_documented_dim(
    name: str, k: int, photos: dict[str, Image.Image]
) -> None:
    """Random init (no weights here for torchvision): structure only."""
    emb = Embedder(name, weights="none", layer=k, device="cpu")
    v = emb.embed([photos["chelsea"], photos["rocket"]])
    assert v.shape == (2, get_model(name).layers[k].dim)
    assert np.isfinite(v).all() and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert emb.fingerprint["pretrained"] is False and emb.fingerprint["weights"].startswith("none")


def test_random_init_is_reproducible(photos: dict[str, Image.Image]) -> None:
    a = Embedder("resnet18", weights="none", device="cpu").embed([photos["coffee"]])
    b = Embedder("resnet18", weights="none", device="cpu").embed([photos["coffee"]])
    assert np.array_equal(a, b)


def test_bf16_agrees_with_fp32(lite0: Embedder, photos: dict[str, Image.Image]) -> None:
    bf16 = Embedder("efficientnet_lite0", device="cpu", precision="bf16")
    images = list(photos.values())
    cos = np.sum(bf16.embed(images) * lite0.embed(images), axis=1)
    assert cos.min() >= 0.99, cos


def test_channels_last_agrees_with_contiguous(lite0: Embedder, photos: dict[str, Image.Image]) -> None:
    plain = Embedder("efficientnet_lite0", device="cpu", channels_last=False)
    images = list(photos.values())
    assert np.min(np.sum(plain.embed(images) * lite0.embed(images), axis=1)) >= 0.9999


def test_option_errors_name_the_choices() -> None:
    with pytest.raises(UnknownPoolingError, match="choose one of: avg, max, gem, rmac"):
        Embedder("resnet18", weights="none", layer="layer4", pooling="median")
    with pytest.raises(UnknownPoolingError, match="already a vector"):
        Embedder("resnet18", weights="none", layer="penultimate", pooling="gem")
    with pytest.raises(UnknownLayerError):
        Embedder("resnet18", weights="none", layer="conv9")
    with pytest.raises(InvalidOptionError, match="precision"):
        Embedder("resnet18", weights="none", precision="int4")
    with pytest.raises(InvalidOptionError, match="fp16 is not supported on CPU"):
        Embedder("resnet18", weights="none", device="cpu", precision="fp16")
    with pytest.raises(InvalidOptionError, match="unknown device"):
        resolve_device("tpu:0")


def test_bad_batch_and_k(lite0: Embedder, photos: dict[str, Image.Image]) -> None:
    with pytest.raises(InvalidOptionError, match="no images"):
        lite0.embed([])
    with pytest.raises(InvalidOptionError, match=r"\(n, 3, H, W\)"):
        lite0.embed_tensors(torch.zeros(3, 224, 224))
    with pytest.raises(InvalidOptionError, match="k must be >= 1"):
        lite0.classify([photos["chelsea"]], k=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(InvalidOptionError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.gpu
def test_cuda_path_matches_cpu(lite0: Embedder, photos: dict[str, Image.Image]) -> None:
    images = list(photos.values())
    for precision in ("fp32", "auto"):
        gpu = Embedder("efficientnet_lite0", device="cuda", precision=precision)
        assert gpu.device.type == "cuda"
        cos = np.sum(gpu.embed(images) * lite0.embed(images), axis=1)
        assert cos.min() >= 0.99, (precision, cos)
        assert gpu.classify([photos["chelsea"]])[0][0].class_index in (281, 282, 285)


def test_variant_shares_the_backbone(lite0: Embedder, photos: dict[str, Image.Image]) -> None:
    head_gem = lite0.variant(layer="head", pooling="gem")
    assert head_gem._net is lite0._net and head_gem.layer.name == "head" and head_gem.pooling == "gem"
    direct = Embedder("efficientnet_lite0", layer="head", pooling="gem", device="cpu")
    assert np.allclose(head_gem.embed([photos["coffee"]]), direct.embed([photos["coffee"]]), atol=1e-5)
    assert lite0.layer.name == "penultimate"  # the original is untouched
    with pytest.raises(UnknownPoolingError):
        lite0.variant(layer="logits", pooling="max")
