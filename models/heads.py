"""Classifier heads on deep features: your own classes instead of ImageNet's.

Two ways to learn them, in the order small data usually prefers them:

- ``linear``: a multinomial logistic regression on frozen, L2-normalised embeddings (any layer and
  pooling the Embedder offers), class-balanced, its L2 strength chosen on a validation split by walking
  the regularisation path from strong to weak and stopping early when validation stops improving, then
  refit on all the training data. The standardisation it trains with is folded into the weights, so
  serving is one ``(n, d) @ (d, C)`` on the embedding the server already computes.
- ``finetune``: the backbone with its ImageNet classifier replaced by ``normalise -> Linear(C)``,
  initialised from a linear probe on the same features (LP-FT), then the top block(s) unfrozen and
  trained with standard augmentation; BatchNorm statistics stay frozen (small batches), and the best
  epoch by validation accuracy is kept. Only the unfrozen tensors are saved: the rest are the base
  weights, which the head's fingerprint names.

A saved head is a directory ``NAME/`` with ``head.json`` (classes, the embedder fingerprint it was trained
with, metrics, training settings, checksums of its weight files) and one weight file. It is written to a
temporary directory and renamed into place, so a head is either complete or absent.

Also here: stratified splits, the evaluation report (accuracy, top-k, per-class precision/recall,
confusion matrix) and similarity-weighted kNN voting, shared by the training script and the service.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2 as T

from deepfeat.models.embedder import FINGERPRINT_VERSION, Prediction, build_transform
from deepfeat.models.errors import ModelError
from deepfeat.models.registry import ModelSpec, weights_argument

__all__ = [
    "HEAD_FORMAT_VERSION",
    "MANIFEST_FILE",
    "METHODS",
    "RESERVED_NAMES",
    "FINETUNE_COMPATIBLE_KEYS",
    "HeadError",
    "TrainingDataError",
    "InvalidHeadNameError",
    "HeadExistsError",
    "CorruptHeadError",
    "IncompatibleHeadError",
    "UnknownHeadError",
    "NoLabelsError",
    "LinearHead",
    "LinearConfig",
    "FineTuneConfig",
    "TrainingLog",
    "FineTunedNet",
    "HeadManifest",
    "check_head_name",
    "stratified_split",
    "train_linear",
    "top_blocks",
    "build_finetune_net",
    "fine_tune",
    "finetune_state",
    "evaluate",
    "predictions_from_probabilities",
    "knn_vote",
    "fingerprint_differences",
    "check_compatible",
    "embedder_kwargs",
    "save_head",
    "read_manifest",
    "load_linear",
    "load_finetune_state",
    "linear_bytes",
    "finetune_bytes",
    "finetuned_from_state",
    "finetuned_probabilities",
    "iter_head_dirs",
    "ProgressBar",
]

log = logging.getLogger(__name__)

HEAD_FORMAT_VERSION = 1
MANIFEST_FILE = "head.json"
LINEAR_FILE = "linear.npz"
FINETUNE_FILE = "finetune.pt"
METHODS = ("linear", "finetune")
RESERVED_NAMES = frozenset({"imagenet", "knn"})
"""Built-in classifiers the service always offers; a saved head may not take their names."""

FINETUNE_COMPATIBLE_KEYS = ("version", "model", "weights", "pretrained")
"""A fine-tuned head runs its own copy of the backbone on the classification crop, so it only needs the
same base network and weights as the server; layer, pooling and resize mode of the store do not matter."""

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MAX_CLASSES = 10_000


# ================================================================================================ errors


class HeadError(ModelError):
    """Base of the classifier-head errors."""

    code = "classifier_error"


class TrainingDataError(HeadError):
    """The training folder or data cannot train a classifier (one class, an empty class, bad files...)."""

    code = "bad_training_data"


class InvalidHeadNameError(HeadError):
    code = "invalid_classifier_name"


class HeadExistsError(HeadError):
    code = "classifier_exists"


class CorruptHeadError(HeadError):
    """A saved head whose manifest or weight files are missing, malformed or fail their checksum."""

    code = "corrupt_classifier"


class IncompatibleHeadError(HeadError):
    """A head trained on another embedder's features (another model, weights, layer, pooling...)."""

    code = "incompatible_classifier"

    def __init__(self, message: str, differences: dict[str, tuple[Any, Any]] | None = None) -> None:
        super().__init__(message)
        self.differences = differences or {}


class UnknownHeadError(HeadError):
    code = "unknown_classifier"


class NoLabelsError(HeadError):
    """kNN classification asked for, but no labelled images to vote."""

    code = "no_labels"


