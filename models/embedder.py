"""The Embedder: images -> L2-normalised float32 vectors, and ImageNet top-k, from one loaded backbone.

It owns every vector semantic (preprocessing that travels with the weights, eval mode, inference mode,
device, precision, pooling, normalisation) so that the store and the service never have to know them;
its ``fingerprint`` is what an index records and compares to refuse mixing incompatible vectors.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import ValidationError
from torchvision.transforms import v2 as T

from deepfeat.models.backends import (
    OpenVinoTrunk,
    adopted,
    cpu_class,
    mixes_with_torch,
    openvino_trunk,
    resolve_backend,
)
from deepfeat.models.config import POOLINGS, RESIZE_MODES, EmbedderConfig
from deepfeat.models.errors import InvalidOptionError, UnknownPoolingError, WeightsUnavailableError
from deepfeat.models.identity import (
    FINGERPRINT_VERSION,
    SemanticSpec,
    fingerprint_of,
    resolve,
    resolve_semantic,
    semantic_choices,
)
from deepfeat.models.layers import build_trunk, fold_batch_norms
from deepfeat.models.pooling import avg_pool, gem_pool, get_pooling, grid_windows
from deepfeat.models.registry import LayerSpec, ModelSpec, Preprocess, build_seeded, get_model

__all__ = [
    "Embedder",
    "EmbedderConfig",
    "make_config",
    "Prediction",
    "FullImageTransform",
    "resolve_device",
    "build_transform",
    "PRECISIONS",
    "auto_precision",
    "torch_auto_precision",
    "RESIZE_MODES",
    "SIMILARITIES",
    "FINGERPRINT_VERSION",
]

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SIMILARITIES = ("visual", "semantic")
"""What a search compares: the visual descriptor (conv map, pooled) or the semantic vector."""

_TRACE_LOCK = threading.Lock()


@dataclass(frozen=True)
class Prediction:
    label: str
    class_index: int
    probability: float


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an explicit CUDA device without CUDA is an error.

    Raises:
        InvalidOptionError: unknown device string, or CUDA asked for on a machine without it.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InvalidOptionError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidOptionError(
            f"device {device!r} requested but CUDA is not available here; use auto or cpu"
        )
    if dev.type not in ("cpu", "cuda"):
        raise InvalidOptionError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return dev


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX, and not capped below them (``ONEDNN_MAX_CPU_ISA``): oneDNN runs bf16
    convolutions natively. (Without them oneDNN still accepts bf16 but emulates it, which is slower
    than fp32, so "supported" is not enough.)"""
    if not torch.backends.mkldnn.is_available():
        return False
    return cpu_class() in ("avx512_bf16", "amx")


def auto_precision(model: str, device: torch.device) -> str:
    """What ``precision="auto"`` with ``backend="auto"`` runs ``model`` at on ``device``: the adopted
    engine's precision where a measurement adopted one (OpenVINO fp32 for lite0 on AMX, faster than
    PyTorch's bf16 there), else bf16 (or fp16) where the hardware has it natively, else fp32."""
    engine = adopted(model, device)
    return engine[1] if engine is not None else torch_auto_precision(device)


def torch_auto_precision(device: torch.device) -> str:
    """What PyTorch runs at under ``precision="auto"`` on ``device``: bf16 (or fp16) where the
    hardware has it natively, else fp32. The baseline an adopted engine had to beat."""
    return _PRECISION_NAMES[_resolve_precision("auto", device)]


_PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision not in PRECISIONS:
        raise InvalidOptionError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision == "auto":
        # Half precision where the hardware has native support, and only there: embeddings agree with
        # fp32 at cosine >= 0.99 (tested), and on a CPU with AVX-512 BF16 / AMX oneDNN's bf16 kernels
        # with channels-last run several times faster than fp32 (scripts/bench_extract.py).
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if precision == "fp16" and device.type == "cpu":
        raise InvalidOptionError("fp16 is not supported on CPU; use bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def build_transform(pre: Preprocess) -> T.Compose:
    """PIL RGB image -> normalised float tensor (3, crop, crop). Picklable, so DataLoader workers can run it."""
    interpolation = T.InterpolationMode(pre.interpolation)
    return T.Compose(
        [
            T.ToImage(),
            T.Resize(pre.resize, interpolation=interpolation, antialias=True),
            T.CenterCrop(pre.crop),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(pre.mean), std=list(pre.std)),
        ]
    )


_SIDE_MULTIPLE = 32


