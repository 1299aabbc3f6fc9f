"""``EmbedderConfig``: every option that changes what a vector is, defined once.

In the spirit of timm's ``pretrained_cfg``: one typed object with its choices and defaults. The
Embedder is built from it, :class:`deepfeat.settings.Settings` takes its fields (so the environment
variables keep their flat names, ``DEEPFEAT_SCALES``), the CLI generates its flags from them, and a
store's manifest records it verbatim, so an existing store is reopened with exactly the options that
made it, without parsing anything back from a fingerprint string.

Importing this module loads neither torch nor the model registry: the CLI builds its flags from it.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_REGIONS",
    "DEFAULT_SCALES",
    "DUPLICATE_THRESHOLD",
    "GEM_LOGITS_PENULTIMATE",
    "POOLINGS",
    "RESIZE_MODES",
    "SEMANTIC_AUTO",
    "SEMANTIC_GEM_P",
    "SEMANTIC_PENULTIMATE_WEIGHT",
    "EmbedderConfig",
    "EmbedderFields",
    "parse_list",
]

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_SCALES = (1.0, 0.7071, 0.5)
DEFAULT_REGIONS = 3
DUPLICATE_THRESHOLD = 0.82
"""``deepfeat duplicates``' default: chosen by ``deepfeat eval duplicates`` between the scores of true
copies (JPEG re-saves, small copies) and of distinct photos at the retrieval defaults (docs/quality.md)."""
Pooling = Literal["avg", "max", "gem", "rmac", "none"]
POOLINGS = ("avg", "max", "gem", "rmac")
"""Poolings for conv layers (``none`` is what a vector layer records); models/pooling.py implements
them, and a test holds the two lists together."""
ResizeMode = Literal["crop", "full"]
RESIZE_MODES = ("crop", "full")
GEM_LOGITS_PENULTIMATE = "gem-logits+penultimate"
"""The semantic vector ``auto`` picks for models whose classifier is pooling -> one Linear: the class
scores of the GeM-pooled last conv map beside its average pooling (the penultimate vector), each summed
over the scales, the second weighted by ``SEMANTIC_PENULTIMATE_WEIGHT``. It ranked first of 224
semantic configurations on the category collections' tuning parts (docs/quality.md)."""
SEMANTIC_AUTO = "auto"
"""The default ``semantic_layer``: ``gem-logits+penultimate`` where the model's classifier allows it,
else the logits (VGG16). Like ``layer=None``, it is resolved against the model, and a store's manifest
records what it resolved to."""
SEMANTIC_GEM_P = 3.0
"""The GeM power of ``gem-logits+penultimate``: part of what the vector is (recorded in the
fingerprint), independent of the visual descriptor's ``gem_p``."""
SEMANTIC_PENULTIMATE_WEIGHT = 1.25
"""The weight of the penultimate part of ``gem-logits+penultimate`` against the class scores."""