def check_head_name(name: str) -> str:
    """A head name is a directory name: 1-64 of ``A-Z a-z 0-9 _ . -``, not starting with ``.``/``-``/``_``.

    Raises:
        InvalidHeadNameError: Anything else, or a reserved name (``imagenet``, ``knn``).
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidHeadNameError(
            f"invalid classifier name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    if name.lower() in RESERVED_NAMES:
        raise InvalidHeadNameError(
            f"classifier name {name!r} is reserved (built-in: {', '.join(sorted(RESERVED_NAMES))})"
        )
    return name


# ================================================================================================ splits


def stratified_split(
    labels: Sequence[int] | np.ndarray, fraction: float, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices per class: ``round(n_c * fraction)`` to the second part, at least one when the class
    has two or more members, and always at least one left in the first part.

    Args:
        labels: Class index of each item.
        fraction: Share of each class that goes to the second part, in [0, 1).
        seed: Shuffle seed (the split is reproducible).

    Returns:
        ``(first, second)`` sorted index arrays.

    Raises:
        TrainingDataError: ``fraction`` outside [0, 1).
    """
    if not 0.0 <= fraction < 1.0:
        raise TrainingDataError(f"split fraction must be in [0, 1), got {fraction}")
    y = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    first: list[int] = []
    second: list[int] = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        rng.shuffle(members)
        n_second = 0
        if fraction > 0 and len(members) >= 2:
            n_second = min(len(members) - 1, max(1, round(len(members) * fraction)))
        second.extend(members[:n_second].tolist())
        first.extend(members[n_second:].tolist())
    return np.array(sorted(first), dtype=np.int64), np.array(sorted(second), dtype=np.int64)


def _check_labels(y: np.ndarray, classes: Sequence[str], what: str) -> None:
    if len(classes) < 2:
        raise TrainingDataError(f"a classifier needs at least 2 classes, got {len(classes)}: {list(classes)}")
    if len(classes) > _MAX_CLASSES:
        raise TrainingDataError(f"at most {_MAX_CLASSES} classes, got {len(classes)}")
    if len(set(classes)) != len(classes):
        raise TrainingDataError(f"class names must be unique, got {list(classes)}")
    if y.ndim != 1 or (y.size and (y.min() < 0 or y.max() >= len(classes))):
        raise TrainingDataError(f"{what}: labels must be class indices in [0, {len(classes)})")
    missing = [classes[c] for c in range(len(classes)) if not np.any(y == c)]
    if missing:
        raise TrainingDataError(f"{what}: no examples of class(es) {missing}; every class needs at least one")


def _class_weights(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Balanced weights n / (C * n_c): every class counts the same in the loss, whatever its size."""
    counts = torch.bincount(y, minlength=num_classes).float().clamp(min=1)
    return (len(y) / (num_classes * counts)).float()


# ================================================================================================ linear


@dataclass(frozen=True)
class LinearHead:
    """``logits = x @ weight.T + bias`` on the embedding (L2-normalised, as the Embedder returns it)."""

    classes: tuple[str, ...]
    weight: np.ndarray  # (C, d) float32
    bias: np.ndarray  # (C,) float32

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(n, d) embeddings -> (n, C) float32 logits.

        Raises:
            HeadError: Wrong shape.
        """
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise HeadError(f"expected (n, {self.dim}) embeddings, got shape {x.shape}")
        return (x @ self.weight.T + self.bias).astype(np.float32, copy=False)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """(n, d) embeddings -> (n, C) class probabilities (softmax)."""
        return _softmax(self.logits(x))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class LinearConfig:
    """Multinomial logistic regression (class-balanced cross-entropy + L2), solved with L-BFGS.

    ``val_fraction`` of each class is held out. The regularisation path is walked from strong to weak
    (``strengths``, each fit warm-started from the previous one) and stopped early once the validation
    score (balanced accuracy, then loss) has not improved for ``patience`` strengths; the best strength
    wins. With ``refit`` the head is then retrained on all the data at that strength, so small classes
    do not lose a fifth of their examples.
    """

    val_fraction: float = 0.2
    strengths: tuple[float, ...] = (10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 3e-4, 1e-4)
    patience: int = 3
    max_iter: int = 200
    refit: bool = True
    seed: int = 0


@dataclass
class TrainingLog:
    """What training did, recorded in the head's manifest."""

    method: str
    train_size: int
    val_size: int
    best_step: float = 0
    """linear: the chosen L2 strength; finetune: the best epoch (0 = the linear-probe initialisation)."""
    steps_run: int = 0
    val_accuracy: float | None = None
    val_loss: float | None = None
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("extra"))
        return data