class FullImageTransform:
    """Whole-image preprocessing for retrieval: keep the aspect ratio, longest side = ``max_side``.

    A centre crop throws the border away, which hurts copy and instance retrieval (a cropped query
    then misses half of what it should match). The shorter side is rounded to a multiple of 32 so
    photos of common aspect ratios share a shape and batch together (at most ~3% aspect change).
    Picklable (DataLoader workers run it).
    """

    def __init__(self, pre: Preprocess, max_side: int) -> None:
        self.max_side = max_side
        self.interpolation = T.InterpolationMode(pre.interpolation)
        self.tail = T.Compose(
            [T.ToDtype(torch.float32, scale=True), T.Normalize(mean=list(pre.mean), std=list(pre.std))]
        )
        self.to_image = T.ToImage()

    def size_for(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) of the resized image."""
        long_side, short_side = max(width, height), min(width, height)
        short = max(
            _SIDE_MULTIPLE, round(self.max_side * short_side / long_side / _SIDE_MULTIPLE) * _SIDE_MULTIPLE
        )
        short = min(short, self.max_side)
        return (short, self.max_side) if width >= height else (self.max_side, short)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """A PIL image, or a (3, H, W) uint8 tensor on any device (the GPU-decode path resizes there)."""
        if isinstance(image, torch.Tensor):
            size = self.size_for(int(image.shape[-1]), int(image.shape[-2]))
            pixels = image
        else:
            size = self.size_for(image.width, image.height)
            pixels = self.to_image(image)
        tensor = T.functional.resize(pixels, list(size), interpolation=self.interpolation, antialias=True)
        return self.tail(tensor)


def compile_trunk(trunk: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` for inference. Freezing turns the (never trained here) weights into constants,
    so Inductor folds batch norms and pre-packs conv/linear weights for oneDNN on CPU: measured 1.7x
    (lite0) to 3x (resnet50) over eager bf16 channels-last on this project's 2-core AVX-512 machine.
    Shapes are specialised on first use and made dynamic on a recompile (torch's default), so the
    variable sizes of full-image mode cost a few recompiles, not one per image."""
    compiled: torch.nn.Module = torch.compile(trunk, options={"freezing": True})  # type: ignore[assignment]
    return compiled


def make_config(config: EmbedderConfig | str | None = None, **options: Any) -> EmbedderConfig:
    """An :class:`EmbedderConfig` from a config, a model name and/or field values, with the models'
    own error types (so a bad option reads the same from Python, the CLI and the API).

    Raises:
        UnknownPoolingError: an unknown pooling name. InvalidOptionError: any other bad value.
    """
    values = config.model_dump() if isinstance(config, EmbedderConfig) else {}
    if isinstance(config, str):
        values["model"] = config
    values.update({k: v for k, v in options.items() if v is not None or k in ("layer", "pooling")})
    try:
        return EmbedderConfig.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(x) for x in first["loc"][:1]) or "options"
        value = values.get(field)
        if field == "pooling":
            raise UnknownPoolingError(
                f"unknown pooling {value!r}; choose one of: {', '.join(POOLINGS)}"
            ) from None
        if field == "resize_mode":
            raise InvalidOptionError(
                f"unknown resize mode {value!r}; choose one of: {', '.join(RESIZE_MODES)}"
            ) from None
        if field not in EmbedderConfig.model_fields:
            raise InvalidOptionError(
                f"unknown embedder option {field!r}; choose from: {', '.join(EmbedderConfig.model_fields)}"
            ) from None
        raise InvalidOptionError(f"{field}: {first['msg']} (got {value!r})") from None


def gaussian_blur(batch: torch.Tensor, sigma: float) -> torch.Tensor:
    """(n, c, H, W) -> the same, blurred by a Gaussian of ``sigma`` pixels over ±3 sigma, edges
    reflected: torchvision's ``gaussian_blur`` with kernel size ``2 * ceil(3 * sigma) + 1``.

    Run as two matrix products, ``B_H @ x @ B_W.T``, with the taps and the reflected edges in banded
    (H, H) and (W, W) matrices. At the low-pass vector's sizes that is half the time of
    torchvision's 2-D convolution and a third of two depthwise 1-D ones, which PyTorch's CPU
    kernels run slowly."""
    height, width = batch.shape[2:]
    rows = _blur_matrix(height, sigma).to(batch)
    cols = _blur_matrix(width, sigma).to(batch)
    return rows @ (batch @ cols.T)


@functools.lru_cache(maxsize=32)
def _blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """(n, n) float64: row i holds the Gaussian taps centred on i, the ones past an edge reflected
    back into the image (torch's ``reflect`` padding: the edge pixel itself is not repeated)."""
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1)
    taps = torch.exp(-0.5 * (offsets.double() / sigma) ** 2)
    taps = taps / taps.sum()
    source = torch.arange(n)[:, None] + offsets[None, :]
    if n == 1:
        source = torch.zeros_like(source)
    while bool(((source < 0) | (source > n - 1)).any()):  # taps past both edges reflect again
        source = torch.where(source < 0, -source, source)
        source = torch.where(source > n - 1, 2 * (n - 1) - source, source)
    matrix = torch.zeros(n, n, dtype=torch.float64)
    matrix.index_put_(
        (torch.arange(n)[:, None].expand_as(source), source), taps.expand_as(source), accumulate=True
    )
    return matrix


