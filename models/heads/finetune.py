"""Fine-tuning: the backbone with its ImageNet classifier replaced by ``normalise -> Linear(C)``.

The new head is initialised from a linear probe on the same features (LP-FT), then the top block(s) are
unfrozen and trained with standard augmentation; BatchNorm statistics stay frozen (small batches), and
the best epoch by validation accuracy is kept. Only the unfrozen tensors are saved: the rest are the
base weights, which the head's fingerprint names.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2 as T

from deepfeat.models.embedder import build_transform
from deepfeat.models.heads.errors import CorruptHeadError, HeadError, TrainingDataError
from deepfeat.models.heads.linear import LinearConfig, train_linear
from deepfeat.models.heads.storage import HeadManifest
from deepfeat.models.heads.training import TrainingLog, check_labels, class_weights, stratified_split
from deepfeat.models.registry import ModelSpec

__all__ = [
    "FineTuneConfig",
    "FineTunedNet",
    "ProgressBar",
    "top_blocks",
    "build_finetune_net",
    "fine_tune",
    "finetune_state",
    "finetuned_from_state",
    "finetuned_probabilities",
]

# Module-name prefixes of each model's blocks, from the top. ``unfreeze=N`` trains the first N groups.
_TOP_BLOCKS: dict[str, tuple[tuple[str, ...], ...]] = {
    "efficientnet_lite": (  # lite0, lite1, lite2: the same block names
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
    key = next((family for family in ("resnet", "efficientnet_lite") if model.startswith(family)), model)
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
    loss = float(F.cross_entropy(logits, y, weight=class_weights(y, logits.shape[1])))
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


@dataclass(frozen=True)
class _Data:
    """The training images, split once: what the epochs draw augmented batches from, and the plain-crop
    batches that score them (on the validation part, or on the training part when there is none)."""

    pictures: list[Image.Image]
    fit_idx: np.ndarray
    val_idx: np.ndarray
    y_fit: torch.Tensor
    y_val: torch.Tensor
    fit_plain: _Batches
    val_plain: _Batches | None
    train_transform: Callable[[Image.Image], torch.Tensor]

    def score(self, net: FineTunedNet, device: torch.device) -> tuple[float, float]:
        """(accuracy, balanced loss)."""
        if self.val_plain is None:
            return _evaluate_net(net, self.fit_plain, self.y_fit, device)
        return _evaluate_net(net, self.val_plain, self.y_val, device)


def _prepare(spec: ModelSpec, images: Sequence[Image.Image], ys: np.ndarray, config: FineTuneConfig) -> _Data:
    fit_idx, val_idx = stratified_split(ys, config.val_fraction, seed=config.seed)
    pictures = _shrink(images, spec.preprocess.resize)
    eval_tf = build_transform(spec.preprocess)
    return _Data(
        pictures=pictures,
        fit_idx=fit_idx,
        val_idx=val_idx,
        y_fit=torch.from_numpy(ys[fit_idx]),
        y_val=torch.from_numpy(ys[val_idx]),
        fit_plain=_Batches(pictures, fit_idx, eval_tf, config.batch_size),
        val_plain=_Batches(pictures, val_idx, eval_tf, config.batch_size) if len(val_idx) else None,
        train_transform=_train_transform(spec) if config.augment else eval_tf,
    )


def _init_from_linear_probe(
    net: FineTunedNet, data: _Data, ys: np.ndarray, classes: Sequence[str], device: torch.device
) -> dict[str, Any]:
    """LP-FT: start from the linear probe on the same (frozen, penultimate) features, so fine-tuning
    refines a good classifier instead of back-propagating a random head's noise into the backbone."""
    feats = _features(net, data.fit_plain, device)
    probe, probe_log = train_linear(
        feats, ys[data.fit_idx], classes, LinearConfig(val_fraction=0.2 if len(data.fit_idx) >= 10 else 0.0)
    )
    with torch.no_grad():
        net.head.weight.copy_(torch.from_numpy(probe.weight))
        net.head.bias.copy_(torch.from_numpy(probe.bias))
    return {"linear_init_l2_strength": probe_log.best_step}


