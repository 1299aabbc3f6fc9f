"""What ``deepfeat train-classifier`` reports on its held-out split: the metrics and the files predicted
wrong (``report.json``), the confusion matrix as a PNG (``confusion.png``) and the summary it prints."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from deepfeat.models.heads import evaluate
from deepfeat.scripts.train_dataset import Dataset

__all__ = ["confusion_png", "held_out_metrics", "misclassified", "render_confusion_png", "summary_lines"]


def held_out_metrics(
    dataset: Dataset,
    y: np.ndarray,
    test_idx: np.ndarray,
    probabilities: np.ndarray | None,
    report: dict[str, Any],
) -> dict[str, Any]:
    """Metrics on the held-out split ({} without one), recorded in ``report["test"]`` with the files
    predicted wrong."""
    if probabilities is None:
        return {}
    metrics = evaluate(y[test_idx], probabilities, dataset.classes)
    report["test"] = {**metrics, "errors": misclassified(dataset, y, test_idx, probabilities)}
    return metrics


def misclassified(
    dataset: Dataset, y: np.ndarray, test_idx: np.ndarray, probabilities: np.ndarray
) -> list[dict[str, str]]:
    """The held-out files predicted wrong: file (relative to the training folder), true, predicted."""
    return [
        {
            "file": str(dataset.files[i].relative_to(dataset.root)),
            "true": dataset.classes[y[i]],
            "predicted": dataset.classes[int(np.argmax(probabilities[j]))],
        }
        for j, i in enumerate(test_idx)
        if int(np.argmax(probabilities[j])) != y[i]
    ]


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render_confusion_png(
    confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path, *, title: str = ""
) -> Path:
    """Write :func:`confusion_png` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(confusion_png(confusion, classes, title=title))
    return path


def confusion_png(confusion: Sequence[Sequence[int]], classes: Sequence[str], *, title: str = "") -> bytes:
    """A confusion matrix as PNG bytes: rows = true class, columns = predicted, counts in the cells,
    shaded by the share of the row (blue on the diagonal, red off it)."""
    cm = np.asarray(confusion, dtype=np.int64)
    n = len(classes)
    cell = 64
    font, small = _font(15), _font(13)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max(measure.textlength(str(c), font=font) for c in classes)) + 16
    top = label_w + 40
    left = label_w + 28
    width, height = left + n * cell + 16, top + n * cell + 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 6), title, fill="black", font=font)
    row_sums = cm.sum(axis=1, keepdims=True).clip(min=1)
    share = cm / row_sums
    for i in range(n):
        for j in range(n):
            x0, y0 = left + j * cell, top + i * cell
            value = float(share[i, j])
            shade = (
                (int(255 - 205 * value), int(255 - 160 * value), 255)
                if i == j
                else (255, int(255 - 180 * value), int(255 - 180 * value))
            )
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=shade, outline=(200, 200, 200))
            text = str(int(cm[i, j]))
            tw = measure.textlength(text, font=font)
            draw.text(
                (x0 + (cell - tw) / 2, y0 + cell / 2 - 9),
                text,
                fill="white" if value > 0.6 else "black",
                font=font,
            )
        draw.text((8, top + i * cell + cell / 2 - 9), str(classes[i]), fill="black", font=font)
    for j, name in enumerate(classes):
        # Column labels, rotated so long class names fit over narrow columns.
        tw = int(measure.textlength(str(name), font=font)) + 4
        label = Image.new("RGB", (tw, 20), "white")
        ImageDraw.Draw(label).text((2, 1), str(name), fill="black", font=font)
        rotated = label.rotate(90, expand=True)
        img.paste(rotated, (left + j * cell + cell // 2 - 10, top - 8 - rotated.height))
    draw.text((left, top + n * cell + 8), "predicted (columns) vs true (rows)", fill=(90, 90, 90), font=small)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    topk = next((k for k in metrics if k.startswith("top") and k.endswith("_accuracy")), None)
    lines = [
        f"held-out accuracy {metrics['accuracy']:.2%} on {metrics['n']} images "
        f"(balanced {metrics['balanced_accuracy']:.2%}"
        + (f", {topk.removesuffix('_accuracy')} {metrics[topk]:.2%}" if topk else "")
        + f", chance {metrics['chance']:.2%})",
        f"  {'class':<20} {'precision':>9} {'recall':>7} {'f1':>6} {'n':>4}",
    ]
    for name, row in metrics["per_class"].items():
        lines.append(
            f"  {name:<20} {row['precision']:>9.2%} {row['recall']:>7.2%} {row['f1']:>6.2f} {row['support']:>4}"
        )
    return lines
