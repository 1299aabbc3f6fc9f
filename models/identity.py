"""An :class:`EmbedderConfig` resolved against the model registry: the concrete layer and pooling,
and the fingerprint a store records and compares. Loads the registry, never torch or weights."""

from __future__ import annotations

from typing import Any

from deepfeat.models.config import POOLINGS, EmbedderConfig
from deepfeat.models.errors import UnknownLayerError, UnknownPoolingError
from deepfeat.models.registry import LayerSpec, ModelSpec, get_model

__all__ = ["FINGERPRINT_VERSION", "fingerprint_of", "resolve", "resolve_pooling", "resolve_semantic"]

FINGERPRINT_VERSION = 1
"""Bumped whenever the meaning of a vector changes for the same model/layer/pooling."""


def resolve_pooling(spec: ModelSpec, layer: LayerSpec, pooling: str | None) -> str:
    """The pooling a layer gets: gem by default on conv maps, ``none`` on vector layers.

    Raises:
        UnknownPoolingError: pooling asked for a vector layer, or an unknown name.
    """
    if layer.kind == "vector":
        if pooling not in (None, "none"):
            conv = ", ".join(s.name for s in spec.layers if s.kind == "conv")
            raise UnknownPoolingError(
                f"layer {layer.name!r} of {spec.name} is already a vector; pooling applies to conv "
                f"layers only (choose one of: {conv}) or omit pooling"
            )
        return "none"
    if pooling is None:
        return "gem"
    if pooling not in POOLINGS:
        raise UnknownPoolingError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}")
    return pooling


def resolve_semantic(spec: ModelSpec, layer: str | None) -> LayerSpec | None:
    """The vector layer that answers ``similarity=semantic``, or None when off.

    ``penultimate`` on a model without a layer of that name (VGG16) is the vector layer just below
    the logits (position 1, ``fc7``).

    Raises:
        UnknownLayerError: not a layer of the model, or a conv layer (the message lists the choices).
    """
    if layer is None:
        return None
    vectors = [s for s in spec.layers if s.kind == "vector"]
    names = {s.name for s in spec.layers}
    if layer == "penultimate" and layer not in names and len(spec.layers) > 1:
        layer = "1"
    choices = ", ".join(s.name for s in vectors) + ", or none"
    try:
        found = spec.get_layer(layer)
    except UnknownLayerError:
        raise UnknownLayerError(
            f"unknown semantic layer {layer!r} for model {spec.name!r}; choose one of: {choices}"
        ) from None
    if found.kind != "vector":
        raise UnknownLayerError(
            f"semantic layer {found.name!r} of {spec.name} is a conv map, not a vector layer; "
            f"choose one of: {choices}"
        )
    return found


def resolve(config: EmbedderConfig) -> EmbedderConfig:
    """The same options with the layer named and the pooling decided (what a manifest records), so a
    store reopens with the same vectors even if a model's default layer changes later.

    Raises:
        UnknownModelError, UnknownLayerError, UnknownPoolingError.
    """
    spec = get_model(config.model)
    layer = spec.get_layer(config.layer)
    pooling = resolve_pooling(spec, layer, config.pooling)
    regions = config.regions if layer.kind == "conv" else 0  # a vector layer has no spatial map
    semantic = resolve_semantic(spec, config.semantic_layer)
    return config.model_copy(
        update={
            "model": spec.name,
            "layer": layer.name,
            "pooling": pooling,
            "regions": regions,
            "semantic_layer": None if semantic is None else semantic.name,
        }
    )


def fingerprint_of(config: EmbedderConfig, *, weights_identity: str | None = None) -> dict[str, Any]:
    """What makes two vectors comparable (see :meth:`EmbedderConfig.fingerprint`). A caller that has
    loaded the weights passes their identity, so a checkpoint file is not hashed again.

    Device, precision and compilation are deliberately absent: they change vectors by far less than
    the distance between different images (tested at cosine >= 0.99), so an index built on a GPU in
    bf16 serves a CPU in fp32.
    """
    spec = get_model(config.model)
    layer = spec.get_layer(config.layer)
    pooling = resolve_pooling(spec, layer, config.pooling)
    pre = spec.preprocess.to_dict()
    if config.resize_mode == "crop":
        preprocess = {"mode": "crop", **pre}
    else:
        preprocess = {"mode": "full", "max_side": config.max_side, **pre, "resize": None, "crop": None}
    identity = spec.identify(config.weights) if weights_identity is None else weights_identity
    regions = config.regions if layer.kind == "conv" else 0
    # Stores written before regional descriptors have no "regions" key: absent means none. Likewise
    # "semantic": absent in stores written before semantic vectors, and when they are off.
    stored: dict[str, Any] = {"regions": regions} if regions else {}
    if config.lowpass:
        stored["lowpass"] = float(config.lowpass)
    semantic = resolve_semantic(spec, config.semantic_layer)
    if semantic is not None:
        stored["semantic"] = {"layer": semantic.name, "dim": semantic.dim}
    return {
        "version": FINGERPRINT_VERSION,
        "model": spec.name,
        "weights": identity,
        "pretrained": not identity.startswith("none("),
        "layer": layer.name,
        "pooling": f"gem(p={config.gem_p:g})" if pooling == "gem" else pooling,
        "dim": layer.dim,
        "preprocess": preprocess,
        "scales": [float(x) for x in config.scales],
        "normalize": "l2",
        **stored,
    }
