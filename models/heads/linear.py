"""The linear probe: a multinomial logistic regression on frozen, L2-normalised embeddings.

Any layer and pooling the Embedder offers works. The head is class-balanced, its L2 strength chosen on
a validation split by walking the regularisation path from strong to weak and stopping early when
validation stops improving, then refit on all the training data. The standardisation it trains with is
folded into the weights, so serving is one ``(n, d) @ (d, C)`` on the embedding the server already
computes.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from deepfeat.models.heads.errors import HeadError, TrainingDataError
from deepfeat.models.heads.training import TrainingLog, check_labels, class_weights, stratified_split

__all__ = ["LinearHead", "LinearConfig", "train_linear"]


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
    cw = class_weights(y, num_classes)
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
        loss = float(F.cross_entropy(logits, y, weight=class_weights(y, num_classes)))
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
    check_labels(ys, classes, "training data")
    torch.manual_seed(config.seed)
    num_classes = len(classes)

    with _few_threads(float(xs.shape[0]) * xs.shape[1] * num_classes):
        return _train_linear(xs, ys, classes, config, started)


@dataclass(frozen=True)
class _PathChoice:
    """Where the walk along the regularisation path stopped, and what it saw on the way."""

    strength: float
    val_accuracy: float | None
    val_loss: float | None
    history: list[dict[str, float]]


def _walk_path(
    fit: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    config: LinearConfig,
) -> _PathChoice:
    """Fit each strength from strong to weak (warm-started), keep the best validation score, stop after
    ``patience`` strengths without improvement."""
    history: list[dict[str, float]] = []
    chosen = config.strengths[len(config.strengths) // 2]
    best_key = (-1.0, -math.inf)
    best_val: tuple[float | None, float | None] = (None, None)
    init = None
    since_best = 0
    for strength in config.strengths:
        init = _fit_logreg(*fit, num_classes, strength=strength, max_iter=config.max_iter, init=init)
        bal, acc, loss = _val_score(*init, *val, num_classes)
        history.append(
            {"strength": strength, "val_balanced_accuracy": bal, "val_accuracy": acc, "val_loss": loss}
        )
        if (bal, -loss) > best_key:
            chosen, best_key, best_val, since_best = strength, (bal, -loss), (acc, loss), 0
        else:
            since_best += 1
            if since_best >= config.patience:
                break
    return _PathChoice(chosen, best_val[0], best_val[1], history)


def _train_linear(
    xs: np.ndarray, ys: np.ndarray, classes: Sequence[str], config: LinearConfig, started: float
) -> tuple[LinearHead, TrainingLog]:
    num_classes = len(classes)
    fit_idx, val_idx = stratified_split(ys, config.val_fraction, seed=config.seed)
    mu, scale = _standardiser(xs[fit_idx])
    fit = torch.from_numpy((xs[fit_idx] - mu) / scale), torch.from_numpy(ys[fit_idx])
    if len(val_idx):
        val = torch.from_numpy((xs[val_idx] - mu) / scale), torch.from_numpy(ys[val_idx])
        choice = _walk_path(fit, val, num_classes, config)
    else:
        choice = _PathChoice(config.strengths[len(config.strengths) // 2], None, None, [])
    refit = config.refit or not len(val_idx)
    if refit:
        mu, scale = _standardiser(xs)
        fit = torch.from_numpy((xs - mu) / scale), torch.from_numpy(ys)
    w, b = _fit_logreg(*fit, num_classes, strength=choice.strength, max_iter=config.max_iter)
    # Fold the standardisation in: (x - mu) / s @ W.T + b == x @ (W / s).T + (b - (W / s) @ mu).
    weight = (w.numpy() / scale).astype(np.float32)
    bias = (b.numpy() - weight @ mu).astype(np.float32)
    head = LinearHead(tuple(classes), weight, bias)
    log_ = TrainingLog(
        method="linear",
        train_size=len(fit_idx),
        val_size=len(val_idx),
        best_step=choice.strength,
        steps_run=len(choice.history),
        val_accuracy=choice.val_accuracy,
        val_loss=choice.val_loss,
        seconds=round(time.perf_counter() - started, 3),
        history=choice.history,
        extra={"l2_strength": choice.strength, "refit_on_all": bool(refit), "config": asdict(config)},
    )
    return head, log_
