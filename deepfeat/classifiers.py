"""The classifiers a server offers: ``imagenet`` (the weights' own head), ``knn`` (a similarity-weighted
vote of the nearest store images that carry a ``label`` in their metadata) and the heads saved under
``DATA_DIR/classifiers/NAME/`` by ``deepfeat train-classifier``.

Heads are picked up without a restart: listing rescans the directory (a ``listdir`` and one ``stat`` per
head), and asking for a name that is not loaded, or whose ``head.json`` changed, rescans or reloads it.
A head trained on other features than the running embedder's (another model, weights, layer, pooling,
resize mode...) is refused at load, logged once with the differing keys, left out of the list of usable
classifiers (reported under ``refused``), and answered with ``IncompatibleHeadError`` (409
``incompatible_classifier`` in the service).

This is domain logic the CLI needs without the web stack: it composes ``models`` and ``index`` and never
imports ``deepfeat.app``; the service maps the head errors to HTTP in ``app/errors.py``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from deepfeat.index.store import ImageStore
from deepfeat.models.embedder import Embedder, Prediction
from deepfeat.models.heads import (
    MANIFEST_FILE,
    CorruptHeadError,
    FineTunedNet,
    HeadManifest,
    IncompatibleHeadError,
    InvalidHeadNameError,
    LinearHead,
    NoLabelsError,
    UnknownHeadError,
    check_compatible,
    check_head_name,
    finetuned_from_state,
    finetuned_probabilities,
    iter_head_dirs,
    knn_vote,
    load_finetune_state,
    load_linear,
    predictions_from_probabilities,
    read_manifest,
)

__all__ = [
    "CLASSIFIERS_DIR",
    "DEFAULT_CLASSIFIER",
    "KNN_NEIGHBOURS",
    "LABEL_KEY",
    "ClassifierRegistry",
    "LoadedHead",
    "Refused",
    "Neighbour",
    "load_head",
    "knn_classify",
    "describe_reserved",
]

log = logging.getLogger(__name__)

CLASSIFIERS_DIR = "classifiers"
DEFAULT_CLASSIFIER = "imagenet"
LABEL_KEY = "label"
KNN_NEIGHBOURS = 10
"""Labelled neighbours that vote (a setting candidate: DEEPFEAT_KNN_NEIGHBOURS)."""
KNN_MAX_FETCH = 1000
"""Most nearest images examined to find labelled ones, so a store with few labels cannot make one
request read a million records."""
_LABELS_REFRESH_S = 5.0
_LABELS_MAX_AGE_S = 30.0
_LABELS_THROTTLE_ABOVE = 50_000

Signature = tuple[int, int, int]


def _signature(head_dir: Path) -> Signature:
    st = os.stat(head_dir / MANIFEST_FILE)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


@dataclass
class LoadedHead:
    """A saved head ready to predict: a linear map on the server's embedding, or its own fine-tuned net."""

    manifest: HeadManifest
    path: Path
    signature: Signature
    linear: LinearHead | None = None
    net: FineTunedNet | None = None
    transform: Callable[[Image.Image], torch.Tensor] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return self.manifest.name

    def probabilities(
        self, images: Sequence[Image.Image], *, embed: Callable[[Sequence[Image.Image]], np.ndarray]
    ) -> np.ndarray:
        """(n, C) class probabilities. ``embed`` gives the server's embeddings (micro-batched in the
        service); a fine-tuned head runs its own network on the classification crop instead."""
        if self.linear is not None:
            return self.linear.probabilities(embed(images))
        if self.net is None or self.transform is None:  # pragma: no cover - load_head sets one or the other
            raise CorruptHeadError(f"classifier {self.name!r} has no weights loaded")
        with self.lock:  # one forward pass at a time: each already uses every core
            return finetuned_probabilities(self.net, images, self.transform, device=self.device)

    def predict(
        self,
        images: Sequence[Image.Image],
        *,
        embed: Callable[[Sequence[Image.Image]], np.ndarray],
        k: int,
    ) -> list[list[Prediction]]:
        """Top-k of the head's classes per image, best first."""
        probs = self.probabilities(images, embed=embed)
        return predictions_from_probabilities(probs, self.manifest.classes, k=k)