def _train_epoch(
    net: FineTunedNet,
    data: _Data,
    opt: torch.optim.Optimizer,
    loss_weights: torch.Tensor,
    *,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    bar: ProgressBar | None,
) -> float:
    """One pass over the training part in a random order; returns the mean training loss."""
    order = torch.randperm(len(data.fit_idx), generator=generator)
    total = 0.0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        x = torch.stack([data.train_transform(data.pictures[int(data.fit_idx[i])]) for i in batch]).to(device)
        loss = F.cross_entropy(net(x), data.y_fit[batch].to(device), weight=loss_weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(batch)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    return total / len(order)


def _unfreeze(
    net: FineTunedNet, prefixes: tuple[str, ...], config: FineTuneConfig
) -> tuple[torch.optim.Optimizer, int]:
    """Make the top blocks and the new head trainable; returns their optimiser (the new head at its own
    rate, the pretrained blocks at a gentler one) and how many parameters train."""
    blocks = [p for n, p in net.trunk.named_parameters() if _prefix_ok(n, prefixes)]
    for p in blocks:
        p.requires_grad_(True)
    net.head.requires_grad_(True)
    opt = torch.optim.AdamW(
        [
            {"params": list(net.head.parameters()), "lr": config.head_lr},
            {"params": blocks, "lr": config.lr},
        ],
        weight_decay=config.weight_decay,
    )
    return opt, sum(p.numel() for p in blocks) + sum(p.numel() for p in net.head.parameters())


@dataclass
class _Best:
    """The best epoch so far by validation accuracy (then loss), with the tensors to restore."""

    accuracy: float
    loss: float
    epoch: int
    state: dict[str, torch.Tensor]


def _run_epochs(
    net: FineTunedNet,
    data: _Data,
    opt: torch.optim.Optimizer,
    *,
    prefixes: tuple[str, ...],
    config: FineTuneConfig,
    device: torch.device,
    progress: Callable[[int, int], ProgressBar] | None,
    on_epoch: Callable[[dict[str, float]], None] | None,
) -> tuple[_Best, list[dict[str, float]]]:
    """Train ``config.epochs`` epochs, scoring after each; returns the best epoch and the history."""
    generator = torch.Generator().manual_seed(config.seed)
    loss_weights = class_weights(data.y_fit, net.head.out_features).to(device)
    accuracy, loss = data.score(net, device)
    best = _Best(accuracy, loss, 0, finetune_state(net, prefixes))
    history: list[dict[str, float]] = [{"epoch": 0, "val_accuracy": accuracy, "val_loss": loss}]
    n_batches = math.ceil(len(data.fit_idx) / config.batch_size)
    for epoch in range(1, config.epochs + 1):
        # eval() on purpose: BatchNorm keeps its ImageNet statistics (batches of 16 estimate them badly)
        # and dropout stays off; gradients still flow to the unfrozen blocks and the head.
        net.eval()
        bar = progress(epoch, n_batches) if progress is not None else None
        mean_loss = _train_epoch(
            net,
            data,
            opt,
            loss_weights,
            batch_size=config.batch_size,
            generator=generator,
            device=device,
            bar=bar,
        )
        accuracy, loss = data.score(net, device)
        row = {"epoch": epoch, "loss": mean_loss, "val_accuracy": accuracy, "val_loss": loss}
        history.append(row)
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.3f}", val_acc=f"{accuracy:.3f}")
            bar.close()
        if on_epoch is not None:
            on_epoch(row)
        if (accuracy, -loss) > (best.accuracy, -best.loss):
            best = _Best(accuracy, loss, epoch, finetune_state(net, prefixes))
    return best, history


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
    check_labels(ys, classes, "training data")
    if config.epochs < 0 or config.batch_size < 1:
        raise HeadError(f"epochs must be >= 0 and batch_size >= 1, got {config.epochs}, {config.batch_size}")
    prefixes = top_blocks(spec.name, config.unfreeze)
    device = torch.device(device)
    torch.manual_seed(config.seed)

    net = build_finetune_net(spec, base, len(classes))
    data = _prepare(spec, images, ys, config)
    net.to(device)
    lp_log = _init_from_linear_probe(net, data, ys, classes, device) if config.linear_init else {}

    opt, trainable = _unfreeze(net, prefixes, config)
    best, history = _run_epochs(
        net, data, opt, prefixes=prefixes, config=config, device=device, progress=progress, on_epoch=on_epoch
    )
    net.load_state_dict(best.state, strict=False)
    net.requires_grad_(False)
    net.eval()
    validated = data.val_plain is not None
    log_ = TrainingLog(
        method="finetune",
        train_size=len(data.fit_idx),
        val_size=len(data.val_idx),
        best_step=best.epoch,
        steps_run=config.epochs,
        val_accuracy=best.accuracy if validated else None,
        val_loss=best.loss if validated else None,
        seconds=round(time.perf_counter() - started, 3),
        history=history,
        extra={
            "config": asdict(config),
            "unfrozen": list(prefixes),
            "trainable_parameters": trainable,
            "device": str(device),
            **lp_log,
        },
    )
    return net, log_


def _prefix_ok(name: str, prefixes: Sequence[str]) -> bool:
    """``blocks.6`` must match ``blocks.6.0.conv`` but not ``blocks.60``."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def finetune_state(net: FineTunedNet, prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tensors a fine-tuned head must save: the unfrozen blocks (parameters and BN buffers) and the
    new head; everything else is the base weights."""
    state = {}
    for name, tensor in net.state_dict().items():
        if name.startswith("head.") or (
            name.startswith("trunk.") and _prefix_ok(name[len("trunk.") :], prefixes)
        ):
            state[name] = tensor.detach().clone().cpu()
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