def _fit_logreg(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    strength: float,
    max_iter: int,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise balanced CE + strength/2 * ||W||^2 on standardised ``x`` (n, d); returns W (C, d), b (C,)."""
    d = x.shape[1]
    w = (init[0].clone() if init else torch.zeros(num_classes, d)).requires_grad_(True)
    b = (init[1].clone() if init else torch.zeros(num_classes)).requires_grad_(True)
    cw = _class_weights(y, num_classes)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe", tolerance_grad=1e-6
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y, weight=cw) + 0.5 * strength * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _val_score(
    w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int
) -> tuple[float, float, float]:
    """(balanced accuracy, accuracy, balanced loss) on a validation set."""
    with torch.no_grad():
        logits = x @ w.T + b
        loss = float(F.cross_entropy(logits, y, weight=_class_weights(y, num_classes)))
        correct = (logits.argmax(1) == y).float()
    recalls = [float(correct[y == c].mean()) for c in range(num_classes) if bool((y == c).any())]
    return float(np.mean(recalls)), float(correct.mean()), loss


def _standardiser(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre, and one scalar scale that gives the dimensions unit variance on average (a scale per
    dimension, estimated from a few dozen examples, would mostly amplify noise)."""
    mu = x.mean(axis=0)
    scale = float(np.sqrt(((x - mu) ** 2).sum(axis=1).mean() / x.shape[1])) or 1.0
    return mu, scale


@contextlib.contextmanager
def _few_threads(work: float) -> Iterator[None]:
    """Run small problems on one thread: each L-BFGS step is a few tiny matmuls, and waking a pool of
    threads for them costs far more than the work (measured 60x slower with 2 threads on a busy 2-core
    machine). Process-wide setting, restored after; training never runs inside the server."""
    if work > 5e7:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_linear(
    x: np.ndarray, y: Sequence[int] | np.ndarray, classes: Sequence[str], config: LinearConfig | None = None
) -> tuple[LinearHead, TrainingLog]:
    """Train a linear head on embeddings.

    Args:
        x: (n, d) float32 embeddings (as the Embedder returns them: L2-normalised).
        y: (n,) class indices into ``classes``.
        classes: Class names.
        config: Training settings (defaults: :class:`LinearConfig`).

    Returns:
        The head (standardisation folded in: it applies to raw embeddings) and the training log.

    Raises:
        TrainingDataError: Fewer than 2 classes, a class without examples, bad shapes or values.
    """
    config = config or LinearConfig()
    if not config.strengths or any(s <= 0 for s in config.strengths):
        raise TrainingDataError(f"L2 strengths must be positive, got {config.strengths}")
    started = time.perf_counter()
    xs = np.asarray(x, dtype=np.float32)
    ys = np.asarray(y, dtype=np.int64)
    if xs.ndim != 2 or xs.shape[0] != ys.shape[0] or xs.shape[0] == 0:
        raise TrainingDataError(f"expected (n, d) features with n labels, got {xs.shape} and {ys.shape}")
    if not np.isfinite(xs).all():
        raise TrainingDataError("features contain NaN or infinite values")
    _check_labels(ys, classes, "training data")
    torch.manual_seed(config.seed)
    num_classes = len(classes)

    with _few_threads(float(xs.shape[0]) * xs.shape[1] * num_classes):
        return _train_linear(xs, ys, classes, config, started)


def _train_linear(
    xs: np.ndarray, ys: np.ndarray, classes: Sequence[str], config: LinearConfig, started: float
) -> tuple[LinearHead, TrainingLog]:
    num_classes = len(classes)
    fit_idx, val_idx = stratified_split(ys, config.val_fraction, seed=config.seed)
    mu, scale = _standardiser(xs[fit_idx])
    x_fit = torch.from_numpy((xs[fit_idx] - mu) / scale)
    y_fit = torch.from_numpy(ys[fit_idx])
    history: list[dict[str, float]] = []
    default = config.strengths[len(config.strengths) // 2]
    chosen, best_key = default, (-1.0, -math.inf)
    best_val: tuple[float | None, float | None] = (None, None)
    if len(val_idx):
        x_val = torch.from_numpy((xs[val_idx] - mu) / scale)
        y_val = torch.from_numpy(ys[val_idx])
        init = None
        since_best = 0
        for strength in config.strengths:
            init = _fit_logreg(
                x_fit, y_fit, num_classes, strength=strength, max_iter=config.max_iter, init=init
            )
            bal, acc, loss = _val_score(*init, x_val, y_val, num_classes)
            history.append(
                {"strength": strength, "val_balanced_accuracy": bal, "val_accuracy": acc, "val_loss": loss}
            )
            if (bal, -loss) > best_key:
                chosen, best_key, best_val, since_best = strength, (bal, -loss), (acc, loss), 0
            else:
                since_best += 1
                if since_best >= config.patience:
                    break
    refit = config.refit or not len(val_idx)
    if refit:
        mu, scale = _standardiser(xs)
        x_all, y_all = torch.from_numpy((xs - mu) / scale), torch.from_numpy(ys)
        w, b = _fit_logreg(x_all, y_all, num_classes, strength=chosen, max_iter=config.max_iter)
    else:
        w, b = _fit_logreg(x_fit, y_fit, num_classes, strength=chosen, max_iter=config.max_iter)
    # Fold the standardisation in: (x - mu) / s @ W.T + b == x @ (W / s).T + (b - (W / s) @ mu).
    weight = (w.numpy() / scale).astype(np.float32)
    bias = (b.numpy() - weight @ mu).astype(np.float32)
    head = LinearHead(tuple(classes), weight, bias)
    log_ = TrainingLog(
        method="linear",
        train_size=len(fit_idx),
        val_size=len(val_idx),
        best_step=chosen,
        steps_run=len(history),
        val_accuracy=best_val[0],
        val_loss=best_val[1],
        seconds=round(time.perf_counter() - started, 3),
        history=history,
        extra={"l2_strength": chosen, "refit_on_all": bool(refit), "config": asdict(config)},
    )
    return head, log_


# ================================================================================================ fine-tuning


# Module-name prefixes of each model's blocks, from the top. ``unfreeze=N`` trains the first N groups.
_TOP_BLOCKS: dict[str, tuple[tuple[str, ...], ...]] = {
    "efficientnet_lite0": (
        ("conv_head", "bn2", "blocks.6"),
        ("blocks.5",),
        ("blocks.4",),
        ("blocks.3",),
    ),
    "resnet": (("layer4",), ("layer3",), ("layer2",)),
    "vgg16": (
        ("classifier.0", "classifier.3"),  # fc6, fc7
        ("features.24", "features.26", "features.28"),  # conv5_x
        ("features.17", "features.19", "features.21"),  # conv4_x
    ),
}


def top_blocks(model: str, unfreeze: int) -> tuple[str, ...]:
    """Module-name prefixes of the top ``unfreeze`` blocks of ``model`` (0: none, only the new head).

    Raises:
        HeadError: Unknown model family, or more blocks than the table knows.
    """
    key = "resnet" if model.startswith("resnet") else model
    if key not in _TOP_BLOCKS:
        raise HeadError(f"fine-tuning does not know the blocks of {model!r}; known: {sorted(_TOP_BLOCKS)}")
    groups = _TOP_BLOCKS[key]
    if not 0 <= unfreeze <= len(groups):
        raise HeadError(f"unfreeze must be between 0 and {len(groups)} for {model}, got {unfreeze}")
    return tuple(prefix for group in groups[:unfreeze] for prefix in group)


class FineTunedNet(nn.Module):
    """Backbone without its ImageNet classifier -> L2-normalise -> Linear(C).

    ``trunk(x)`` gives the penultimate features (n, d); normalising them makes the head see exactly the
    vectors of the Embedder's ``penultimate`` layer, so a linear probe initialises it (LP-FT).
    """

    def __init__(self, trunk: nn.Module, dim: int, num_classes: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.trunk(x).flatten(1), dim=1)  # (n, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (n, C)


def _replace_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def build_finetune_net(spec: ModelSpec, base: nn.Module, num_classes: int) -> FineTunedNet:
    """A trainable copy of ``base`` (the pretrained backbone, untouched) with a new head for ``num_classes``.

    Every parameter starts frozen and in float32 on the CPU; :func:`fine_tune` unfreezes the top blocks.
    """
    trunk = copy.deepcopy(base).float().cpu().to(memory_format=torch.contiguous_format)
    _replace_module(trunk, spec.logits_node, nn.Identity())
    trunk.requires_grad_(False)
    net = FineTunedNet(trunk, spec.layers[1].dim, num_classes)
    net.eval()
    return net


class ProgressBar(Protocol):
    """The few methods :func:`fine_tune` calls on a per-epoch progress bar (tqdm has them)."""

    def update(self, n: float | None = 1) -> Any: ...

    def set_postfix(self, *args: Any, **kwargs: Any) -> Any: ...

    def close(self) -> Any: ...


@dataclass(frozen=True)
class FineTuneConfig:
    """Fine-tuning settings: the top ``unfreeze`` blocks and the new head train, BatchNorm stays frozen."""

    epochs: int = 10
    unfreeze: int = 1
    batch_size: int = 16
    lr: float = 1e-4
    head_lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    augment: bool = True
    linear_init: bool = True
    seed: int = 0


def _train_transform(spec: ModelSpec) -> T.Compose:
    """Standard augmentation at the weights' crop size: random resized crop, flip, mild colour jitter."""
    pre = spec.preprocess
    return T.Compose(
        [
            T.ToImage(),
            T.RandomResizedCrop(pre.crop, scale=(0.5, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(pre.mean), std=list(pre.std)),
        ]
    )


def _shrink(images: Sequence[Image.Image], side: int) -> list[Image.Image]:
    """Decode-once copies no larger than needed: augmentation crops then resize from these."""
    out = []
    for img in images:
        if min(img.size) > 2 * side:
            img = img.copy()
            img.thumbnail((max(img.size) * 2 * side // min(img.size),) * 2, Image.Resampling.BILINEAR)
        out.append(img)
    return out


@dataclass(frozen=True)
class _Batches:
    """Images turned into (b, 3, crop, crop) batches on the fly (never the whole set in one tensor)."""

    pictures: Sequence[Image.Image]
    indices: np.ndarray
    transform: Callable[[Image.Image], torch.Tensor]
    batch_size: int

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.indices), self.batch_size):
            chunk = self.indices[start : start + self.batch_size]
            yield torch.stack([self.transform(self.pictures[int(i)]) for i in chunk])


@torch.inference_mode()
def _evaluate_net(
    net: FineTunedNet, batches: _Batches, y: torch.Tensor, device: torch.device
) -> tuple[float, float]:
    logits = torch.cat([net(x.to(device)).float().cpu() for x in batches])  # (n, C)
    loss = float(F.cross_entropy(logits, y, weight=_class_weights(y, logits.shape[1])))
    return float((logits.argmax(1) == y).float().mean()), loss


@torch.inference_mode()
def finetuned_probabilities(
    net: FineTunedNet,
    images: Sequence[Image.Image],
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
) -> np.ndarray:
    """(n, C) class probabilities of a fine-tuned network on images (``transform``: the classification
    crop the weights expect), in batches."""
    batches = _Batches(images, np.arange(len(images)), transform, batch_size)
    logits = torch.cat([net(x.to(device)).float().cpu() for x in batches])  # (n, C)
    return logits.softmax(dim=1).numpy()


@torch.inference_mode()
def _features(net: FineTunedNet, batches: _Batches, device: torch.device) -> np.ndarray:
    return torch.cat([net.features(x.to(device)).float().cpu() for x in batches]).numpy()  # (n, d)


def fine_tune(
    spec: ModelSpec,
    base: nn.Module,
    images: Sequence[Image.Image],
    labels: Sequence[int] | np.ndarray,
    classes: Sequence[str],
    *,
    config: FineTuneConfig | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], ProgressBar] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> tuple[FineTunedNet, TrainingLog]:
    """Fine-tune the top of ``base`` on labelled images; keep the best epoch by validation accuracy.

    Args:
        spec: The model's registry entry (preprocessing, classifier node, dims).
        base: The pretrained backbone (not modified: a copy is trained).
        images: RGB training images.
        labels: Class index of each image.
        classes: Class names.
        config: Settings (defaults: :class:`FineTuneConfig`).
        device: Where to train.
        progress: ``progress(epoch, n_batches)`` returns a per-epoch bar (``update(n)``, ``set_postfix``,
            ``close``); None shows nothing.
        on_epoch: Called with each epoch's metrics.

    Returns:
        The fine-tuned network (eval mode, on ``device``, best epoch's weights) and the training log.

    Raises:
        TrainingDataError: Fewer than 2 classes or a class without examples.
        HeadError: Unknown model family for fine-tuning.
    """
    config = config or FineTuneConfig()
    started = time.perf_counter()
    ys = np.asarray(labels, dtype=np.int64)
    if len(images) != len(ys) or not len(images):
        raise TrainingDataError(f"got {len(images)} images for {len(ys)} labels")
    _check_labels(ys, classes, "training data")
    if config.epochs < 0 or config.batch_size < 1:
        raise HeadError(f"epochs must be >= 0 and batch_size >= 1, got {config.epochs}, {config.batch_size}")
    prefixes = top_blocks(spec.name, config.unfreeze)
    device = torch.device(device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    net = build_finetune_net(spec, base, len(classes))
    fit_idx, val_idx = stratified_split(ys, config.val_fraction, seed=config.seed)
    pictures = _shrink(images, spec.preprocess.resize)
    eval_tf = build_transform(spec.preprocess)
    train_tf = _train_transform(spec) if config.augment else eval_tf
    fit_plain = _Batches(pictures, fit_idx, eval_tf, config.batch_size)
    val_x = _Batches(pictures, val_idx, eval_tf, config.batch_size) if len(val_idx) else None
    y_fit = torch.from_numpy(ys[fit_idx])
    y_val = torch.from_numpy(ys[val_idx])
    net.to(device)

    lp_log: dict[str, Any] = {}
    if config.linear_init:
        # LP-FT: start from the linear probe on the same (frozen, penultimate) features, so fine-tuning
        # refines a good classifier instead of back-propagating a random head's noise into the backbone.
        feats = _features(net, fit_plain, device)
        probe, probe_log = train_linear(
            feats, ys[fit_idx], classes, LinearConfig(val_fraction=0.2 if len(fit_idx) >= 10 else 0.0)
        )
        with torch.no_grad():
            net.head.weight.copy_(torch.from_numpy(probe.weight))
            net.head.bias.copy_(torch.from_numpy(probe.bias))
        lp_log = {"linear_init_l2_strength": probe_log.best_step}

    trainable = [p for n, p in net.trunk.named_parameters() if _prefix_ok(n, prefixes)]
    for p in trainable:
        p.requires_grad_(True)
    net.head.requires_grad_(True)
    opt = torch.optim.AdamW(
        [
            {"params": list(net.head.parameters()), "lr": config.head_lr},
            {"params": trainable, "lr": config.lr},
        ],
        weight_decay=config.weight_decay,
    )
    cw = _class_weights(y_fit, len(classes)).to(device)

    def score() -> tuple[float, float]:
        if val_x is None:
            return _evaluate_net(net, fit_plain, y_fit, device)
        return _evaluate_net(net, val_x, y_val, device)

    best_acc, best_loss = score()
    best_epoch, best_state = 0, _trainable_state(net, prefixes)
    history: list[dict[str, float]] = [{"epoch": 0, "val_accuracy": best_acc, "val_loss": best_loss}]
    n_batches = math.ceil(len(fit_idx) / config.batch_size)
    for epoch in range(1, config.epochs + 1):
        # eval() on purpose: BatchNorm keeps its ImageNet statistics (batches of 16 estimate them badly)
        # and dropout stays off; gradients still flow to the unfrozen blocks and the head.
        net.eval()
        order = torch.randperm(len(fit_idx), generator=generator)
        bar = progress(epoch, n_batches) if progress is not None else None
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            x = torch.stack([train_tf(pictures[int(fit_idx[i])]) for i in batch]).to(device)
            loss = F.cross_entropy(net(x), y_fit[batch].to(device), weight=cw)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        acc, vloss = score()
        row = {"epoch": epoch, "loss": total / len(order), "val_accuracy": acc, "val_loss": vloss}
        history.append(row)
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.3f}", val_acc=f"{acc:.3f}")
            bar.close()
        if on_epoch is not None:
            on_epoch(row)
        if (acc, -vloss) > (best_acc, -best_loss):
            best_acc, best_loss, best_epoch, best_state = acc, vloss, epoch, _trainable_state(net, prefixes)
    net.load_state_dict(best_state, strict=False)
    net.requires_grad_(False)
    net.eval()
    log_ = TrainingLog(
        method="finetune",
        train_size=len(fit_idx),
        val_size=len(val_idx),
        best_step=best_epoch,
        steps_run=config.epochs,
        val_accuracy=best_acc if val_x is not None else None,
        val_loss=best_loss if val_x is not None else None,
        seconds=round(time.perf_counter() - started, 3),
        history=history,
        extra={
            "config": asdict(config),
            "unfrozen": list(prefixes),
            "trainable_parameters": sum(p.numel() for p in trainable)
            + sum(p.numel() for p in net.head.parameters()),
            "device": str(device),
            **lp_log,
        },
    )
    return net, log_


def _prefix_ok(name: str, prefixes: tuple[str, ...]) -> bool:
    """``blocks.6`` must match ``blocks.6.0.conv`` but not ``blocks.60``."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def finetune_state(net: FineTunedNet, prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tensors a fine-tuned head must save: the unfrozen blocks (parameters and BN buffers) and the
    new head; everything else is the base weights."""
    return _trainable_state(net, tuple(prefixes))


def _trainable_state(net: FineTunedNet, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in net.state_dict().items():
        if name.startswith("head.") or (
            name.startswith("trunk.") and _prefix_ok(name[len("trunk.") :], prefixes)
        ):
            state[name] = tensor.detach().clone().cpu()
    return state


# ================================================================================================ metrics


def evaluate(
    y_true: Sequence[int] | np.ndarray, probabilities: np.ndarray, classes: Sequence[str], *, top_k: int = 2
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, top-k accuracy, per-class precision/recall/F1 and the confusion matrix.

    Args:
        y_true: (n,) true class indices.
        probabilities: (n, C) scores (any monotone score works; argmax is the prediction).
        classes: Class names (C).
        top_k: k for the top-k accuracy (capped at C).

    Returns:
        A JSON-ready dict; ``confusion[i][j]`` counts images of class i predicted as j.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    num_classes = len(classes)
    if p.ndim != 2 or p.shape != (len(y), num_classes):
        raise HeadError(f"expected ({len(y)}, {num_classes}) scores, got {p.shape}")
    pred = p.argmax(axis=1) if len(y) else np.zeros(0, dtype=np.int64)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    k = max(1, min(top_k, num_classes))
    topk = np.argsort(-p, axis=1)[:, :k] if len(y) else np.zeros((0, k), dtype=np.int64)
    per_class: dict[str, dict[str, float | int]] = {}
    recalls = []
    for c, name in enumerate(classes):
        tp = int(confusion[c, c])
        support = int(confusion[c].sum())
        predicted = int(confusion[:, c].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        if support:
            recalls.append(recall)
        per_class[name] = {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "support": support,
        }
    n = len(y)
    return {
        "n": n,
        "accuracy": round(float((pred == y).mean()), 4) if n else 0.0,
        "balanced_accuracy": round(float(np.mean(recalls)), 4) if recalls else 0.0,
        f"top{k}_accuracy": round(float((topk == y[:, None]).any(axis=1).mean()), 4) if n else 0.0,
        "chance": round(1.0 / num_classes, 4),
        "per_class": per_class,
        "classes": list(classes),
        "confusion": confusion.tolist(),
    }


def predictions_from_probabilities(
    probabilities: np.ndarray, classes: Sequence[str], *, k: int
) -> list[list[Prediction]]:
    """(n, C) probabilities -> top-k :class:`Prediction` per row, best first (class_index = position in classes)."""
    if k < 1:
        raise HeadError(f"k must be >= 1, got {k}")
    out = []
    for row in np.asarray(probabilities, dtype=np.float64):
        order = np.argsort(-row, kind="stable")[: min(k, len(classes))]
        out.append(
            [Prediction(label=classes[i], class_index=int(i), probability=float(row[i])) for i in order]
        )
    return out


def knn_vote(labels: Sequence[str], similarities: Sequence[float]) -> list[tuple[str, float]]:
    """Similarity-weighted vote of neighbours: ``(label, share of the total weight)``, best first.

    Weights are the cosine similarities clipped at a small positive floor, so a dissimilar neighbour
    counts for almost nothing and an all-negative neighbourhood still votes by count.
    """
    if len(labels) != len(similarities):
        raise HeadError(f"got {len(labels)} labels for {len(similarities)} similarities")
    totals: dict[str, float] = {}
    for label, sim in zip(labels, similarities, strict=True):
        totals[label] = totals.get(label, 0.0) + max(float(sim), 1e-3)
    mass = sum(totals.values())
    if not mass:
        return []
    return sorted(((lab, w / mass) for lab, w in totals.items()), key=lambda t: (-t[1], t[0]))


# ================================================================================================ identity


def _normalized(fp: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(json.dumps(fp, sort_keys=True, allow_nan=False))
    return result


def fingerprint_differences(
    stored: dict[str, Any], given: dict[str, Any], keys: Sequence[str] | None = None
) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ after JSON normalisation (the store's comparison), limited to ``keys``
    when given; ``None`` marks a key one side lacks."""
    a, b = _normalized(stored), _normalized(given)
    wanted = sorted(set(a) | set(b)) if keys is None else list(keys)
    return {key: (a.get(key), b.get(key)) for key in wanted if a.get(key) != b.get(key)}


def check_compatible(manifest: HeadManifest, fingerprint: dict[str, Any]) -> None:
    """Refuse a head trained on other features than ``fingerprint`` (the running embedder's).

    Raises:
        IncompatibleHeadError: The message names every differing key with the head's and the given value.
    """
    diffs = fingerprint_differences(manifest.fingerprint, fingerprint, manifest.compatible_on)
    if diffs:
        parts = "; ".join(
            f"{k}: head={json.dumps(a, sort_keys=True)[:120]} server={json.dumps(b, sort_keys=True)[:120]}"
            for k, (a, b) in diffs.items()
        )
        raise IncompatibleHeadError(
            f"classifier {manifest.name!r} was trained on other features than this embedder's ({parts}); "
            "retrain it with `deepfeat train-classifier` against this data dir",
            differences=diffs,
        )


def embedder_kwargs(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Embedder keyword arguments that reproduce a recorded fingerprint (model, weights, layer, pooling,
    resize mode, scales). ``weights`` is absent when it cannot be derived (a checkpoint file)."""
    kwargs: dict[str, Any] = {"model": fingerprint.get("model"), "layer": fingerprint.get("layer")}
    pooling = str(fingerprint.get("pooling", "none"))
    if pooling.startswith("gem(p="):
        kwargs["pooling"] = "gem"
        kwargs["gem_p"] = float(pooling[len("gem(p=") : -1])
    elif pooling != "none":
        kwargs["pooling"] = pooling
    preprocess = fingerprint.get("preprocess") or {}
    if preprocess.get("mode") in ("crop", "full"):
        kwargs["resize_mode"] = preprocess["mode"]
        if preprocess["mode"] == "full" and preprocess.get("max_side"):
            kwargs["max_side"] = int(preprocess["max_side"])
    if fingerprint.get("scales"):
        kwargs["scales"] = tuple(fingerprint["scales"])
    weights = weights_argument(str(fingerprint.get("weights", "")))
    if weights is not None:
        kwargs["weights"] = weights
    return {k: v for k, v in kwargs.items() if v is not None}


# ================================================================================================ save / load


@dataclass(frozen=True)
class HeadManifest:
    """The parsed ``head.json``."""

    name: str
    method: str
    classes: tuple[str, ...]
    fingerprint: dict[str, Any]
    compatible_on: tuple[str, ...] | None = None
    """Fingerprint keys that must match the server's (None: all of them, as for the store)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    created_at: float = 0.0
    format_version: int = HEAD_FORMAT_VERSION

    @property
    def weights_file(self) -> str:
        return LINEAR_FILE if self.method == "linear" else FINETUNE_FILE

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["classes"] = list(self.classes)
        data["compatible_on"] = None if self.compatible_on is None else list(self.compatible_on)
        return data

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "head.json") -> HeadManifest:
        """Validate a decoded manifest.

        Raises:
            CorruptHeadError: Missing or mistyped fields, or a newer format version.
        """
        if not isinstance(data, dict):
            raise CorruptHeadError(f"{where}: expected a JSON object")
        try:
            version = int(data["format_version"])
            if version > HEAD_FORMAT_VERSION:
                raise CorruptHeadError(
                    f"{where}: format_version {version} is newer than the supported {HEAD_FORMAT_VERSION}"
                )
            method = str(data["method"])
            if method not in METHODS:
                raise CorruptHeadError(f"{where}: unknown method {method!r}; expected one of {METHODS}")
            classes = data["classes"]
            if (
                not isinstance(classes, list)
                or len(classes) < 2
                or not all(isinstance(c, str) for c in classes)
            ):
                raise CorruptHeadError(f"{where}: classes must be a list of at least 2 names")
            fingerprint = data["fingerprint"]
            if not isinstance(fingerprint, dict) or fingerprint.get("version") != FINGERPRINT_VERSION:
                raise CorruptHeadError(f"{where}: fingerprint missing or of another version")
            compatible_on = data.get("compatible_on")
            files = data.get("files") or {}
            if not isinstance(files, dict):
                raise CorruptHeadError(f"{where}: files must be an object")
            return cls(
                name=str(data["name"]),
                method=method,
                classes=tuple(classes),
                fingerprint=fingerprint,
                compatible_on=None if compatible_on is None else tuple(str(k) for k in compatible_on),
                metrics=dict(data.get("metrics") or {}),
                training=dict(data.get("training") or {}),
                files={str(k): dict(v) for k, v in files.items()},
                created_at=float(data.get("created_at", 0.0)),
                format_version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptHeadError(f"{where}: malformed manifest ({exc!r})") from exc


def linear_bytes(head: LinearHead) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, weight=head.weight.astype(np.float32), bias=head.bias.astype(np.float32))
    return buf.getvalue()


def finetune_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_head(
    root: str | Path,
    manifest: HeadManifest,
    files: dict[str, bytes],
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``root/NAME/`` atomically: everything goes to a hidden temporary directory in ``root``,
    is fsynced, and the directory is renamed into place. A failure at any point leaves no ``NAME/``
    (or the previous one, when overwriting) and no temporary directory.

    Args:
        root: The classifiers directory (``DATA_DIR/classifiers``), created when missing.
        manifest: The head's manifest; checksums of ``files`` are added to it.
        files: File name -> bytes (the weight file, and extras such as a report or a PNG).
        overwrite: Replace an existing head of that name.

    Returns:
        The head's directory.

    Raises:
        InvalidHeadNameError: Bad name.
        HeadExistsError: The name is taken and ``overwrite`` is false.
        HeadError: Missing weight file, or a file name with a path in it.
    """
    name = check_head_name(manifest.name)
    root = Path(root)
    if manifest.weights_file not in files:
        raise HeadError(f"a {manifest.method} head needs its {manifest.weights_file}")
    for fname in files:
        if fname != Path(fname).name or fname.startswith(".") or fname == MANIFEST_FILE:
            raise HeadError(f"invalid file name {fname!r} in a head")
    target = root / name
    if target.exists() and not overwrite:
        raise HeadExistsError(
            f"a classifier named {name!r} already exists in {root}; pass --overwrite to replace it"
        )
    root.mkdir(parents=True, exist_ok=True)
    checksums = {
        fname: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        for fname, data in files.items()
    }
    full = replace(manifest, files=checksums, created_at=manifest.created_at or time.time())
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    old: Path | None = None
    try:
        for fname, data in {**files, MANIFEST_FILE: _manifest_bytes(full)}.items():
            with open(tmp / fname, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=root))
            os.replace(target, old / name)
        os.replace(tmp, target)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / name).exists() and not target.exists():
            os.replace(old / name, target)  # put the previous head back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    log.info(
        "saved %s classifier %r (%d classes) in %s", manifest.method, name, len(manifest.classes), target
    )
    return target


def _manifest_bytes(manifest: HeadManifest) -> bytes:
    return (json.dumps(manifest.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def read_manifest(head_dir: str | Path) -> HeadManifest:
    """Parse ``head_dir/head.json`` (the name must match the directory's).

    Raises:
        CorruptHeadError: Missing, unreadable or malformed.
    """
    head_dir = Path(head_dir)
    path = head_dir / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorruptHeadError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptHeadError(f"cannot read {path}: {exc}") from exc
    manifest = HeadManifest.from_dict(data, where=str(path))
    if manifest.name != head_dir.name:
        raise CorruptHeadError(
            f"{path}: name {manifest.name!r} does not match the directory {head_dir.name!r}"
        )
    return manifest


def _read_checked(head_dir: Path, manifest: HeadManifest, fname: str) -> bytes:
    path = head_dir / fname
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorruptHeadError(f"cannot read {path}: {exc}") from exc
    expected = manifest.files.get(fname, {}).get("sha256")
    if expected is None or hashlib.sha256(data).hexdigest() != expected:
        raise CorruptHeadError(f"{path} does not match the checksum in {MANIFEST_FILE}")
    return data


def load_linear(head_dir: str | Path, manifest: HeadManifest) -> LinearHead:
    """The linear head's weights, checksum-verified.

    Raises:
        CorruptHeadError: Missing file, bad checksum, or weights of the wrong shape.
    """
    data = _read_checked(Path(head_dir), manifest, LINEAR_FILE)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            weight = np.asarray(npz["weight"], dtype=np.float32)
            bias = np.asarray(npz["bias"], dtype=np.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise CorruptHeadError(f"{head_dir}/{LINEAR_FILE}: {exc}") from exc
    num_classes, dim = len(manifest.classes), manifest.fingerprint.get("dim")
    if weight.shape != (num_classes, dim) or bias.shape != (num_classes,) or not np.isfinite(weight).all():
        raise CorruptHeadError(
            f"{head_dir}/{LINEAR_FILE}: weight {weight.shape} / bias {bias.shape} do not fit "
            f"{num_classes} classes of dim {dim}"
        )
    return LinearHead(manifest.classes, weight, bias)


def load_finetune_state(head_dir: str | Path, manifest: HeadManifest) -> dict[str, torch.Tensor]:
    """The fine-tuned tensors (checksum-verified, loaded without pickle code execution).

    Raises:
        CorruptHeadError: Missing file, bad checksum, not a tensor dict.
    """
    data = _read_checked(Path(head_dir), manifest, FINETUNE_FILE)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, EOFError, OSError) as exc:  # torch's unpickler errors
        raise CorruptHeadError(f"{head_dir}/{FINETUNE_FILE}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CorruptHeadError(f"{head_dir}/{FINETUNE_FILE}: not a dict of tensors")
    return state


def finetuned_from_state(
    spec: ModelSpec, base: nn.Module, manifest: HeadManifest, state: dict[str, torch.Tensor]
) -> FineTunedNet:
    """Rebuild a fine-tuned network: a copy of the base backbone with the saved tensors loaded over it.

    Raises:
        CorruptHeadError: The saved tensors do not fit this backbone.
    """
    net = build_finetune_net(spec, base, len(manifest.classes))
    expected = set(net.state_dict())
    unknown = sorted(set(state) - expected)
    if unknown or "head.weight" not in state:
        raise CorruptHeadError(
            f"classifier {manifest.name!r}: saved tensors do not fit {spec.name} (unexpected: {unknown[:5]})"
        )
    try:
        net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise CorruptHeadError(f"classifier {manifest.name!r}: {str(exc)[:300]}") from exc
    net.requires_grad_(False)
    return net.eval()


def iter_head_dirs(root: str | Path) -> Iterator[Path]:
    """Sub-directories of ``root`` that may be heads (hidden ones, such as temporary saves, skipped)."""
    root = Path(root)
    try:
        entries = sorted(root.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        if not entry.name.startswith(".") and entry.is_dir():
            yield entry