@dataclass(frozen=True)
class Refused:
    """A head directory the server will not use, and why."""

    name: str
    code: str
    reason: str
    signature: Signature | None = None


def load_head(head_dir: Path, embedder: Embedder, *, signature: Signature | None = None) -> LoadedHead:
    """Load and verify one saved head for ``embedder``.

    Raises:
        InvalidHeadNameError: The directory name is not a valid head name.
        CorruptHeadError: Missing/malformed manifest, bad checksum, tensors that do not fit.
        IncompatibleHeadError: Trained on other features than ``embedder``'s.
    """
    check_head_name(head_dir.name)
    if signature is None:
        try:
            signature = _signature(head_dir)
        except OSError as exc:
            raise CorruptHeadError(f"{head_dir / MANIFEST_FILE}: {exc.strerror or exc}") from None
    manifest = read_manifest(head_dir)
    check_compatible(manifest, embedder.fingerprint)
    if manifest.method == "linear":
        return LoadedHead(manifest, head_dir, signature, linear=load_linear(head_dir, manifest))
    state = load_finetune_state(head_dir, manifest)
    # The server's own backbone is the base (the compatibility check guarantees the same weights).
    net = finetuned_from_state(embedder.spec, embedder.backbone, manifest, state).to(embedder.device)
    return LoadedHead(
        manifest,
        head_dir,
        signature,
        net=net,
        transform=embedder.classify_transform,
        device=embedder.device,
    )