def parse_list(value: Any) -> Any:
    """``"1,0.7071,0.5"`` or ``"[1, 0.7071, 0.5]"`` -> a list: the environment and the command line
    take the same syntax. Anything else passes through to the field's own validation."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                return value
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class EmbedderFields(BaseModel):
    """The fields, their types, choices and defaults (shared by :class:`EmbedderConfig` and Settings).

    The defaults are the retrieval defaults: the last conv block of EfficientNet-Lite0 (its ``head``),
    GeM-pooled, on the whole image at 512 px and at three scales, each image stored with a 3 x 3 grid
    of regional descriptors besides its global one.
    """

    model: str = Field(DEFAULT_MODEL, description="Model name (`deepfeat models` lists them)")
    weights: str = Field("DEFAULT", description="DEFAULT, a weights enum name, a checkpoint path, or none")
    layer: str | None = Field(
        None,
        description="Embedding layer: a name or its position k from the top (0 = logits); "
        "default: the model's last conv block",
    )
    pooling: Pooling | None = Field(
        None, description="avg, max, gem or rmac for conv layers (default gem); vector layers take none"
    )
    gem_p: float = Field(3.0, gt=0, le=100, description="GeM power")
    resize_mode: ResizeMode = Field(
        "full", description="full (whole image, aspect kept) or crop (resize + centre crop)"
    )
    max_side: int = Field(512, ge=64, le=4096, description="Longest side in full resize mode")
    scales: tuple[float, ...] = Field(
        DEFAULT_SCALES,
        min_length=1,
        max_length=8,
        description="Multi-scale factors; descriptors are summed over them and re-normalised",
    )

    regions: int = Field(
        DEFAULT_REGIONS,
        ge=0,
        le=7,
        description="Store a g x g grid of overlapping regional descriptors per image besides the "
        "global one (windows of 2/(g+1) of each side), so crops of an indexed image are found; "
        "0 = one vector per image. Conv layers only; searches are unchanged",
    )

    lowpass: float = Field(
        0.01,
        ge=0,
        le=0.1,
        description="Also store a vector of the whole image blurred (Gaussian, sigma = this fraction of "
        "its short side) at half scale, so blurred and low-resolution copies are found; 0 = off",
    )
    semantic_layer: str | None = Field(
        SEMANTIC_AUTO,
        description="The vector that answers similarity=semantic searches, computed in the same "
        "forward pass as the visual vector and stored beside it: gem-logits+penultimate (the "
        "classifier applied to the GeM-pooled last conv map, beside its average pooling; for models "
        "whose classifier is pooling then one Linear layer), or a vector layer (logits, "
        "penultimate); auto = gem-logits+penultimate where the model allows it, else logits; "
        "none = off",
    )

    @field_validator("semantic_layer", mode="before")
    @classmethod
    def _semantic_off(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("", "none", "off"):
            return None
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("regions")
    @classmethod
    def _regions_grid(cls, value: int) -> int:
        if value == 1:
            raise ValueError(
                "regions must be 0 (off) or a grid size from 2 to 7; 1 would repeat the global vector"
            )
        return value

    @field_validator("layer", mode="before")
    @classmethod
    def _layer_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("scales", mode="before")
    @classmethod
    def _scales_list(cls, value: Any) -> Any:
        return parse_list(value)

    @field_validator("scales")
    @classmethod
    def _scales_range(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        bad = [x for x in value if not 0.1 <= x <= 2.0]
        if bad:
            raise ValueError(f"every scale must be in [0.1, 2], got {list(value)}")
        return value


class EmbedderConfig(EmbedderFields):
    """What a vector is. ``Embedder(config)`` builds it; ``Embedder.config`` is the resolved copy
    (layer and pooling named), which is what a store's manifest records."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def fingerprint(self) -> dict[str, Any]:
        """What makes two vectors comparable: these options resolved against the model registry
        (weights identity, layer name, dimension, the preprocessing that travels with the weights).
        Loads the registry (and so torch), but no weights.

        Raises:
            ModelError subclasses for an unknown model, layer, pooling or weights.
        """
        from deepfeat.models.identity import fingerprint_of

        return fingerprint_of(self)

    def merged(self, *, explicit: dict[str, Any], stored: EmbedderConfig | None) -> EmbedderConfig:
        """The options to run with, decided in one place: what the user set explicitly wins, else
        what an existing store recorded, else this config's values (the defaults).

        A store's pooling is only kept while the model and layer are the store's: asked for another
        network or layer, the store's pooling may not even apply, and the store then refuses the
        mismatch by name instead of the user meeting a pooling/layer error.
        """
        values = self.model_dump()
        if stored is not None:
            inherited = stored.model_dump()
            if "model" in explicit or "layer" in explicit:
                inherited.pop("pooling")
                inherited.pop("gem_p")
            values.update(inherited)
        values.update(explicit)
        return EmbedderConfig.model_validate(values)

    @classmethod
    def from_manifest(cls, recorded: dict[str, Any]) -> EmbedderConfig:
        """The options a store's manifest recorded. An option added since the store was written takes
        the value that reproduces its vectors, not today's default (regional descriptors: none; no
        semantic vectors)."""
        return cls.model_validate({"regions": 0, "lowpass": 0.0, "semantic_layer": None, **recorded})

    @classmethod
    def from_fingerprint(cls, fingerprint: dict[str, Any]) -> EmbedderConfig:
        """The options of a store written before manifests recorded them (deepfeat 0.1), read from
        its fingerprint. Only the migration of such stores uses this; a writer then records the
        config in the manifest. A checkpoint file's path was never recorded: ``weights`` then stays
        the default and the fingerprint check asks the user for ``--weights``."""
        values: dict[str, Any] = {"model": fingerprint.get("model", DEFAULT_MODEL)}
        if fingerprint.get("layer") is not None:
            values["layer"] = fingerprint["layer"]
        pooling = str(fingerprint.get("pooling", "none"))
        if pooling.startswith("gem(p="):
            values["pooling"], values["gem_p"] = "gem", float(pooling[len("gem(p=") : -1])
        else:
            values["pooling"] = pooling
        preprocess = fingerprint.get("preprocess") or {}
        if preprocess.get("mode") in RESIZE_MODES:
            values["resize_mode"] = preprocess["mode"]
            if preprocess["mode"] == "full" and preprocess.get("max_side"):
                values["max_side"] = int(preprocess["max_side"])
        if fingerprint.get("scales"):
            values["scales"] = tuple(fingerprint["scales"])
        values["regions"] = int(fingerprint.get("regions", 0))
        values["lowpass"] = float(fingerprint.get("lowpass", 0.0))
        semantic = fingerprint.get("semantic")
        values["semantic_layer"] = semantic.get("layer") if isinstance(semantic, dict) else None
        from deepfeat.models.registry import weights_argument

        weights = weights_argument(str(fingerprint.get("weights", "")))
        if weights is not None:
            values["weights"] = weights
        return cls.model_validate(values)
