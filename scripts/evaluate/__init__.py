"""``deepfeat eval``: measure retrieval quality, and sweep the choices that decide it.

Two modes:

``category DIR``
    DIR holds one sub-folder per class. Every image queries all the others (exact inner-product search
    on L2-normalised vectors); a hit is relevant when it has the query's class. Reports mAP (mean over
    queries of the average precision), precision@k and recall@k.

``copy DIR [--distractors DIR2]``
    DIR holds distinct originals (any depth). Queries are made from each original with seeded
    transforms (heavy off-centre crop, rotation, JPEG q20 of a 1/4 downscale, colour change, blur,
    horizontal flip, several combined) and searched among the originals plus optional distractors.
    Reports recall@1 and mAP (= mean reciprocal rank: each query has one relevant image) per transform
    and overall.

Both sweep models x layers x pooling x whitening x scales x resize mode in one run. A naive baseline
(penultimate layer, centre crop, single scale, no whitening) is always included. Output: a fixed-width
table, ``--json`` and a ``--plot`` PNG.

The parts: ``metrics`` (AP, P@k, R@k), ``transforms`` (the seeded copies), ``grid`` (the sweep's
configurations), ``bank`` (the shared forward passes), ``runner`` (the two evaluations), ``report``
(table, summary, JSON, plot). This module is the command line.
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
from deepfeat.scripts.evaluate.report import format_summary, format_table, save_plot, write_json
from deepfeat.scripts.evaluate.runner import evaluate_category, evaluate_copy
from deepfeat.scripts.evaluate.transforms import HARD_TRANSFORMS, TRANSFORMS, apply_transform, make_queries

__all__ = [
    "EvalError",
    "Config",
    "TRANSFORMS",
    "HARD_TRANSFORMS",
    "average_precision",
    "ranking_metrics",
    "apply_transform",
    "make_queries",
    "build_grid",
    "FeatureBank",
    "evaluate_category",
    "evaluate_copy",
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
        description="Measure retrieval quality (category retrieval or copy detection) and sweep embedding choices.",
    )
    parser.add_argument("mode", choices=("category", "copy"))
    parser.add_argument(
        "folder", type=Path, help="category: one sub-folder per class; copy: distinct originals"
    )
    parser.add_argument(
        "--distractors", type=Path, default=None, help="copy mode: extra database images (any depth)"
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
    parser.add_argument("--max-side", type=int, default=512, help="longest side in full mode")
    parser.add_argument("-k", "--ks", default="1,5,10", help="cut-offs for P@k / R@k")
    parser.add_argument(
        "--transforms", default=",".join(TRANSFORMS), help="copy mode: comma-separated transforms"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--limit-per-class", type=int, default=None, help="category mode: at most N images per class"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--top", type=int, default=None, help="print only the N best rows (and the baseline)")
    parser.add_argument("--json", type=Path, default=None, help="write the full report here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
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
    )


def run(args: argparse.Namespace, *, bank: FeatureBank | None = None) -> dict[str, Any]:
    """Evaluate as the parsed command line says; ``bank`` may bring already-loaded embedders."""
    ks = _parse_ks(args.ks)
    configs = _grid_from_args(args)
    log.info("%d configurations", len(configs))
    if bank is None:
        bank = FeatureBank(device=args.device, batch_size=args.batch_size)
    started = time.perf_counter()
    if args.mode == "category":
        report = evaluate_category(
            args.folder,
            configs,
            ks=ks,
            bank=bank,
            whiten_on=args.whiten_on,
            limit_per_class=args.limit_per_class,
        )
    else:
        report = evaluate_copy(
            args.folder,
            configs,
            distractors=args.distractors,
            transforms=_csv(args.transforms),
            seed=args.seed,
            bank=bank,
            whiten_on=args.whiten_on,
            ks=ks,
        )
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["device"] = args.device
    return report


def main(argv: Sequence[str] | None = None, *, bank: FeatureBank | None = None) -> int:
    """``deepfeat eval ...``: exit status 0, or 2 with one ``error [code]: message`` line."""
    argv = list(sys.argv[1:] if argv is None else argv)
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
    out.write(format_table(report, top=args.top) + "\n\n" + format_summary(report) + "\n")
    out.write(f"({len(report['results'])} configurations in {report['seconds']}s)\n")
    if args.json:
        write_json(report, args.json)
        out.write(f"report: {args.json}\n")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        try:
            save_plot(report, args.plot)
        except EvalError as exc:
            sys.stderr.write(f"error [{exc.code}]: {exc}\n")
            return 2
        out.write(f"plot: {args.plot}\n")
    return 0
