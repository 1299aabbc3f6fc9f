"""The flags of ``deepfeat train-classifier`` and ``deepfeat compare-classifiers``, kept apart from
the modules that run them (:mod:`scripts.train_classifier`, :mod:`scripts.compare_classifiers`):
those import torch and the models, and ``--help`` should answer at once."""

from __future__ import annotations

import argparse
from pathlib import Path

from deepfeat.scripts.cli_common import add_common_arguments

__all__ = ["COMPARE_METHODS", "TRAIN_METHODS", "add_compare_arguments", "add_train_arguments"]

TRAIN_METHODS = ("linear", "finetune")
"""What ``train-classifier --method`` trains (the heads ``models.heads`` stores and serves)."""

COMPARE_METHODS = ("linear", "knn", "linear-crop", "finetune", "imagenet")
"""What ``compare-classifiers --methods`` compares (described in :mod:`scripts.compare_classifiers`)."""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("folder", metavar="TRAIN_DIR", help="folder with one sub-folder of images per class")
    parser.add_argument(
        "--name", required=True, help="the classifier's name (POST /v1/classify?classifier=NAME)"
    )
    parser.add_argument(
        "--method", choices=TRAIN_METHODS, default="linear", help="linear probe or fine-tuning"
    )
    parser.add_argument("--test-fraction", type=float, default=0.2, help="held-out share per class (0.2)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="validation share of the rest (0.2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (10)")
    parser.add_argument("--unfreeze", type=int, default=1, help="top blocks fine-tuning trains (1)")
    parser.add_argument(
        "--lr", type=float, help="fine-tuning learning rate of the unfrozen blocks (1e-4; the new head: 10x)"
    )
    parser.add_argument("--train-batch-size", type=int, default=16, help="fine-tuning batch size (16)")
    parser.add_argument("--no-augment", action="store_true", help="fine-tune without augmentation")
    parser.add_argument(
        "--skip-bad", action="store_true", help="train without unusable files instead of failing"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a classifier of the same name")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("folder", metavar="TRAIN_DIR", help="folder with one sub-folder of images per class")
    parser.add_argument("--out", type=Path, default=Path("classifier-comparison"), help="output folder")
    parser.add_argument(
        "--methods",
        default=",".join(COMPARE_METHODS),
        help=f"comma-separated subset of {','.join(COMPARE_METHODS)}",
    )
    parser.add_argument("--test-fraction", type=float, default=0.3, help="held-out share per class (0.3)")
    parser.add_argument("--repeats", type=int, default=1, help="random splits to average over (1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--neighbours", type=int, default=10, help="k of the kNN vote (10)")
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (10)")
    parser.add_argument("--unfreeze", type=int, default=1, help="top blocks fine-tuning trains (1)")
    parser.add_argument(
        "--imagenet-map", default="auto", help="auto, none, a built-in name (tuxpaint) or a JSON file"
    )
    parser.add_argument("--no-progress", action="store_true")