class Embedder:
    """Batch-first feature extractor and classifier over one pretrained backbone.

    Args:
        config: what the vectors are (an :class:`EmbedderConfig`; or a model name, with the other
            options as keywords: ``Embedder("resnet50", layer="layer3", pooling="gem")``). The
            defaults are the retrieval defaults documented in the README.
        device: auto / cpu / cuda / cuda:N.
        precision: auto (see :func:`auto_precision`: bf16 on CUDA and on CPUs with native bf16,
            unless an fp32 engine was measured faster there; else fp32) / fp32 / bf16 / fp16
            (autocast; vectors are always returned as float32).
        channels_last: NHWC memory format, faster for convs on recent CPUs and GPUs.
        backend: what runs the embedding trunk: ``torch``, ``openvino`` (CPU) or ``auto`` (see
            :func:`deepfeat.models.backends.resolve_backend`: OpenVINO only where measured faster
            for this model and CPU class, with agreeing vectors).
        compile: ``torch.compile`` the embedding trunk (Inductor, with weight freezing), on the
            PyTorch backend (``auto`` then means ``torch``). Pays a one-off compile per input shape
            (tens of seconds on a small CPU, cached on disk by Inductor) for a faster forward pass:
            worth it for batch indexing, where one shape runs thousands of times (``deepfeat bench
            extract`` measures it).
        **options: :class:`EmbedderConfig` fields overriding ``config``.
    Raises:
        ModelError subclasses for unknown names, unavailable weights, bad options.
    """

    def __init__(
        self,
        config: EmbedderConfig | str | None = None,
        *,
        device: str = "auto",
        precision: str = "auto",
        channels_last: bool = True,
        compile: bool = False,
        backend: str = "auto",
        **options: Any,
    ) -> None:
        self._apply_config(resolve(make_config(config, **options)))
        self.device = resolve_device(device)
        self.precision = precision
        if compile:  # torch.compile is PyTorch's: asking for it asks for that backend
            if backend == "openvino":
                raise InvalidOptionError("compile applies to the torch backend; use backend torch or auto")
            backend = "torch"
        if precision == "auto" and backend == "auto":
            precision = auto_precision(self.spec.name, self.device)
        self._autocast_dtype = _resolve_precision(precision, self.device)
        self.channels_last = channels_last

        resolved = self.spec.resolve(self.config.weights)
        net = build_seeded(self.spec.build)
        if resolved.state_dict is not None:
            try:
                net.load_state_dict(resolved.state_dict, strict=True)
            except RuntimeError as exc:
                raise WeightsUnavailableError(
                    f"weights {resolved.identity} do not fit {self.spec.name}: {str(exc)[:500]}"
                ) from exc
        net.eval().requires_grad_(False)
        net.to(self.device)
        if channels_last:
            net.to(memory_format=torch.channels_last)
        self._net = net
        self.weights_identity = resolved.identity
        self.pretrained = resolved.pretrained
        self.categories = resolved.categories
        self.classify_transform = build_transform(self.spec.preprocess)
        self.backend = resolve_backend(
            backend, model=self.spec.name, device=self.device, precision=self.precision_in_use
        )
        if self.backend == "openvino" and self.precision_in_use not in ("fp32", "bf16"):
            raise InvalidOptionError(
                "the openvino backend runs fp32 or bf16; use precision auto, fp32 or bf16"
            )
        if self.backend == "openvino" and self.precision_in_use == "bf16" and not cpu_has_native_bf16():
            raise InvalidOptionError(
                f"the openvino backend runs bf16 only on CPUs with AVX-512 BF16 or AMX (this one is "
                f"{cpu_class()}); use precision auto or fp32, or backend torch"
            )
        self.compiled = bool(compile)
        # The trunks are traced here, once: FX tracing patches torch.nn.Module.__call__ process-wide,
        # so tracing while another thread runs a forward pass would corrupt that pass. After __init__
        # nothing is ever traced again, whatever layer a request asks for.
        with _TRACE_LOCK:
            # Batch norms folded into the convs: the trunks share one folded copy of those weights,
            # and ``net`` keeps its own for fine-tuning.
            folded: dict[int, torch.nn.Conv2d] = {}

            def trunk(nodes: Sequence[str]) -> torch.nn.Module:
                return fold_batch_norms(build_trunk(net, {node: node for node in nodes}), folded)

            def hot(nodes: Sequence[str]) -> torch.nn.Module:
                if self.backend == "openvino":
                    # A converted model in the cache needs no torch trunk: traced only to convert.
                    return self._on_openvino(functools.partial(trunk, nodes), nodes)
                return trunk(nodes)

            # Hot path (indexing, search): pruned right after the chosen layer.
            single = hot((self.layer.node,))
            # The embedding layer and the semantic one from one pass (indexing, the service's batches).
            pair = None
            if self.semantic is not None and self.semantic.source.node != self.layer.node:
                pair = hot(self._pair_nodes())
            # Every selectable layer and the logits from one pass: classify, embed+classify, variants.
            self._all = trunk([spec.node for spec in self.spec.layers])
        if self.compiled:
            single = compile_trunk(single)
            pair = None if pair is None else compile_trunk(pair)
        self._single: torch.nn.Module | None = single
        self._pair: torch.nn.Module | None = pair
        log.info(
            "loaded %s (%s) layer=%s pooling=%s dim=%d on %s precision=%s",
            self.spec.name,
            self.weights_identity,
            self.layer.name,
            self.pooling,
            self.dim,
            self.device,
            self.precision_in_use,
        )

    def _on_openvino(self, build: Callable[[], torch.nn.Module], nodes: Sequence[str]) -> torch.nn.Module:
        """A hot-path trunk run by OpenVINO (the rarely used all-layers trunk, for classify and
        variants, stays on PyTorch). ``build`` makes the torch trunk, called only when the cache has
        no converted model for this fingerprint yet."""
        side = self.spec.preprocess.crop
        return openvino_trunk(  # type: ignore[return-value]
            build,
            nodes,
            key={"fingerprint": self.fingerprint},  # it names the weights, the layer and every option
            precision=self.precision_in_use,
            example=torch.zeros(1, 3, side, side),
        )

    def _apply_config(self, config: EmbedderConfig) -> None:
        """Derive what the forward pass needs from a resolved config (layer named, pooling decided)."""
        self.config = config
        self._fingerprint: dict[str, Any] | None = None
        self.spec: ModelSpec = get_model(config.model)
        self.layer: LayerSpec = self.spec.get_layer(config.layer)
        self.semantic: SemanticSpec | None = resolve_semantic(self.spec, config.semantic_layer)
        self._pool = get_pooling(self.pooling, gem_p=self.gem_p) if self.layer.kind == "conv" else None
        self.transform: Callable[[Image.Image | torch.Tensor], torch.Tensor] = (
            build_transform(self.spec.preprocess)
            if config.resize_mode == "crop"
            else FullImageTransform(self.spec.preprocess, config.max_side)
        )

    def variant(self, **options: Any) -> Embedder:
        """The same loaded backbone read with other options (another layer, pooling, resize mode or
        scales): no weight copy, the all-layers trunk is shared. Lets the service return features
        from any layer without loading the model twice.

        Raises:
            InvalidOptionError: ``model`` or ``weights`` differ (that needs another Embedder).
        """
        for key in ("model", "weights"):
            if options.get(key) not in (None, getattr(self.config, key)):
                raise InvalidOptionError(f"a variant keeps the loaded {key}; build another Embedder")
        update = {k: v for k, v in options.items() if v is not None}
        if "layer" in update and "pooling" not in update:
            update["pooling"] = None  # the new layer's own default (none for vector layers)
        other = copy.copy(self)
        other._apply_config(resolve(make_config(self.config, **update)))
        if other.layer.node != self.layer.node:
            other._single = None  # served by the all-layers trunk
        if other._pair_nodes() != self._pair_nodes():
            other._pair = None
        if other._single is None and other._pair is None:
            other.backend = "torch"  # everything it reads comes from the all-layers trunk
        return other

    def _pair_nodes(self) -> tuple[str, ...]:
        """The nodes one embedding pass reads: the embedding layer's, then the one the semantic
        vector is made from (the same node for ``gem-logits+penultimate`` at the default layer)."""
        if self.semantic is None:
            return (self.layer.node,)
        return tuple(dict.fromkeys((self.layer.node, self.semantic.source.node)))

    # ---------------------------------------------------------------------------------------------
    # identity

    @property
    def pooling(self) -> str:
        return str(self.config.pooling)

    @property
    def gem_p(self) -> float:
        return self.config.gem_p

    @property
    def resize_mode(self) -> str:
        return self.config.resize_mode

    @property
    def max_side(self) -> int:
        return self.config.max_side

    @property
    def scales(self) -> tuple[float, ...]:
        return self.config.scales

    @property
    def dim(self) -> int:
        return self.layer.dim

    @property
    def semantic_dim(self) -> int | None:
        """Dimension of the semantic vector (``similarity=semantic``), None when it is off."""
        return None if self.semantic is None else self.semantic.dim

    @property
    def backbone(self) -> torch.nn.Module:
        """The loaded network (eval mode, frozen): fine-tuning trains a copy of it, never this one."""
        return self._net

    @property
    def pooling_id(self) -> str:
        return f"gem(p={self.gem_p:g})" if self.pooling == "gem" else self.pooling

    @property
    def precision_in_use(self) -> str:
        """What ``auto`` turned into on this device (fp32, bf16 or fp16)."""
        return _PRECISION_NAMES[self._autocast_dtype]

    @property
    def numerics(self) -> dict[str, str]:
        """How the vectors are computed, beyond what they are: backend, precision in use, device. The
        fingerprint carries it only where vectors would not mix; a store's manifest notes it always
        (``written_by``)."""
        return {"backend": self.backend, "precision": self.precision_in_use, "device": str(self.device)}

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What makes two vectors comparable. Stored in an index's manifest and compared on open
        (see :func:`deepfeat.models.identity.fingerprint_of`)."""
        if self._fingerprint is None:  # once per config: variants get their own
            fingerprint = fingerprint_of(self.config, weights_identity=self.weights_identity)
            if self.backend != "torch" and not mixes_with_torch(self.spec.name, self.precision_in_use):
                # Measured to disagree with PyTorch's vectors beyond cosine 0.999 (or not measured):
                # a store made with them refuses PyTorch's and the other way round.
                fingerprint["numerics"] = f"{self.backend}-{self.precision_in_use}"
            self._fingerprint = fingerprint
        return dict(self._fingerprint)

    @property
    def decode_size(self) -> tuple[int, int]:
        """The JPEG draft hint: libjpeg may decode at 1/2, 1/4 or 1/8 scale while each side stays at
        least this big, so a 12 MP photo costs a fraction of a full decode.

        The DCT-domain downscale stands in for part of the antialiased resize. Measured against full
        decodes (24 camera JPEGs, lite0): worst cosine 0.9956 (crop) and 0.9995 (full image); a 512 px
        photo halved this way in crop mode: 0.978. Asking for twice the size (Pillow's
        ``reducing_gap=2``) lifts those to 0.9984 / 0.9999 / 1.0 but cost 65% more decode time per
        camera photo (14.1 -> 23.2 ms), which on 2 cores made the decode worker the bottleneck of the
        whole indexer (57 -> 40 images/s): not worth it for vectors that already match at > 0.99.
        The other way, asking in full mode only that the long side reach ``max_side`` (the short
        side follows the aspect ratio), decodes 43% of the benchmark's 1-12 MP camera photos at 1/4 scale
        instead of 1/2 and saves 3.3 ms of host work per photo on average, but the regional vectors then
        drift from a full decode (48 such photos, lite0 defaults fp32: min cosine 0.975 against 0.994,
        global 0.9976 against 0.9995): the square request stays."""
        side = self.spec.preprocess.resize if self.resize_mode == "crop" else self.max_side
        side = int(round(side * max(max(self.scales), 1.0)))
        return side, side

    # ---------------------------------------------------------------------------------------------
    # forward passes

    def _trunk(self, nodes: tuple[str, ...]) -> torch.nn.Module:
        if self._single is not None and nodes == (self.layer.node,):
            return self._single
        if self._pair is not None and nodes == self._pair_nodes():
            return self._pair
        return self._all

    def _autocast(self) -> AbstractContextManager[Any]:
        if self._autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype)

    def preprocess(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """RGB PIL images -> (3, H, W) float tensors on the CPU, as the embedding needs them
        (all the same size in "crop" mode; per-image sizes in "full" mode)."""
        if not images:
            raise InvalidOptionError("no images given")
        return [self.transform(img) for img in images]

    def forward_intermediates(
        self, batch: torch.Tensor, layers: Sequence[str | int] | None = None
    ) -> dict[str, torch.Tensor]:
        """Raw outputs of several layers from one forward pass (in the spirit of timm's
        ``forward_intermediates``): the one path every embedding, evaluation and training run takes,
        so device, precision, channels-last and inference mode are always the embedder's own.

        Args:
            batch: (n, 3, H, W) preprocessed images (``preprocess``/``classify_inputs`` output).
            layers: layer names or positions k; None = the embedding layer.
        Returns:
            {layer name: float32 tensor on the embedder's device}: (n, c, h, w) for conv layers,
            (n, d) for vector layers.
        Raises:
            InvalidOptionError: the batch is not (n, 3, H, W). UnknownLayerError: a bad layer.
        """
        specs = [self.layer] if layers is None else [self.spec.get_layer(x) for x in layers]
        nodes = tuple(dict.fromkeys(spec.node for spec in specs))
        out = self._forward(batch, nodes)
        return {spec.name: out[spec.node] for spec in specs}

    def _forward(self, batch: torch.Tensor, nodes: tuple[str, ...]) -> dict[str, torch.Tensor]:
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise InvalidOptionError(f"expected a (n, 3, H, W) batch, got shape {tuple(batch.shape)}")
        non_blocking = self.device.type == "cuda"
        if non_blocking and batch.device.type == "cpu" and not batch.is_pinned():
            batch = batch.pin_memory()
        trunk = self._trunk(nodes)
        if isinstance(trunk, OpenVinoTrunk):  # its own precision and layout
            out: dict[str, torch.Tensor] = trunk(batch)
            return {k: out[k] for k in nodes}
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        batch = batch.to(self.device, non_blocking=non_blocking).contiguous(memory_format=memory_format)
        with torch.inference_mode(), self._autocast():
            out = trunk(batch)
        return {k: out[k].float() for k in nodes}

    def pool(
        self,
        features: torch.Tensor,
        *,
        layer: str | int | None = None,
        pooling: str | None = None,
        gem_p: float | None = None,
    ) -> torch.Tensor:
        """A layer's raw output -> (n, dim) unit vectors.

        Args:
            features: ``forward_intermediates`` output of ``layer``.
            layer, pooling, gem_p: default to the embedder's own; a conv layer is pooled (avg, max,
                gem, rmac), a vector layer is only normalised.
        """
        spec = self.layer if layer is None else self.spec.get_layer(layer)
        if spec.kind == "conv":
            if layer is None and pooling is None and gem_p is None and self._pool is not None:
                features = self._pool(features)  # (n, c, h, w) -> (n, c)
            else:
                p = self.gem_p if gem_p is None else float(gem_p)
                features = get_pooling(pooling or self.pooling, gem_p=p)(features)
        return F.normalize(features.flatten(1), dim=1)

    @staticmethod
    def rescale(batch: torch.Tensor, scale: float) -> torch.Tensor:
        """The multi-scale input: (n, 3, H, W) resized by ``scale`` (antialiased), unchanged at 1."""
        if scale == 1.0:
            return batch
        return F.interpolate(batch, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False)

    def _predictions(self, logits: torch.Tensor, k: int) -> list[list[Prediction]]:
        if k < 1:
            raise InvalidOptionError(f"k must be >= 1, got {k}")
        probs = logits.softmax(dim=1)
        top_p, top_i = probs.topk(min(k, probs.shape[1]), dim=1)
        return [
            [
                Prediction(label=self.categories[i], class_index=int(i), probability=float(p))
                for p, i in zip(row_p.tolist(), row_i.tolist(), strict=True)
            ]
            for row_p, row_i in zip(top_p, top_i, strict=True)
        ]

    @property
    def vectors_per_image(self) -> int:
        """Vectors a store keeps per image: the global one, the low-pass one (when ``lowpass``), then
        ``regions``² regional ones."""
        return 1 + int(self.config.lowpass > 0) + self.config.regions**2

    def lowpass_descriptors(self, batch: torch.Tensor, *, half: torch.Tensor | None = None) -> torch.Tensor:
        """(n, 3, H, W) preprocessed batch -> (n, dim): the whole image blurred (Gaussian, sigma =
        ``lowpass`` x its short side) at half scale, pooled like the global vector.

        A blurred or heavily downscaled copy has lost what separates the original from smooth,
        featureless photos, so its global vector drifts towards those; stored beside the global one,
        this vector is what such a copy still matches.

        The image is halved first and blurred at half scale with half the sigma: a quarter of the
        pixels and a quarter of the kernel taps of blurring at full size, and the same vector (cosine
        >= 0.9998 with blurring first, lite0 fp32 on 80 real photos). The blur is separable
        (:func:`gaussian_blur`): torchvision's convolves with the full 2-D kernel, which at full size
        cost more than the forward pass it feeds.

        Args:
            half: ``rescale(batch, 0.5)`` when the caller has it already (the 0.5 scale's input).
        """
        sigma = max(0.5, self.config.lowpass * min(batch.shape[2:])) * 0.5
        small = self.rescale(batch, 0.5) if half is None else half
        return self.pool(self.forward_intermediates(gaussian_blur(small, sigma))[self.layer.name])

    def _descriptors(
        self, batch: torch.Tensor, *, regions: bool = False, semantic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(n, 3, H, W) same-size batch -> ((n, dim) unit vectors, averaged over the scales; with
        ``regions``, (n, vectors_per_image, dim): the global vector, then the regional ones, pooled
        from the same forward pass at scale 1 (the largest scale when 1 is not among them)), and with
        ``semantic`` the (n, semantic_dim) semantic vectors read from the same forward passes (each
        scale's vector L2-normalised, summed over the scales, re-normalised, as the visual one)."""
        sem = self.semantic if semantic else None
        if semantic and sem is None:
            raise InvalidOptionError(
                f"this embedder has no semantic layer (semantic_layer=none); choose one of: "
                f"{semantic_choices(self.spec)}"
            )
        names = [self.layer.name] if sem is None else [self.layer.name, sem.source.name]
        descriptors: list[torch.Tensor] = []
        semantics: list[list[torch.Tensor]] = []  # per scale, the semantic vector's parts
        region_scale = 1.0 if 1.0 in self.scales else max(self.scales)
        region_map: torch.Tensor | None = None
        half: torch.Tensor | None = None  # the 0.5 scale's input, which the low-pass vector reuses
        for scale in self.scales:
            scaled = self.rescale(batch, scale)
            if scale == 0.5:
                half = scaled
            # One forward pass per scale serves both layers (the all-layers trunk when two are read).
            out = self.forward_intermediates(scaled, names)
            features = out[self.layer.name]
            descriptors.append(self.pool(features))
            if sem is not None:
                semantics.append(self._semantic_parts(out[sem.source.name]))
            if regions and scale == region_scale:
                region_map = features  # (n, c, h, w)
        glob = F.normalize(torch.stack(descriptors).sum(dim=0), dim=1)
        sem_vectors = self._combine_semantic(semantics) if sem is not None else None
        if not regions:
            return glob, sem_vectors
        parts = [glob]
        if self.config.lowpass > 0:
            parts.append(self.lowpass_descriptors(batch, half=half))
        if region_map is not None and self.config.regions:
            h, w = region_map.shape[2:]
            parts += [
                self.pool(region_map[:, :, y : y + rh, x : x + rw])
                for y, x, rh, rw in grid_windows(h, w, self.config.regions)
            ]
        return torch.stack(parts, dim=1), sem_vectors  # (n, vectors_per_image, dim)

    def _semantic_parts(self, source: torch.Tensor) -> list[torch.Tensor]:
        """One scale's semantic vector parts, each (n, d_i) and unit-norm, from the output of
        ``semantic.source``: the vector layer itself, or for ``gem-logits+penultimate`` the class
        scores of the GeM-pooled map (the model's own Linear) and the map's average pooling, which
        is what the model's penultimate vector is."""
        spec = self.semantic
        if spec is None or spec.linear is None:
            return [F.normalize(source.flatten(1), dim=1)]
        linear = self._net.get_submodule(spec.linear)
        if not isinstance(linear, torch.nn.Linear):  # the registry's ClassifierHead says it is one
            raise InvalidOptionError(
                f"{self.spec.name}.{spec.linear} is a {type(linear).__name__}, not a Linear layer; "
                f"semantic_layer={spec.name} cannot be computed for this network"
            )
        pooled = gem_pool(source, spec.gem_p)  # (n, c, h, w) -> (n, c)
        bias = None if linear.bias is None else linear.bias.float()
        scores = F.linear(pooled, linear.weight.float(), bias)  # (n, classes)
        return [F.normalize(scores, dim=1), F.normalize(avg_pool(source), dim=1)]

    def _combine_semantic(self, per_scale: list[list[torch.Tensor]]) -> torch.Tensor:
        """Per-scale parts -> (n, semantic_dim): each part summed over the scales and re-normalised,
        as the visual descriptor is, then weighted (the penultimate part of ``gem-logits+penultimate``
        by ``penultimate_weight``), concatenated, and the whole L2-normalised."""
        spec = self.semantic
        weights = [1.0] if spec is None or spec.linear is None else [1.0, spec.penultimate_weight]
        parts = [
            weight * F.normalize(torch.stack(scales).sum(dim=0), dim=1)
            for weight, scales in zip(weights, zip(*per_scale, strict=True), strict=True)
        ]
        return F.normalize(torch.cat(parts, dim=1), dim=1)

    @overload
    def embed_tensors(
        self,
        tensors: torch.Tensor | Sequence[torch.Tensor],
        *,
        regions: bool = ...,
        semantic: Literal[False] = ...,
    ) -> np.ndarray: ...

    @overload
    def embed_tensors(
        self, tensors: torch.Tensor | Sequence[torch.Tensor], *, regions: bool = ..., semantic: Literal[True]
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def embed_tensors(
        self, tensors: torch.Tensor | Sequence[torch.Tensor], *, regions: bool = False, semantic: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Preprocessed images -> (n, dim) float32, unit L2 norm; with ``regions``, what a store keeps
        per image: (n, vectors_per_image, dim), the global vector first.

        Takes a (n, 3, H, W) batch or a list of (3, H, W) tensors of possibly different sizes;
        same-size tensors are stacked into one forward pass each, results come back in input order.

        Args:
            semantic: Also return the (n, semantic_dim) semantic vectors, from the same forward passes:
                the result is then ``(visual, semantic)``.
        Raises:
            InvalidOptionError: bad input shape, no images, or ``semantic`` without a semantic layer.
        """
        if isinstance(tensors, torch.Tensor):
            if tensors.ndim != 4:
                raise InvalidOptionError(f"expected a (n, 3, H, W) batch, got shape {tuple(tensors.shape)}")
            glob, sem = self._descriptors(tensors, regions=regions, semantic=semantic)
            visual = glob.cpu().numpy().astype(np.float32, copy=False)
            if not semantic or sem is None:  # _descriptors returns sem whenever semantic is asked
                return visual
            return visual, sem.cpu().numpy().astype(np.float32, copy=False)
        if not tensors:
            raise InvalidOptionError("no images given")
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, tensor in enumerate(tensors):
            groups.setdefault(tuple(tensor.shape), []).append(i)
        shape = (len(tensors), self.vectors_per_image, self.dim) if regions else (len(tensors), self.dim)
        out = np.empty(shape, dtype=np.float32)
        sem_out = np.empty((len(tensors), self.semantic_dim or 0), dtype=np.float32) if semantic else None
        for indices in groups.values():
            batch = torch.stack([tensors[i] for i in indices])
            glob, sem = self._descriptors(batch, regions=regions, semantic=semantic)
            out[indices] = glob.cpu().numpy()
            if sem_out is not None and sem is not None:
                sem_out[indices] = sem.cpu().numpy()
        if sem_out is None:
            return out
        return out, sem_out

    def embed(self, images: Sequence[Image.Image], *, similarity: str = "visual") -> np.ndarray:
        """RGB PIL images -> (n, dim) float32, unit L2 norm (one forward pass per image size and scale);
        ``similarity="semantic"``: the (n, semantic_dim) semantic vectors instead.

        Raises:
            InvalidOptionError: an unknown similarity, or semantic on an embedder without it.
        """
        if similarity == "visual":
            return self.embed_tensors(self.preprocess(images))
        if similarity == "semantic":
            return self.embed_semantic(images)
        raise InvalidOptionError(
            f"unknown similarity {similarity!r}; choose one of: {', '.join(SIMILARITIES)}"
        )

    def embed_semantic(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB PIL images -> (n, semantic_dim) float32 semantic vectors, unit L2 norm.

        Raises:
            InvalidOptionError: the embedder has no semantic layer.
        """
        return self.embed_tensors(self.preprocess(images), semantic=True)[1]

    def _classify_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if not images:
            raise InvalidOptionError("no images given")
        return torch.stack([self.classify_transform(img) for img in images])

    def classify_inputs(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """RGB PIL images -> (3, crop, crop) tensors as classification needs them."""
        return list(self._classify_batch(images))

    def logits(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Classification inputs (see ``classify_inputs``) -> (n, classes) float32 logits, one forward pass."""
        return self._forward(torch.stack(list(tensors)), (self.spec.logits_node,))[
            self.spec.logits_node
        ].cpu()

    def top_k(self, logits: torch.Tensor, *, k: int) -> list[list[Prediction]]:
        """(n, classes) logits -> top-k predictions per row, best first."""
        return self._predictions(logits, k)

    def classify(self, images: Sequence[Image.Image], *, k: int = 5) -> list[list[Prediction]]:
        """Top-k ImageNet classes per image, best first (always on the centre crop the weights expect)."""
        logits = self._forward(self._classify_batch(images), (self.spec.logits_node,))[self.spec.logits_node]
        return self._predictions(logits, k)

    def embed_and_classify(
        self, images: Sequence[Image.Image], *, k: int = 5
    ) -> tuple[np.ndarray, list[list[Prediction]]]:
        """Vectors and top-k classes; a single forward pass when the embedding uses the crop at one scale."""
        if self.resize_mode != "crop" or self.scales != (1.0,):
            return self.embed(images), self.classify(images, k=k)
        nodes = tuple(dict.fromkeys((self.layer.node, self.spec.logits_node)))
        out = self._forward(self._classify_batch(images), nodes)
        vectors = self.pool(out[self.layer.node]).cpu().numpy().astype(np.float32, copy=False)
        return vectors, self._predictions(out[self.spec.logits_node], k)
