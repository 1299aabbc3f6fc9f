"""``deepfeat eval``: measure retrieval quality without overfitting the choice to the figures.

Every collection is split into a tuning part and a validation part (``split``: per class or group,
by a fixed-seed hash of each file's content; validation at least as large as tuning). The grid of
models x layers x pooling x whitening x scales x resize mode runs on the tuning parts; one
configuration is chosen there (highest mean primary metric over the collections); then the chosen
configuration, the shipped default (``EmbedderConfig()``) and the naive baseline (penultimate layer,
centre crop, single scale, no whitening) run on the validation parts. The validation figures are
the ones to report.

Two modes, each on one or more collections in one command:

``category DIR [DIR ...]``
    Each DIR holds one sub-folder per class (at least 4 images each). Every image queries all the
    others of its part (exact inner-product search on L2-normalised vectors); a hit is relevant
    when it has the query's class. Primary metric mAP; also P@k and R@k.

``copy DIR [DIR ...] --distractors DIR2 [DIR2 ...]``
    Each DIR holds distinct originals (any depth). Queries are made from each original by seeded
    transforms (``transforms``: a quarter-area off-centre crop, JPEG q10 of a 1/4 downscale, 15 degree
    rotation, strong contrast + desaturation, blur + flip, crop + colour + JPEG) and searched among
    the originals of the same part plus the distractors' part. Primary metric recall@1; also mAP
    (= mean reciprocal rank). A part with fewer distractors than twice its originals is refused
    unless ``--allow-few-distractors``.

Output: a fixed-width report (tuning ranking, the choice, validation rows), ``--json`` and ``--plot``
(the tuning grid of each collection).

The parts: ``split`` (the tuning/validation split), ``metrics`` (AP, P@k, R@k), ``transforms`` (the
seeded copies), ``grid`` (the sweep's configurations), ``bank`` (the shared forward passes),
``runner`` (one set's evaluation), ``protocol`` (tune, choose, validate), ``report`` (tables, JSON,
plot). This module is the command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deepfeat.scripts.evaluate.bank import FeatureBank
from deepfeat.scripts.evaluate.errors import EvalError
from deepfeat.scripts.evaluate.grid import Config, build_grid, parse_scales
from deepfeat.scripts.evaluate.metrics import average_precision, ranking_metrics
from deepfeat.scripts.evaluate.protocol import (
    CRITERION,
    MIN_DISTRACTOR_RATIO,
    default_config,
    rank_configs,
    run_category,
    run_copy,
    validation_rows,
)
from deepfeat.scripts.evaluate.report import (
    format_protocol,
    format_summary,
    format_table,
    plot_paths,
    save_plot,
    write_json,
)
from deepfeat.scripts.evaluate.runner import evaluate_category, evaluate_copy
from deepfeat.scripts.evaluate.split import SPLIT_SEED, assign_parts, split_folder
from deepfeat.scripts.evaluate.transforms import HARD_TRANSFORMS, TRANSFORMS, apply_transform, make_queries

__all__ = [
    "EvalError",
    "Config",
    "CRITERION",
    "MIN_DISTRACTOR_RATIO",
    "SPLIT_SEED",
    "TRANSFORMS",
    "HARD_TRANSFORMS",
    "average_precision",
    "ranking_metrics",
    "apply_transform",
    "make_queries",
    "assign_parts",
    "split_folder",
    "build_grid",
    "default_config",
    "FeatureBank",
    "evaluate_category",
    "evaluate_copy",
    "run_category",
    "run_copy",
    "rank_configs",
    "validation_rows",
    "format_protocol",
    "format_table",
    "format_summary",
    "save_plot",
    "build_parser",
    "main",
]

log = logging.getLogger(__name__)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepfeat eval",
        description="Measure retrieval quality (category retrieval or copy detection): sweep embedding "
        "choices on the tuning part of each collection, choose one, and report it with the shipped "
        "default and the naive baseline on the validation part. Two more modes have options of their "
        "own: `deepfeat eval service --help` (the HTTP API at the shipped defaults) and "
        "`deepfeat eval duplicates --help` (the duplicates threshold).",
    )
    parser.add_argument(
        "mode",
        choices=("category", "copy"),
        help="category: one sub-folder per class; copy: originals searched for after copy transforms",
    )
    parser.add_argument(
        "folders",
        type=Path,
        nargs="+",
        metavar="folder",
        help="collections, each evaluated on its own; category: one sub-folder per class; copy: "
        "distinct originals",
    )
    parser.add_argument(
        "--distractors",
        type=Path,
        nargs="+",
        action="extend",
        default=None,
        help="copy mode: folders of extra database images (any depth), shared by every collection and "
        "split like them",
    )
    parser.add_argument(
        "--allow-few-distractors",
        action="store_true",
        help=f"copy mode: run even where a part has fewer than {MIN_DISTRACTOR_RATIO}x as many "
        "distractors as originals",
    )
    parser.add_argument("--models", default="efficientnet_lite0", help="comma-separated model names")
    parser.add_argument(
        "--layers",
        default=None,
        help="comma-separated layer names or k (default: the top 3 conv layers)",
    )
    parser.add_argument("--poolings", default="avg,max,gem,rmac")
    parser.add_argument("--gem-p", type=float, default=3.0)
    parser.add_argument(
        "--whitening",
        default="none,auto",
        help="comma-separated: none, auto (a quarter of the training vectors), or a dim",
    )
    parser.add_argument(
        "--whiten-on", type=Path, default=None, help="learn whitening on this folder instead of the database"
    )
    parser.add_argument(
        "--scales",
        nargs="+",
        default=["1", "1,0.7071,0.5"],
        help="scale sets, each comma-separated (default: 1 and 1,0.7071,0.5)",
    )
    parser.add_argument("--resize-modes", default="crop,full", help="comma-separated: crop, full")
    parser.add_argument(
        "--lowpass",
        default="0,0.01",
        help="comma-separated blur fractions of a low-pass vector the database keeps per image (0 = none)",
    )
    parser.add_argument(
        "--regions",
        default="0,3",
        help="comma-separated regional grid sizes the database keeps per image (0 = none; default 0,3)",
    )
    parser.add_argument("--max-side", type=int, default=512, help="longest side in full mode")
    parser.add_argument("-k", "--ks", default="1,5,10", help="cut-offs for P@k / R@k")
    parser.add_argument(
        "--transforms", default=",".join(TRANSFORMS), help="copy mode: comma-separated transforms"
    )
    parser.add_argument("--seed", type=int, default=0, help="copy mode: seed of the query transforms")
    parser.add_argument(
        "--split-seed",
        type=int,
        default=SPLIT_SEED,
        help=f"seed of the tuning/validation split (default {SPLIT_SEED}, the published figures' split)",
    )
    parser.add_argument(
        "--limit-per-class",
        type=int,
        default=None,
        help="category mode: at most N images per class in each part",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--top", type=int, default=None, help="print only the N best tuning rows (and the baseline)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the full report here")
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="write a PNG of the tuning grid here (several collections: one file each, NAME-COLLECTION.png)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in _csv(text)]
    except ValueError:
        raise EvalError(f"bad --ks {text!r}: comma-separated positive integers") from None
    if not ks or min(ks) < 1:
        raise EvalError(f"bad --ks {text!r}: comma-separated positive integers")
    return ks


def _grid_from_args(args: argparse.Namespace) -> list[Config]:
    """The sweep the flags ask for; bad values fail here, before any model loads or image decodes."""
    for mode in _csv(args.resize_modes):
        if mode not in ("crop", "full"):
            raise EvalError(f"unknown resize mode {mode!r}; choose crop or full")
    for w in _csv(args.whitening):
        if w not in ("none", "auto") and not w.isdigit():
            raise EvalError(f"bad whitening {w!r}: none, auto or a dimension")
    return build_grid(
        models=_csv(args.models),
        layers=_csv(args.layers) if args.layers else None,
        poolings=_csv(args.poolings),
        whitening=_csv(args.whitening),
        scale_sets=[parse_scales(s) for s in args.scales],
        resize_modes=_csv(args.resize_modes),
        max_side=args.max_side,
        gem_p=args.gem_p,
        regions=_parse_regions(args.regions),
        lowpass=_parse_lowpass(args.lowpass),
    )


def _parse_lowpass(text: str) -> list[float]:
    try:
        values = [float(v) for v in _csv(text)]
    except ValueError:
        raise EvalError(f"bad --lowpass {text!r}: comma-separated fractions in [0, 0.1]") from None
    if not values or any(not 0 <= v <= 0.1 for v in values):
        raise EvalError(f"bad --lowpass {text!r}: comma-separated fractions in [0, 0.1]")
    return values


def _parse_regions(text: str) -> list[int]:
    try:
        grids = [int(g) for g in _csv(text)]
    except ValueError:
        raise EvalError(f"bad --regions {text!r}: comma-separated grid sizes, 0 or 2-7") from None
    if not grids or any(g != 0 and not 2 <= g <= 7 for g in grids):
        raise EvalError(f"bad --regions {text!r}: comma-separated grid sizes, 0 or 2-7")
    return grids


def run(args: argparse.Namespace, *, bank: FeatureBank | None = None) -> dict[str, Any]:
    """Evaluate as the parsed command line says; ``bank`` may bring already-loaded embedders."""
    ks = _parse_ks(args.ks)
    configs = _grid_from_args(args)
    if args.mode == "category" and args.distractors:
        raise EvalError("--distractors applies to copy mode only")
    log.info("%d configurations", len(configs))
    if bank is None:
        bank = FeatureBank(device=args.device, batch_size=args.batch_size)
    started = time.perf_counter()
    if args.mode == "category":
        report = run_category(
            args.folders,
            configs,
            ks=ks,
            bank=bank,
            split_seed=args.split_seed,
            whiten_on=args.whiten_on,
            limit_per_class=args.limit_per_class,
        )
    else:
        report = run_copy(
            args.folders,
            configs,
            distractors=args.distractors or [],
            transforms=_csv(args.transforms),
            seed=args.seed,
            split_seed=args.split_seed,
            bank=bank,
            ks=ks,
            whiten_on=args.whiten_on,
            allow_few_distractors=args.allow_few_distractors,
        )
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["device"] = args.device
    return report


_MODES = ("category", "copy", "service", "duplicates")


def main(argv: Sequence[str] | None = None, *, bank: FeatureBank | None = None) -> int:
    """``deepfeat eval ...``: exit status 0, or 2 with one ``error [code]: message`` line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["service"]:
        from deepfeat.scripts.evaluate import service

        return service.main(argv[1:])
    if argv[:1] == ["duplicates"]:
        from deepfeat.scripts.evaluate import duplicates

        return duplicates.main(argv[1:])
    if argv and not argv[0].startswith("-") and argv[0] not in _MODES:
        sys.stderr.write(
            f"error [usage]: unknown eval mode {argv[0]!r}; choose one of: {', '.join(_MODES)}\n"
        )
        return 2
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from deepfeat.index.errors import StoreError
    from deepfeat.models.errors import ModelError

    try:
        report = run(args, bank=bank)
        report["argv"] = argv
    except (EvalError, ModelError, StoreError) as exc:
        sys.stderr.write(f"error [{exc.code}]: {exc}\n")
        return 2
    out = sys.stdout
    out.write(format_protocol(report, top=args.top) + "\n")
    out.write(f"({report['configurations']} configurations tuned, validated in {report['seconds']}s)\n")
    if args.json:
        write_json(report, args.json)
        out.write(f"report: {args.json}\n")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        for name, path in plot_paths(args.plot, list(report["tuning"])).items():
            try:
                save_plot(report["tuning"][name], path)
            except EvalError as exc:
                sys.stderr.write(f"error [{exc.code}]: {exc}\n")
                return 2
            out.write(f"plot: {path}\n")
    return 0
