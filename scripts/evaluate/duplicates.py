"""``deepfeat eval duplicates``: where ``deepfeat duplicates`` should draw its line.

Every photo of the collections' chosen part is added to a store made at the shipped defaults, with
two true copies of it: a JPEG re-save at quality 80, and a half-size copy of a 480 x 360 version (the
small re-post of a photo). Two score distributions come out of the store's own search, the one
``deepfeat duplicates`` groups with:

* **copies**: each copy's score against its photo;
* **distinct**: each photo's best score against any other photo of the collections (none of them
  is a copy of another, as far as the collections' curation found).

On the tuning part the threshold is the midpoint between the lowest copy score and the highest
distinct score (when they overlap, the value that misclassifies fewest pairs); the validation part
reports how many copies it groups and how many distinct photos it wrongly joins.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from deepfeat.scripts.evaluate.errors import EvalError
from deepfeat.scripts.evaluate.runner import list_images
from deepfeat.scripts.evaluate.split import SPLIT_SEED, file_sha256, split_folder

__all__ = ["COPIES", "choose_threshold", "main", "measure"]

log = logging.getLogger(__name__)

COPIES = ("jpeg_q80", "half_of_480x360")


def _copy(image: Image.Image, name: str) -> Image.Image:
    if name == "jpeg_q80":
        out = image
    else:
        small = image.copy()
        small.thumbnail((480, 360), Image.Resampling.LANCZOS)
        out = small.resize((max(1, small.width // 2), max(1, small.height // 2)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    out.convert("RGB").save(buf, format="JPEG", quality=80)
    buf.seek(0)
    with Image.open(buf) as decoded:
        return decoded.convert("RGB")


def measure(paths: Sequence[Path], *, device: str = "cpu") -> dict[str, np.ndarray]:
    """Copy and distinct score distributions of ``paths`` in a store made at the shipped defaults.

    Returns:
        ``{"copies": (n * len(COPIES),) scores, "distinct": (n,) best score against another photo}``.
    """
    from deepfeat.index.store import ImageStore, NewImage
    from deepfeat.models.embedder import Embedder
    from deepfeat.models.images import load_image

    embedder = Embedder(device=device, precision="fp32")
    photos = [load_image(p).image for p in paths]
    copies = [_copy(img, name) for img in photos for name in COPIES]
    with (
        tempfile.TemporaryDirectory(prefix="deepfeat-dups-") as tmp,
        ImageStore.open(Path(tmp) / "store", fingerprint=embedder.fingerprint, dim=embedder.dim) as store,
    ):
        stored = np.concatenate(
            [
                embedder.embed_tensors(embedder.preprocess(photos[i : i + 16]), regions=True)
                for i in range(0, len(photos), 16)
            ]
        )
        results = store.add(
            stored,
            [
                NewImage(sha256=file_sha256(p), source=str(p), width=None, height=None, nbytes=None)
                for p in paths
            ],
        )
        id_of = [r.id for r in results]
        queries = np.concatenate([embedder.embed(copies[i : i + 16]) for i in range(0, len(copies), 16)])
        copy_scores = []
        for j, hits in enumerate(store.search(queries, len(paths))):
            mine = id_of[j // len(COPIES)]
            copy_scores.append(next((h.score for h in hits if h.id == mine), -1.0))
        distinct = []
        for i, hits in enumerate(store.search(stored[:, 0], 2)):
            distinct.append(next((h.score for h in hits if h.id != id_of[i]), -1.0))
    return {"copies": np.asarray(copy_scores), "distinct": np.asarray(distinct)}


def choose_threshold(copies: np.ndarray, distinct: np.ndarray) -> float:
    """The midpoint of the gap between the two distributions, or, where they overlap, the score that
    misclassifies fewest (copies below it plus distinct photos at or above it), rounded to 0.005."""
    low_copy, high_distinct = float(copies.min()), float(distinct.max())
    if low_copy > high_distinct:
        value = (low_copy + high_distinct) / 2
    else:
        candidates = np.unique(np.concatenate([copies, distinct]))
        errors = [(int((copies < t).sum() + (distinct >= t).sum()), -t) for t in candidates]
        value = -min(errors)[1]
    return round(value * 200) / 200


def _summary(scores: dict[str, np.ndarray], threshold: float) -> dict[str, Any]:
    copies, distinct = scores["copies"], scores["distinct"]
    n = len(COPIES)
    return {
        "photos": int(distinct.size),
        "copies_grouped": float((copies >= threshold).mean()),
        "copies_grouped_per_kind": {
            name: float((copies[i::n] >= threshold).mean()) for i, name in enumerate(COPIES)
        },
        "distinct_wrongly_grouped": int((distinct >= threshold).sum()),
        "copy_score_min": float(copies.min()),
        "copy_score_p01": float(np.quantile(copies, 0.01)),
        "distinct_score_max": float(distinct.max()),
        "distinct_score_p99": float(np.quantile(distinct, 0.99)),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepfeat eval duplicates",
        description="Choose the `deepfeat duplicates` threshold on the tuning parts of the collections "
        "and report it on their validation parts (shipped default embedder).",
    )
    parser.add_argument("folders", type=Path, nargs="+", help="collections of distinct photos")
    parser.add_argument("--split-seed", type=int, default=SPLIT_SEED)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    started = time.perf_counter()
    try:
        parts: dict[str, list[Path]] = {"tune": [], "validation": []}
        for folder in args.folders:
            paths = list_images(folder)
            if not paths:
                raise EvalError(f"no images under {folder}")
            split = split_folder(folder, paths, seed=args.split_seed)
            for part in parts:
                parts[part] += split.part(part)
        tune = measure(parts["tune"], device=args.device)
        threshold = choose_threshold(tune["copies"], tune["distinct"])
        validation = measure(parts["validation"], device=args.device)
    except EvalError as exc:
        sys.stderr.write(f"error [{exc.code}]: {exc}\n")
        return 2
    v = _summary(validation, threshold)
    report: dict[str, Any] = {
        "threshold": threshold,
        "tune": _summary(tune, threshold),
        "validation": v,
        "copies": list(COPIES),
        "seconds": round(time.perf_counter() - started, 1),
        "argv": ["eval", "duplicates", *argv],
    }
    sys.stdout.write(
        f"threshold chosen on the tuning part: {threshold}\n"
        f"validation: {v['photos']} photos, copies grouped {v['copies_grouped']:.3f} "
        f"({', '.join(f'{k} {x:.3f}' for k, x in v['copies_grouped_per_kind'].items())}), "
        f"distinct photos wrongly grouped {v['distinct_wrongly_grouped']}; lowest copy score "
        f"{v['copy_score_min']:.3f}, highest distinct score {v['distinct_score_max']:.3f}\n"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0