class ClassifierRegistry:
    """Saved heads of one data directory, for one running embedder, reloaded as the directory changes.

    Args:
        root: ``DATA_DIR/classifiers`` (need not exist yet).
        embedder: The server's embedder: heads must match its fingerprint.
    """

    def __init__(self, root: str | Path, embedder: Embedder) -> None:
        self.root = Path(root)
        self.embedder = embedder
        self._lock = threading.RLock()
        self._entries: dict[str, LoadedHead | Refused] = {}
        self._labels: tuple[float, int, dict[str, int]] | None = None

    # -- loading -------------------------------------------------------------------------------

    def _load(self, head_dir: Path, signature: Signature) -> LoadedHead | Refused:
        try:
            head = load_head(head_dir, self.embedder, signature=signature)
        except (IncompatibleHeadError, CorruptHeadError, InvalidHeadNameError) as exc:
            log.warning("classifier %r refused: [%s] %s", head_dir.name, exc.code, exc)
            return Refused(head_dir.name, exc.code, str(exc), signature)
        log.info(
            "classifier %r loaded: %s, %d classes",
            head.name,
            head.manifest.method,
            len(head.manifest.classes),
        )
        return head

    def scan(self) -> None:
        """Bring the registry in line with the directory: load new or changed heads, drop removed ones."""
        with self._lock:
            seen: dict[str, LoadedHead | Refused] = {}
            for head_dir in iter_head_dirs(self.root):
                name = head_dir.name
                try:
                    signature = _signature(head_dir)
                except OSError:
                    previous = self._entries.get(name)
                    if isinstance(previous, Refused) and previous.signature is None:
                        seen[name] = previous
                        continue
                    reason = f"{head_dir} has no readable {MANIFEST_FILE}"
                    log.warning("classifier %r refused: %s", name, reason)
                    seen[name] = Refused(name, CorruptHeadError.code, reason)
                    continue
                previous = self._entries.get(name)
                if previous is not None and previous.signature == signature:
                    seen[name] = previous
                else:
                    seen[name] = self._load(head_dir, signature)
            for gone in set(self._entries) - set(seen):
                log.info("classifier %r removed", gone)
            self._entries = seen

    def _current(self, name: str) -> LoadedHead | Refused | None:
        """The entry for ``name``, reloaded when its ``head.json`` changed (one stat)."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        try:
            signature = _signature(entry.path if isinstance(entry, LoadedHead) else self.root / name)
        except OSError:
            return None
        return entry if entry.signature == signature else None

    # -- queries -------------------------------------------------------------------------------

    def get(self, name: str) -> LoadedHead:
        """The loaded head called ``name`` (rescanning the directory once if it is not known yet).

        Raises:
            UnknownHeadError: No such head.
            IncompatibleHeadError / CorruptHeadError: The head exists but is refused.
        """
        entry = self._current(name)
        if entry is None:
            self.scan()
            entry = self._entries.get(name)
        if entry is None:
            available = ", ".join([DEFAULT_CLASSIFIER, "knn", *self.names()])
            raise UnknownHeadError(f"no classifier named {name[:80]!r}; available: {available}")
        if isinstance(entry, Refused):
            if entry.code == IncompatibleHeadError.code:
                raise IncompatibleHeadError(entry.reason)
            raise CorruptHeadError(entry.reason)
        return entry

    def names(self) -> list[str]:
        return sorted(n for n, e in self._entries.items() if isinstance(e, LoadedHead))

    def heads(self) -> tuple[list[LoadedHead], list[Refused]]:
        """Every usable head and every refused one, after a rescan."""
        self.scan()
        with self._lock:
            entries = list(self._entries.values())
        loaded = sorted((e for e in entries if isinstance(e, LoadedHead)), key=lambda e: e.name)
        refused = sorted((e for e in entries if isinstance(e, Refused)), key=lambda e: e.name)
        return loaded, refused

    def label_counts(self, store: ImageStore) -> dict[str, int]:
        """``{label: images}`` over the store, recomputed when its count changed or after 30 s (on a store of
        more than 50k images, at most every 5 s)."""
        now = time.monotonic()
        count = store.count
        cached = self._labels
        if cached is not None:
            age = now - cached[0]
            unchanged = cached[1] == count and age < _LABELS_MAX_AGE_S
            # Counting reads every row's metadata: on a big store, at most once per few seconds.
            throttled = count > _LABELS_THROTTLE_ABOVE and age < _LABELS_REFRESH_S
            if unchanged or throttled:
                return cached[2]
        counts = store.metadata_value_counts(LABEL_KEY)
        self._labels = (now, count, counts)
        return counts


@dataclass(frozen=True)
class Neighbour:
    id: str
    score: float
    label: str


def knn_classify(
    store: ImageStore, vector: np.ndarray, *, neighbours: int = KNN_NEIGHBOURS, k: int = 5
) -> tuple[list[Prediction], list[Neighbour]]:
    """Vote among the ``neighbours`` nearest labelled images, weighted by cosine similarity.

    Args:
        store: The image store (labels are ``metadata["label"]`` strings).
        vector: (1, dim) query embedding.
        neighbours: How many labelled neighbours vote.
        k: Labels returned.

    Returns:
        Top-k ``Prediction`` (probability = share of the similarity-weighted vote; ``class_index`` -1:
        kNN labels have no fixed order) and the neighbours that voted.

    Raises:
        NoLabelsError: No labelled image among the nearest ``KNN_MAX_FETCH``.
    """
    fetch = min(max(4 * neighbours, 32), KNN_MAX_FETCH)
    labelled: list[Neighbour] = []
    while True:
        hits = store.search(vector, k=fetch)[0]
        labelled = []
        for hit in hits:
            label = hit.record.metadata.get(LABEL_KEY)
            if isinstance(label, str) and label:
                labelled.append(Neighbour(hit.id, hit.score, label))
                if len(labelled) == neighbours:
                    break
        if len(labelled) >= neighbours or len(hits) < fetch or fetch >= KNN_MAX_FETCH:
            break
        fetch = min(fetch * 4, KNN_MAX_FETCH)
    if not labelled:
        where = (
            "the store is empty"
            if not store.count
            else f"none of the {min(fetch, store.count)} nearest images has one"
        )
        raise NoLabelsError(
            f"kNN votes with images that carry a {LABEL_KEY!r} in their metadata, and {where}; add some "
            f'(POST /v1/images with metadata {{"{LABEL_KEY}": "cat"}}) or pick another classifier'
        )
    votes = knn_vote([n.label for n in labelled], [n.score for n in labelled])
    predictions = [Prediction(label=label, class_index=-1, probability=share) for label, share in votes[:k]]
    return predictions, labelled


def describe_reserved(embedder: Embedder) -> dict[str, Any]:
    """What ``imagenet`` offers (for ``GET /v1/classifiers``)."""
    return {
        "name": DEFAULT_CLASSIFIER,
        "kind": "imagenet",
        "classes": list(embedder.categories),
        "description": f"the ImageNet-1k head of {embedder.spec.name} ({embedder.weights_identity})",
    }
