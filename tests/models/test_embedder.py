"""The Embedder: real semantics with the bundled lite0 weights, shapes for every model and layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deepfeat.models.embedder import Embedder, resolve_device
from deepfeat.models.errors import InvalidOptionError, UnknownLayerError, UnknownPoolingError
from deepfeat.models.registry import get_model, list_models
from tests.conftest import FAST_EMBEDDER


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
    # One pass through the all-layers trunk against the embedding trunk: the same vectors up to the
    # engine's rounding (OpenVINO runs the two graphs with different kernels), i.e. cosine ~1.
    assert np.einsum("nd,nd->n", vectors, lite0.embed(images)).min() > 0.9999
    assert [p[0].class_index for p in preds] == [p[0].class_index for p in lite0.classify(images, k=3)]


def test_retrieval_defaults_are_the_measured_best(photos: dict[str, Image.Image]) -> None:
    """New stores get the last conv block, GeM, the full image at 512 px and three scales."""
    emb = Embedder("efficientnet_lite0", device="cpu")
    fp = emb.fingerprint
    assert (fp["layer"], fp["pooling"], fp["preprocess"]["mode"], fp["preprocess"]["max_side"]) == (
        "head",
        "gem(p=3)",
        "full",
        512,
    )
    assert fp["scales"] == [1.0, 0.7071, 0.5] and emb.dim == 1280
    assert Embedder("resnet50", weights="none").layer.name == "layer4"
    assert Embedder("vgg16", weights="none").layer.name == "conv5_3"
    v = emb.embed([photos["chelsea"], photos["coffee"]])
    assert v.shape == (2, 1280) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert emb.classify([photos["chelsea"]])[0][0].class_index in (281, 282, 285)


def test_fingerprint_names_what_makes_a_vector(lite0: Embedder) -> None:
    fp = lite0.fingerprint
    assert fp["model"] == "efficientnet_lite0" and fp["layer"] == "penultimate" and fp["pooling"] == "none"
    assert fp["dim"] == 1280 and fp["pretrained"] is True and fp["normalize"] == "l2"
    assert "device" not in fp and "precision" not in fp


@pytest.mark.parametrize("pooling", ["avg", "max", "gem", "rmac"])
def test_conv_layer_poolings(pooling: str, lite0: Embedder, photos: dict[str, Image.Image]) -> None:
    emb = lite0.variant(layer="head", pooling=pooling)
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
    bf16 = Embedder("efficientnet_lite0", device="cpu", precision="bf16", **FAST_EMBEDDER)
    images = list(photos.values())
    cos = np.sum(bf16.embed(images) * lite0.embed(images), axis=1)
    assert cos.min() >= 0.99, cos


def test_channels_last_agrees_with_contiguous(lite0: Embedder, photos: dict[str, Image.Image]) -> None:
    plain = Embedder(
        "efficientnet_lite0", device="cpu", precision="fp32", channels_last=False, **FAST_EMBEDDER
    )
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
    for precision in ("fp32", "auto", "bf16", "fp16"):
        gpu = Embedder("efficientnet_lite0", device="cuda", precision=precision, **FAST_EMBEDDER)
        assert gpu.device.type == "cuda"
        cos = np.sum(gpu.embed(images) * lite0.embed(images), axis=1)
        assert cos.min() >= 0.99, (precision, cos)
        assert gpu.classify([photos["chelsea"]])[0][0].class_index in (281, 282, 285)


@pytest.mark.slow
def test_compiled_trunk_gives_the_eager_embeddings(lite0: Embedder, photos: dict[str, Image.Image]) -> None:
    """torch.compile with weight freezing is a faster forward pass, not another model: the same
    vectors (the fingerprint does not record it) and the same classes. Slow: Inductor compiles C++."""
    compiled = Embedder("efficientnet_lite0", device="cpu", precision="fp32", compile=True, **FAST_EMBEDDER)
    assert compiled.compiled is True and compiled.fingerprint == lite0.fingerprint
    images = list(photos.values())
    cos = np.sum(compiled.embed(images) * lite0.embed(images), axis=1)
    assert cos.min() >= 0.999, cos
    assert compiled.classify([photos["chelsea"]])[0][0].class_index in (281, 282, 285)


@pytest.mark.gpu
def test_compiled_cuda_trunk_matches_cpu(lite0: Embedder, photos: dict[str, Image.Image]) -> None:
    images = list(photos.values())
    gpu = Embedder("efficientnet_lite0", device="cuda", precision="auto", compile=True, **FAST_EMBEDDER)
    cos = np.sum(gpu.embed(images) * lite0.embed(images), axis=1)
    assert cos.min() >= 0.99, cos


def test_variant_shares_the_backbone(lite0: Embedder, photos: dict[str, Image.Image]) -> None:
    head_gem = lite0.variant(layer="head", pooling="gem")
    assert head_gem._net is lite0._net and head_gem.layer.name == "head" and head_gem.pooling == "gem"
    direct = Embedder(
        "efficientnet_lite0",
        layer="head",
        pooling="gem",
        device="cpu",
        precision="fp32",  # as lite0: auto is bf16 on a CPU with native bf16
        resize_mode="crop",
        scales=(1.0,),
    )
    assert np.allclose(head_gem.embed([photos["coffee"]]), direct.embed([photos["coffee"]]), atol=1e-5)
    assert lite0.layer.name == "penultimate"  # the original is untouched
    with pytest.raises(UnknownPoolingError):
        lite0.variant(layer="logits", pooling="max")


def test_full_image_transform_keeps_the_aspect_ratio(lite0: Embedder) -> None:
    from deepfeat.models.embedder import FullImageTransform

    tf = FullImageTransform(lite0.spec.preprocess, 512)
    assert tf.size_for(4000, 3000) == (384, 512)  # 4:3 landscape -> 512 x 384
    assert tf.size_for(3000, 4000) == (512, 384)  # portrait
    assert tf.size_for(451, 300) == (352, 512)  # 340.5 rounds to the nearest multiple of 32
    assert tf.size_for(5000, 100) == (32, 512)  # never below 32
    assert tuple(tf(Image.new("RGB", (640, 427))).shape) == (3, 352, 512)


def test_full_mode_batches_mixed_sizes_and_matches_single(photos: dict[str, Image.Image]) -> None:
    emb = Embedder(
        "efficientnet_lite0", layer="head", pooling="gem", resize_mode="full", max_side=320, device="cpu"
    )
    images = list(photos.values())  # several aspect ratios
    batch = emb.embed(images)
    single = np.concatenate([emb.embed([img]) for img in images])
    assert batch.shape == (len(images), 1280) and np.min(np.sum(batch * single, axis=1)) >= 0.999
    assert (
        emb.fingerprint["preprocess"]["mode"] == "full" and emb.fingerprint["preprocess"]["max_side"] == 320
    )
    assert emb.decode_size == (320, 320)


def test_full_mode_sees_the_border_a_crop_drops(photos: dict[str, Image.Image]) -> None:
    """A wide panorama: its left and right thirds are outside the centre crop but not the full image."""
    left, right = photos["coffee"].resize((300, 300)), photos["rocket"].resize((300, 300))
    middle = Image.new("RGB", (300, 300), (128, 128, 128))
    pano = Image.new("RGB", (900, 300))
    for i, part in enumerate((left, middle, right)):
        pano.paste(part, (300 * i, 0))
    crop = Embedder("efficientnet_lite0", layer="head", device="cpu", resize_mode="crop", scales=(1.0,))
    full = crop.variant(resize_mode="full", max_side=448)
    gray = Image.new("RGB", (300, 300), (128, 128, 128))
    # Compared with a plain grey image, the crop sees mostly grey; the full image sees coffee and rocket.
    assert (full.embed([pano]) @ full.embed([gray]).T).item() < (
        crop.embed([pano]) @ crop.embed([gray]).T
    ).item()


def test_multi_scale(lite0: Embedder, photos: dict[str, Image.Image]) -> None:
    ms = lite0.variant(layer="head", pooling="gem", scales=(1.0, 0.7071))
    v = ms.embed([photos["chelsea"], photos["rocket"]])
    assert v.shape == (2, 1280) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    one = lite0.variant(layer="head", pooling="gem")
    assert not np.allclose(v, one.embed([photos["chelsea"], photos["rocket"]]))
    assert ms.fingerprint["scales"] == [1.0, 0.7071] and one.fingerprint["scales"] == [1.0]
    # classification is unaffected by the embedding's preprocessing
    assert (
        ms.classify([photos["chelsea"]])[0][0].class_index
        == lite0.classify([photos["chelsea"]])[0][0].class_index
    )


def test_resize_option_errors(lite0: Embedder) -> None:
    with pytest.raises(InvalidOptionError, match="resize mode"):
        lite0.variant(resize_mode="stretch")
    with pytest.raises(InvalidOptionError, match="max_side"):
        lite0.variant(resize_mode="full", max_side=10)
    with pytest.raises(InvalidOptionError, match="scales"):
        lite0.variant(scales=())
    with pytest.raises(InvalidOptionError, match="scales"):
        lite0.variant(scales=(1.0, 5.0))


def test_auto_precision_uses_bf16_only_with_native_support() -> None:
    from deepfeat.models.embedder import _resolve_precision, cpu_has_native_bf16

    expected = torch.bfloat16 if cpu_has_native_bf16() else None
    assert _resolve_precision("auto", torch.device("cpu")) == expected
    assert _resolve_precision("fp32", torch.device("cpu")) is None
