"""An :class:`EmbedderConfig` resolved against the model registry: the concrete layer and pooling,
and the fingerprint a store records and compares. Loads the registry, never torch or weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deepfeat.models.config import (
    GEM_LOGITS_PENULTIMATE,
    POOLINGS,
    SEMANTIC_AUTO,
    SEMANTIC_GEM_P,
    SEMANTIC_PENULTIMATE_WEIGHT,
    EmbedderConfig,
)
from deepfeat.models.errors import UnknownLayerError, UnknownPoolingError
from deepfeat.models.registry import LayerSpec, ModelSpec, get_model

__all__ = [
    "FINGERPRINT_VERSION",
    "SemanticSpec",
    "fingerprint_of",
    "resolve",
    "resolve_pooling",
    "resolve_semantic",
    "semantic_choices",
]

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


@dataclass(frozen=True)
class SemanticSpec:
    """What answers ``similarity=semantic``: a vector layer read as it is, or (``linear`` set) the
    ``gem-logits+penultimate`` vector computed from the model's last conv map.

    Either way one layer of the forward pass is read (``source``), at every scale; the vector is made
    of parts, each L2-normalised per scale, summed over the scales, re-normalised, then weighted and
    concatenated, and the whole L2-normalised. A vector layer is one part of weight 1.
    """

    name: str
    """What the config and the fingerprint record (the layer name, or ``gem-logits+penultimate``)."""
    dim: int
    source: LayerSpec
    """The layer the forward pass reads: the vector layer, or the conv map the classifier pools."""
    linear: str | None = None
    """The classifier's Linear module (``gem-logits+penultimate`` only)."""
    gem_p: float = SEMANTIC_GEM_P
    penultimate_weight: float = SEMANTIC_PENULTIMATE_WEIGHT

    def fingerprint(self) -> dict[str, Any]:
        """The fingerprint's ``"semantic"`` entry. A vector layer records its name and dimension
        only, as stores have since semantic vectors exist; the composite adds the constants that
        define it, so changing one of them makes a store refuse the new vectors."""
        entry: dict[str, Any] = {"layer": self.name, "dim": self.dim}
        if self.linear is not None:
            entry.update(gem_p=self.gem_p, penultimate_weight=self.penultimate_weight)
        return entry


def semantic_choices(spec: ModelSpec) -> str:
    """The ``semantic_layer`` values this model takes, for error messages."""
    vectors = [s.name for s in spec.layers if s.kind == "vector"]
    if spec.head is not None:
        vectors.insert(0, GEM_LOGITS_PENULTIMATE)
    return ", ".join(vectors) + f", {SEMANTIC_AUTO}, or none"


def resolve_semantic(spec: ModelSpec, layer: str | None) -> SemanticSpec | None:
    """What answers ``similarity=semantic``, or None when off.

    ``auto`` is ``gem-logits+penultimate`` where the model's classifier allows it, else the logits
    (position 0). ``gem-logits+penultimate`` needs a classifier that is pooling -> one Linear
    (:attr:`ModelSpec.head`). ``penultimate`` on a model without a layer of that name (VGG16) is the
    vector layer just below the logits (position 1, ``fc7``).

    Raises:
        UnknownLayerError: not a layer of the model, a conv layer, or ``gem-logits+penultimate`` on a
            model whose classifier has another shape (the message lists the choices).
    """
    if layer is None:
        return None
    if layer == SEMANTIC_AUTO:
        layer = GEM_LOGITS_PENULTIMATE if spec.head is not None else spec.layers[0].name
    choices = semantic_choices(spec)
    if layer == GEM_LOGITS_PENULTIMATE:
        if spec.head is None:
            raise UnknownLayerError(
                f"semantic layer {layer!r} needs a classifier that is global pooling then one Linear "
                f"layer, and {spec.name}'s is not; choose one of: {choices}"
            )
        source = spec.get_layer(spec.head.map_layer)
        classes = spec.layers[0].dim  # position 0 is the logits, the Linear's output
        return SemanticSpec(
            name=GEM_LOGITS_PENULTIMATE, dim=classes + source.dim, source=source, linear=spec.head.linear
        )
    names = {s.name for s in spec.layers}
    if layer == "penultimate" and layer not in names and len(spec.layers) > 1:
        layer = "1"
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
    return SemanticSpec(name=found.name, dim=found.dim, source=found)


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
        stored["semantic"] = semantic.fingerprint()
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
